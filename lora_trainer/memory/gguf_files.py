"""GGUF files read offline (the `gguf` package): plain tensors as they are, llama.cpp's block formats (Q8_0, Q5_K,
Q4_K ...) dequantized with diffusers' torch functions for them (the code diffusers' GGUF loader runs), each
weight's blocks noted so that its layer can keep them (memory/gguf_weights.py). Nothing here needs more than the
torch the project supports; the layers need torch 2.4."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import torch

# the formats whose values are plain numbers, read as tensors; every other type is a block format kept packed
PLAIN = {0: torch.float32, 1: torch.float16, 30: torch.bfloat16}  # GGMLQuantizationType F32, F16, BF16


@dataclass(frozen=True)
class Packed:
    """One weight as a GGUF file stores it: `data` uint8 (rows, bytes per row), its quantization type, its columns."""

    data: torch.Tensor
    qtype: int
    columns: int


@functools.cache
def _dequantizer(qtype: int):
    """diffusers' dequantize function for a GGML type, with its block size and bytes per block."""
    try:
        from diffusers.quantizers.gguf.utils import GGML_QUANT_SIZES, dequantize_functions
    except ImportError:
        raise ImportError("GGUF files need diffusers 0.32 or newer (its GGUF dequantizers): pip install -U diffusers") from None
    from gguf import GGMLQuantizationType

    kind = GGMLQuantizationType(qtype)
    if kind not in dequantize_functions:
        raise KeyError(kind.name)
    return dequantize_functions[kind], *GGML_QUANT_SIZES[kind]


def dequantized(data: torch.Tensor, qtype: int, columns: int, dtype: torch.dtype) -> torch.Tensor:
    """A packed weight (rows, bytes per row) as a (rows, columns) tensor in `dtype`."""
    function, block_size, type_size = _dequantizer(qtype)
    blocks = data.reshape(-1, type_size)
    return function(blocks, block_size, type_size, dtype).reshape(data.shape[0], columns).to(dtype)


def gguf_reader(path: Path):
    """gguf's reader over `path`; a clear message when the package is missing."""
    try:
        from gguf import GGUFReader
    except ImportError:
        raise ImportError(f"{Path(path).name} is a GGUF file: reading it needs the gguf package (pip install gguf).") from None
    return GGUFReader(str(path))


def read_gguf(path: Path, prefix: str = "", dtype: torch.dtype | None = None,
              packed: dict[int, Packed] | None = None) -> dict[str, torch.Tensor]:
    """The tensors of a GGUF file under `prefix` (removed), block-quantized ones dequantized to `dtype` (bf16 by
    default) and their blocks noted in `packed` by the storage address of the dequantized tensor, so that a layer
    built on it can keep the blocks instead (`holding.hold_linears`). Plain tensors keep their dtype, or take `dtype`."""
    out: dict[str, torch.Tensor] = {}
    for tensor in gguf_reader(path).tensors:
        if not tensor.name.startswith(prefix):
            continue
        qtype = int(tensor.tensor_type)
        shape = tuple(int(n) for n in reversed(tensor.shape))  # GGUF lists dimensions innermost first
        data = torch.from_numpy(tensor.data.copy())
        if qtype in PLAIN:
            value = data.view(PLAIN[qtype]).reshape(shape)
            value = value.to(dtype) if dtype is not None else value
        else:
            try:
                value = dequantized(data.reshape(shape[0], -1), qtype, shape[-1], dtype or torch.bfloat16)
            except KeyError as exc:
                raise ValueError(f"{Path(path).name}: tensor {tensor.name} is stored as {exc}, which cannot be read "
                                 "here; use a Q8_0, Q6_K, Q5_K, Q5_0, Q4_K or Q4_0 file of the model.") from None
            if packed is not None and len(shape) == 2:
                packed[value.untyped_storage().data_ptr()] = Packed(data.reshape(shape[0], -1), qtype, shape[1])
        out[tensor.name[len(prefix):]] = value
    return out


def packed_rows(weight: torch.Tensor, packed: Packed) -> Packed | None:
    """The packed blocks of `weight`, a (row-sliced) view of the tensor `packed` was read into; None unless
    dequantizing them gives `weight` exactly."""
    if weight.ndim != 2 or weight.shape[1] != packed.columns or weight.stride() != (packed.columns, 1):
        return None
    first = weight.storage_offset() // packed.columns
    rows = Packed(packed.data[first:first + weight.shape[0]], packed.qtype, packed.columns)
    if rows.data.shape[0] != weight.shape[0]:
        return None
    same = torch.equal(dequantized(rows.data, rows.qtype, rows.columns, weight.dtype), weight)
    return rows if same else None

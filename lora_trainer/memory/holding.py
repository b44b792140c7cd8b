"""How a frozen model's linear layers are held on the GPU: as stored in their file (fp8 bytes, GGUF blocks, NF4),
in fp8 or NF4 when the user asks (`base_weights`), or left in the training precision."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

import torch

from lora_trainer.memory.fp8 import Fp8Linear
from lora_trainer.memory.gguf_files import Packed, packed_rows
from lora_trainer.memory.gguf_weights import GGUFLinear
from lora_trainer.memory.nf4 import STORED as STORED_NF4
from lora_trainer.memory.nf4 import nf4_layer


def hold_linears(blocks: Iterable[torch.nn.Module], device: torch.device, *, quantize: str | None,
                 stored: Mapping[int, torch.Tensor | Packed | str] | None = None,
                 compute_dtype: torch.dtype = torch.bfloat16,
                 each: Callable[[torch.nn.Module], None] | None = None) -> dict[str, int]:
    """Every linear layer inside `blocks` replaced, one at a time on `device` (never the whole model in full
    precision there), by the layer that holds it: with `quantize` ('fp8' or 'nf4') every layer in that format (fp8
    layers from an fp8 file keep their bytes); without, as `stored` says: GGUF blocks and fp8 bytes kept as they
    are, weights read from NF4 quantized to NF4 again, the rest left as they are. NF4 layers multiply in
    `compute_dtype`. `each` is called with every block once its layers are held (block streaming takes it off the
    device there, so the whole model is never on it).

    `stored` (from `files.read_weights`) maps the storage address of a weight read from a quantized file to how the
    file holds it; a record that does not reproduce the weight exactly is not used. Returns the weights now held
    per kind ('fp8', 'gguf', 'nf4').
    """
    stored = stored or {}
    held = {"fp8": 0, "gguf": 0, "nf4": 0}
    for block in blocks:
        for name, module in list(block.named_modules()):
            if type(module) is not torch.nn.Linear:
                continue
            entry = stored.get(module.weight.untyped_storage().data_ptr())
            bias = None if module.bias is None else module.bias.detach().to(device)
            rows = packed_rows(module.weight, entry) if isinstance(entry, Packed) and not quantize else None
            if quantize == "nf4" or (isinstance(entry, str) and entry == STORED_NF4 and not quantize):
                layer = nf4_layer(module, device, compute_dtype)
                held["nf4"] += module.weight.numel()
            elif rows is not None:
                layer = GGUFLinear(Packed(rows.data.to(device), rows.qtype, rows.columns), bias)
                held["gguf"] += module.weight.numel()
            elif quantize == "fp8" or isinstance(entry, torch.Tensor):
                layer = Fp8Linear.of(module, device, entry if isinstance(entry, torch.Tensor) else None)
                held["fp8"] += module.weight.numel()
            else:
                continue
            parent, _, leaf = name.rpartition(".")
            setattr(block.get_submodule(parent) if parent else block, leaf, layer)
        if each is not None:
            each(block)
    return held


def store_in_fp8(blocks: Iterable[torch.nn.Module], device: torch.device) -> int:
    """Every linear layer inside `blocks` in fp8 on `device`; how many weights that is."""
    return hold_linears(blocks, device, quantize="fp8")["fp8"]

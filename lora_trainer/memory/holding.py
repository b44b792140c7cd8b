"""How a frozen model's linear layers are held on the GPU: as stored in their file (fp8 bytes, GGUF blocks), in
fp8 when the user asks (`base_weights: fp8`), or left in the training precision."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch

from lora_trainer.memory.fp8 import Fp8Linear
from lora_trainer.memory.gguf_files import Packed, packed_rows
from lora_trainer.memory.gguf_weights import GGUFLinear


def hold_linears(blocks: Iterable[torch.nn.Module], device: torch.device, *, fp8: bool,
                 stored: Mapping[int, torch.Tensor | Packed] | None = None) -> dict[str, int]:
    """Every linear layer inside `blocks` replaced, one at a time on `device` (never the whole model in full
    precision there), by the layer that holds it as `stored` says: GGUF blocks kept as they are (unless `fp8`),
    fp8 bytes kept with their scale; with `fp8` every other layer quantized to fp8 too. The rest stay as they are.

    `stored` (from `files.read_weights`) maps the storage address of a weight read from a quantized file to how the
    file holds it; a record that does not reproduce the weight exactly is not used. Returns the weights now held
    per kind ('fp8', 'gguf').
    """
    stored = stored or {}
    held = {"fp8": 0, "gguf": 0}
    for block in blocks:
        for name, module in list(block.named_modules()):
            if type(module) is not torch.nn.Linear:
                continue
            entry = stored.get(module.weight.untyped_storage().data_ptr())
            bias = None if module.bias is None else module.bias.detach().to(device)
            rows = packed_rows(module.weight, entry) if isinstance(entry, Packed) and not fp8 else None
            if rows is not None:
                layer = GGUFLinear(Packed(rows.data.to(device), rows.qtype, rows.columns), bias)
                held["gguf"] += module.weight.numel()
            elif fp8 or isinstance(entry, torch.Tensor):
                layer = Fp8Linear.of(module, device, entry if isinstance(entry, torch.Tensor) else None)
                held["fp8"] += module.weight.numel()
            else:
                continue
            parent, _, leaf = name.rpartition(".")
            setattr(block.get_submodule(parent) if parent else block, leaf, layer)
    return held


def store_in_fp8(blocks: Iterable[torch.nn.Module], device: torch.device) -> int:
    """Every linear layer inside `blocks` in fp8 on `device`; how many weights that is."""
    return hold_linears(blocks, device, fp8=True)["fp8"]

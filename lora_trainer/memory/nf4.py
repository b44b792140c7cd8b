"""Frozen linear layers held in 4-bit NF4 (bitsandbytes): a quarter of bf16's memory.

bitsandbytes' own layer is used as it is: its matmul dequantizes the weight for the forward pass and again for the
input gradient, saving only the packed weight (checked on the CPU), and peft puts LoRA layers around it.
"""

from __future__ import annotations

import torch

BLOCK = 64  # values per absmax scale, bitsandbytes' default for NF4


def nf4_layer(linear: torch.nn.Linear, device: torch.device, compute_dtype: torch.dtype) -> torch.nn.Module:
    """`linear` quantized to NF4 on `device`; it multiplies in `compute_dtype`."""
    import bitsandbytes as bnb

    layer = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                              compute_dtype=compute_dtype, quant_type="nf4", device="meta")
    layer.weight = bnb.nn.Params4bit(linear.weight.detach().to(device), requires_grad=False, quant_type="nf4",
                                     blocksize=BLOCK)
    if linear.bias is not None:
        layer.bias = torch.nn.Parameter(linear.bias.detach().to(device), requires_grad=False)
    return layer.to(device)  # bitsandbytes quantizes on this move


STATE = ".quant_state.bitsandbytes__nf4"  # how bitsandbytes names an NF4 weight's packed state (Forge's NF4 files)
STORED = "nf4"  # what `files.read_weights` notes for a weight read from NF4, for `holding.hold_linears`


def from_nf4(packed: torch.Tensor, parts: dict[str, torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    """A weight saved by bitsandbytes in NF4 (`packed` and its state `parts`: absmax, quant_map, ... without the
    weight's name) as a full tensor in `dtype`."""
    try:
        from bitsandbytes.functional import QuantState, dequantize_4bit
    except ImportError:
        raise ImportError("This file holds NF4 weights (bitsandbytes' 4-bit format, as Forge saves them): reading "
                          "them needs the bitsandbytes package (pip install bitsandbytes).") from None
    state = QuantState.from_dict(parts, device=packed.device)
    return dequantize_4bit(packed, state).to(dtype)

"""Frozen linear layers kept as a GGUF file stores them (memory/gguf_files.py reads them): each dequantizes its
blocks for its own matmul.

diffusers' own GGUF layer is not used for training: autograd saves each layer's dequantized weight for the
backward pass, and it breaks under torch.compile; so, as for fp8 (memory/fp8.py), the matmul and its input
gradient are two custom ops (torch 2.4 and later) that save only the stored blocks.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lora_trainer.memory.frozen import FrozenLinear
from lora_trainer.memory.gguf_files import Packed, dequantized


@torch.library.custom_op("lora_trainer::gguf_linear", mutates_args=())
def gguf_linear(x: torch.Tensor, data: torch.Tensor, qtype: int, columns: int, bias: torch.Tensor | None) -> torch.Tensor:
    """`x @ W.T + bias`, W dequantized from its GGUF blocks to x's dtype for this matmul only."""
    return F.linear(x, dequantized(data, qtype, columns, x.dtype), bias)


@gguf_linear.register_fake
def _(x, data, qtype, columns, bias):
    return x.new_empty((*x.shape[:-1], data.shape[0]))


@torch.library.custom_op("lora_trainer::gguf_linear_input_grad", mutates_args=())
def gguf_linear_input_grad(grad: torch.Tensor, data: torch.Tensor, qtype: int, columns: int) -> torch.Tensor:
    """The gradient of `gguf_linear` for its input, the blocks dequantized again."""
    return grad @ dequantized(data, qtype, columns, grad.dtype)


@gguf_linear_input_grad.register_fake
def _(grad, data, qtype, columns):
    return grad.new_empty((*grad.shape[:-1], columns))


def _keep_bytes(ctx, inputs, output) -> None:
    _, data, qtype, columns, _ = inputs
    ctx.save_for_backward(data)
    ctx.qtype, ctx.columns = qtype, columns


def _input_grad(ctx, grad):
    (data,) = ctx.saved_tensors
    x_grad = gguf_linear_input_grad(grad, data, ctx.qtype, ctx.columns) if ctx.needs_input_grad[0] else None
    return x_grad, None, None, None, None


gguf_linear.register_autograd(_input_grad, setup_context=_keep_bytes)


class GGUFLinear(FrozenLinear):
    """A frozen linear layer holding a GGUF file's packed blocks (uint8, which a model's `.to(dtype)` leaves alone)."""

    def __init__(self, packed: Packed, bias: torch.Tensor | None) -> None:
        super().__init__(packed.data.shape[0], packed.columns, bias)
        self.qtype = packed.qtype
        self.register_buffer("weight", packed.data)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, bias = self.inputs(x)
        return gguf_linear(x, self.weight, self.qtype, self.in_features, bias)

    def dequantized(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight as the layer multiplies with it."""
        return dequantized(self.weight, self.qtype, self.in_features, dtype)

    def extra_repr(self) -> str:
        from gguf import GGMLQuantizationType

        return f"{super().extra_repr()}, {GGMLQuantizationType(self.qtype).name}"

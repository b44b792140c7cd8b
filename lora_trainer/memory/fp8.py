"""Frozen linear layers stored in fp8: each dequantizes its weight for its own matmul; the LoRA adds its own path.

A model held so takes one byte per weight instead of two (Flux.1-dev: 12 GB instead of 24), and never a
full-precision copy of itself: one layer's weight exists in the compute dtype only while that layer multiplies.

Written here rather than taken from torchao or diffusers, because of the backward pass. torchao's
`Float8WeightOnlyConfig` linear and diffusers' GGUF linear both let autograd save the dequantized bf16 weight of
every layer for the backward pass (measured on the CPU: about 24 GB more for Flux.1), which is the memory this is
for. A plain autograd.Function that dequantizes again in backward avoids it eagerly, but torch.compile merges its
two dequantizations and saves the copy again. So the matmul and its input gradient are two custom ops, opaque to
the compiler: the forward saves only the stored bytes, the backward dequantizes them again. No weight gradient:
the base is frozen.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import torch
import torch.nn.functional as F

from lora_trainer.memory.frozen import FrozenLinear

log = logging.getLogger(__name__)

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0  # e4m3fn's largest magnitude


def dequantized(weight: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """fp8 values times their scale (one, or one per row), in `dtype`; the scale is rounded to `dtype` first, as
    ComfyUI's scaled-fp8 layers do it."""
    return weight.to(dtype) * scale.to(dtype)


@torch.library.custom_op("lora_trainer::fp8_linear", mutates_args=())
def fp8_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """`x @ (weight * scale).T + bias`, the weight dequantized to x's dtype for this matmul only."""
    return F.linear(x, dequantized(weight, scale, x.dtype), bias)


@fp8_linear.register_fake
def _(x, weight, scale, bias):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


@torch.library.custom_op("lora_trainer::fp8_linear_input_grad", mutates_args=())
def fp8_linear_input_grad(grad: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The gradient of `fp8_linear` for its input: `grad @ (weight * scale)`, dequantized again."""
    return grad @ dequantized(weight, scale, grad.dtype)


@fp8_linear_input_grad.register_fake
def _(grad, weight, scale):
    return grad.new_empty((*grad.shape[:-1], weight.shape[1]))


def _keep_bytes(ctx, inputs, output) -> None:
    _, weight, scale, _ = inputs
    ctx.save_for_backward(weight, scale)  # the stored bytes (already held by the layer): nothing new is kept


def _input_grad(ctx, grad):
    weight, scale = ctx.saved_tensors
    return fp8_linear_input_grad(grad, weight, scale) if ctx.needs_input_grad[0] else None, None, None, None


fp8_linear.register_autograd(_input_grad, setup_context=_keep_bytes)


@torch.library.custom_op("lora_trainer::fp8_matmul_linear", mutates_args=())
def fp8_matmul_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None
                      ) -> torch.Tensor:
    """`fp8_linear` with the matmul itself in fp8 (`fp8_compute: on`): x quantized to e4m3 with one scale per row
    (a power of two that brings its largest magnitude within 448), then one `torch._scaled_mm` that applies both
    scales to its fp32 accumulator and writes x's dtype. Twice bf16's matmul rate on GPUs with fp8 tensor cores (Ada,
    Hopper, Blackwell), and no dequantized copy of the weight; x's rounding to 3 mantissa bits is what it costs the
    result (on Flux.1: a LoRA as close to the bf16 one as fp8 storage alone gives)."""
    rows = x.reshape(-1, x.shape[-1])
    largest = torch.linalg.vector_norm(rows, float("inf"), dim=1, keepdim=True).float()
    # a power of two at or above largest / 448: scaling by it is exact in x's own dtype and stays within fp8's range,
    # so x is read three times in all (largest, scaled, cast) rather than through fp32 copies
    x_scale = torch.exp2(torch.ceil(torch.log2((largest / FP8_MAX).clamp(min=2.0**-100))))
    x_fp8 = (rows * (1 / x_scale).to(rows.dtype)).to(FP8)
    w_scale = scale.float().reshape(-1, 1).expand(weight.shape[0], 1).reshape(1, -1)
    out = torch._scaled_mm(x_fp8, weight.t(), scale_a=x_scale, scale_b=w_scale, out_dtype=x.dtype)
    out = out.reshape(*x.shape[:-1], weight.shape[0])
    return out if bias is None else out + bias


@fp8_matmul_linear.register_fake
def _(x, weight, scale, bias):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


# the input's gradient stays a bf16 matmul on the dequantized weight: an fp8 one would need the weight's transpose
# stored as well (torch._scaled_mm takes its second operand column-major), another byte per weight
fp8_matmul_linear.register_autograd(_input_grad, setup_context=_keep_bytes)


def can_compute_in_fp8(layer: torch.nn.Linear) -> bool:
    """Whether `torch._scaled_mm` takes this layer's shape (both sizes multiples of 16)."""
    return layer.in_features % 16 == 0 and layer.out_features % 16 == 0


class Fp8Linear(FrozenLinear):
    """A frozen linear layer whose weight is stored as fp8 (e4m3fn) with a scale per tensor or per row.

    The bytes are kept as uint8: a model's `.to(dtype)` casts every floating-point tensor and would turn them into a
    full-precision copy, and peft (which reads `weight.dtype`) would make the LoRA fp8.
    """

    def __init__(self, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__(*weight.shape, bias)
        self.register_buffer("weight", weight.view(torch.uint8))
        self.register_buffer("scale", scale.float())
        self.fp8_matmul = False  # `compute_in_fp8` turns it on

    @classmethod
    def of(cls, linear: torch.nn.Linear, device: torch.device, stored_scale: torch.Tensor | None = None) -> Fp8Linear:
        """`linear`'s weight quantized on `device` (see `quantize`)."""
        weight, scale = quantize(linear.weight.detach().to(device), stored_scale)
        bias = None if linear.bias is None else linear.bias.detach().to(device)
        return cls(weight, scale, bias)

    def _apply(self, fn, recurse=True):
        """Moves follow the model, casts do not reach the scale (the bytes are uint8, which casts skip)."""
        scale = self.scale
        super()._apply(fn, recurse)
        self.scale = scale.to(self.weight.device)
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, bias = self.inputs(x)
        linear = fp8_matmul_linear if self.fp8_matmul else fp8_linear
        return linear(x, self.weight.view(FP8), self.scale, bias)

    def dequantized(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight as the layer multiplies with it."""
        return dequantized(self.weight.view(FP8), self.scale, dtype)


def quantize(weight: torch.Tensor, stored_scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """fp8 values and their scale for a weight. A weight read from an fp8 file with `stored_scale` (1 for a plain
    fp8 file) gets its stored values back exactly; any other gets one scale per row (its largest magnitude maps to
    448), the scales rounded to bf16 so that dequantizing in bf16 rounds once."""
    if stored_scale is not None:
        scale = stored_scale.to(weight.device, torch.float32)
        q = (weight.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8)
        if torch.equal(dequantized(q, scale, weight.dtype), weight):
            return q, scale
    w = weight.float()
    rows = w.abs().amax(dim=1, keepdim=True)
    scale = (rows / FP8_MAX).to(torch.bfloat16).float().clamp(min=torch.finfo(torch.bfloat16).tiny)
    return (w / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale


def compute_in_fp8(modules: Iterable[torch.nn.Module]) -> int:
    """Every fp8 layer inside `modules` whose shape allows it multiplies in fp8 from now on (`fp8_matmul_linear`);
    how many weights that is."""
    count = 0
    for module in modules:
        for layer in module.modules():
            if isinstance(layer, Fp8Linear) and can_compute_in_fp8(layer):
                layer.fp8_matmul = True
                count += layer.weight.numel()
    return count

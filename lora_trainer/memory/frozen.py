"""What every frozen quantized linear layer of ours shares (fp8, GGUF): its sizes, its frozen bias, the dtype it
multiplies in, and the dtype peft keeps its LoRA in."""

from __future__ import annotations

import torch


class FrozenLinear(torch.nn.Linear):
    """A frozen linear layer whose weight a subclass keeps in its own stored form (`weight`, a buffer).

    `compute_dtype` is what peft keeps a quantized layer's LoRA in (it asks such layers for it): full precision.
    """

    compute_dtype = torch.float32

    def __init__(self, out_features: int, in_features: int, bias: torch.Tensor | None) -> None:
        torch.nn.Module.__init__(self)  # not nn.Linear's: it would allocate a full-precision weight
        self.out_features, self.in_features = out_features, in_features
        self.bias = None if bias is None else torch.nn.Parameter(bias.detach(), requires_grad=False)

    def inputs(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """`x` and the bias in the dtype this matmul runs in: autocast's where it is on, else x's own."""
        dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
        return x.to(dtype), None if self.bias is None else self.bias.to(dtype)

"""Gradient checkpointing that a CUDA graph can capture.

torch's checkpoint saves the CUDA random state before each block and restores it for the recompute
(`preserve_rng_state`), so that dropout draws the same masks twice. Reading that state is refused while a CUDA
graph is being captured, which is why checkpointing used to turn the captured step off. A forward that draws no
random numbers (no active dropout: the image families' default, where LoRA dropout is 0) needs no saved state,
so its blocks are checkpointed without it and the step stays captured.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable

import torch
from torch.utils.checkpoint import checkpoint

from lora_trainer.errors import ConfigError


def draws_random(model: torch.nn.Module) -> bool:
    """Whether `model`'s forward has dropout that draws random masks (peft's LoRA dropout included)."""
    return any(isinstance(module, torch.nn.Dropout) and module.p > 0 for module in model.modules())


def enable_checkpointing(model: torch.nn.Module, recompute_in: Callable[[], contextlib.AbstractContextManager] | None = None) -> bool:
    """Turn on a diffusers model's gradient checkpointing; True when its step can still be captured as a CUDA graph
    (the forward draws no random numbers and this diffusers takes our checkpoint function: 0.32 and later).

    `recompute_in` gives the context the forward runs in (the flow families' choice of attention kernels): the
    recompute happens inside the backward pass, outside it, and must pick the same kernels, or the recomputed
    tensors differ from the saved ones (torch stops with "Recomputed values ... have different metadata")."""
    preserve = draws_random(model)
    contexts = (lambda: (contextlib.nullcontext(), recompute_in())) if recompute_in else None
    extra = {"context_fn": contexts} if contexts else {}

    def run(block, *args, **kwargs):
        return checkpoint(block.__call__, *args, use_reentrant=False, preserve_rng_state=preserve, **extra, **kwargs)

    if "gradient_checkpointing_func" in inspect.signature(model.enable_gradient_checkpointing).parameters:
        model.enable_gradient_checkpointing(gradient_checkpointing_func=run)
        return not preserve
    if recompute_in is not None:  # diffusers before 0.32 calls torch's checkpoint itself, without the context
        import diffusers

        raise ConfigError(f"gradient_checkpointing on this model needs diffusers 0.32 or newer (this is "
                          f"{diffusers.__version__}): pip install -U diffusers, or gradient_checkpointing: false.")
    model.enable_gradient_checkpointing()  # diffusers before 0.32 calls torch's checkpoint itself, saving the state
    return False

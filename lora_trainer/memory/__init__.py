"""What makes a model fit a small GPU: checkpointing a CUDA graph can capture, frozen weights held as stored
(fp8, GGUF, NF4) or in fp8 or NF4, the levers an out-of-memory error and the spill warning name."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable

import torch

from lora_trainer.config import TrainConfig
from lora_trainer.errors import ConfigError

log = logging.getLogger(__name__)


def holds_quantized(base_weights: str, stored: bool) -> bool:
    """Whether a run holds frozen layers quantized: `base_weights: fp8` or `nf4`, or 'auto' on a file stored
    quantized (`stored`). fp8 and GGUF layers are torch custom ops (2.4 and later): on an older torch 'fp8' is
    refused and 'auto' trains the file's weights in full precision. NF4 needs bitsandbytes."""
    if base_weights == "nf4":
        try:
            import bitsandbytes  # noqa: F401 - only asked whether it is there
        except ImportError:
            raise ConfigError("base_weights: nf4 needs the bitsandbytes package: pip install bitsandbytes (or use "
                              "base_weights: fp8).") from None
        return True
    wanted = base_weights == "fp8" or (base_weights == "auto" and stored)
    if wanted and not hasattr(torch.library, "custom_op"):
        if base_weights == "fp8":
            raise ConfigError(f"base_weights: fp8 needs torch 2.4 or newer (this is {torch.__version__}). Update torch, "
                              "or set base_weights: auto.")
        log.warning("This torch (%s) cannot train on the file's quantized weights (2.4 or newer can): they are held "
                    "in full precision, which takes more GPU memory.", torch.__version__)
        return False
    return wanted


def with_fp8_compute(config: TrainConfig, device: torch.device) -> TrainConfig:
    """`config` ready for `fp8_compute: on`, before anything loads: the base held in fp8 (base_weights 'auto' becomes
    'fp8'; an fp8 file keeps its bytes either way). Refused where it cannot run: language models, a base held in
    full precision or NF4 by choice, a GPU without fp8 tensor cores, a torch without `_scaled_mm` or custom ops."""
    if config.fp8_compute != "on":
        return config
    if config.model_type != "image":
        raise ConfigError("fp8_compute is for image models; set fp8_compute: off.")
    if config.base_weights in ("full", "nf4"):
        raise ConfigError(f"fp8_compute: on multiplies with the base's fp8 weights, and base_weights: "
                          f"{config.base_weights} holds them otherwise. Set base_weights: fp8 (or auto), or "
                          "fp8_compute: off.")
    if not (hasattr(torch, "_scaled_mm") and hasattr(torch.library, "custom_op")):
        raise ConfigError(f"fp8_compute needs torch 2.4 or newer (this is {torch.__version__}). Update torch, or set "
                          "fp8_compute: off.")
    if device.type == "cuda" and (capability := torch.cuda.get_device_capability(device)) < (8, 9):
        major, minor = capability
        raise ConfigError(f"fp8_compute needs a GPU with fp8 tensor cores (RTX 40xx or 50xx, Ada, Hopper, Blackwell: "
                          f"compute capability 8.9 or later); {torch.cuda.get_device_name(device)} is {major}.{minor}. "
                          "Set fp8_compute: off (base_weights: fp8 still halves the base's memory).")
    if device.type not in ("cuda", "cpu"):
        raise ConfigError(f"fp8_compute runs on CUDA GPUs (and the CPU), not on {device.type}. Set fp8_compute: off.")
    return dataclasses.replace(config, base_weights="fp8") if config.base_weights == "auto" else config


def hold_base(blocks: list[torch.nn.Module], base_weights: str, device: torch.device, dtype: torch.dtype,
              stored: dict | None = None, what: str = "model",
              each: Callable[[torch.nn.Module], None] | None = None, fp8_compute: bool = False) -> None:
    """The linear layers inside `blocks` held as `base_weights` says (`holding.hold_linears`; `stored`: how a quantized
    file held them; `each` called with every block once held), the fp8 ones multiplying in fp8 with `fp8_compute`,
    logged; nothing when the run holds its base in full precision."""
    if not holds_quantized(base_weights, bool(stored)):
        return
    from lora_trainer.memory.holding import hold_linears  # torch 2.4's custom ops

    held = hold_linears(blocks, device, quantize=base_weights if base_weights in ("fp8", "nf4") else None,
                        stored=stored, compute_dtype=dtype, each=each)
    log.info("Base weights (base_weights: %s): %s of the %s's weights on the GPU.", base_weights,
             ", ".join(f"{count / 1e9:.2f} B in {kind}" for kind, count in held.items() if count), what)
    if fp8_compute:
        from lora_trainer.memory.fp8 import compute_in_fp8

        log.info("fp8_compute: %.2f B of the %s's weights multiply in fp8.", compute_in_fp8(blocks) / 1e9, what)


def capture_blockers(base_weights: str, checkpointing_captured: bool) -> list[str]:
    """Why the memory levers keep a step from being captured: checkpointing that must restore the random state
    (dropout) or that diffusers before 0.32 does its own way; bitsandbytes' NF4 layers (not measured inside a CUDA
    graph yet)."""
    return ([] if checkpointing_captured else ["gradient checkpointing with dropout or diffusers < 0.32"]) + \
        (["base_weights: nf4 (bitsandbytes' layers)"] if base_weights == "nf4" else [])

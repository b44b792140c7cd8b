"""Optimizers and learning-rate schedules by name; optional packages are named when missing."""

from __future__ import annotations

import importlib

import torch
from diffusers.optimization import get_scheduler

from lora_trainer.errors import ConfigError

OPTIONAL = {
    "adamw8bit": ("bitsandbytes", "bitsandbytes.optim", "AdamW8bit"),
    "prodigy": ("prodigyopt", "prodigyopt", "Prodigy"),
    "lion": ("lion-pytorch", "lion_pytorch", "Lion"),
}


def make_optimizer(name: str, groups: list[dict], weight_decay: float, device: torch.device) -> torch.optim.Optimizer:
    """The optimizer `name` over parameter groups (each with its own 'lr')."""
    if name == "adamw":
        fused = device.type == "cuda"
        return torch.optim.AdamW(groups, weight_decay=weight_decay, fused=fused)
    package, module, cls = OPTIONAL[name]
    try:
        optimizer_cls = getattr(importlib.import_module(module), cls)
    except ImportError:
        raise ConfigError(f"optimizer: {name} needs the '{package}' package: run `pip install {package}`, "
                          "or use optimizer: adamw.") from None
    return optimizer_cls(groups, weight_decay=weight_decay)


def make_scheduler(name: str, optimizer: torch.optim.Optimizer, warmup: int, total: int):
    """diffusers' learning-rate schedule `name` with `warmup` steps, over `total` optimizer steps."""
    return get_scheduler(name, optimizer, num_warmup_steps=warmup, num_training_steps=total)

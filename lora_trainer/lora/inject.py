"""LoRA layers put into any torch model with peft: add, fill, read back, scale."""

from __future__ import annotations

import logging

import torch
from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model, set_peft_model_state_dict

from lora_trainer.errors import CheckpointError

log = logging.getLogger(__name__)

ADAPTER = "default"


def add_lora(model: torch.nn.Module, targets: list[str], rank: int, alpha: float, dropout: float,
             rank_pattern: dict[str, int] | None = None) -> list[torch.nn.Parameter]:
    """Wrap `targets` (full module names) of a frozen `model` in LoRA layers; returns the new parameters."""
    model.requires_grad_(False)
    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets,
                        # full module names as they are: newer peft matches them as `(.*\.)?name$`, peft before 0.14 by
                        # equality (its regex `.*\.name$` never matches a full name); anchors would break the latter
                        rank_pattern=dict(rank_pattern or {}), init_lora_weights=True)
    inject_adapter_in_model(config, model, adapter_name=ADAPTER)
    params = [p for n, p in model.named_parameters() if "lora_" in n]
    for p in params:
        p.requires_grad_(True)
    return params


def keep_lora_input_dtype(*models: torch.nn.Module) -> int:
    """Let peft's LoRA layers take their input in the dtype it comes in (bf16/fp16) instead of copying it to the
    LoRA's fp32; returns how many layers were switched. Only for forwards that run under autocast.

    Under autocast the copy is cast straight back for the LoRA's matmul, so the result is the same, but that second
    copy is what the matmul saves for backward: one extra copy of every LoRA layer's input (q, k and v each keep
    their own), two more kernels per layer. Measured at SD1.5 batch 4 on an H200: see README, "Performance".
    peft before 0.15 casts unconditionally and is left as it is.
    """
    from peft.tuners.lora import LoraLayer

    switched = 0
    for model in models:
        for module in model.modules():
            if isinstance(module, LoraLayer):
                module.cast_input_dtype_enabled = False
                switched += 1
    return switched


def lora_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's LoRA weights in peft naming (no adapter name)."""
    return get_peft_model_state_dict(model, adapter_name=ADAPTER)


def load_lora_state(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Put peft-named LoRA weights back into `model`, refusing any that do not fit."""
    result = set_peft_model_state_dict(model, state, adapter_name=ADAPTER)
    unexpected = [k for k in getattr(result, "unexpected_keys", []) if "lora_" in k]
    if unexpected:
        raise CheckpointError(f"LoRA weights do not fit this model: {unexpected[:5]}")


def fill_lora(model: torch.nn.Module, modules: dict[str, dict]) -> None:
    """Copy down/up weights into the model's LoRA layers."""
    state = {}
    for name, parts in modules.items():
        state[f"{name}.lora_A.weight"] = parts["down"]
        state[f"{name}.lora_B.weight"] = parts["up"]
    load_lora_state(model, state)


def set_lora_strength(model: torch.nn.Module, strength: float) -> None:
    """Scale every LoRA layer of `model` to `strength` times its own alpha/rank (0 turns the LoRA off)."""
    from peft.tuners.lora import LoraLayer

    for module in model.modules():
        if isinstance(module, LoraLayer) and ADAPTER in module.scaling:
            module.scaling[ADAPTER] = strength * module.lora_alpha[ADAPTER] / module.r[ADAPTER]

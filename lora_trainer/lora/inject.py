"""Putting LoRA layers into the UNet and text encoders with peft, and filling them from a LoRA file."""

from __future__ import annotations

import logging

import torch
from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model, set_peft_model_state_dict

from lora_trainer.backbones.ldm import unet_to_ldm
from lora_trainer.errors import CheckpointError
from lora_trainer.lora.kohya import TEXT_PREFIXES, kohya_module_name, lora_modules, read_lora_file

log = logging.getLogger(__name__)

ADAPTER = "default"


def add_lora(model: torch.nn.Module, targets: list[str], rank: int, alpha: float, dropout: float,
             rank_pattern: dict[str, int] | None = None) -> list[torch.nn.Parameter]:
    """Wrap `targets` (full module names) of a frozen `model` in LoRA layers; returns the new parameters."""
    model.requires_grad_(False)
    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets,
                        rank_pattern={f"^{k}$": v for k, v in (rank_pattern or {}).items()}, init_lora_weights=True)
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


def module_lookup(unet: torch.nn.Module, text_encoders: list[torch.nn.Module], family: str) -> dict[str, tuple[int, str]]:
    """kohya module name -> (0 for the UNet or 1+i for text encoder i, module name in our models).

    UNet names are accepted in diffusers naming (ours, kohya's) and in LDM naming (some other tools).
    """
    lookup: dict[str, tuple[int, str]] = {}
    layers = unet.config.layers_per_block
    weights = [n for n, m in unet.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
    ldm_names = unet_to_ldm({f"{n}.weight": None for n in weights}, layers)
    for name, ldm_name in zip(weights, ldm_names):
        lookup[kohya_module_name("lora_unet", name)] = (0, name)
        lookup[kohya_module_name("lora_unet", ldm_name.removesuffix(".weight"))] = (0, name)
    for index, (encoder, prefix) in enumerate(zip(text_encoders, TEXT_PREFIXES[family])):
        for name, module in encoder.named_modules():
            if isinstance(module, torch.nn.Linear):
                canonical = name if name.startswith("text_model.") else f"text_model.{name}"
                lookup[kohya_module_name(prefix, canonical)] = (index + 1, name)
    return lookup


def read_init_lora(path: str, unet: torch.nn.Module, text_encoders: list[torch.nn.Module], family: str,
                   alpha: float) -> list[dict[str, dict]]:
    """A LoRA file as per-model {module name: {'down', 'up'}} with `up` rescaled to our alpha.

    The file's own rank is kept per module; its scale (alpha/rank) is folded into `up` so that the
    continued LoRA starts out with exactly the file's effect.
    """
    tensors, _ = read_lora_file(path)
    lookup = module_lookup(unet, text_encoders, family)
    per_model: list[dict[str, dict]] = [{} for _ in range(1 + len(text_encoders))]
    unknown = []
    for name, parts in lora_modules(tensors).items():
        if name not in lookup:
            unknown.append(name)
            continue
        if "down" not in parts or "up" not in parts:
            raise CheckpointError(f"{path}: module {name} lacks its lora_down or lora_up weight.")
        rank = parts["down"].shape[0]
        file_scale = float(parts["alpha"]) / rank if "alpha" in parts else 1.0
        index, module = lookup[name]
        per_model[index][module] = {"down": parts["down"].float(), "up": parts["up"].float() * file_scale / (alpha / rank)}
    if unknown:
        raise CheckpointError(f"{path} does not fit this {family} model: {len(unknown)} modules have no match "
                              f"(e.g. {', '.join(unknown[:3])}). Was it trained on another model family?")
    if not any(per_model):
        raise CheckpointError(f"{path} holds no LoRA modules.")
    return per_model


def fill_lora(model: torch.nn.Module, modules: dict[str, dict]) -> None:
    """Copy down/up weights into the model's LoRA layers."""
    state = {}
    for name, parts in modules.items():
        state[f"{name}.lora_A.weight"] = parts["down"]
        state[f"{name}.lora_B.weight"] = parts["up"]
    load_lora_state(model, state)


def apply_lora_file(backbone, path: str, strength: float = 1.0) -> None:
    """Put a kohya LoRA file onto a backbone's UNet and text encoders at `strength` (for previews and tests).

    Uses our own reader rather than diffusers' loader, which needs transformers >= 4.34 (the WebUI has 4.30).
    """
    models = [backbone.unet, *backbone.text_encoders]
    per_model = read_init_lora(path, backbone.unet, backbone.text_encoders, backbone.family, alpha=1.0)
    for model, modules in zip(models, per_model):
        if not modules:
            continue
        ranks = {name: parts["down"].shape[0] for name, parts in modules.items()}
        for parts in modules.values():
            parts["up"] = parts["up"] * strength
        add_lora(model, sorted(modules), max(ranks.values()), 1.0, 0.0, ranks)
        # peft scales by alpha/rank; read_init_lora already folded the file's own scale into `up` for alpha 1
        fill_lora(model, modules)
        model.requires_grad_(False)


def set_lora_strength(model: torch.nn.Module, strength: float) -> None:
    """Scale every LoRA layer of `model` to `strength` times its own alpha/rank (0 turns the LoRA off)."""
    from peft.tuners.lora import LoraLayer

    for module in model.modules():
        if isinstance(module, LoraLayer) and ADAPTER in module.scaling:
            module.scaling[ADAPTER] = strength * module.lora_alpha[ADAPTER] / module.r[ADAPTER]

"""Reading base-model files safely and telling SD1, SD2 and SDXL apart from their keys."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

from lora_trainer.errors import CheckpointError

log = logging.getLogger(__name__)

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
UNET_PREFIX = "model.diffusion_model."


def checkpoint_keys(path: Path, *, allow_pickle: bool = False) -> list[str]:
    """The tensor names in a checkpoint file, read from its header where the format allows."""
    path = _existing(path)
    if path.suffix.lower() == ".safetensors":
        try:
            with safe_open(str(path), framework="pt") as f:
                return list(f.keys())
        except (SafetensorError, OSError, ValueError) as exc:
            raise CheckpointError(_unreadable(path, exc)) from None
    return list(read_checkpoint(path, allow_pickle=allow_pickle))


def read_checkpoint(path: Path, *, allow_pickle: bool = False) -> dict[str, torch.Tensor]:
    """All tensors of a single-file checkpoint; pickle formats only when the user opted in."""
    path = _existing(path)
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
            raise CheckpointError(_unreadable(path, exc)) from None
    if suffix in PICKLE_SUFFIXES:
        if not allow_pickle:
            raise CheckpointError(
                f"{path.name} is a pickle file ({suffix}), which can run code when loaded. Convert it to "
                ".safetensors, or set 'allow_pickle: true' if you trust where it came from."
            )
        log.warning("Loading pickle checkpoint %s because allow_pickle is set.", path)
        try:
            data = torch.load(str(path), map_location="cpu", weights_only=False)  # the user opted in
        except Exception as exc:  # noqa: BLE001 - pickle loading fails in countless ways
            raise CheckpointError(_unreadable(path, exc)) from None
        data = data.get("state_dict", data) if isinstance(data, dict) else data
        if not isinstance(data, dict):
            raise CheckpointError(f"{path} holds no state dict of tensors.")
        return {k: v for k, v in data.items() if isinstance(v, torch.Tensor)}
    if suffix == ".gguf":
        raise CheckpointError(f"{path.name} is a GGUF file of a model that is not a Flux.1, Z-Image or Flux.2 klein "
                              "transformer (the families read from GGUF); use the model's .safetensors file.")
    raise CheckpointError(f"{path.name}: unknown checkpoint type '{suffix}'; expected .safetensors.")


def detect_family(keys: list[str] | set[str], source: str = "checkpoint") -> str:
    """'sd1', 'sd2' or 'sdxl' from an LDM single-file checkpoint's key names."""
    keys = set(keys)
    has = lambda prefix: any(k.startswith(prefix) for k in keys)
    if any(k.startswith(("lora_unet_", "lora_te")) for k in keys):
        raise CheckpointError(f"{source} is a LoRA, not a base model. Put it in 'init_lora' to continue training it.")
    if has(UNET_PREFIX + "double_blocks") or has(UNET_PREFIX + "joint_blocks"):
        raise CheckpointError(f"{source} is a diffusion transformer this trainer does not train (SD3, Chroma, Flux.2 dev "
                              "...). Supported: SD1.x, SD2.x, SDXL, Flux.1, Z-Image and Flux.2 klein.")
    if not has(UNET_PREFIX + "input_blocks"):
        raise CheckpointError(
            f"{source} has no Stable Diffusion UNet (no '{UNET_PREFIX}input_blocks.*' keys). Is it a VAE, "
            "an embedding or a LoRA? Point base_model at a full SD1.x, SD2.x or SDXL checkpoint."
        )
    if has("conditioner.embedders.1.model.") and has("conditioner.embedders.0.transformer."):
        return "sdxl"
    if has("conditioner.embedders.0.model."):
        raise CheckpointError(f"{source} is an SDXL refiner; train on an SDXL base model instead.")
    if has("cond_stage_model.model.transformer."):
        return "sd2"
    if has("cond_stage_model.transformer."):
        return "sd1"
    raise CheckpointError(f"{source} has a UNet but no text encoder this trainer knows (SD1.x, SD2.x, SDXL).")


def _existing(path: Path) -> Path:
    """The path itself, or a CheckpointError naming it."""
    path = Path(path).expanduser()
    if not path.exists():
        raise CheckpointError(f"Base model not found: {path.resolve()}")
    if path.is_dir():
        raise CheckpointError(f"{path.resolve()} is a folder; a diffusers folder needs model_index.json in it.")
    return path


def _unreadable(path: Path, exc: Exception) -> str:
    """The message for a file that exists but cannot be read."""
    size = path.stat().st_size
    return (f"Cannot read {path} ({size / 2**20:.1f} MiB): {exc}. The file is probably truncated or not a "
            "checkpoint; download it again.")

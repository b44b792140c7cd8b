"""Test renders of a finished LoRA: one prompt, one seed, one image per strength, side by side."""

from __future__ import annotations

import math
import re
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from lora_trainer.errors import ConfigError


def parse_strengths(text: str) -> list[float]:
    """'0, 0.5, 1' -> [0.0, 0.5, 1.0], refusing anything that is not a list of finite numbers."""
    try:
        weights = [float(w) for w in str(text).replace(";", ",").split(",") if w.strip()]
    except ValueError:
        raise ConfigError(f"Strengths must be numbers separated by commas, got {text!r}.") from None
    if not weights or any(not math.isfinite(w) for w in weights):
        raise ConfigError("Give at least one LoRA strength, e.g. 0, 0.5, 1.")
    return weights


def trained_size(lora_file: str | Path) -> int | None:
    """The resolution a LoRA was trained at, from its metadata (ours and kohya's); None when it does not say."""
    from safetensors import safe_open

    try:
        with safe_open(str(lora_file), "pt") as handle:
            metadata = handle.metadata() or {}
    except (OSError, ValueError, RuntimeError):
        return None
    for key, pattern in (("modelspec.resolution", r"(\d+)x(\d+)"), ("ss_resolution", r"\(?(\d+),\s*(\d+)")):
        found = re.match(pattern, metadata.get(key, "").strip())
        if found:
            return round(math.sqrt(int(found[1]) * int(found[2])))
    return None


def labelled_grid(images: list[Image.Image], labels: list[str]) -> Image.Image:
    """Images in one row with a caption strip under each."""
    width, height = images[0].size
    grid = Image.new("RGB", (width * len(images), height + 20), "white")
    draw = ImageDraw.Draw(grid)
    for index, (image, label) in enumerate(zip(images, labels)):
        grid.paste(image.convert("RGB").resize((width, height)), (index * width, 0))
        draw.text((index * width + 4, height + 4), label, fill="black")
    return grid


def render_strengths(base_model: str, lora_file: str, prompt: str, negative: str, strengths: list[float], *,
                     seed: int = 0, steps: int = 20, size: int | None = None, guidance: float = 7.0,
                     allow_pickle: bool = False) -> Image.Image:
    """Render `prompt` on a checkpoint file with the LoRA at each strength (the standalone app's Test)."""
    from lora_trainer.backbones.sd import DiffusionBackbone
    from lora_trainer.config import PRESETS
    from lora_trainer.lora.inject import set_lora_strength

    backbone = DiffusionBackbone.from_file(base_model, allow_pickle=allow_pickle)
    backbone.apply_lora_file(lora_file, 1.0)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    for module in (backbone.unet, backbone.vae, *backbone.text_encoders):
        module.to(device, torch.float16 if device.type == "cuda" else torch.float32)
    size = size or trained_size(lora_file) or PRESETS[backbone.family]["resolution"]
    images = []
    for weight in strengths:
        for model in (backbone.unet, *backbone.text_encoders):
            set_lora_strength(model, weight)
        images.append(backbone.render(prompt, negative=negative, steps=steps, guidance=guidance, seed=seed, size=size))
    return labelled_grid(images, [f"strength {w:g}" for w in strengths])

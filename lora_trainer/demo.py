"""The demo: a tiny SD1.5-shaped model, a small synthetic captioned image set, a LoRA, and a before/after image.

Everything is made locally (no downloads) and runs on a CPU in well under three minutes. The model
has random weights, so the pictures are noise: the point is the whole path, from a folder to a LoRA
file and an image rendered with it.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from lora_trainer.backbones.sd import DiffusionBackbone
from lora_trainer.backbones.tiny import build_tiny_checkpoint
from lora_trainer.config import make_config
from lora_trainer.events import Listener
from lora_trainer.train.loop import train_lora

log = logging.getLogger(__name__)

PROMPT = "inkwash, a mountain at dawn"


def make_images(folder: Path, count: int = 8, size: int = 96) -> Path:
    """Synthetic 'ink wash' pictures with captions: dark strokes and circles on paper-coloured ground."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    subjects = ["a mountain", "a river", "a bamboo grove", "a crane", "a boat", "a pine tree", "the moon", "a bridge"]
    for i in range(count):
        image = Image.new("RGB", (size + 32 * (i % 2), size), (235, 228, 210))
        draw = ImageDraw.Draw(image)
        for _ in range(6):
            x0, y0 = rng.integers(0, size, 2)
            x1, y1 = rng.integers(0, size, 2)
            shade = int(rng.integers(20, 90))
            draw.line((int(x0), int(y0), int(x1), int(y1)), fill=(shade, shade, shade), width=int(rng.integers(2, 8)))
        cx, cy, r = int(rng.integers(16, size - 16)), int(rng.integers(16, size - 16)), int(rng.integers(6, 16))
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), outline=(30, 30, 30), width=3)
        image.save(folder / f"{i:02d}.png")
        (folder / f"{i:02d}.txt").write_text(f"ink wash painting, {subjects[i % len(subjects)]}", encoding="utf-8")
    return folder


def render(checkpoint: Path, lora: Path | None, prompt: str, size: int = 64) -> Image.Image:
    """One image from the checkpoint, with the LoRA file applied if given."""
    backbone = DiffusionBackbone.from_file(checkpoint)
    if lora is not None:
        backbone.apply_lora_file(str(lora))
    return backbone.render(prompt, steps=10, guidance=5.0, seed=0, size=size)


def run_demo(workdir: Path, steps: int = 60, listeners: list[Listener] | tuple[Listener, ...] = ()) -> Path:
    """Build, train, render; returns the LoRA file and prints where everything is."""
    workdir = Path(workdir)
    checkpoint = build_tiny_checkpoint(workdir / "models" / "tiny-sd15.safetensors", "sd1")
    data = make_images(workdir / "data" / "ink_wash")
    config = make_config({
        "base_model": str(checkpoint), "train_data_dir": str(data), "output_dir": str(workdir / "output" / "ink_wash_lora"),
        "output_name": "ink_wash_lora", "trigger_word": "inkwash", "resolution": 64, "max_steps": steps,
        "batch_size": 2, "learning_rate": 1e-3, "lora_rank": 8, "lora_alpha": 8, "save_every_n_steps": max(steps // 3, 1),
        "save_every_n_epochs": 0, "sample_prompts": [PROMPT], "sample_steps": 10, "log_every_n_steps": 5,
    })
    result = train_lora(config, listeners=listeners)
    before, after = render(checkpoint, None, PROMPT), render(checkpoint, result.lora_file, PROMPT)
    change = np.abs(np.asarray(before, dtype=np.int16) - np.asarray(after, dtype=np.int16))
    difference = change.mean()
    # a random-weight model draws noise either way: the third panel shows where the LoRA changed it, 10x brighter
    changed = Image.fromarray(np.clip(change * 10, 0, 255).astype(np.uint8))
    panels = Image.new("RGB", (before.width * 3 + 16, before.height), "white")
    for index, panel in enumerate((before, after, changed)):
        panels.paste(panel, (index * (before.width + 8), 0))
    comparison = result.output_dir / "before_after.png"
    panels.resize((panels.width * 4, panels.height * 4), Image.Resampling.NEAREST).save(comparison)
    first, last = result.losses[0][1], result.losses[-1][1]
    print(f"\nDemo finished in {workdir.resolve()}:\n"
          f"  base model   {checkpoint}\n"
          f"  images       {data} ({len(list(data.glob('*.png')))} with .txt captions)\n"
          f"  LoRA         {result.lora_file}\n"
          f"  checkpoints  {result.output_dir / 'checkpoints'}\n"
          f"  samples      {result.output_dir / 'samples'}\n"
          f"  before/after {comparison} (without, with the LoRA, and their difference x10; "
          f"mean pixel change {difference:.1f}/255)\n"
          f"  loss         {first:.4f} -> {last:.4f} over {result.steps} steps\n"
          f"  TensorBoard  tensorboard --logdir {result.output_dir / 'logs'}\n"
          f"  inspect      python -m lora_trainer inspect {result.lora_file}")
    return result.lora_file

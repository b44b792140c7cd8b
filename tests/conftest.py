"""Shared fixtures: tiny checkpoints of each family and a small captioned image folder."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lora_trainer.backbones.tiny import build_tiny_checkpoint


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread():
    """The tiny models gain nothing from threads, and on a busy 2-core machine spinning threads stall each other."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory) -> dict[str, Path]:
    """One tiny random-weight LDM checkpoint per family, built once per test session."""
    folder = tmp_path_factory.mktemp("models")
    return {family: build_tiny_checkpoint(folder / f"tiny-{family}.safetensors", family) for family in ("sd1", "sd2", "sdxl")}


@pytest.fixture(scope="session")
def sd1_checkpoint(tiny_checkpoints) -> Path:
    """The tiny SD1.5-shaped checkpoint."""
    return tiny_checkpoints["sd1"]


def make_dataset(folder: Path, count: int = 4, seed: int = 0) -> Path:
    """`count` noise images (two aspect ratios) with .txt captions."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(count):
        shape = (64, 64 + 32 * (i % 2), 3)
        Image.fromarray(rng.integers(0, 255, shape, dtype=np.uint8)).save(folder / f"img{i}.png")
        (folder / f"img{i}.txt").write_text(f"inkwash, picture {i}, mountains", encoding="utf-8")
    return folder


@pytest.fixture(scope="session")
def dataset(tmp_path_factory) -> Path:
    """A small captioned image folder shared by tests that only read it."""
    return make_dataset(tmp_path_factory.mktemp("data") / "ink")


def quick_config(checkpoint: Path, data: Path, out: Path, **overrides):
    """A config that trains the tiny model in a second or two."""
    from lora_trainer.config import make_config

    values = {"base_model": str(checkpoint), "train_data_dir": str(data), "resolution": 64, "batch_size": 2,
              "max_steps": 4, "output_dir": str(out), "device": "cpu", "learning_rate": 1e-3, "lora_rank": 4,
              "lora_alpha": 4, "save_every_n_epochs": 0, "log_every_n_steps": 1, "save_dtype": "fp32"}
    values.update(overrides)
    return make_config(values)


@pytest.fixture(scope="session")
def one_image(tmp_path_factory) -> Path:
    """One captioned image: a run that should drive the loss down fits it."""
    return make_dataset(tmp_path_factory.mktemp("one") / "blob", count=1)


def transformer_config(checkpoint: Path, data: Path, out: Path, **overrides):
    """quick_config for the diffusion transformers (Flux.1, Z-Image, klein): rank 4, batch 1, 2-step previews."""
    return quick_config(checkpoint, data, out, **{"lora_rank": 4, "lora_alpha": 4, "batch_size": 1, "sample_steps": 2,
                                                  **overrides})


def checkpoint_loras(result) -> dict[str, torch.Tensor]:
    """The LoRA weights (peft names) in the first checkpoint a run saved."""
    state = torch.load(next((result.output_dir / "checkpoints").glob("step-*")) / "state.pt", weights_only=True)
    return state["loras"][0]

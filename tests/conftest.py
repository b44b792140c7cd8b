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


def assert_resume_is_bit_identical(checkpoint: Path, data: Path, tmp_path: Path, **options) -> None:
    """A run of 6 steps stopped after step 3 and resumed gives the LoRA of one uninterrupted run, bit for bit."""
    from safetensors.torch import load_file

    from lora_trainer.events import CancelToken
    from lora_trainer.train.loop import train_lora

    options = {"max_steps": 6, **options}
    whole = train_lora(transformer_config(checkpoint, data, tmp_path / "a", **options))
    cancel = CancelToken()
    stop = lambda e: cancel.set() if e.kind == "progress" and e.step == 3 and "phase" not in e.data else None
    first = train_lora(transformer_config(checkpoint, data, tmp_path / "b", **options), listeners=[stop], cancel=cancel)
    assert first.interrupted and first.steps == 3
    resumed = train_lora(transformer_config(checkpoint, data, tmp_path / "b", **options), resume=tmp_path / "b")
    a, b = load_file(str(whole.lora_file)), load_file(str(resumed.lora_file))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def assert_diffusers_reads_our_update(backbone_class, targets: dict, picked: list[str], fan_in, convert) -> dict:
    """Rank-2 random LoRAs on `picked` (of `targets`, the family's `names`; `fan_in(name)` each one's input width)
    written as our file by `backbone_class.to_file`, read back by diffusers' `convert`: every key is consumed and each
    layer gets exactly our update (B @ A times the scale), checked on a few vectors. Returns the file's tensors."""
    backbone = backbone_class.__new__(backbone_class)
    backbone.file_targets = lambda: targets
    torch.manual_seed(0)
    state = {}
    for name in picked:
        _, _, rows, _ = targets[name]
        state[f"{name}.lora_A.weight"] = torch.randn(2, fan_in(name))
        state[f"{name}.lora_B.weight"] = torch.randn(rows, 2)
    tensors = backbone.to_file(state, alpha=1.0, dtype="fp32")
    converted = convert(dict(tensors))
    for name in picked:
        a, b = converted[f"transformer.{name}.lora_A.weight"], converted[f"transformer.{name}.lora_B.weight"]
        probe = torch.randn(a.shape[1], 3)  # the update applied to a few vectors (whole products are too slow here)
        want = state[f"{name}.lora_B.weight"] @ (state[f"{name}.lora_A.weight"] @ probe) * (1.0 / 2)
        torch.testing.assert_close(b @ (a @ probe), want, rtol=1e-4, atol=1e-4)
    assert len(converted) == 2 * len(picked)
    return tensors

"""The command line: config help and printing, training end to end, resume, inspect and the demo."""

from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from lora_trainer.backbones.sd import DiffusionBackbone
from lora_trainer.backbones.tiny import build_tiny_checkpoint
from lora_trainer.config import config_fields, make_config
from lora_trainer.events import CancelToken, Event
from lora_trainer.hosts.cli import main
from lora_trainer.lora.kohya import read_lora_file, save_lora_file
from lora_trainer.train.loop import train_lora


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random-weight SD1 checkpoint, built once for this module."""
    return build_tiny_checkpoint(tmp_path_factory.mktemp("model") / "tiny-sd15.safetensors", "sd1")


@pytest.fixture(scope="module")
def noise_images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Four random-noise PNGs (64x64 up to 96x64) with .txt captions, in a folder named 'noise'."""
    folder = tmp_path_factory.mktemp("data") / "noise"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i, width in enumerate((64, 74, 85, 96)):
        Image.fromarray(rng.integers(0, 256, size=(64, width, 3), dtype=np.uint8)).save(folder / f"img{i}.png")
        (folder / f"img{i}.txt").write_text(f"noise picture {i}", encoding="utf-8")
    return folder


@pytest.fixture(autouse=True)
def quiet_root_logger():
    """main() calls logging.basicConfig; leave the root logger as each test found it."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for handler in root.handlers[:]:
        if handler not in handlers:
            root.removeHandler(handler)
    root.setLevel(level)


def write_yaml(path: Path, values: dict) -> Path:
    """A config file with `values`."""
    path.write_text(yaml.safe_dump(values, sort_keys=False), encoding="utf-8")
    return path


def fast_values(checkpoint: Path, data: Path, out: Path) -> dict:
    """The keys of the smallest useful training run on the tiny model."""
    return {"base_model": str(checkpoint), "train_data_dir": str(data), "resolution": 64, "batch_size": 2,
            "output_dir": str(out), "device": "cpu"}


def test_help_config_lists_every_key(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["train", "--help-config"]) == 0

    table = capsys.readouterr().out
    assert table.startswith("| key | default | allowed | what it does |")
    rows = {line.split("|")[1].strip(" `"): line for line in table.splitlines()[2:]}
    assert list(rows) == [field.name for field in config_fields()]
    assert "| 1 to 1024 | LoRA rank (dim)" in rows["lora_rank"]
    assert "| adamw, adamw8bit, prodigy, lion |" in rows["optimizer"]
    assert "| 0 to 1 |" in rows["caption_dropout"]


def test_print_config_fills_family_preset(tiny_checkpoint: Path, noise_images: Path, tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    config_file = tmp_path / "cat.yaml"
    config_file.write_text(f"base_model: {tiny_checkpoint}\ntrain_data_dir: {noise_images}\nlora_rank: 12\nepochs: 3\n",
                           encoding="utf-8")

    assert main(["train", "--config", str(config_file), "--print-config"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)

    assert (printed["family"], printed["resolution"], printed["optimizer"], printed["lr_scheduler"]) == (
        "sd1", 512, "adamw", "cosine")
    assert (printed["lora_rank"], printed["lora_alpha"], printed["epochs"]) == (12, 8.0, 3)
    assert (printed["output_name"], printed["output_dir"]) == ("noise_lora", str(Path("output") / "noise_lora"))
    assert printed.keys() == {field.name for field in config_fields()}

    assert main(["train", "--config", str(config_file), "--set", "lora_rank=4", "--print-config"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["lora_rank"] == 4


def test_train_from_yaml_end_to_end(tiny_checkpoint: Path, noise_images: Path, tmp_path: Path,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    config_file = write_yaml(tmp_path / "run.yaml", {**fast_values(tiny_checkpoint, noise_images, out), "epochs": 50})

    assert main(["train", "--config", str(config_file), "--set", "max_steps=3", "--set", "output_name=ink"]) == 0

    stdout = capsys.readouterr().out
    lora = out / "ink.safetensors"
    assert lora.is_file()
    assert f"LoRA written: {lora}" in stdout
    assert "<lora:ink:" in stdout
    assert read_lora_file(lora)[1]["ss_steps"] == "3"
    assert yaml.safe_load((out / "config.yaml").read_text(encoding="utf-8"))["max_steps"] == 3


def test_unknown_key_in_yaml_exits_2_naming_it(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    config_file = tmp_path / "run.yaml"
    config_file.write_text("base_model: m.safetensors\ntrain_data_dir: data\nnetwork_dimm: 8\n", encoding="utf-8")

    assert main(["train", "--config", str(config_file)]) == 2

    assert "Unknown config key 'network_dimm'" in caplog.text


def test_missing_config_file_exits_2(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    missing = tmp_path / "nowhere.yaml"

    assert main(["train", "--config", str(missing)]) == 2

    assert f"Config file not found: {missing}" in caplog.text


@pytest.mark.slow  # the default run's time budget; CI runs it with -m slow
def test_resume_continues_an_interrupted_run(tiny_checkpoint: Path, noise_images: Path, tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    cancel = CancelToken()

    def stop_after_step_2(event: Event) -> None:
        if event.kind == "progress" and "phase" not in event.data and event.step == 2:
            cancel.set()

    config = make_config({**fast_values(tiny_checkpoint, noise_images, out), "max_steps": 4, "output_name": "ink"})
    first = train_lora(config, listeners=[stop_after_step_2], cancel=cancel)
    assert first.interrupted and first.steps == 2
    assert not (out / "ink.safetensors").exists()

    assert main(["train", "--resume", str(out)]) == 0

    lora = out / "ink.safetensors"
    assert lora.is_file()
    assert read_lora_file(lora)[1]["ss_steps"] == "4"
    assert "<lora:ink:" in capsys.readouterr().out


def test_ctrl_c_prints_the_exact_command_that_resumes(tiny_checkpoint: Path, noise_images: Path, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    out = tmp_path / "out"
    config_file = write_yaml(tmp_path / "run.yaml", {**fast_values(tiny_checkpoint, noise_images, out), "max_steps": 4,
                                                     "output_name": "ink"})
    calls = []

    def ctrl_c_in_step_3(backbone, *args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return predict(backbone, *args, **kwargs)

    predict = DiffusionBackbone.predict
    monkeypatch.setattr(DiffusionBackbone, "predict", ctrl_c_in_step_3)
    assert main(["train", "--config", str(config_file)]) == 130

    last = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR][-1]
    assert last == f"Stopped. Continue with: python -m lora_trainer train --resume {out}"
    monkeypatch.undo()
    assert main(last.split("python -m lora_trainer ", 1)[1].split()) == 0
    assert read_lora_file(out / "ink.safetensors")[1]["ss_steps"] == "4"


def test_a_finished_run_continues_with_more_steps(tiny_checkpoint: Path, noise_images: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    config_file = write_yaml(tmp_path / "run.yaml", {**fast_values(tiny_checkpoint, noise_images, out), "max_steps": 2,
                                                     "save_every_n_epochs": 0, "output_name": "ink"})

    assert main(["train", "--config", str(config_file)]) == 0
    assert (out / "checkpoints" / "step-00000002" / "state.pt").is_file()  # "0 = only at the end"
    assert sorted(p.name for p in out.glob("*.safetensors")) == ["ink.safetensors"]

    assert main(["train", "--resume", str(out), "--set", "max_steps=4"]) == 0
    assert read_lora_file(out / "ink.safetensors")[1]["ss_steps"] == "4"


def test_progress_bars_time_only_real_work_and_skipped_files_are_named_once(
        tiny_checkpoint: Path, noise_images: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
        caplog: pytest.LogCaptureFixture) -> None:
    data = shutil.copytree(noise_images, tmp_path / "noise")
    (data / "broken.png").write_bytes(b"not a png")
    config_file = write_yaml(tmp_path / "run.yaml", {**fast_values(tiny_checkpoint, data, tmp_path / "out"),
                                                     "max_steps": 2})

    assert main(["train", "--config", str(config_file)]) == 0

    shown = capsys.readouterr()
    frames = [f.strip() for f in re.split(r"[\r\n]", shown.err) if f.startswith(("caching", "training"))]
    for phase, unit in (("caching", "img"), ("training", "step")):
        first = next(f for f in frames if f.startswith(phase))
        assert re.search(rf"\b0/\d+ \[00:00<\?, \?{unit}/s\]", first), first  # 0%, no rate before any work
    rates = [float(rate) for rate in re.findall(r"([\d.]+)(?:img|step)/s", shown.err)]
    assert rates and max(rates) < 10_000, frames  # the first update showed 239674 img/s before
    assert "broken.png" not in shown.out
    assert len([r for r in caplog.records if "broken.png" in r.getMessage()]) == 1


@pytest.mark.slow  # the default run's time budget; CI runs it with -m slow
@pytest.mark.parametrize("command", ["train --help-config", "inspect LORA"])
def test_output_into_a_closed_pipe_ends_without_a_traceback(command: str, tmp_path: Path) -> None:
    lora = save_lora_file(tmp_path / "style.safetensors", {
        "lora_unet_mid_block_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 8),
        "lora_unet_mid_block_attentions_0_proj_in.lora_up.weight": torch.zeros(8, 4),
        "lora_unet_mid_block_attentions_0_proj_in.alpha": torch.tensor(4.0)}, {"ss_output_name": "style"})
    read, write = os.pipe()
    process = subprocess.Popen([sys.executable, "-m", "lora_trainer", *command.replace("LORA", str(lora)).split()],
                               stdout=write, stderr=subprocess.PIPE, text=True)
    os.close(write)
    os.close(read)  # like `| head` that stopped reading

    _, errors = process.communicate(timeout=120)

    assert "Traceback" not in errors and "BrokenPipeError" not in errors, errors
    assert process.returncode == 141


def test_resume_without_checkpoint_exits_2(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    assert main(["train", "--resume", str(tmp_path)]) == 2

    assert "No checkpoint to resume" in caplog.text


def test_inspect_prints_family_rank_and_metadata(tiny_checkpoint: Path, noise_images: Path, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    config = make_config({**fast_values(tiny_checkpoint, noise_images, tmp_path / "out"), "max_steps": 1,
                          "lora_rank": 4, "output_name": "ink"})
    lora = train_lora(config).lora_file

    assert main(["inspect", str(lora)]) == 0

    lines = capsys.readouterr().out.splitlines()
    assert "family: SD1.x (sd_v1)" in lines
    assert any(line.startswith("format: kohya") for line in lines)
    assert "rank: 4" in lines
    assert "ss_output_name: ink" in lines


def test_inspect_missing_file_exits_2(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    assert main(["inspect", str(tmp_path / "gone.safetensors")]) == 2

    assert "LoRA file not found" in caplog.text


@pytest.mark.slow  # the default run's time budget; CI runs it with -m slow
def test_demo_writes_lora_and_before_after(tmp_path: Path) -> None:
    assert main(["demo", "--workdir", str(tmp_path), "--steps", "6"]) == 0

    out = tmp_path / "output" / "ink_wash_lora"
    tensors, metadata = read_lora_file(out / "ink_wash_lora.safetensors")
    assert tensors and metadata["ss_steps"] == "6"
    with Image.open(out / "before_after.png") as image:
        panels = np.asarray(image.convert("RGB"), dtype=np.int16)
    width = (panels.shape[1] - 2 * 32) // 3  # three panels, 8 px gaps scaled 4x
    before, after, changed = (panels[:, i * (width + 32):i * (width + 32) + width] for i in range(3))
    assert not np.array_equal(before, after)  # the LoRA changed the picture
    assert np.array_equal(changed, np.clip(np.abs(before - after) * 10, 0, 255))

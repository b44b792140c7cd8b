"""Bad input gets a typed error that names the culprit, and failures never destroy earlier work."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from lora_trainer.backbones.checkpoint import detect_family, read_checkpoint
from lora_trainer.backbones.sd import DiffusionBackbone, family_of
from lora_trainer.backbones.tiny import build_tiny_checkpoint
from lora_trainer.config import TrainConfig, load_config, make_config
from lora_trainer.errors import CheckpointError, ConfigError, DatasetError, TrainingError
from lora_trainer.events import CancelToken, Event
from lora_trainer.hosts.cli import main
from lora_trainer.lora import kohya
from lora_trainer.lora.kohya import read_lora_file, save_lora_file
from lora_trainer.train.loop import train_lora

# -- shared helpers ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random-weight SD1 checkpoint, built once for this module."""
    return build_tiny_checkpoint(tmp_path_factory.mktemp("model") / "tiny-sd15.safetensors", "sd1")


def write_dataset(folder: Path, count: int = 4, seed: int = 0) -> Path:
    """`count` random-noise PNGs (64x64 up to 96x64), each with a .txt caption."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(count):
        width = 64 + 32 * i // max(count - 1, 1)
        pixels = rng.integers(0, 256, size=(64, width, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"img{i}.png")
        (folder / f"img{i}.txt").write_text(f"noise picture {i}", encoding="utf-8")
    return folder


def fast_config(checkpoint: Path, data: Path, out: Path, **overrides: object) -> TrainConfig:
    """The smallest useful training config on the tiny model."""
    values = {"base_model": str(checkpoint), "train_data_dir": str(data), "resolution": 64, "max_steps": 4,
              "batch_size": 2, "output_dir": str(out), "output_name": "noise", "device": "cpu"}
    values.update(overrides)
    return make_config(values)


def tiny_lora_tensors(value: float = 0.5) -> dict[str, torch.Tensor]:
    """A one-module kohya LoRA state dict."""
    return {"lora_unet_mid_block_attentions_0_proj_in.lora_down.weight": torch.full((4, 8), value),
            "lora_unet_mid_block_attentions_0_proj_in.lora_up.weight": torch.full((8, 4), value),
            "lora_unet_mid_block_attentions_0_proj_in.alpha": torch.tensor(4.0)}


def all_finite(path: Path) -> bool:
    """Whether every tensor in a LoRA file is finite."""
    tensors, _ = read_lora_file(path)
    return bool(tensors) and all(torch.isfinite(t.float()).all() for t in tensors.values())


def predict_after(first_bad: int, effect):
    """A stand-in for DiffusionBackbone.predict whose output `effect` alters or replaces from call `first_bad` on."""
    original = DiffusionBackbone.predict
    calls = []

    def predict(backbone: DiffusionBackbone, *args, **kwargs) -> torch.Tensor:
        calls.append(1)
        out = original(backbone, *args, **kwargs)
        return effect(out) if len(calls) >= first_bad else out

    return predict


def training_step(event: Event, step: int) -> bool:
    """Whether `event` reports the end of training step `step` (not image caching progress)."""
    return event.kind == "progress" and "phase" not in event.data and event.step == step


# -- config ------------------------------------------------------------------------------------------


def test_unknown_config_key_is_named() -> None:
    with pytest.raises(ConfigError, match="Unknown config key 'lora_rnak'") as info:
        make_config({"lora_rnak": 8})

    assert "lora_rank" in str(info.value)  # the hint points at the key that was meant


@pytest.mark.parametrize(("key", "value", "allowed"), [
    ("lora_rank", 0, "between 1 and 1024"),
    ("caption_dropout", 2, "between 0 and 1"),
    ("learning_rate", -1e-4, "between 0 and 10"),
])
def test_out_of_range_value_names_key_and_range(key: str, value: object, allowed: str) -> None:
    with pytest.raises(ConfigError) as info:
        make_config({key: value})

    assert f"'{key}'" in str(info.value)
    assert allowed in str(info.value)


@pytest.mark.parametrize(("key", "value", "expected"), [
    ("epochs", "abc", "whole number"),
    ("lora_rank", 2.5, "whole number"),
    ("lora_rank", True, "whole number"),
    ("learning_rate", "fast", "a number"),
    ("flip_aug", "maybe", "true or false"),
])
def test_wrong_type_names_key_and_expected_type(key: str, value: object, expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        make_config({key: value})

    assert f"'{key}'" in str(info.value)
    assert expected in str(info.value)
    assert repr(value) in str(info.value)


def test_bad_choice_lists_the_choices() -> None:
    with pytest.raises(ConfigError, match="'optimizer' must be one of adamw, adamw8bit, prodigy, lion; got 'sgd'"):
        make_config({"optimizer": "sgd"})


def test_a_bare_on_or_off_in_yaml_is_the_choice_not_a_boolean(tmp_path: Path) -> None:
    """YAML reads `on`, `off`, `true` and `false` as booleans; for the auto/on/off keys they mean on and off
    (`torch_compile: true` is how the key was written when it was a switch)."""
    config_file = tmp_path / "run.yaml"
    config_file.write_text("cuda_graphs: on\nzero_terminal_snr: off\ntorch_compile: true\n", encoding="utf-8")

    config = load_config(config_file, ["torch_compile=false"])

    assert (config.cuda_graphs, config.zero_terminal_snr, config.torch_compile) == ("on", "off", "off")
    with pytest.raises(ConfigError, match="'prediction_type' must be text"):
        make_config({"prediction_type": True})  # no on/off among its choices: still refused


def test_bad_override_on_command_line_is_a_config_error(tmp_path: Path) -> None:
    config_file = tmp_path / "run.yaml"
    config_file.write_text("lora_rank: 8\n", encoding="utf-8")

    with pytest.raises(ConfigError, match="'lora_rank' must be between 1 and 1024"):
        load_config(config_file, ["lora_rank=5000"])
    with pytest.raises(ConfigError, match="--set expects key=value"):
        load_config(config_file, ["lora_rank"])


def test_seed_article_keys_are_accepted() -> None:
    config = make_config({"train_data_dir": "data/cat", "base_model": "models/sd15.safetensors", "lora_rank": 8,
                          "batch_size": 3, "epochs": 5, "output_dir": "out/cat"})

    assert (config.train_data_dir, config.base_model, config.output_dir) == (
        "data/cat", "models/sd15.safetensors", "out/cat")
    assert (config.lora_rank, config.batch_size, config.epochs) == (8, 3, 5)


def test_kohya_aliases_map_to_our_keys() -> None:
    config = make_config({"network_dim": 32, "network_alpha": 16, "pretrained_model_name_or_path": "m.safetensors",
                          "train_batch_size": 4, "max_train_epochs": 7, "optimizer_type": "adamw",
                          "save_model_as": "safetensors"})

    assert (config.lora_rank, config.lora_alpha, config.base_model) == (32, 16.0, "m.safetensors")
    assert (config.batch_size, config.epochs, config.optimizer) == (4, 7, "adamw")


def test_alias_values_are_checked_under_the_canonical_key() -> None:
    with pytest.raises(ConfigError, match="'lora_rank' must be between 1 and 1024"):
        make_config({"network_dim": 0})


# -- data --------------------------------------------------------------------------------------------


def test_missing_data_folder_names_absolute_path(tiny_checkpoint: Path, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    config = fast_config(tiny_checkpoint, Path("no_such_folder"), tmp_path / "out")

    with pytest.raises(DatasetError) as info:
        train_lora(config)

    assert str(Path.cwd() / "no_such_folder") in str(info.value)
    assert "does not exist" in str(info.value)
    assert not (tmp_path / "out").exists()


def test_empty_data_folder_is_refused(tiny_checkpoint: Path, tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("no images here", encoding="utf-8")

    with pytest.raises(DatasetError, match="No images found in") as info:
        train_lora(fast_config(tiny_checkpoint, empty, tmp_path / "out"))

    assert str(empty) in str(info.value)


def test_corrupt_and_empty_images_are_skipped_and_named(tiny_checkpoint: Path, tmp_path: Path) -> None:
    data = write_dataset(tmp_path / "data")
    (data / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4)
    (data / "zero.png").write_bytes(b"")
    events: list[Event] = []

    result = train_lora(fast_config(tiny_checkpoint, data, tmp_path / "out", max_steps=2), listeners=[events.append])

    summary = next(e for e in events if e.kind == "start").data["data_summary"]
    assert "4 usable images" in summary and "2 skipped" in summary
    assert str(data / "broken.png") in summary
    assert f"skipped {data / 'zero.png'}: empty file (0 bytes)" in summary
    assert result.steps == 2 and result.lora_file.is_file()


def test_all_images_corrupt_is_a_dataset_error(tiny_checkpoint: Path, tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    (data / "a.png").write_bytes(b"not a png at all")
    (data / "b.jpg").write_bytes(b"")

    with pytest.raises(DatasetError, match="None of the 2 images") as info:
        train_lora(fast_config(tiny_checkpoint, data, tmp_path / "out"))

    assert "a.png" in str(info.value) and "b.jpg" in str(info.value)


def test_missing_caption_with_error_mode_names_the_image(tiny_checkpoint: Path, tmp_path: Path) -> None:
    data = write_dataset(tmp_path / "data")
    (data / "img2.txt").unlink()

    with pytest.raises(DatasetError, match="1 images .* have no caption") as info:
        train_lora(fast_config(tiny_checkpoint, data, tmp_path / "out", missing_caption="error"))

    assert str(data / "img2.png") in str(info.value)
    assert "img1.png" not in str(info.value)


# -- base model --------------------------------------------------------------------------------------


def test_missing_base_model_names_its_path(tmp_path: Path) -> None:
    data = write_dataset(tmp_path / "data")
    missing = tmp_path / "models" / "sd15.safetensors"

    with pytest.raises(CheckpointError, match="Base model not found") as info:
        train_lora(fast_config(missing, data, tmp_path / "out"))

    assert str(missing) in str(info.value)


def test_truncated_checkpoint_says_truncated(tiny_checkpoint: Path, tmp_path: Path) -> None:
    whole = tiny_checkpoint.read_bytes()
    truncated = tmp_path / "half.safetensors"
    truncated.write_bytes(whole[:len(whole) // 2])

    with pytest.raises(CheckpointError, match="truncated") as info:
        read_checkpoint(truncated)
    assert str(truncated) in str(info.value)
    with pytest.raises(CheckpointError, match="truncated"):
        family_of(truncated)


def test_pickle_checkpoint_needs_allow_pickle(tiny_checkpoint: Path, tmp_path: Path) -> None:
    state_dict = load_file(str(tiny_checkpoint))
    pickled = tmp_path / "tiny.ckpt"
    torch.save(state_dict, pickled)

    with pytest.raises(CheckpointError, match="allow_pickle") as info:
        read_checkpoint(pickled)
    assert "tiny.ckpt" in str(info.value)
    with pytest.raises(CheckpointError, match="allow_pickle"):
        family_of(pickled)

    loaded = read_checkpoint(pickled, allow_pickle=True)
    assert loaded.keys() == state_dict.keys()
    assert detect_family(loaded.keys()) == "sd1"
    assert family_of(pickled, allow_pickle=True) == "sd1"


def test_non_sd_safetensors_is_refused(tmp_path: Path) -> None:
    other = tmp_path / "classifier.safetensors"
    save_file({"fc.weight": torch.randn(4, 4), "fc.bias": torch.randn(4)}, str(other))

    with pytest.raises(CheckpointError, match="no Stable Diffusion UNet") as info:
        DiffusionBackbone.from_file(other)

    assert "classifier.safetensors" in str(info.value)


def test_lora_given_as_base_model_is_recognised(tmp_path: Path) -> None:
    lora = save_lora_file(tmp_path / "style.safetensors", tiny_lora_tensors(), {"ss_network_dim": "4"})

    with pytest.raises(CheckpointError, match="is a LoRA, not a base model") as info:
        family_of(lora)

    assert "style.safetensors" in str(info.value) and "init_lora" in str(info.value)


@pytest.fixture(scope="module")
def sd2_lora(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A LoRA trained for one step on a tiny SD2 model (its module names are the tiny SD1 model's too)."""
    folder = tmp_path_factory.mktemp("sd2")
    checkpoint = build_tiny_checkpoint(folder / "tiny-sd2.safetensors", "sd2")
    config = fast_config(checkpoint, write_dataset(folder / "data", count=2), folder / "out", max_steps=1,
                         save_every_n_epochs=0)
    return train_lora(config).lora_file


def test_init_lora_of_another_family_is_refused_before_anything_starts(tiny_checkpoint: Path, sd2_lora: Path,
                                                                       tmp_path: Path) -> None:
    events: list[Event] = []
    config = fast_config(tiny_checkpoint, write_dataset(tmp_path / "data"), tmp_path / "out", init_lora=str(sd2_lora))

    with pytest.raises(CheckpointError) as info:
        train_lora(config, listeners=[events.append])

    assert str(info.value).startswith(f"init_lora {sd2_lora} is a LoRA for SD2.x models, but the base model is an "
                                      "SD1.x model.")
    assert events == [] and not (tmp_path / "out").exists()


def test_init_lora_with_other_shapes_is_refused_before_caching(tiny_checkpoint: Path, sd2_lora: Path,
                                                               tmp_path: Path) -> None:
    unlabelled = tmp_path / "unlabelled.safetensors"
    save_file(load_file(str(sd2_lora)), str(unlabelled))  # no metadata: the family is not written down
    events: list[Event] = []
    config = fast_config(tiny_checkpoint, write_dataset(tmp_path / "data"), tmp_path / "out", init_lora=str(unlabelled))

    with pytest.raises(CheckpointError) as info:
        train_lora(config, listeners=[events.append])

    message = str(info.value)
    assert message.startswith(f"init_lora {unlabelled} does not fit this SD1.x model: ")
    assert "modules have other shapes" in message and "size mismatch" not in message and len(message) < 600
    assert [e.kind for e in events] == ["start"]  # nothing was cached
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(("width", "metadata", "family"), [
    (1024, {"ss_base_model_version": "sd_v1"}, "sd2"),  # the shapes win over a wrong label
    (768, {}, "sd1"),
    (2048, {}, "sdxl"),
    (64, {"modelspec.architecture": "stable-diffusion-v2-768-v/lora"}, "sd2"),
    (64, {}, None),
])
def test_a_loras_family_comes_from_its_shapes_then_its_metadata(width: int, metadata: dict, family: str | None) -> None:
    tensors = {"lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_k.lora_down.weight": torch.zeros(4, width)}

    assert kohya.lora_family(tensors, metadata) == family


def test_a_base_model_given_as_a_lora_is_called_a_base_model(tiny_checkpoint: Path, tmp_path: Path,
                                                             caplog: pytest.LogCaptureFixture) -> None:
    config = fast_config(tiny_checkpoint, write_dataset(tmp_path / "data"), tmp_path / "out",
                         init_lora=str(tiny_checkpoint))

    with pytest.raises(CheckpointError, match="is a base model .*, not a LoRA") as info:
        train_lora(config)
    assert "LoHa" not in str(info.value)

    assert main(["inspect", str(tiny_checkpoint)]) == 2
    assert f"{tiny_checkpoint.name} is a base model (a whole Stable Diffusion checkpoint), not a LoRA. Use it as " \
           "base_model" in caplog.text


def test_captions_in_a_legacy_encoding_or_not_text_do_not_stop_training(tiny_checkpoint: Path, tmp_path: Path,
                                                                        caplog: pytest.LogCaptureFixture) -> None:
    data = write_dataset(tmp_path / "data")
    (data / "img1.txt").write_bytes("caf\xe9 au lait".encode("latin-1"))  # as older Windows editors save it
    (data / "img2.txt").write_bytes(bytes(range(256)))  # not a caption at all
    events: list[Event] = []

    result = train_lora(fast_config(tiny_checkpoint, data, tmp_path / "out", max_steps=1), listeners=[events.append])

    assert result.lora_file.is_file()
    assert "café au lait" in json.loads(read_lora_file(result.lora_file)[1]["ss_tag_frequency"])["data"]
    assert f"{data / 'img1.txt'} is not UTF-8; read it as Windows-1252" in caplog.text
    summary = next(e for e in events if e.kind == "start").data["data_summary"]
    assert "3 usable images" in summary
    assert f"skipped {data / 'img2.png'}: its caption file img2.txt is not text" in summary


# -- saving ------------------------------------------------------------------------------------------


def test_save_into_read_only_folder_is_a_training_error(tmp_path: Path) -> None:
    folder = tmp_path / "locked"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        if os.access(folder, os.W_OK):
            pytest.skip("chmod does not stop this user from writing (running as root?)")
        with pytest.raises(TrainingError, match="Cannot write into") as info:
            save_lora_file(folder / "style.safetensors", tiny_lora_tensors(), {})
        assert str(folder) in str(info.value)
    finally:
        folder.chmod(0o700)
    assert list(folder.iterdir()) == []


def test_save_under_a_file_is_a_training_error(tmp_path: Path) -> None:
    blocker = tmp_path / "output"
    blocker.write_text("a file where the output folder should be", encoding="utf-8")

    with pytest.raises(TrainingError, match="Cannot write into") as info:
        save_lora_file(blocker / "style.safetensors", tiny_lora_tensors(), {})

    assert str(blocker) in str(info.value)
    assert blocker.read_text(encoding="utf-8").startswith("a file where")


def test_failed_save_keeps_previous_file_intact(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = save_lora_file(tmp_path / "style.safetensors", tiny_lora_tensors(0.5), {"ss_steps": "100"})
    before = target.read_bytes()

    def disk_full(tensors: dict, filename: str, metadata: dict | None = None) -> None:
        Path(filename).write_bytes(b"\0" * 1000)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(kohya, "save_file", disk_full)
    with pytest.raises(TrainingError, match="No space left on device") as info:
        save_lora_file(target, tiny_lora_tensors(0.9), {"ss_steps": "200"})

    assert "intact" in str(info.value)
    assert target.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["style.safetensors"]


def test_nan_tensors_are_not_saved(tmp_path: Path) -> None:
    tensors = tiny_lora_tensors()
    key = "lora_unet_mid_block_attentions_0_proj_in.lora_up.weight"
    tensors[key][0, 0] = float("nan")

    with pytest.raises(TrainingError, match="NaN") as info:
        save_lora_file(tmp_path / "style.safetensors", tensors, {})

    assert key in str(info.value)
    assert list(tmp_path.iterdir()) == []


# -- failures during training ------------------------------------------------------------------------


def test_nan_loss_stops_training_and_keeps_last_good_save(tiny_checkpoint: Path, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    data = write_dataset(tmp_path / "data")
    out = tmp_path / "out"
    monkeypatch.setattr(DiffusionBackbone, "predict", predict_after(3, lambda pred: pred * float("nan")))
    config = fast_config(tiny_checkpoint, data, out, save_every_n_steps=2, save_every_n_epochs=0,
                         log_every_n_steps=1)
    events: list[Event] = []

    with pytest.raises(TrainingError, match="(?i)nan") as info:
        train_lora(config, listeners=[events.append])

    assert "step 3" in str(info.value)
    good = out / "noise-step00000002.safetensors"
    assert good.is_file() and all_finite(good)
    assert (out / "checkpoints" / "step-00000002" / "state.pt").is_file()
    assert not (out / "noise.safetensors").exists()
    assert [e.kind for e in events][-1] == "error"


def test_cancel_saves_a_resumable_checkpoint_and_a_lora(tiny_checkpoint: Path, tmp_path: Path) -> None:
    data = write_dataset(tmp_path / "data")
    out = tmp_path / "out"
    cancel = CancelToken()

    def press_stop(event: Event) -> None:
        if training_step(event, 3):
            cancel.set()

    result = train_lora(fast_config(tiny_checkpoint, data, out, max_steps=6), listeners=[press_stop], cancel=cancel)

    assert result.interrupted and result.steps == 3
    assert (out / "checkpoints" / "step-00000003" / "state.pt").is_file()
    assert result.lora_file == out / "noise-step00000003.safetensors"
    assert result.lora_file.is_file() and all_finite(result.lora_file)
    assert read_lora_file(result.lora_file)[1]["ss_steps"] == "3"
    assert not (out / "noise.safetensors").exists()


def test_ctrl_c_inside_a_step_saves_then_reraises(tiny_checkpoint: Path, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    data = write_dataset(tmp_path / "data")
    out = tmp_path / "out"

    def ctrl_c(pred: torch.Tensor) -> torch.Tensor:
        raise KeyboardInterrupt

    monkeypatch.setattr(DiffusionBackbone, "predict", predict_after(3, ctrl_c))
    events: list[Event] = []

    with pytest.raises(KeyboardInterrupt):
        train_lora(fast_config(tiny_checkpoint, data, out, max_steps=6), listeners=[events.append])

    # Step 3 never finished, so the last completed step (2) is what was saved.
    assert (out / "checkpoints" / "step-00000002" / "state.pt").is_file()
    assert all_finite(out / "noise-step00000002.safetensors")
    done = [e for e in events if e.kind == "done"]
    assert len(done) == 1 and done[0].data["interrupted"] is True


@pytest.mark.parametrize("typed", ["../../escape", "/etc/passwd", "..\\..\\win", "a/b/c.safetensors"])
def test_output_names_cannot_leave_the_output_folder(typed):
    from lora_trainer.config import safe_name

    name = safe_name(typed)
    assert "/" not in name and "\\" not in name and not name.startswith(".")
    assert Path("out", name).resolve().parent == Path("out").resolve()


def test_a_folder_is_replaced_whole_and_a_failed_write_keeps_the_old_one(tmp_path: Path) -> None:
    """Checkpoint and adapter folders: written beside, renamed over; the old folder is never deleted first."""
    from lora_trainer.atomic import folder_replaced_atomically

    target = tmp_path / "checkpoints" / "step-00000004"
    with folder_replaced_atomically(target) as tmp:
        (tmp / "state.pt").write_text("first")
    with pytest.raises(KeyboardInterrupt), folder_replaced_atomically(target) as tmp:
        (tmp / "state.pt").write_text("half")
        assert (target / "state.pt").read_text() == "first"  # the old one stays readable while writing
        raise KeyboardInterrupt
    assert (target / "state.pt").read_text() == "first"
    with folder_replaced_atomically(target) as tmp:
        (tmp / "state.pt").write_text("second")
        (tmp / "config.yaml").write_text("x")
    assert sorted(p.name for p in target.iterdir()) == ["config.yaml", "state.pt"]
    assert (target / "state.pt").read_text() == "second"
    assert [p.name for p in target.parent.iterdir()] == ["step-00000004"]  # no temporary or old folder left behind

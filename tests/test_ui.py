"""The UI's job runner, API routes and form helpers, without a browser (tests/test_ui_browser.py has one)."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch
from conftest import quick_config

from lora_trainer.errors import ConfigError
from lora_trainer.hosts.app import StandaloneHost
from lora_trainer.jobs import BusyError, Trainer, describe
from lora_trainer.train.loop import TrainResult


def _values(checkpoint: Path, data: Path, **extra) -> dict:
    values = {"base_model": str(checkpoint), "train_data_dir": str(data), "output_name": "ui_lora", "resolution": 64,
              "batch_size": 2, "max_steps": 3, "device": "cpu", "lora_rank": 4, "save_every_n_epochs": 0,
              "log_every_n_steps": 1, "learning_rate": 1e-3}
    return {**values, **extra}


def test_a_job_trains_publishes_and_reports(tmp_path, sd1_checkpoint, dataset):
    host = StandaloneHost(tmp_path / "loras", tmp_path / "out")
    trainer = Trainer(host)
    job = trainer.start(_values(sd1_checkpoint, dataset))
    trainer.wait(300)
    assert job.state == "done", job.message
    assert Path(job.lora_file) == tmp_path / "loras" / "ui_lora.safetensors" and Path(job.lora_file).is_file()
    assert job.step == job.total == 3 and [s for s, _ in job.losses] == [1, 2, 3]
    assert "done" in describe(job) and "<lora:ui_lora:0.8>" in job.message
    assert trainer.results()[0]["name"] == "ui_lora"
    assert (tmp_path / "out" / "ui_lora" / "config.yaml").is_file()  # the host chose the output folder


def test_bad_values_are_refused_before_anything_starts(tmp_path, sd1_checkpoint, dataset):
    trainer = Trainer(StandaloneHost(tmp_path / "loras", tmp_path / "out"))
    with pytest.raises(ConfigError, match="lora_rank"):
        trainer.start(_values(sd1_checkpoint, dataset, lora_rank=0))
    with pytest.raises(ConfigError, match="base model"):
        trainer.start(_values("", dataset))
    assert trainer.job is None


class _SlowHost(StandaloneHost):
    """Blocks inside run() until released, so a second start meets a running job."""

    def __init__(self, *args) -> None:
        super().__init__(*args)
        self.release = threading.Event()

    def run(self, config, listeners, cancel, job_id=""):
        with self._busy:
            self.release.wait(30)
        return TrainResult(None, Path(config.output_dir), 0, 0, interrupted=True)


def test_one_job_at_a_time(tmp_path, sd1_checkpoint, dataset):
    host = _SlowHost(tmp_path / "loras", tmp_path / "out")
    trainer = Trainer(host)
    trainer.start(_values(sd1_checkpoint, dataset))
    with pytest.raises(BusyError, match="already running"):
        trainer.start(_values(sd1_checkpoint, dataset))
    with pytest.raises(BusyError):
        host.run_exclusive(lambda: None)  # captioning waits for no one: it says training runs
    host.release.set()
    job = trainer.wait(30)
    assert job.state == "interrupted" and "nothing was saved" in job.message
    assert host.run_exclusive(lambda: 7) == 7


def test_interrupt_saves_the_lora_so_far_under_its_own_name(tmp_path, sd1_checkpoint, dataset):
    host = StandaloneHost(tmp_path / "loras", tmp_path / "out")
    trainer = Trainer(host)
    original = host.run

    def run_and_stop_at_step_2(config, listeners, cancel, job_id=""):
        def stop(event):
            if event.kind == "progress" and event.step == 2 and "phase" not in event.data:
                trainer.interrupt()
        return original(config, [*listeners, stop], cancel, job_id)

    host.run = run_and_stop_at_step_2
    job = trainer.start(_values(sd1_checkpoint, dataset, max_steps=6))
    trainer.wait(300)
    assert job.state == "interrupted", job.message
    assert Path(job.lora_file).name == "ui_lora-step00000002.safetensors"
    # the copy in the run folder has the same name as the one in the LoRA folder
    assert (tmp_path / "out" / "ui_lora" / "ui_lora-step00000002.safetensors").is_file()
    assert not (tmp_path / "loras" / "ui_lora.safetensors").exists()  # the finished name stays free
    assert not trainer.interrupt()


def test_api_routes(tmp_path, sd1_checkpoint, dataset):
    pytest.importorskip("fastapi")
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from lora_trainer.ui.api import register_api

    trainer = Trainer(StandaloneHost(tmp_path / "loras", tmp_path / "out"))
    app = FastAPI()
    register_api(app, trainer)
    client = TestClient(app)
    assert client.get("/lora_trainer/status").json() == {"state": "idle", "running": False}
    assert client.post("/lora_trainer/train", json={"config": {"lora_rank": "many"}}).status_code == 422
    assert client.post("/lora_trainer/train", content=b"not json").status_code == 400
    plan = client.post("/lora_trainer/plan", json={"config": _values(sd1_checkpoint, dataset)})
    assert plan.status_code == 200 and plan.json()["plan"].startswith("Predicted peak GPU memory of this run")
    assert "base_weights: fp8" in plan.json()["plan"]  # a model from its file may be held in fp8
    assert client.post("/lora_trainer/plan", json={"config": {"lora_rank": "many"}}).status_code == 422
    started = client.post("/lora_trainer/train", json={"config": _values(sd1_checkpoint, dataset)})
    assert started.status_code == 201 and started.json()["name"] == "ui_lora"
    trainer.wait(300)
    status = client.get("/lora_trainer/status").json()
    assert status["state"] == "done" and status["running"] is False and status["lora_file"].endswith("ui_lora.safetensors")
    assert [r["name"] for r in client.get("/lora_trainer/results").json()] == ["ui_lora"]
    assert client.post("/lora_trainer/interrupt").json() == {"interrupted": False}


def test_form_values_and_presets():
    gr = pytest.importorskip("gradio")
    from lora_trainer.config import PRESETS
    from lora_trainer.forms import PRESET, config_values
    from lora_trainer.ui.blocks import preset_values

    names = ["lora_rank", "learning_rate", "optimizer", "max_steps", "max_token_length", "sample_prompts", "flip_aug"]
    values = config_values(dict(zip(names, (0, 2e-4, PRESET, 10.0, "150", "a cat\nan owl", True))))
    assert values == {"learning_rate": 2e-4, "max_steps": 10, "max_token_length": "150",
                      "sample_prompts": "a cat\nan owl", "flip_aug": True}
    config = quick_config(Path("x"), Path("y"), Path("z"), **values)
    assert config.max_token_length == 150 and config.sample_prompts == ["a cat", "an owl"]
    sdxl = preset_values("sdxl", names)
    assert sdxl[0] == PRESETS["sdxl"]["lora_rank"] and sdxl[2] == PRESETS["sdxl"]["optimizer"]
    assert preset_values("auto", names)[:3] == [0, 0, PRESET]
    assert isinstance(sdxl[3], dict)  # non-preset keys are left as the user set them (gr.update())
    del gr


def test_blocks_build_with_the_installed_gradio(tmp_path):
    pytest.importorskip("gradio")
    from lora_trainer.config import config_fields
    from lora_trainer.ui.blocks import build_blocks

    host = StandaloneHost(tmp_path / "loras", tmp_path / "out")
    blocks = build_blocks(host, Trainer(host))
    ids = [getattr(b, "elem_id", None) for b in blocks.blocks.values() if getattr(b, "elem_id", None)]
    assert len(ids) == len(set(ids)), "element ids must be unique on the page"
    ids = set(ids)
    from lora_trainer.ui.blocks import IMAGE_UI_SKIPS

    for f in config_fields():
        shown = f"lora_trainer_{f.name}" in ids
        assert shown != (f.name in IMAGE_UI_SKIPS) or f.name in ("train_data_dir", "base_model"), f.name
    assert IMAGE_UI_SKIPS == {"model_type", "target_modules", "max_seq_length", "packing",
                              "load_in_4bit", "save_merged_model"}  # the image tab shows no language-model keys
    assert {"lora_trainer_train", "lora_trainer_interrupt", "lora_trainer_caption", "lora_trainer_test"} <= ids


def test_check_dataset_reports_problems(tmp_path, dataset):
    pytest.importorskip("gradio")
    from lora_trainer.ui.blocks import check_dataset

    (tmp_path / "broken.png").write_bytes(b"not a png")
    (tmp_path / "ok.png").write_bytes((dataset / "img0.png").read_bytes())
    report = check_dataset(str(tmp_path))
    assert "1 usable images" in report and "broken.png" in report and "captions found: 0 of 1" in report
    assert "Problem" in check_dataset(str(tmp_path / "nowhere"))


@pytest.mark.slow  # the default run's time budget; CI runs it with -m slow
def test_the_standalone_test_grid_renders_each_strength(tmp_path, sd1_checkpoint, dataset):
    """Strength 0 renders exactly what the model renders without the LoRA; strength 1 differs."""
    import numpy as np

    from lora_trainer.backbones.sd import DiffusionBackbone
    from lora_trainer.ui.render import parse_strengths, render_strengths

    host = StandaloneHost(tmp_path / "loras", tmp_path / "out")
    trainer = Trainer(host)
    trainer.start(_values(sd1_checkpoint, dataset, max_steps=4, learning_rate=1e-2))
    job = trainer.wait(300)
    assert job.state == "done", job.message
    grid = render_strengths(str(sd1_checkpoint), job.lora_file, "inkwash, mountains", "", parse_strengths("0, 1"),
                            seed=3, steps=2, size=64)
    assert grid.size == (128, 84)
    cells = np.asarray(grid)[:64]
    base = DiffusionBackbone.from_file(sd1_checkpoint).sampling_pipeline()
    base.set_progress_bar_config(disable=True)
    plain = base("inkwash, mountains", num_inference_steps=2, guidance_scale=7.0, height=64, width=64,
                 generator=torch.Generator("cpu").manual_seed(3)).images[0]
    assert np.array_equal(cells[:, :64], np.asarray(plain))
    assert not np.array_equal(cells[:, 64:], cells[:, :64])
    with pytest.raises(ConfigError):
        parse_strengths("0, lots")


def test_a_missing_or_empty_image_folder_is_refused_before_a_job_starts(tmp_path, sd1_checkpoint):
    pytest.importorskip("fastapi")
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from lora_trainer.ui.api import register_api

    trainer = Trainer(StandaloneHost(tmp_path / "loras", tmp_path / "out"))
    app = FastAPI()
    register_api(app, trainer)
    client = TestClient(app)
    (tmp_path / "empty").mkdir()
    for folder, says in ((tmp_path / "nowhere", "does not exist"), (tmp_path / "empty", "No images found")):
        refused = client.post("/lora_trainer/train", json={"config": _values(sd1_checkpoint, folder)})
        assert refused.status_code == 422 and says in refused.json()["error"] and str(folder) in refused.json()["error"]
    assert trainer.job is None and client.get("/lora_trainer/status").json()["state"] == "idle"


@pytest.mark.parametrize("typed", ["../../../../../../tmp/escaped", "/tmp/escaped", "..\\..\\escaped"])
def test_a_typed_name_never_leaves_its_folder(tmp_path, sd1_checkpoint, dataset, typed):
    host = StandaloneHost(tmp_path / "loras", tmp_path / "out")
    trainer = Trainer(host)
    job = trainer.start({**_values(sd1_checkpoint, dataset, max_steps=1), "output_name": typed})
    assert job.name == "escaped" and "was changed to 'escaped'" in job.notice
    trainer.wait(300)
    assert job.state == "done", job.message
    assert Path(job.lora_file) == tmp_path / "loras" / "escaped.safetensors"
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert all(p.is_relative_to(tmp_path / "loras") or p.is_relative_to(tmp_path / "out" / "escaped")
               for p in written), written
    assert not Path("/tmp/escaped").exists() and not (tmp_path.parent / "escaped").exists()
    assert "was changed" in describe(job)


def test_every_label_in_the_tab_is_unique(tmp_path):
    """The WebUI saves each field's default in ui-config.json under its label: a shared label shares a default."""
    gr = pytest.importorskip("gradio")
    from lora_trainer.hosts.a1111 import WebUIHost
    from lora_trainer.ui.blocks import build_blocks

    for host in (StandaloneHost(tmp_path / "loras", tmp_path / "out"), _webui_like(WebUIHost)):
        blocks = build_blocks(host, Trainer(host))
        kept = (gr.Slider, gr.Radio, gr.Checkbox, gr.Textbox, gr.Number, gr.Dropdown)
        labels = [b.label for b in blocks.blocks.values() if type(b) in kept and getattr(b, "label", None)]
        assert len(labels) == len(set(labels)), sorted(label for label in labels if labels.count(label) > 1)
        assert not [label for label in labels if label.startswith(("Lora", "Min snr", "Lr ", "Cuda", "Clip"))]


def _webui_like(host_class):
    """The WebUI host's form (its hidden keys, its defaults) without a WebUI to ask."""
    host = host_class.__new__(host_class)
    host.training = False
    host.model_line = lambda: "model"
    host.default_values = dict
    host.lora_dir = lambda: Path("models/Lora")
    return host


def test_a_refused_train_click_keeps_its_reason(tmp_path):
    pytest.importorskip("gradio")
    from lora_trainer.ui.blocks import build_blocks

    host = StandaloneHost(tmp_path / "loras", tmp_path / "out")
    blocks = build_blocks(host, Trainer(host))
    fns = {getattr(f, "fn", None).__name__: f.fn for f in (blocks.fns.values() if isinstance(blocks.fns, dict)
                                                          else blocks.fns) if getattr(f, "fn", None)}
    follow = list(fns["on_follow"](""))
    assert len(follow) == 1 and all(isinstance(u, dict) for u in follow[0])  # nothing replaced
    assert fns["on_status"]()[0] == describe(None)


def test_the_test_grid_renders_at_the_trained_resolution(tmp_path, sd1_checkpoint, dataset):
    from lora_trainer.ui.render import render_strengths, trained_size

    host = StandaloneHost(tmp_path / "loras", tmp_path / "out")
    trainer = Trainer(host)
    trainer.start(_values(sd1_checkpoint, dataset, max_steps=1))
    job = trainer.wait(300)
    assert trained_size(job.lora_file) == 64
    grid = render_strengths(str(sd1_checkpoint), job.lora_file, "inkwash", "", [1.0], seed=1, steps=1)
    assert grid.size == (64, 84)

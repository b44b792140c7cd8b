"""Knowing when to stop: the validation loss (held-out images at fixed times and noise), the best checkpoint,
early stop, and saving or sampling on demand without changing the run."""

from __future__ import annotations

import pytest
import torch
from conftest import make_dataset, quick_config, transformer_config
from safetensors.torch import load_file

from lora_trainer.backbones.sd import DiffusionBackbone
from lora_trainer.backbones.tiny_flow import build_tiny_flux
from lora_trainer.data import scan_images
from lora_trainer.errors import ConfigError, DatasetError
from lora_trainer.events import CancelToken
from lora_trainer.lora.kohya import VALIDATION_LOSS, read_lora_file
from lora_trainer.train.loop import Overfitting, train_lora


@pytest.fixture(scope="module")
def flux(tmp_path_factory):
    return build_tiny_flux(tmp_path_factory.mktemp("comfy"))


def _recording_batches(monkeypatch, cls) -> list[list[int]]:
    """The example indices of every training batch `cls.batch` builds (validation batches, with `times`, left out)."""
    seen: list[list[int]] = []
    original = cls.batch

    def batch(self, indices, gen, device_gen, times=None):
        if times is None:
            seen.append([self.run["cache"][i].item.path.name for i in indices])
        return original(self, indices, gen, device_gen, times)

    monkeypatch.setattr(cls, "batch", batch)
    return seen


@pytest.mark.parametrize("family", ["sd1", "flux1"])
def test_held_out_images_never_train_and_two_evaluations_of_one_lora_are_bit_identical(
        family, sd1_checkpoint, flux, tmp_path, monkeypatch):
    data = make_dataset(tmp_path / "data", count=6)
    if family == "sd1":
        cls = DiffusionBackbone
        config = quick_config(sd1_checkpoint, data, tmp_path / "out", max_steps=6, validation_split=0.34,
                              save_every_n_steps=3, flip_aug=True, caption_dropout=0.5, lora_dropout=0.1)
    else:
        from lora_trainer.backbones.flux import FluxBackbone as cls

        config = transformer_config(flux, data, tmp_path / "out", max_steps=6, validation_split=0.34,
                                    save_every_n_steps=3, flip_aug=True, caption_dropout=0.5)
    held = {item.path.name for item in scan_images(config).items if item.held_out}
    assert len(held) == 2
    trained = _recording_batches(monkeypatch, cls)
    backbone = cls.load(config, cls.read_data(config)) if family == "flux1" else DiffusionBackbone.from_file(sd1_checkpoint)
    result = train_lora(config, backbone=backbone)
    assert trained and not held & {name for batch in trained for name in batch}
    # measured before the first step, at the save of step 3 and at the end
    assert [step for step, _ in result.validation] == [0, 3, 6]
    again = backbone.evaluate()["validation_loss"]
    assert again == backbone.evaluate()["validation_loss"] == result.validation[-1][1]
    assert result.validation[0][1] != result.validation[-1][1]  # the LoRA changed it
    # each saved LoRA records its own validation loss
    saved = {step: float(read_lora_file(path)[1][VALIDATION_LOSS]) for step, _, path in result.saved}
    assert saved == {3: result.validation[1][1], 6: result.validation[2][1]}


def test_a_validation_folder_is_held_out_and_bad_splits_are_refused_before_anything_loads(sd1_checkpoint, tmp_path):
    data = make_dataset(tmp_path / "data", count=3)
    extra = make_dataset(tmp_path / "val", count=2, seed=1)
    config = quick_config(sd1_checkpoint, data, tmp_path / "out", validation_dir=str(extra))
    scan = scan_images(config)
    assert [item.held_out for item in scan.items] == [False] * 3 + [True] * 2
    assert "3 usable images" in scan.summary() and "2 held out for validation" in scan.summary()
    with pytest.raises(DatasetError, match="validation_dir is the training folder"):
        scan_images(quick_config(sd1_checkpoint, data, tmp_path / "out", validation_dir=str(data)))
    with pytest.raises(DatasetError, match="does not exist"):
        train_lora(quick_config(sd1_checkpoint, data, tmp_path / "out2", validation_dir=str(tmp_path / "nothing")))
    assert not (tmp_path / "out2").exists()
    lonely = make_dataset(tmp_path / "one", count=1)
    with pytest.raises(DatasetError, match="needs at least 2 images"):
        scan_images(quick_config(sd1_checkpoint, lonely, tmp_path / "out", validation_split=0.2))
    with pytest.raises(ConfigError, match="validation_split"):
        quick_config(sd1_checkpoint, data, tmp_path / "out", validation_split=0.9)


def test_the_overfitting_rule():
    watch = Overfitting(patience=2)
    assert watch.add(10, 1.0, 0.5) is None  # best
    assert watch.add(20, 1.1, 0.4) is None  # 1 evaluation without improving
    message = watch.add(30, 1.2, 0.3)  # 2, and the training loss fell: overfitting
    assert message and "step 10" in message and "step 30" in message
    assert watch.add(40, 1.3, 0.2) is None  # said once
    rising = Overfitting(patience=1)
    rising.add(10, 1.0, 0.5)
    assert rising.add(20, 1.1, 0.6) is None  # both rose: not overfitting (the run is diverging or noisy)


def _coloured(folder, colour, count: int, seed: int):
    """`count` noisy images of one colour, all captioned 'ink'."""
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for i in range(count):
        pixels = np.clip(np.array(colour)[None, None] + rng.normal(0, 40, (64, 64, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"i{i}.png")
        (folder / f"i{i}.txt").write_text("ink", encoding="utf-8")
    return folder


def _overfitting_config(checkpoint, tmp_path, out, **overrides):
    """A run built to overfit: red images to learn as 'ink', blue 'ink' images held out, a learning rate too high
    for steady progress, measured every 5 steps with a patience of 1."""
    train = tmp_path / "red" if (tmp_path / "red").exists() else _coloured(tmp_path / "red", (220, 30, 30), 2, 0)
    held = tmp_path / "blue" if (tmp_path / "blue").exists() else _coloured(tmp_path / "blue", (30, 30, 220), 2, 1)
    return quick_config(checkpoint, train, out, **{
        "max_steps": 60, "learning_rate": 3e-2, "lr_scheduler": "constant", "min_snr_gamma": 0, "lora_rank": 8,
        "lora_alpha": 8, "validation_dir": str(held), "validate_every_n_steps": 5, "early_stop_patience": 1,
        "batch_size": 2, **overrides})


def test_early_stop_stops_at_the_evaluation_the_rule_names(sd1_checkpoint, tmp_path):
    full = train_lora(_overfitting_config(sd1_checkpoint, tmp_path, tmp_path / "full"))
    # where the rule says the full run overfits, from its own curves (the training loss: its mean between evaluations)
    watch, expected, previous = Overfitting(1), None, 0
    for step, value in full.validation[1:]:
        window = [loss for s, loss in full.losses if previous < s <= step]
        previous = step
        if watch.add(step, value, sum(window) / len(window)):
            expected = step
            break
    assert expected is not None and expected < 60, full.validation
    warnings: list[str] = []
    stopped = train_lora(_overfitting_config(sd1_checkpoint, tmp_path, tmp_path / "stop", early_stop=True),
                         listeners=[lambda e: warnings.append(e.data["message"]) if e.kind == "warning" else None])
    assert stopped.stopped_early and stopped.steps == expected
    assert stopped.validation == [v for v in full.validation if v[0] <= expected]
    assert any("overfitting" in w and "Stopping here" in w for w in warnings)
    assert stopped.lora_file.is_file()


def test_use_best_names_the_lowest_validation_loss_and_keeps_the_last(sd1_checkpoint, tmp_path):
    config = _overfitting_config(sd1_checkpoint, tmp_path, tmp_path / "out", save_every_n_steps=5, use_best=True,
                                 keep_last_n_checkpoints=1, output_name="ink", max_steps=30)
    result = train_lora(config)
    recorded = {step: value for step, value, _ in result.saved}
    best_step = min(recorded, key=recorded.get)
    assert best_step != 30, "the run was built to overfit: its best is not its last step"
    assert result.best[0] == best_step and result.lora_file.name == "ink.safetensors"
    tensors, metadata = read_lora_file(result.lora_file)
    assert float(metadata[VALIDATION_LOSS]) == min(recorded.values())
    kept = load_file(str(tmp_path / "out" / f"ink-step{best_step:08d}.safetensors"))  # never pruned
    assert all(torch.equal(tensors[k], kept[k]) for k in kept)
    _, last_meta = read_lora_file(result.last_file)
    assert result.last_file.name == "ink-last.safetensors" and last_meta["ss_steps"] == "30"
    assert float(last_meta[VALIDATION_LOSS]) == recorded[30]
    # only the newest checkpoint's LoRA and the best one's are left of the periodic ones
    assert sorted(p.name for p in (tmp_path / "out").glob("ink-step*.safetensors")) == [f"ink-step{best_step:08d}.safetensors"]


def test_sample_and_save_now_leave_the_run_bit_identical(sd1_checkpoint, tmp_path):
    data = make_dataset(tmp_path / "data", count=3)
    options = {"max_steps": 6, "lora_dropout": 0.1, "flip_aug": True, "sample_steps": 2}
    plain = train_lora(quick_config(sd1_checkpoint, data, tmp_path / "a", **options))
    cancel = CancelToken()

    def ask(event):
        if event.kind == "progress" and event.step == 2 and "phase" not in event.data:
            cancel.ask("sample", ["a test prompt"])
            cancel.ask("save")

    saved: list = []
    asked = train_lora(quick_config(sd1_checkpoint, data, tmp_path / "b", **options), cancel=cancel,
                       listeners=[ask, lambda e: saved.append(e.data) if e.kind == "saved" else None])
    assert [path.name for path in asked.samples] == ["step00000002_00_asked.png"]
    assert saved[0]["what"] == "requested" and saved[0]["path"].endswith("-step00000002.safetensors")
    a, b = load_file(str(plain.lora_file)), load_file(str(asked.lora_file))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_the_api_saves_and_samples_on_demand_and_uses_the_best_checkpoint(sd1_checkpoint, tmp_path):
    pytest.importorskip("fastapi")
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from lora_trainer.hosts.app import StandaloneHost
    from lora_trainer.jobs import Trainer
    from lora_trainer.train.plot import loss_plot, sample_grid
    from lora_trainer.ui.api import register_api

    class Host(StandaloneHost):
        """The standalone app's host, with a listener that clicks Save now and Sample now at step 2."""

        def run(self, config, listeners, cancel, job_id=""):
            def click(event):
                if event.kind == "progress" and event.step == 2 and "phase" not in event.data:
                    assert client.post("/lora_trainer/save_now").json() == {"asked": True}
                    assert client.post("/lora_trainer/sample_now", json={"prompt": "a red apple"}).status_code == 200
                elif event.kind == "progress" and event.step == 3 and "phase" not in event.data:
                    said.append(trainer.job.message)  # the answers stay on the status while the steps go on
            return super().run(config, [*listeners, click], cancel, job_id)

    said: list[str] = []

    trainer = Trainer(Host(tmp_path / "loras", tmp_path / "out"))
    app = FastAPI()
    register_api(app, trainer)
    client = TestClient(app)
    assert client.post("/lora_trainer/save_now").status_code == 409  # nothing is training
    assert client.post("/lora_trainer/use_best").status_code == 409
    config = _overfitting_config(sd1_checkpoint, tmp_path, "", max_steps=12, save_every_n_steps=4, sample_steps=2,
                                 validate_every_n_steps=0)
    values = {k: v for k, v in vars(config).items() if v not in (None, "", [])}
    started = client.post("/lora_trainer/train", json={"config": {**values, "output_name": "ink"}})
    assert started.status_code == 201
    trainer.wait(300)
    status = client.get("/lora_trainer/status").json()
    assert status["state"] == "done", status["message"]
    assert [step for step, _ in status["validation"]] == [0, 2, 4, 8, 12]  # at each save, the one asked for too
    assert status["sample_grid"] == [[2, "a red apple", status["samples"][0]]]
    assert (tmp_path / "loras" / "ink-step00000002.safetensors").is_file()  # Save now, into the LoRA folder
    assert said == [("Saved step 2 as ink-step00000002.safetensors: use it as `<lora:ink-step00000002:0.8>`. "
                     "Preview of step 2 rendered: see Samples.")]
    best = status["best"]
    assert best["validation_loss"] == min(value for step, value in status["validation"] if step > 0)
    answer = client.post("/lora_trainer/use_best").json()
    names = {p.name for p in (tmp_path / "loras").glob("*.safetensors")}
    if best["step"] == 12:
        assert "stays" in answer["message"] and "ink-last.safetensors" not in names
    else:
        assert "ink-last.safetensors" in names
        _, metadata = read_lora_file(tmp_path / "loras" / "ink.safetensors")
        assert float(metadata[VALIDATION_LOSS]) == best["validation_loss"]
    # what the tab shows: both curves, and the grid of steps x prompts
    assert loss_plot(trainer.job.losses, trainer.job.validation).size == (512, 256)
    assert sample_grid(trainer.job.sample_grid).size == (72 + 160, 44 + 160)


def test_a_resumed_run_still_knows_the_validation_losses_of_its_earlier_saves(sd1_checkpoint, tmp_path):
    data = make_dataset(tmp_path / "data", count=4)
    options = {"max_steps": 8, "save_every_n_steps": 2, "validation_split": 0.25, "keep_last_n_checkpoints": 1}
    cancel = CancelToken()
    stop = lambda e: cancel.set() if e.kind == "progress" and e.step == 5 and "phase" not in e.data else None
    first = train_lora(quick_config(sd1_checkpoint, data, tmp_path / "out", **options), listeners=[stop], cancel=cancel)
    assert first.interrupted and [step for step, _, _ in first.saved] == [2, 4]
    resumed = train_lora(quick_config(sd1_checkpoint, data, tmp_path / "out", **options), resume=tmp_path / "out")
    assert [step for step, _, _ in resumed.saved] == [2, 4, 6, 8]
    recorded = {step: value for step, value, _ in resumed.saved}
    assert recorded[2] == first.saved[0][1] and resumed.best[1] == min(recorded.values())
    assert resumed.best[2].is_file()  # the best one's LoRA was kept, whichever step it is


def test_a_save_asked_for_on_a_scheduled_saves_step_is_still_the_one_asked_for(sd1_checkpoint, tmp_path):
    data = make_dataset(tmp_path / "data", count=2)
    cancel = CancelToken()
    ask = lambda e: cancel.ask("save") if e.kind == "progress" and e.step == 2 and "phase" not in e.data else None
    saved: list = []
    train_lora(quick_config(sd1_checkpoint, data, tmp_path / "out", max_steps=3, save_every_n_steps=1), cancel=cancel,
               listeners=[ask, lambda e: saved.append((e.step, e.data["what"])) if e.kind == "saved" else None])
    assert saved == [(1, "periodic"), (2, "requested"), (3, "final")]  # the host publishes the one asked for

"""The WebUI adapter against the WebUI's documented objects, built without the WebUI.

`modules.*` and the built-in Lora extension's `networks` are stand-ins with the names, signatures and
behaviour the adapter relies on (read off A1111 1.10.1's source: shared.state, call_queue.queue_lock,
progress.*, devices.*, script_callbacks.*, OptionInfo, networks.*). The model is LDM-shaped: an UNet
module with LDM parameter names (requires_grad=True, as the WebUI leaves them), a CLIP text encoder
behind get_learned_conditioning and a VAE behind encode_first_stage. tests/test_webui_real.py runs the
same adapter inside a real WebUI when WEBUI_PATH is set.
"""

from __future__ import annotations

import hashlib
import sys
import threading
import types
from contextlib import nullcontext
from pathlib import Path

import pytest
import torch
from conftest import make_dataset

from lora_trainer.backbones.checkpoint import UNET_PREFIX, read_checkpoint
from lora_trainer.backbones.sd import DiffusionBackbone


def _module_tree(state: dict[str, torch.Tensor]) -> torch.nn.Module:
    """A module whose state_dict() has exactly these keys (LDM names), as trainable parameters."""
    root = torch.nn.Module()
    for key, tensor in state.items():
        *path, leaf = key.split(".")
        node = root
        for part in path:
            if not hasattr(node, part):
                node.add_module(part, torch.nn.Module())
            node = getattr(node, part)
        node.register_parameter(leaf, torch.nn.Parameter(tensor.clone()))
    return root


class FakeLDM(torch.nn.Module):
    """What `shared.sd_model` is for an SD1 checkpoint, as far as the adapter uses it."""

    is_sd1, is_sd2, is_sdxl = True, False, False
    parameterization = "eps"

    def __init__(self, checkpoint: Path) -> None:
        super().__init__()
        state = read_checkpoint(checkpoint)
        self.model = torch.nn.Module()
        self.model.diffusion_model = _module_tree({k[len(UNET_PREFIX):]: v for k, v in state.items()
                                                   if k.startswith(UNET_PREFIX)})
        reference = DiffusionBackbone.from_file(checkpoint)
        self.first_stage_model = reference.vae
        self.cond_stage_model = reference.text_encoders[0]
        self.tokenizer = reference.tokenizers[0]
        self.sd_checkpoint_info = types.SimpleNamespace(name_for_extra="tiny", filename=str(checkpoint))
        self.fail_on = None

    def get_learned_conditioning(self, prompts):
        if self.fail_on and any(self.fail_on in p for p in prompts):
            raise RuntimeError("text encoder exploded")
        chunks = []
        for prompt in prompts:  # like the WebUI: 75-token chunks of 77 states, as many as the prompt needs
            ids = self.tokenizer(prompt, truncation=False).input_ids[1:-1] or [self.tokenizer.eos_token_id]
            pieces = [ids[i:i + 75] for i in range(0, len(ids), 75)]
            states = []
            for piece in pieces:
                framed = self.tokenizer.pad({"input_ids": [[self.tokenizer.bos_token_id, *piece, self.tokenizer.eos_token_id]]},
                                            padding="max_length", max_length=77, return_tensors="pt").input_ids
                states.append(self.cond_stage_model(framed).last_hidden_state)
            chunks.append(torch.cat(states, dim=1))
        longest = max(c.shape[1] for c in chunks)
        return torch.cat([torch.nn.functional.pad(c, (0, 0, 0, longest - c.shape[1])) for c in chunks])

    def encode_first_stage(self, x):
        return self.first_stage_model.encode(x).latent_dist

    def get_first_stage_encoding(self, encoded):
        """As LDM's: a distribution is drawn from (its mean here, for repeatable tests), a tensor taken as it is."""
        z = encoded if isinstance(encoded, torch.Tensor) else encoded.mean
        return z * self.first_stage_model.config.scaling_factor

    def decode_first_stage(self, z):
        return self.first_stage_model.decode(z / self.first_stage_model.config.scaling_factor).sample


def _recorder(store: dict, name: str):
    """A script_callbacks.on_* stand-in that records the callback it is given."""
    return lambda callback: store.__setitem__(name, callback)


def _unet_hash(sd_model) -> str:
    digest = hashlib.sha256()
    for key, value in sorted(sd_model.model.diffusion_model.state_dict().items()):
        digest.update(key.encode())
        digest.update(str((value.dtype, value.device, tuple(value.shape))).encode())
        digest.update(value.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


@pytest.fixture()
def webui(tmp_path, monkeypatch, sd1_checkpoint):
    """Stand-ins for the WebUI modules the adapter imports, around a FakeLDM of the tiny SD1 checkpoint."""
    sd_model = FakeLDM(sd1_checkpoint)
    calls: dict[str, list] = {"progress": [], "refresh": [], "restore": [], "callbacks": {}}

    class State:
        interrupted = stopping_generation = False
        job = ""
        job_count = job_no = sampling_step = sampling_steps = 0
        textinfo = None

        def begin(self, job="(unknown)"):
            self.job, self.interrupted, self.stopping_generation = job, False, False

        def end(self):
            self.job, self.job_count = "", 0

        def interrupt(self):
            self.interrupted = True

    class OptionInfo:
        def __init__(self, default=None, label="", component=None, component_args=None, onchange=None,
                     section=None, **_):
            self.default, self.label, self.section = default, label, section

    opts = types.SimpleNamespace(data={}, sd_model_checkpoint="tiny.safetensors")
    opts.add_option = lambda key, info: opts.data.setdefault(key, info.default)
    shared = types.SimpleNamespace(sd_model=sd_model, state=State(), opts=opts, OptionInfo=OptionInfo,
                                   cmd_opts=types.SimpleNamespace(lora_dir=str(tmp_path / "Lora"), lowvram=False,
                                                                  api_auth=None))
    modules = {
        "shared": shared,
        "call_queue": types.SimpleNamespace(queue_lock=threading.Lock()),
        "progress": types.SimpleNamespace(
            add_task_to_queue=lambda task: calls["progress"].append(("queued", task)),
            start_task=lambda task: calls["progress"].append(("start", task)),
            finish_task=lambda task: calls["progress"].append(("finish", task))),
        "devices": types.SimpleNamespace(device=torch.device("cpu"), cpu=torch.device("cpu"), dtype_unet=torch.float32,
                                         dtype_vae=torch.float32, autocast=nullcontext, torch_gc=lambda: None),
        "lowvram": types.SimpleNamespace(is_enabled=lambda model: False, send_everything_to_cpu=lambda: None),
        "sd_models": types.SimpleNamespace(model_data=types.SimpleNamespace(sd_model=sd_model)),
        "paths": types.SimpleNamespace(script_path=str(tmp_path / "webui"), models_path=str(tmp_path / "models")),
        "paths_internal": types.SimpleNamespace(default_output_dir=str(tmp_path / "outputs")),
        "script_callbacks": types.SimpleNamespace(**{
            name: _recorder(calls["callbacks"], name) for name in ("on_ui_tabs", "on_ui_settings", "on_app_started")}),
    }
    package = types.ModuleType("modules")
    monkeypatch.setitem(sys.modules, "modules", package)
    for name, module in modules.items():
        setattr(package, name, module)
        monkeypatch.setitem(sys.modules, f"modules.{name}", module)

    def restore_from_backup(module):
        """As the WebUI's networks.restore_weights_backup: a plain in-place copy into the parameter itself, which
        autograd refuses for a parameter that requires grad unless grad mode is off."""
        calls["restore"].append(module)
        module.weight.copy_(module.network_weights_backup)

    networks = types.SimpleNamespace(loaded_networks=["stale"], network_restore_weights_from_backup=restore_from_backup,
                                     list_available_networks=lambda: calls["refresh"].append(True))
    monkeypatch.setitem(sys.modules, "networks", networks)
    from lora_trainer.hosts import a1111

    monkeypatch.setattr(a1111, "_trainer", None)
    data = make_dataset(tmp_path / "data")
    (data / "img0.txt").write_text("a very long caption, " * 40, encoding="utf-8")  # two 75-token chunks
    return types.SimpleNamespace(a1111=a1111, shared=shared, sd_model=sd_model, calls=calls, networks=networks,
                                 data=data, lora_dir=tmp_path / "Lora")


def _config(webui, **extra) -> dict:
    return {"train_data_dir": str(webui.data), "output_name": "webui_lora", "resolution": 64, "batch_size": 2,
            "max_steps": 3, "lora_rank": 4, "learning_rate": 1e-3, "save_every_n_epochs": 0,
            "log_every_n_steps": 1, "max_token_length": 150, **extra}


def _merge_a_lora(sd_model) -> torch.nn.Module:
    """What the WebUI's Lora extension leaves after a render with <lora:...>: a weight changed in place, a backup."""
    layer = sd_model.model.diffusion_model.get_submodule("input_blocks.1.1.transformer_blocks.0.attn1.to_q")
    layer.network_weights_backup = layer.weight.detach().clone()
    layer.network_current_names = (("some_lora", 1.0, 1.0, None),)
    with torch.no_grad():
        layer.weight += 0.5
    return layer


def test_register_adds_the_tab_settings_and_routes(webui):
    pytest.importorskip("gradio")
    from fastapi import FastAPI

    webui.a1111.register()
    callbacks = webui.calls["callbacks"]
    assert set(callbacks) == {"on_ui_tabs", "on_ui_settings", "on_app_started"}
    (blocks, title, elem_id), = callbacks["on_ui_tabs"]()
    assert (title, elem_id) == ("LoRA Train", "lora_trainer") and blocks is not None
    callbacks["on_ui_settings"]()
    assert {"lora_trainer_output_dir", "lora_trainer_unload_encoders", "lora_trainer_save_every_n_steps"} <= \
        set(webui.shared.opts.data)
    app = FastAPI()
    callbacks["on_app_started"](None, app)
    assert {"/lora_trainer/train", "/lora_trainer/status", "/lora_trainer/interrupt", "/lora_trainer/results"} <= \
        {route.path for route in app.routes}
    assert "tiny" in webui.a1111.WebUIHost().model_line()


def test_trains_on_the_loaded_model_and_leaves_it_as_it_was(webui):
    sd_model = webui.sd_model
    clean = _unet_hash(sd_model)
    layer = _merge_a_lora(sd_model)
    flags = {n: p.requires_grad for n, p in sd_model.named_parameters()}
    trainer = webui.a1111.trainer()
    job = trainer.start(_config(webui))
    trainer.wait(300)
    assert job.state == "done", job.message
    assert Path(job.lora_file) == webui.lora_dir / "webui_lora.safetensors"
    assert Path(job.saved[-1]).parent == webui.lora_dir.parent / "outputs" / "lora_trainer" / "webui_lora"
    assert _unet_hash(sd_model) == clean  # the merged LoRA was undone, and training wrote nothing
    assert set(webui.calls["restore"]) == {layer} and layer.network_current_names == ()  # before training, after publishing
    assert webui.networks.loaded_networks == [] and webui.calls["refresh"]  # listed in the Lora tab
    assert {n: p.requires_grad for n, p in sd_model.named_parameters()} == flags
    assert all(p.device.type == "cpu" for p in sd_model.parameters())
    task = f"task(lora_trainer-{job.id})"
    assert webui.calls["progress"] == [("queued", task), ("start", task), ("finish", task)]
    state = webui.shared.state
    assert state.sampling_steps == 3 and state.sampling_step == 3 and "LoRA Train" in state.textinfo
    assert not webui.a1111.trainer().host.training

    from lora_trainer.lora.kohya import read_lora_file

    tensors, metadata = read_lora_file(job.lora_file)
    assert metadata["ss_base_model_version"] == "sd_v1" and metadata["ss_sd_model_name"] == "tiny"
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight" in tensors


def test_the_webuis_interrupt_stops_training_and_keeps_the_lora_so_far(webui):
    trainer = webui.a1111.trainer()
    host = trainer.host
    original = host.run

    def run(config, listeners, cancel, job_id=""):
        def press_interrupt(event):
            if event.kind == "progress" and event.step == 2 and "phase" not in event.data:
                webui.shared.state.interrupt()  # what the Interrupt button and /sdapi/v1/interrupt do
        return original(config, [press_interrupt, *listeners], cancel, job_id)

    host.run = run
    clean = _unet_hash(webui.sd_model)
    job = trainer.start(_config(webui, max_steps=8))
    trainer.wait(300)
    assert job.state == "interrupted" and job.step < 8, job.message
    assert Path(job.lora_file).name.startswith("webui_lora-step") and Path(job.lora_file).is_file()
    assert _unet_hash(webui.sd_model) == clean


def test_a_failed_run_leaves_the_model_as_it_was(webui):
    clean = _unet_hash(webui.sd_model)
    devices_before = {n: p.device for n, p in webui.sd_model.named_parameters()}
    webui.sd_model.fail_on = "picture 2"
    trainer = webui.a1111.trainer()
    job = trainer.start(_config(webui))
    trainer.wait(300)
    assert job.state == "error" and "text encoder exploded" in job.message
    assert _unet_hash(webui.sd_model) == clean
    assert {n: p.device for n, p in webui.sd_model.named_parameters()} == devices_before
    assert not list(webui.lora_dir.glob("*.safetensors")) if webui.lora_dir.exists() else True
    assert webui.calls["progress"][-1][0] == "finish" and webui.shared.state.job == ""


def test_lowvram_is_refused_with_a_message(webui):
    webui.shared.cmd_opts.lowvram = True
    trainer = webui.a1111.trainer()
    job = trainer.start(_config(webui))
    trainer.wait(60)
    assert job.state == "error" and "--lowvram" in job.message and "--medvram" in job.message


def test_a_second_job_is_refused_while_one_runs(webui):
    from lora_trainer.jobs import BusyError

    trainer = webui.a1111.trainer()
    queue_lock = sys.modules["modules.call_queue"].queue_lock
    with queue_lock:  # the WebUI is busy rendering: the job waits for the queue
        job = trainer.start(_config(webui))
        with pytest.raises(BusyError, match="already running"):
            trainer.start(_config(webui))
        assert job.state == "waiting"
    trainer.wait(300)
    assert job.state == "done", job.message


def test_fit_chunks_pads_with_the_empty_prompt_and_truncates():
    from lora_trainer.hosts.a1111 import _fit_chunks

    empty = torch.zeros(1, 77, 8)
    one = torch.ones(2, 77, 8)
    padded = _fit_chunks(one, 2, empty)
    assert padded.shape == (2, 154, 8) and padded[:, 77:].abs().sum() == 0
    assert _fit_chunks(torch.ones(1, 231, 8), 2, empty).shape == (1, 154, 8)


def test_sample_images_come_from_the_webuis_encoders_and_the_trained_unet(webui):
    from PIL import Image

    trainer = webui.a1111.trainer()
    clean = _unet_hash(webui.sd_model)
    job = trainer.start(_config(webui, max_steps=4, sample_prompts=["a cat", "an owl"], sample_every_n_steps=2,
                                sample_steps=3))
    trainer.wait(300)
    assert job.state == "done", job.message
    assert len(job.samples) == 4  # two prompts at steps 2 and 4
    with Image.open(job.samples[-1]) as image:
        assert image.size == (64, 64) and len(set(image.getdata())) > 1
    assert _unet_hash(webui.sd_model) == clean

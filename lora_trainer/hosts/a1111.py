"""Stable Diffusion WebUI adapter (AUTOMATIC1111 1.10, Forge): the "LoRA Train" tab on the loaded checkpoint.

`scripts/lora_trainer_tab.py` calls `register()` when the WebUI imports it. Everything that touches the
WebUI's model happens later, in the training thread, under the WebUI's queue lock:
- the loaded UNet's tensors are shared with the trainer's diffusers skeleton (no second copy) and never
  written; LoRAs the WebUI merged into them in place are restored first;
- captions and images are encoded by the WebUI's own text encoder (its tokenizer, clip skip, emphasis)
  and VAE, then those can leave the GPU while the UNet trains, and go back after;
- the WebUI's progress bar, Interrupt button and /sdapi interrupt stop the run, which keeps its last save;
- the LoRA is written atomically into the Lora folder and listed without a restart.
The module keeps the job runner, so a "Reload UI" (which re-runs scripts/) does not lose a running job.
"""

from __future__ import annotations

import dataclasses
import logging
import sys
from pathlib import Path
from typing import Any

import torch

from lora_trainer.config import TrainConfig
from lora_trainer.errors import HostError
from lora_trainer.events import CancelToken, Event, Listener
from lora_trainer.forms import FieldSpec, form_specs
from lora_trainer.jobs import BusyError, Trainer

log = logging.getLogger(__name__)

TAB = ("LoRA Train", "lora_trainer")
SECTION = ("lora_trainer", "LoRA Trainer")
PROGRESS_JS = "(task) => { loraTrainerProgress(task, 'lora_trainer_progress'); return [task]; }"
# the Test button's inputs end with its hidden task box (the WebUI tab has no base-model box after it)
TEST_PROGRESS_JS = ("(...args) => { const task = 'task(lora_trainer-test-' + Date.now() + ')'; "
                    "args[args.length - 1] = task; loraTrainerProgress(task, 'lora_trainer_test_progress'); "
                    "return args; }")
SETTINGS = ("save_every_n_steps", "sample_every_n_steps")  # config keys whose form default is a WebUI setting
_trainer: Trainer | None = None


def register() -> None:
    """Hook the tab, the settings and the API routes into the WebUI (import time; touches no model)."""
    from modules import script_callbacks

    script_callbacks.on_ui_tabs(on_ui_tabs)
    script_callbacks.on_ui_settings(on_ui_settings)
    script_callbacks.on_app_started(on_app_started)


def trainer() -> Trainer:
    """The one job runner of this WebUI process."""
    global _trainer
    if _trainer is None:
        _trainer = Trainer(WebUIHost())
    return _trainer


def on_ui_tabs():
    from lora_trainer.ui.blocks import build_blocks

    job_runner = trainer()
    return [(build_blocks(job_runner.host, job_runner), *TAB)]


def on_ui_settings() -> None:
    from modules import shared

    options = {
        "lora_trainer_output_dir": shared.OptionInfo(
            "", "Folder for LoRA training checkpoints and logs (empty: outputs/lora_trainer)", section=SECTION),
        "lora_trainer_unload_encoders": shared.OptionInfo(
            True, "Move the VAE and text encoder off the GPU while the UNet trains (they go back after)",
            section=SECTION),
    }
    specs = form_specs(TrainConfig)
    options.update({f"lora_trainer_{name}": _setting(specs[name]) for name in SETTINGS})
    for key, info in options.items():
        shared.opts.add_option(key, info)


def _setting(spec: FieldSpec):
    """A settings-page option holding a whole-number key's default in the tab, drawn from its form spec."""
    from modules import shared

    # the WebUI makes a number box for an int default; the arguments give it the key's bounds
    return shared.OptionInfo(spec.default, f"Default for {spec.label}: {spec.help}", section=SECTION,
                             component_args={"precision": 0, "minimum": spec.min, "maximum": spec.max})


def on_app_started(_demo, app) -> None:
    from lora_trainer.ui.api import register_api

    register_api(app, trainer(), dependencies=_api_auth())


def _api_auth() -> list:
    """The WebUI's --api-auth, applied to our routes as the WebUI applies it to /sdapi/ (HTTP basic)."""
    from modules import shared

    credentials = getattr(shared.cmd_opts, "api_auth", None)
    if not credentials:
        return []
    import secrets

    from fastapi import Depends, HTTPException
    from fastapi.security import HTTPBasic, HTTPBasicCredentials

    users = dict(item.split(":", 1) for item in credentials.split(",") if ":" in item)
    basic = HTTPBasic()

    def check(given: HTTPBasicCredentials = Depends(basic)) -> bool:  # noqa: B008 - FastAPI's idiom
        expected = users.get(given.username)
        if expected is not None and secrets.compare_digest(given.password, expected):
            return True
        raise HTTPException(status_code=401, detail="Incorrect username or password",
                            headers={"WWW-Authenticate": "Basic"})

    return [Depends(check)]


def _opt(name: str, default: Any) -> Any:
    from modules import shared

    return getattr(shared.opts, "data", {}).get(name, default)


class WebUIHost:
    """What the tab and the job runner need from the WebUI."""

    needs_base_model = False
    can_send_to_txt2img = True
    progress_js = PROGRESS_JS
    test_progress_js = TEST_PROGRESS_JS
    # the model is the loaded one, and its text encoder is the WebUI's (with the WebUI's own clip skip setting)
    hidden_keys = ("family", "prediction_type", "allow_pickle", "clip_skip", "train_text_encoder", "text_encoder_lr",
                   "device", "base_weights", "stream_blocks", "fp8_compute")

    def __init__(self) -> None:
        self.training = False

    def model_line(self) -> str:
        from modules import sd_models, shared

        loaded = getattr(sd_models.model_data, "sd_model", None)  # reading shared.sd_model would load one
        name = getattr(getattr(loaded, "sd_checkpoint_info", None), "name_for_extra", None) or \
            str(getattr(shared.opts, "sd_model_checkpoint", "") or "the checkpoint selected at the top")
        family = _family(loaded) if loaded is not None and _is_loaded(loaded) else None
        kind = f" ({family.upper()})" if family else ""
        return f"**LoRA Train** on the loaded checkpoint: `{name}`{kind}. Finished LoRAs go to `{self.lora_dir()}`."

    def default_values(self) -> dict[str, Any]:
        specs = form_specs(TrainConfig)
        return {name: _opt(f"lora_trainer_{name}", specs[name].default) for name in SETTINGS}

    def lora_dir(self) -> Path:
        from modules import paths, shared

        return Path(getattr(shared.cmd_opts, "lora_dir", None) or Path(paths.models_path) / "Lora")

    def prepare(self, values: dict[str, Any]) -> dict[str, Any]:
        from modules import devices

        values = {k: v for k, v in values.items() if k != "base_model"}
        if not str(values.get("output_dir", "")).strip():
            values["output_dir"] = str(Path(_opt("lora_trainer_output_dir", "") or _output_root()) / values["output_name"])
        values["device"] = str(devices.device)
        if values.get("mixed_precision", "auto") == "auto":
            # train in the dtype the WebUI keeps the UNet in, so its tensors are shared, not copied
            values["mixed_precision"] = {torch.float16: "fp16", torch.bfloat16: "bf16"}.get(devices.dtype_unet, "no")
        return values

    def memory_plan(self, config: TrainConfig) -> str:
        """The memory plan of `config` on the loaded model, read where it is (nothing moves, nothing is restored)."""
        from modules import devices, shared

        from lora_trainer.backbones import memory_report
        from lora_trainer.backbones.host import HostBackbone
        from lora_trainer.memory.plan import free_memory

        sd_model = shared.sd_model
        if not _is_loaded(sd_model):
            raise HostError("No model is loaded: pick one in the WebUI's checkpoint list first.")
        objects = getattr(sd_model, "forge_objects", None)
        unet = objects.unet.model.diffusion_model if objects is not None else sd_model.model.diffusion_model
        device = devices.device if isinstance(devices.device, torch.device) else torch.device(devices.device)
        return memory_report(config, free_memory(device) if device.type == "cuda" else None,
                             HostBackbone.for_plan(unet.state_dict(), _family(sd_model)))

    def run(self, config: TrainConfig, listeners: list[Listener], cancel: CancelToken, job_id: str = ""):
        from modules import call_queue, progress, shared

        from lora_trainer.train.loop import train_lora

        task = f"task(lora_trainer-{job_id})"
        progress.add_task_to_queue(task)
        with call_queue.queue_lock:
            shared.state.begin(job=task)
            progress.start_task(task)
            self.training = True
            try:
                backbone, restore, model_file = webui_backbone(config)
                try:
                    config = dataclasses.replace(config, base_model=model_file)
                    return train_lora(config, backbone=backbone, cancel=cancel,
                                      listeners=[*listeners, _state_listener(cancel)])
                finally:
                    restore()
            finally:
                self.training = False
                progress.finish_task(task)
                shared.state.end()

    def run_exclusive(self, work, task: str = ""):
        """Captioning and test renders: refused while training, else under the WebUI's queue lock.

        `task` is the id the page's progress bar polls (the WebUI's /internal/progress).
        """
        from modules import call_queue, progress, shared

        if self.training:
            raise BusyError("A LoRA is training; captioning and test renders wait until it ends.")
        if task:
            progress.add_task_to_queue(task)
        with call_queue.queue_lock:
            shared.state.begin(job=task or "lora_trainer")
            if task:
                progress.start_task(task)
            try:
                return work()
            finally:
                if task:
                    progress.finish_task(task)
                shared.state.end()

    def publish(self, lora_file: Path, name: str) -> Path:
        from modules import call_queue, shared

        from lora_trainer.lora.kohya import publish_lora

        target = publish_lora(lora_file, self.lora_dir(), name)
        networks = sys.modules.get("networks")  # the built-in Lora extension
        with call_queue.queue_lock:
            if networks is not None:
                forget_merged_loras(networks, getattr(shared.sd_model, "model", None))
                if hasattr(networks, "load_lora_state_dict") and hasattr(networks.load_lora_state_dict, "cache_clear"):
                    networks.load_lora_state_dict.cache_clear()  # Forge caches LoRA files by name
                networks.list_available_networks()
            if hasattr(shared.sd_model, "current_lora_hash"):
                _forget_forge_loras(shared.sd_model)
                # Forge's LoraLoader (one per model, shared by all patcher clones) skips the merge when the
                # (file, strengths) key equals the last one: a retrained file of the same name would keep the
                # old merged weights
                original = getattr(shared.sd_model, "forge_objects_original", None)
                for patcher in (getattr(original, "unet", None), getattr(getattr(original, "clip", None), "patcher", None)):
                    loader = getattr(patcher, "lora_loader", None)
                    if loader is not None:
                        loader.loaded_hash = str([])
        return target

    def test_grid(self, name: str, prompt: str, negative: str, weights: list[float], seed: int, steps: int, *,
                  size: int = 0, base_model: str = ""):
        """The same prompt and seed through the WebUI's own txt2img, once per strength, at the size the LoRA
        was trained at unless `size` says otherwise."""
        from contextlib import closing

        from modules import processing, shared

        from lora_trainer.config import PRESETS, safe_name
        from lora_trainer.ui.render import labelled_grid, trained_size

        lora_file = self.lora_dir() / f"{safe_name(name)}.safetensors"
        if not lora_file.is_file():
            raise HostError(f"No LoRA {lora_file.name} in {self.lora_dir()}: pick one from the list.")
        size = (size or trained_size(lora_file) or PRESETS[_family(shared.sd_model)]["resolution"]) // 8 * 8
        images = []
        for weight in weights:
            p = processing.StableDiffusionProcessingTxt2Img(
                sd_model=shared.sd_model, prompt=f"{prompt} <lora:{safe_name(name)}:{weight:g}>",
                negative_prompt=negative, seed=seed, steps=steps, width=size, height=size, cfg_scale=7.0,
                sampler_name="Euler", batch_size=1, n_iter=1, do_not_save_samples=True, do_not_save_grid=True,
                # no live previews: SDXL's preview decoder is a download the WebUI makes on first use
                override_settings={"live_previews_enable": False})
            with closing(p):
                images.append(processing.process_images(p).images[0])
        return labelled_grid(images, [f"strength {w:g}" for w in weights])


def _output_root() -> Path:
    """<data dir>/outputs/lora_trainer: where the WebUI writes its own outputs (it follows --data-dir)."""
    try:
        from modules.paths_internal import default_output_dir
    except ImportError:  # WebUIs before 1.6
        from modules import paths

        default_output_dir = str(Path(paths.script_path) / "outputs")
    return Path(default_output_dir) / "lora_trainer"


def _is_loaded(sd_model) -> bool:
    """Forge keeps a placeholder in shared.sd_model until the first generation."""
    return hasattr(sd_model, "forge_objects") or hasattr(sd_model, "model")


def _family(sd_model) -> str:
    if getattr(sd_model, "is_sdxl", False) and "Refiner" not in type(sd_model).__name__:
        return "sdxl"
    if getattr(sd_model, "is_sd2", False):
        return "sd2"
    if getattr(sd_model, "is_sd1", False) or (not getattr(sd_model, "is_sd3", False) and
                                              not getattr(sd_model, "is_sdxl", False) and
                                              hasattr(getattr(sd_model, "model", None), "diffusion_model")):
        return "sd1"
    raise HostError(f"The loaded checkpoint is a {type(sd_model).__name__}; LoRA Train trains SD1.x, SD2.x and "
                    "SDXL base models. Load one of those at the top of the WebUI.")


def forget_merged_loras(networks, root: torch.nn.Module | None) -> int:
    """Undo the LoRAs the WebUI merged into the model's weights in place; the count of modules restored.

    The next render re-applies whatever its prompt asks for (from the file on disk, so a retrained LoRA of
    the same name is not served from the old merge).
    """
    networks.loaded_networks.clear()
    restored = 0
    # the WebUI's restore copies into parameters that keep requires_grad=True: in place, that is only allowed
    # without autograd (whatever grad mode the calling thread is in)
    with torch.no_grad():
        for module in root.modules() if root is not None else ():
            if getattr(module, "network_weights_backup", None) is not None or \
                    getattr(module, "network_bias_backup", None) is not None:
                networks.network_restore_weights_from_backup(module)
                restored += 1
            if hasattr(module, "network_current_names"):
                module.network_current_names = ()
    return restored


def _fit_chunks(hidden: torch.Tensor, chunks: int, empty: torch.Tensor) -> torch.Tensor:
    """The WebUI encodes long prompts as 77-token chunks: make every caption `chunks` long (pad with the empty
    prompt's chunk, as the WebUI pads a batch) so captions of different lengths batch together."""
    have = hidden.shape[1] // 77
    if have > chunks:
        return hidden[:, :77 * chunks]
    if have < chunks:
        return torch.cat([hidden, empty.expand(hidden.shape[0], -1, -1).repeat(1, chunks - have, 1)], dim=1)
    return hidden


def webui_backbone(config: TrainConfig):
    """(HostBackbone over the loaded model, a function that puts everything back, the checkpoint's path)."""
    from modules import devices, shared

    from lora_trainer.backbones import weights_identity
    from lora_trainer.backbones.host import HostBackbone

    if getattr(shared.cmd_opts, "lowvram", False):
        raise HostError("--lowvram keeps the UNet in pieces off the GPU, and training needs all of it there. "
                        "Start the WebUI with --medvram (or neither) to train.")
    sd_model = shared.sd_model
    forge = hasattr(sd_model, "forge_objects") or type(sd_model).__name__ == "FakeInitialModel"
    if forge:
        sd_model, unet = _forge_unet()
    else:
        unet = sd_model.model.diffusion_model
        networks = sys.modules.get("networks")
        if networks is not None:
            restored = forget_merged_loras(networks, sd_model)
            if restored:
                log.info("LoRA Train: restored %d layers the WebUI had merged a LoRA into", restored)
        from modules import lowvram

        if lowvram.is_enabled(sd_model):
            lowvram.send_everything_to_cpu()  # --medvram: the training copy of the UNet gets the GPU to itself
    family = _family(sd_model)
    info = sd_model.sd_checkpoint_info
    encoders = [m for m in (getattr(sd_model, "conditioner", None) or getattr(sd_model, "cond_stage_model", None),
                            getattr(sd_model, "first_stage_model", None)) if isinstance(m, torch.nn.Module)]
    places = [(m, next(m.parameters()).device) for m in encoders if any(True for _ in m.parameters())]
    chunks = config.max_token_length // 75

    def encode_images(pixels: torch.Tensor) -> torch.Tensor:
        """The VAE's latents as the trainer's own VAE path takes them: the posterior's mean where the WebUI hands a
        distribution (SD1/SD2), else its draw (SDXL's encoder samples) from a seeded generator, so that two runs on
        the same images cache the same latents (and validation losses compare across runs); the WebUI's random
        state is left as it was."""
        on_gpu = [devices.device] if torch.device(devices.device).type == "cuda" else []
        with torch.no_grad(), devices.autocast(), torch.random.fork_rng(devices=on_gpu):
            torch.manual_seed(0)
            encoded = sd_model.encode_first_stage(pixels.to(devices.device, devices.dtype_vae))
            if not isinstance(encoded, torch.Tensor):  # LDM's DiagonalGaussianDistribution (SDXL's is a tensor)
                encoded = encoded.mode()
            latents = sd_model.get_first_stage_encoding(encoded)
        return latents.float().clone()  # Forge returns inference tensors

    def encode_raw(prompts: list[str]):
        with torch.no_grad(), devices.autocast():
            cond = sd_model.get_learned_conditioning(prompts)
        if isinstance(cond, dict):
            return cond["crossattn"].float().clone(), cond["vector"].float().clone()
        return cond.float().clone(), None

    empty_hidden, empty_vector = encode_raw([""])
    # SDXL's vector is the pooled text embedding + 6 size embeddings of 256; the skeleton adds sizes per image
    pooled_dim = empty_vector.shape[1] - 6 * 256 if empty_vector is not None else None

    def encode_prompts(prompts: list[str]) -> dict[str, torch.Tensor]:
        hidden, vector = encode_raw(prompts)
        out = {"hidden": _fit_chunks(hidden, chunks, empty_hidden[:, :77].to(hidden.device))}
        if vector is not None:
            out["pooled"] = vector[:, :pooled_dim]
        return out

    def decode_images(latents: torch.Tensor) -> torch.Tensor:
        with torch.no_grad(), devices.autocast():
            return sd_model.decode_first_stage(latents.to(devices.device, devices.dtype_vae)).float().clone()

    def release() -> None:
        if _opt("lora_trainer_unload_encoders", True):
            for module, _ in places:
                module.to(devices.cpu)
            devices.torch_gc()

    def restore() -> None:
        for module, device in places:
            module.to(device)

    if forge:
        prediction = getattr(sd_model.forge_objects.unet.model.predictor, "prediction_type", "epsilon")
    else:
        prediction = "v_prediction" if getattr(sd_model, "parameterization", "eps") == "v" else "epsilon"
    unet_sd = unet.state_dict()
    vae = getattr(sd_model, "first_stage_model", None)  # names the latent cache's encoder
    encoder_id = weights_identity(vae) if isinstance(vae, torch.nn.Module) else str(getattr(info, "filename", ""))
    backbone = HostBackbone.from_ldm_unet(unet_sd, family, encode_images=encode_images, encode_prompts=encode_prompts,
                                          pooled_dim=pooled_dim, prediction_type=prediction,
                                          name=getattr(info, "name_for_extra", None) or "WebUI model", release=release,
                                          decode_images=decode_images, encoder_id=encoder_id,
                                          zero_terminal_snr=prediction == "v_prediction" and
                                          _opt("sd_noise_schedule", "Default") == "Zero Terminal SNR")
    return backbone, restore, str(getattr(info, "filename", ""))


def _forge_unet():
    """Forge: the loaded model and its clean UNet, with its inference-mode tensors made trainable in place.

    Forge loads weights under torch.inference_mode(), and autograd cannot save such tensors for backward.
    Each Parameter is replaced by an ordinary one with the same values, one tensor at a time (never a
    second copy of the UNet); Forge renders with them exactly as before.
    """
    from backend import memory_management
    from modules import sd_models

    sd_model, _ = sd_models.forge_model_reload()
    original = sd_model.forge_objects_original
    patcher = original.unet
    memory_management.unload_all_models()
    # Forge merges a render's LoRAs into the shared modules' weights and leaves them there (unloading only moves
    # the modules): refreshing the LoRA-free patchers restores the backed-up checkpoint weights of UNet and CLIP
    patcher.refresh_loras()
    original.clip.patcher.refresh_loras()
    sd_model.forge_objects = original.shallow_copy()  # captions are encoded with the LoRA-free text encoder
    _forget_forge_loras(sd_model)
    diffusion_model = patcher.model.diffusion_model
    with torch.inference_mode(False):
        for module in diffusion_model.modules():
            for key, param in list(module._parameters.items()):
                if param is not None and param.is_inference():
                    module._parameters[key] = torch.nn.Parameter(param.detach().clone(), requires_grad=False)
    return sd_model, diffusion_model


def _forget_forge_loras(sd_model) -> None:
    """Make Forge rebuild its LoRA-applied model on the next render.

    Forge keeps the last render's LoRA-patched objects in `forge_objects_after_applying_lora` and skips the rebuild
    while the prompt's LoRA list hashes to `current_lora_hash`; a render without LoRAs then copies that stale
    object back in and draws with the last LoRA. Start both over from the LoRA-free objects, with a hash that no
    prompt's list has.
    """
    sd_model.forge_objects_after_applying_lora = sd_model.forge_objects_original.shallow_copy()
    sd_model.current_lora_hash = "lora_trainer: rebuild"


def _state_listener(cancel: CancelToken) -> Listener:
    """The engine's events into shared.state (the WebUI's progress bar and ETA) and its Interrupt into ours."""
    from modules import shared

    def on_event(event: Event) -> None:
        state = shared.state
        if state.interrupted or getattr(state, "stopping_generation", False):
            cancel.set()
        if event.kind == "progress" and event.data.get("phase") == "caching":
            state.textinfo = f"LoRA Train: encoding images {event.step}/{event.total}"
        elif event.kind == "progress":
            state.job_count, state.job_no = 1, 0
            state.sampling_steps, state.sampling_step = event.total, event.step
            loss = event.data.get("loss")
            state.textinfo = f"LoRA Train: step {event.step}/{event.total}" + \
                (f", loss {loss:.4f}" if loss is not None else "")

    return on_event

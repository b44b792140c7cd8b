"""ComfyUI node pack: caption a folder, make a dataset, check a run's memory, train a LoRA on the graph's
MODEL/CLIP/VAE, test it.

The nodes are thin: they turn ComfyUI's objects into the engine's (a HostBackbone sharing the loaded
UNet, the graph's own VAE and CLIP for encoding) and the engine's events into ComfyUI's progress bar,
interrupt and the text under a running node. ComfyUI modules are imported inside the functions, so this
file imports anywhere.
"""

from __future__ import annotations

import logging
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from itertools import count
from pathlib import Path

import numpy as np
import torch
import yaml
from PIL import Image

from lora_trainer.config import CaptionConfig, TrainConfig, lora_name, make_config, renamed_note, step_name
from lora_trainer.errors import DatasetError, HostError
from lora_trainer.forms import config_values, form_specs

log = logging.getLogger(__name__)

CATEGORY = "LoRA Trainer"
DATASET = "LORA_TRAINER_DATASET"
FAMILIES = (("SDXL", "sdxl"), ("SD20", "sd2"), ("SD15", "sd1"))  # comfy.supported_models classes, subclasses too
TRAIN_WIDGETS = ("max_steps", "lora_rank", "lora_alpha", "learning_rate", "batch_size", "lora_targets", "optimizer",
                 "lr_scheduler", "seed", "save_every_n_steps")
# after 'advanced', as optional inputs: workflows saved before them keep their widget values in place
VALIDATION_WIDGETS = ("validation_split", "use_best")
DATASET_WIDGETS = ("resolution", "enable_buckets", "repeats", "trigger_word", "shuffle_captions", "keep_tokens",
                   "caption_dropout", "flip_aug")


def _widget(cls: type, name: str) -> tuple:
    """A ComfyUI input spec of a config field's form spec: its type, bounds, default and tooltip."""
    spec = form_specs(cls)[name]
    options = {"tooltip": spec.help, "default": spec.default}
    if spec.kind == "choice":  # the default is given: without one the frontend picks the first choice
        return (list(spec.choices), options)
    if spec.kind == "bool":
        return ("BOOLEAN", options)
    if spec.kind in ("text", "lines"):
        return ("STRING", {**options, "multiline": spec.kind == "lines"})
    options.update(min=spec.min, max=spec.max)
    if spec.kind == "float":
        options["step"] = 1e-5 if name.endswith("learning_rate") else 0.01
    return ("INT" if spec.kind == "int" else "FLOAT", options)


def _fixed_seed(spec: tuple) -> tuple:
    """A seed input whose "control after generate" widget starts at fixed, so queuing again repeats the run.

    The frontend gives every INT input named seed that widget, starting at "randomize" unless the spec names
    another mode; older frontends (1.27, which ComfyUI 0.3.64 ships) ignore the mode and start at randomize.
    """
    kind, options = spec
    tooltip = (options["tooltip"] + " Keep 'control after generate' at fixed: randomize (where older ComfyUI "
               "frontends start it) picks a new seed, so a different LoRA, each time you queue.")
    return (kind, {**options, "tooltip": tooltip, "control_after_generate": "fixed"})


def _values(names: tuple[str, ...], given: dict) -> dict:
    """The named widgets' values as config values."""
    return config_values({k: v for k, v in given.items() if k in names})


def _input_folder(folder: str) -> str:
    """A folder as ComfyUI's own loaders read it: a relative one lies in ComfyUI's input folder."""
    import folder_paths

    typed = Path(folder.strip()).expanduser()
    if not folder.strip():
        raise DatasetError("Set 'folder' to the folder of training images: a folder inside ComfyUI's input "
                           "folder, or a full path.")
    path = typed if typed.is_absolute() else Path(folder_paths.get_input_directory()) / typed
    if not path.is_dir():
        where = "" if typed.is_absolute() else " (a relative folder is read from ComfyUI's input folder)"
        raise DatasetError(f"No folder {folder.strip()!r}: looked for {path}{where}. Put the images there or "
                           "give the full path.")
    return str(path)


class CaptionFolder:
    """Caption every image of a folder with BLIP (keeps existing captions unless told otherwise)."""

    CATEGORY = CATEGORY
    FUNCTION = "caption"
    OUTPUT_NODE = True
    RETURN_TYPES = ("INT", "STRING")
    RETURN_NAMES = ("captioned", "preview")
    DESCRIPTION = "Writes a BLIP caption beside each image of the folder (or into metadata.csv/jsonl)."

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {"folder": ("STRING", {"default": "", "tooltip": "Folder of training images."}),
                             "prefix": _widget(CaptionConfig, "prefix"),
                             "existing": _widget(CaptionConfig, "existing"),
                             "output": _widget(CaptionConfig, "output"),
                             "model": _widget(CaptionConfig, "model")},
                "optional": {"prompt": _widget(CaptionConfig, "prompt"),
                             "num_beams": _widget(CaptionConfig, "num_beams"),
                             "batch_size": _widget(CaptionConfig, "batch_size")}}

    @classmethod
    def IS_CHANGED(cls, **_) -> float:
        """Never served from ComfyUI's cache: the captions on disk change under it."""
        return float("nan")

    def caption(self, folder: str, **options) -> tuple[int, str]:
        import comfy.utils

        from lora_trainer.caption import caption_folder, list_captions

        folder = _input_folder(folder)
        config = make_config(options, CaptionConfig)
        bar = comfy.utils.ProgressBar(1)
        result = caption_folder(folder, config, listeners=[lambda e: e.kind == "progress" and
                                                           bar.update_absolute(e.step, e.total)])
        preview = "\n".join(f"{p.name}: {c}" for p, c in list_captions(folder, config.caption_extension)[:20])
        return len(result.captioned), preview


class DatasetFromFolder:
    """A training set from a folder of images with captions (sidecars, metadata files, N_name folders)."""

    CATEGORY = CATEGORY
    FUNCTION = "make"
    RETURN_TYPES = (DATASET,)
    RETURN_NAMES = ("dataset",)
    DESCRIPTION = "Checks the folder (lists unusable images) and passes it to Train LoRA."

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        required = {"folder": ("STRING", {"default": "", "tooltip": "Folder of training images with captions."})}
        required.update({name: _widget(TrainConfig, name) for name in DATASET_WIDGETS})
        return {"required": required}

    def make(self, folder: str, **options) -> tuple[dict]:
        from lora_trainer.data import scan_dataset

        folder = _input_folder(folder)
        values = {"train_data_dir": folder, **_values(DATASET_WIDGETS, options)}
        make_config(values)  # refuses bad values with the key's name
        scan = scan_dataset(folder, trigger_word=values.get("trigger_word", ""), missing_caption="trigger")
        log.info("LoRA Trainer dataset: %s", scan.summary())
        return (values,)


class DatasetFromImages:
    """A training set from an IMAGE batch and its captions (one per line, or one for all)."""

    CATEGORY = CATEGORY
    FUNCTION = "make"
    RETURN_TYPES = (DATASET,)
    RETURN_NAMES = ("dataset",)
    DESCRIPTION = "Lets ComfyUI's own image nodes feed Train LoRA."

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        required = {"images": ("IMAGE",),
                    "captions": ("STRING", {"multiline": True, "default": "",
                                            "tooltip": "One caption per image, one per line (a single line is used for all)."})}
        required.update({name: _widget(TrainConfig, name) for name in DATASET_WIDGETS})
        return {"required": required}

    def make(self, images: torch.Tensor, captions: str, **options) -> tuple[dict]:
        import folder_paths

        lines = [line.strip() for line in captions.splitlines() if line.strip()]
        if len(lines) not in (0, 1, len(images)):
            raise HostError(f"{len(images)} images but {len(lines)} caption lines: give one per image, or one for all.")
        # a folder named "images", so a LoRA left unnamed is images_lora, the same each time the graph is queued
        folder = Path(tempfile.mkdtemp(prefix="lora_trainer_images_", dir=folder_paths.get_temp_directory())) / "images"
        folder.mkdir()
        for i, image in enumerate(images):
            array = (image.detach().float().clamp(0, 1).cpu().numpy() * 255).round().astype(np.uint8)
            Image.fromarray(array).save(folder / f"{i:05d}.png")
            text = lines[i] if len(lines) == len(images) else (lines[0] if lines else "")
            (folder / f"{i:05d}.txt").write_text(text, encoding="utf-8")
        return ({"train_data_dir": str(folder), **_values(DATASET_WIDGETS, options)},)


def model_family(model) -> str:
    """The engine's family of a ComfyUI MODEL: SD1.x, SD2.x, SDXL, or a subclass of them (SSD-1B, Vega, KOALA)."""
    import comfy.supported_models as supported

    config = model.model.model_config
    unet = getattr(config, "unet_config", {})
    for class_name, family in FAMILIES:
        base = getattr(supported, class_name)
        # same inputs as the family: no inpainting/pix2pix channels, no unCLIP/Lotus class embedding
        if (isinstance(config, base) and unet.get("in_channels", 4) == 4
                and unet.get("adm_in_channels") == base.unet_config["adm_in_channels"]):
            return family
    raise HostError(f"This model is {type(config).__name__}; LoRA Trainer trains SD1.x, SD2.x and SDXL models and "
                    "SDXL's smaller variants (SSD-1B, Vega, KOALA), not inpainting, instruct-pix2pix, unCLIP, "
                    "upscaler or other models.")


def _patched(patcher) -> int:
    """How many weights of a ComfyUI ModelPatcher carry LoRA patches (LoraLoader adds them)."""
    return len(getattr(patcher, "patches", None) or {})


def _plain_clip(clip):
    """The graph's CLIP without the LoRA patches a LoraLoader added: training sees the checkpoint's own weights."""
    plain = clip.clone()
    plain.patcher.patches = {}
    plain.patcher.patches_uuid = uuid.uuid4()  # ComfyUI reloads a patcher whose patches changed
    return plain


@contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Forked global generators seeded with `seed`: ComfyUI before 0.3.43 draws VAE noise from them."""
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def comfy_backbone(model, clip, vae, seed: int = 0):
    """A HostBackbone over the graph's model: its UNet weights without any LoRA patches, its VAE and CLIP.

    Images are encoded under global generators seeded with `seed` (restored afterwards), so the latents
    never depend on what ran before in the process.
    """
    import comfy.model_management as mm

    from lora_trainer.backbones import weights_identity
    from lora_trainer.backbones.host import HostBackbone

    family = model_family(model)
    if _patched(getattr(clip, "patcher", None)):
        clip = _plain_clip(clip)
    mm.unload_all_models()  # undoes any LoRA that ComfyUI patched into the shared weights
    unet_sd = {k: v.clone() if v.is_inference() else v for k, v in model.model.diffusion_model.state_dict().items()}
    latent_format = model.model.latent_format
    prediction = "v_prediction" if "V_PREDICTION" in model.model.model_type.name else "epsilon"
    zsnr = bool(getattr(getattr(model.model, "model_sampling", None), "zsnr", False))  # a checkpoint marked ztsnr
    batches = count()

    def encode_images(pixels: torch.Tensor) -> torch.Tensor:
        with _seeded(seed + next(batches)):
            latents = vae.encode(((pixels + 1) / 2).clamp(0, 1).movedim(1, -1))
        return latent_format.process_in(latents).clone()

    def encode_prompts(prompts: list[str]) -> dict[str, torch.Tensor]:
        hidden, pooled = [], []
        for prompt in prompts:
            cond, pool = clip.encode_from_tokens(clip.tokenize(prompt), return_pooled=True)
            hidden.append(cond[:, :77].clone())  # captions longer than one 77-token chunk keep their first chunk
            pooled.append(pool.clone())
        out = {"hidden": torch.cat(hidden)}
        if family == "sdxl":
            out["pooled"] = torch.cat(pooled)
        return out

    pooled_dim = encode_prompts([""]).get("pooled", torch.zeros(1, 0)).shape[1] if family == "sdxl" else None

    def decode_images(latents: torch.Tensor) -> torch.Tensor:
        pixels = vae.decode(latent_format.process_out(latents))  # (B, H, W, C) in [0, 1]
        return (pixels.movedim(-1, 1).float() * 2 - 1).clone()

    def release() -> None:
        mm.unload_all_models()
        mm.soft_empty_cache()

    return HostBackbone.from_ldm_unet(unet_sd, family, encode_images=encode_images, encode_prompts=encode_prompts,
                                      pooled_dim=pooled_dim, prediction_type=prediction, name="ComfyUI model",
                                      release=release, decode_images=decode_images,
                                      encoder_id=weights_identity(vae.first_stage_model), zero_terminal_snr=zsnr)


def _plan_backbone(model):
    """The Train node's backbone in shapes only, for the memory plan: the UNet's tensors as meta tensors (nothing is
    copied or moved, the MODEL is untouched), no encoders."""
    from lora_trainer.backbones.host import HostBackbone

    shapes = {k: torch.empty_like(v, device="meta") for k, v in model.model.diffusion_model.state_dict().items()}
    return HostBackbone.for_plan(shapes, model_family(model))


def _free_for_training() -> int | None:
    """The GPU memory a Train node would find: what is free now plus what ComfyUI's loaded models hold (the node
    unloads them first); None without a CUDA GPU."""
    import comfy.model_management as mm

    from lora_trainer.memory.plan import free_memory

    device = mm.get_torch_device()
    if not isinstance(device, torch.device) or device.type != "cuda":
        return None
    held = sum(loaded.model_loaded_memory() for loaded in mm.current_loaded_models if loaded.device == device)
    return free_memory(device) + held


def show_on_node(node_id: str | None, text: str) -> None:
    """Put `text` under the running node (ComfyUI's progress text, which replaces what the node showed before).
    Without ComfyUI's server (or a node id) nothing is shown: the log has it all the same."""
    try:
        from server import PromptServer
    except ImportError:
        return
    server = getattr(PromptServer, "instance", None)
    if node_id is None or not hasattr(server, "send_progress_text"):
        return
    server.send_progress_text(text, node_id, getattr(server, "client_id", None))


def _train_config(model, clip, dataset: dict, output_name: str, advanced: str, options: dict
                  ) -> tuple[TrainConfig, list[str]]:
    """The config a Train LoRA node's inputs make, and what it changed or noticed in them (a renamed LoRA, a LoRA
    already on the MODEL/CLIP)."""
    import folder_paths

    extra = yaml.safe_load(advanced) if advanced.strip() else {}
    if not isinstance(extra, dict):
        raise HostError("'advanced' must be YAML lines of key: value.")
    # every file the run writes is models/loras/NAME* or output/lora_trainer/NAME/*
    name = lora_name(output_name, dataset["train_data_dir"])
    notes = [note] if output_name.strip() and (note := renamed_note(output_name, name)) else []
    unet_patches, clip_patches = _patched(model), _patched(getattr(clip, "patcher", None))
    if unet_patches or clip_patches:
        notes.append(f"The MODEL/CLIP input already has a LoRA applied ({unet_patches} UNet and {clip_patches} "
                     "text encoder weights patched, e.g. by LoraLoader). Training ignores it and learns on the "
                     "checkpoint's own weights; the MODEL and CLIP outputs apply it and the new LoRA together.")
    values = {**dataset, **_values(TRAIN_WIDGETS + VALIDATION_WIDGETS, options), **extra, "output_name": name,
              "output_dir": str(Path(folder_paths.get_output_directory()) / "lora_trainer" / name)}
    values.setdefault("sample_prompts", [])
    return make_config(values), notes


def publish(lora_file: Path, name: str) -> Path:
    """Copy a finished LoRA into ComfyUI's loras folder atomically; returns its new path."""
    import folder_paths

    from lora_trainer.lora.kohya import publish_lora

    return publish_lora(lora_file, Path(folder_paths.get_folder_paths("loras")[0]), name)


class TrainLora:
    """Train a LoRA on the graph's MODEL/CLIP/VAE and return them with the new LoRA applied."""

    CATEGORY = CATEGORY
    FUNCTION = "train"
    OUTPUT_NODE = True
    RETURN_TYPES = ("MODEL", "CLIP", "STRING", "IMAGE")
    RETURN_NAMES = ("model", "clip", "lora_name", "loss_plot")
    DESCRIPTION = "Trains in this ComfyUI, saves into models/loras (kohya format, with metadata) and applies it."

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        required = {"model": ("MODEL",), "clip": ("CLIP",), "vae": ("VAE",), "dataset": (DATASET,),
                    "output_name": _widget(TrainConfig, "output_name")}
        required.update({name: _widget(TrainConfig, name) for name in TRAIN_WIDGETS})
        required["seed"] = _fixed_seed(required["seed"])
        optional = {"advanced": ("STRING", {"multiline": True, "default": "",
                                            "tooltip": "More settings as YAML key: value lines (any train key)."})}
        optional.update({name: _widget(TrainConfig, name) for name in VALIDATION_WIDGETS})
        return {"required": required, "optional": optional,
                "hidden": {"unique_id": "UNIQUE_ID"}}  # the node's id, to show text under it

    @classmethod
    def IS_CHANGED(cls, **_) -> float:
        """Never served from ComfyUI's cache: queuing the graph again trains again."""
        return float("nan")

    def train(self, model, clip, vae, dataset: dict, output_name: str, advanced: str = "", unique_id: str | None = None,
              **options):
        import comfy.model_management as mm
        import comfy.sd
        import comfy.utils

        from lora_trainer.backbones import memory_report
        from lora_trainer.events import CancelToken
        from lora_trainer.train.loop import train_lora
        from lora_trainer.train.plot import loss_plot

        config, notes = _train_config(model, clip, dataset, output_name, advanced, options)
        name = config.output_name
        for note in notes:
            log.warning("LoRA Trainer: %s", note)
        cancel = CancelToken()
        bar = comfy.utils.ProgressBar(max(config.max_steps, 1))
        # under the node: the run's warnings (the engine logs them), what it did on request, its validation, its plan
        warnings, news, plan = [], [], ""
        validation: list[tuple[int, float]] = []

        def shown() -> str:
            lines = [*warnings, *news[-3:]]
            if validation:
                best = min(validation, key=lambda entry: entry[1])
                lines.append(f"Validation loss {validation[-1][1]:.4f} at step {validation[-1][0]} (best {best[1]:.4f} "
                             f"at step {best[0]}).")
            return "\n\n".join([*lines, plan])

        def on_event(event) -> None:
            if mm.processing_interrupted():
                cancel.set()
            elif event.kind == "warning":
                warnings.append(f"Warning: {event.data['message']}")
                show_on_node(unique_id, shown())
            elif event.kind == "eval" and event.data.get("validation_loss") is not None:
                validation.append((event.step, event.data["validation_loss"]))
                show_on_node(unique_id, shown())
            elif event.kind == "saved" and event.data.get("what") == "requested":
                target = publish(Path(event.data["path"]), step_name(name, event.step))
                news.append(f"Saved step {event.step} as {target.name} (Save now).")
                show_on_node(unique_id, shown())
            elif event.kind == "sample":
                try:
                    _preview(bar, event.data["path"])
                except mm.InterruptProcessingException:
                    cancel.set()
                news.append(f"Preview of step {event.step}: {event.data['prompt']!r} ({event.data['path']}).")
                show_on_node(unique_id, shown())
            elif event.kind == "progress" and "phase" not in event.data:
                try:
                    bar.update_absolute(event.step, event.total)
                except mm.InterruptProcessingException:  # the server's progress hook checks for Cancel too
                    cancel.set()

        # ComfyUI runs nodes under inference_mode; training needs autograd back, on clones of its tensors
        with torch.inference_mode(False), torch.enable_grad():
            backbone = comfy_backbone(model, clip, vae, seed=config.seed)
            plan = memory_report(config, _free_for_training(), backbone)
            log.info("LoRA Trainer memory plan:\n%s", plan)
            show_on_node(unique_id, plan)
            RUNNING[:] = [cancel]  # what the Save now / Sample now routes reach
            try:
                result = train_lora(config, backbone=backbone, listeners=[on_event], cancel=cancel)
            finally:
                RUNNING.clear()
        if result.interrupted:
            if result.lora_file:
                saved = publish(result.lora_file, step_name(name, result.steps))
                log.info("LoRA Trainer: interrupted; the LoRA so far is %s", saved)
            raise mm.InterruptProcessingException()  # ComfyUI then reports the run as interrupted
        last = publish(result.last_file, f"{name}-last") if result.last_file is not None else None
        target = publish(result.lora_file, name)
        lora = comfy.utils.load_torch_file(str(target), safe_load=True)
        model_lora, clip_lora = comfy.sd.load_lora_for_models(model, clip, lora, 1.0, 1.0)
        plot = torch.from_numpy(np.asarray(loss_plot(result.losses, result.validation), dtype=np.float32) / 255.0)[None]
        early = ", stopped early: it was overfitting" if result.stopped_early else ""
        report = "\n".join([f"Saved {target} ({result.steps} steps{early}).",
                            *_best_lines(result, last), *notes, *warnings, "", plan])
        show_on_node(unique_id, report)
        return {"ui": {"text": [report]}, "result": (model_lora, clip_lora, target.name, plot)}


RUNNING: list = []  # the CancelToken of the Train LoRA node running now (ComfyUI runs one node at a time)


def _preview(bar, path: str) -> None:
    """A sample image as the node's preview (ComfyUI's progress preview, as its samplers show theirs)."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            bar.update_absolute(bar.current, None, ("PNG", image.convert("RGB"), 512))
    except OSError:
        log.warning("LoRA Trainer: cannot show the preview %s", path)


def _best_lines(result, last: Path | None) -> list[str]:
    """What the node says of the best checkpoint."""
    if result.best is None:
        return []
    step, value, path = result.best
    if last is not None:
        return [(f"use_best: it is the best checkpoint, step {step} (validation loss {value:.4f}); the last step's is "
                 f"{last.name}.")]
    if step == result.steps:
        return [f"The last step is the best one (validation loss {value:.4f})."]
    return [(f"The best checkpoint is step {step} (validation loss {value:.4f}): {path}. Turn use_best on to make the "
             "best one the LoRA.")]


def register_routes() -> None:
    """POST /lora_trainer/save_now and /lora_trainer/sample_now on ComfyUI's server (the Train LoRA node's buttons
    call them): the running training saves, or renders a preview with its sample prompts, after its current step.
    409 when no Train LoRA node is running. Nothing without ComfyUI's server."""
    try:
        from aiohttp import web
        from server import PromptServer
    except ImportError:
        return
    server = getattr(PromptServer, "instance", None)
    if server is None:
        return

    def ask(what: str):
        if not RUNNING:
            return web.json_response({"error": "No Train LoRA node is running."}, status=409)
        RUNNING[0].ask(what)
        return web.json_response({"asked": True})

    @server.routes.post("/lora_trainer/save_now")
    async def save_now(request):
        return ask("save")

    @server.routes.post("/lora_trainer/sample_now")
    async def sample_now(request):
        return ask("sample")


class MemoryPlan:
    """The memory plan of a Train LoRA node's settings, before training: its predicted peak GPU memory and the
    levers that would make it fit."""

    CATEGORY = CATEGORY
    FUNCTION = "plan"
    OUTPUT_NODE = True
    RETURN_TYPES = ("STRING",)
    RETURN_NAMES = ("plan",)
    DESCRIPTION = ("Give it the Train LoRA node's inputs and settings and queue it alone (Queue selected output "
                   "nodes): it shows the run's predicted peak GPU memory, moving nothing onto the GPU.")

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return TrainLora.INPUT_TYPES()

    @classmethod
    def IS_CHANGED(cls, **_) -> float:
        """Never served from ComfyUI's cache: the free GPU memory and the images change under it."""
        return float("nan")

    def plan(self, model, clip, vae, dataset: dict, output_name: str, advanced: str = "", unique_id: str | None = None,
             **options) -> dict:
        from lora_trainer.backbones import memory_report

        config, _ = _train_config(model, clip, dataset, output_name, advanced, options)
        with torch.inference_mode(False):  # ComfyUI runs nodes under inference_mode; the UNet skeleton needs it off
            backbone = _plan_backbone(model)
        plan = memory_report(config, _free_for_training(), backbone)
        show_on_node(unique_id, plan)
        return {"ui": {"text": [plan]}, "result": (plan,)}


class TestLoraGrid:
    """Render one prompt with a LoRA at several strengths, side by side, with ComfyUI's own sampler."""

    CATEGORY = CATEGORY
    FUNCTION = "render"
    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("grid",)
    DESCRIPTION = "Same seed, same prompt, one image per LoRA strength."

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        import folder_paths

        return {"required": {
            "model": ("MODEL",), "clip": ("CLIP",), "vae": ("VAE",),
            "lora_name": (folder_paths.get_filename_list("loras"), {"tooltip": "A LoRA from models/loras."}),
            "prompt": ("STRING", {"multiline": True, "default": ""}),
            "negative": ("STRING", {"multiline": True, "default": ""}),
            "strengths": ("STRING", {"default": "0, 0.5, 1", "tooltip": "Comma-separated LoRA strengths."}),
            "seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFFFFFFFFFF}),
            "steps": ("INT", {"default": 20, "min": 1, "max": 200}),
            "cfg": ("FLOAT", {"default": 7.0, "min": 0.0, "max": 30.0, "step": 0.1}),
            "width": ("INT", {"default": 512, "min": 64, "max": 4096, "step": 8}),
            "height": ("INT", {"default": 512, "min": 64, "max": 4096, "step": 8}),
        }}

    def render(self, model, clip, vae, lora_name: str, prompt: str, negative: str, strengths: str, seed: int,
               steps: int, cfg: float, width: int, height: int) -> tuple[torch.Tensor]:
        import comfy.sd
        import comfy.utils
        import folder_paths
        import nodes

        from lora_trainer.ui.render import parse_strengths

        weights = parse_strengths(strengths)
        lora = comfy.utils.load_torch_file(folder_paths.get_full_path_or_raise("loras", lora_name), safe_load=True)
        latent = nodes.EmptyLatentImage().generate(width, height, 1)[0]
        images = []
        for weight in weights:
            patched_model, patched_clip = comfy.sd.load_lora_for_models(model, clip, lora, weight, weight)
            positive = nodes.CLIPTextEncode().encode(patched_clip, prompt)[0]
            negative_cond = nodes.CLIPTextEncode().encode(patched_clip, negative)[0]
            samples = nodes.common_ksampler(patched_model, seed, steps, cfg, "euler", "normal", positive,
                                            negative_cond, latent)[0]
            images.append(nodes.VAEDecode().decode(vae, samples)[0])
        return (torch.cat(images, dim=2),)


NODE_CLASS_MAPPINGS = {
    "LoraTrainerCaptionFolder": CaptionFolder,
    "LoraTrainerDatasetFromFolder": DatasetFromFolder,
    "LoraTrainerDatasetFromImages": DatasetFromImages,
    "LoraTrainerMemoryPlan": MemoryPlan,
    "LoraTrainerTrainLora": TrainLora,
    "LoraTrainerTestLoraGrid": TestLoraGrid,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "LoraTrainerCaptionFolder": "Caption Folder (BLIP)",
    "LoraTrainerDatasetFromFolder": "LoRA Dataset from Folder",
    "LoraTrainerDatasetFromImages": "LoRA Dataset from Images",
    "LoraTrainerMemoryPlan": "LoRA Trainer: Check memory",
    "LoraTrainerTrainLora": "Train LoRA (LoRA Trainer)",
    "LoraTrainerTestLoraGrid": "Test LoRA Grid",
}

"""LoRA files in kohya's format: peft weights out to `lora_unet_*`/`lora_te*` keys, and back in.

Every host reads these keys (the WebUI's and Forge's Lora, ComfyUI's LoraLoader, diffusers'
`load_lora_weights`, kohya's networks). Files are written atomically: a temp file in the same folder,
then `os.replace`, so a crash or a full disk never leaves a half-written LoRA under the real name.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path

import torch
from diffusers.utils import convert_state_dict_to_kohya
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from lora_trainer import __version__
from lora_trainer.atomic import replaced_atomically
from lora_trainer.errors import CheckpointError, TrainingError

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
# kohya's prefix of each text encoder, by family
TEXT_PREFIXES = {"sd1": ["lora_te"], "sd2": ["lora_te"], "sdxl": ["lora_te1", "lora_te2"]}
FAMILY_NAMES = {"sd1": "SD1.x", "sd2": "SD2.x", "sdxl": "SDXL", "flux1": "Flux.1", "zimage": "Z-Image",
                "klein": "Flux.2 klein"}
# the key prefixes of a whole single-file Stable Diffusion checkpoint (UNet, VAE, text encoders)
BASE_MODEL_PREFIXES = ("model.diffusion_model.", "first_stage_model.", "cond_stage_model.", "conditioner.embedders.")
# the width of the text conditioning a UNet's cross-attention takes, by family
CONTEXT_WIDTHS = {768: "sd1", 1024: "sd2", 2048: "sdxl"}


# the names peers write: kohya sd-scripts (SD, Flux.1), ai-toolkit (ss_base_model_version of Z-Image and klein),
# musubi-tuner (their modelspec.architecture); the hosts load a LoRA without reading them
BASE_VERSION = {"sd1": "sd_v1", "sd2": "sd_v2", "sdxl": "sdxl_base_v1-0", "flux1": "flux1", "zimage": "zimage",
                "klein": "flux2_klein_4b"}
ARCHITECTURE = {"sd1": "stable-diffusion-v1/lora", "sd2": "stable-diffusion-v2-768-v/lora",
                "sdxl": "stable-diffusion-xl-v1-base/lora", "flux1": "flux-1-dev/lora", "zimage": "Z-Image/lora",
                "klein": "Flux.2-klein-4b/lora"}


def kohya_metadata(config, family: str, meta: dict) -> dict[str, str]:
    """The kohya `ss_*` and `modelspec.*` keys the WebUI, Forge and ComfyUI read; `meta` says what the run saw and
    where it stands (scan, tags, buckets, model_name, started_at, finished_at, total_steps, step, epoch)."""
    step, epoch = meta["step"], meta["epoch"]
    scan = meta["scan"]
    dirs: dict[str, dict[str, int]] = {}
    for item in scan.training:
        entry = dirs.setdefault(item.path.parent.name, {"n_repeats": item.repeats * config.repeats, "img_count": 0})
        entry["img_count"] += 1
    bucket_counts: dict[str, int] = {}
    for item, bucket in zip(scan.items, meta["buckets"]):
        if item.held_out:
            continue
        bucket_counts[f"{bucket[0]}x{bucket[1]}"] = bucket_counts.get(f"{bucket[0]}x{bucket[1]}", 0) + 1
    arch = ARCHITECTURE[family]
    if family == "sd2" and config.prediction_type == "epsilon":
        arch = "stable-diffusion-v2-512/lora"
    version = BASE_VERSION[family]
    if family == "flux1" and meta.get("variant") == "schnell":
        arch = "flux-1-schnell/lora"
    if family == "klein" and meta.get("variant") == "9b":
        arch, version = "Flux.2-klein-9b/lora", "flux2_klein_9b"
    flow = {} if family in ("sd1", "sd2", "sdxl") else {
        "ss_timestep_sampling": config.timestep_sampling, "ss_discrete_flow_shift": f"{config.discrete_flow_shift:g}",
        "ss_sigmoid_scale": f"{config.sigmoid_scale:g}", "ss_weighting_scheme": config.loss_weighting,
        "ss_guidance_scale": f"{config.train_guidance:g}", "ss_model_prediction_type": "raw",
        "modelspec.implementation": "https://github.com/black-forest-labs/flux" if family != "zimage" else
        "https://github.com/Tongyi-MAI/Z-Image"}
    now = meta["finished_at"]
    return {
        "ss_output_name": config.output_name,
        "ss_sd_model_name": meta["model_name"],
        "ss_base_model_version": version,
        "ss_v2": str(family == "sd2"),
        "ss_v_parameterization": str(config.prediction_type == "v_prediction"),
        "ss_zero_terminal_snr": str(config.zero_terminal_snr == "on"),
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(config.lora_rank),
        "ss_network_alpha": f"{config.lora_alpha:g}",
        "ss_network_dropout": str(config.lora_dropout),
        "ss_network_args": json.dumps({"targets": config.lora_targets}),
        "ss_tag_frequency": json.dumps(meta["tags"]),
        "ss_dataset_dirs": json.dumps(dirs),
        "ss_bucket_info": json.dumps({"buckets": bucket_counts, "enable_bucket": config.enable_buckets}),
        "ss_num_train_images": str(sum(item.repeats * config.repeats for item in scan.training)),
        "ss_steps": str(step),
        "ss_max_train_steps": str(meta["total_steps"]),
        "ss_epoch": str(epoch),
        "ss_num_epochs": str(config.epochs),
        "ss_batch_size_per_device": str(config.batch_size),
        "ss_gradient_accumulation_steps": str(config.gradient_accumulation_steps),
        "ss_learning_rate": f"{config.learning_rate:g}",
        "ss_unet_lr": f"{config.learning_rate:g}",
        "ss_text_encoder_lr": f"{config.text_encoder_lr:g}" if config.train_text_encoder else "0",
        "ss_optimizer": config.optimizer,
        "ss_lr_scheduler": config.lr_scheduler,
        "ss_lr_warmup_steps": str(config.lr_warmup_steps),
        "ss_resolution": f"({config.resolution}, {config.resolution})",
        "ss_clip_skip": str(config.clip_skip),
        "ss_seed": str(config.seed),
        "ss_noise_offset": str(config.noise_offset),
        "ss_min_snr_gamma": str(config.min_snr_gamma),
        "ss_mixed_precision": config.mixed_precision,
        "ss_shuffle_caption": str(config.shuffle_captions),
        "ss_keep_tokens": str(config.keep_tokens),
        "ss_caption_dropout_rate": str(config.caption_dropout),
        "ss_flip_aug": str(config.flip_aug),
        "ss_training_started_at": str(meta["started_at"]),
        "ss_training_finished_at": str(now),
        "ss_training_comment": f"trained with lora_trainer {__version__}",
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": arch,
        "modelspec.implementation": "https://github.com/Stability-AI/generative-models" if family == "sdxl" else "diffusers",
        "modelspec.title": config.output_name,
        "modelspec.resolution": f"{config.resolution}x{config.resolution}",
        "modelspec.date": datetime.fromtimestamp(now, tz=timezone.utc).isoformat(timespec="seconds"),
        **({} if flow else {"modelspec.prediction_type": "v" if config.prediction_type == "v_prediction" else "epsilon"}),
        "modelspec.trigger_phrase": config.trigger_word,
        **flow,
        **validation_metadata(meta),
    }


VALIDATION_LOSS = "lora_trainer_validation_loss"  # our own key: the validation loss of the LoRA in the file
VALIDATION_IMAGES = "lora_trainer_validation_images"  # how many held-out images it was measured on


def validation_metadata(meta: dict) -> dict[str, str]:
    """The validation keys of a saved LoRA whose run measured one (`meta['validation_loss']`), else none."""
    if meta.get("validation_loss") is None:
        return {}
    return {VALIDATION_LOSS: repr(float(meta["validation_loss"])),
            VALIDATION_IMAGES: str(sum(item.held_out for item in meta["scan"].items))}


def kohya_module_name(prefix: str, module: str) -> str:
    """kohya's name of a module: the prefix and the module path with dots as underscores."""
    return f"{prefix}_{module.replace('.', '_')}"


def to_kohya(unet_lora: dict[str, torch.Tensor], text_loras: list[dict[str, torch.Tensor]], family: str,
             alpha: float, dtype: str = "fp16") -> dict[str, torch.Tensor]:
    """Peft LoRA state dicts (unet, text encoders) as one kohya state dict with our alpha."""
    peft = {f"unet.{k}": v for k, v in unet_lora.items()}
    for index, lora in enumerate(text_loras):
        name = "text_encoder" if index == 0 else "text_encoder_2"
        peft.update({f"{name}.{k if k.startswith('text_model.') else 'text_model.' + k}": v for k, v in lora.items()})
    kohya = convert_state_dict_to_kohya(peft)
    out: dict[str, torch.Tensor] = {}
    for key, value in kohya.items():
        if family != "sdxl" and key.startswith("lora_te1_"):
            key = "lora_te_" + key[len("lora_te1_"):]  # SD1/SD2 have one text encoder: kohya calls it lora_te
        if key.endswith(".alpha"):
            value = torch.tensor(float(alpha))  # diffusers writes alpha = rank; ours is the configured one
        else:
            value = value.detach().to("cpu", DTYPES[dtype]).contiguous()
        out[key] = value
    return out


def save_lora_file(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> Path:
    """Write a LoRA atomically; on any failure the previous file of that name is left untouched."""
    path = Path(path)
    for key, value in tensors.items():
        if value.is_floating_point() and not torch.isfinite(value).all():
            raise TrainingError(f"Refusing to save {path.name}: '{key}' holds NaN or infinite values.")
    try:
        with replaced_atomically(path) as tmp:
            save_file(tensors, str(tmp), metadata={k: str(v) for k, v in metadata.items()})
    except (OSError, SafetensorError, RuntimeError) as exc:
        reason = getattr(exc, "strerror", None) or str(exc)
        raise TrainingError(f"Cannot write into {path.parent}: saving {path.name} failed ({reason}). Choose a "
                            "writable output folder with free space; the previous file, if any, is intact.") from None
    return path


def read_lora_file(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors and metadata of a kohya-format LoRA file."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise CheckpointError(f"LoRA file not found: {path.resolve()}")
    if path.suffix.lower() != ".safetensors":
        raise CheckpointError(f"{path.name}: LoRAs are read from .safetensors files only.")
    try:
        with safe_open(str(path), framework="pt") as f:
            keys = list(f.keys())
            if any(k.startswith(BASE_MODEL_PREFIXES) for k in keys) and not any("lora" in k for k in keys):
                raise CheckpointError(f"{path.name} is a base model (a whole Stable Diffusion checkpoint), not a LoRA. "
                                      "Use it as base_model; init_lora and `inspect` take a LoRA file.")
            return {k: f.get_tensor(k) for k in keys}, dict(f.metadata() or {})
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"Cannot read LoRA {path}: {exc}. The file is probably truncated.") from None


def lora_family(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> str | None:
    """The family a LoRA was trained for ('sd1', 'sd2', 'sdxl'): from its shapes, else its metadata; None if unknown."""
    if any(key.startswith("lora_te2_") for key in tensors):
        return "sdxl"
    widths = {int(value.shape[1]) for key, value in tensors.items()
              if key.startswith("lora_unet_") and key.endswith("attn2_to_k.lora_down.weight")}
    if len(widths) == 1 and widths <= CONTEXT_WIDTHS.keys():
        return CONTEXT_WIDTHS[widths.pop()]
    version = f"{metadata.get('ss_base_model_version', '')} {metadata.get('modelspec.architecture', '')}".lower()
    for family, mark in (("sdxl", "xl"), ("sd2", "v2"), ("sd1", "v1")):
        if mark in version:
            return family
    return None


def lora_modules(tensors: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """Group a kohya state dict by module: {name: {'down', 'up', 'alpha'}}."""
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        name, _, leaf = key.partition(".")
        part = {"lora_down.weight": "down", "lora_up.weight": "up", "alpha": "alpha"}.get(leaf)
        if part is None:
            kind = "a LoHa (LyCORIS) weight" if leaf.startswith("hada_") else \
                "a LoKr (LyCORIS) weight" if leaf.startswith("lokr_") else "not a kohya LoRA key"
            raise CheckpointError(f"'{key}' is {kind}; only kohya-format LoRA files (lora_unet_*/lora_te* keys with "
                                  "lora_down, lora_up and alpha) can be read.")
        modules.setdefault(name, {})[part] = value
    return modules


def describe(path: str | Path) -> str:
    """A readable summary of a LoRA file: family, key format, rank/alpha, module counts and metadata."""
    tensors, metadata = read_lora_file(path)
    if any(".lora_A." in key for key in tensors):  # peft names: <prefix>.<module>.lora_A/lora_B.weight, .alpha
        style = "peft names (<module>.lora_A / lora_B, alpha), as ai-toolkit writes them"
        modules: dict[str, dict] = {}
        for key, value in tensors.items():
            name, _, leaf = key.rpartition(".lora_") if ".lora_" in key else (key.removesuffix(".alpha"), "", "alpha")
            part = {"A.weight": "down", "B.weight": "up", "alpha": "alpha"}.get(leaf, leaf)
            modules.setdefault(name, {})[part] = value
        group_of = lambda name: name.split(".")[1] if name.count(".") > 1 else name.split(".")[0]
    else:
        style = "kohya (lora_unet_* / lora_te*: lora_down, lora_up, alpha)"
        modules = lora_modules(tensors)
        group_of = lambda name: name.split("_")[1]
    ranks = sorted({int(m["down"].shape[0]) for m in modules.values() if "down" in m})
    alphas = sorted({float(m["alpha"]) for m in modules.values() if "alpha" in m})
    groups: dict[str, int] = {}
    for name in modules:
        groups[group_of(name)] = groups.get(group_of(name), 0) + 1
    version = metadata.get("ss_base_model_version")
    family = FAMILY_NAMES.get(lora_family(tensors, metadata), "unknown")
    for key, label in BASE_VERSION.items():
        if version and version == label:
            family = FAMILY_NAMES[key]
    if version in ("flux2_klein_9b",):
        family = FAMILY_NAMES["klein"]
    dtype = next((v.dtype for k, v in tensors.items() if k.endswith(".weight")), None)
    lines = [f"file: {Path(path).name}", f"family: {family}" + (f" ({version})" if version else ""), f"format: {style}",
             f"modules: {len(modules)} ({', '.join(f'{k}: {v}' for k, v in sorted(groups.items()))})",
             f"rank: {', '.join(map(str, ranks))}", f"alpha: {', '.join(f'{a:g}' for a in alphas)}", f"dtype: {dtype}"]
    for key in sorted(metadata):
        value = metadata[key]
        if key == "ss_tag_frequency":
            value = json.dumps(json.loads(value))[:200]
        lines.append(f"{key}: {value}")
    return "\n".join(lines)


def publish_lora(lora_file: Path, folder: Path, name: str) -> Path:
    """Copy a finished LoRA into a host's LoRA folder as NAME.safetensors, atomically; its new path.

    The name is sanitised so it cannot leave `folder`; on failure any earlier file of that name is intact.
    """
    import shutil

    from lora_trainer.config import safe_name
    from lora_trainer.errors import HostError

    target = Path(folder) / f"{safe_name(name)}.safetensors"
    try:
        with replaced_atomically(target) as tmp:
            shutil.copyfile(lora_file, tmp)
    except OSError as exc:
        raise HostError(f"Cannot write {target.name} into {folder} ({exc.strerror}); the trained LoRA is "
                        f"still at {lora_file}, and any earlier file of that name is intact.") from None
    return target

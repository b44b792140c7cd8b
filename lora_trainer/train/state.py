"""Saving and restoring a run: LoRA files with kohya metadata, and resumable checkpoints.

A checkpoint is a folder `checkpoints/step-NNNNNNNN/` holding `state.pt` (LoRA weights in fp32,
optimizer, schedule, position in the data plan) and the run's `config.yaml`; beside it the LoRA of
that step is written as `<name>-stepNNNNNNNN.safetensors`, ready to use (the last checkpoint of a
finished run has none: the finished LoRA is `<name>.safetensors`). Folders appear atomically.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from lora_trainer import __version__
from lora_trainer.config import TrainConfig, step_name, to_yaml
from lora_trainer.errors import CheckpointError, TrainingError
from lora_trainer.lora.inject import load_lora_state, lora_state
from lora_trainer.lora.kohya import save_lora_file, to_kohya

log = logging.getLogger(__name__)

BASE_VERSION = {"sd1": "sd_v1", "sd2": "sd_v2", "sdxl": "sdxl_base_v1-0"}
ARCHITECTURE = {"sd1": "stable-diffusion-v1/lora", "sd2": "stable-diffusion-v2-768-v/lora",
                "sdxl": "stable-diffusion-xl-v1-base/lora"}


def lora_metadata(config: TrainConfig, family: str, meta: dict, step: int, epoch: int) -> dict[str, str]:
    """The kohya `ss_*` and `modelspec.*` keys the WebUI, Forge and ComfyUI read."""
    scan = meta["scan"]
    dirs: dict[str, dict[str, int]] = {}
    for item in scan.items:
        entry = dirs.setdefault(item.path.parent.name, {"n_repeats": item.repeats * config.repeats, "img_count": 0})
        entry["img_count"] += 1
    bucket_counts: dict[str, int] = {}
    for bucket in meta["buckets"]:
        bucket_counts[f"{bucket[0]}x{bucket[1]}"] = bucket_counts.get(f"{bucket[0]}x{bucket[1]}", 0) + 1
    arch = ARCHITECTURE[family]
    if family == "sd2" and config.prediction_type == "epsilon":
        arch = "stable-diffusion-v2-512/lora"
    now = time.time()
    return {
        "ss_output_name": config.output_name,
        "ss_sd_model_name": meta["model_name"],
        "ss_base_model_version": BASE_VERSION[family],
        "ss_v2": str(family == "sd2"),
        "ss_v_parameterization": str(config.prediction_type == "v_prediction"),
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(config.lora_rank),
        "ss_network_alpha": f"{config.lora_alpha:g}",
        "ss_network_dropout": str(config.lora_dropout),
        "ss_network_args": json.dumps({"targets": config.lora_targets}),
        "ss_tag_frequency": json.dumps(meta["tags"]),
        "ss_dataset_dirs": json.dumps(dirs),
        "ss_bucket_info": json.dumps({"buckets": bucket_counts, "enable_bucket": config.enable_buckets}),
        "ss_num_train_images": str(sum(item.repeats * config.repeats for item in scan.items)),
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
        "modelspec.prediction_type": "v" if config.prediction_type == "v_prediction" else "epsilon",
        "modelspec.trigger_phrase": config.trigger_word,
    }


def export_lora(path: Path, config: TrainConfig, family: str, backbone, trained: list[torch.nn.Module], step: int,
                epoch: int, meta: dict) -> Path:
    """Write the LoRA of `trained` (UNet first, then text encoders) as a kohya file at `path`."""
    texts = [lora_state(encoder) for encoder in trained[1:]]
    tensors = to_kohya(lora_state(backbone.unet), texts, family, config.lora_alpha, config.save_dtype)
    return save_lora_file(path, tensors, lora_metadata(config, family, meta, step, epoch))


def save_final(out_dir: Path, config: TrainConfig, family: str, backbone, trained: list[torch.nn.Module], step: int,
               epoch: int, meta: dict) -> Path:
    """The finished LoRA: `<output_dir>/<output_name>.safetensors`."""
    return export_lora(out_dir / f"{config.output_name}.safetensors", config, family, backbone, trained, step, epoch, meta)


def save(out_dir: Path, config: TrainConfig, family: str, backbone, trained: list[torch.nn.Module], optimizer,
         scheduler, *, micro: int, step: int, epoch: int, kind: str, meta: dict) -> tuple[Path, Path | None]:
    """Write a resumable checkpoint folder and the LoRA of this step (none for kind 'final'); prune old ones.
    Returns both paths."""
    root = out_dir / "checkpoints"
    final = root / f"step-{step:08d}"
    lora_path = None
    if kind != "final":
        lora_path = out_dir / f"{step_name(config.output_name, step)}.safetensors"
        export_lora(lora_path, config, family, backbone, trained, step, epoch, meta)
    state = {
        "loras": [{k: v.detach().float().cpu() for k, v in lora_state(model).items()} for model in trained],
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "micro": micro,
        "step": step,
        "epoch": epoch,
        "version": __version__,
    }
    try:
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".saving-", dir=root))
        torch.save(state, tmp / "state.pt")
        (tmp / "config.yaml").write_text(to_yaml(config), encoding="utf-8")
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True) if "tmp" in locals() else None
        raise TrainingError(f"Saving the checkpoint in {root} failed ({exc.strerror}); earlier checkpoints are intact.") from None
    log.debug("Saved checkpoint %s (%s)", final, kind)
    _prune(root, out_dir, config)
    return final, lora_path


def _prune(root: Path, out_dir: Path, config: TrainConfig) -> None:
    """Keep only the newest `keep_last_n_checkpoints` checkpoint folders and their LoRA files."""
    folders = sorted(p for p in root.glob("step-*") if p.is_dir())
    for old in folders[:-config.keep_last_n_checkpoints]:
        shutil.rmtree(old, ignore_errors=True)
        (out_dir / f"{config.output_name}-{old.name.replace('-', '')}.safetensors").unlink(missing_ok=True)


def find_checkpoint(path: str | Path) -> Path:
    """The checkpoint folder `path` names: itself, or the newest one in an output folder."""
    path = Path(path).expanduser()
    if (path / "state.pt").is_file():
        return path
    candidates = sorted((path / "checkpoints").glob("step-*/state.pt")) if path.is_dir() else []
    if not candidates:
        raise CheckpointError(f"No checkpoint to resume in {path.resolve()}: expected a 'checkpoints/step-*' "
                              "folder with state.pt (written every save_every_n_steps/epochs, on Ctrl-C and at the end).")
    return candidates[-1].parent


def read_state(path: str | Path) -> tuple[Path, dict]:
    """The checkpoint folder `path` names and its state.pt (tensors only: nothing in it can run code)."""
    folder = find_checkpoint(path)
    try:
        return folder, torch.load(folder / "state.pt", map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError) as exc:
        raise CheckpointError(f"Cannot read {folder / 'state.pt'}: {exc}") from None


def load(path: str | Path, trained: list[torch.nn.Module], optimizer, scheduler) -> dict:
    """Restore LoRA weights, optimizer and schedule from a checkpoint; returns its position."""
    folder, state = read_state(path)
    if len(state["loras"]) != len(trained):
        raise CheckpointError(f"{folder} was saved with train_text_encoder set differently; use the same config.")
    for model, weights in zip(trained, state["loras"]):
        load_lora_state(model, weights)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    return state

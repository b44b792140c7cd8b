"""Saving and restoring a run: resumable checkpoints, whatever the model family.

A checkpoint is a folder `checkpoints/step-NNNNNNNN/` holding `state.pt` (LoRA weights in fp32, optimizer,
schedule, position in the data plan) and the run's `config.yaml`. The backbone writes the usable LoRA of
that step: beside it (an image LoRA, `<name>-stepNNNNNNNN.safetensors`) or inside it (a language model's
adapter folder). The last checkpoint of a finished run has no LoRA of its own: the finished LoRA is
`<name>.safetensors` (or the `<name>` folder). Folders appear atomically.
"""

from __future__ import annotations

import glob
import logging
import re
import shutil
from pathlib import Path

import torch

from lora_trainer import __version__
from lora_trainer.atomic import folder_replaced_atomically
from lora_trainer.config import TrainConfig, step_name, to_yaml
from lora_trainer.errors import CheckpointError, TrainingError

log = logging.getLogger(__name__)


def save(out_dir: Path, config: TrainConfig, backbone, optimizer, scheduler, *, micro: int, step: int, epoch: int,
         kind: str, meta: dict, keep_step: int | None = None,
         validation: list[tuple[int, float | None, str]] = ()) -> tuple[Path, Path | None]:
    """Write a resumable checkpoint folder and the LoRA of this step (none for kind 'final'); prune old ones, but
    never the LoRA of `keep_step` (the best so far). `validation` is the run's saved LoRAs before this one (step,
    validation loss, path), kept in the state so that a resumed run still knows its best.
    Returns the folder and the LoRA's path (the folder itself when the LoRA is inside it)."""
    root = out_dir / "checkpoints"
    final = root / f"step-{step:08d}"
    lora_path = None
    try:
        with folder_replaced_atomically(final) as tmp:
            (tmp / "config.yaml").write_text(to_yaml(config), encoding="utf-8")
            if kind != "final":
                lora_path = backbone.checkpoint_lora(tmp, out_dir, config,
                                                     {**meta, "name": step_name(config.output_name, step)}) or final
            kept = lora_path is not None and kind != "interrupted"  # a stop's LoRA is no checkpoint to choose from
            history = [*validation] + ([(step, meta.get("validation_loss"), str(lora_path))] if kept else [])
            state = {"loras": [{k: v.detach().float().cpu() for k, v in lora.items()} for lora in backbone.lora_state()],
                     "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "micro": micro,
                     "step": step, "epoch": epoch, "version": __version__, "validation": history}
            torch.save(state, tmp / "state.pt")
    except OSError as exc:
        raise TrainingError(f"Saving the checkpoint in {root} failed ({exc.strerror}); earlier checkpoints are intact.") from None
    log.debug("Saved checkpoint %s (%s)", final, kind)
    _prune(root, out_dir, config, keep_step)
    return final, lora_path


def _prune(root: Path, out_dir: Path, config: TrainConfig, keep_step: int | None = None) -> None:
    """Keep only the newest `keep_last_n_checkpoints` checkpoint folders and the LoRA files beside them, and the
    LoRA file of `keep_step`."""
    folders = sorted(p for p in root.glob("step-*") if p.is_dir())
    for old in folders[:-config.keep_last_n_checkpoints]:
        shutil.rmtree(old, ignore_errors=True)
    kept = {f"{config.output_name}-{folder.name.replace('-', '')}.safetensors" for folder in root.glob("step-*")}
    if keep_step is not None:
        kept.add(f"{step_name(config.output_name, keep_step)}.safetensors")
    for lora in out_dir.glob(f"{glob.escape(config.output_name)}-step*.safetensors"):
        if lora.name not in kept and re.fullmatch(r"-step\d{8}", lora.stem[len(config.output_name):]):
            lora.unlink(missing_ok=True)


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


def load(path: str | Path, backbone, optimizer, scheduler) -> dict:
    """Restore LoRA weights, optimizer and schedule from a checkpoint; returns its state (position included)."""
    folder, state = read_state(path)
    if "loras" not in state:
        raise CheckpointError(f"{folder} was written by an older lora_trainer; start this run anew.")
    try:
        backbone.load_lora_state(state["loras"])
    except CheckpointError as exc:
        raise CheckpointError(f"{folder}: {exc}") from None
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    log.info("Resumed from %s at step %d", folder, state["step"])
    return state

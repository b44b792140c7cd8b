"""Captioning a folder with BLIP: batched on the GPU, with image decoding on threads in parallel.

A user's caption is never replaced unless they ask (`existing: overwrite`/`append`); a run that is
stopped resumes where it stopped; unreadable images are listed and skipped.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import re
import time
import urllib.error
import urllib.request
import warnings
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from lora_trainer.caption.store import CaptionWriter, write_text_atomic
from lora_trainer.config import CaptionConfig
from lora_trainer.data.images import UnusableImage, current_captions, find_images, load_image, sidecar_files
from lora_trainer.errors import ConfigError, DatasetError, LoraTrainerError
from lora_trainer.events import CancelToken, EventBus, Listener

log = logging.getLogger(__name__)

PROGRESS_FILE = ".lora_trainer_captioning.json"
NEEDED_FILES = ("config.json", "model.safetensors", "preprocessor_config.json",
                "tokenizer.json (or vocab.txt)", "tokenizer_config.json", "special_tokens_map.json")
DEFAULT_MODEL = "Salesforce/blip-image-captioning-base"
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")  # "name" or "owner/name"; anything else is a path
HUB_PROBE_SECONDS = 5


class CaptionError(LoraTrainerError):
    """The captioning model cannot be loaded or run."""


@dataclass
class CaptionResult:
    """What a captioning run did."""

    captioned: dict[Path, str] = field(default_factory=dict)
    kept: list[Path] = field(default_factory=list)
    skipped: list[tuple[Path, str]] = field(default_factory=list)
    seconds: float = 0.0
    interrupted: bool = False

    @property
    def images_per_second(self) -> float:
        """Captioned images per second of wall time (loading the model not included)."""
        return len(self.captioned) / self.seconds if self.seconds else 0.0


def load_blip(name: str, *, allow_pickle: bool = False):
    """BLIP model and processor from a local folder or the Hugging Face cache; downloaded only when the Hub
    answers at once, so an offline computer gets one clear error in seconds instead of minutes of retries."""
    path = Path(name).expanduser()
    if path.is_dir():
        try:
            return _from_pretrained(str(path), local_only=True, allow_pickle=allow_pickle)
        except Exception as exc:  # noqa: BLE001 - file and format errors all mean "not a usable BLIP folder"
            raise CaptionError(f"Cannot load the BLIP model from the folder {path}: {_first_line(exc)}\n"
                               f"A BLIP folder needs: {', '.join(NEEDED_FILES)}. Download them from "
                               f"https://huggingface.co/{DEFAULT_MODEL} into it.") from None
    if not _HUB_ID.fullmatch(name):
        raise CaptionError(f"No BLIP model folder at {path.absolute()}. Check the path, or give a Hugging Face "
                           f"model id such as {DEFAULT_MODEL}.")
    try:
        return _from_pretrained(name, local_only=True, allow_pickle=allow_pickle)
    except Exception as exc:  # noqa: BLE001 - not (completely) in the cache: download it below, if we can
        log.debug("%s is not (completely) in the Hugging Face cache: %s", name, _first_line(exc))
    if _offline():
        raise _not_downloadable(name, "it is not in the Hugging Face cache, and HF_HUB_OFFLINE is set")
    unreachable = _hub_unreachable(name)
    if unreachable:
        raise _not_downloadable(name, f"it is not in the Hugging Face cache, and the Hub cannot be reached ({unreachable})")
    try:
        return _from_pretrained(name, local_only=False, allow_pickle=allow_pickle)
    except Exception as exc:  # noqa: BLE001 - hub, file and format errors all mean "not available here"
        raise _not_downloadable(name, f"downloading it failed ({_first_line(exc)})") from None


def _from_pretrained(source: str, *, local_only: bool, allow_pickle: bool):
    """The BLIP model (in eval mode) and processor of a folder or Hub id."""
    from transformers import BlipForConditionalGeneration, BlipProcessor

    with warnings.catch_warnings():
        # older transformers (the WebUI's 4.30) pass huggingface_hub an argument it deprecates: not the user's concern
        warnings.filterwarnings("ignore", category=FutureWarning, module="huggingface_hub")
        processor = BlipProcessor.from_pretrained(source, local_files_only=local_only)
        model = BlipForConditionalGeneration.from_pretrained(source, local_files_only=local_only,
                                                             use_safetensors=None if allow_pickle else True)
    return model.eval(), processor


def _offline() -> bool:
    """Whether the user switched the Hugging Face Hub off (HF_HUB_OFFLINE)."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in ("1", "ON", "YES", "TRUE")


def _hub_unreachable(name: str) -> str | None:
    """Why the Hugging Face Hub does not answer one quick request (None when it answers at all)."""
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")
    try:
        request = urllib.request.Request(f"{endpoint}/{name}/resolve/main/config.json", method="HEAD")
        urllib.request.urlopen(request, timeout=HUB_PROBE_SECONDS).close()
    except urllib.error.HTTPError:
        return None  # it answered: what it said (no such model, log in) comes back from the download
    except (OSError, ValueError) as exc:  # no network, no DNS, a firewall, a timeout
        return f"{endpoint}: {getattr(exc, 'reason', exc)}"
    return None


def _not_downloadable(name: str, why: str) -> CaptionError:
    """The error for a Hub model that is neither cached nor downloadable now, saying how to get it."""
    return CaptionError(
        f"Cannot load the BLIP model '{name}': {why}.\n"
        f"Download it once on a computer with internet: `hf download {name}` (older huggingface_hub: "
        f"`huggingface-cli download {name}`) fills the Hugging Face cache (~/.cache/huggingface, or HF_HOME), or save "
        f"{', '.join(NEEDED_FILES)} from https://huggingface.co/{name} into a folder and pass that folder as the model."
    )


def _first_line(exc: Exception) -> str:
    """The first line of an error message, shortened."""
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]


def caption_device_and_dtype(config: CaptionConfig) -> tuple[torch.device, torch.dtype]:
    """The device and dtype captioning runs in: `auto` is the best this machine has (bf16 where the GPU can)."""
    if config.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu")
    else:
        device = torch.device(config.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError("device: cuda was asked for, but torch sees no CUDA GPU. Use device: auto or cpu.")
    if config.dtype != "auto":
        return device, {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[config.dtype]
    if device.type == "cuda":
        return device, torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return device, torch.float32


def _prepare(path: Path, image_processor) -> torch.Tensor:
    """Decode and preprocess one image (runs on a worker thread)."""
    return image_processor(images=load_image(path), return_tensors="pt").pixel_values[0]


def caption_folder(folder: str | Path, config: CaptionConfig | None = None, *, model=None, processor=None,
                   listeners: list[Listener] | tuple[Listener, ...] = (), cancel: CancelToken | None = None) -> CaptionResult:
    """Caption every image of `folder` that needs it; see CaptionConfig for the options."""
    config = config or CaptionConfig()
    if config.min_length > config.max_length:
        raise ConfigError(f"min_length ({config.min_length}) is larger than max_length ({config.max_length}).")
    folder = Path(folder).expanduser().absolute()
    images = find_images(folder)
    if not images:
        raise DatasetError(f"No images found in {folder} (or its sub-folders).")
    bus, cancel = EventBus(listeners), cancel or CancelToken()
    existing = current_captions(folder, images, config.caption_extension)
    progress_file = folder / PROGRESS_FILE
    settings = {k: v for k, v in asdict(config).items() if k not in ("batch_size", "workers", "device", "dtype")}
    done = _read_progress(progress_file, settings)
    result = CaptionResult()
    todo = []
    for image in images:
        if config.existing == "keep" and image in existing or config.existing != "keep" and image.as_posix() in done:
            result.kept.append(image)
        else:
            todo.append(image)
    if not todo:
        progress_file.unlink(missing_ok=True)
        bus.emit("done", 0, 0, captioned=0, kept=len(result.kept))
        return result

    owns_model = model is None
    if owns_model:
        model, processor = load_blip(config.model, allow_pickle=config.allow_pickle)
    device, dtype = caption_device_and_dtype(config)
    model.to(device, dtype)
    writer = CaptionWriter(folder, config.output, config.caption_extension)
    prompt_ids = None
    if config.prompt.strip():
        prompt_ids = processor.tokenizer([config.prompt.strip()], return_tensors="pt").input_ids.to(device)
    generation = {"max_new_tokens": config.max_length, "min_new_tokens": config.min_length,
                  "num_beams": config.num_beams, "do_sample": config.sampling}
    if config.sampling:
        generation["top_p"] = config.top_p

    batches = [todo[i:i + config.batch_size] for i in range(0, len(todo), config.batch_size)]
    workers = config.workers or min(16, os.cpu_count() or 2)
    start = time.perf_counter()
    pending: deque[list[tuple[Path, Future]]] = deque()
    bus.emit("progress", 0, len(todo), phase="captioning")  # the work starts now: progress bars time from here
    try:
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="caption-decode") as pool:
            for number in range(len(batches)):
                # keep two batches decoding ahead of the one the GPU works on
                while len(pending) < 3 and number + len(pending) < len(batches):
                    upcoming = batches[number + len(pending)]
                    pending.append([(p, pool.submit(_prepare, p, processor.image_processor)) for p in upcoming])
                if cancel.is_set():
                    raise KeyboardInterrupt
                ready, pixels = [], []
                for path, future in pending.popleft():
                    try:
                        pixels.append(future.result())
                        ready.append(path)
                    except (DatasetError, OSError, ValueError) as exc:
                        reason = exc.reason if isinstance(exc, UnusableImage) else str(exc)
                        result.skipped.append((path, reason))
                        log.warning("Skipped %s: %s", path, reason)
                if ready:
                    texts = _generate(model, processor, torch.stack(pixels), prompt_ids, generation, device, dtype,
                                      config.seed + number)
                    batch = {path: _compose(text, existing.get(path, ""), config) for path, text in zip(ready, texts)}
                    writer.write(batch)
                    result.captioned.update(batch)
                    done.update(path.as_posix() for path in ready)
                    if config.existing != "keep":
                        write_text_atomic(progress_file, json.dumps({"settings": settings, "done": sorted(done)}))
                finished = len(result.captioned) + len(result.skipped)
                bus.emit("progress", finished, len(todo), phase="captioning",
                         images_per_second=len(result.captioned) / max(time.perf_counter() - start, 1e-9))
    except KeyboardInterrupt:
        result.interrupted = True
        if not cancel.is_set():
            raise
    finally:
        result.seconds = time.perf_counter() - start
        if owns_model:
            model.to("cpu")
            del model
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
    if not result.interrupted:
        progress_file.unlink(missing_ok=True)
    if result.skipped and not result.captioned and not result.kept and not result.interrupted:
        listed = "\n".join(f"  skipped {path}: {reason}" for path, reason in result.skipped[:10])
        more = f"\n  ... and {len(result.skipped) - 10} more" if len(result.skipped) > 10 else ""
        raise DatasetError(f"None of the {len(images)} images in {folder} can be used.\n{listed}{more}\n"
                           "Fix or replace these files, then caption again.")
    if writer.metadata_file is not None:
        shadowed = [path for path in result.captioned if sidecar_files(path, config.caption_extension)]
        if shadowed:
            log.warning("%d of the captioned images also have a caption file (e.g. %s), which training reads before "
                        "%s: delete those files to train on the new captions, or caption with output: txt.",
                        len(shadowed), sidecar_files(shadowed[0], config.caption_extension)[0],
                        writer.metadata_file.name)
    bus.emit("done", len(result.captioned), len(todo), captioned=len(result.captioned), kept=len(result.kept),
             skipped=[str(p) for p, _ in result.skipped], interrupted=result.interrupted)
    return result


def _generate(model, processor, pixels: torch.Tensor, prompt_ids, generation: dict, device, dtype, seed: int) -> list[str]:
    """Captions for one batch of preprocessed images."""
    pixels = pixels.pin_memory().to(device, dtype, non_blocking=True) if device.type == "cuda" else pixels.to(device, dtype)
    inputs = {"pixel_values": pixels}
    if prompt_ids is not None:
        inputs["input_ids"] = prompt_ids.repeat(len(pixels), 1)  # generate() writes into it
    torch.manual_seed(seed)
    with torch.inference_mode():
        tokens = model.generate(**inputs, **generation)
    return [text.strip() for text in processor.batch_decode(tokens, skip_special_tokens=True)]


def _compose(text: str, old: str, config: CaptionConfig) -> str:
    """Prefix, caption and suffix joined with commas; appended to the old caption when asked."""
    parts = [config.prefix.strip(), text, config.suffix.strip()]
    new = ", ".join(part for part in parts if part)
    if config.existing == "append" and old:
        return f"{old}, {new}"
    return new


def _read_progress(path: Path, settings: dict) -> set[str]:
    """Images an interrupted overwrite/append run with the same settings already did."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return set()
    return set(data.get("done", [])) if data.get("settings") == settings else set()

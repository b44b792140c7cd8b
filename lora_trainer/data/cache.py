"""The cache of encoded images: each image is fitted to its bucket and encoded by the VAE once.

Kept in memory, and optionally on disk (one safetensors file keyed by a fingerprint of the images,
the model and the size settings), so a second run over the same data starts at once.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import ImageOps
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from lora_trainer.atomic import replaced_atomically
from lora_trainer.data.buckets import make_buckets, nearest_bucket, resize_and_crop
from lora_trainer.data.images import ImageItem, load_image

log = logging.getLogger(__name__)


@dataclass
class CachedImage:
    """One training image, encoded: its latents (and mirrored latents) and SDXL's size conditioning."""

    item: ImageItem
    bucket: tuple[int, int]
    latents: torch.Tensor
    latents_flipped: torch.Tensor | None
    time_ids: torch.Tensor  # original (h, w), crop (top, left), target (h, w)


def bucket_step(resolution: int) -> int:
    """Bucket sides are multiples of 64 at real sizes; small test resolutions use finer steps."""
    return max(16, min(64, resolution // 8))


def assign_buckets(items: list[ImageItem], resolution: int, enable: bool, min_size: int, max_size: int) -> list[tuple[int, int]]:
    """The (width, height) every image trains at."""
    if not enable:
        side = resolution // bucket_step(resolution) * bucket_step(resolution)
        return [(side, side)] * len(items)
    buckets = make_buckets(resolution, min_size=min_size, max_size=max_size, step=bucket_step(resolution))
    return [nearest_bucket(item.width, item.height, buckets) for item in items]


def _pixels(image) -> torch.Tensor:
    """A PIL RGB image as a (3, H, W) tensor in [-1, 1]."""
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1)


def fingerprint(items: list[ImageItem], buckets: list[tuple[int, int]], model_id: str, flip: bool) -> str:
    """A hash that changes when any image, its bucket, the model or the flip setting changes."""
    digest = hashlib.sha256(f"{model_id}|{flip}".encode())
    for item, bucket in zip(items, buckets):
        stat = item.path.stat()
        digest.update(f"{item.path}|{stat.st_size}|{stat.st_mtime_ns}|{bucket}".encode())
    return digest.hexdigest()[:32]


def encode_dataset(items: list[ImageItem], buckets: list[tuple[int, int]], encode: Callable[[torch.Tensor], torch.Tensor],
                   *, flip: bool, batch_size: int = 8, cache_file: Path | None = None, model_id: str = "",
                   on_progress: Callable[[int, int], None] | None = None) -> list[CachedImage]:
    """Encode every image once (batched per bucket), reusing `cache_file` when its fingerprint matches."""
    key = fingerprint(items, buckets, model_id, flip) if cache_file else ""
    if cache_file and cache_file.is_file():
        cached = _read_cache(cache_file, key, items, buckets, flip)
        if cached is not None:
            log.info("Using cached latents from %s", cache_file)
            return cached
    latents: dict[int, torch.Tensor] = {}
    flipped: dict[int, torch.Tensor] = {}
    time_ids: dict[int, torch.Tensor] = {}
    by_bucket: dict[tuple[int, int], list[int]] = {}
    for index, bucket in enumerate(buckets):
        by_bucket.setdefault(bucket, []).append(index)
    done = 0
    if on_progress:
        on_progress(0, len(items))  # the encoding starts now: progress bars time from here
    for bucket, indices in by_bucket.items():
        for start in range(0, len(indices), batch_size):
            chunk = indices[start:start + batch_size]
            images = []
            for index in chunk:
                image = load_image(items[index].path)
                fitted, (top, left) = resize_and_crop(image, bucket)
                images.append(fitted)
                time_ids[index] = torch.tensor([image.height, image.width, top, left, bucket[1], bucket[0]], dtype=torch.float32)
            batch = torch.stack([_pixels(im) for im in images])
            for index, lat in zip(chunk, encode(batch).float().cpu()):
                latents[index] = lat.clone(memory_format=torch.contiguous_format)  # safetensors saves no strided views
            if flip:
                mirrored = torch.stack([_pixels(ImageOps.mirror(im)) for im in images])
                for index, lat in zip(chunk, encode(mirrored).float().cpu()):
                    flipped[index] = lat.clone(memory_format=torch.contiguous_format)
            done += len(chunk)
            if on_progress:
                on_progress(done, len(items))
    result = [CachedImage(items[i], buckets[i], latents[i], flipped.get(i), time_ids[i]) for i in range(len(items))]
    if cache_file:
        _write_cache(cache_file, key, result)
    return result


def _write_cache(path: Path, key: str, cached: list[CachedImage]) -> None:
    """Store latents on disk; a failure only costs the next run its head start."""
    tensors = {}
    for i, entry in enumerate(cached):
        tensors[f"{i}.latents"] = entry.latents
        tensors[f"{i}.time_ids"] = entry.time_ids
        if entry.latents_flipped is not None:
            tensors[f"{i}.flipped"] = entry.latents_flipped
    try:
        with replaced_atomically(path) as tmp:
            save_file(tensors, str(tmp), metadata={"fingerprint": key, "count": json.dumps(len(cached))})
    except OSError as exc:
        log.warning("Could not write the latent cache %s: %s", path, exc)


def _read_cache(path: Path, key: str, items: list[ImageItem], buckets: list[tuple[int, int]], flip: bool) -> list[CachedImage] | None:
    """The cached latents if the file belongs to exactly this data and model, else None."""
    try:
        with safe_open(str(path), framework="pt") as f:
            if (f.metadata() or {}).get("fingerprint") != key:
                return None
            return [CachedImage(item, bucket, f.get_tensor(f"{i}.latents"), f.get_tensor(f"{i}.flipped") if flip else None,
                                f.get_tensor(f"{i}.time_ids")) for i, (item, bucket) in enumerate(zip(items, buckets))]
    except (SafetensorError, OSError, KeyError) as exc:
        log.warning("Ignoring the unreadable latent cache %s (%s)", path, exc)
        return None

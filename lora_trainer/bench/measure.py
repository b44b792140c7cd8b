"""What every benchmark measures with: photos to decode, a device to wait for, two LoRA files to compare."""

from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np
import torch
from PIL import Image


def synthetic_photos(folder: Path, count: int, size: int = 768, seed: int = 0) -> list[Path]:
    """`count` JPEG photos of smooth colour fields with noise, like camera pictures to a decoder."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / size
    paths = []
    for i in range(count):
        a, b, c = rng.uniform(0, 255, 3)
        image = np.stack([a * x + (255 - a) * y, b * y, c * (1 - x)], axis=-1) + rng.normal(0, 12, (size, size, 3))
        path = folder / f"{i:05d}.jpg"
        Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(path, quality=90)
        paths.append(path)
    return paths


def wait_for_device(device: torch.device) -> None:
    """Wait until the GPU has done the work queued so far, so the clock reads the work, not its queueing."""
    if device.type == "cuda":
        torch.cuda.synchronize()


def lora_difference(first: Path, second: Path) -> float:
    """The largest weight difference between two LoRA files, relative to the largest weight."""
    from safetensors.torch import load_file

    a, b = load_file(str(first)), load_file(str(second))
    biggest = max(float(t.float().abs().max()) for k, t in a.items() if k.endswith("weight"))
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a if k.endswith("weight")) / biggest


def loss_gap(first: list[tuple[int, float]], second: list[tuple[int, float]]) -> float:
    """How far apart two runs' logged losses are: the mean of |a - b| / |a| over the steps both logged."""
    theirs = dict(second)
    gaps = [abs(a - theirs[step]) / max(abs(a), 1e-12) for step, a in first if step in theirs]
    return sum(gaps) / len(gaps) if gaps else float("nan")


@contextlib.contextmanager
def memory_cap(device: torch.device, gib: float | None):
    """A smaller card emulated on a big one: this process may allocate at most `gib` GiB of the GPU's memory
    (torch's per-process fraction; the allocator raises out-of-memory beyond it)."""
    if device.type != "cuda" or not gib:
        yield
        return
    index = torch.cuda.current_device() if device.index is None else device.index  # the call wants an index
    total = torch.cuda.get_device_properties(index).total_memory
    torch.cuda.empty_cache()
    torch.cuda.set_per_process_memory_fraction(min(1.0, gib * 2**30 / total), index)
    try:
        yield
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, index)

"""`bench caption`: our captioner against a plain one-image-at-a-time `generate` loop, in one process.

`python -m lora_trainer bench caption --size base` builds a random-weight BLIP of the real shape, writes
synthetic JPEGs (so decoding costs what it costs on real data), and times both. On a CPU use
`--size tiny` to check that it works.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import torch

from lora_trainer.bench.measure import synthetic_photos, wait_for_device
from lora_trainer.caption.blip import caption_device_and_dtype, caption_folder
from lora_trainer.caption.synthetic import random_blip
from lora_trainer.config import CaptionConfig
from lora_trainer.data.images import load_image


def _plain_loop(model, processor, paths: list[Path], config: CaptionConfig, device, dtype) -> float:
    """Images per second of the usual unbatched loop: open, preprocess, generate, decode, one at a time."""
    model.to(device, dtype)
    generation = {"max_new_tokens": config.max_length, "min_new_tokens": config.min_length, "num_beams": config.num_beams}
    start = time.perf_counter()
    with torch.inference_mode():
        for path in paths:
            pixels = processor(images=load_image(path), return_tensors="pt").pixel_values.to(device, dtype)
            processor.batch_decode(model.generate(pixel_values=pixels, **generation), skip_special_tokens=True)
    wait_for_device(device)
    return len(paths) / (time.perf_counter() - start)


def bench_caption(size: str = "base", images: int = 512, batch_size: int = 64, plain_images: int = 64,
                  num_beams: int = 1, max_length: int = 20, device: str = "auto", out: Path | None = None) -> dict:
    """Time caption_folder and the plain loop on the same random-weight model; returns the numbers."""
    config = CaptionConfig(existing="overwrite", batch_size=batch_size, num_beams=num_beams, max_length=max_length,
                           min_length=0, device=device)
    torch_device, dtype = caption_device_and_dtype(config)
    model, processor = random_blip(size)
    with tempfile.TemporaryDirectory() as tmp:
        paths = synthetic_photos(Path(tmp), images, size=768 if size != "tiny" else 96)
        caption_folder(tmp, CaptionConfig(**{**config.__dict__, "batch_size": min(batch_size, 8)}),
                       model=model, processor=processor)  # warm-up: kernels, allocator, file cache
        (Path(tmp) / ".lora_trainer_captioning.json").unlink(missing_ok=True)
        if torch_device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        result = caption_folder(tmp, config, model=model, processor=processor)
        peak = torch.cuda.max_memory_allocated() / 2**30 if torch_device.type == "cuda" else None
        plain = _plain_loop(model, processor, paths[:plain_images], config, torch_device, dtype)
    ours = result.images_per_second
    report = {
        "model": f"BLIP-{size} (random weights)", "device": str(torch_device), "dtype": str(dtype).replace("torch.", ""),
        "images": images, "batch_size": batch_size, "num_beams": num_beams, "max_new_tokens": max_length,
        "ours_images_per_s": round(ours, 2), "plain_loop_images_per_s": round(plain, 2),
        "speedup": round(ours / plain, 2), "seconds_per_200_images": round(200 / ours, 2),
        "peak_gib": round(peak, 2) if peak is not None else None,
    }
    print("| model | device | images/s (ours) | images/s (plain loop) | speed-up | s per 200 images | peak GiB |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    print(f"| {report['model']} | {report['device']} {report['dtype']} | {ours:.1f} | {plain:.1f} | "
          f"{report['speedup']:.1f}x | {report['seconds_per_200_images']:.2f} | {report['peak_gib']} |")
    if out:
        Path(out).write_text(json.dumps(report, indent=2), encoding="utf-8")
    return report

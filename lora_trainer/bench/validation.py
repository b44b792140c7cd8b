"""`bench train --validate`: what validation costs. The same run twice, on random weights of the real shapes: without
validation, and with a validation folder at the validation defaults (measured before the first step and at each save,
every epoch and at the end; at least `backbones.validation.PAIRS` (image, time) pairs). Training time is the wall
time from the end of caching to the finished LoRA, saves included in both; the validation folder's caching is not, nor
the one-time warm-up of a process's first evaluation (its eager kernels; reported on its own).
"""

from __future__ import annotations

import gc
import json
import tempfile
import time
from pathlib import Path

import torch

from lora_trainer.bench.measure import synthetic_photos, wait_for_device


def _timed_run(base, data: Path, held: Path | None, out: Path, device: torch.device, options: dict) -> dict:
    """One run: seconds from the end of caching to the 'done' event, the evaluations made, the final loss."""
    from lora_trainer.config import make_config
    from lora_trainer.train.loop import train_lora

    marks: dict[str, float] = {}
    evaluations: list[float] = []

    def on_event(event) -> None:
        if event.kind == "progress" and event.data.get("phase") == "caching" and event.step == event.total:
            wait_for_device(device)
            marks["cached"] = time.perf_counter()
        elif event.kind == "eval":
            evaluations.append(event.data.get("validation_loss"))
        elif event.kind == "done":
            wait_for_device(device)
            marks["done"] = time.perf_counter()

    config = make_config({"train_data_dir": str(data), "validation_dir": str(held or ""), "output_dir": str(out),
                          "device": "auto" if device.type == "cuda" else "cpu", "torch_compile": "off", "memory": "off",
                          "mixed_precision": "bf16" if device.type == "cuda" else "no", "enable_buckets": False,
                          "lora_rank": 16, "lora_alpha": 16, **options})
    backbone = base() if callable(base) else None
    if backbone is None:
        config = make_config({**{f: getattr(config, f) for f in config.__dataclass_fields__}, "base_model": str(base)})
    from lora_trainer.backbones import backbone_class

    kind = type(backbone) if backbone is not None else backbone_class(config)[0]
    measure = kind.evaluate
    spent: list[float] = []

    def timed(self):  # each evaluation's own seconds, the GPU caught up at both ends
        wait_for_device(device)
        start = time.perf_counter()
        values = measure(self)
        wait_for_device(device)
        spent.append(round(time.perf_counter() - start, 3))
        return values

    kind.evaluate = timed
    try:
        result = train_lora(config, listeners=[on_event], backbone=backbone)
    finally:
        kind.evaluate = measure
    seconds = marks["done"] - marks["cached"]
    del backbone
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {"seconds": round(seconds, 2), "steps": result.steps, "evaluations": len(evaluations),
            "evaluation_seconds": spent if evaluations else [],
            "validation": [round(v, 4) for v in evaluations if v is not None], "best": result.best and result.best[:2]}


def bench_validation(family: str = "sd15", size: str = "real", device: str = "auto", images: int = 0, held: int = 0,
                     repeats: int = 5, epochs: int = 3, batch: int = 0, out: Path | None = None) -> dict:
    """Without and with validation, on SD1.5/SDXL (a real-shape checkpoint, batch 4 at 512 px / 1 at 1024) or a
    diffusion transformer (batch 1 at 1024): `images` training images (default 40 for SD, 10 for transformers) with
    `repeats`, `held` held-out ones (default a tenth), `epochs` epochs with a save at each."""
    from lora_trainer.bench.flow import BUILDERS
    from lora_trainer.bench.train import real_shape_checkpoint

    torch_device = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                                "cpu" if device == "auto" else device)
    transformer = family in BUILDERS
    images = images or (10 if transformer else 40)
    held = held or max(1, round(images / 10))
    resolution = 1024 if transformer or family.startswith("sdxl") else 512
    batch = batch or (1 if resolution == 1024 else 4)
    if size != "real":
        resolution = 64
    options = {"resolution": resolution, "batch_size": batch, "repeats": repeats, "epochs": epochs,
               "save_every_n_epochs": 1, "log_every_n_steps": 10}
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data, val = tmp / "data", tmp / "val"
        synthetic_photos(data, images, size=max(resolution, 64))
        synthetic_photos(val, held, size=max(resolution, 64), seed=1)
        for image in [*data.glob("*.jpg"), *val.glob("*.jpg")]:
            image.with_suffix(".txt").write_text("a photo of a sks dog in a garden", encoding="utf-8")
        if transformer and size == "real":
            def base():
                model = BUILDERS[family](torch_device)
                for module in (model.transformer, model.vae, *model.text_encoders):
                    module.to("cpu")
                torch.cuda.empty_cache()
                return model
        elif transformer:
            from lora_trainer.backbones.tiny_flow import build_tiny_flux

            base = build_tiny_flux(tmp / "tiny")
        else:
            from lora_trainer.backbones.tiny import build_tiny_checkpoint

            base = real_shape_checkpoint(tmp / "model.safetensors", family) if size == "real" else \
                build_tiny_checkpoint(tmp / "model.safetensors", "sdxl" if family.startswith("sdxl") else "sd1")
        # a first run warms the allocator, cuDNN's choices and the kernels' caches, of the training step and of the
        # evaluation, for the two that are timed; its first evaluation says what that warm-up costs a run once
        warm = _timed_run(base, data, val, tmp / "warm", torch_device, {**options, "epochs": 1, "max_steps": 10})
        rows["without validation"] = _timed_run(base, data, None, tmp / "without", torch_device, options)
        rows["with validation"] = _timed_run(base, data, val, tmp / "with", torch_device, options)
    without, with_ = rows["without validation"]["seconds"], rows["with validation"]["seconds"]
    report = {"family": family, "size": size, "device": str(torch_device), "resolution": resolution, "batch": batch,
              "images": images, "held_out": held, "repeats": repeats, "epochs": epochs,
              "steps": rows["without validation"]["steps"], "rows": rows,
              "first_evaluation_of_a_process_seconds": warm["evaluation_seconds"][0],
              "validation_overhead_percent": round(100 * (with_ - without) / without, 2)}
    print(json.dumps(report, indent=2))
    if out:
        Path(out).write_text(json.dumps(report, indent=2), encoding="utf-8")
    return report

"""Benchmarks: our captioner against a plain one-image-at-a-time `generate` loop, in one process.

`python -m lora_trainer bench caption --size base` builds a random-weight BLIP of the real shape, writes
synthetic JPEGs (so decoding costs what it costs on real data), and times both. On a CPU use
`--size tiny` to check that it works.
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import socket
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from lora_trainer.caption.blip import _device_and_dtype, caption_folder
from lora_trainer.caption.synthetic import random_blip
from lora_trainer.config import CaptionConfig
from lora_trainer.data.images import load_image


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


def _plain_loop(model, processor, paths: list[Path], config: CaptionConfig, device, dtype) -> float:
    """Images per second of the usual unbatched loop: open, preprocess, generate, decode, one at a time."""
    model.to(device, dtype)
    generation = {"max_new_tokens": config.max_length, "min_new_tokens": config.min_length, "num_beams": config.num_beams}
    start = time.perf_counter()
    with torch.inference_mode():
        for path in paths:
            pixels = processor(images=load_image(path), return_tensors="pt").pixel_values.to(device, dtype)
            processor.batch_decode(model.generate(pixel_values=pixels, **generation), skip_special_tokens=True)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return len(paths) / (time.perf_counter() - start)


def bench_caption(size: str = "base", images: int = 512, batch_size: int = 64, plain_images: int = 64,
                  num_beams: int = 1, max_length: int = 20, device: str = "auto", out: Path | None = None) -> dict:
    """Time caption_folder and the plain loop on the same random-weight model; returns the numbers."""
    config = CaptionConfig(existing="overwrite", batch_size=batch_size, num_beams=num_beams, max_length=max_length,
                           min_length=0, device=device)
    torch_device, dtype = _device_and_dtype(config)
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


def real_shape_checkpoint(path: Path, family: str) -> Path:
    """A random-weight checkpoint of the real SD1.5 or SDXL shapes, in the LDM single-file layout (fp16)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from safetensors.torch import save_file
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from lora_trainer.backbones.ldm import text_model_keys, unet_to_ldm
    from lora_trainer.backbones.tiny import _wake, clip_to_open_clip, vae_to_ldm, wake_text_encoders

    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(device):
        if family == "sd15":
            unet = UNet2DConditionModel(cross_attention_dim=768, attention_head_dim=8)
        else:
            unet = UNet2DConditionModel(
                sample_size=128, cross_attention_dim=2048, block_out_channels=(320, 640, 1280),
                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), use_linear_projection=True,
                addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816)
        _wake(unet)  # LDM's zero-initialised output layers would make every prediction, and every gradient, zero
        vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
                            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
        clip_l = CLIPTextModel(CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=3072,
                                              num_hidden_layers=12, num_attention_heads=12, hidden_act="quick_gelu"))
        ckpt = {"model.diffusion_model." + k: v for k, v in unet_to_ldm(unet.state_dict(), 2).items()}
        ckpt.update({"first_stage_model." + k: v for k, v in vae_to_ldm(vae.state_dict(), 4).items()})
        if family == "sd15":
            ckpt.update({"cond_stage_model.transformer." + k: v for k, v in text_model_keys(clip_l.state_dict()).items()})
        else:
            ckpt.update({"conditioner.embedders.0.transformer." + k: v
                         for k, v in text_model_keys(clip_l.state_dict()).items()})
            big_g = CLIPTextModelWithProjection(CLIPTextConfig(
                vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                num_attention_heads=20, hidden_act="gelu", projection_dim=1280))
            ckpt.update({"conditioner.embedders.1.model." + k: v for k, v in clip_to_open_clip(big_g.state_dict()).items()})
    wake_text_encoders(ckpt)
    save_file({k: v.half().contiguous().cpu() for k, v in ckpt.items() if not k.endswith("position_ids")}, str(path))
    return path


LEVERS = {
    "baseline": {},
    "fp32 frozen weights": {"frozen_dtype": torch.float32},
    "channels_last": {"channels_last": True},
    "SDPA flash only": {"sdpa": "FLASH_ATTENTION"},
    "SDPA memory-efficient only": {"sdpa": "EFFICIENT_ATTENTION"},
    "SDPA math only": {"sdpa": "MATH"},
    "loss read back every step": {"item_every_step": True},
    "latents copied from the CPU each step": {"data_on_cpu": True},
    "LoRA input kept in bf16 (no peft fp32 copy)": {"keep_input_dtype": True},
    "torch.compile, default mode": {"compile_mode": "default"},
    "torch.compile, reduce-overhead mode": {"compile_mode": "reduce-overhead"},
}


def _reference_loop(backbone, targets: list[str], batch: int, size: int, steps: int, device, rank: int = 16, *,
                    capture: bool = False, frozen_dtype: torch.dtype | None = None, channels_last: bool = False,
                    sdpa: str | None = None, item_every_step: bool = False, data_on_cpu: bool = False,
                    keep_input_dtype: bool = False, compile_mode: str | None = None) -> dict:
    """A plain eager diffusers + peft loop on the same modules: the yardstick every number is read against.

    The keyword arguments are the levers `--levers` measures one at a time, eagerly and with the step captured
    (CapturedStep, the trainer's own): frozen-weight dtype, channels_last, one SDPA backend, reading the loss
    back every step, the batch's latents copied from the CPU each step, peft's fp32 copy of each LoRA input,
    the loss function through torch.compile in one mode.
    """
    from torch.utils.flop_counter import FlopCounterMode

    from lora_trainer.lora.inject import add_lora, keep_lora_input_dtype
    from lora_trainer.train.graphs import CapturedStep

    cuda = device.type == "cuda"
    unet = backbone.unet.to(device, frozen_dtype or (torch.bfloat16 if cuda else torch.float32))
    if channels_last:
        unet.to(memory_format=torch.channels_last)
    params = add_lora(unet, targets, rank, rank, 0.0)
    for p in params:
        p.data = p.data.float()
    if keep_input_dtype:
        keep_lora_input_dtype(unet)
    latents = torch.randn(batch, 4, size // 8, size // 8, device="cpu" if data_on_cpu else device)
    with torch.no_grad():
        cond = {k: v.to(device).expand(batch, *v.shape[1:]) for k, v in backbone.encode_prompts(["a photo"]).items()}
    time_ids = torch.tensor([[size, size, 0, 0, size, size]] * batch, device=device, dtype=torch.float32)
    time_ids = time_ids if backbone.family == "sdxl" else None
    attention = contextlib.nullcontext  # a fresh context per step: sdpa_kernel's can be entered only once
    if sdpa:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        attention = lambda: sdpa_kernel(getattr(SDPBackend, sdpa))

    def loss_of(inputs: dict) -> torch.Tensor:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda), attention():
            pred = backbone.predict(inputs["noisy"], inputs["t"], cond, time_ids)
        return torch.nn.functional.mse_loss(pred.float(), inputs["noise"])

    if compile_mode:
        torch._dynamo.reset()  # a fresh compile for this model: its time is part of the first step
        loss_of = torch.compile(loss_of, mode=compile_mode)
    if capture:
        stepper = CapturedStep(loss_of, [{"params": params, "lr": 1e-4}], 0.01, 0.0, capture=cuda)
    else:
        optimizer = torch.optim.AdamW(params, lr=1e-4, fused=cuda)
    losses = []

    def step() -> None:
        x = latents.to(device, non_blocking=False) if data_on_cpu else latents
        t = torch.randint(0, 1000, (batch,), device=device)
        noise = torch.randn_like(x)
        inputs = {"noisy": backbone.noise_scheduler.add_noise(x, noise, t), "t": t, "noise": noise}
        if compile_mode == "reduce-overhead":
            torch.compiler.cudagraph_mark_step_begin()
        if capture:
            loss = stepper(inputs)
        else:
            loss = loss_of(inputs)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item() if item_every_step else loss.detach().clone())

    start = time.perf_counter()
    step()  # compiles (torch.compile) or warms up and captures (CapturedStep)
    _sync(device)
    first_step_s = time.perf_counter() - start
    flops = 0
    if not capture and not compile_mode:
        with FlopCounterMode(display=False) as counter:
            step()
        flops = counter.get_total_flops()
    for _ in range(3):
        step()
    _sync(device)
    start = time.perf_counter()
    for index in range(steps):
        step()
        if index % 10 == 9 and not item_every_step:
            float(losses[-1])  # the trainer's habit: one host sync every 10 steps
    _sync(device)
    seconds = time.perf_counter() - start
    if compile_mode:
        torch._dynamo.reset()  # let go of the compiled graphs (they hold on to this model)
    return {"steps_per_s": steps / seconds, "flops_per_step": flops, "first_step_s": first_step_s}


def bench_levers(checkpoint: Path, batch: int, size: int, steps: int, device: torch.device) -> list[dict]:
    """Each lever on its own against the baseline, eager and captured: steps/s, peak GiB, the first step's seconds.

    torch.compile needs a CUDA GPU here (on a CPU it would compile C++ for minutes); its reduce-overhead mode is
    CUDA graphs itself and cannot be captured again."""
    from lora_trainer.backbones.sd import DiffusionBackbone

    rows = []
    for name, lever in LEVERS.items():
        row = {"lever": name}
        for mode in ("eager", "captured"):
            if "compile_mode" in lever and (device.type != "cuda" or
                                            (mode == "captured" and lever["compile_mode"] == "reduce-overhead")):
                row[f"{mode}_steps_per_s"] = "n/a"
                row[f"{mode}_peak_gib"] = row[f"{mode}_first_step_s"] = None
                continue
            model = DiffusionBackbone.from_file(checkpoint)
            targets = model.unet_lora_targets("attention_ff")
            if device.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            try:
                result = _reference_loop(model, targets, batch, size, steps, device, capture=mode == "captured",
                                         **lever)
                row[f"{mode}_steps_per_s"] = round(result["steps_per_s"], 2)
                row[f"{mode}_first_step_s"] = round(result["first_step_s"], 1)
            except RuntimeError as exc:  # a backend this GPU or shape lacks, a failed compile: reported, not fatal
                row[f"{mode}_steps_per_s"] = f"failed: {str(exc).splitlines()[0][:80]}"
                row[f"{mode}_first_step_s"] = None
            row[f"{mode}_peak_gib"] = round(torch.cuda.max_memory_reserved() / 2**30, 2) if device.type == "cuda" else None
            del model
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
        rows.append(row)
    print(f"Levers, one at a time (batch {batch}, {size} px): steps/s, peak GiB, first step s")
    print("| lever | eager steps/s | eager peak GiB | eager first step s | captured steps/s | captured peak GiB | "
          "captured first step s |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for row in rows:
        print(f"| {row['lever']} | {row['eager_steps_per_s']} | {row['eager_peak_gib']} | {row['eager_first_step_s']} | "
              f"{row['captured_steps_per_s']} | {row['captured_peak_gib']} | {row['captured_first_step_s']} |")
    return rows


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _host_backbone(checkpoint: Path, device: torch.device):
    """The model as a host hands it over (WebUI, ComfyUI): an in-memory LDM UNet shared into the skeleton, and
    encoders that are not ours (here: the checkpoint's own, standing in for the host's)."""
    from lora_trainer.backbones.checkpoint import UNET_PREFIX, read_checkpoint
    from lora_trainer.backbones.host import HostBackbone
    from lora_trainer.backbones.sd import DiffusionBackbone

    encoders = DiffusionBackbone.from_file(checkpoint)
    encoders.vae.to(device)
    for encoder in encoders.text_encoders:
        encoder.to(device)
    unet = {k[len(UNET_PREFIX):]: v.to(device) for k, v in read_checkpoint(checkpoint).items()
            if k.startswith(UNET_PREFIX)}
    pooled = encoders.text_encoders[-1].config.projection_dim if encoders.family == "sdxl" else None

    def release() -> None:
        encoders.vae.to("cpu")
        for encoder in encoders.text_encoders:
            encoder.to("cpu")

    return HostBackbone.from_ldm_unet(unet, encoders.family, encode_images=encoders.encode_images,
                                      encode_prompts=encoders.encode_prompts, pooled_dim=pooled, name="host",
                                      release=release)


def _time_trainer(checkpoint: Path, data: Path, tmp: Path, resolution: int, batch: int, steps: int,
                  device: torch.device, cuda_graphs: str, host: bool = False, checkpointing: bool = False,
                  tag: str = "", precision: str = "bf16", compile_unet: bool = False) -> dict:
    """Our trainer on the benchmark model: steps/s after 10 warm steps, time to the first step, peak memory."""
    from lora_trainer.config import make_config
    from lora_trainer.train.loop import train_lora

    first: list[float] = []
    synced: list[tuple[int, float]] = []  # loss events come after the loss is read back: the GPU has caught up

    def on_event(event) -> None:
        if event.kind == "progress" and event.data.get("phase") == "caching" and event.step == event.total \
                and device.type == "cuda":
            torch.cuda.empty_cache()  # training only (warm-up and capture included): caching has its own peak
            torch.cuda.reset_peak_memory_stats()
        if event.kind == "progress" and "phase" not in event.data and not first:
            first.append(time.perf_counter())
        elif event.kind == "loss" and event.step >= 10:
            synced.append((event.step, time.perf_counter()))

    config = make_config({"base_model": str(checkpoint), "train_data_dir": str(data), "resolution": resolution,
                          "batch_size": batch, "max_steps": steps + 10, "lora_rank": 16, "lora_alpha": 16,
                          "output_dir": str(tmp / f"out-{cuda_graphs}-{host}-{checkpointing}-{precision}-{compile_unet}{tag}"),
                          "save_every_n_epochs": 0, "torch_compile": compile_unet,
                          "log_every_n_steps": 10, "device": "cpu" if device.type == "cpu" else "auto",
                          "mixed_precision": precision if device.type == "cuda" else "no", "enable_buckets": False,
                          "min_snr_gamma": 0, "cuda_graphs": cuda_graphs, "gradient_checkpointing": checkpointing})
    start = time.perf_counter()
    trained = train_lora(config, listeners=[on_event], backbone=_host_backbone(checkpoint, device) if host else None)
    if device.type == "cuda":
        torch.cuda.synchronize()
    (step0, time0), (step1, time1) = synced[0], synced[-1]
    result = {"steps_per_s": (step1 - step0) / (time1 - time0), "first_step_s": first[0] - start,
              # reserved, not allocated: a CUDA graph's activations live in its own pool, outside "allocated"
              "peak_gib": torch.cuda.max_memory_reserved() / 2**30 if device.type == "cuda" else None,
              "peak_allocated_gib": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None,
              "lora_file": trained.lora_file}
    gc.collect()  # the run's modules sit in reference cycles (peft, accelerate): free them before the next run
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


def _rank_worker(rank: int, processes: int, port: int, args: tuple, modes: tuple[str, ...], results) -> None:
    """One process of a multi-GPU run, set up as `accelerate launch` / torchrun set up theirs."""
    os.environ.update({"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(processes),
                       "LOCAL_WORLD_SIZE": str(processes), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    checkpoint, data, tmp, resolution, batch, steps, device = args
    if device.type == "cuda":
        torch.cuda.set_device(rank)
        device = torch.device("cuda", rank)
    else:
        torch.set_num_threads(1)
    try:
        for mode in modes:
            result = _time_trainer(checkpoint, data, tmp, resolution, batch, steps, device, mode,
                                   tag=f"-{processes}procs")
            if rank == 0:
                results[mode] = result
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def _time_processes(processes: int, checkpoint: Path, data: Path, tmp: Path, resolution: int, batch: int,
                    steps: int, device: torch.device, modes: tuple[str, ...]) -> dict:
    """Our trainer in `processes` processes (one GPU each), global batch `batch`; rank 0's numbers per mode."""
    import torch.multiprocessing as mp

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_rank_worker, args=(processes, port, (checkpoint, data, tmp, resolution, batch, steps, device),
                                     modes, results), nprocs=processes)
        return dict(results)


def bench_train(family: str = "sd15", batch: int = 4, steps: int = 50, size: str = "real", device: str = "auto",
                peak_tflops: float = 790.0, out: Path | None = None, checkpointing: bool = False,
                processes: int = 1, levers: bool = False, compile_unet: bool = False) -> dict:
    """Our trainer beside the plain eager loop on the same model and modules; prints a table, returns numbers.

    `processes` > 1 also times the trainer in that many processes (one GPU each; on a CPU, gloo) at `batch`
    images per process; `levers` times each lever of the plain loop on its own, eagerly and captured;
    `compile_unet` adds a row with `torch_compile: true` (its first step includes the compile).
    """
    from lora_trainer.backbones.sd import DiffusionBackbone
    from lora_trainer.backbones.tiny import build_tiny_checkpoint

    torch_device = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                                "cpu" if device == "auto" else device)
    resolution = (512 if family == "sd15" else 1024) if size == "real" else 64
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        checkpoint = tmp / "model.safetensors"
        if size == "real":
            real_shape_checkpoint(checkpoint, family)
        else:
            build_tiny_checkpoint(checkpoint, {"sd15": "sd1", "sdxl": "sdxl"}[family])
        data = tmp / "data"
        synthetic_photos(data, max(batch * max(processes, 1) * 4, 8), size=resolution)
        for image in data.glob("*.jpg"):
            image.with_suffix(".txt").write_text("a photo", encoding="utf-8")

        reference_model = DiffusionBackbone.from_file(checkpoint)
        targets = reference_model.unet_lora_targets("attention_ff")
        if torch_device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        reference = _reference_loop(reference_model, targets, batch, resolution, steps, torch_device)
        reference["peak_gib"] = torch.cuda.max_memory_reserved() / 2**30 if torch_device.type == "cuda" else None
        reference["peak_allocated_gib"] = torch.cuda.max_memory_allocated() / 2**30 if torch_device.type == "cuda" else None
        del reference_model
        gc.collect()
        if torch_device.type == "cuda":
            torch.cuda.empty_cache()

        ours = {mode: _time_trainer(checkpoint, data, tmp, resolution, batch, steps, torch_device, mode)
                for mode in ("off", "auto")}
        ours["host"] = _time_trainer(checkpoint, data, tmp, resolution, batch, steps, torch_device, "auto", host=True)
        # the WebUI keeps its UNet in fp16 and we train it as it is: a loss scale on the GPU, still captured
        ours["host_fp16"] = _time_trainer(checkpoint, data, tmp, resolution, batch, steps, torch_device, "auto",
                                          host=True, precision="fp16")
        # the noise floor of the captured-vs-eager comparison: two eager runs of the same seed
        ours["off_again"] = _time_trainer(checkpoint, data, tmp, resolution, batch, steps, torch_device, "off",
                                          tag="-again")
        noise_floor = _lora_difference(ours["off"]["lora_file"], ours["off_again"]["lora_file"])
        if checkpointing:
            ours["checkpointing"] = _time_trainer(checkpoint, data, tmp, resolution, batch, steps, torch_device,
                                                  "auto", checkpointing=True)
        if compile_unet:
            ours["compiled"] = _time_trainer(checkpoint, data, tmp, resolution, batch, steps, torch_device, "auto",
                                             compile_unet=True)
        drift = _lora_difference(ours["off"]["lora_file"], ours["auto"]["lora_file"])
        compiled_drift = _lora_difference(ours["off"]["lora_file"], ours["compiled"]["lora_file"]) if compile_unet else None
        if processes > 1:
            multi = _time_processes(processes, checkpoint, data, tmp, resolution, batch * processes, steps,
                                    torch_device, ("off", "auto"))
            multi_drift = _lora_difference(multi["off"]["lora_file"], multi["auto"]["lora_file"])
        lever_rows = bench_levers(checkpoint, batch, resolution, min(steps, 30), torch_device) if levers else []
    flops = reference["flops_per_step"]
    rows = []
    for name, result in (("plain eager diffusers + peft", reference), ("lora_trainer, eager step", ours["off"]),
                         ("lora_trainer (cuda_graphs: auto)", ours["auto"]),
                         ("lora_trainer on a host's model (WebUI/ComfyUI path)", ours["host"]),
                         ("lora_trainer on a host's fp16 model (WebUI path, fp16)", ours["host_fp16"]),
                         *((("lora_trainer, gradient checkpointing", ours["checkpointing"]),) if checkpointing else ()),
                         *((("lora_trainer, torch_compile: true", ours["compiled"]),) if compile_unet else ()),
                         *(((f"lora_trainer, {processes} processes, eager step (DDP)", multi["off"]),
                            (f"lora_trainer, {processes} processes (cuda_graphs: auto)", multi["auto"]))
                           if processes > 1 else ())):
        per_step = batch * processes if "processes" in name else batch
        images = result["steps_per_s"] * per_step
        rows.append({"trainer": name, "steps_per_s": round(result["steps_per_s"], 2), "images_per_s": round(images, 2),
                     "peak_gib": None if result["peak_gib"] is None else round(result["peak_gib"], 2),
                     "peak_allocated_gib": None if result.get("peak_allocated_gib") is None
                     else round(result["peak_allocated_gib"], 2),
                     "first_step_s": round(result.get("first_step_s", 0.0), 1),
                     "percent_of_ideal": round(100 * result["steps_per_s"] * flops / (peak_tflops * 1e12), 2)})
    report = {"family": family, "size": size, "batch": batch, "resolution": resolution, "device": str(torch_device),
              "lora_modules": len(targets), "tflop_per_step": round(flops / 1e12, 3), "rows": rows,
              "speedup_vs_eager": round(ours["auto"]["steps_per_s"] / reference["steps_per_s"], 2),
              "captured_vs_eager_lora_difference": drift, "eager_vs_eager_lora_difference": noise_floor,
              "compiled_vs_eager_lora_difference": compiled_drift,
              "levers": lever_rows}
    if processes > 1:
        report["processes"] = processes
        report["multi_process_speedup_vs_one"] = round(
            multi["auto"]["steps_per_s"] * processes / ours["auto"]["steps_per_s"], 2)
        report["multi_process_captured_vs_eager_lora_difference"] = multi_drift
    print(f"{family} {size}, batch {batch}, {resolution} px, {len(targets)} LoRA modules, {report['tflop_per_step']} TFLOP/step")
    print("| trainer | steps/s | images/s | peak GiB (allocated) | first step s | % of ideal |")
    print("| --- | --- | --- | --- | --- | --- |")
    for row in rows:
        print(f"| {row['trainer']} | {row['steps_per_s']} | {row['images_per_s']} | {row['peak_gib']} "
              f"({row['peak_allocated_gib']}) | {row['first_step_s']} | {row['percent_of_ideal']} |")
    print(f"LoRA after {steps + 10} steps, captured vs eager step (same seed): largest difference "
          f"{drift:.2e} of the largest weight; two eager runs: {noise_floor:.2e}" +
          (f"; compiled vs eager: {report['compiled_vs_eager_lora_difference']:.2e}" if compile_unet else ""))
    if processes > 1:
        print(f"{processes} processes (cuda_graphs: auto) vs one: {report['multi_process_speedup_vs_one']}x the images/s; "
              f"LoRA captured vs eager step: {multi_drift:.2e}")
    if out:
        Path(out).write_text(json.dumps(report, indent=2), encoding="utf-8")
    return report


def _lora_difference(first: Path, second: Path) -> float:
    """The largest weight difference between two LoRA files, relative to the largest weight."""
    from safetensors.torch import load_file

    a, b = load_file(str(first)), load_file(str(second))
    biggest = max(float(t.float().abs().max()) for k, t in a.items() if k.endswith("weight"))
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a if k.endswith("weight")) / biggest


LM_SHAPES = {  # a TinyLlama-1.1B-shaped model, and one that trains in seconds on a CPU
    "real": {"vocab_size": 32000, "hidden": 2048, "layers": 22, "heads": 32, "kv_heads": 4, "intermediate": 5632,
             "context": 2048},
    "tiny": {"vocab_size": 512, "hidden": 64, "layers": 2, "heads": 4, "kv_heads": 2, "intermediate": 128,
             "context": 256},
}


def _plain_lm_loop(folder: Path, batch: int, seq: int, steps: int, device: torch.device, rank: int, alpha: float,
                   targets: list[str]) -> dict:
    """The usual transformers + peft loop: bf16 model, fp32 LoRA under autocast, fused AdamW, loss every step."""
    import transformers
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    cuda = device.type == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    key = "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"
    model = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True, **{key: dtype}).to(device)
    model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", r=rank, lora_alpha=alpha, target_modules=targets))
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.data = p.data.float()
    optimizer = torch.optim.AdamW(params, lr=2e-4, weight_decay=0.01, fused=cuda)
    ids = torch.randint(6, model.config.vocab_size, (batch, seq), device=device)

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
            loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(3):
        step()
    _sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    _sync(device)
    return {"steps_per_s": steps / (time.perf_counter() - start)}


def _time_lm_trainer(folder: Path, data: Path, out: Path, batch: int, seq: int, steps: int, device: torch.device,
                     cuda_graphs: str, checkpointing: bool = False, tag: str = "") -> dict:
    """Our trainer (model_type: causal_lm, packed rows of `seq` tokens): steps/s after 5 warm steps, time to the
    first step, peak memory from the model's move to the GPU on."""
    from lora_trainer.config import make_config
    from lora_trainer.train.loop import train_lora

    first: list[float] = []
    synced: list[tuple[int, float]] = []

    def on_event(event) -> None:
        if event.kind == "start" and device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        elif event.kind == "progress" and not first:
            first.append(time.perf_counter())
        elif event.kind == "loss" and event.step >= 5:
            synced.append((event.step, time.perf_counter()))

    config = make_config({"model_type": "causal_lm", "base_model": str(folder), "train_data_dir": str(data),
                          "output_dir": str(out / f"lm-{cuda_graphs}-{checkpointing}{tag}"), "batch_size": batch,
                          "max_seq_length": seq, "packing": True, "max_steps": steps + 5, "validation_split": 0.0,
                          "log_every_n_steps": 5, "save_every_n_epochs": 0, "lora_rank": 8, "lora_alpha": 16,
                          "device": "cpu" if device.type == "cpu" else "auto", "cuda_graphs": cuda_graphs,
                          "mixed_precision": "bf16" if device.type == "cuda" else "no",
                          "gradient_checkpointing": checkpointing, "save_dtype": "fp32"})
    start = time.perf_counter()
    trained = train_lora(config, listeners=[on_event])
    _sync(device)
    (step0, time0), (step1, time1) = synced[0], synced[-1]
    result = {"steps_per_s": (step1 - step0) / (time1 - time0), "first_step_s": first[0] - start,
              "peak_gib": torch.cuda.max_memory_reserved() / 2**30 if device.type == "cuda" else None,
              "adapter": trained.lora_file / "adapter_model.safetensors"}
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


def bench_lm(size: str = "real", batch: int = 4, seq: int = 1024, steps: int = 20, device: str = "auto",
             out: Path | None = None, checkpointing: bool = False) -> dict:
    """A random-weight LLaMA of ~1.1B parameters (or tiny): our causal-LM trainer beside a plain transformers +
    peft loop with the same settings (bf16, LoRA r8 on q_proj,v_proj, AdamW, seq tokens per row); tokens/s."""
    from lora_trainer.backbones.tiny_lm import build_tiny_lm

    torch_device = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                                "cpu" if device == "auto" else device)
    shape = LM_SHAPES["tiny" if size == "tiny" else "real"]
    seq = min(seq, shape["context"])
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        with torch.device(torch_device):
            folder = build_tiny_lm(tmp / "model", dtype=torch.bfloat16 if torch_device.type == "cuda" else torch.float32,
                                   **shape)
        data = tmp / "data"
        data.mkdir()
        rng = np.random.default_rng(0)
        words_needed = batch * seq * (steps + 8)
        for index in range(0, words_needed, 4000):
            (data / f"{index:08d}.txt").write_text(" ".join(f"w{i}" for i in rng.integers(0, shape["vocab_size"] - 10,
                                                                                          4000)), encoding="utf-8")
        if torch_device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        plain = _plain_lm_loop(folder, batch, seq, steps, torch_device, 8, 16, ["q_proj", "v_proj"])
        plain["peak_gib"] = torch.cuda.max_memory_reserved() / 2**30 if torch_device.type == "cuda" else None
        gc.collect()  # the plain loop's model and optimizer
        if torch_device.type == "cuda":
            torch.cuda.empty_cache()
        ours = {}
        for mode in ("off", "auto"):
            try:
                ours[mode] = _time_lm_trainer(folder, data, tmp, batch, seq, steps, torch_device, mode)
            except RuntimeError:  # report the other rows and what broke, rather than nothing
                import traceback

                traceback.print_exc()
                ours[mode] = {"steps_per_s": float("nan"), "peak_gib": None, "first_step_s": float("nan")}
        if checkpointing:
            ours["checkpointing"] = _time_lm_trainer(folder, data, tmp, batch, seq, steps, torch_device, "off", True)
        again = _time_lm_trainer(folder, data, tmp, batch, seq, steps, torch_device, "off", tag="-again")
        drift = _lora_difference(ours["off"]["adapter"], ours["auto"]["adapter"]) if "adapter" in ours["auto"] else None
        noise_floor = _lora_difference(ours["off"]["adapter"], again["adapter"])
        parameters = sum(f.stat().st_size for f in folder.glob("*.safetensors")) // (2 if torch_device.type == "cuda" else 4)
    rows = []
    for name, result in (("plain transformers + peft", plain), ("lora_trainer, eager step", ours["off"]),
                         ("lora_trainer (cuda_graphs: auto)", ours["auto"]),
                         *((("lora_trainer, gradient checkpointing", ours["checkpointing"]),) if checkpointing else ())):
        rows.append({"trainer": name, "steps_per_s": round(result["steps_per_s"], 3),
                     "tokens_per_s": round(result["steps_per_s"] * batch * seq),
                     "peak_gib": None if result["peak_gib"] is None else round(result["peak_gib"], 2),
                     "first_step_s": round(result.get("first_step_s", 0.0), 1)})
    report = {"model": f"LLaMA-shaped, {parameters / 1e6:,.0f}M parameters (random weights)", "size": size,
              "batch": batch, "seq": seq, "device": str(torch_device), "rows": rows,
              "speedup_vs_plain": round(ours["auto"]["steps_per_s"] / plain["steps_per_s"], 2),
              "captured_vs_eager_adapter_difference": drift, "eager_vs_eager_adapter_difference": noise_floor}
    print(f"{report['model']}, batch {batch} x {seq} tokens, {'bf16' if torch_device.type == 'cuda' else 'fp32'}, "
          "LoRA r8 on q_proj,v_proj")
    print("| trainer | steps/s | tokens/s | peak GiB | first step s |")
    print("| --- | --- | --- | --- | --- |")
    for row in rows:
        print(f"| {row['trainer']} | {row['steps_per_s']} | {row['tokens_per_s']} | {row['peak_gib']} | "
              f"{row['first_step_s']} |")
    print(f"Adapter after {steps + 5} steps, captured vs eager step (same seed): largest difference "
          f"{drift if drift is None else f'{drift:.2e}'} of the largest weight; two eager runs: {noise_floor:.2e}")
    if out:
        Path(out).write_text(json.dumps(report, indent=2), encoding="utf-8")
    return report

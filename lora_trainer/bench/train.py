"""`bench train`: our diffusion trainer beside the plain eager loop on the same random-weight model of real shape.

Rows: the plain loop, our eager and captured step, a host's in-memory model (WebUI/ComfyUI, bf16 and fp16),
optionally gradient checkpointing, torch.compile and several processes; the drift between captured and eager.
"""

from __future__ import annotations

import gc
import json
import os
import socket
import tempfile
import time
from pathlib import Path

import torch

from lora_trainer.bench.levers import bench_levers, plain_diffusers_loop
from lora_trainer.bench.measure import lora_difference, loss_gap, memory_cap, synthetic_photos, wait_for_device


def real_shape_checkpoint(path: Path, family: str) -> Path:
    """A random-weight checkpoint of the real SD1.5 or SDXL shapes, in the LDM single-file layout (fp16);
    'sdxl-vpred' adds the v_pred and ztsnr markers of NoobAI-XL v-pred files."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from safetensors.torch import save_file
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from lora_trainer.backbones.ldm import text_model_keys, unet_to_ldm
    from lora_trainer.backbones.tiny import clip_to_open_clip, vae_to_ldm, wake_text_encoders, wake_unet

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
        wake_unet(unet)  # LDM's zero-initialised output layers would make every prediction, and every gradient, zero
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
    if family.endswith("-vpred"):
        ckpt.update({"v_pred": torch.tensor([]), "ztsnr": torch.tensor([])})
    save_file({k: v.half().contiguous().cpu() for k, v in ckpt.items() if not k.endswith("position_ids")}, str(path))
    return path


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
                  tag: str = "", precision: str = "bf16", compile_unet: bool = False, extra: dict | None = None,
                  vram_gib: float | None = None) -> dict:
    """Our trainer on the benchmark model: steps/s after 10 warm steps, time to the first step, peak memory; `extra`
    config values; at most `vram_gib` of GPU memory (a smaller card)."""
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
                          "min_snr_gamma": 0, "cuda_graphs": cuda_graphs, "gradient_checkpointing": checkpointing,
                          "memory": "off",  # each row trains as set
                          **(extra or {})})
    start = time.perf_counter()
    with memory_cap(device, vram_gib):
        trained = train_lora(config, listeners=[on_event], backbone=_host_backbone(checkpoint, device) if host else None)
    wait_for_device(device)
    (step0, time0), (step1, time1) = synced[0], synced[-1]
    result = {"steps_per_s": (step1 - step0) / (time1 - time0), "first_step_s": first[0] - start,
              # reserved, not allocated: a CUDA graph's activations live in its own pool, outside "allocated"
              "peak_gib": torch.cuda.max_memory_reserved() / 2**30 if device.type == "cuda" else None,
              "peak_allocated_gib": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None,
              "lora_file": trained.lora_file, "losses": trained.losses}
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
                processes: int = 1, levers: bool = False, compile_unet: bool = False, fp8: bool = False,
                lean: bool = False, vram_gib: float | None = None, fp8_compute: bool = False) -> dict:
    """Our trainer beside the plain eager loop on the same model and modules; prints a table, returns numbers.

    `processes` > 1 also times the trainer in that many processes (one GPU each; on a CPU, gloo) at `batch`
    images per process; `levers` times each lever of the plain loop on its own, eagerly and captured;
    `compile_unet` adds a row with `torch_compile: true` (its first step includes the compile); `fp8` rows with
    `base_weights: fp8`, with and without checkpointing; `lean` leaves out the host rows; `vram_gib` caps the memory
    of the fp8 + checkpointing row (a smaller card emulated); `fp8_compute` adds fp8 + checkpointing with
    `fp8_compute: on`.
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
            build_tiny_checkpoint(checkpoint, {"sd15": "sd1"}.get(family, family))
        data = tmp / "data"
        synthetic_photos(data, max(batch * max(processes, 1) * 4, 8), size=resolution)
        for image in data.glob("*.jpg"):
            image.with_suffix(".txt").write_text("a photo", encoding="utf-8")

        reference_model = DiffusionBackbone.from_file(checkpoint)
        targets = reference_model.unet_lora_targets("attention_ff")
        if torch_device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        reference = plain_diffusers_loop(reference_model, targets, batch, resolution, steps, torch_device)
        reference["peak_gib"] = torch.cuda.max_memory_reserved() / 2**30 if torch_device.type == "cuda" else None
        reference["peak_allocated_gib"] = torch.cuda.max_memory_allocated() / 2**30 if torch_device.type == "cuda" else None
        del reference_model
        gc.collect()
        if torch_device.type == "cuda":
            torch.cuda.empty_cache()

        ours = {mode: _time_trainer(checkpoint, data, tmp, resolution, batch, steps, torch_device, mode)
                for mode in ("off", "auto")}
        if not lean:
            ours["host"] = _time_trainer(checkpoint, data, tmp, resolution, batch, steps, torch_device, "auto", host=True)
            # the WebUI keeps its UNet in fp16 and we train it as it is: a loss scale on the GPU, still captured
            ours["host_fp16"] = _time_trainer(checkpoint, data, tmp, resolution, batch, steps, torch_device, "auto",
                                              host=True, precision="fp16")
        # the noise floor of the captured-vs-eager comparison: two eager runs of the same seed
        ours["off_again"] = _time_trainer(checkpoint, data, tmp, resolution, batch, steps, torch_device, "off",
                                          tag="-again")
        noise_floor = lora_difference(ours["off"]["lora_file"], ours["off_again"]["lora_file"])
        if checkpointing or fp8 or fp8_compute:
            ours["checkpointing"] = _time_trainer(checkpoint, data, tmp, resolution, batch, steps, torch_device,
                                                  "auto", checkpointing=True)
        if fp8:
            for name, with_checkpointing in (("fp8", False), ("fp8_checkpointing", True)):
                ours[name] = _time_trainer(checkpoint, data, tmp, resolution, batch, steps, torch_device, "auto",
                                           checkpointing=with_checkpointing, extra={"base_weights": "fp8"},
                                           vram_gib=vram_gib if with_checkpointing else None, tag=f"-{name}")
        if fp8_compute:
            ours["fp8_compute"] = _time_trainer(checkpoint, data, tmp, resolution, batch, steps, torch_device, "auto",
                                               checkpointing=True, extra={"base_weights": "fp8", "fp8_compute": "on"},
                                               vram_gib=vram_gib, tag="-fp8_compute")
        fp8_compute_drift = lora_difference(ours["checkpointing"]["lora_file"], ours["fp8_compute"]["lora_file"]) \
            if fp8_compute else None
        fp8_drift = lora_difference(ours["checkpointing"]["lora_file"], ours["fp8_checkpointing"]["lora_file"]) \
            if fp8 else None
        fp8_gap = loss_gap(ours["checkpointing"]["losses"], ours["fp8_checkpointing"]["losses"]) if fp8 else None
        if compile_unet:
            ours["compiled"] = _time_trainer(checkpoint, data, tmp, resolution, batch, steps, torch_device, "auto",
                                             compile_unet=True)
        drift = lora_difference(ours["off"]["lora_file"], ours["auto"]["lora_file"])
        compiled_drift = lora_difference(ours["off"]["lora_file"], ours["compiled"]["lora_file"]) if compile_unet else None
        if processes > 1:
            multi = _time_processes(processes, checkpoint, data, tmp, resolution, batch * processes, steps,
                                    torch_device, ("off", "auto"))
            multi_drift = lora_difference(multi["off"]["lora_file"], multi["auto"]["lora_file"])
        lever_rows = bench_levers(checkpoint, batch, resolution, min(steps, 30), torch_device) if levers else []
    flops = reference["flops_per_step"]
    rows = []
    for name, result in (("plain eager diffusers + peft", reference), ("lora_trainer, eager step", ours["off"]),
                         ("lora_trainer (cuda_graphs: auto)", ours["auto"]),
                         *((("lora_trainer on a host's model (WebUI/ComfyUI path)", ours["host"]),
                            ("lora_trainer on a host's fp16 model (WebUI path, fp16)", ours["host_fp16"])) if not lean else ()),
                         *((("lora_trainer, gradient checkpointing", ours["checkpointing"]),) if "checkpointing" in ours else ()),
                         *((("lora_trainer, base_weights: fp8", ours["fp8"]),
                            ("lora_trainer, base_weights: fp8 + gradient checkpointing", ours["fp8_checkpointing"]))
                           if fp8 else ()),
                         *((("lora_trainer, fp8_compute: on + gradient checkpointing", ours["fp8_compute"]),)
                           if fp8_compute else ()),
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
              # what quantizing the base does, against the same run on the full-precision base (both checkpointed)
              "fp8_vs_full_lora_difference": fp8_drift, "fp8_vs_full_loss_gap": fp8_gap, "vram_gib_cap": vram_gib,
              "fp8_compute_vs_full_lora_difference": fp8_compute_drift, "levers": lever_rows}
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
    if fp8:
        print(f"base_weights: fp8 vs full (both checkpointed): LoRA largest difference {fp8_drift:.2e} of the largest "
              f"weight, losses {100 * fp8_gap:.2f}% apart on average")
    if fp8_compute:
        print(f"fp8_compute: on vs full base (both checkpointed): LoRA largest difference {fp8_compute_drift:.2e} of "
              "the largest weight")
    if processes > 1:
        print(f"{processes} processes (cuda_graphs: auto) vs one: {report['multi_process_speedup_vs_one']}x the images/s; "
              f"LoRA captured vs eager step: {multi_drift:.2e}")
    if out:
        Path(out).write_text(json.dumps(report, indent=2), encoding="utf-8")
    return report

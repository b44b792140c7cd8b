"""The plain eager diffusers + peft loop every training number is read against, and its levers one at a time.

`bench train --levers` turns each lever (frozen-weight dtype, channels_last, an SDPA backend, torch.compile, ...)
on its own, eagerly and with the trainer's captured step, and reports what it is worth.
"""

from __future__ import annotations

import contextlib
import gc
import time
from pathlib import Path

import torch

from lora_trainer.bench.measure import wait_for_device

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


def plain_diffusers_loop(backbone, targets: list[str], batch: int, size: int, steps: int, device, rank: int = 16,
                         *, capture: bool = False, frozen_dtype: torch.dtype | None = None,
                         channels_last: bool = False, sdpa: str | None = None, item_every_step: bool = False,
                         data_on_cpu: bool = False, keep_input_dtype: bool = False,
                         compile_mode: str | None = None) -> dict:
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
        torch.compiler.reset()  # a fresh compile for this model: its time is part of the first step
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
    wait_for_device(device)
    first_step_s = time.perf_counter() - start
    flops = 0
    if not capture and not compile_mode:
        with FlopCounterMode(display=False) as counter:
            step()
        flops = counter.get_total_flops()
    for _ in range(3):
        step()
    wait_for_device(device)
    start = time.perf_counter()
    for index in range(steps):
        step()
        if index % 10 == 9 and not item_every_step:
            float(losses[-1])  # the trainer's habit: one host sync every 10 steps
    wait_for_device(device)
    seconds = time.perf_counter() - start
    if compile_mode:
        torch.compiler.reset()  # let go of the compiled graphs (they hold on to this model)
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
                result = plain_diffusers_loop(model, targets, batch, size, steps, device,
                                              capture=mode == "captured", **lever)
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

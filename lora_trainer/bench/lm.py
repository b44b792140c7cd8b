"""`bench lm`: our causal-LM trainer beside a plain transformers + peft loop, on a random-weight LLaMA shape."""

from __future__ import annotations

import gc
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from lora_trainer.bench.measure import lora_difference, wait_for_device

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
    wait_for_device(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    wait_for_device(device)
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
    wait_for_device(device)
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
        drift = lora_difference(ours["off"]["adapter"], ours["auto"]["adapter"]) if "adapter" in ours["auto"] else None
        noise_floor = lora_difference(ours["off"]["adapter"], again["adapter"])
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

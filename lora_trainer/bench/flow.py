"""`bench train --family flux1|zimage|klein4b`: our trainer on a diffusion transformer of the real shapes, random
weights, 1024 px, bf16, rank 16, batch 1: steps/s, peak memory and the share of the GPU's FLOP ideal.

The model is built in GPU memory (no 35 GB of files to write and read back); the text encoders and autoencoder
are real-sized too, so caching runs as it would, but only the training steps are timed. kohya sd-scripts' Flux
trainer runs beside it from the peer scripts (see the README's "Performance").
"""

from __future__ import annotations

import gc
import json
import tempfile
import time
from pathlib import Path

import torch

from lora_trainer.bench.measure import lora_difference, loss_gap, memory_cap, synthetic_photos, wait_for_device


def _real_models(device: torch.device, build) -> tuple:
    """`build()`'s models made in bf16 straight on `device` (a 12B transformer built on a CPU takes minutes), at a
    trained model's scale (`tame`)."""
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            models = build()
    finally:
        torch.set_default_dtype(torch.float32)
    for model in models:
        tame(model)
    return models


def _flux_vae():
    """Flux.1's 16-channel autoencoder (Z-Image uses it too), in fp32 as the families load it."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=16,
                         down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                         use_quant_conv=False, use_post_quant_conv=False)


def _qwen3_4b(layers: int):
    """Qwen3-4B's first `layers` decoder layers with the final norm an identity, as `qwen.qwen3_encoder` builds it."""
    from transformers import Qwen3Config, Qwen3Model

    model = Qwen3Model(Qwen3Config(vocab_size=151936, hidden_size=2560, intermediate_size=9728,
                                   num_hidden_layers=layers, num_attention_heads=32, num_key_value_heads=8,
                                   head_dim=128, rms_norm_eps=1e-6, rope_theta=1_000_000.0,
                                   max_position_embeddings=40960, tie_word_embeddings=False, use_cache=False))
    model.norm = torch.nn.Identity()
    return model.eval()


def real_flux1(device: torch.device):
    """Flux.1-dev of the real shapes (12B transformer, T5-XXL, CLIP-L, the 16-channel autoencoder), random weights."""
    from diffusers import FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel, T5TokenizerFast

    from lora_trainer.backbones.flux import FluxBackbone
    from lora_trainer.backbones.tiny_flow import t5_tokenizer_files
    from lora_trainer.backbones.tokenizer import clip_tokenizer

    transformer, t5, clip = _real_models(device, lambda: (
        FluxTransformer2DModel(num_layers=19, num_single_layers=38, attention_head_dim=128, num_attention_heads=24,
                               joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
                               in_channels=64),
        T5EncoderModel(T5Config(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
                                feed_forward_proj="gated-gelu", is_encoder_decoder=False, dropout_rate=0.0)),
        CLIPTextModel(CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                     num_attention_heads=12, hidden_act="quick_gelu"))))
    folder = Path(tempfile.mkdtemp()) / "t5_tokenizer"
    tokenizer = T5TokenizerFast.from_pretrained(str(t5_tokenizer_files(folder)))
    return FluxBackbone(family="flux1", transformer=transformer, vae=_flux_vae(), text_encoders=[clip.to("cpu"),
                        t5.to("cpu")], tokenizers=[clip_tokenizer(), tokenizer], name="flux1-dev-random", variant="dev")


def real_zimage(device: torch.device):
    """Z-Image-Turbo of the real shapes (6.2B single-stream transformer, Qwen3-4B read at its layer 35, the Flux.1
    autoencoder), random weights; Qwen's tokenizer is the tests' small one (the ids only need to be in range)."""
    from lora_trainer.backbones.qwen import qwen_tokenizer_from
    from lora_trainer.backbones.tiny_zimage import qwen_tokenizer_files
    from lora_trainer.backbones.zimage import AXES_LENS, ZImageBackbone, zimage_classes

    transformer_class = zimage_classes()[0]
    transformer, qwen = _real_models(device, lambda: (
        transformer_class(dim=3840, n_layers=30, n_refiner_layers=2, n_heads=30, n_kv_heads=30, cap_feat_dim=2560,
                          axes_dims=[32, 48, 48], axes_lens=AXES_LENS),
        _qwen3_4b(35)))
    tokenizer = qwen_tokenizer_from(qwen_tokenizer_files(Path(tempfile.mkdtemp()) / "qwen_tokenizer"))
    return ZImageBackbone(family="zimage", transformer=transformer, vae=_flux_vae(), text_encoders=[qwen.to("cpu")],
                          tokenizers=[tokenizer], name="z-image-turbo-random", variant="turbo")


def real_klein4b(device: torch.device):
    """Flux.2 klein 4B base of the real shapes (5 double and 20 single blocks, 3072 wide; Qwen3-4B read at its
    layers 9, 18 and 27; the Flux.2 autoencoder), random weights; Qwen's tokenizer is the tests' small one."""
    from diffusers import AutoencoderKLFlux2, Flux2Transformer2DModel

    from lora_trainer.backbones.flux2 import TEXT_LAYERS, KleinBackbone
    from lora_trainer.backbones.qwen import qwen_tokenizer_from
    from lora_trainer.backbones.tiny_flux2 import qwen_tokenizer_files

    transformer, qwen = _real_models(device, lambda: (
        Flux2Transformer2DModel(num_layers=5, num_single_layers=20, attention_head_dim=128, num_attention_heads=24,
                                joint_attention_dim=3 * 2560, in_channels=128, guidance_embeds=False),
        _qwen3_4b(TEXT_LAYERS[-1])))
    folder = Path(tempfile.mkdtemp()) / "qwen_tokenizer"
    qwen_tokenizer_files(folder)
    return KleinBackbone(family="klein", transformer=transformer, vae=AutoencoderKLFlux2(),
                         text_encoders=[qwen.to("cpu")], tokenizers=[qwen_tokenizer_from(folder)],
                         name="flux-2-klein-base-4b-random", variant="4b", distilled=False)


def tame(model: torch.nn.Module) -> None:
    """Weights as a trained model has them in scale (std 0.02, zero biases; norms left at 1), as the peer
    benchmark's files have them too: with default random initialisation the loss turned NaN within 5 steps."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.ndim >= 2:
                param.normal_(0, 0.02)
            elif name.endswith("bias"):
                param.zero_()


BUILDERS = {"flux1": real_flux1, "zimage": real_zimage, "klein4b": real_klein4b}
GGUF_TYPES = {"Q8_0": 8, "Q4_K": 12}


def as_gguf(backbone, qtype: str) -> None:
    """Every linear weight of the transformer's repeated blocks as a GGUF file of `qtype` holds it, noted in
    `backbone.stored` as `files.read_weights` notes a GGUF file's blocks: what loading such a file gives. Q8_0: the
    weight quantized (llama.cpp's format: per 32 values an fp16 scale and int8s); Q4_K: random blocks at a trained
    model's scale (nothing here makes K-quants). Made on the weights' device, kept in CPU memory as from a file."""
    from lora_trainer.backbones.flow import repeated_blocks
    from lora_trainer.memory.gguf_files import Packed, dequantized

    code = GGUF_TYPES[qtype]
    for block in repeated_blocks(backbone.transformer):
        for module in block.modules():
            if type(module) is not torch.nn.Linear:
                continue
            weight = module.weight.detach()
            rows, columns = weight.shape
            if qtype == "Q8_0":
                values = weight.float().reshape(-1, 32)
                scale = (values.abs().amax(dim=1, keepdim=True) / 127).half()
                quantized = (values / scale.float().clamp(min=1e-12)).round().clamp(-127, 127).to(torch.int8)
                data = torch.cat([scale.view(torch.uint8), quantized.view(torch.uint8)], dim=1)
            else:  # d and dmin (fp16) chosen so that values span about -0.02..0.04, centred near 0
                data = torch.randint(0, 256, (rows * columns // 256, 144), dtype=torch.uint8, device=weight.device)
                data[:, :4] = torch.tensor([4e-5, 3e-4], dtype=torch.float16, device=weight.device).view(torch.uint8)
            data = data.reshape(rows, -1)
            value = dequantized(data, code, columns, weight.dtype).cpu()
            module.weight = torch.nn.Parameter(value, requires_grad=False)
            backbone.stored[value.untyped_storage().data_ptr()] = Packed(data.cpu(), code, columns)


def _time(backbone, data: Path, out: Path, steps: int, device: torch.device, vram_gib: float | None = None,
          **options) -> dict:
    """Our trainer on `backbone`: steps/s after 5 warm steps, peak memory of the training part; at most `vram_gib`
    of GPU memory (a smaller card)."""
    from lora_trainer.config import make_config
    from lora_trainer.train.loop import train_lora

    synced: list[tuple[int, float]] = []
    started: list[float] = []

    def on_event(event) -> None:
        if event.kind == "progress" and event.data.get("phase") == "caching" and event.step == event.total \
                and device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        elif event.kind == "progress" and event.data.get("phase") == "training":
            started.append(time.perf_counter())
        elif event.kind == "loss" and event.step >= 5:
            synced.append((event.step, time.perf_counter()))

    config = make_config({"train_data_dir": str(data), "resolution": 1024, "batch_size": 1, "max_steps": steps + 5,
                          "lora_rank": 16, "lora_alpha": 16, "output_dir": str(out), "save_every_n_epochs": 0,
                          "log_every_n_steps": 5, "mixed_precision": "bf16" if device.type == "cuda" else "no",
                          "device": "auto" if device.type == "cuda" else "cpu", "enable_buckets": False,
                          "lora_targets": "locon", **options})
    with memory_cap(device, vram_gib):
        trained = train_lora(config, listeners=[on_event], backbone=backbone)
    wait_for_device(device)
    (step0, time0), (step1, time1) = synced[0], synced[-1]
    result = {"steps_per_s": (step1 - step0) / (time1 - time0), "first_5_steps_s": time0 - started[0],
              "peak_gib": torch.cuda.max_memory_reserved() / 2**30 if device.type == "cuda" else None,
              "peak_allocated_gib": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None,
              "lora_file": trained.lora_file, "losses": trained.losses,
              "planned_peak_gib": trained.metrics.get("planned_peak_gib")}
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


def step_flops(backbone, device: torch.device) -> float:
    """FLOPs of one training step (forward and backward through the LoRA'd transformer) at 1024 px, batch 1."""
    from torch.utils.flop_counter import FlopCounterMode

    channels, height, width = backbone.latent_shape(1024)
    texts = backbone.run["text_cache"]
    cond = {k: v.unsqueeze(0).to(device) for k, v in next(iter(texts.values())).items()}
    inputs = {"noisy": torch.randn(1, channels, height, width, device=device, dtype=torch.bfloat16),
              "sigmas": torch.full((1,), 0.5, device=device),
              "target": torch.randn(1, channels, height, width, device=device),
              **{f"cond_{k}": v for k, v in cond.items()}}
    with FlopCounterMode(display=False) as counter, torch.autocast(device.type, dtype=torch.bfloat16):
        backbone.loss(backbone.transformer, inputs).backward()
    backbone.transformer.zero_grad(set_to_none=True)
    return float(counter.get_total_flops())


def bench_flow(family: str = "flux1", steps: int = 30, size: str = "real", device: str = "auto",
               peak_tflops: float = 790.0, out: Path | None = None, checkpointing: bool = False, compile_model: bool = False,
               fp8: bool = False, vram_gib: float | None = None, lean: bool = False, gguf: str = "",
               nf4: bool = False, stream: int = 0, memory_auto: bool = False, fp8_compute: bool = False,
               only: tuple[str, ...] = ()) -> dict:
    """Our trainer, eager and captured (and with checkpointing, compiled, on an fp8 base, if asked) on `family`.

    Every row starts from the model in CPU memory, as from a file, so that its peak is what a card needs;
    `vram_gib` caps the memory of the fp8 + checkpointing and GGUF rows; `lean` leaves out the eager rows (and the
    drift); `only` keeps the rows of these names; `nf4` a row with `base_weights: nf4`; `gguf` ('Q8_0', 'Q4_K') a row on the transformer held as a GGUF file of that type holds it; `stream` a row
    of fp8 + checkpointing with that many blocks streamed (`stream_blocks`); `memory_auto` a row where the memory plan
    picks the levers for the `vram_gib` cap (the others train as set); `fp8_compute` a row of fp8 + checkpointing with
    `fp8_compute: on`, its LoRA compared with the fp8 row's and the full-precision one's."""
    torch_device = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                                "cpu" if device == "auto" else device)
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = tmp / "data"
        synthetic_photos(data, 8, size=1024 if size == "real" else 64)
        for image in data.glob("*.jpg"):
            image.with_suffix(".txt").write_text("a photo of a sks dog in a garden", encoding="utf-8")

        def fresh():
            if size == "real":
                return BUILDERS[family](torch_device)
            from lora_trainer.backbones.tiny_flow import build_tiny_flux
            from lora_trainer.backbones.tiny_flux2 import build_tiny_klein
            from lora_trainer.backbones.tiny_zimage import build_tiny_zimage

            builder = {"flux1": build_tiny_flux, "zimage": build_tiny_zimage, "klein4b": build_tiny_klein}[family]
            return builder(tmp / "tiny")

        options = {} if size == "real" else {"resolution": 64}
        # two eager runs of the same seed give the noise floor of the captured-vs-eager comparison
        # every row trains as set (memory: off), but the one that lets the memory plan choose under the cap
        captured = {"cuda_graphs": "on", "torch_compile": "off", "memory": "off"}
        modes = [] if lean else [("eager", {"cuda_graphs": "off", "torch_compile": "off", "memory": "off"}),
                                 ("eager again", {"cuda_graphs": "off", "torch_compile": "off", "memory": "off"})]
        modes.append(("captured", captured))
        if checkpointing or fp8:
            modes.append(("checkpointing", {**captured, "gradient_checkpointing": True}))
        if fp8:
            modes += [("fp8", {**captured, "base_weights": "fp8"}),
                      ("fp8 + checkpointing", {**captured, "base_weights": "fp8", "gradient_checkpointing": True,
                                               "vram_gib": vram_gib})]
        if fp8_compute:
            modes.append(("fp8 compute + checkpointing", {**captured, "base_weights": "fp8", "fp8_compute": "on",
                                                          "gradient_checkpointing": True, "vram_gib": vram_gib}))
        streamed = f"fp8 + stream {stream} + checkpointing"
        if stream:
            modes.append((streamed, {**captured, "base_weights": "fp8", "gradient_checkpointing": True,
                                     "stream_blocks": stream, "vram_gib": vram_gib}))
        if memory_auto:
            modes.append(("memory: auto", {**captured, "memory": "auto", "vram_gib": vram_gib}))
        if nf4:
            modes.append(("nf4 + checkpointing", {**captured, "base_weights": "nf4", "gradient_checkpointing": True,
                                                  "vram_gib": vram_gib}))
        if gguf:
            modes.append((f"gguf {gguf} + checkpointing", {**captured, "gradient_checkpointing": True,
                                                            "vram_gib": vram_gib}))
        if compile_model:
            modes.append(("compiled", {"cuda_graphs": "on", "torch_compile": "on"}))
        modes = [(name, mode) for name, mode in modes if not only or name in only]
        flops = None
        for name, mode in modes:
            model = fresh()
            if size == "real" and name.startswith("gguf"):
                as_gguf(model, gguf)
            if size == "real":
                # as loaded from a file: the encoders go to the GPU for caching, then the transformer (layer by layer
                # where it is quantized or streamed), so each row's peak is what a card needs, and what `plan` predicts
                for module in (model.transformer, model.vae, *model.text_encoders):
                    module.to("cpu")
                torch.cuda.empty_cache()
            if size != "real":
                options["base_model"] = str(model)
                model = None
            rows[name] = _time(model, data, tmp / name, steps, torch_device, **options, **mode)
            if flops is None and model is not None and torch_device.type == "cuda":
                flops = step_flops(model, torch_device)
            del model
            gc.collect()
        eager = "eager" in rows and "captured" in rows and "eager again" in rows
        drift = lora_difference(rows["eager"]["lora_file"], rows["captured"]["lora_file"]) if eager else None
        noise_floor = lora_difference(rows["eager"]["lora_file"], rows.pop("eager again")["lora_file"]) \
            if eager else None
        compiled_drift = lora_difference(rows["eager"]["lora_file"], rows["compiled"]["lora_file"]) \
            if "compiled" in rows and "eager" in rows else None
        both = fp8 and "checkpointing" in rows and "fp8 + checkpointing" in rows
        fp8_drift = lora_difference(rows["checkpointing"]["lora_file"], rows["fp8 + checkpointing"]["lora_file"]) \
            if both else None
        fp8_gap = loss_gap(rows["checkpointing"]["losses"], rows["fp8 + checkpointing"]["losses"]) if both else None
        plain_fp8 = rows.get("fp8 + checkpointing")
        stream_drift = lora_difference(plain_fp8["lora_file"], rows[streamed]["lora_file"]) \
            if plain_fp8 and streamed in rows else None
        fast = rows.get("fp8 compute + checkpointing")
        fp8_compute_drift = {versus: lora_difference(rows[versus]["lora_file"], fast["lora_file"])
                             for versus in ("checkpointing", "fp8 + checkpointing") if fast and versus in rows}
        fp8_compute_gap = loss_gap(rows["checkpointing"]["losses"], fast["losses"]) \
            if fast and "checkpointing" in rows else None
        q8 = "gguf Q8_0 + checkpointing"
        q8 = q8 if "checkpointing" in rows else ""
        gguf_drift = lora_difference(rows["checkpointing"]["lora_file"], rows[q8]["lora_file"]) if q8 in rows else None
        gguf_gap = loss_gap(rows["checkpointing"]["losses"], rows[q8]["losses"]) if q8 in rows else None
    report = {"family": family, "size": size, "device": str(torch_device), "resolution": 1024, "batch": 1,
              "tflop_per_step": round(flops / 1e12, 2) if flops else None, "captured_vs_eager_lora_difference": drift,
              "eager_vs_eager_lora_difference": noise_floor, "compiled_vs_eager_lora_difference": compiled_drift,
              "fp8_vs_full_lora_difference": fp8_drift, "fp8_vs_full_loss_gap": fp8_gap, "vram_gib_cap": vram_gib,
              "gguf_q8_vs_full_lora_difference": gguf_drift, "gguf_q8_vs_full_loss_gap": gguf_gap,
              "streamed_vs_fp8_lora_difference": stream_drift,
              "fp8_compute_lora_difference": fp8_compute_drift or None, "fp8_compute_vs_full_loss_gap": fp8_compute_gap,
              "rows": [{"trainer": f"lora_trainer, {name}", "steps_per_s": round(r["steps_per_s"], 3),
                        "first_5_steps_s": round(r["first_5_steps_s"], 1),
                        "peak_gib": r["peak_gib"] and round(r["peak_gib"], 2),
                        "peak_allocated_gib": r["peak_allocated_gib"] and round(r["peak_allocated_gib"], 2),
                        "planned_peak_gib": r["planned_peak_gib"],
                        "percent_of_ideal": round(100 * r["steps_per_s"] * flops / (peak_tflops * 1e12), 1) if flops else None}
                       for name, r in rows.items()]}
    print(json.dumps(report, indent=2))
    if out:
        Path(out).write_text(json.dumps(report, indent=2), encoding="utf-8")
    return report

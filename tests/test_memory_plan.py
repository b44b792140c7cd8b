"""The memory plan: predicted peaks of the real models' shapes against the peaks measured on the H200, and what
`memory: auto` turns on (or refuses) for the memory a card has free."""

from __future__ import annotations

import dataclasses
import inspect
import logging

import pytest
import torch
from conftest import transformer_config

from lora_trainer.backbones.flux import FluxBackbone
from lora_trainer.backbones.tiny_flow import build_tiny_flux
from lora_trainer.config import make_config, resolve
from lora_trainer.errors import ConfigError, LoraTrainerError
from lora_trainer.memory import plan
from lora_trainer.memory.plan import GIB, estimate, fit, plan_memory

# measured on the H200 (README, "Low VRAM"): 1024 px, batch 1, rank 16, captured; peak GiB allocated
MEASURED = {
    "flux1": [({}, 62.2), ({"gradient_checkpointing": True, "base_weights": "fp8"}, 15.06),
              ({"gradient_checkpointing": True, "base_weights": "fp8", "stream_blocks": 24}, 11.04),
              ({"gradient_checkpointing": True, "base_weights": "fp8", "stream_blocks": 40}, 9.36),
              # what memory: auto chose under 12 and 8 GiB caps, and fp8_compute (its rounded inputs not counted)
              ({"gradient_checkpointing": True, "stream_blocks": 41, "vram_gib": 12}, 11.25),
              ({"gradient_checkpointing": True, "stream_blocks": 52, "vram_gib": 8}, 7.25),
              ({"gradient_checkpointing": True, "base_weights": "fp8", "fp8_compute": "on"}, 15.11),
              ({"gradient_checkpointing": True}, 25.97)],
    "zimage": [({}, 49.4), ({"gradient_checkpointing": True, "base_weights": "fp8"}, 8.87)],
    "klein4b": [({}, 25.5), ({"gradient_checkpointing": True, "base_weights": "fp8"}, 5.94),
                ({"gradient_checkpointing": True, "base_weights": "nf4"}, 5.97)],
    # SDXL's checkpointed rows were measured while caption encoding set the peak (the UNet and the fp32 text encoders
    # on the GPU together, since fixed); the plan's SDXL checkpointing constant comes from them and overestimates now
    "sdxl": [({}, 13.55), ({"gradient_checkpointing": True}, 7.91), ({"base_weights": "fp8"}, 11.45),
             ({"gradient_checkpointing": True, "base_weights": "fp8"}, 5.81)],
}


@pytest.fixture(scope="module")
def real_shapes():
    """The benchmarks' models of the real shapes, built without memory (on the meta device)."""
    from diffusers import UNet2DConditionModel

    from lora_trainer.backbones.sd import DiffusionBackbone
    from lora_trainer.bench import flow

    def on_meta(device, build):
        torch.set_default_dtype(torch.bfloat16)
        try:
            with torch.device("meta"):
                return build()
        finally:
            torch.set_default_dtype(torch.float32)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(flow, "_real_models", on_meta)
        patch.setattr(torch.nn.Module, "to", lambda self, *args, **kwargs: self)  # the builders move encoders
        models = {}
        for family in ("flux1", "zimage", "klein4b"):
            try:
                models[family] = flow.BUILDERS[family](torch.device("meta"))
            except (ImportError, AttributeError, LoraTrainerError):  # klein and Z-Image need newer diffusers
                pass
        with torch.device("meta"):
            unet = UNet2DConditionModel(
                sample_size=128, cross_attention_dim=2048, block_out_channels=(320, 640, 1280),
                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), addition_embed_type="text_time",
                addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816, use_linear_projection=True)
    models["sdxl"] = DiffusionBackbone(family="sdxl", unet=unet, vae=None, text_encoders=[], tokenizers=[])
    return models


def bench_config(family: str, **options):
    """The benchmark's settings (bench/flow.py, bench/train.py)."""
    values = {"train_data_dir": "/nowhere", "resolution": 1024, "batch_size": 1, "lora_rank": 16, **options}
    if family == "sdxl":
        return resolve(make_config(values), "sdxl")
    return make_config({**values, "lora_targets": "locon"})


@pytest.mark.parametrize("family", MEASURED)
def test_the_plan_predicts_every_measured_row_within_15_percent(family, real_shapes):
    if family not in real_shapes:
        pytest.skip(f"{family} needs newer diffusers/transformers")
    backbone = real_shapes[family]
    for options, measured in MEASURED[family]:
        options = dict(options)
        cap = options.pop("vram_gib", None)  # a capped run's text encoder encodes layer by layer where it must
        config = bench_config(family, **options)
        budget = None if cap is None else int(cap * GIB - plan.RESERVE)
        predicted = estimate(backbone.memory_parts(config), config, images=8, budget=budget).peak / GIB
        assert abs(predicted - measured) <= 0.15 * measured, (options, predicted, measured)


def test_the_plan_adds_up_the_known_shapes(real_shapes):
    config = bench_config("flux1", gradient_checkpointing=True, base_weights="fp8")
    parts = real_shapes["flux1"].memory_parts(config)
    planned = estimate(parts, config, images=8)
    # Flux.1-dev: 11.90 B weights, 11.83 B of them in the blocks' linear layers (one byte each, a float scale a row)
    assert round(planned.weights / 1e9, 2) == 11.98
    # rank 16 on every linear layer of the blocks: 85.9 M LoRA weights, 16 bytes each with AdamW
    assert round(planned.lora / 16 / 1e6, 1) == 85.9
    streamed = estimate(parts, make_config({**vars(config), "stream_blocks": 24}), images=8)
    assert round((planned.weights - streamed.weights) / 1e9, 2) == 4.31  # 24 blocks out, two 0.34 GB buffers in
    assert planned.encoding > 9.5e9  # T5-XXL (9.5 GB in bf16) encodes the captions


def test_memory_auto_turns_on_the_fewest_levers_that_fit(real_shapes):
    parts_of = real_shapes["flux1"].memory_parts
    config = bench_config("flux1")
    chosen = {}
    for free_gib in (80, 30, 20, 12):
        fitted, planned, _ = fit(config, parts_of(config), 8, int(free_gib * GIB))
        assert planned.peak <= free_gib * GIB
        chosen[free_gib] = (fitted.gradient_checkpointing, fitted.base_weights, fitted.stream_blocks)
    assert chosen[80] == (False, "auto", 0)
    assert chosen[30] == (True, "auto", 0)  # checkpointing keeps the LoRA exact: before streaming and fp8
    assert chosen[20][:2] == (True, "auto") and 0 < chosen[20][2] < chosen[12][2]  # the fewest blocks that fit
    # a lever set by the user stays on, fp8 comes once streaming every block is not enough
    fitted, _, _ = fit(bench_config("flux1", base_weights="fp8"), parts_of(config), 8, int(12 * GIB))
    assert fitted.base_weights == "fp8" and fitted.gradient_checkpointing


def test_memory_auto_chooses_what_it_chose_on_the_gpu_under_each_cap(real_shapes):
    # the H200 runs of `bench train --family flux1 --memory-auto --vram-gib 12` (and 8) reported 12.0 (8.0) GiB free
    config = bench_config("flux1")
    parts = real_shapes["flux1"].memory_parts(config)
    for cap, blocks in ((12, 41), (8, 52)):
        fitted, _, _ = fit(config, parts, 8, int(cap * GIB - plan.RESERVE))
        assert (fitted.gradient_checkpointing, fitted.base_weights, fitted.stream_blocks) == (True, "auto", blocks)


def test_flux_fits_an_8_gb_card_with_every_block_streamed_and_t5_encoding_layer_by_layer(real_shapes):
    config = bench_config("flux1")
    parts = real_shapes["flux1"].memory_parts(config)
    fitted, planned, _ = fit(config, parts, 8, int(7.5 * GIB))
    assert fitted.gradient_checkpointing and fitted.stream_blocks > 40 and fitted.base_weights == "auto"
    assert planned.encoding < 3 * GIB < 9 * GIB < estimate(parts, fitted, 8).encoding  # T5-XXL whole: 9.4 GiB
    t5 = real_shapes["flux1"].text_encoders[1]
    assert plan.text_placement(real_shapes["flux1"].text_encoders, int(7 * GIB)) == [False, True]  # T5, not CLIP
    assert plan.text_placement(real_shapes["flux1"].text_encoders, None) == [False, False]
    assert plan.text_peak(t5, on_demand=True) < 0.2 * plan.text_peak(t5)


def test_a_run_that_cannot_fit_is_refused_with_the_numbers_or_warned_about_in_a_host(real_shapes, monkeypatch,
                                                                                      caplog):
    backbone = real_shapes["flux1"]
    config = bench_config("flux1")
    with pytest.raises(ConfigError, match=r"4\.0 GiB are free.*would need 4\.\d GiB \(training 4\.\d"):
        fit(config, backbone.memory_parts(config), 8, int(4 * GIB))
    monkeypatch.setattr(plan, "free_memory", lambda device: int(4.5 * GIB))
    with pytest.raises(ConfigError, match="memory: off"):
        plan_memory(config, backbone, 8, torch.device("cuda"))
    parts_of = backbone.memory_parts  # as a host's model: already on its GPU
    monkeypatch.setattr(backbone, "memory_parts", lambda config: dataclasses.replace(parts_of(config), host=True))
    with caplog.at_level(logging.WARNING):
        kept, planned, note = plan_memory(config, backbone, 8, torch.device("cuda"))
    assert kept is config and planned is None and "does not fit" in caplog.text and note.startswith("This run")
    off = make_config({**vars(config), "memory": "off"})
    assert plan_memory(off, backbone, 8, torch.device("cuda"))[0] is off


@pytest.mark.skipif("gradient_checkpointing_func" not in inspect.signature(
    __import__("diffusers").ModelMixin.enable_gradient_checkpointing).parameters,
    reason="checkpointing a diffusion transformer needs diffusers >= 0.32")
def test_memory_auto_turns_checkpointing_on_in_a_run(dataset, tmp_path, monkeypatch):
    """The loop trains with what the plan chose (asked as if on a GPU with memory free between the tiny model's
    training peaks with and without checkpointing; its autoencoder's, larger, left out)."""
    from lora_trainer.train import loop

    monkeypatch.setattr(plan, "_encoder_peak", lambda encoder, config: 0)
    monkeypatch.setattr(plan, "text_peak", lambda encoder, on_demand=False: 0)
    checkpoint = build_tiny_flux(tmp_path / "model")
    config = transformer_config(checkpoint, dataset, tmp_path / "out", max_steps=2, resolution=256)
    backbone = FluxBackbone.load(config, None)
    parts = backbone.memory_parts(config)
    needs = {levers.get("gradient_checkpointing", False): estimate(parts, make_config({**vars(config), **levers}), 4).peak
             for levers in ({}, {"gradient_checkpointing": True})}
    assert needs[True] < needs[False]
    free = (needs[True] + needs[False]) // 2 + int(plan.RESERVE)
    monkeypatch.setattr(plan, "free_memory", lambda device: free)
    monkeypatch.setattr(loop, "plan_memory", lambda config, backbone, images, device:
                        plan_memory(config, backbone, images, torch.device("cuda")))
    warnings = []
    result = loop.train_lora(config, backbone=backbone,
                             listeners=[lambda e: warnings.append(e.data["message"]) if e.kind == "warning" else None])
    assert backbone.transformer.is_gradient_checkpointing
    planned = estimate(parts, make_config({**vars(config), "gradient_checkpointing": True}), 4).describe()
    assert warnings == [(f"memory: auto turned on gradient_checkpointing: true: without it the run would need more "
                         f"than the {free / GIB:.1f} GiB free; now {planned}.")]  # the tab's status shows it
    assert result.metrics["planned_peak_gib"] == round(needs[True] / GIB, 2)


def test_plan_prints_each_lever_set_and_what_auto_picks(dataset, tmp_path, capsys):
    from lora_trainer.hosts.cli import main

    checkpoint = build_tiny_flux(tmp_path / "model")
    (tmp_path / "run.yaml").write_text(f"base_model: {checkpoint}\ntrain_data_dir: {dataset}\nresolution: 256\n",
                                       encoding="utf-8")
    assert main(["plan", "--config", str(tmp_path / "run.yaml"), "--vram-gib", "24"]) == 0
    out = capsys.readouterr().out
    assert "as configured:" in out and "with gradient_checkpointing: true:" in out and "stream_blocks:" in out
    assert "memory: auto trains with no lever." in out


def test_the_plan_counts_a_quantized_files_weights_as_stored(tmp_path):
    """A ComfyUI fp8 file is held as its bytes (`base_weights: auto`): planned at a byte a weight, not two."""
    from safetensors.torch import load_file, save_file

    from lora_trainer.memory.fp8 import FP8

    checkpoint = build_tiny_flux(tmp_path / "model")
    stored = {key: value.to(FP8) if key.endswith(".weight") and value.ndim == 2 else value
              for key, value in load_file(str(checkpoint)).items()}
    fp8_file = checkpoint.with_name("flux1-dev-tiny-fp8.safetensors")
    save_file(stored, str(fp8_file))
    weights = {}
    for path, setting in ((checkpoint, "auto"), (fp8_file, "auto"), (fp8_file, "full")):
        config = transformer_config(path, tmp_path, tmp_path / "out", base_weights=setting)
        backbone = FluxBackbone.load(config, None)
        weights[path.name, setting] = estimate(backbone.memory_parts(config), config, 1).weights
    full, as_stored, asked_full = (weights[checkpoint.name, "auto"], weights[fp8_file.name, "auto"],
                                   weights[fp8_file.name, "full"])
    assert asked_full == full and as_stored < 0.7 * full


def test_sd_encodes_captions_before_its_unet_goes_to_the_gpu_and_the_plan_counts_encoders_that_stay(
        sd1_checkpoint, dataset, tmp_path):
    from conftest import quick_config

    from lora_trainer.backbones.sd import DiffusionBackbone
    from lora_trainer.train.loop import train_lora

    config = quick_config(sd1_checkpoint, dataset, tmp_path / "run", max_steps=1)
    backbone = DiffusionBackbone.load(resolve(config, "sd1"), None)
    order = []
    encode, move = backbone.encode_prompts, backbone.unet.to
    backbone.encode_prompts = lambda prompts: (order.append("captions"), encode(prompts))[1]
    backbone.unet.to = lambda *args, **kwargs: (order.append("unet"), move(*args, **kwargs))[1]
    train_lora(config, backbone=backbone)
    # the text encoders (SDXL's: 3 GB in fp32) and the UNet are never on the GPU together
    assert "captions" in order and order.index("unet") > max(i for i, what in enumerate(order) if what == "captions")

    encoders = sum(p.numel() for encoder in backbone.text_encoders for p in encoder.parameters())
    plain = estimate(backbone.memory_parts(config), config, images=8)
    for stays in ({"sample_prompts": ["a cat"]}, {"caption_dropout": 0.1}, {"shuffle_captions": True}):
        changed = make_config({**vars(config), **stays})
        kept = estimate(backbone.memory_parts(changed), changed, images=8)
        assert kept.weights - plain.weights == 4 * encoders, stays  # on the GPU in fp32 while training

"""End-to-end training on the tiny models: learning, export, reload, resume, and leaving host weights alone."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import pytest
import torch
from conftest import make_dataset, quick_config
from diffusers import UNet2DConditionModel
from safetensors.torch import load_file

from lora_trainer.backbones.checkpoint import UNET_PREFIX, read_checkpoint
from lora_trainer.backbones.ldm import unet_to_ldm
from lora_trainer.backbones.sd import DiffusionBackbone
from lora_trainer.backbones.tiny import tiny_state_dict
from lora_trainer.errors import ConfigError
from lora_trainer.events import CancelToken
from lora_trainer.lora.kohya import lora_modules, read_lora_file
from lora_trainer.train.loop import train_lora

# diffusers 0.32 and later take our checkpoint function (the one that leaves the random state alone)
CHECKPOINTING_CAPTURABLE = "gradient_checkpointing_func" in \
    inspect.signature(UNet2DConditionModel.enable_gradient_checkpointing).parameters

KOHYA_KEY = re.compile(r"^lora_(unet|te|te1|te2)_[a-z0-9_]+\.(lora_down\.weight|lora_up\.weight|alpha)$")


def _eval_loss(backbone: DiffusionBackbone, data, seed: int = 0) -> float:
    """Mean denoising loss over the training images at fixed noise and timesteps."""
    from lora_trainer.data import scan_dataset
    from lora_trainer.data.cache import assign_buckets, encode_dataset

    items = scan_dataset(data).items
    cache = encode_dataset(items, assign_buckets(items, 64, True, 32, 128), backbone.encode_images, flip=False)
    gen = torch.Generator().manual_seed(seed)
    total = 0.0
    with torch.no_grad():
        for entry in cache:
            latents = entry.latents[None].repeat(8, 1, 1, 1)
            noise = torch.randn(latents.shape, generator=gen)
            t = torch.randint(0, 1000, (8,), generator=gen)
            cond = {k: v.repeat(8, *[1] * (v.ndim - 1)) for k, v in backbone.encode_prompts([entry.item.caption]).items()}
            noisy = backbone.noise_scheduler.add_noise(latents, noise, t)
            total += torch.nn.functional.mse_loss(backbone.predict(noisy, t, cond), noise).item()
    return total / len(cache)


def _diffusers_has_peft() -> bool:
    """diffusers loads LoRAs only with its peft backend, which needs transformers >= 4.34."""
    from diffusers.utils import USE_PEFT_BACKEND

    return USE_PEFT_BACKEND


needs_diffusers_lora = pytest.mark.skipif(not _diffusers_has_peft(), reason="diffusers' LoRA loader needs transformers >= 4.34")


def _pipeline_with_lora(checkpoint, lora_file):
    """A diffusers pipeline over the tiny checkpoint with the LoRA loaded by diffusers itself."""
    backbone = DiffusionBackbone.from_file(checkpoint)
    pipe = backbone.sampling_pipeline()
    pipe.load_lora_weights(str(lora_file.parent), weight_name=lora_file.name)
    return backbone, pipe


def test_loss_falls_and_lora_changes_the_unet_output(sd1_checkpoint, tmp_path):
    data = make_dataset(tmp_path / "data", count=2)
    config = quick_config(sd1_checkpoint, data, tmp_path / "out", max_steps=60, learning_rate=3e-3,
                          lr_scheduler="constant", min_snr_gamma=0, lora_rank=8, lora_alpha=8)
    result = train_lora(config)
    base = DiffusionBackbone.from_file(sd1_checkpoint)
    before = _eval_loss(base, data)
    trained = DiffusionBackbone.from_file(sd1_checkpoint)
    trained.apply_lora_file(str(result.lora_file))
    after = _eval_loss(trained, data)
    assert after < before * 0.9, (before, after)

    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([500])
    with torch.no_grad():
        out_base = base.predict(latents, t, base.encode_prompts(["inkwash"]))
        out_lora = trained.predict(latents, t, trained.encode_prompts(["inkwash"]))
    assert (out_base - out_lora).abs().max() > 1e-3


def test_saved_lora_reloads_bit_identical_to_the_trained_weights(sd1_checkpoint, dataset, tmp_path):
    train_lora(quick_config(sd1_checkpoint, dataset, tmp_path / "out", save_every_n_steps=2, max_steps=4))
    state = torch.load(tmp_path / "out" / "checkpoints" / "step-00000002" / "state.pt", weights_only=True)
    trained = state["loras"][0]
    tensors, _ = read_lora_file(tmp_path / "out" / "ink_lora-step00000002.safetensors")
    modules = lora_modules(tensors)
    assert len(modules) == len(trained) // 2
    for name, parts in modules.items():
        peft_name = next(k for k in trained if re.sub(r"[.]", "_", k.rsplit(".lora_A", 1)[0]) == name[len("lora_unet_"):]
                         and ".lora_A" in k)
        assert torch.equal(parts["down"], trained[peft_name])
        assert torch.equal(parts["up"], trained[peft_name.replace("lora_A", "lora_B")])
        assert float(parts["alpha"]) == 4.0
    assert load_file(str(tmp_path / "out" / "ink_lora.safetensors")).keys() == tensors.keys()


@needs_diffusers_lora
def test_file_loads_in_diffusers_with_every_key_used_and_merges_exactly(sd1_checkpoint, dataset, tmp_path):
    result = train_lora(quick_config(sd1_checkpoint, dataset, tmp_path / "out", train_text_encoder=True,
                                     lora_alpha=2, lora_rank=4))
    tensors, metadata = read_lora_file(result.lora_file)
    modules = lora_modules(tensors)
    _, pipe = _pipeline_with_lora(sd1_checkpoint, result.lora_file)
    wrapped = [n for model in (pipe.unet, pipe.text_encoder) for n, m in model.named_modules() if hasattr(m, "lora_A")]
    assert len(wrapped) == len(modules)  # every module of the file became a LoRA layer

    # our own loader (used for previews) gives the same UNet output as diffusers' loader
    ours = DiffusionBackbone.from_file(sd1_checkpoint)
    ours.apply_lora_file(str(result.lora_file))
    latents, t = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(2)), torch.tensor([300])
    with torch.no_grad():
        cond = ours.encode_prompts(["inkwash"])
        theirs = pipe.unet(latents, t, pipe.text_encoder(pipe.tokenizer(["inkwash"], padding="max_length",
                           return_tensors="pt").input_ids)[0]).sample
        assert torch.allclose(ours.predict(latents, t, cond), theirs, atol=1e-5)

    base = DiffusionBackbone.from_file(sd1_checkpoint)
    original = {**{f"unet.{k}": v for k, v in base.unet.state_dict().items()},
                **{f"te.{k}": v for k, v in base.text_encoders[0].state_dict().items()}}
    pipe.fuse_lora(lora_scale=1.0)
    fused = {**{f"unet.{k}": v for k, v in pipe.unet.state_dict().items()},
             **{f"te.{k}": v for k, v in pipe.text_encoder.state_dict().items()}}
    checked = 0
    for name, parts in modules.items():
        prefix, module = ("unet.", name[len("lora_unet_"):]) if name.startswith("lora_unet_") else ("te.", name[len("lora_te_"):])
        module = module.removeprefix("text_model_")
        key = next(k for k in fused if k.startswith(prefix) and k.endswith("base_layer.weight")
                   and k[len(prefix):].removesuffix(".base_layer.weight").replace(".", "_").removeprefix("text_model_") == module)
        plain = key.replace(".base_layer", "")
        w0 = original[plain] if plain in original else original[prefix + "text_model." + plain[len(prefix):]]
        down, up = parts["down"].flatten(1), parts["up"].flatten(1)
        expected = w0 + (2.0 / 4) * (up @ down).reshape(w0.shape)
        assert torch.allclose(fused[key], expected, atol=1e-5), name
        checked += 1
    assert checked == len(modules)
    assert metadata["ss_network_dim"] == "4" and metadata["ss_network_alpha"] == "2"


def test_every_key_follows_the_webui_and_comfyui_rules(sd1_checkpoint, dataset, tmp_path):
    result = train_lora(quick_config(sd1_checkpoint, dataset, tmp_path / "out", lora_targets="locon", train_text_encoder=True))
    tensors, metadata = read_lora_file(result.lora_file)
    assert all(KOHYA_KEY.match(k) for k in tensors), [k for k in tensors if not KOHYA_KEY.match(k)][:5]
    modules = lora_modules(tensors)
    assert all(set(parts) == {"down", "up", "alpha"} for parts in modules.values())
    # Every UNet module maps to a weight of the original LDM checkpoint, the way the WebUI and ComfyUI resolve it.
    checkpoint = read_checkpoint(sd1_checkpoint)
    backbone = DiffusionBackbone.from_file(sd1_checkpoint)
    names = [k for k in backbone.unet.state_dict() if k.endswith(".weight")]
    ldm = {k.removesuffix(".weight").replace(".", "_"): v.removesuffix(".weight")
           for k, v in zip(names, unet_to_ldm(dict.fromkeys(names), 1))}
    for name in modules:
        if name.startswith("lora_unet_"):
            assert UNET_PREFIX + ldm[name[len("lora_unet_"):]] + ".weight" in checkpoint, name
        else:
            assert name.startswith("lora_te_text_model_encoder_layers_")
    assert any("resnets" in n for n in modules) and any(n.startswith("lora_te_") for n in modules)
    for key in ("ss_output_name", "ss_sd_model_name", "ss_base_model_version", "ss_network_dim", "ss_network_alpha",
                "ss_tag_frequency", "ss_num_train_images", "ss_steps", "ss_epoch", "ss_learning_rate",
                "ss_training_started_at", "ss_dataset_dirs", "ss_bucket_info", "ss_clip_skip"):
        assert key in metadata, key
    assert metadata["ss_base_model_version"] == "sd_v1"
    assert metadata["modelspec.architecture"] == "stable-diffusion-v1/lora"
    assert "inkwash" in metadata["ss_tag_frequency"]


@pytest.mark.slow  # the default run's time budget; CI runs it with -m slow
def test_interrupt_then_resume_gives_the_same_lora_as_one_run(sd1_checkpoint, dataset, tmp_path):
    options = {"max_steps": 8, "shuffle_captions": True, "caption_dropout": 0.2, "flip_aug": True, "lora_dropout": 0.1,
               "noise_offset": 0.05, "gradient_accumulation_steps": 2, "batch_size": 1}
    whole = train_lora(quick_config(sd1_checkpoint, dataset, tmp_path / "a", **options))

    cancel = CancelToken()
    stop_at_3 = lambda e: cancel.set() if e.kind == "progress" and e.step == 3 and "phase" not in e.data else None
    first = train_lora(quick_config(sd1_checkpoint, dataset, tmp_path / "b", **options), listeners=[stop_at_3], cancel=cancel)
    assert first.interrupted and first.steps == 3
    assert first.lora_file.is_file()
    resumed = train_lora(quick_config(sd1_checkpoint, dataset, tmp_path / "b", **options), resume=tmp_path / "b")
    assert resumed.steps == 8 and not resumed.interrupted
    a, b = load_file(str(whole.lora_file)), load_file(str(resumed.lora_file))
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_host_unet_is_shared_not_copied_and_left_bit_identical(sd1_checkpoint, dataset, tmp_path):
    """A host's in-memory LDM UNet becomes the trainable skeleton without a copy, and is untouched after
    training, after a failure and after a cancel."""
    from lora_trainer.backbones.host import HostBackbone

    checkpoint = tiny_state_dict("sd1")
    host_unet = {k[len(UNET_PREFIX):]: v for k, v in checkpoint.items() if k.startswith(UNET_PREFIX)}
    snapshot = {k: v.clone() for k, v in host_unet.items()}
    host_encoders = DiffusionBackbone.from_file(sd1_checkpoint)  # stands in for the host's own VAE and text encoder

    def backbone():
        return HostBackbone.from_ldm_unet(host_unet, "sd1", encode_images=host_encoders.encode_images,
                                          encode_prompts=host_encoders.encode_prompts, name="host")

    model = backbone()
    host_ptrs = {v.data_ptr() for v in host_unet.values()}
    assert all(p.data_ptr() in host_ptrs for p in model.unet.parameters())
    assert len(list(model.unet.parameters())) == len(host_unet)

    config = quick_config("", dataset, tmp_path / "ok", base_model="", sample_prompts=["a cat"])
    result = train_lora(config, backbone=model)
    assert all(torch.equal(host_unet[k], snapshot[k]) for k in host_unet)
    assert read_lora_file(result.lora_file)[1]["ss_sd_model_name"] == "host"
    with pytest.raises(ConfigError, match="train_text_encoder"):
        train_lora(quick_config("", dataset, tmp_path / "te", base_model="", train_text_encoder=True), backbone=backbone())
    with pytest.raises(ConfigError, match="base_weights: fp8 is for models loaded from files"):
        train_lora(quick_config("", dataset, tmp_path / "fp8", base_model="", base_weights="fp8"), backbone=backbone())
    with pytest.raises(ConfigError, match="fp8_compute is for models loaded from files"):
        train_lora(quick_config("", dataset, tmp_path / "fp8c", base_model="", fp8_compute="on"), backbone=backbone())

    failing = backbone()
    calls = {"n": 0}
    original = failing.predict

    def predict_then_fail(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("CUDA out of memory (simulated)")
        return original(*args, **kwargs)

    failing.predict = predict_then_fail
    with pytest.raises(RuntimeError, match="out of memory"):
        train_lora(quick_config("", dataset, tmp_path / "fail", base_model=""), backbone=failing)
    assert all(torch.equal(host_unet[k], snapshot[k]) for k in host_unet)

    cancel = CancelToken()
    cancel.set()
    result = train_lora(quick_config("", dataset, tmp_path / "cancel", base_model=""), backbone=backbone(), cancel=cancel)
    assert result.interrupted
    assert all(torch.equal(host_unet[k], snapshot[k]) for k in host_unet)


def test_same_seed_same_lora(sd1_checkpoint, dataset, tmp_path):
    one = load_file(str(train_lora(quick_config(sd1_checkpoint, dataset, tmp_path / "1")).lora_file))
    two = load_file(str(train_lora(quick_config(sd1_checkpoint, dataset, tmp_path / "2")).lora_file))
    assert all(torch.equal(one[k], two[k]) for k in one)


@pytest.mark.slow  # the default run's time budget; CI runs it with -m slow
def test_init_lora_continues_from_ours_and_from_ldm_named_files(sd1_checkpoint, dataset, tmp_path):
    from safetensors.torch import save_file

    first = train_lora(quick_config(sd1_checkpoint, dataset, tmp_path / "first", lora_rank=4, lora_alpha=2))
    start = load_file(str(first.lora_file))
    # lr 0: the continued LoRA must be exactly the file it started from, re-expressed at the new alpha
    again = train_lora(quick_config(sd1_checkpoint, dataset, tmp_path / "again", init_lora=str(first.lora_file),
                                    learning_rate=0.0, lora_alpha=4, max_steps=1))
    continued = lora_modules(load_file(str(again.lora_file)))
    for name, parts in lora_modules(start).items():
        effect = (2 / 4) * parts["up"].flatten(1) @ parts["down"].flatten(1)
        now = (4 / 4) * continued[name]["up"].flatten(1) @ continued[name]["down"].flatten(1)
        assert torch.allclose(effect, now, atol=1e-6), name

    # the same LoRA with LDM module names (as some other tools write) is understood too
    backbone = DiffusionBackbone.from_file(sd1_checkpoint)
    names = [k for k in backbone.unet.state_dict() if k.endswith(".weight")]
    to_ldm = {k.removesuffix(".weight").replace(".", "_"): v.removesuffix(".weight").replace(".", "_")
              for k, v in zip(names, unet_to_ldm(dict.fromkeys(names), 1))}
    renamed = {}
    for key, value in start.items():
        module, _, leaf = key.partition(".")
        renamed[f"lora_unet_{to_ldm[module[len('lora_unet_'):]]}.{leaf}"] = value
    save_file(renamed, str(tmp_path / "ldm_named.safetensors"))
    third = train_lora(quick_config(sd1_checkpoint, dataset, tmp_path / "third", init_lora=str(tmp_path / "ldm_named.safetensors"),
                                    learning_rate=0.0, lora_alpha=2, max_steps=1))
    assert all(torch.equal(v, load_file(str(third.lora_file))[k]) for k, v in start.items())


@pytest.mark.parametrize("family", ["sd2", "sdxl"])
def test_sd2_and_sdxl_train_and_export_their_own_keys(tiny_checkpoints, dataset, tmp_path, family):
    result = train_lora(quick_config(tiny_checkpoints[family], dataset, tmp_path / family, train_text_encoder=True,
                                     max_steps=2))
    tensors, metadata = read_lora_file(result.lora_file)
    prefixes = {k.split("_text_model")[0] for k in tensors if k.startswith("lora_te")}
    assert prefixes == ({"lora_te1", "lora_te2"} if family == "sdxl" else {"lora_te"})
    assert metadata["ss_base_model_version"] == {"sd2": "sd_v2", "sdxl": "sdxl_base_v1-0"}[family]
    assert metadata["modelspec.architecture"].startswith("stable-diffusion-v2" if family == "sd2" else "stable-diffusion-xl-v1-base")
    if family == "sd2":
        assert metadata["ss_v2"] == "True" and metadata["ss_v_parameterization"] == "True"
    if not _diffusers_has_peft():
        return  # the rest checks diffusers' own loader, which the oldest transformers we support lacks
    _, pipe = _pipeline_with_lora(tiny_checkpoints[family], result.lora_file)
    wrapped = sum(hasattr(m, "lora_A") for model in (pipe.unet, pipe.text_encoder) for m in model.modules())
    if family == "sdxl":
        wrapped += sum(hasattr(m, "lora_A") for m in pipe.text_encoder_2.modules())
    assert wrapped == len(lora_modules(tensors))


def test_snr_matches_diffusers_compute_snr():
    try:
        from diffusers import training_utils
    except (ImportError, AttributeError, RuntimeError):  # it does not import under transformers 4.30
        pytest.skip("diffusers.training_utils does not import with this transformers")
    from diffusers import DDPMScheduler

    from lora_trainer.backbones.sd import SCHEDULER, snr

    scheduler = DDPMScheduler(**SCHEDULER)
    t = torch.tensor([0, 10, 500, 999])
    assert torch.allclose(snr(scheduler.alphas_cumprod, t), training_utils.compute_snr(scheduler, t))


@pytest.mark.slow  # the default run's time budget; CI runs it with -m slow
def test_ctrl_c_between_accumulated_batches_resumes_exactly(sd1_checkpoint, dataset, tmp_path, monkeypatch):
    options = {"max_steps": 5, "gradient_accumulation_steps": 2, "batch_size": 1}
    whole = load_file(str(train_lora(quick_config(sd1_checkpoint, dataset, tmp_path / "a", **options)).lora_file))

    calls = {"n": 0}
    original = DiffusionBackbone.predict

    def predict(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 6:  # the second batch of step 3: step 3's first batch is already in the gradients
            raise KeyboardInterrupt
        return original(self, *args, **kwargs)

    monkeypatch.setattr(DiffusionBackbone, "predict", predict)
    with pytest.raises(KeyboardInterrupt):
        train_lora(quick_config(sd1_checkpoint, dataset, tmp_path / "b", **options))
    monkeypatch.setattr(DiffusionBackbone, "predict", original)
    resumed = train_lora(quick_config(sd1_checkpoint, dataset, tmp_path / "b", **options), resume=tmp_path / "b")
    again = load_file(str(resumed.lora_file))
    assert all(torch.equal(whole[k], again[k]) for k in whole)


def test_the_graph_ready_step_trains_the_same_lora_as_the_plain_loop(tmp_path, sd1_checkpoint, dataset, caplog):
    """cuda_graphs: on runs the captured step's code (static buffers, tensor learning rates, warm-up steps that
    are undone, fused update order) eagerly on the CPU: its LoRA must equal the plain loop's. With gradient
    checkpointing too: it no longer rules the captured step out (its blocks recompute without the random state)."""
    from lora_trainer.lora.kohya import read_lora_file
    from lora_trainer.train.loop import train_lora

    caplog.set_level("INFO", logger="lora_trainer")
    results = {}
    for mode, checkpointing in (("off", False), ("on", False), ("on", True)):
        config = quick_config(sd1_checkpoint, dataset, tmp_path / f"{mode}{checkpointing}", cuda_graphs=mode,
                              max_steps=5, lr_scheduler="cosine", lr_warmup_steps=2, min_snr_gamma=5.0,
                              gradient_checkpointing=checkpointing)
        result = train_lora(config)
        results[mode, checkpointing] = (read_lora_file(result.lora_file)[0], result.losses)
        if mode == "on" and (CHECKPOINTING_CAPTURABLE or not checkpointing):
            assert "the graph-ready step runs eagerly" in caplog.text
        caplog.clear()
    plain = results["off", False][0]
    for graph_ready, losses in (results["on", False], results["on", True]):
        assert plain.keys() == graph_ready.keys()
        for key in plain:
            torch.testing.assert_close(graph_ready[key], plain[key], rtol=1e-4, atol=1e-6)
        assert [s for s, _ in losses] == [s for s, _ in results["off", False][1]]
    assert any(not torch.equal(v, torch.zeros_like(v)) for k, v in plain.items() if "lora_up" in k)


@pytest.mark.slow  # the default run's time budget; CI runs it with -m slow
def test_the_graph_ready_step_resumes_exactly(sd1_checkpoint, dataset, tmp_path):
    """Its optimizer state and (shadow) schedule go into checkpoints and come back: stop at 3, resume, same LoRA."""
    options = {"max_steps": 7, "cuda_graphs": "on", "lr_scheduler": "cosine", "lr_warmup_steps": 2, "flip_aug": True}
    whole = train_lora(quick_config(sd1_checkpoint, dataset, tmp_path / "a", **options))
    cancel = CancelToken()
    stop_at_3 = lambda e: cancel.set() if e.kind == "progress" and e.step == 3 and "phase" not in e.data else None
    first = train_lora(quick_config(sd1_checkpoint, dataset, tmp_path / "b", **options), listeners=[stop_at_3],
                       cancel=cancel)
    assert first.interrupted and first.steps == 3
    resumed = train_lora(quick_config(sd1_checkpoint, dataset, tmp_path / "b", **options), resume=tmp_path / "b")
    a, b = load_file(str(whole.lora_file)), load_file(str(resumed.lora_file))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_why_a_step_is_or_is_not_captured():
    from lora_trainer.config import resolve
    from lora_trainer.train.step import graphs_wanted

    cuda, cpu = torch.device("cuda"), torch.device("cpu")

    def wanted(device=cuda, processes=1, te=False, precision="bf16", steps=500, buckets=2, **values):
        config = resolve(quick_config(Path("m"), Path("d"), Path("o"), mixed_precision=precision, **values), "sd1")
        return graphs_wanted(config, device, num_processes=processes, blockers=["text-encoder training"] if te else [],
                             total_steps=steps, shapes=buckets)

    assert wanted()[:2] == (True, True)
    assert wanted(device=cpu)[:2] == (False, False) and "not on a CUDA GPU" in wanted(device=cpu)[2]
    assert wanted(device=cpu, cuda_graphs="on")[:2] == (True, False)
    assert wanted(cuda_graphs="off")[:2] == (False, False)
    assert "too short" in wanted(steps=40)[2] and wanted(steps=40, cuda_graphs="on")[:2] == (True, True)
    assert wanted(processes=2)[:2] == (True, True)  # one all-reduce inside the graph (test_multiprocess.py)
    assert wanted(precision="fp16")[:2] == (True, True)  # a loss scale on the device
    for blocker, text in (({"te": True}, "text-encoder"), ({"optimizer": "prodigy"}, "prodigy"),
                          ({"gradient_accumulation_steps": 2}, "accumulation"), ({"lora_dropout": 0.1}, "dropout")):
        use, _, why = wanted(**blocker)
        assert not use and text in why, blocker
    assert wanted(gradient_checkpointing=True)[:2] == (True, True)  # the backbones say when it cannot be captured


def test_checkpointing_recomputes_without_the_random_state_unless_dropout_draws(sd1_checkpoint, monkeypatch):
    """A captured CUDA graph cannot read the random state: checkpointed blocks must not save it, unless dropout
    needs the same masks in the recompute (then the backbone names the reason it is not captured)."""
    from lora_trainer.backbones.sd import DiffusionBackbone
    from lora_trainer.lora.inject import add_lora
    from lora_trainer.memory.checkpointing import enable_checkpointing

    for dropout, captured in ((0.0, True), (0.1, False)):
        unet = DiffusionBackbone.from_file(sd1_checkpoint).unet
        params = add_lora(unet, unet_targets := [n for n, m in unet.named_modules() if n.endswith("attn1.to_q")],
                          4, 4, dropout)
        assert unet_targets and enable_checkpointing(unet) is (captured and CHECKPOINTING_CAPTURABLE)
        with monkeypatch.context() as patch:
            if captured and CHECKPOINTING_CAPTURABLE:  # torch's checkpoint reads the CPU state (and the CUDA one) only to restore it
                patch.setattr(torch, "get_rng_state", lambda: pytest.fail("the random state was read"))
            noisy = torch.randn(1, 4, 8, 8)
            unet(noisy, torch.tensor([10]), torch.randn(1, 77, unet.config.cross_attention_dim)).sample.mean().backward()
        assert all(p.grad is not None for p in params)


def test_checkpointed_blocks_recompute_inside_the_forwards_context(sd1_checkpoint):
    """The recompute runs in the backward pass, outside the context the forward ran in (the flow families' choice
    of attention kernels): it re-enters it, or it can pick other kernels than the forward did (on the H200 torch
    then stopped with "Recomputed values ... have different metadata")."""
    import contextlib

    from lora_trainer.memory.checkpointing import enable_checkpointing

    entered = []

    @contextlib.contextmanager
    def kernels():
        entered.append(torch.is_grad_enabled())
        yield

    unet = DiffusionBackbone.from_file(sd1_checkpoint).unet
    unet.requires_grad_(False)
    if not CHECKPOINTING_CAPTURABLE:  # diffusers before 0.32 checkpoints its own way: refused with a message
        with pytest.raises(ConfigError, match="needs diffusers 0.32 or newer"):
            enable_checkpointing(unet, recompute_in=kernels)
        return
    enable_checkpointing(unet, recompute_in=kernels)
    noisy = torch.randn(1, 4, 8, 8, requires_grad=True)
    out = unet(noisy, torch.tensor([10]), torch.randn(1, 77, unet.config.cross_attention_dim)).sample
    assert entered == []
    out.mean().backward()
    assert len(entered) >= 4 and noisy.grad is not None  # once per checkpointed block


def test_the_graph_ready_step_scales_the_fp16_loss_on_the_device():
    """With loss_scale (fp16), the update equals the unscaled one; a step whose gradients overflow changes
    nothing but the scale, which halves, exactly as torch's GradScaler does it."""
    from lora_trainer.train.graphs import CapturedStep

    def run(loss_scale: bool, poison_at: int | None = None):
        torch.manual_seed(0)
        weight = torch.nn.Parameter(torch.randn(4, 3))
        x, y = torch.randn(8, 3), torch.randn(8, 4)
        calls = {"n": 0}

        def loss_fn(inputs):
            calls["n"] += 1
            loss = ((inputs["x"] @ weight.T - inputs["y"]) ** 2).mean()
            return loss * float("inf") if calls["n"] == poison_at else loss

        step = CapturedStep(loss_fn, [{"params": [weight], "lr": 1e-2}], 0.01, 1.0, capture=False, warmup=1,
                            loss_scale=loss_scale)
        history = []
        for _ in range(4):
            step({"x": x, "y": y})
            history.append((weight.detach().clone(), None if step.scale is None else float(step.scale)))
        return history

    plain, scaled = run(False), run(True)
    for (a, _), (b, scale) in zip(plain, scaled):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-7)
        assert scale == 2.0**16
    poisoned = run(True, poison_at=3)  # call 1 is the warm-up (undone), call 3 is the second real step
    torch.testing.assert_close(poisoned[1][0], poisoned[0][0], rtol=0, atol=0)  # the overflowing step: no update
    assert [scale for _, scale in poisoned] == [2.0**16, 2.0**15, 2.0**15, 2.0**15]
    torch.testing.assert_close(poisoned[2][0], plain[1][0], rtol=1e-5, atol=1e-7)  # then it goes on as if skipped


@pytest.mark.skipif(tuple(int(x) for x in __import__("peft").__version__.split(".")[:2]) < (0, 15),
                    reason="peft before 0.15 always casts a LoRA layer's input to the LoRA's dtype")
def test_lora_layers_under_autocast_keep_no_fp32_copy_of_their_input(sd1_checkpoint):
    """keep_lora_input_dtype: the same prediction and gradients under bf16 autocast with less kept for backward.
    peft's fp32 copy of a LoRA layer's input, cast back for the matmul, was what the matmul saved: q, k and v each
    kept their own copy of one input, where the original is now kept once."""
    from lora_trainer.lora.inject import add_lora, keep_lora_input_dtype

    backbone = DiffusionBackbone.from_file(sd1_checkpoint)
    with torch.no_grad():
        cond = backbone.encode_prompts(["a photo", "a drawing"])
    unet = backbone.unet.to(torch.bfloat16)
    params = add_lora(unet, backbone.unet_lora_targets("attention_ff"), 4, 4, 0.0)
    torch.manual_seed(0)
    for p in params:
        p.data = torch.randn_like(p, dtype=torch.float32) * 0.1  # lora_up starts at zero: give every part a gradient
    noisy, timesteps = torch.randn(2, 4, 8, 8), torch.tensor([10, 500])
    shared_input_bytes = []  # attn1's k and v see the very tensor q sees
    for name, module in unet.named_modules():
        if name.endswith(("attn1.to_k", "attn1.to_v")):
            module.register_forward_pre_hook(lambda _, args: shared_input_bytes.append(args[0].numel() * 2))

    def run() -> tuple[torch.Tensor, list[torch.Tensor], int]:
        kept: dict[int, int] = {}

        def pack(tensor: torch.Tensor) -> torch.Tensor:
            if not isinstance(tensor, torch.nn.Parameter):
                kept[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
            return tensor

        for p in params:
            p.grad = None
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor), \
                torch.autocast("cpu", dtype=torch.bfloat16):
            pred = backbone.predict(noisy, timesteps, cond)
        pred.float().square().mean().backward()
        return pred.detach(), [p.grad.clone() for p in params], sum(kept.values())

    pred, grads, kept_bytes = run()
    assert keep_lora_input_dtype(unet) == len(params) // 2
    pred_kept, grads_kept, kept_bytes_kept = run()
    assert torch.equal(pred_kept, pred)
    for grad, grad_kept in zip(grads, grads_kept):
        torch.testing.assert_close(grad_kept, grad, rtol=1e-2, atol=1e-5)  # bf16 sums in another order
    duplicates = sum(shared_input_bytes[:len(shared_input_bytes) // 2])  # bf16 copies of the first run
    assert duplicates > 0
    assert kept_bytes - kept_bytes_kept >= duplicates, (kept_bytes, kept_bytes_kept, duplicates)


def test_torch_compile_without_a_cuda_gpu_trains_uncompiled_and_says_so(sd1_checkpoint, dataset, tmp_path, caplog):
    caplog.set_level("INFO", logger="lora_trainer")
    plain = train_lora(quick_config(sd1_checkpoint, dataset, tmp_path / "plain", max_steps=2))
    asked = train_lora(quick_config(sd1_checkpoint, dataset, tmp_path / "asked", max_steps=2, torch_compile=True))
    assert "torch_compile: on needs a CUDA GPU and Triton" in caplog.text
    first, second = read_lora_file(plain.lora_file)[0], read_lora_file(asked.lora_file)[0]
    assert all(torch.equal(first[key], second[key]) for key in first)


@pytest.mark.slow  # the default run's time budget; CI runs it with -m slow
def test_the_latent_cache_is_keyed_by_the_models_weights_not_by_a_path(sd1_checkpoint, dataset, tmp_path, caplog):
    """A host's model has no path: the cache on disk must still tell it apart from another model. The same weights
    reuse the cache; other UNet weights, or another image encoder, encode the images again."""
    from lora_trainer.backbones import weights_identity
    from lora_trainer.backbones.host import HostBackbone

    encoders = DiffusionBackbone.from_file(sd1_checkpoint)

    def host_model(seed: int, vae_seed: int = 0) -> HostBackbone:
        checkpoint = tiny_state_dict("sd1", seed=seed)
        unet = {k[len(UNET_PREFIX):]: v for k, v in checkpoint.items() if k.startswith(UNET_PREFIX)}
        return HostBackbone.from_ldm_unet(unet, "sd1", encode_images=encoders.encode_images,
                                          encode_prompts=encoders.encode_prompts, name="host",
                                          encoder_id=f"vae-{vae_seed}")

    assert weights_identity(host_model(0).unet) == weights_identity(host_model(0).unet)
    assert weights_identity(host_model(0).unet) != weights_identity(host_model(1).unet)
    config = quick_config("", dataset, tmp_path / "out", base_model="", cache_latents_to_disk=True, max_steps=1)
    reused = []
    for model, expected in ((host_model(0), False), (host_model(0), True), (host_model(1), False),
                            (host_model(1, vae_seed=1), False)):
        caplog.clear()
        with caplog.at_level("INFO"):
            train_lora(config, backbone=model)
        reused.append("Using cached latents" in caplog.text)
        assert reused[-1] == expected, reused

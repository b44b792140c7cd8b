"""Z-Image from files: the layouts people have, training, captions of any length in one batch, exact resume, the
LoRA's keys as the hosts read them, continuing from peers' LoRAs, Turbo's training adapter, and bad inputs refused
before anything is cached."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import assert_resume_is_bit_identical, checkpoint_loras, make_dataset, transformer_config
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from lora_trainer.backbones.files import read_weights
from lora_trainer.backbones.flow import repeated_blocks
from lora_trainer.backbones.tiny_zimage import build_tiny_zimage, tiny_qwen3, tiny_zimage_parts
from lora_trainer.backbones.zimage import (
    TEMPLATE,
    ZImageBackbone,
    comfy_from_transformer,
    names,
    run_transformer,
    transformer_from_file,
    transformer_layout,
    variant_of,
    zimage_classes,
)
from lora_trainer.errors import CheckpointError, ConfigError
from lora_trainer.lora.inject import add_lora, load_lora_state
from lora_trainer.memory.holding import store_in_fp8
from lora_trainer.train.loop import train_lora


def _has_zimage() -> bool:
    try:
        zimage_classes()
    except CheckpointError:
        return False
    return True


pytestmark = pytest.mark.skipif(not _has_zimage(), reason="Z-Image needs diffusers >= 0.36 and transformers >= 4.51")


@pytest.fixture(scope="module")
def zimage(tmp_path_factory):
    """A tiny Z-Image-Turbo in ComfyUI's split layout (with Qwen's tokenizer where ComfyUI keeps it)."""
    return build_tiny_zimage(tmp_path_factory.mktemp("comfy"))


def bare(transformer) -> ZImageBackbone:
    """A backbone around a transformer alone (enough to predict and to read LoRA files)."""
    backbone = ZImageBackbone(family="zimage", transformer=transformer, vae=None, text_encoders=[], tokenizers=[],
                              variant="turbo")
    backbone.caption_room = 64
    return backbone


def random_lora(backbone: ZImageBackbone, rank: int = 2, seed: int = 0) -> dict[str, torch.Tensor]:
    """Peft-named LoRA weights for every layer of the locon set, with random ups (a trained LoRA's shape)."""
    torch.manual_seed(seed)
    state = {}
    for name in backbone.lora_targets("locon"):
        weight = backbone.transformer.get_submodule(name).weight
        state[f"{name}.lora_A.weight"] = torch.randn(rank, weight.shape[1])
        state[f"{name}.lora_B.weight"] = torch.randn(weight.shape[0], rank)
    return state


def test_comfyui_layout_round_trips_and_the_file_names_every_linear_layer():
    parts = tiny_zimage_parts()
    model = transformer_from_file(dict(parts["transformer"]))
    back = comfy_from_transformer(model)
    assert back.keys() == parts["transformer"].keys()
    assert all(torch.equal(back[k], parts["transformer"][k]) for k in back)
    with torch.device("meta"):  # the released size: 30 layers, 2 refiner blocks each, 3840 wide
        real = zimage_classes()[0](axes_lens=[1536, 512, 512])
    for transformer in (model, real):
        linear = {n: m.out_features for n, m in transformer.named_modules() if isinstance(m, torch.nn.Linear)}
        assert {n: rows for n, (_, _, rows, _) in names(transformer.config).items()} == linear
    # Lumina 2 has the same layout but modulates through adaLN_modulation.1; Omni adds a SigLIP embedder
    keys = set(parts["transformer"])
    assert transformer_layout(keys) == ("", "comfy")
    assert transformer_layout({f"model.diffusion_model.{k}" for k in keys}) == ("model.diffusion_model.", "comfy")
    assert transformer_layout({k.replace("adaLN_modulation.0", "adaLN_modulation.1") for k in keys}) is None
    assert transformer_layout(keys | {"siglip_embedder.0.weight"}) is None
    assert transformer_layout(model.state_dict().keys()) == ("", "diffusers")


def test_turbo_and_base_are_told_apart_by_the_file_name():
    assert [variant_of(n) for n in ("z_image_turbo_bf16", "Z-Image-Turbo", "z_image_bf16", "Z-Image",
                                     "z_image_de_turbo_v1_bf16")] == ["turbo", "turbo", "base", "base", "base"]
    turbo, base = bare(None), bare(None)
    base.variant = "base"
    assert turbo.defaults() == {"sample_steps": 8, "sample_guidance_scale": 1.0}
    assert base.defaults() == {"sample_steps": 30, "sample_guidance_scale": 4.0}
    # the pipeline's sigmas: 1 .. 1/n, shifted by 3
    assert turbo.sampling_schedule(4, 64) == pytest.approx([1.0, 0.9, 0.75, 0.5, 0.0])


def test_zimage_trains_from_comfyui_split_files_and_the_loss_falls(zimage, one_image, tmp_path):
    result = train_lora(transformer_config(zimage, one_image, tmp_path / "run", max_steps=40, learning_rate=1e-2,
                                      timestep_sampling="uniform", log_every_n_steps=10, lora_targets="locon",
                                      sample_prompts=["a photo of a cat"]))
    losses = [loss for _, loss in result.losses]
    assert losses[-1] < losses[0] * 0.85, losses  # ~1.0 is the part of the velocity the noise makes unpredictable
    assert len(result.samples) == 1
    with safe_open(str(result.lora_file), "pt") as f:
        keys, metadata = set(f.keys()), f.metadata()
    assert {"diffusion_model.layers.0.attention.to_q.lora_A.weight", "diffusion_model.layers.0.attention.to_q.alpha",
            "diffusion_model.context_refiner.0.feed_forward.w1.lora_B.weight",
            "diffusion_model.all_x_embedder.2-1.lora_A.weight"} <= keys
    assert metadata["ss_base_model_version"] == "zimage"
    assert metadata["modelspec.architecture"] == "Z-Image/lora"


def test_the_file_has_exactly_the_trained_effect(zimage, dataset, tmp_path):
    result = train_lora(transformer_config(zimage, dataset, tmp_path / "run", max_steps=3, lora_targets="locon",
                                      learning_rate=1e-2))
    weights = read_weights(zimage)
    state = checkpoint_loras(result)
    trained = bare(transformer_from_file(dict(weights)))
    add_lora(trained.transformer, sorted({k.rsplit(".lora_", 1)[0] for k in state}), 4, 4.0, 0.0)
    load_lora_state(trained.transformer, state)
    loaded = bare(transformer_from_file(dict(weights)))
    loaded.apply_lora_file(str(result.lora_file))
    plain = transformer_from_file(dict(weights))
    torch.manual_seed(0)
    x, t = torch.randn(2, 16, 8, 8), torch.tensor([0.3, 0.8])
    cond = {"text": torch.randn(2, 64, 64), "mask": (torch.arange(64) < torch.tensor([[20], [40]])).float()}
    with torch.no_grad():
        want = trained.predict(trained.transformer, x, t, cond)
        got = loaded.predict(loaded.transformer, x, t, cond)
        base = trained.predict(plain, x, t, cond)
    assert (want - base).abs().max() > 1e-4  # the LoRA does something
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_captions_of_any_length_share_a_batch_with_the_transformers_own_outputs(zimage, tmp_path):
    """Captions padded to one length (the empty one of caption dropout, one over 32 tokens) give, in one batch of
    fixed shapes, what the transformer gives each caption alone; Qwen3's states are its hidden_states[-2]."""
    backbone = ZImageBackbone.load(transformer_config(zimage, tmp_path, tmp_path / "out"), None)
    backbone.caption_room = 96
    prompts = ["a photo of a cat " * 10, "", "zkblob"]
    encoded = backbone.encode_prompts(prompts)
    lengths = encoded["mask"].sum(1).long().tolist()
    assert encoded["text"].shape == (3, 96, 64) and lengths[0] > 32 > lengths[2] > lengths[1]
    full = tiny_qwen3()  # built as in the file: all its layers and the final norm
    ids = backbone.tokenizers[0]([TEMPLATE.format(prompts[2])], return_tensors="pt").input_ids
    with torch.no_grad():
        states = full(input_ids=ids, output_hidden_states=True).hidden_states[-2][0]
    torch.testing.assert_close(encoded["text"][2, :lengths[2]], states)
    torch.manual_seed(0)
    latents, t = torch.randn(3, 16, 8, 12), torch.tensor([0.2, 0.5, 0.9])
    transformer = backbone.transformer
    with torch.no_grad():
        batch = run_transformer(transformer, latents, t, encoded["text"], encoded["mask"] > 0.5)
        for i, n in enumerate(lengths):
            alone = transformer([latents[i].unsqueeze(1)], t[i:i + 1], [encoded["text"][i, :n]], return_dict=False)[0]
            torch.testing.assert_close(batch[i], alone[0].squeeze(1), rtol=1e-4, atol=1e-5)


def test_long_sample_prompts_leave_the_training_captions_short(zimage, tmp_path):
    """Captions are cached at the longest caption's length (a multiple of 32), also those encoded beside a longer
    sample prompt (texts are encoded 8 at a time): training batches keep one short shape."""
    data = make_dataset(tmp_path / "many", count=10)
    config = transformer_config(zimage, data, tmp_path / "run", max_steps=2, batch_size=2,
                           sample_prompts=["a photo of a cat " * 12])
    backbone = ZImageBackbone.load(config, None)
    result = train_lora(config, backbone=backbone)
    assert len(result.samples) == 1 and backbone.caption_room == 32
    shapes = {tuple(entry["text"].shape) for caption, entry in backbone.run["text_cache"].items()
              if not caption.startswith("a photo")}
    assert shapes == {(32, 64)}


def test_diffusers_reads_every_key_of_our_file_and_applies_exactly_our_update(zimage):
    from diffusers.loaders.lora_pipeline import ZImageLoraLoaderMixin

    backbone = bare(transformer_from_file(read_weights(zimage)))
    state = random_lora(backbone)
    tensors = backbone.to_file(state, alpha=1.0, dtype="fp32")
    converted = ZImageLoraLoaderMixin.lora_state_dict(dict(tensors))
    converted = converted[0] if isinstance(converted, tuple) else converted
    assert len(converted) == len(state)
    torch.manual_seed(1)
    for key in state:
        if not key.endswith(".lora_A.weight"):
            continue
        name = key.removesuffix(".lora_A.weight")
        a, b = converted[f"transformer.{name}.lora_A.weight"], converted[f"transformer.{name}.lora_B.weight"]
        probe = torch.randn(a.shape[1], 3)  # the update applied to a few vectors
        want = state[f"{name}.lora_B.weight"] @ (state[key] @ probe) * (1.0 / 2)
        torch.testing.assert_close(b @ (a @ probe), want, rtol=1e-4, atol=1e-4)


COMFY_KEYMAP = r"""
import json, logging, sys, types
lora_path, model_path, unet_config, out_path = sys.argv[1:5]
sys.argv = ["main.py", "--cpu"]
import comfy.options
comfy.options.enable_args_parsing()
import torch
import comfy.lora, comfy.lora_convert, comfy.model_base, comfy.utils
from safetensors.torch import load_file, save_file

weights = {"diffusion_model." + k: v.float() for k, v in load_file(model_path).items()}
model = object.__new__(comfy.model_base.Lumina2)  # only its keys and config are read to map a LoRA
object.__setattr__(model, "state_dict", lambda: weights)
object.__setattr__(model, "model_config", types.SimpleNamespace(unet_config=json.loads(unet_config)))
key_map = comfy.lora.model_lora_keys_unet(model, {})
lora = comfy.lora_convert.convert_lora(comfy.utils.load_torch_file(lora_path))
patches = comfy.lora.load_lora(lora, key_map, log_missing=False)
loaded = set().union(*(adapter.loaded_keys for adapter in patches.values()))
deltas = {}
for target, adapter in patches.items():
    key, offset = target if isinstance(target, tuple) else (target, None)
    weight = deltas.get(key, torch.zeros_like(weights[key]))
    deltas[key] = comfy.lora.calculate_weight([(1.0, adapter, 1.0, offset, None)], weight, key)
save_file({k.removeprefix("diffusion_model."): v.contiguous() for k, v in deltas.items()}, out_path)
print(json.dumps(sorted(set(lora) - loaded)))
"""


@pytest.mark.skipif(not os.environ.get("COMFYUI_PATH"), reason="set COMFYUI_PATH to a ComfyUI checkout to run this")
def test_comfyui_loads_every_key_onto_its_fused_layout(zimage, tmp_path):
    """ComfyUI's own key map and patch code (run by COMFYUI_PYTHON in its checkout) take every key of our file
    and put exactly our update onto its layout (q, k and v at their rows of the fused qkv)."""
    backbone = bare(transformer_from_file(read_weights(zimage)))
    state = random_lora(backbone)
    lora_file = tmp_path / "lora.safetensors"
    save_file(backbone.to_file(state, alpha=1.0, dtype="fp32"), str(lora_file))
    config = backbone.transformer.config
    unet_config = {"image_model": "lumina2", "dim": config.dim, "n_layers": config.n_layers,
                   "n_refiner_layers": config.n_refiner_layers}
    out = tmp_path / "deltas.safetensors"
    run = subprocess.run([os.environ.get("COMFYUI_PYTHON", sys.executable), "-c", COMFY_KEYMAP, str(lora_file),
                          str(zimage), json.dumps(unet_config), str(out)], cwd=os.environ["COMFYUI_PATH"],
                         capture_output=True, text=True, timeout=600, check=False)
    assert run.returncode == 0, run.stderr[-3000:]
    assert json.loads(run.stdout.strip().splitlines()[-1]) == []  # no key of the file left unloaded
    deltas = load_file(str(out))
    want: dict[str, torch.Tensor] = {}
    for key in state:
        if key.endswith(".lora_A.weight"):
            name = key.removesuffix(".lora_A.weight")
            update = state[f"{name}.lora_B.weight"] @ state[key] / 2
            block, _, leaf = name.rpartition(".attention.")
            if leaf in ("to_q", "to_k", "to_v"):
                fused = want.setdefault(f"{block}.attention.qkv.weight", torch.zeros(3 * config.dim, config.dim))
                row = "qkv".index(leaf[-1]) * config.dim
                fused[row:row + config.dim] = update
            else:
                want[f"{comfy_name(name)}.weight"] = update
    assert deltas.keys() == want.keys()
    for key, update in want.items():
        torch.testing.assert_close(deltas[key], update, rtol=1e-4, atol=1e-5)


def comfy_name(name: str) -> str:
    """A diffusers module's name in ComfyUI's layout (the fused q, k, v aside)."""
    for old, new in (("all_final_layer.2-1.", "final_layer."), ("all_x_embedder.2-1", "x_embedder"),
                     (".attention.to_out.0", ".attention.out")):
        name = name.replace(old, new)
    return name


@pytest.mark.slow  # the default run's time budget; CI runs it with -m slow
def test_resume_is_bit_identical(zimage, dataset, tmp_path):
    """Batches of 2 (the dataset's two sizes) with caption dropout, mirroring and noise offset."""
    assert_resume_is_bit_identical(zimage, dataset, tmp_path, batch_size=2, caption_dropout=0.5, flip_aug=True, noise_offset=0.05)


@pytest.mark.slow  # the default run's time budget; CI runs it with -m slow
def test_continuing_from_our_lora_or_an_ai_toolkit_or_musubi_one(zimage, dataset, tmp_path):
    first = train_lora(transformer_config(zimage, dataset, tmp_path / "first", max_steps=2, learning_rate=1e-2))
    state = checkpoint_loras(first)
    ai_toolkit = tmp_path / "ai_toolkit.safetensors"  # diffusion_model.<diffusers name>.lora_A/B, no alpha
    save_file({f"diffusion_model.{k}": v.contiguous() for k, v in state.items()}, str(ai_toolkit))
    musubi = tmp_path / "musubi.safetensors"  # kohya names of diffusers' modules, alpha 2 of rank 4
    tensors = {}
    for key, value in state.items():
        name, part = key.rsplit(".lora_", 1)
        module = "lora_unet_" + name.replace(".", "_")
        tensors[f"{module}.lora_down.weight" if part.startswith("A") else f"{module}.lora_up.weight"] = \
            value.contiguous() if part.startswith("A") else (value * 2).contiguous()
        tensors[f"{module}.alpha"] = torch.tensor(2.0)
    save_file(tensors, str(musubi))
    backbone = ZImageBackbone.load(transformer_config(zimage, dataset, tmp_path / "x"), None)
    for init in (first.lora_file, ai_toolkit, musubi):
        modules = backbone.read_lora(str(init), alpha=4.0)
        assert len(modules) == len(state) // 2
        for name, parts in modules.items():
            torch.testing.assert_close(parts["down"], state[f"{name}.lora_A.weight"])
            torch.testing.assert_close(parts["up"], state[f"{name}.lora_B.weight"])
    for init in (first.lora_file, ai_toolkit):
        result = train_lora(transformer_config(zimage, dataset, tmp_path / f"cont_{init.stem}", max_steps=1,
                                          init_lora=str(init)))
        assert result.lora_file.is_file()


def test_the_training_adapter_is_merged_for_training_and_kept_out_of_the_file(zimage, dataset, tmp_path):
    """As ostris' Z-Image-Turbo training adapter: merged into the frozen transformer, the LoRA learns on top of it,
    the saved LoRA holds none of it, and previews take it back out."""
    torch.manual_seed(3)
    adapter = {}  # ai-toolkit's format: diffusion_model.<diffusers name>.lora_A/lora_B, no alpha (scale 1)
    for name, rows, columns in (("layers.0.attention.to_q", 128, 128), ("layers.1.feed_forward.w1", 341, 128),
                                ("layers.0.adaLN_modulation.0", 512, 128)):
        adapter[f"diffusion_model.{name}.lora_A.weight"] = torch.randn(2, columns) * 0.2
        adapter[f"diffusion_model.{name}.lora_B.weight"] = torch.randn(rows, 2) * 0.2
    adapter_file = tmp_path / "zimage_turbo_training_adapter_v2.safetensors"
    save_file(adapter, str(adapter_file))
    config = transformer_config(zimage, dataset, tmp_path / "with", max_steps=2, sample_prompts=["a cat"],
                           training_adapter=str(adapter_file))
    merged = ZImageBackbone.load(config, None)
    plain = ZImageBackbone.load(transformer_config(zimage, dataset, tmp_path / "without", max_steps=2), None)
    for name in ("layers.0.attention.to_q", "layers.1.feed_forward.w1", "layers.0.adaLN_modulation.0"):
        update = adapter[f"diffusion_model.{name}.lora_B.weight"] @ adapter[f"diffusion_model.{name}.lora_A.weight"]
        torch.testing.assert_close(merged.transformer.get_submodule(name).weight,
                                   plain.transformer.get_submodule(name).weight + update)
    torch.manual_seed(0)
    x, t = torch.randn(1, 16, 8, 8), torch.tensor([0.6])
    cond = {"text": torch.randn(1, 32, 64), "mask": (torch.arange(32) < 12).float()[None]}
    with torch.no_grad():
        want = plain.predict(plain.transformer, x, t, cond)
        assert (merged.predict(merged.transformer, x, t, cond) - want).abs().max() > 1e-3
        with merged.adapter_removed():
            torch.testing.assert_close(merged.predict(merged.transformer, x, t, cond), want, rtol=1e-4, atol=1e-5)
    # held in fp8 (base_weights: fp8), the layers are new modules: the adapter still comes out of previews
    store_in_fp8(repeated_blocks(merged.transformer), torch.device("cpu"))
    store_in_fp8(repeated_blocks(plain.transformer), torch.device("cpu"))
    with torch.no_grad():
        want = plain.predict(plain.transformer, x, t, cond)
        present = (merged.predict(merged.transformer, x, t, cond) - want).abs().max()
        with merged.adapter_removed():  # what is left is the two models' fp8 rounding (0.42 against 0.023 here)
            assert (merged.predict(merged.transformer, x, t, cond) - want).abs().max() < 0.1 * present
    with_adapter = train_lora(config, backbone=merged)
    without = train_lora(transformer_config(zimage, dataset, tmp_path / "without", max_steps=2), backbone=plain)
    assert len(with_adapter.samples) == 1
    a, b = load_file(str(with_adapter.lora_file)), load_file(str(without.lora_file))
    assert a.keys() == b.keys()  # the LoRA's own layers only: no adaLN_modulation from the adapter
    assert not any(".adaLN_modulation." in k for k in a)
    assert not all(torch.equal(a[k], b[k]) for k in a)  # it learned on the merged weights


@pytest.mark.slow  # the default run's time budget; CI runs it with -m slow
def test_all_in_one_checkpoints_diffusers_folders_and_diffusers_named_files_load(zimage, dataset, tmp_path):
    reference = ZImageBackbone.load(transformer_config(zimage, dataset, tmp_path / "x"), None)
    named = zimage.with_name("z_image_turbo_diffusers_names.safetensors")  # beside the split files' parts
    save_file({k: v.clone() for k, v in reference.transformer.state_dict().items()}, str(named))
    aio = build_tiny_zimage(tmp_path / "aio", layout="checkpoint")
    folder = build_tiny_zimage(tmp_path / "hf", layout="diffusers")
    try:
        for model in (aio, folder, named):
            config = transformer_config(model, dataset, tmp_path / "x")
            assert ZImageBackbone.detect(config) == "zimage"
            backbone = ZImageBackbone.load(config, None)
            assert backbone.variant == "turbo"
            for mine, theirs in ((backbone.transformer, reference.transformer), (backbone.vae, reference.vae),
                                 (backbone.text_encoders[0], reference.text_encoders[0])):
                own = mine.state_dict()
                assert all(torch.equal(own[k], v) for k, v in theirs.state_dict().items()), model
    finally:
        named.unlink()
    result = train_lora(transformer_config(aio, dataset, tmp_path / "run", max_steps=1, sample_prompts=["a cat"]))
    assert result.lora_file.is_file() and len(result.samples) == 1


def test_bad_zimage_inputs_are_refused_before_anything_is_written(zimage, dataset, tmp_path):
    lonely = tmp_path / "lonely" / "z_image_turbo_bf16.safetensors"
    lonely.parent.mkdir()
    shutil.copy(zimage, lonely)
    out = tmp_path / "out"
    with pytest.raises(CheckpointError, match=r"Qwen3-4B.*autoencoder"):
        train_lora(transformer_config(lonely, dataset, out))
    vae = zimage.parents[1] / "vae" / "ae.safetensors"
    stranger = tmp_path / "umt5.safetensors"
    save_file({"encoder.layers.0.weight": torch.zeros(2)}, str(stranger))
    with pytest.raises(CheckpointError, match="umt5.safetensors is none of the parts a Z-Image model uses"):
        train_lora(transformer_config(lonely, dataset, out, text_encoders=[str(stranger)]))
    wide = tmp_path / "qwen_3_8b.safetensors"  # a Qwen3 of another width (klein 9B's)
    save_file({f"model.{k}": v.contiguous() for k, v in tiny_qwen3(width=96).state_dict().items()}, str(wide))
    with pytest.raises(CheckpointError, match="qwen_3_8b.safetensors is not the text encoder this Z-Image"):
        train_lora(transformer_config(lonely, dataset, out, text_encoders=[str(wide)], vae=str(vae)))
    named = {"text_encoders": [str(zimage.parents[1] / "text_encoders" / "qwen_3_4b.safetensors")], "vae": str(vae)}
    with pytest.raises(CheckpointError, match="Qwen tokenizer was not found"):
        train_lora(transformer_config(lonely, dataset, out, **named))
    truncated = tmp_path / "lonely" / "cut.safetensors"
    truncated.write_bytes(zimage.read_bytes()[:5000])
    with pytest.raises(CheckpointError, match="cut.safetensors"):
        train_lora(transformer_config(truncated, dataset, out))
    with pytest.raises(ConfigError, match="shuffle_captions"):
        train_lora(transformer_config(zimage, dataset, out, shuffle_captions=True))
    with pytest.raises(CheckpointError, match="missing_adapter.safetensors does not exist"):
        train_lora(transformer_config(zimage, dataset, out, training_adapter=str(tmp_path / "missing_adapter.safetensors")))
    assert not out.exists()
    # with the tokenizer named, the same split files train
    tokenizers = zimage.parents[2] / "comfy" / "text_encoders" / "qwen25_tokenizer"
    assert train_lora(transformer_config(lonely, dataset, out, tokenizers=str(tokenizers), max_steps=1, **named)).lora_file

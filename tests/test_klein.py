"""Flux.2 klein from files: ComfyUI's split layout and diffusers folders, training, exact resume, the LoRA's keys
as ComfyUI and diffusers read them, continuing from a LoRA, and bad inputs refused before anything is cached."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap

import diffusers
import pytest
import torch
import transformers
from conftest import (
    assert_diffusers_reads_our_update,
    assert_resume_is_bit_identical,
    checkpoint_loras,
    transformer_config,
)
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

if not hasattr(diffusers, "Flux2Transformer2DModel") or not hasattr(transformers, "Qwen3Model"):
    pytest.skip("Flux.2 klein needs diffusers >= 0.36 and transformers >= 4.51", allow_module_level=True)

from lora_trainer.backbones.files import read_weights
from lora_trainer.backbones.flux2 import (
    KleinBackbone,
    bfl_from_transformer,
    empirical_mu,
    names,
    size_of,
    transformer_from_bfl,
)
from lora_trainer.backbones.tiny_flux2 import build_tiny_klein
from lora_trainer.errors import CheckpointError
from lora_trainer.lora.inject import add_lora, load_lora_state
from lora_trainer.train.loop import train_lora


@pytest.fixture(scope="module")
def klein(tmp_path_factory):
    """A tiny klein base in ComfyUI's split layout (with Qwen's tokenizer where ComfyUI keeps it)."""
    return build_tiny_klein(tmp_path_factory.mktemp("comfy"))


def merged(weights: dict[str, torch.Tensor], state: dict[str, torch.Tensor], scale: float):
    """The transformer of BFL `weights` with a peft LoRA `state` added into its weights (`weights` left as they are:
    the model would otherwise hold them, not copies)."""
    model = transformer_from_bfl({k: v.clone() for k, v in weights.items()})
    with torch.no_grad():
        for key, down in state.items():
            if key.endswith(".lora_A.weight"):
                layer = key.removesuffix(".lora_A.weight")
                model.get_submodule(layer).weight += scale * state[f"{layer}.lora_B.weight"] @ down
    return model


def test_the_bfl_layout_round_trips_and_loads_as_diffusers_converts_it(klein):
    from diffusers.loaders.single_file_utils import convert_flux2_transformer_checkpoint_to_diffusers

    weights = read_weights(klein)
    model = transformer_from_bfl(dict(weights))
    theirs = convert_flux2_transformer_checkpoint_to_diffusers(dict(weights))
    ours = model.state_dict()
    assert theirs.keys() == ours.keys() and all(torch.equal(theirs[k], ours[k]) for k in ours)
    back = bfl_from_transformer(model)
    assert back.keys() == weights.keys() and all(torch.equal(back[k], weights[k]) for k in back)


def test_previews_follow_the_pipeline_schedule_and_the_file_name_tells_base_from_distilled(klein, tmp_path):
    from diffusers.pipelines.flux2.pipeline_flux2_klein import compute_empirical_mu

    for seq_len, steps in ((4096, 4), (1024, 50), (5000, 4), (16, 2)):
        assert empirical_mu(seq_len, steps) == pytest.approx(compute_empirical_mu(seq_len, steps))
    base = KleinBackbone.load(transformer_config(klein, tmp_path, tmp_path / "x"), None)
    assert base.variant == "4b" and not base.distilled and base.uses_cfg()
    assert base.defaults() == {"sample_steps": 50, "sample_guidance_scale": 4.0}
    assert base.sampling_schedule(4, 4096)[:4] == pytest.approx([1.0, 0.9674, 0.9081, 0.7672], abs=1e-4)
    distilled = tmp_path / "flux-2-klein-4b.safetensors"
    shutil.copy(klein, distilled)
    models = klein.parents[1]
    named = {"text_encoders": [str(models / "text_encoders" / "qwen_3_4b.safetensors")],
             "vae": str(models / "vae" / "flux2-vae.safetensors"),
             "tokenizers": str(klein.parents[2] / "comfy" / "text_encoders" / "qwen25_tokenizer")}
    backbone = KleinBackbone.load(transformer_config(distilled, tmp_path, tmp_path / "x", **named), None)
    assert backbone.distilled and not backbone.uses_cfg()
    assert backbone.defaults() == {"sample_steps": 4, "sample_guidance_scale": 1.0}


def test_klein_trains_from_comfyui_split_files_and_the_loss_falls(klein, one_image, tmp_path):
    result = train_lora(transformer_config(klein, one_image, tmp_path / "run", max_steps=40, learning_rate=1e-2,
                                     timestep_sampling="uniform", log_every_n_steps=10, lora_targets="locon"))
    losses = [loss for _, loss in result.losses]
    assert losses[-1] < losses[0] * 0.85, losses  # ~1.0 is the part of the velocity the noise makes unpredictable
    with safe_open(str(result.lora_file), "pt") as f:
        keys, metadata = set(f.keys()), f.metadata()
    assert "lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight" in keys
    assert "lora_unet_double_blocks_0_txt_mlp_0.lora_up.weight" in keys
    assert "lora_unet_single_blocks_0_linear1.lora_up.weight" in keys
    assert "lora_unet_double_stream_modulation_img_lin.alpha" in keys
    assert metadata["ss_base_model_version"] == "flux2_klein_4b"
    assert metadata["modelspec.architecture"] == "Flux.2-klein-4b/lora"


def test_the_file_has_exactly_the_trained_effect(klein, dataset, tmp_path):
    """Fused q/k/v parts written block-diagonally: the file applied to a fresh model gives the trained outputs."""
    result = train_lora(transformer_config(klein, dataset, tmp_path / "run", max_steps=3, lora_targets="locon"))
    weights = read_weights(klein)
    trained = KleinBackbone(family="klein", transformer=transformer_from_bfl(dict(weights)), vae=None,
                            text_encoders=[], tokenizers=[])
    state = checkpoint_loras(result)
    add_lora(trained.transformer, sorted({k.rsplit(".lora_", 1)[0] for k in state}), 4, 4.0, 0.0)
    load_lora_state(trained.transformer, state)
    loaded = KleinBackbone(family="klein", transformer=transformer_from_bfl(dict(weights)), vae=None,
                           text_encoders=[], tokenizers=[])
    loaded.apply_lora_file(str(result.lora_file))
    plain = transformer_from_bfl(dict(weights))
    torch.manual_seed(0)
    x, t, cond = torch.randn(2, 128, 4, 6), torch.tensor([0.3, 0.8]), {"txt": torch.randn(2, 7, 96)}
    with torch.no_grad():
        want = trained.predict(trained.transformer, x, t, cond)
        got = loaded.predict(loaded.transformer, x, t, cond)
        base = trained.predict(plain, x, t, cond)
    assert (want - base).abs().max() > 1e-4  # the LoRA does something
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_diffusers_reads_every_key_of_a_real_sized_klein_lora():
    """At klein 4B's real sizes, every key of our file is consumed by diffusers' kohya Flux.2 reader and each layer
    gets exactly our update (B @ A times the scale). The shared modulation layers of a locon LoRA are not among
    them: that reader skips them."""
    from diffusers.loaders.lora_conversion_utils import _convert_kohya_flux2_lora_to_diffusers

    targets = names(5, 20, 3072, 9216)
    picked = [n for n in targets if n.startswith(("transformer_blocks.0.", "single_transformer_blocks.0.",
                                                  "transformer_blocks.4.", "single_transformer_blocks.19."))]
    tensors = assert_diffusers_reads_our_update(
        KleinBackbone, targets, picked,
        lambda name: 3072 + 9216 if name.endswith("attn.to_out") else 9216 if name.endswith("linear_out") else 3072,
        _convert_kohya_flux2_lora_to_diffusers)
    assert "lora_unet_double_blocks_4_txt_attn_qkv.lora_up.weight" in tensors


def test_real_sized_files_build_klein_4b_and_9b():
    """The shapes of klein 4B's and 9B's files (on the meta device: no memory) build the reference configs, and
    Qwen3-4B / Qwen3-8B only up to the last layer klein reads."""
    from diffusers import Flux2Transformer2DModel
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from lora_trainer.backbones.flux2 import qwen3_from_state

    for double, single, heads, text, variant in ((5, 20, 24, 7680, "4b"), (8, 24, 32, 12288, "9b")):
        with torch.device("meta"):
            reference = Flux2Transformer2DModel(num_layers=double, num_single_layers=single, num_attention_heads=heads,
                                                joint_attention_dim=text, guidance_embeds=False)
        model = transformer_from_bfl(bfl_from_transformer(reference))
        assert {k: v for k, v in model.config.items() if not k.startswith("_") and v != reference.config[k]} == \
            {"out_channels": 128}  # the reference leaves it None: the same as in_channels
        assert size_of(model) == variant
        qwen = Qwen3Config(vocab_size=151936, hidden_size=text // 3, intermediate_size=9728 if variant == "4b" else 12288,
                           num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8, head_dim=128)
        with torch.device("meta"):
            full = Qwen3ForCausalLM(qwen)
        encoder = qwen3_from_state(full.state_dict())
        assert encoder.config.num_hidden_layers == 27 and encoder.config.hidden_size == text // 3
        assert encoder.layers[0].mlp.gate_proj.weight.shape == full.model.layers[0].mlp.gate_proj.weight.shape


@pytest.mark.slow  # the default run's time budget; CI runs it with -m slow
def test_resume_is_bit_identical(klein, dataset, tmp_path):
    assert_resume_is_bit_identical(klein, dataset, tmp_path, caption_dropout=0.3, flip_aug=True, noise_offset=0.05)


@pytest.mark.slow  # the default run's time budget; CI runs it with -m slow
def test_continuing_from_our_file_or_a_diffusers_named_lora(klein, dataset, tmp_path):
    first = train_lora(transformer_config(klein, dataset, tmp_path / "first", max_steps=2, sample_prompts=["a red cat"]))
    assert len(first.samples) == 1  # base klein: two steps with CFG
    with Image.open(first.samples[0]) as image:
        assert image.size == (64, 64)
    diffusers_file = tmp_path / "diffusers_format.safetensors"
    state = checkpoint_loras(first)
    save_file({f"transformer.{k}": v.contiguous() for k, v in state.items()}, str(diffusers_file))
    backbone = KleinBackbone.load(transformer_config(klein, dataset, tmp_path / "x"), None)
    ours, theirs = backbone.read_lora(str(first.lora_file), alpha=4.0), backbone.read_lora(str(diffusers_file), 4.0)
    assert "transformer_blocks.0.attn.add_k_proj" in ours and ours.keys() == theirs.keys()
    result = train_lora(transformer_config(klein, dataset, tmp_path / "more", max_steps=1, init_lora=str(first.lora_file)))
    assert result.lora_file.is_file()


@pytest.mark.slow  # the default run's time budget; CI runs it with -m slow
def test_a_diffusers_klein_folder_trains(tmp_path, dataset):
    folder = build_tiny_klein(tmp_path / "hf", layout="diffusers", base=False)
    assert KleinBackbone.detect(transformer_config(folder, dataset, tmp_path / "x")) == "klein"
    result = train_lora(transformer_config(folder, dataset, tmp_path / "run", max_steps=1))
    assert result.lora_file.is_file()
    assert KleinBackbone.load(transformer_config(folder, dataset, tmp_path / "x"), None).distilled


def test_bad_klein_inputs_are_refused_before_anything_is_written(klein, dataset, tmp_path):
    lonely = tmp_path / "lonely" / "flux-2-klein-base-4b.safetensors"
    lonely.parent.mkdir()
    shutil.copy(klein, lonely)
    out = tmp_path / "out"
    with pytest.raises(CheckpointError, match=r"Qwen3 text encoder.*Flux.2 autoencoder"):
        train_lora(transformer_config(lonely, dataset, out))
    encoders, vae = klein.parents[1] / "text_encoders", klein.parents[1] / "vae" / "flux2-vae.safetensors"
    wide = tmp_path / "qwen_3_8b.safetensors"  # a Qwen3 of another width (klein 9B's)
    qwen = load_file(str(encoders / "qwen_3_4b.safetensors"))
    qwen["model.embed_tokens.weight"] = torch.zeros(qwen["model.embed_tokens.weight"].shape[0], 48)
    save_file(qwen, str(wide))
    with pytest.raises(CheckpointError, match="qwen_3_8b.safetensors is not the text encoder this klein transformer"):
        train_lora(transformer_config(lonely, dataset, out, text_encoders=[str(wide)], vae=str(vae)))
    named = {"text_encoders": [str(encoders / "qwen_3_4b.safetensors")], "vae": str(vae)}
    with pytest.raises(CheckpointError, match="Qwen tokenizer was not found"):
        train_lora(transformer_config(lonely, dataset, out, **named))
    dev = tmp_path / "flux2-dev.safetensors"  # FLUX.2 [dev]: the same layout with a guidance input
    weights = load_file(str(klein))
    weights.update({"guidance_in.in_layer.weight": torch.zeros(128, 256), "guidance_in.out_layer.weight": torch.zeros(128, 128)})
    save_file(weights, str(dev))
    with pytest.raises(CheckpointError, match="flux2-dev.safetensors is FLUX.2 \\[dev\\].*only klein"):
        train_lora(transformer_config(dev, dataset, out))
    (tmp_path / "dev_folder").mkdir()
    (tmp_path / "dev_folder" / "model_index.json").write_text(json.dumps({"_class_name": "Flux2Pipeline"}))
    with pytest.raises(CheckpointError, match="dev_folder is FLUX.2 \\[dev\\]"):
        train_lora(transformer_config(tmp_path / "dev_folder", dataset, out))
    assert not out.exists()
    # with the tokenizer named, the same split files train
    tokenizers = klein.parents[2] / "comfy" / "text_encoders" / "qwen25_tokenizer"
    assert train_lora(transformer_config(lonely, dataset, out, tokenizers=str(tokenizers), max_steps=1, **named)).lora_file


COMFY = os.environ.get("COMFYUI_PATH")
COMFY_SCRIPT = """
    import logging, sys
    sys.argv = ["main.py", "--cpu"]
    sys.path.insert(0, {comfy!r})
    import comfy.options
    comfy.options.enable_args_parsing()
    import torch, comfy.lora, comfy.lora_convert, comfy.model_base, comfy.sd, comfy.utils
    from safetensors.torch import save_file
    missed = []
    logging.getLogger().addHandler(type("H", (logging.Handler,), {{"emit": lambda self, r: missed.append(r.getMessage())}})())
    model = comfy.sd.load_diffusion_model({transformer!r}, model_options={{"dtype": torch.float32}})
    assert isinstance(model.model, comfy.model_base.Flux2), type(model.model)
    key_map = comfy.lora.model_lora_keys_unet(model.model, {{}})
    lora = comfy.lora_convert.convert_lora(comfy.utils.load_torch_file({lora!r}, safe_load=True))
    patches = comfy.lora.load_lora(lora, key_map)
    not_loaded = [m for m in missed if "lora key not loaded" in m]
    assert not not_loaded, not_loaded
    model.add_patches(patches, 1.0)
    model.patch_model()
    save_file({{k: v.float().contiguous() for k, v in model.model.diffusion_model.state_dict().items()}}, {out!r})
    print("patched", len(patches))
"""


def _comfy_has_flux2() -> bool:
    model_base = os.path.join(COMFY or "", "comfy", "model_base.py")
    return os.path.isfile(model_base) and "class Flux2(" in open(model_base, encoding="utf-8").read()


@pytest.mark.skipif(not COMFY, reason="set COMFYUI_PATH to a ComfyUI checkout (COMFYUI_PYTHON: its Python) to run this")
@pytest.mark.skipif(bool(COMFY) and not _comfy_has_flux2(), reason="this ComfyUI predates Flux.2 (0.3.7x or newer has it)")
def test_comfyui_maps_every_key_onto_its_flux2_model_with_the_trained_effect(klein, dataset, tmp_path):
    """ComfyUI's own key map and LoRA patching on our file: every key lands, and the patched weights are the
    trained transformer's (read back through diffusers' converter, independent of our layout tables)."""
    from diffusers.loaders.single_file_utils import convert_flux2_transformer_checkpoint_to_diffusers

    result = train_lora(transformer_config(klein, dataset, tmp_path / "run", max_steps=2, lora_targets="locon"))
    patched = tmp_path / "patched.safetensors"
    script = textwrap.dedent(COMFY_SCRIPT).format(comfy=COMFY, transformer=str(klein), lora=str(result.lora_file),
                                                  out=str(patched))
    run = subprocess.run([os.environ.get("COMFYUI_PYTHON", sys.executable), "-c", script], check=False, cwd=COMFY,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    weights = read_weights(klein)
    want = merged(weights, checkpoint_loras(result), scale=1.0).state_dict()
    got = convert_flux2_transformer_checkpoint_to_diffusers(load_file(str(patched)))
    assert got.keys() == want.keys()
    assert not torch.equal(want["single_stream_modulation.linear.weight"],
                           transformer_from_bfl(dict(weights)).state_dict()["single_stream_modulation.linear.weight"])
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=1e-4, atol=1e-5)

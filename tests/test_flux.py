"""Flux.1 from files: the layouts people have, training, exact resume, the LoRA's keys as the hosts read them,
continuing from peers' LoRAs, and bad inputs refused before anything is cached."""

from __future__ import annotations

import shutil

import pytest
import torch
from conftest import (
    assert_diffusers_reads_our_update,
    assert_resume_is_bit_identical,
    checkpoint_loras,
    quick_config,
    transformer_config,
)
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from lora_trainer.backbones.files import read_weights
from lora_trainer.backbones.flow import repeated_blocks
from lora_trainer.backbones.flux import FluxBackbone, bfl_from_transformer, names, transformer_from_bfl
from lora_trainer.backbones.tiny_flow import build_tiny_flux, tiny_flux_parts
from lora_trainer.errors import CheckpointError, ConfigError
from lora_trainer.train.loop import train_lora


@pytest.fixture(scope="module")
def flux(tmp_path_factory):
    """A tiny Flux.1-dev in ComfyUI's split layout (with T5's tokenizer where ComfyUI keeps it)."""
    return build_tiny_flux(tmp_path_factory.mktemp("comfy"))


def test_the_bfl_layout_round_trips_through_the_training_layout():
    parts = tiny_flux_parts()
    model = transformer_from_bfl(dict(parts["transformer"]))
    back = bfl_from_transformer(model)
    assert back.keys() == parts["transformer"].keys()
    assert all(torch.equal(back[k], parts["transformer"][k]) for k in back)


def test_flux_trains_from_comfyui_split_files_and_the_loss_falls(flux, one_image, tmp_path):
    result = train_lora(transformer_config(flux, one_image, tmp_path / "run", max_steps=40, learning_rate=1e-2,
                                    timestep_sampling="uniform", log_every_n_steps=10, lora_targets="locon"))
    losses = [loss for _, loss in result.losses]
    assert losses[-1] < losses[0] * 0.85, losses  # ~1.0 is the part of the velocity the noise makes unpredictable
    with safe_open(str(result.lora_file), "pt") as f:
        keys, metadata = set(f.keys()), f.metadata()
    assert "lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight" in keys
    assert "lora_unet_single_blocks_0_linear1.lora_up.weight" in keys
    assert metadata["ss_base_model_version"] == "flux1"
    assert metadata["modelspec.architecture"] == "flux-1-dev/lora"


def test_the_file_has_exactly_the_trained_effect(flux, dataset, tmp_path):
    """Fused q/k/v parts written block-diagonally: the file applied to a fresh model gives the trained outputs."""
    result = train_lora(transformer_config(flux, dataset, tmp_path / "run", max_steps=3, save_dtype="fp32",
                                    lora_targets="locon"))
    config = result.output_dir / "config.yaml"
    assert config.is_file()
    weights = read_weights(flux)
    trained = FluxBackbone(family="flux1", transformer=transformer_from_bfl(dict(weights)), vae=None,
                           text_encoders=[], tokenizers=[], variant="dev")
    state = checkpoint_loras(result)
    from lora_trainer.lora.inject import add_lora, load_lora_state

    add_lora(trained.transformer, sorted({k.rsplit(".lora_", 1)[0] for k in state}), 4, 4.0, 0.0)
    load_lora_state(trained.transformer, state)
    loaded = FluxBackbone(family="flux1", transformer=transformer_from_bfl(dict(weights)), vae=None,
                          text_encoders=[], tokenizers=[], variant="dev")
    loaded.apply_lora_file(str(result.lora_file))
    plain = transformer_from_bfl(dict(weights))
    for model in (trained, loaded):
        model.run["config"] = quick_config(flux, dataset, tmp_path)
    torch.manual_seed(0)
    x, t = torch.randn(2, 16, 8, 8), torch.tensor([0.3, 0.8])
    cond = {"t5": torch.randn(2, 5, 64), "pooled": torch.randn(2, 64)}
    with torch.no_grad():
        want = trained.predict(trained.transformer, x, t, cond)
        got = loaded.predict(loaded.transformer, x, t, cond)
        base = trained.predict(plain, x, t, cond)
    assert (want - base).abs().max() > 1e-4  # the LoRA does something
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_diffusers_reads_every_key_of_a_real_sized_flux_lora():
    """At Flux.1-dev's real sizes (diffusers' converter knows only those), every key of our file is consumed and
    each layer gets exactly our update (B @ A times the scale)."""
    from diffusers.loaders.lora_conversion_utils import _convert_kohya_flux_lora_to_diffusers

    targets = names(19, 38, 3072, 12288)
    picked = [n for n in targets if n.startswith(("transformer_blocks.0.", "single_transformer_blocks.0.",
                                                  "transformer_blocks.18.", "single_transformer_blocks.37."))]
    assert_diffusers_reads_our_update(
        FluxBackbone, targets, picked,
        lambda name: 3072 + 12288 if name.endswith("proj_out") else 12288 if name.endswith("net.2") else 3072,
        _convert_kohya_flux_lora_to_diffusers)


def test_resume_is_bit_identical(flux, dataset, tmp_path):
    assert_resume_is_bit_identical(flux, dataset, tmp_path, caption_dropout=0.3, flip_aug=True, noise_offset=0.05)


@pytest.mark.slow  # the default run's time budget; CI runs it with -m slow
def test_all_in_one_checkpoint_and_scaled_fp8_files_load(tmp_path, dataset):
    aio = build_tiny_flux(tmp_path / "aio", layout="checkpoint")
    result = train_lora(transformer_config(aio, dataset, tmp_path / "run", max_steps=1, sample_prompts=["a cat"]))
    assert result.lora_file.is_file() and len(result.samples) == 1
    # ComfyUI's "scaled fp8": fp8 weights with a per-tensor scale beside each
    split = build_tiny_flux(tmp_path / "fp8")
    weights = load_file(str(split))
    scaled = {"scaled_fp8": torch.zeros(0, dtype=torch.float8_e4m3fn)}
    for key, value in weights.items():
        if key.endswith(".weight") and value.ndim == 2:
            scale = value.abs().max().float() / 448
            scaled[key] = (value.float() / scale).to(torch.float8_e4m3fn)
            scaled[key.removesuffix(".weight") + ".scale_weight"] = scale.reshape(1)
        else:
            scaled[key] = value
    save_file(scaled, str(split))
    loaded = read_weights(split)
    assert loaded["img_in.weight"].dtype == torch.bfloat16
    torch.testing.assert_close(loaded["img_in.weight"].float(), weights["img_in.weight"], rtol=0.07, atol=1e-3)
    assert train_lora(transformer_config(split, dataset, tmp_path / "run8", max_steps=1)).lora_file.is_file()


@pytest.mark.slow  # the default run's time budget; CI runs it with -m slow
def test_continuing_from_a_kohya_or_diffusers_flux_lora(flux, dataset, tmp_path):
    first = train_lora(transformer_config(flux, dataset, tmp_path / "first", max_steps=2, save_dtype="fp32"))
    diffusers_file = tmp_path / "diffusers_format.safetensors"
    # the same LoRA in diffusers' names (peft lora_A/lora_B, transformer. prefix), as ai-toolkit writes Flux LoRAs
    state = checkpoint_loras(first)
    save_file({f"transformer.{k}": v.contiguous() for k, v in state.items()}, str(diffusers_file))
    for init in (first.lora_file, diffusers_file):
        backbone = FluxBackbone.load(transformer_config(flux, dataset, tmp_path / "x"), None)
        modules = backbone.read_lora(str(init), alpha=4.0)
        assert "transformer_blocks.0.attn.to_q" in modules
        result = train_lora(transformer_config(flux, dataset, tmp_path / f"cont_{init.stem}", max_steps=1, init_lora=str(init)))
        assert result.lora_file.is_file()


def test_bad_flux_inputs_are_refused_before_anything_is_written(flux, dataset, tmp_path):
    lonely = tmp_path / "lonely" / "flux1-dev.safetensors"
    lonely.parent.mkdir()
    shutil.copy(flux, lonely)
    out = tmp_path / "out"
    with pytest.raises(CheckpointError, match=r"CLIP-L.*T5-XXL.*autoencoder"):
        train_lora(transformer_config(lonely, dataset, out))
    vae = flux.parents[1] / "vae" / "ae.safetensors"
    stranger = tmp_path / "umt5.safetensors"
    save_file({"encoder.layers.0.weight": torch.zeros(2)}, str(stranger))
    with pytest.raises(CheckpointError, match="umt5.safetensors is none of the parts a Flux.1 model uses"):
        train_lora(transformer_config(lonely, dataset, out, text_encoders=[str(stranger)]))
    encoders = flux.parents[1] / "text_encoders"
    wide = tmp_path / "clip_g.safetensors"  # a CLIP text encoder of another width (SDXL's second one)
    clip = load_file(str(encoders / "clip_l.safetensors"))
    clip["text_model.embeddings.token_embedding.weight"] = torch.zeros(49408, 1280)
    save_file(clip, str(wide))
    with pytest.raises(CheckpointError, match="clip_g.safetensors is not the CLIP-L this Flux transformer takes"):
        train_lora(transformer_config(lonely, dataset, out, text_encoders=[str(wide), str(encoders / "t5xxl_fp16.safetensors")],
                               vae=str(vae)))
    named = {"text_encoders": [str(encoders / "clip_l.safetensors"), str(encoders / "t5xxl_fp16.safetensors")],
             "vae": str(vae)}
    with pytest.raises(CheckpointError, match="T5 tokenizer was not found"):
        train_lora(transformer_config(lonely, dataset, out, **named))
    truncated = tmp_path / "lonely" / "cut.safetensors"
    truncated.write_bytes(flux.read_bytes()[:5000])
    with pytest.raises(CheckpointError, match="cut.safetensors"):
        train_lora(transformer_config(truncated, dataset, out))
    with pytest.raises(ConfigError, match="shuffle_captions"):
        train_lora(transformer_config(flux, dataset, out, shuffle_captions=True))
    assert not out.exists()
    # with the tokenizer named, the same split files train
    tokenizers = flux.parents[2] / "comfy" / "text_encoders" / "t5_tokenizer"
    assert train_lora(transformer_config(lonely, dataset, out, tokenizers=str(tokenizers), max_steps=1, **named)).lora_file


def test_a_diffusers_flux_folder_loads_in_its_stored_precision_and_trains(tmp_path, dataset):
    """A diffusers Flux folder: every component from its subfolder, the transformer kept in bf16 as stored (diffusers
    would load a 12B transformer in fp32, 48 GB)."""
    import json

    from diffusers import FluxTransformer2DModel
    from transformers import CLIPTextModel, T5EncoderModel

    from lora_trainer.backbones.flux import clip_from_state, t5_from_state, vae_from_state
    from lora_trainer.backbones.tiny_flow import t5_tokenizer_files
    from lora_trainer.backbones.tokenizer import clip_tokenizer

    parts = tiny_flux_parts()
    folder = tmp_path / "FLUX.1-dev-tiny"
    transformer_from_bfl(dict(parts["transformer"])).to(torch.bfloat16).save_pretrained(folder / "transformer")
    vae_from_state(parts["ae"]).save_pretrained(folder / "vae")
    clip_from_state(parts["clip_l"]).save_pretrained(folder / "text_encoder")
    t5_from_state(dict(parts["t5xxl"])).save_pretrained(folder / "text_encoder_2")
    clip_tokenizer().save_pretrained(str(folder / "tokenizer"))
    t5_tokenizer_files(folder / "tokenizer_2")
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline"}), encoding="utf-8")
    config = transformer_config(folder, dataset, tmp_path / "run", max_steps=1)
    backbone = FluxBackbone.load(config, None)
    assert backbone.transformer.dtype == torch.bfloat16 and backbone.variant == "dev"
    assert isinstance(backbone.text_encoders[0], CLIPTextModel) and isinstance(backbone.text_encoders[1], T5EncoderModel)
    assert FluxTransformer2DModel.from_pretrained(folder / "transformer").dtype == torch.float32  # what diffusers does
    assert train_lora(config).lora_file.is_file()


def _compile_case(flux, dataset, tmp_path):
    """A tiny Flux with LoRA layers on every linear layer of its blocks, the inputs of a step, and a step's loss."""
    from lora_trainer.lora.inject import add_lora

    backbone = FluxBackbone(family="flux1", transformer=transformer_from_bfl(dict(read_weights(flux))), vae=None,
                            text_encoders=[], tokenizers=[], variant="dev")
    backbone.run["config"] = quick_config(flux, dataset, tmp_path)
    targets = backbone.lora_targets("locon")
    params = add_lora(backbone.transformer, targets, 4, 4.0, 0.0)
    torch.manual_seed(0)
    for param in params:
        param.data.normal_(0, 0.1)  # B starts at zero: give the LoRA an effect
    inputs = {"noisy": torch.randn(1, 16, 8, 8), "sigmas": torch.tensor([0.4]), "target": torch.randn(1, 16, 8, 8),
              "cond_t5": torch.randn(1, 5, 64), "cond_pooled": torch.randn(1, 64)}

    def step(network):
        for param in params:
            param.grad = None
        loss = backbone.loss(network, inputs)
        loss.backward()
        return loss.detach(), [param.grad.clone() for param in params]

    return backbone, step


def test_torch_compile_compiles_the_repeated_blocks_in_place_and_previews_run_them_plain(flux, dataset, tmp_path):
    """Regional compilation: the transformer stays the module the step runs, each of its blocks is compiled, and
    under `uncompiled` (previews) nothing is compiled and the outputs are the plain model's."""
    import torch._dynamo

    backbone, step = _compile_case(flux, dataset, tmp_path)
    plain_loss, plain_grads = step(backbone.transformer)
    network = backbone.compiled(backbone.transformer)
    assert network is backbone.transformer
    blocks = [*network.transformer_blocks, *network.single_transformer_blocks]
    assert len(blocks) == 2 and all(block._compiled_call_impl is not None for block in blocks)
    assert repeated_blocks(network) == blocks  # on any diffusers: from `_repeated_blocks` or the block lists
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()  # reset() leaves the counts of compiles earlier in this process
    with backbone.uncompiled():
        loss, grads = step(network)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 0  # nothing was compiled
    assert torch.equal(loss, plain_loss) and all(torch.equal(a, b) for a, b in zip(grads, plain_grads))


@pytest.mark.slow  # compiles two blocks with inductor on the CPU (~1 min on 2 cores); CI runs it with -m slow
def test_compiled_blocks_train_as_the_plain_ones(flux, dataset, tmp_path):
    """The compiled blocks (inductor's kernels, here its CPU code) give the plain model's loss and LoRA gradients."""
    import torch._dynamo

    backbone, step = _compile_case(flux, dataset, tmp_path)
    plain_loss, plain_grads = step(backbone.transformer)
    torch._dynamo.reset()
    network = backbone.compiled(backbone.transformer)
    loss, grads = step(network)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 2  # the double and the single block
    torch.testing.assert_close(loss, plain_loss, rtol=1e-4, atol=1e-5)
    for got, want in zip(grads, plain_grads):
        torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-5)

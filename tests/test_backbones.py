"""Loading base models offline: tokenizer, family detection, configs derived from LDM keys."""

from __future__ import annotations

import pytest
import torch

from lora_trainer.backbones import ldm
from lora_trainer.backbones.checkpoint import UNET_PREFIX, detect_family
from lora_trainer.backbones.sd import DiffusionBackbone, family_of
from lora_trainer.backbones.tiny import tiny_state_dict
from lora_trainer.backbones.tokenizer import clip_tokenizer


def test_clip_tokenizer_from_open_clip_vocab_matches_openai_ids():
    tokenizer = clip_tokenizer()
    assert len(tokenizer) == 49408
    assert tokenizer("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    padded = clip_tokenizer(pad_token="!")("a cat", padding="max_length", max_length=8).input_ids
    assert padded[-1] == 0


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_family_is_read_from_the_keys_and_every_tensor_is_used(family, tiny_checkpoints):
    assert family_of(tiny_checkpoints[family]) == family
    checkpoint = tiny_state_dict(family)
    assert detect_family(checkpoint.keys()) == family
    unet_sd = {k[len(UNET_PREFIX):]: v for k, v in checkpoint.items() if k.startswith(UNET_PREFIX)}
    backbone = DiffusionBackbone.from_file(tiny_checkpoints[family])
    assert len(list(backbone.unet.parameters())) == len(unet_sd)
    expected_width = {"sd1": 64, "sd2": 64, "sdxl": 128}[family]
    assert backbone.unet.config.cross_attention_dim == expected_width
    cond = backbone.encode_prompts(["a cat", "a dog"])
    assert cond["hidden"].shape == (2, 77, expected_width)
    assert ("pooled" in cond) == (family == "sdxl")
    time_ids = torch.tensor([[64, 64, 0, 0, 64, 64]] * 2, dtype=torch.float32) if family == "sdxl" else None
    out = backbone.predict(torch.randn(2, 4, 8, 8), torch.tensor([10, 900]), cond, time_ids)
    assert out.shape == (2, 4, 8, 8) and out.abs().sum() > 0


def test_ldm_renaming_round_trips_through_diffusers_converter():
    checkpoint = tiny_state_dict("sdxl")
    unet_sd = {k[len(UNET_PREFIX):]: v for k, v in checkpoint.items() if k.startswith(UNET_PREFIX)}
    unet = ldm.unet_from_ldm(unet_sd, "sdxl", pooled_dim=64)
    back = ldm.unet_to_ldm(unet.state_dict(), unet.config.layers_per_block)
    assert back.keys() == unet_sd.keys()
    assert all(back[k].data_ptr() == unet_sd[k].data_ptr() for k in unet_sd)


@pytest.mark.slow  # the default run's time budget; CI runs it with -m slow
def test_a_diffusers_folder_trains_like_the_single_file(tiny_checkpoints, dataset, tmp_path):
    from conftest import quick_config

    from lora_trainer.train.loop import train_lora

    single = DiffusionBackbone.from_file(tiny_checkpoints["sdxl"])
    folder = tmp_path / "tiny-sdxl-diffusers"
    single.sampling_pipeline().save_pretrained(folder)
    assert family_of(folder) == "sdxl"
    loaded = DiffusionBackbone.from_file(folder)
    cond_a, cond_b = single.encode_prompts(["a cat"]), loaded.encode_prompts(["a cat"])
    assert torch.allclose(cond_a["hidden"], cond_b["hidden"]) and torch.allclose(cond_a["pooled"], cond_b["pooled"])
    result = train_lora(quick_config(folder, dataset, tmp_path / "out", max_steps=2))
    assert result.lora_file.is_file()


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_long_captions_are_encoded_in_75_token_chunks(family, tiny_checkpoints):
    short = DiffusionBackbone.from_file(tiny_checkpoints[family])
    long = DiffusionBackbone.from_file(tiny_checkpoints[family], max_token_length=150)
    caption = ", ".join(f"tag{i}" for i in range(60))  # well over 75 tokens
    width = 64 if family == "sd1" else 128
    assert short.encode_prompts([caption])["hidden"].shape == (1, 77, width)
    cond = long.encode_prompts([caption, "a cat"])
    assert cond["hidden"].shape == (2, 152, width)
    # a short caption's first chunk is exactly what the 75-token encoder sees
    assert torch.allclose(cond["hidden"][1, :76], short.encode_prompts(["a cat"])["hidden"][0, :76], atol=1e-6)
    # the second chunk of the long caption carries its words 76..150
    assert not torch.allclose(cond["hidden"][0, 76:], cond["hidden"][1, 76:])


@pytest.mark.slow  # the default run's time budget; CI runs it with -m slow
def test_training_with_long_captions(tiny_checkpoints, dataset, tmp_path):
    from conftest import quick_config

    from lora_trainer.train.loop import train_lora

    result = train_lora(quick_config(tiny_checkpoints["sdxl"], dataset, tmp_path / "out", max_token_length=225,
                                     max_steps=2))
    assert result.lora_file.is_file()


@pytest.mark.slow  # the default run's time budget; CI runs it with -m slow
def test_a_v_prediction_sdxl_marked_ztsnr_trains_and_samples_as_it_was_made(dataset, tmp_path):
    """NoobAI-XL v-pred files carry `v_pred` and `ztsnr` keys. Peers that miss them train without error and the LoRA
    draws empty images: the model is trained on noise it never sees, and sampling starts short of pure noise."""
    import numpy as np
    import yaml
    from conftest import quick_config
    from PIL import Image

    from lora_trainer.backbones.tiny import build_tiny_checkpoint
    from lora_trainer.lora.kohya import read_lora_file
    from lora_trainer.train.loop import train_lora

    checkpoint = build_tiny_checkpoint(tmp_path / "noob-vpred.safetensors", "sdxl-vpred")
    backbone = DiffusionBackbone.from_file(checkpoint)
    assert (backbone.family, backbone.prediction_type, backbone.zero_terminal_snr) == ("sdxl", "v_prediction", True)
    assert backbone.noise_scheduler.alphas_cumprod[-1] == 0  # the last training timestep is pure noise
    latents, noise = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    last = torch.tensor([999, 999])
    torch.testing.assert_close(backbone.noise_scheduler.add_noise(latents, noise, last), noise)
    torch.testing.assert_close(backbone.target(latents, noise, last), -latents)  # v there is the image itself
    scheduler = backbone.sampling_scheduler()
    scheduler.set_timesteps(10)
    assert int(scheduler.timesteps[0]) == 999  # sampling starts from pure noise ('trailing' spacing)
    plain = DiffusionBackbone.from_file(build_tiny_checkpoint(tmp_path / "plain.safetensors", "sdxl"))
    assert (plain.prediction_type, plain.zero_terminal_snr) == ("epsilon", False)

    result = train_lora(quick_config(checkpoint, dataset, tmp_path / "out", max_steps=6, sample_prompts=["a cat"],
                                     sample_steps=4))
    _, metadata = read_lora_file(result.lora_file)
    assert (metadata["ss_v_parameterization"], metadata["modelspec.prediction_type"],
            metadata["ss_zero_terminal_snr"]) == ("True", "v", "True")
    saved = yaml.safe_load((tmp_path / "out" / "config.yaml").read_text())
    assert (saved["prediction_type"], saved["zero_terminal_snr"]) == ("v_prediction", "on")
    assert all(np.isfinite(loss) for _, loss in result.losses)
    assert np.asarray(Image.open(result.samples[0])).std() > 1  # an image, not one flat colour


def test_zero_terminal_snr_with_noise_prediction_is_refused_before_anything_is_cached(dataset, tmp_path, caplog):
    from conftest import quick_config

    from lora_trainer.backbones.tiny import build_tiny_checkpoint
    from lora_trainer.errors import ConfigError
    from lora_trainer.train.loop import train_lora

    checkpoint = build_tiny_checkpoint(tmp_path / "noob-vpred.safetensors", "sdxl-vpred")
    with pytest.raises(ConfigError, match="zero_terminal_snr needs v-prediction"):
        train_lora(quick_config(checkpoint, dataset, tmp_path / "eps", prediction_type="epsilon"))
    assert not (tmp_path / "eps").exists()
    assert "marked as a v-prediction model" in caplog.text

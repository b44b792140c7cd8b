"""From an LDM-layout state dict (a checkpoint file or a host's memory) to diffusers/transformers modules.

Model configs are derived from the tensors' names and shapes, so nothing is downloaded. The UNet is
built on the meta device and takes the given tensors with `assign=True`: its parameters share storage
with the source, so a host's UNet is never copied.
"""

from __future__ import annotations

import re

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.loaders.single_file_utils import (
    convert_ldm_clip_checkpoint,
    convert_ldm_unet_checkpoint,
    convert_ldm_vae_checkpoint,
    convert_open_clip_checkpoint,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from lora_trainer.errors import CheckpointError

VAE_SCALING = {"sd1": 0.18215, "sd2": 0.18215, "sdxl": 0.13025}
HEAD_DIM = 64  # SD2, SDXL and every CLIP/OpenCLIP text encoder use 64 channels per attention head
SD1_HEADS = 8  # SD1's UNet uses 8 heads whatever the width

OPEN_CLIP_PREFIX = {"sd2": "cond_stage_model.model.", "sdxl": "conditioner.embedders.1.model."}
CLIP_PREFIX = {"sd1": "cond_stage_model.transformer.", "sdxl": "conditioner.embedders.0.transformer."}


def _block_ids(keys: list[str], part: str) -> list[int]:
    """Sorted indices N of '<part>.N.' keys."""
    return sorted({int(m.group(1)) for k in keys if (m := re.match(rf"{part}\.(\d+)\.", k))})


def _depth(sd: dict[str, torch.Tensor], prefix: str) -> int:
    """How many transformer blocks a SpatialTransformer at `prefix` has (0 if none)."""
    return len(_block_ids([k[len(prefix):] for k in sd if k.startswith(prefix)], "transformer_blocks"))


def unet_config_from_ldm(sd: dict[str, torch.Tensor], family: str) -> dict:
    """A diffusers UNet2DConditionModel config derived from an LDM UNet state dict (no prefix)."""
    keys = list(sd)
    try:
        conv_in = sd["input_blocks.0.0.weight"]
        model_channels, in_channels = conv_in.shape[0], conv_in.shape[1]
        input_ids = _block_ids(keys, "input_blocks")
        down_ids = [i for i in input_ids if f"input_blocks.{i}.0.op.weight" in sd]
        levels = len(down_ids) + 1
        layers = (len(input_ids) - 1 - len(down_ids)) // levels
        channels, depths, attn = [], [], []
        for level in range(levels):
            first = 1 + level * (layers + 1)
            channels.append(sd[f"input_blocks.{first}.0.out_layers.3.weight"].shape[0])
            depth = _depth(sd, f"input_blocks.{first}.1.")
            attn.append(depth > 0)
            depths.append(max(depth, 1))
        context_key = next(k for k in keys if k.endswith("attn2.to_k.weight"))
        context_dim = sd[context_key].shape[1]
        linear_proj = sd[next(k for k in keys if k.endswith("proj_in.weight"))].ndim == 2
    except (KeyError, StopIteration, IndexError) as exc:
        raise CheckpointError(f"The UNet's layout is not one of SD1.x/SD2.x/SDXL (missing {exc}).") from None
    if model_channels != channels[0]:
        raise CheckpointError("The UNet's first level changes width; this layout is not supported.")
    heads = [SD1_HEADS] * levels if family == "sd1" else [max(c // HEAD_DIM, 1) for c in channels]
    config = {
        "sample_size": 64 if family == "sd1" else 96 if family == "sd2" else 128,
        "in_channels": in_channels,
        "out_channels": sd["out.2.weight"].shape[0],
        "down_block_types": ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attn],
        "up_block_types": ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)],
        "block_out_channels": channels,
        "layers_per_block": layers,
        "cross_attention_dim": context_dim,
        "attention_head_dim": heads if family != "sd1" else SD1_HEADS,
        "use_linear_projection": linear_proj,
        "transformer_layers_per_block": depths if family == "sdxl" else 1,
    }
    if family == "sdxl":
        adm_in = sd["label_emb.0.0.weight"].shape[1]
        config.update(addition_embed_type="text_time", projection_class_embeddings_input_dim=adm_in,
                      addition_time_embed_dim=256 if adm_in == 2816 else None)
    return config


def sdxl_time_embed_dim(adm_in: int, pooled_dim: int) -> int:
    """The Fourier size of each SDXL size/crop number: label_emb's input is pooled + 6 of them."""
    return (adm_in - pooled_dim) // 6


def unet_from_ldm(state_dict: dict[str, torch.Tensor], family: str, pooled_dim: int | None = None) -> UNet2DConditionModel:
    """A diffusers UNet whose parameters are the given LDM tensors (shared storage, no copy).

    `state_dict` holds the UNet keys without the 'model.diffusion_model.' prefix.
    """
    config = unet_config_from_ldm(state_dict, family)
    if family == "sdxl":
        if pooled_dim is None:
            raise CheckpointError("SDXL needs the pooled text size to build its UNet.")
        config["addition_time_embed_dim"] = sdxl_time_embed_dim(config["projection_class_embeddings_input_dim"], pooled_dim)
    converted = convert_ldm_unet_checkpoint({"model.diffusion_model." + k: v for k, v in state_dict.items()}, config)
    with torch.device("meta"):
        unet = UNet2DConditionModel(**config)
    missing, unexpected = unet.load_state_dict(converted, strict=False, assign=True)
    if missing or unexpected:
        raise CheckpointError(f"The UNet did not load cleanly: missing {missing[:5]}, unexpected {unexpected[:5]}.")
    return unet


def vae_from_ldm(checkpoint: dict[str, torch.Tensor], family: str) -> AutoencoderKL:
    """The VAE of an LDM single-file checkpoint, config derived from its shapes."""
    sd = {k[len("first_stage_model."):]: v for k, v in checkpoint.items() if k.startswith("first_stage_model.")}
    if not sd:
        raise CheckpointError("The checkpoint has no VAE (no 'first_stage_model.*' keys); bake one in first.")
    return vae_from_state(sd, scaling=VAE_SCALING[family])


def vae_from_state(sd: dict[str, torch.Tensor], scaling: float, shift: float | None = None) -> AutoencoderKL:
    """An autoencoder from LDM-named weights (`encoder.down.0...`, prefix removed), config derived from the shapes:
    SD's (with quant convs) and Flux's (16 channels, none)."""
    levels = _block_ids(list(sd), "encoder.down")
    channels = [sd[f"encoder.down.{i}.block.0.conv2.weight"].shape[0] for i in levels]
    layers = len(_block_ids([k[len("encoder.down.0."):] for k in sd if k.startswith("encoder.down.0.")], "block"))
    quant = "quant_conv.weight" in sd
    config = {
        "in_channels": sd["encoder.conv_in.weight"].shape[1],
        "out_channels": sd["decoder.conv_out.weight"].shape[0],
        "down_block_types": ["DownEncoderBlock2D"] * len(levels),
        "up_block_types": ["UpDecoderBlock2D"] * len(levels),
        "block_out_channels": channels,
        "layers_per_block": layers,
        "latent_channels": sd["decoder.conv_in.weight"].shape[1],
        "scaling_factor": scaling,
        "shift_factor": shift,
        "use_quant_conv": quant,
        "use_post_quant_conv": quant,
    }
    vae = AutoencoderKL(**config)
    converted = convert_ldm_vae_checkpoint(sd, config)
    vae.load_state_dict(converted, strict=True)
    return vae


def _clip_config(sd: dict[str, torch.Tensor], prefix: str, act: str, layers_drop: int = 0) -> CLIPTextConfig:
    """A CLIPTextConfig from HF-named weights under `prefix` ('text_model.' style)."""
    tok = sd[prefix + "text_model.embeddings.token_embedding.weight"]
    layer_ids = _block_ids([k[len(prefix + "text_model.encoder."):] for k in sd
                            if k.startswith(prefix + "text_model.encoder.layers.")], "layers")
    hidden = tok.shape[1]
    proj = sd.get(prefix + "text_projection.weight")
    return CLIPTextConfig(
        vocab_size=tok.shape[0], hidden_size=hidden, num_hidden_layers=len(layer_ids) - layers_drop,
        intermediate_size=sd[prefix + "text_model.encoder.layers.0.mlp.fc1.weight"].shape[0],
        num_attention_heads=max(hidden // HEAD_DIM, 1), hidden_act=act,
        max_position_embeddings=sd[prefix + "text_model.embeddings.position_embedding.weight"].shape[0],
        projection_dim=proj.shape[0] if proj is not None else hidden,
        pad_token_id=1, bos_token_id=49406, eos_token_id=49407,
    )


def text_model_keys(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """HF CLIP weights named as in checkpoints ('text_model.*'), whatever transformers version made them."""
    return {k if k.startswith(("text_model.", "text_projection")) else "text_model." + k: v for k, v in sd.items()}


def _load_text_model(model: torch.nn.Module, sd: dict[str, torch.Tensor]) -> None:
    """Load checkpoint-named CLIP weights into `model` (transformers 5 drops 'text_model.' in CLIPTextModel)."""
    own = set(model.state_dict())
    sd = text_model_keys(sd)
    if not any(k.startswith("text_model.") for k in own):
        sd = {k.removeprefix("text_model."): v for k, v in sd.items()}
    missing, _ = model.load_state_dict({k: v for k, v in sd.items() if k in own}, strict=False)
    missing = [k for k in missing if not k.endswith("position_ids")]  # a buffer in older transformers
    if missing:
        raise CheckpointError(f"The text encoder is missing weights: {missing[:5]}.")


def clip_from_ldm(checkpoint: dict[str, torch.Tensor], family: str) -> CLIPTextModel:
    """OpenAI CLIP text encoder (SD1's, SDXL's first) from its LDM keys."""
    prefix = CLIP_PREFIX[family]
    sd = text_model_keys(convert_ldm_clip_checkpoint({k: v for k, v in checkpoint.items() if k.startswith(prefix)}))
    model = CLIPTextModel(_clip_config(sd, "", "quick_gelu"))
    _load_text_model(model, sd)
    return model


def open_clip_from_ldm(checkpoint: dict[str, torch.Tensor], family: str) -> CLIPTextModel:
    """OpenCLIP text encoder (SD2's, SDXL's second) from its LDM keys, in transformers' CLIP classes.

    SD2 conditions on the penultimate layer followed by the final norm, which is a CLIP text model
    with its last layer removed; SDXL's second encoder keeps every layer and its projection (pooled output).
    """
    prefix = OPEN_CLIP_PREFIX[family]
    layers = _block_ids([k[len(prefix + "transformer."):] for k in checkpoint
                         if k.startswith(prefix + "transformer.resblocks.")], "resblocks")
    if not layers:
        raise CheckpointError(f"The checkpoint has no OpenCLIP text encoder under '{prefix}'.")
    source = {k: v for k, v in checkpoint.items() if k.startswith(prefix)}
    if family == "sd2":
        last = f"{prefix}transformer.resblocks.{layers[-1]}."
        source = {k: v for k, v in source.items() if not k.startswith(last)}
    width = source[prefix + "token_embedding.weight"].shape[1]

    class _Probe:  # the converter reads the q/k/v split width from the model's config (name varies by version)
        config = type("Config", (), {"hidden_size": width, "projection_dim": width})

    sd = text_model_keys(convert_open_clip_checkpoint(_Probe, source, prefix=prefix))
    cls = CLIPTextModelWithProjection if family == "sdxl" else CLIPTextModel
    config = _clip_config(sd, "", "gelu")
    config.pad_token_id = 0
    model = cls(config)
    _load_text_model(model, sd)
    return model


def unet_to_ldm(sd: dict[str, torch.Tensor], layers_per_block: int) -> dict[str, torch.Tensor]:
    """Rename a diffusers UNet state dict to the LDM layout (the inverse of diffusers' converter)."""
    step = layers_per_block + 1
    resnet = [("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("norm2", "out_layers.0"),
              ("conv2", "out_layers.3"), ("time_emb_proj", "emb_layers.1"), ("conv_shortcut", "skip_connection")]
    fixed = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
             "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2",
             "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}
    up_has_attn = {int(m.group(1)) for k in sd if (m := re.match(r"up_blocks\.(\d+)\.attentions\.", k))}
    out = {}
    for key, value in sd.items():
        name, _, leaf = key.rpartition(".")
        if name in fixed:
            out[f"{fixed[name]}.{leaf}"] = value
            continue
        parts = name.split(".")
        if parts[0] == "down_blocks":
            block, kind = int(parts[1]), parts[2]
            if kind == "downsamplers":
                new = f"input_blocks.{1 + block * step + layers_per_block}.0.op"
            else:
                index = 1 + block * step + int(parts[3])
                new = f"input_blocks.{index}.{0 if kind == 'resnets' else 1}." + ".".join(parts[4:])
        elif parts[0] == "up_blocks":
            block, kind = int(parts[1]), parts[2]
            if kind == "upsamplers":
                new = f"output_blocks.{block * step + layers_per_block}.{2 if block in up_has_attn else 1}.conv"
            else:
                index = block * step + int(parts[3])
                new = f"output_blocks.{index}.{0 if kind == 'resnets' else 1}." + ".".join(parts[4:])
        elif parts[0] == "mid_block":
            kind, index = parts[1], int(parts[2])
            slot = 1 if kind == "attentions" else (0 if index == 0 else 2)
            new = f"middle_block.{slot}." + ".".join(parts[3:])
        else:
            raise KeyError(key)
        if ".0.op" not in new and not new.endswith(".conv") and kind == "resnets":
            for old, ldm in resnet:
                new = re.sub(rf"\.{old}$", f".{ldm}", new)
        out[f"{new.rstrip('.')}.{leaf}"] = value
    return out

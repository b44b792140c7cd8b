"""Tiny random-weight SD1/SD2/SDXL checkpoints in the original LDM single-file layout.

The demo and the tests train on these: they go through exactly the loading path of a real
checkpoint (family detection, config derivation, diffusers' LDM converters), only smaller.
Widths follow the real families' rules (64 channels per attention head, SD1's 8 UNet heads).
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from lora_trainer.backbones.ldm import text_model_keys, unet_to_ldm

VOCAB = 49408
TEXT_WIDTH = 64


def _unet(family: str) -> UNet2DConditionModel:
    """A two-level UNet of the family's shape."""
    common = {"sample_size": 8, "in_channels": 4, "out_channels": 4, "layers_per_block": 1, "norm_num_groups": 32}
    if family == "sd1":
        return UNet2DConditionModel(**common, block_out_channels=(32, 64), attention_head_dim=8,
                                    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                                    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
                                    cross_attention_dim=TEXT_WIDTH)
    if family == "sd2":
        return UNet2DConditionModel(**common, block_out_channels=(64, 128), attention_head_dim=(1, 2),
                                    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                                    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
                                    cross_attention_dim=TEXT_WIDTH, use_linear_projection=True)
    return UNet2DConditionModel(**common, block_out_channels=(64, 128), attention_head_dim=(1, 2),
                                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
                                transformer_layers_per_block=(1, 2), cross_attention_dim=2 * TEXT_WIDTH,
                                use_linear_projection=True, addition_embed_type="text_time",
                                addition_time_embed_dim=8, projection_class_embeddings_input_dim=TEXT_WIDTH + 6 * 8)


def wake_unet(unet: UNet2DConditionModel) -> UNet2DConditionModel:
    """Give the layers LDM zero-initialises small random values: a UNet whose output is always 0 proves nothing."""
    with torch.no_grad():
        for param in unet.parameters():
            if param.ndim > 1 and not param.any():
                param.normal_(0, 0.02)
    return unet


def _text_config(act: str, layers: int) -> CLIPTextConfig:
    """A narrow CLIP text encoder with the real vocabulary and context length."""
    return CLIPTextConfig(vocab_size=VOCAB, hidden_size=TEXT_WIDTH, intermediate_size=2 * TEXT_WIDTH,
                          num_hidden_layers=layers, num_attention_heads=1, max_position_embeddings=77,
                          hidden_act=act, projection_dim=TEXT_WIDTH)


def _clip(layers: int) -> dict[str, torch.Tensor]:
    """An OpenAI-CLIP-style text encoder's weights, named as in checkpoints."""
    return text_model_keys(CLIPTextModel(_text_config("quick_gelu", layers)).state_dict())


def vae_to_ldm(sd: dict[str, torch.Tensor], levels: int) -> dict[str, torch.Tensor]:
    """Rename a diffusers AutoencoderKL state dict to the LDM layout."""
    out = {}
    for key, value in sd.items():
        new = key.replace("conv_norm_out", "norm_out").replace("conv_shortcut", "nin_shortcut")
        new = re.sub(r"encoder\.down_blocks\.(\d+)\.resnets\.", r"encoder.down.\1.block.", new)
        new = re.sub(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", r"encoder.down.\1.downsample.", new)
        new = re.sub(r"decoder\.up_blocks\.(\d+)\.resnets\.",
                     lambda m: f"decoder.up.{levels - 1 - int(m.group(1))}.block.", new)
        new = re.sub(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.",
                     lambda m: f"decoder.up.{levels - 1 - int(m.group(1))}.upsample.", new)
        new = re.sub(r"mid_block\.resnets\.(\d+)\.", lambda m: f"mid.block_{int(m.group(1)) + 1}.", new)
        if "mid_block.attentions.0." in new:
            new = new.replace("mid_block.attentions.0.", "mid.attn_1.")
            for old, ldm in (("group_norm", "norm"), ("to_q", "q"), ("to_k", "k"), ("to_v", "v"), ("to_out.0", "proj_out")):
                new = new.replace(f".{old}.", f".{ldm}.")
            if value.ndim == 2:
                value = value[:, :, None, None].contiguous()  # LDM's attention uses 1x1 convolutions
        out[new] = value
    return out


def clip_to_open_clip(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a transformers CLIP text model state dict to OpenCLIP's layout (fused q/k/v)."""
    sd = text_model_keys(sd)
    out = {"token_embedding.weight": sd["text_model.embeddings.token_embedding.weight"],
           "positional_embedding": sd["text_model.embeddings.position_embedding.weight"],
           "ln_final.weight": sd["text_model.final_layer_norm.weight"],
           "ln_final.bias": sd["text_model.final_layer_norm.bias"]}
    if "text_projection.weight" in sd:
        out["text_projection"] = sd["text_projection.weight"].T.contiguous()
    layers = {int(m.group(1)) for k in sd if (m := re.match(r"text_model\.encoder\.layers\.(\d+)\.", k))}
    for i in sorted(layers):
        src, dst = f"text_model.encoder.layers.{i}.", f"transformer.resblocks.{i}."
        for leaf in ("weight", "bias"):
            out[f"{dst}attn.in_proj_{leaf}"] = torch.cat([sd[f"{src}self_attn.{p}_proj.{leaf}"] for p in "qkv"])
            for old, new in (("self_attn.out_proj", "attn.out_proj"), ("layer_norm1", "ln_1"), ("layer_norm2", "ln_2"),
                             ("mlp.fc1", "mlp.c_fc"), ("mlp.fc2", "mlp.c_proj")):
                out[f"{dst}{new}.{leaf}"] = sd[f"{src}{old}.{leaf}"]
    return out


def _prefixed(prefix: str, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`sd` with every key under `prefix`."""
    return {prefix + k: v for k, v in sd.items()}


def tiny_state_dict(family: str = "sd1", seed: int = 0) -> dict[str, torch.Tensor]:
    """A whole tiny checkpoint of `family` ('sd1', 'sd2', 'sdxl') in LDM single-file naming."""
    torch.manual_seed(seed)
    unet = wake_unet(_unet(family))
    vae = AutoencoderKL(block_out_channels=(32, 32, 32, 32), layers_per_block=1, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
    ckpt = _prefixed("model.diffusion_model.", unet_to_ldm(unet.state_dict(), 1))
    ckpt.update(_prefixed("first_stage_model.", vae_to_ldm(vae.state_dict(), 4)))
    if family == "sd1":
        ckpt.update(_prefixed("cond_stage_model.transformer.", _clip(2)))
    elif family == "sd2":
        ckpt.update(_prefixed("cond_stage_model.model.", clip_to_open_clip(
            CLIPTextModelWithProjection(_text_config("gelu", 3)).state_dict())))
    else:
        ckpt.update(_prefixed("conditioner.embedders.0.transformer.", _clip(2)))
        ckpt.update(_prefixed("conditioner.embedders.1.model.", clip_to_open_clip(
            CLIPTextModelWithProjection(_text_config("gelu", 2)).state_dict())))
    return {k: v.contiguous() for k, v in ckpt.items() if not k.endswith("position_ids")}


def comfy_sdxl_unet(depths: tuple[int, int, int] = (1, 2, 10)) -> UNet2DConditionModel:
    """The smallest SDXL UNet ComfyUI detects as SDXL: model_channels 320 and SDXL's transformer depths (none, 2, 10),
    but 320 wide at every level. Other depths make ComfyUI's SDXL variants: (1, 1, 2) Segmind Vega, (1, 2, 4) SSD-1B.
    """
    return wake_unet(UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 320, 320),
        attention_head_dim=(5, 5, 5), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), transformer_layers_per_block=depths,
        cross_attention_dim=2048, use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816))


def host_state_dict(family: str = "sd1", seed: int = 0) -> dict[str, torch.Tensor]:
    """The smallest checkpoint the hosts take: SD1.5 (fp16, ~420 MB), SD2 (~1 GB) or SDXL (~1.8 GB).

    The hosts build fixed-size text encoders (CLIP-L, OpenCLIP ViT-H, ViT-bigG) and a fixed-size LDM VAE,
    so those are full size; only the UNet is small. ComfyUI detects SD1.5 from model_channels 320 and
    context_dim 768 (SD2: 1024 and linear projections): one level of 320. The WebUI reads the UNet's shape
    from a .yaml beside the checkpoint; for SDXL its LoRA key mapping assumes two res blocks per level.
    ComfyUI does not detect that 'sdxl' (it wants SDXL's model_channels and transformer depths): 'sdxl-comfy'
    is an SDXL it detects (~2.4 GB, see comfy_sdxl_unet).
    """
    torch.manual_seed(seed)
    if family == "sdxl-comfy":
        unet = comfy_sdxl_unet()
    elif family == "sdxl":
        unet = UNet2DConditionModel(
            sample_size=8, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(64, 128),
            attention_head_dim=(1, 2), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), transformer_layers_per_block=(1, 2),
            cross_attention_dim=2048, use_linear_projection=True, addition_embed_type="text_time",
            addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816)
    else:
        sd2 = family == "sd2"
        unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                                    block_out_channels=(320,), attention_head_dim=5 if sd2 else 8,
                                    cross_attention_dim=1024 if sd2 else 768, use_linear_projection=sd2,
                                    down_block_types=("CrossAttnDownBlock2D",), up_block_types=("CrossAttnUpBlock2D",))
    wake_unet(unet)
    vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
    ckpt = _prefixed("model.diffusion_model.", unet_to_ldm(unet.state_dict(), 2 if family.startswith("sdxl") else 1))
    ckpt.update(_prefixed("first_stage_model.", vae_to_ldm(vae.state_dict(), 4)))

    def encoder(width: int, layers: int, heads: int, act: str, cls=CLIPTextModelWithProjection):
        config = CLIPTextConfig(vocab_size=VOCAB, hidden_size=width, intermediate_size=4 * width,
                                num_hidden_layers=layers, num_attention_heads=heads, max_position_embeddings=77,
                                hidden_act=act, projection_dim=width)
        return {k: v.half() for k, v in cls(config).state_dict().items()}  # bigG is 700M parameters

    if family.startswith("sdxl"):
        ckpt.update(_prefixed("conditioner.embedders.0.transformer.",
                              text_model_keys(encoder(768, 12, 12, "quick_gelu", CLIPTextModel))))
        ckpt.update(_prefixed("conditioner.embedders.1.model.", clip_to_open_clip(encoder(1280, 32, 20, "gelu"))))
        ckpt["conditioner.embedders.1.model.logit_scale"] = torch.tensor(4.6052)
    elif family == "sd2":
        ckpt.update(_prefixed("cond_stage_model.model.", clip_to_open_clip(encoder(1024, 24, 16, "gelu"))))
    else:
        ckpt.update(_prefixed("cond_stage_model.transformer.",
                              text_model_keys(encoder(768, 12, 12, "quick_gelu", CLIPTextModel))))
    return {k: v.to(torch.float16).contiguous() for k, v in wake_text_encoders(ckpt).items()
            if not k.endswith("position_ids")}


def wake_text_encoders(ckpt: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Give the text encoders' final LayerNorm a non-zero random bias, in place; returns `ckpt`.

    With the zero bias of a fresh model the empty prompt's states average exactly 0, and the WebUI's emphasis
    renormalisation (mean before / mean after) then divides 0 by 0.
    """
    for key, value in ckpt.items():
        if key.endswith(("final_layer_norm.bias", "ln_final.bias")):
            ckpt[key] = 0.05 + 0.02 * torch.randn(value.shape, device=value.device)
    return ckpt


def build_tiny_checkpoint(path: str | Path, family: str = "sd1", seed: int = 0) -> Path:
    """Write a random-weight checkpoint to `path`: a tiny one of `family`, or 'sd1-host'/'sd2-host'/'sdxl-host'/
    'sdxl-comfy-host' for the hosts; 'sdxl-vpred' is SDXL with the v_pred and ztsnr marker keys that NoobAI-XL
    v-pred files carry."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    host = family.endswith("-host")
    vpred = family.endswith("-vpred")
    family = family.removesuffix("-vpred")
    tensors = host_state_dict(family.removesuffix("-host"), seed) if host else tiny_state_dict(family, seed)
    if vpred:
        tensors.update({"v_pred": torch.tensor([]), "ztsnr": torch.tensor([])})
    save_file(tensors, str(path), metadata={"format": "pt"})
    return path

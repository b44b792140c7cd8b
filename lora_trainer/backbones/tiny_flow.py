"""Tiny random-weight diffusion transformers in the layouts people's files have (tests and the demo).

`build_tiny_flux(root)` lays out a ComfyUI-style models folder: a BFL-layout Flux.1-dev transformer in
`models/diffusion_models`, CLIP-L and T5 text encoders in `models/text_encoders`, the autoencoder in
`models/vae`, and T5's tokenizer where a ComfyUI installation keeps it (`comfy/text_encoders/t5_tokenizer`),
built in code. Widths follow the real family's rules (128-wide attention heads, 16 latent channels, an
8x autoencoder); ComfyUI loads such a transformer (1 double and 1 single block, hidden 128).
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import AutoencoderKL, FluxTransformer2DModel
from safetensors.torch import save_file
from transformers import CLIPTextModel, T5Config, T5EncoderModel

from lora_trainer.backbones.flux import bfl_from_transformer
from lora_trainer.backbones.ldm import text_model_keys
from lora_trainer.backbones.tiny import _text_config, vae_to_ldm

T5_WIDTH = 64
WORDS = ["a", "photo", "of", "the", "an", "in", "on", "with", "and", "red", "blue", "green", "small", "large", "dog", "cat", "house", "tree", "mountain", "person", "painting", "style", "portrait", "landscape", "zkblob", "sks", "girl", "boy", "city", "night", "day", "sky", "water"]


def t5_tokenizer_files(folder: Path) -> Path:
    """A small T5-style tokenizer (SentencePiece Unigram over words and letters, `</s>` appended, `<pad>` 0),
    saved as tokenizer.json the way ComfyUI ships T5's."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import T5TokenizerFast

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    pieces += [(f"\u2581{w}", -2.0) for w in WORDS] + [("\u2581", -3.0)]
    pieces += [(c, -5.0) for c in "abcdefghijklmnopqrstuvwxyz0123456789,.-'"]
    tok = Tokenizer(models.Unigram(pieces, unk_id=2))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                       special_tokens=[("</s>", 1)])
    wrapped = T5TokenizerFast(tokenizer_object=tok, eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
                              extra_ids=0, additional_special_tokens=[])
    folder.mkdir(parents=True, exist_ok=True)
    wrapped.save_pretrained(str(folder))
    return folder


def _tiny_vae() -> AutoencoderKL:
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 4,
                         up_block_types=["UpDecoderBlock2D"] * 4, block_out_channels=(32, 32, 32, 32),
                         layers_per_block=1, latent_channels=16, use_quant_conv=False, use_post_quant_conv=False)


def _wake(model: torch.nn.Module) -> torch.nn.Module:
    """Small random values where a fresh model has zeros (output layers), so outputs depend on every input."""
    with torch.no_grad():
        for param in model.parameters():
            if not param.any():
                param.normal_(0, 0.02)
    return model


def tiny_flux_parts(seed: int = 0, guidance: bool = True) -> dict[str, dict[str, torch.Tensor]]:
    """The four files' tensors: 'transformer' (BFL layout), 'clip_l', 't5xxl' (HF layouts), 'ae' (LDM layout)."""
    torch.manual_seed(seed)
    t5 = T5EncoderModel(T5Config(vocab_size=128, d_model=T5_WIDTH, d_kv=32, d_ff=128, num_layers=2, num_heads=2,
                                 feed_forward_proj="gated-gelu", is_encoder_decoder=False))
    clip = CLIPTextModel(_text_config("quick_gelu", 2))
    transformer = _wake(FluxTransformer2DModel(num_layers=1, num_single_layers=1, attention_head_dim=128,
                                               num_attention_heads=1, joint_attention_dim=T5_WIDTH,
                                               pooled_projection_dim=clip.config.hidden_size,
                                               guidance_embeds=guidance, in_channels=64))
    t5_sd = {k: v for k, v in t5.state_dict().items() if k != "encoder.embed_tokens.weight"}  # tied, as files hold it
    return {"transformer": bfl_from_transformer(transformer), "clip_l": text_model_keys(clip.state_dict()),
            "t5xxl": t5_sd, "ae": vae_to_ldm(_wake(_tiny_vae()).state_dict(), 4)}


def build_tiny_flux(root: str | Path, *, layout: str = "comfy", seed: int = 0, guidance: bool = True) -> Path:
    """Write a tiny Flux.1 under `root` and return the path to give as base_model. `layout` 'comfy': split files
    in root/models/{diffusion_models,text_encoders,vae} with T5's tokenizer in root/comfy/text_encoders/t5_tokenizer
    (as in a ComfyUI installation); 'checkpoint': one all-in-one file root/models/checkpoints/flux_tiny.safetensors
    (ComfyUI's prefixes) and the same tokenizer folder. guidance=False makes a schnell-like model."""
    root = Path(root)
    parts = tiny_flux_parts(seed, guidance)
    t5_tokenizer_files(root / "comfy" / "text_encoders" / "t5_tokenizer")
    name = "flux1-dev-tiny" if guidance else "flux1-schnell-tiny"
    models = root / "models"
    if layout == "checkpoint":
        tensors = {f"model.diffusion_model.{k}": v for k, v in parts["transformer"].items()}
        tensors.update({f"text_encoders.clip_l.transformer.{k}": v for k, v in parts["clip_l"].items()})
        tensors.update({f"text_encoders.t5xxl.transformer.{k}": v for k, v in parts["t5xxl"].items()})
        tensors.update({f"vae.{k}": v for k, v in parts["ae"].items()})
        save_parts(models, {("checkpoints", f"{name}.safetensors"): tensors})
        return models / "checkpoints" / f"{name}.safetensors"
    save_parts(models, {("diffusion_models", f"{name}.safetensors"): parts["transformer"],
                        ("text_encoders", "clip_l.safetensors"): parts["clip_l"],
                        ("text_encoders", "t5xxl_fp16.safetensors"): parts["t5xxl"], ("vae", "ae.safetensors"): parts["ae"]})
    return models / "diffusion_models" / f"{name}.safetensors"


def save_parts(models: Path, files: dict[tuple[str, str], dict[str, torch.Tensor]]) -> None:
    """Each file's tensors saved as models/<folder>/<file>, the way a ComfyUI models folder holds them."""
    for (folder, file), tensors in files.items():
        (models / folder).mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(models / folder / file))

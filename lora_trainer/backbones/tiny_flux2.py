"""A tiny random-weight Flux.2 klein in the layouts people's files have (tests).

`build_tiny_klein(root)` lays out a ComfyUI-style models folder: a BFL-layout klein transformer in
`models/diffusion_models`, a Qwen3 text encoder in `models/text_encoders`, the Flux.2 autoencoder (with its
BatchNorm statistics) in `models/vae`, and a Qwen-style byte-level BPE tokenizer where ComfyUI keeps Qwen's
(`comfy/text_encoders/qwen25_tokenizer`), built in code. Widths follow the real family's rules where ComfyUI
fixes them (128-wide heads, 128 patch channels from 32 latent channels, MLP 3x); the Qwen3 is 32 wide but has the
28 layers it needs for klein to read its layer 27.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from diffusers import AutoencoderKLFlux2, Flux2Transformer2DModel
from safetensors.torch import save_file
from transformers import Qwen3Config, Qwen3Model

from lora_trainer.backbones.flux2 import bfl_from_transformer
from lora_trainer.backbones.tiny import vae_to_ldm
from lora_trainer.backbones.tiny_flow import _wake, save_parts

QWEN_WIDTH = 32
QWEN_LAYERS = 28  # klein reads the states entering layer 27; one more, as a real file has more than it reads
WORDS = ["a", "photo", "of", "the", "an", "in", "on", "with", "and", "red", "blue", "green", "cat", "dog", "house",
         "tree", "mountains", "picture", "inkwash", "style", "portrait", "sks", "user", "assistant"]
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]


def qwen_tokenizer_files(folder: Path) -> int:
    """A small Qwen2-style tokenizer (byte-level BPE learnt from a few words, Qwen's chat and think tokens after
    the vocabulary), saved as ComfyUI ships Qwen's: vocab.json, merges.txt, tokenizer_config.json. Returns its
    size, special tokens included."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator([" ".join(WORDS)] * 4 + WORDS, trainer)
    folder.mkdir(parents=True, exist_ok=True)
    tok.model.save(str(folder))
    size = tok.get_vocab_size()
    added = {str(size + i): {"content": text, "lstrip": False, "normalized": False, "rstrip": False,
                             "single_word": False, "special": True} for i, text in enumerate(SPECIAL)}
    config = {"add_bos_token": False, "add_prefix_space": False, "added_tokens_decoder": added,
              "additional_special_tokens": ["<|im_start|>", "<|im_end|>"], "bos_token": None,
              "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "unk_token": None, "errors": "replace",
              "model_max_length": 131072, "clean_up_tokenization_spaces": False, "split_special_tokens": False,
              "tokenizer_class": "Qwen2Tokenizer"}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    return size + len(SPECIAL)


def tiny_klein_models(vocab: int, seed: int = 0) -> tuple:
    """The three models at tiny sizes, random weights: (transformer, Qwen3 encoder, autoencoder)."""
    torch.manual_seed(seed)
    transformer = _wake(Flux2Transformer2DModel(num_layers=1, num_single_layers=1, attention_head_dim=128,
                                                num_attention_heads=1, joint_attention_dim=3 * QWEN_WIDTH,
                                                in_channels=128, guidance_embeds=False))
    encoder = Qwen3Model(Qwen3Config(vocab_size=vocab, hidden_size=QWEN_WIDTH, intermediate_size=64,
                                     num_hidden_layers=QWEN_LAYERS, num_attention_heads=2, num_key_value_heads=1,
                                     head_dim=16, rope_theta=1_000_000.0))
    vae = _wake(AutoencoderKLFlux2(block_out_channels=(32, 32, 32, 32), layers_per_block=1, latent_channels=32,
                                   norm_num_groups=32))
    with torch.no_grad():  # statistics as a trained autoencoder has them, so the normalisation does something
        vae.bn.running_mean.normal_(0, 0.1)
        vae.bn.running_var.uniform_(0.5, 2.0)
    return transformer, encoder, vae


def vae_file_layout(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A diffusers AutoencoderKLFlux2 state dict in the layout of BFL's flux2-vae.safetensors."""
    out = {}
    for key, value in vae_to_ldm(sd, 4).items():
        if key.startswith("quant_conv."):
            key = "encoder." + key
        elif key.startswith("post_quant_conv."):
            key = "decoder." + key
        out[key] = value
    return out


def build_tiny_klein(root: str | Path, *, layout: str = "comfy", seed: int = 0, base: bool = True) -> Path:
    """Write a tiny klein under `root` and return the path to give as base_model. `layout` 'comfy': split files
    in root/models/{diffusion_models,text_encoders,vae} with Qwen's tokenizer in root/comfy/text_encoders/
    qwen25_tokenizer (as in a ComfyUI installation); 'diffusers': a Flux2KleinPipeline folder root/<name>.
    `base` names it as klein base (file name / is_distilled), else as the distilled klein."""
    root = Path(root)
    tokenizer = root / "comfy" / "text_encoders" / "qwen25_tokenizer"
    vocab = qwen_tokenizer_files(tokenizer)
    transformer, encoder, vae = tiny_klein_models(vocab, seed)
    name = "flux-2-klein-base-tiny" if base else "flux-2-klein-tiny"
    if layout == "diffusers":
        folder = root / name
        transformer.save_pretrained(str(folder / "transformer"))
        vae.save_pretrained(str(folder / "vae"))
        (folder / "text_encoder").mkdir(parents=True)
        save_file({f"model.{k}": v.contiguous() for k, v in encoder.state_dict().items()},
                  str(folder / "text_encoder" / "model.safetensors"))
        encoder.config.to_json_file(str(folder / "text_encoder" / "config.json"))
        shutil.copytree(tokenizer, folder / "tokenizer")
        index = {"_class_name": "Flux2KleinPipeline", "is_distilled": not base,
                 "transformer": ["diffusers", "Flux2Transformer2DModel"], "vae": ["diffusers", "AutoencoderKLFlux2"],
                 "text_encoder": ["transformers", "Qwen3ForCausalLM"], "tokenizer": ["transformers", "Qwen2Tokenizer"],
                 "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"]}
        (folder / "model_index.json").write_text(json.dumps(index, indent=2), encoding="utf-8")
        return folder
    models = root / "models"
    files = {("diffusion_models", f"{name}.safetensors"): bfl_from_transformer(transformer),
             ("text_encoders", "qwen_3_4b.safetensors"): {f"model.{k}": v for k, v in encoder.state_dict().items()},
             ("vae", "flux2-vae.safetensors"): vae_file_layout(vae.state_dict())}
    save_parts(models, files)
    return models / "diffusion_models" / f"{name}.safetensors"

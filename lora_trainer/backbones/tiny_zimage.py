"""A tiny random-weight Z-Image in the layouts people's files have (tests and the demo).

`build_tiny_zimage(root)` lays out a ComfyUI-style models folder: the transformer in ComfyUI's (the original)
layout in `models/diffusion_models`, a Qwen3 text encoder in `models/text_encoders` (HF names, as ComfyUI's
qwen_3_4b file has them), the Flux-style autoencoder in `models/vae`, and a Qwen2-style byte-level BPE tokenizer
where ComfyUI keeps Qwen's (`comfy/text_encoders/qwen25_tokenizer`), built in code. Widths follow the real
family's rules (head width = the rotary axes' sum, 16 latent channels, an 8x autoencoder); a training step at 64 px
takes milliseconds on a CPU.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from lora_trainer.backbones.tiny import vae_to_ldm
from lora_trainer.backbones.tiny_flow import WORDS, _tiny_vae, _wake, save_parts
from lora_trainer.backbones.zimage import AXES_LENS, comfy_from_transformer, zimage_classes

QWEN_WIDTH = 64  # the tiny Qwen3's states, the transformer's caption input
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # after the vocabulary, as Qwen numbers them


def qwen_tokenizer_files(folder: Path) -> Path:
    """A small Qwen2-style tokenizer (byte-level BPE over a few words, Qwen's special tokens after them), saved as
    ComfyUI ships Qwen's: vocab.json, merges.txt and tokenizer_config.json."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    words = [*WORDS, "user", "assistant", "inkwash", "picture", "mountains"]
    tokenizer.train_from_iterator([" ".join(words)] * 4 + [f" {w}" for w in words] + ["user\n", "assistant\n"], trainer)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.model.save(str(folder))
    size = tokenizer.get_vocab_size()
    added = {str(size + i): {"content": token, "lstrip": False, "normalized": False, "rstrip": False,
                             "single_word": False, "special": True} for i, token in enumerate(SPECIAL_TOKENS)}
    config = {"add_prefix_space": False, "added_tokens_decoder": added, "additional_special_tokens": SPECIAL_TOKENS[1:],
              "bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "unk_token": None,
              "errors": "replace", "model_max_length": 131072, "split_special_tokens": False,
              "clean_up_tokenization_spaces": False, "tokenizer_class": "Qwen2Tokenizer"}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    return folder


def tiny_qwen3(seed: int = 0, width: int = QWEN_WIDTH) -> torch.nn.Module:
    """A two-layer Qwen3Model (Qwen3-4B's rules: q/k norms, grouped keys) whose vocabulary covers the tiny tokenizer."""
    _, Qwen3Config, Qwen3Model = zimage_classes()
    torch.manual_seed(seed)
    config = Qwen3Config(vocab_size=400, hidden_size=width, intermediate_size=2 * width, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=32, rms_norm_eps=1e-6,
                         rope_theta=1_000_000.0, max_position_embeddings=40960, tie_word_embeddings=True,
                         use_cache=False)
    return Qwen3Model(config).eval()


def tiny_transformer(seed: int = 0) -> torch.nn.Module:
    """Z-Image's transformer (diffusers' ZImageTransformer2DModel) at width 128 (two 64-wide heads, rotary axes
    16 + 24 + 24), two layers, one refiner block each."""
    transformer_class = zimage_classes()[0]
    torch.manual_seed(seed)
    return _wake(transformer_class(dim=128, n_heads=2, n_kv_heads=2, n_layers=2, n_refiner_layers=1,
                                   cap_feat_dim=QWEN_WIDTH, axes_dims=[16, 24, 24], axes_lens=AXES_LENS))


def tiny_zimage_parts(seed: int = 0) -> dict[str, dict[str, torch.Tensor]]:
    """The three files' tensors: 'transformer' (ComfyUI's layout), 'qwen3' (HF names under `model.`, as ComfyUI's
    qwen_3_4b file), 'ae' (LDM layout)."""
    transformer = tiny_transformer(seed)
    qwen = {f"model.{k}": v for k, v in tiny_qwen3(seed).state_dict().items()}
    return {"transformer": comfy_from_transformer(transformer), "qwen3": qwen,
            "ae": vae_to_ldm(_wake(_tiny_vae()).state_dict(), 4)}


def build_tiny_zimage(root: str | Path, *, layout: str = "comfy", seed: int = 0, turbo: bool = True) -> Path:
    """Write a tiny Z-Image under `root` and return the path to give as base_model. `layout` 'comfy': split files in
    root/models/{diffusion_models,text_encoders,vae} with Qwen's tokenizer in root/comfy/text_encoders/
    qwen25_tokenizer (as in a ComfyUI installation); 'checkpoint': one all-in-one file in root/models/checkpoints
    (ComfyUI's prefixes) and the same tokenizer folder; 'diffusers': a diffusers folder root/Z-Image-Turbo-tiny.
    turbo=False names the files as Base (the weights are the same kind)."""
    root = Path(root)
    if layout == "diffusers":
        return _diffusers_folder(root / ("Z-Image-Turbo-tiny" if turbo else "Z-Image-tiny"), seed)
    parts = tiny_zimage_parts(seed)
    qwen_tokenizer_files(root / "comfy" / "text_encoders" / "qwen25_tokenizer")
    name = "z_image_turbo_tiny" if turbo else "z_image_base_tiny"
    models = root / "models"
    if layout == "checkpoint":
        tensors = {f"model.diffusion_model.{k}": v for k, v in parts["transformer"].items()}
        tensors.update({f"text_encoders.qwen3_4b.transformer.{k}": v for k, v in parts["qwen3"].items()})
        tensors.update({f"vae.{k}": v for k, v in parts["ae"].items()})
        save_parts(models, {("checkpoints", f"{name}_aio.safetensors"): tensors})
        return models / "checkpoints" / f"{name}_aio.safetensors"
    save_parts(models, {("diffusion_models", f"{name}.safetensors"): parts["transformer"],
                        ("text_encoders", "qwen_3_4b.safetensors"): parts["qwen3"], ("vae", "ae.safetensors"): parts["ae"]})
    return models / "diffusion_models" / f"{name}.safetensors"


def _diffusers_folder(folder: Path, seed: int) -> Path:
    """The tiny model as a diffusers ZImagePipeline folder (the same weights as the split files of `seed`)."""
    tiny_transformer(seed).save_pretrained(folder / "transformer")
    tiny_qwen3(seed).save_pretrained(folder / "text_encoder")
    _wake(_tiny_vae()).save_pretrained(folder / "vae")  # drawn after the two above, as in tiny_zimage_parts
    qwen_tokenizer_files(folder / "tokenizer")
    index = {"_class_name": "ZImagePipeline", "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
             "text_encoder": ["transformers", "Qwen3Model"], "tokenizer": ["transformers", "Qwen2Tokenizer"],
             "transformer": ["diffusers", "ZImageTransformer2DModel"], "vae": ["diffusers", "AutoencoderKL"]}
    (folder / "model_index.json").write_text(json.dumps(index, indent=2), encoding="utf-8")
    return folder

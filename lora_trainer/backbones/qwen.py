"""Qwen3 as the text encoder of Z-Image and Flux.2 klein, built from a file's weights with no config to download."""

from __future__ import annotations

from pathlib import Path

import torch

from lora_trainer.backbones.files import block_count, find_tokenizer, host_roots
from lora_trainer.errors import CheckpointError

TOKENIZER_PLACES = ["tokenizer", "comfy/text_encoders/qwen25_tokenizer"]  # in a diffusers folder, in ComfyUI


def qwen3_weights(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """HF-named Qwen3 weights (`model.layers.N...`, as ComfyUI's qwen_3_4b file has them) without the `model.` prefix
    and the language-model head a text encoder never uses."""
    return {k.removeprefix("model."): v for k, v in sd.items() if not k.startswith("lm_head.")}


def qwen3_layers(sd: dict[str, torch.Tensor]) -> int:
    """The decoder layers in `qwen3_weights`."""
    return block_count(sd, "layers")


def qwen3_encoder(sd: dict[str, torch.Tensor], layers: int, needs: str) -> torch.nn.Module:
    """A Qwen3Model of the first `layers` decoder layers of `sd` (from `qwen3_weights`), config read from the shapes,
    its final norm an identity: the families read states between layers, and the rest would only take memory.
    Built on the meta device and loaded with assign (no copy). `needs` is the message when transformers is too old."""
    try:
        from accelerate import init_empty_weights
        from transformers import Qwen3Config, Qwen3Model
    except ImportError:
        raise CheckpointError(needs) from None
    head_dim = sd["layers.0.self_attn.q_norm.weight"].shape[0]
    vocab, hidden = sd["embed_tokens.weight"].shape
    config = Qwen3Config(vocab_size=vocab, hidden_size=hidden,
                         intermediate_size=sd["layers.0.mlp.gate_proj.weight"].shape[0],
                         num_hidden_layers=layers, head_dim=head_dim,
                         num_attention_heads=sd["layers.0.self_attn.q_proj.weight"].shape[0] // head_dim,
                         num_key_value_heads=sd["layers.0.self_attn.k_proj.weight"].shape[0] // head_dim,
                         rms_norm_eps=1e-6, rope_theta=1_000_000.0, max_position_embeddings=40960,
                         attention_dropout=0.0, tie_word_embeddings=False, use_cache=False)
    with init_empty_weights():  # parameters on the meta device; the rotary buffers are computed for real
        model = Qwen3Model(config)
    model.norm = torch.nn.Identity()
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    if missing:
        raise CheckpointError(f"The Qwen3 text encoder is missing weights: {missing[:4]}.")
    model.load_state_dict({k: sd[k] for k in own}, strict=True, assign=True)
    return model.eval()


def qwen_tokenizer(tokenizers: str, model_path: Path, model: str):
    """Qwen's tokenizer, offline: from `tokenizers` (the config's: a folder holding it, a diffusers folder of `model`,
    a ComfyUI installation), else from the ComfyUI installation the model file lies in."""
    places = [Path(tokenizers).expanduser()] if tokenizers else []
    places += host_roots(model_path)
    for marker in ("merges.txt", "tokenizer.json"):
        try:
            return qwen_tokenizer_from(find_tokenizer("Qwen", places, TOKENIZER_PLACES, marker))
        except CheckpointError:
            continue
    raise CheckpointError(
        f"The Qwen tokenizer was not found (looked in {', '.join(map(str, places)) or 'nowhere'}). It ships with "
        f"ComfyUI (comfy/text_encoders/qwen25_tokenizer) and with every diffusers copy of {model} (tokenizer/): set "
        "tokenizers: to your ComfyUI folder, to a diffusers folder of the model, or to a folder holding its "
        "vocab.json and merges.txt.")


def qwen_tokenizer_from(folder: Path):
    """Qwen's tokenizer from a folder (vocab.json + merges.txt, or tokenizer.json), refused if it is another's."""
    try:
        from transformers import Qwen2TokenizerFast
    except ImportError:
        raise CheckpointError("Qwen's tokenizer needs transformers 4.51 or newer: pip install -U transformers.") from None
    tokenizer = Qwen2TokenizerFast.from_pretrained(str(folder), local_files_only=True)
    if "<|im_start|>" not in tokenizer.get_vocab():
        raise CheckpointError(f"{folder} holds a tokenizer, but not Qwen's (it has no <|im_start|> token). Point "
                              "tokenizers: at ComfyUI's comfy/text_encoders/qwen25_tokenizer or a diffusers folder "
                              "of the model.")
    tokenizer.padding_side = "right"  # as the pipelines pad: the caption first, then <|endoftext|>
    return tokenizer

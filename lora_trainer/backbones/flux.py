"""Flux.1 (dev, schnell, Krea-dev): the BFL transformer, CLIP-L + T5-XXL, the 16-channel autoencoder.

Files as people have them: ComfyUI's split layout (`diffusion_models/flux1-dev.safetensors`,
`text_encoders/clip_l.safetensors` and `t5xxl_fp16.safetensors`, `vae/ae.safetensors`), all-in-one checkpoints
(`model.diffusion_model.*`, `text_encoders.*`, `vae.*`) and diffusers folders; bf16, fp16 or fp8 (plain or scaled).

The transformer trains as diffusers' `FluxTransformer2DModel`, whose attention has separate q, k and v layers
where the BFL layout fuses them (`img_attn.qkv`; `linear1` of a single block is q, k, v and the MLP input).
`NAMES` ties the two layouts together, both for loading the weights and for writing the LoRA in kohya
sd-scripts' Flux names (`lora_unet_double_blocks_0_img_attn_qkv`), which ComfyUI, Forge and diffusers all load.

Training follows kohya sd-scripts and ai-toolkit for LoRAs of the guidance-distilled dev: its guidance input is
held at 1.0 while training (`train_guidance`); previews sample with guidance 3.5 (schnell: 4 steps, none).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from diffusers import AutoencoderKL, FluxTransformer2DModel
from transformers import CLIPTextModel, T5Config, T5EncoderModel, T5TokenizerFast

from lora_trainer.backbones import ldm
from lora_trainer.backbones.files import (
    Part,
    block_count,
    find_parts,
    find_tokenizer,
    host_roots,
    read_weights,
    safetensors_keys,
    shape_of,
    stored_dtype,
)
from lora_trainer.backbones.flow import FileTarget, FlowBackbone
from lora_trainer.backbones.tokenizer import clip_tokenizer
from lora_trainer.config import TrainConfig
from lora_trainer.errors import CheckpointError

log = logging.getLogger(__name__)

PREFIXES = ("model.diffusion_model.", "diffusion_model.", "")  # where the transformer's keys start in a file
VAE_SCALING, VAE_SHIFT = 0.3611, 0.1159
HEAD_DIM = 128  # Flux's attention heads are 128 wide (its rotary axes 16 + 56 + 56)

PARTS = [
    Part("text_encoder", "CLIP-L", "clip_l*", ("text_encoders.clip_l.transformer.",),
         lambda keys: "text_model.encoder.layers.0.mlp.fc1.weight" in keys or "encoder.layers.0.mlp.fc1.weight" in keys),
    Part("text_encoder", "T5-XXL", "t5xxl* or *t5*", ("text_encoders.t5xxl.transformer.",),
         lambda keys: "encoder.block.0.layer.0.SelfAttention.q.weight" in keys),
    Part("vae", "the Flux autoencoder", "ae.safetensors or *flux*vae* or *ae*", ("vae.", "first_stage_model."),
         lambda keys: "decoder.conv_in.weight" in keys and "encoder.conv_out.weight" in keys
         and "quant_conv.weight" not in keys and "bn.running_mean" not in keys  # not Flux.2's 32-channel one
         and "encoder.down.0.block.0.conv1.weight" in keys),
]


def transformer_prefix(keys: list[str] | set[str]) -> str | None:
    """The prefix of a BFL-layout Flux.1 transformer's keys in a file, or None when the file holds none."""
    keys = set(keys)
    for prefix in PREFIXES:
        if f"{prefix}double_blocks.0.img_attn.qkv.weight" in keys and f"{prefix}img_in.weight" in keys:
            if f"{prefix}double_stream_modulation_img.lin.weight" in keys:
                return None  # Flux.2
            if any(k.startswith(f"{prefix}distilled_guidance_layer.") for k in keys):
                return None  # Chroma
            return prefix
    return None


def names(double: int, single: int, hidden: int, mlp: int) -> dict[str, FileTarget]:
    """Every linear layer of diffusers' Flux transformer -> (BFL module, first row, rows, the BFL module's rows)."""
    out: dict[str, FileTarget] = {}
    whole = lambda name, rows: (name, 0, rows, rows)
    for i in range(double):
        d, b = f"transformer_blocks.{i}", f"double_blocks.{i}"
        for stream, q, k, v, o, ff, norm in (("img", "to_q", "to_k", "to_v", "to_out.0", "ff", "norm1"),
                                              ("txt", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
                                               "ff_context", "norm1_context")):
            for index, part in enumerate((q, k, v)):
                out[f"{d}.attn.{part}"] = (f"{b}.{stream}_attn.qkv", index * hidden, hidden, 3 * hidden)
            out[f"{d}.attn.{o}"] = whole(f"{b}.{stream}_attn.proj", hidden)
            out[f"{d}.{ff}.net.0.proj"] = whole(f"{b}.{stream}_mlp.0", mlp)
            out[f"{d}.{ff}.net.2"] = whole(f"{b}.{stream}_mlp.2", hidden)
            out[f"{d}.{norm}.linear"] = whole(f"{b}.{stream}_mod.lin", 6 * hidden)
    for i in range(single):
        d, b = f"single_transformer_blocks.{i}", f"single_blocks.{i}"
        total = 3 * hidden + mlp
        for index, part in enumerate(("attn.to_q", "attn.to_k", "attn.to_v")):
            out[f"{d}.{part}"] = (f"{b}.linear1", index * hidden, hidden, total)
        out[f"{d}.proj_mlp"] = (f"{b}.linear1", 3 * hidden, mlp, total)
        out[f"{d}.proj_out"] = whole(f"{b}.linear2", hidden)
        out[f"{d}.norm.linear"] = whole(f"{b}.modulation.lin", 3 * hidden)
    return out


# the transformer's other weights: diffusers name -> BFL name
OUTER = {
    "x_embedder": "img_in", "context_embedder": "txt_in", "proj_out": "final_layer.linear",
    "time_text_embed.timestep_embedder.linear_1": "time_in.in_layer",
    "time_text_embed.timestep_embedder.linear_2": "time_in.out_layer",
    "time_text_embed.text_embedder.linear_1": "vector_in.in_layer",
    "time_text_embed.text_embedder.linear_2": "vector_in.out_layer",
    "time_text_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
    "time_text_embed.guidance_embedder.linear_2": "guidance_in.out_layer",
}
NORMS = {  # per block: diffusers RMSNorm weight -> BFL scale
    "double": {"attn.norm_q": "img_attn.norm.query_norm", "attn.norm_k": "img_attn.norm.key_norm",
               "attn.norm_added_q": "txt_attn.norm.query_norm", "attn.norm_added_k": "txt_attn.norm.key_norm"},
    "single": {"attn.norm_q": "norm.query_norm", "attn.norm_k": "norm.key_norm"},
}


def block_norms(double: int, single: int) -> dict[str, str]:
    """Every block's q/k norm weight: diffusers' name -> BFL's, for `double` and `single` blocks (Flux.1 and Flux.2
    name them alike)."""
    return {f"{block}.{i}.{name}.weight": f"{bfl_block}.{i}.{bfl}.scale"
            for kind, count, block, bfl_block in (("double", double, "transformer_blocks", "double_blocks"),
                                                  ("single", single, "single_transformer_blocks", "single_blocks"))
            for i in range(count) for name, bfl in NORMS[kind].items()}


def swapped_halves(tensor: torch.Tensor) -> torch.Tensor:
    """The final modulation's halves swapped: BFL stores shift, scale; diffusers scale, shift (either way round)."""
    first, second = tensor.chunk(2)
    return torch.cat([second, first])


def built_on_meta(transformer_class, config: dict, converted: dict[str, torch.Tensor], what: str):
    """`transformer_class(**config)` built on the meta device and given `converted` with assign (moved, not copied);
    a CheckpointError naming `what` unless every weight fits."""
    with torch.device("meta"):
        model = transformer_class(**config)
    missing, unexpected = model.load_state_dict(converted, strict=False, assign=True)
    if missing or unexpected:
        raise CheckpointError(f"The {what} transformer did not load cleanly: missing {missing[:4]}, "
                              f"unexpected {unexpected[:4]}.")
    return model


def transformer_from_bfl(sd: dict[str, torch.Tensor]) -> FluxTransformer2DModel:
    """diffusers' Flux transformer from BFL-layout weights (prefix removed), config read from the shapes; the
    weights are moved, not copied (built on the meta device, loaded with assign)."""
    keys = set(sd)
    hidden = sd["img_in.weight"].shape[0]
    double, single = block_count(keys, "double_blocks"), block_count(keys, "single_blocks")
    mlp = sd["double_blocks.0.img_mlp.0.weight"].shape[0] if double else sd["single_blocks.0.linear1.weight"].shape[0] - 3 * hidden
    if hidden % HEAD_DIM:
        raise CheckpointError(f"This Flux transformer is {hidden} wide, not a multiple of {HEAD_DIM}: not a Flux.1 model.")
    config = {"in_channels": sd["img_in.weight"].shape[1], "num_layers": double, "num_single_layers": single, "attention_head_dim": HEAD_DIM,
              "num_attention_heads": hidden // HEAD_DIM, "joint_attention_dim": sd["txt_in.weight"].shape[1],
              "pooled_projection_dim": sd["vector_in.in_layer.weight"].shape[1],
              "guidance_embeds": "guidance_in.in_layer.weight" in keys}
    converted: dict[str, torch.Tensor] = {}
    for name, (bfl, row, rows, _) in names(double, single, hidden, mlp).items():
        for leaf in ("weight", "bias"):
            converted[f"{name}.{leaf}"] = sd[f"{bfl}.{leaf}"][row:row + rows]
    for name, bfl in OUTER.items():
        if f"{bfl}.weight" in sd:
            converted[f"{name}.weight"], converted[f"{name}.bias"] = sd[f"{bfl}.weight"], sd[f"{bfl}.bias"]
    converted.update({ours: sd[theirs] for ours, theirs in block_norms(double, single).items()})
    for leaf in ("weight", "bias"):
        converted[f"norm_out.linear.{leaf}"] = swapped_halves(sd[f"final_layer.adaLN_modulation.1.{leaf}"])
    if sd["final_layer.linear.weight"].shape[0] != config["in_channels"]:  # diffusers before 0.32 cannot say it
        config["out_channels"] = sd["final_layer.linear.weight"].shape[0]
    return built_on_meta(FluxTransformer2DModel, config, converted, "Flux")


def bfl_from_transformer(model: FluxTransformer2DModel) -> dict[str, torch.Tensor]:
    """The BFL-layout weights of diffusers' Flux transformer (the inverse of `transformer_from_bfl`): fused layers
    joined back in their row order."""
    sd = model.state_dict()
    config = model.config
    hidden = config.num_attention_heads * config.attention_head_dim
    mlp = sd["transformer_blocks.0.ff.net.0.proj.weight"].shape[0] if config.num_layers else \
        sd["single_transformer_blocks.0.proj_mlp.weight"].shape[0]
    parts: dict[str, list[tuple[int, str]]] = {}
    for name, (bfl, row, _, _) in names(config.num_layers, config.num_single_layers, hidden, mlp).items():
        parts.setdefault(bfl, []).append((row, name))
    out: dict[str, torch.Tensor] = {}
    for bfl, pieces in parts.items():
        for leaf in ("weight", "bias"):
            out[f"{bfl}.{leaf}"] = torch.cat([sd[f"{name}.{leaf}"] for _, name in sorted(pieces)])
    for name, bfl in OUTER.items():
        if f"{name}.weight" in sd:
            out[f"{bfl}.weight"], out[f"{bfl}.bias"] = sd[f"{name}.weight"], sd[f"{name}.bias"]
    out.update({theirs: sd[ours] for ours, theirs in block_norms(config.num_layers, config.num_single_layers).items()})
    for leaf in ("weight", "bias"):
        out[f"final_layer.adaLN_modulation.1.{leaf}"] = swapped_halves(sd[f"norm_out.linear.{leaf}"])
    return out


def t5_from_state(sd: dict[str, torch.Tensor]) -> T5EncoderModel:
    """A T5 encoder (T5-XXL for Flux) from HF-named weights, config read from the shapes."""
    sd = {k.removeprefix("transformer."): v for k, v in sd.items()}
    if "encoder.embed_tokens.weight" in sd and "shared.weight" not in sd:
        sd["shared.weight"] = sd["encoder.embed_tokens.weight"]
    bias = sd["encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"]
    heads = bias.shape[1]
    gated = "encoder.block.0.layer.1.DenseReluDense.wi_0.weight" in sd
    ff = sd["encoder.block.0.layer.1.DenseReluDense.wi_0.weight" if gated else "encoder.block.0.layer.1.DenseReluDense.wi.weight"]
    config = T5Config(vocab_size=sd["shared.weight"].shape[0], d_model=sd["shared.weight"].shape[1],
                      d_kv=sd["encoder.block.0.layer.0.SelfAttention.q.weight"].shape[0] // heads, d_ff=ff.shape[0],
                      num_layers=len({k.split(".")[2] for k in sd if k.startswith("encoder.block.")}), num_heads=heads,
                      relative_attention_num_buckets=bias.shape[0], feed_forward_proj="gated-gelu" if gated else "relu",
                      is_encoder_decoder=False, use_cache=False, dropout_rate=0.0)
    with torch.device("meta"):
        model = T5EncoderModel(config)
    own = model.state_dict()
    sd = {k: v for k, v in sd.items() if k in own}
    if "encoder.embed_tokens.weight" in own:
        sd["encoder.embed_tokens.weight"] = sd["shared.weight"]
    missing = [k for k in own if k not in sd]
    if missing:
        raise CheckpointError(f"The T5 text encoder is missing weights: {missing[:4]}.")
    model.load_state_dict(sd, strict=True, assign=True)
    return model.eval()


def clip_from_state(sd: dict[str, torch.Tensor]) -> CLIPTextModel:
    """A CLIP-L text encoder from HF-named weights."""
    sd = ldm.text_model_keys(sd)
    model = CLIPTextModel(ldm._clip_config(sd, "", "quick_gelu"))
    ldm._load_text_model(model, sd)
    return model.eval()


def vae_from_state(sd: dict[str, torch.Tensor]) -> AutoencoderKL:
    """The Flux autoencoder (16 latent channels, no quant convs) from its BFL/LDM-named weights."""
    return ldm.vae_from_state(sd, scaling=VAE_SCALING, shift=VAE_SHIFT)


def _check_widths(path: Path, prefix: str, found: dict) -> None:
    """Refuse text encoders whose output widths are not what the transformer takes (CLIP-G for CLIP-L, a T5 of
    another size), naming the file, before anything loads."""
    for part, key, model_key, what in (("CLIP-L", "text_model.embeddings.token_embedding.weight", "vector_in.in_layer.weight",
                                        "pooled text vector"),
                                       ("T5-XXL", "shared.weight", "txt_in.weight", "text token states")):
        where = found[part]
        width = shape_of(where.path, where.prefix + key) or shape_of(where.path, where.prefix + key.removeprefix("text_model.")) \
            or shape_of(where.path, where.prefix + "encoder.embed_tokens.weight")
        wanted = shape_of(path, prefix + model_key)
        if width and wanted and width[1] != wanted[1]:
            raise CheckpointError(f"{where.path.name} is not the {part} this Flux transformer takes: it makes {what} "
                                  f"{width[1]} wide where {path.name} needs {wanted[1]}. Use the model's own {part} file.")


class FluxBackbone(FlowBackbone):
    """Flux.1 dev / schnell / Krea-dev."""

    @classmethod
    def detect(cls, config: TrainConfig) -> str | None:
        """'flux1' when `base_model` is a Flux.1 transformer file, all-in-one checkpoint or diffusers folder."""
        path = Path(config.base_model).expanduser()
        if path.is_dir():
            return "flux1" if is_flux_folder(path) else None
        if not path.is_file() or path.suffix.lower() not in (".safetensors", ".gguf"):
            return None
        return "flux1" if transformer_prefix(safetensors_keys(path)) is not None else None

    @classmethod
    def load(cls, config: TrainConfig, data) -> FluxBackbone:
        """The transformer, CLIP-L, T5-XXL and the autoencoder, from the files or folder the config names, offline."""
        path = Path(config.base_model).expanduser()
        if path.is_dir():
            return cls._from_diffusers(path, config)
        keys = safetensors_keys(path)
        prefix = transformer_prefix(keys)
        found = find_parts(path, keys, PARTS, "Flux.1", given=config.text_encoders, vae=config.vae)
        _check_widths(path, prefix, found)
        t5_tokenizer = cls.t5_tokenizer(config, path)  # before the slow loading: a missing tokenizer fails at once
        stored: dict = {}
        transformer = transformer_from_bfl(read_weights(path, prefix, stored=stored))
        clip = clip_from_state(read_weights(found["CLIP-L"].path, found["CLIP-L"].prefix))
        t5 = t5_from_state(read_weights(found["T5-XXL"].path, found["T5-XXL"].prefix))
        vae = vae_from_state(read_weights(found["the Flux autoencoder"].path, found["the Flux autoencoder"].prefix))
        variant = "dev" if transformer.config.guidance_embeds else "schnell"
        return cls(family="flux1", transformer=transformer, vae=vae, text_encoders=[clip, t5],
                   tokenizers=[clip_tokenizer(), t5_tokenizer], name=path.stem, variant=variant, stored=stored)

    @classmethod
    def _from_diffusers(cls, folder: Path, config: TrainConfig) -> FluxBackbone:
        """A diffusers Flux folder (transformer/, vae/, text_encoder/, text_encoder_2/, tokenizer/, tokenizer_2/)."""
        from transformers import CLIPTokenizer

        options = {"use_safetensors": True, "local_files_only": True}
        try:
            transformer = FluxTransformer2DModel.from_pretrained(  # as stored: diffusers would make it fp32 (48 GB)
                folder, subfolder="transformer", torch_dtype=stored_dtype(folder / "transformer"), **options)
            vae = AutoencoderKL.from_pretrained(folder, subfolder="vae", **options)
            clip = CLIPTextModel.from_pretrained(folder, subfolder="text_encoder", **options)
            t5 = T5EncoderModel.from_pretrained(folder, subfolder="text_encoder_2", **options)
            tokenizers = [CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer"),
                          T5TokenizerFast.from_pretrained(folder, subfolder="tokenizer_2")]
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"Cannot load the diffusers folder {folder}: {exc}") from None
        variant = "dev" if transformer.config.guidance_embeds else "schnell"
        return cls(family="flux1", transformer=transformer, vae=vae, text_encoders=[clip, t5], tokenizers=tokenizers,
                   name=folder.name, variant=variant)

    @staticmethod
    def t5_tokenizer(config: TrainConfig, model_path: Path) -> T5TokenizerFast:
        """T5's tokenizer, offline: from `tokenizers` (a folder holding it, a diffusers Flux folder, a ComfyUI or
        Forge installation), else from the ComfyUI / Forge installation the model file lies in."""
        places = [Path(config.tokenizers).expanduser()] if config.tokenizers else []
        places += host_roots(model_path)
        relative = ["tokenizer_2", "comfy/text_encoders/t5_tokenizer",
                    "backend/huggingface/black-forest-labs/FLUX.1-dev/tokenizer_2"]
        folder = find_tokenizer("T5", places, relative, "tokenizer.json")
        return T5TokenizerFast.from_pretrained(str(folder), local_files_only=True)

    # -- the family's answers ----------------------------------------------------------------------

    def defaults(self) -> dict:
        """Sampling as the reference pipelines do: dev 28 steps at guidance 3.5, schnell 4 steps without."""
        schnell = self.variant == "schnell"
        return {"sample_steps": 4 if schnell else 28, "sample_guidance_scale": 0.0 if schnell else 3.5}

    def uses_cfg(self) -> bool:
        """Flux.1 takes its guidance as an input (dev) or needs none (schnell): no negative prompt pass."""
        return False

    def text_tokens(self) -> int:
        return self.t5_length()

    def t5_length(self) -> int:
        """T5 tokens per caption: 512 for dev, 256 for schnell (as the pipelines use them)."""
        return 256 if self.variant == "schnell" else 512

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        vae = self.vae
        with torch.no_grad():
            latents = vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist.mean
        return (latents - VAE_SHIFT) * VAE_SCALING

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        vae = self.vae
        return vae.decode((latents / VAE_SCALING + VAE_SHIFT).to(vae.device, vae.dtype)).sample

    def encode_prompts(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        """CLIP-L's pooled vector and T5's token states, as FluxPipeline computes them."""
        clip, t5 = self.text_encoders
        clip_tokens, t5_tokens = self.tokenizers
        ids = clip_tokens(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
        pooled = clip(ids.to(clip.device), output_hidden_states=False).pooler_output
        ids = t5_tokens(prompts, padding="max_length", max_length=self.t5_length(), truncation=True,
                        return_tensors="pt").input_ids
        return {"t5": t5(ids.to(t5.device))[0], "pooled": pooled}

    def predict(self, network: torch.nn.Module, noisy: torch.Tensor, sigmas: torch.Tensor,
                cond: dict[str, torch.Tensor], guidance: float | None = None) -> torch.Tensor:
        """The transformer on 2x2 patches of the latents, with their position ids, as FluxPipeline calls it."""
        b, c, h, w = noisy.shape
        packed = noisy.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, h * w // 4, c * 4)
        img_ids = torch.zeros(h // 2, w // 2, 3, device=noisy.device)
        img_ids[..., 1] += torch.arange(h // 2, device=noisy.device)[:, None]
        img_ids[..., 2] += torch.arange(w // 2, device=noisy.device)[None, :]
        txt_ids = torch.zeros(cond["t5"].shape[1], 3, device=noisy.device)
        if self.transformer.config.guidance_embeds:
            value = self.run["config"].train_guidance if guidance is None else guidance
            guidance_input = torch.full((b,), float(value), device=noisy.device, dtype=torch.float32)
        else:
            guidance_input = None
        out = network(hidden_states=packed, encoder_hidden_states=cond["t5"], pooled_projections=cond["pooled"],
                      timestep=sigmas.to(packed.dtype), img_ids=img_ids.reshape(-1, 3), txt_ids=txt_ids,
                      guidance=guidance_input, return_dict=False)[0]
        return out.view(b, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c, h, w)

    def _names(self) -> dict[str, FileTarget]:
        config = self.transformer.config
        hidden = config.num_attention_heads * config.attention_head_dim
        block = self.transformer.transformer_blocks[0] if config.num_layers else None
        mlp = block.ff.net[0].proj.out_features if block is not None else \
            self.transformer.single_transformer_blocks[0].proj_mlp.out_features
        return names(config.num_layers, config.num_single_layers, hidden, mlp)

    def file_targets(self) -> dict[str, FileTarget]:
        return self._names()

    def lora_targets(self, kind: str) -> list[str]:
        """attention: q, k, v and the output projections (a single block's linear2 included); attention_ff: also
        the MLPs; locon (everything): also the modulation layers, as kohya sd-scripts trains by default."""
        picked = []
        for name in self._names():
            leaf = name.split(".", 2)[2]
            is_ff = leaf.startswith(("ff.", "ff_context.")) or leaf == "proj_mlp"
            is_mod = leaf.endswith(("norm1.linear", "norm1_context.linear")) or leaf == "norm.linear"
            if (is_ff and kind == "attention") or (is_mod and kind != "locon"):
                continue
            picked.append(name)
        return picked


def is_flux_folder(folder: Path) -> bool:
    """Whether a diffusers folder holds a Flux.1 pipeline."""
    index = folder / "model_index.json"
    return index.is_file() and json.loads(index.read_text()).get("_class_name") == "FluxPipeline"

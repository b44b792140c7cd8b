"""Flux.2 klein (4B and 9B, distilled and base): the BFL transformer, a Qwen3 text encoder, the 32-channel autoencoder.

Files as people have them: ComfyUI's split layout (`diffusion_models/flux-2-klein-4b.safetensors`,
`text_encoders/qwen_3_4b.safetensors` (9B: `qwen_3_8b`), `vae/flux2-vae.safetensors`) and diffusers folders
(`Flux2KleinPipeline`); bf16, fp16 or fp8. FLUX.2 [dev] (32B, a Mistral text encoder) is refused.

The transformer trains as diffusers' `Flux2Transformer2DModel`, whose double blocks have separate q, k and v layers
where the BFL layout fuses them (`img_attn.qkv`); a single block's `linear1` (q, k, v and the MLP's gate and up) and
`linear2` are one layer in both. `names` ties the two layouts together, both for loading the weights and for
writing the LoRA in kohya's names of the BFL layout (`lora_unet_double_blocks_0_img_attn_qkv`), which ComfyUI,
Forge and diffusers load.

As the reference pipeline (diffusers' `Flux2KleinPipeline`, ComfyUI the same): captions go into the Qwen3 chat
template with an empty think block, padded to 512 tokens; the states entering Qwen3's layers 9, 18 and 27 are
joined per token (3 x 2560 = 7680 wide for Qwen3-4B). The autoencoder's latents are cut into 2x2 patches
(128 channels at 1/16 of the image) and normalised with its BatchNorm statistics; the transformer sees them as
tokens with 4-axis position ids and takes the time as sigma in [0, 1].

Distilled and base klein have the same keys; as BFL's conversion script does, a file with "base" in its name is
base (previews: 50 steps, guidance 4), any other distilled (4 steps, no guidance); a diffusers folder says
`is_distilled`. Training times follow `timestep_sampling`; its 'resolution_shift' is Flux.1's line through
(256, 0.5) and (4096, 1.15), as musubi-tuner's `flux2_shift` trains klein; previews take the pipeline's
empirical shift, which depends on the step count too.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from lora_trainer.backbones.files import (
    Part,
    block_count,
    find_parts,
    read_weights,
    safetensors_keys,
    shape_of,
    stored_dtype,
)
from lora_trainer.backbones.flow import FileTarget, FlowBackbone, time_shift
from lora_trainer.backbones.flux import block_norms, built_on_meta, swapped_halves  # named as in Flux.1
from lora_trainer.backbones.qwen import qwen3_encoder, qwen3_layers, qwen3_weights, qwen_tokenizer, qwen_tokenizer_from
from lora_trainer.config import TrainConfig
from lora_trainer.errors import CheckpointError

PREFIXES = ("model.diffusion_model.", "diffusion_model.", "")  # where the transformer's keys start in a file
HEAD_DIM = 128  # klein's attention heads are 128 wide (its rotary axes 4 x 32)
TEXT_LAYERS = (9, 18, 27)  # Qwen3's hidden states the transformer reads, joined per token
TEXT_LENGTH = 512  # caption tokens, padded
TEMPLATE = "<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
DEV_WIDTH = 6144  # FLUX.2 [dev]'s transformer width (klein: 3072, 4096)
QWEN_NEEDS = "Flux.2 klein's Qwen3 text encoder needs transformers 4.51 or newer: pip install -U transformers."


def parts_for(text_width: int | None) -> list[Part]:
    """The files a klein transformer needs beside it; the text encoder's usual name follows the width it takes."""
    hint = {7680: "qwen_3_4b* or *qwen*4b*", 12288: "qwen_3_8b* or *qwen*8b*"}.get(text_width, "*qwen*")
    return [
        Part("text_encoder", "the Qwen3 text encoder", hint,
             ("text_encoders.qwen3_4b.transformer.", "text_encoders.qwen3_8b.transformer."),
             lambda keys: "model.layers.0.self_attn.q_norm.weight" in keys and "model.embed_tokens.weight" in keys),
        Part("vae", "the Flux.2 autoencoder", "flux2-vae* or *flux2*ae* or ae.safetensors", ("vae.",),
             lambda keys: "bn.running_mean" in keys and "decoder.conv_in.weight" in keys
             and "encoder.down.0.block.0.conv1.weight" in keys),
    ]


def transformer_prefix(keys: list[str] | set[str], path: Path | None = None) -> str | None:
    """The prefix of a BFL-layout klein transformer's keys in a file, or None when the file holds none; FLUX.2
    [dev] is refused here (told by its guidance input, or its width where `path` is given)."""
    keys = set(keys)
    for prefix in PREFIXES:
        if f"{prefix}double_stream_modulation_img.lin.weight" in keys and f"{prefix}img_in.weight" in keys:
            width = shape_of(path, f"{prefix}img_in.weight")[0] if path is not None else None
            if f"{prefix}guidance_in.in_layer.weight" in keys or width == DEV_WIDTH:
                raise dev_refused(path.name if path is not None else "This file")
            return prefix
    return None


def dev_refused(name: str) -> CheckpointError:
    """The error for a FLUX.2 [dev] file or folder."""
    return CheckpointError(f"{name} is FLUX.2 [dev] (32B, with a Mistral text encoder); of Flux.2, only klein 4B and "
                           "9B (base or distilled) are supported. Use a klein transformer file or folder.")


def names(double: int, single: int, hidden: int, mlp: int) -> dict[str, FileTarget]:
    """Every linear layer of diffusers' Flux.2 transformer a LoRA may wrap -> (BFL module, first row, rows, the BFL
    module's rows). `mlp` is the width of the MLP's hidden layer (3 x hidden); its input layer makes gate and up."""
    out: dict[str, FileTarget] = {}
    whole = lambda name, rows: (name, 0, rows, rows)
    for i in range(double):
        d, b = f"transformer_blocks.{i}", f"double_blocks.{i}"
        for stream, q, k, v, o, ff in (("img", "to_q", "to_k", "to_v", "to_out.0", "ff"),
                                       ("txt", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out", "ff_context")):
            for index, part in enumerate((q, k, v)):
                out[f"{d}.attn.{part}"] = (f"{b}.{stream}_attn.qkv", index * hidden, hidden, 3 * hidden)
            out[f"{d}.attn.{o}"] = whole(f"{b}.{stream}_attn.proj", hidden)
            out[f"{d}.{ff}.linear_in"] = whole(f"{b}.{stream}_mlp.0", 2 * mlp)
            out[f"{d}.{ff}.linear_out"] = whole(f"{b}.{stream}_mlp.2", hidden)
    for i in range(single):
        d, b = f"single_transformer_blocks.{i}", f"single_blocks.{i}"
        out[f"{d}.attn.to_qkv_mlp_proj"] = whole(f"{b}.linear1", 3 * hidden + 2 * mlp)
        out[f"{d}.attn.to_out"] = whole(f"{b}.linear2", hidden)
    # the modulation layers all blocks of a kind share (Flux.1 has one per block)
    out["double_stream_modulation_img.linear"] = whole("double_stream_modulation_img.lin", 6 * hidden)
    out["double_stream_modulation_txt.linear"] = whole("double_stream_modulation_txt.lin", 6 * hidden)
    out["single_stream_modulation.linear"] = whole("single_stream_modulation.lin", 3 * hidden)
    return out


# the transformer's other weights: diffusers name -> BFL name
OUTER = {"x_embedder": "img_in", "context_embedder": "txt_in", "proj_out": "final_layer.linear",
         "time_guidance_embed.timestep_embedder.linear_1": "time_in.in_layer",
         "time_guidance_embed.timestep_embedder.linear_2": "time_in.out_layer"}


def _flux2_classes():
    """diffusers' Flux.2 transformer and autoencoder classes, or the version to install."""
    try:
        from diffusers import AutoencoderKLFlux2, Flux2Transformer2DModel
    except ImportError:
        raise CheckpointError("Flux.2 klein needs a diffusers release with Flux.2 (0.36 or newer): "
                              "pip install -U diffusers.") from None
    return Flux2Transformer2DModel, AutoencoderKLFlux2


def transformer_from_bfl(sd: dict[str, torch.Tensor]):
    """diffusers' Flux.2 transformer from BFL-layout klein weights (prefix removed), config read from the shapes;
    the weights are moved, not copied (built on the meta device, loaded with assign)."""
    transformer_class, _ = _flux2_classes()
    keys = set(sd)
    hidden = sd["img_in.weight"].shape[0]
    double, single = block_count(keys, "double_blocks"), block_count(keys, "single_blocks")
    mlp = sd["double_blocks.0.img_mlp.2.weight"].shape[1] if double else \
        sd["single_blocks.0.linear2.weight"].shape[1] - hidden
    if hidden % HEAD_DIM:
        raise CheckpointError(f"This Flux.2 transformer is {hidden} wide, not a multiple of {HEAD_DIM}: not a klein.")
    config = {"in_channels": sd["img_in.weight"].shape[1], "out_channels": sd["final_layer.linear.weight"].shape[0],
              "num_layers": double, "num_single_layers": single, "attention_head_dim": HEAD_DIM,
              "num_attention_heads": hidden // HEAD_DIM, "joint_attention_dim": sd["txt_in.weight"].shape[1],
              "timestep_guidance_channels": sd["time_in.in_layer.weight"].shape[1], "mlp_ratio": mlp / hidden,
              "guidance_embeds": False}
    converted: dict[str, torch.Tensor] = {}
    for name, (bfl, row, rows, _) in names(double, single, hidden, mlp).items():
        converted[f"{name}.weight"] = sd[f"{bfl}.weight"][row:row + rows]
    for name, bfl in OUTER.items():
        converted[f"{name}.weight"] = sd[f"{bfl}.weight"]
    converted.update({ours: sd[theirs] for ours, theirs in block_norms(double, single).items()})
    converted["norm_out.linear.weight"] = swapped_halves(sd["final_layer.adaLN_modulation.1.weight"])
    return built_on_meta(transformer_class, config, converted, "klein")


def bfl_from_transformer(model) -> dict[str, torch.Tensor]:
    """The BFL-layout weights of diffusers' Flux.2 transformer (the inverse of `transformer_from_bfl`): fused
    layers joined back in their row order."""
    sd = model.state_dict()
    config = model.config
    hidden = config.num_attention_heads * config.attention_head_dim
    mlp = int(hidden * config.mlp_ratio)
    parts: dict[str, list[tuple[int, str]]] = {}
    for name, (bfl, row, _, _) in names(config.num_layers, config.num_single_layers, hidden, mlp).items():
        parts.setdefault(bfl, []).append((row, name))
    out = {f"{bfl}.weight": torch.cat([sd[f"{name}.weight"] for _, name in sorted(pieces)])
           for bfl, pieces in parts.items()}
    for name, bfl in OUTER.items():
        out[f"{bfl}.weight"] = sd[f"{name}.weight"]
    out.update({theirs: sd[ours] for ours, theirs in block_norms(config.num_layers, config.num_single_layers).items()})
    out["final_layer.adaLN_modulation.1.weight"] = swapped_halves(sd["norm_out.linear.weight"])
    return out


def qwen3_from_state(sd: dict[str, torch.Tensor]):
    """The Qwen3 text encoder from its HF-named weights, config read from the shapes. Only the layers up to the last
    one klein reads are built (27 of Qwen3-4B's 36), without the final norm: the states are read before it, and the
    rest would only take memory."""
    sd = qwen3_weights(sd)
    layers = qwen3_layers(sd)
    if layers < TEXT_LAYERS[-1]:
        raise CheckpointError(f"The Qwen3 text encoder has {layers} layers; klein reads layer {TEXT_LAYERS[-1]}. "
                              "Use the model's own Qwen3-4B (klein 4B) or Qwen3-8B (klein 9B) file.")
    return qwen3_encoder(sd, TEXT_LAYERS[-1], QWEN_NEEDS)


def vae_from_state(sd: dict[str, torch.Tensor]):
    """The Flux.2 autoencoder from its BFL/LDM-named weights (`encoder.down.0...`, `encoder.quant_conv`,
    `decoder.post_quant_conv`, `bn.*`), config read from the shapes."""
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    _, vae_class = _flux2_classes()
    renamed = {}
    for key, value in sd.items():
        for old, new in (("encoder.quant_conv.", "quant_conv."), ("decoder.post_quant_conv.", "post_quant_conv.")):
            if key.startswith(old):
                key = new + key[len(old):]
        renamed[key] = value
    levels = block_count(renamed, "encoder.down")
    config = {"in_channels": renamed["encoder.conv_in.weight"].shape[1],
              "out_channels": renamed["decoder.conv_out.weight"].shape[0],
              "down_block_types": ["DownEncoderBlock2D"] * levels, "up_block_types": ["UpDecoderBlock2D"] * levels,
              "block_out_channels": [renamed[f"encoder.down.{i}.block.0.conv2.weight"].shape[0] for i in range(levels)],
              "layers_per_block": block_count(renamed, "encoder.down.0.block"),
              "latent_channels": renamed["decoder.conv_in.weight"].shape[1],
              "use_quant_conv": "quant_conv.weight" in renamed, "use_post_quant_conv": "post_quant_conv.weight" in renamed}
    vae = vae_class(**config)
    converted = convert_ldm_vae_checkpoint(renamed, config)
    for name in ("running_mean", "running_var"):
        converted[f"bn.{name}"] = renamed[f"bn.{name}"]
    converted["bn.num_batches_tracked"] = renamed.get("bn.num_batches_tracked", torch.tensor(0))
    vae.load_state_dict(converted, strict=True)
    return vae


def empirical_mu(seq_len: int, steps: int) -> float:
    """The log-shift Flux2KleinPipeline samples with (`compute_empirical_mu`): fitted to the image's tokens and the
    step count."""
    a1, b1 = 8.73809524e-05, 1.89833333
    a2, b2 = 0.00016927, 0.45666666
    if seq_len > 4300:
        return a2 * seq_len + b2
    m_200, m_10 = a2 * seq_len + b2, a1 * seq_len + b1
    a = (m_200 - m_10) / 190.0
    return a * steps + m_200 - 200.0 * a


def _check_widths(path: Path, prefix: str, found: dict) -> None:
    """Refuse a text encoder or autoencoder that does not fit the transformer (Qwen3-8B for a klein 4B, a too
    short Qwen3), naming the file, before anything loads."""
    where = found["the Qwen3 text encoder"]
    width = shape_of(where.path, where.prefix + "model.embed_tokens.weight")[1]
    wanted = shape_of(path, prefix + "txt_in.weight")[1]
    if 3 * width != wanted:
        raise CheckpointError(
            f"{where.path.name} is not the text encoder this klein transformer takes: its Qwen3 states are {width} wide "
            f"({3 * width} for the three layers klein reads) where {path.name} needs {wanted}. klein 4B takes "
            "Qwen3-4B (qwen_3_4b.safetensors), klein 9B Qwen3-8B (qwen_3_8b.safetensors).")
    layers = block_count([k.removeprefix(where.prefix + "model.") for k in safetensors_keys(where.path)], "layers")
    if layers < TEXT_LAYERS[-1]:
        raise CheckpointError(f"{where.path.name} has {layers} layers; klein reads the states entering layer "
                              f"{TEXT_LAYERS[-1]}. Use the model's own Qwen3 text encoder file.")
    where = found["the Flux.2 autoencoder"]
    channels = shape_of(where.path, where.prefix + "decoder.conv_in.weight")[1]
    wanted = shape_of(path, prefix + "img_in.weight")[1]
    if 4 * channels != wanted:
        raise CheckpointError(f"{where.path.name} makes {channels}-channel latents ({4 * channels} in 2x2 patches) "
                              f"where {path.name} takes {wanted}. Use the Flux.2 autoencoder (flux2-vae.safetensors).")


@dataclass
class KleinBackbone(FlowBackbone):
    """Flux.2 klein 4B / 9B, distilled or base."""

    distilled: bool = True  # what the previews' defaults follow (the file name or the folder's is_distilled)
    compile_pays_after = 400  # H200, klein 4B 1024 px: 30 s to compile, 0.073 s saved a step (3.67 -> 5.00 steps/s)

    @classmethod
    def detect(cls, config: TrainConfig) -> str | None:
        """'klein' when `base_model` is a klein transformer file or a diffusers klein folder; FLUX.2 [dev] is
        refused with a CheckpointError."""
        path = Path(config.base_model).expanduser()
        if path.is_dir():
            pipeline = pipeline_class(path)
            if pipeline == "Flux2Pipeline":
                raise dev_refused(path.name)
            return "klein" if pipeline == "Flux2KleinPipeline" else None
        if not path.is_file() or path.suffix.lower() not in (".safetensors", ".gguf"):
            return None
        return "klein" if transformer_prefix(safetensors_keys(path), path) is not None else None

    @classmethod
    def load(cls, config: TrainConfig, data) -> KleinBackbone:
        """The transformer, Qwen3 and the autoencoder, from the files or folder the config names, offline."""
        path = Path(config.base_model).expanduser()
        if path.is_dir():
            return cls._from_diffusers(path, config)
        keys = safetensors_keys(path)
        prefix = transformer_prefix(keys, path)
        found = find_parts(path, keys, parts_for(shape_of(path, prefix + "txt_in.weight")[1]), "Flux.2 klein",
                           given=config.text_encoders, vae=config.vae)
        _check_widths(path, prefix, found)
        tokenizer = qwen_tokenizer(config.tokenizers, path, "Flux.2 klein")  # before the slow loading: a missing tokenizer fails at once
        stored: dict = {}
        transformer = transformer_from_bfl(read_weights(path, prefix, stored=stored))
        text = found["the Qwen3 text encoder"]
        encoder = qwen3_from_state(read_weights(text.path, text.prefix))
        vae_file = found["the Flux.2 autoencoder"]
        vae = vae_from_state(read_weights(vae_file.path, vae_file.prefix))
        return cls(family="klein", transformer=transformer, vae=vae, text_encoders=[encoder], tokenizers=[tokenizer],
                   name=path.stem, variant=size_of(transformer), distilled="base" not in path.name.lower(),
                   stored=stored)

    @classmethod
    def _from_diffusers(cls, folder: Path, config: TrainConfig) -> KleinBackbone:
        """A diffusers klein folder (transformer/, vae/, text_encoder/, tokenizer/)."""
        transformer_class, vae_class = _flux2_classes()
        options = {"use_safetensors": True, "local_files_only": True}
        shards = sorted((folder / "text_encoder").glob("*.safetensors"))
        if not shards:
            raise CheckpointError(f"{folder} has no text_encoder/*.safetensors: the diffusers folder is incomplete.")
        try:  # in the dtype it is stored in, as from a single file (diffusers would make it float32)
            transformer = transformer_class.from_pretrained(folder, subfolder="transformer",
                                                            torch_dtype=stored_dtype(folder / "transformer"), **options)
            vae = vae_class.from_pretrained(folder, subfolder="vae", **options)
            tokenizer = qwen_tokenizer_from(folder / "tokenizer")
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"Cannot load the diffusers folder {folder}: {exc}") from None
        encoder = qwen3_from_state({k: v for shard in shards for k, v in read_weights(shard).items()})
        distilled = bool(json.loads((folder / "model_index.json").read_text()).get("is_distilled", False))
        return cls(family="klein", transformer=transformer, vae=vae, text_encoders=[encoder], tokenizers=[tokenizer],
                   name=folder.name, variant=size_of(transformer), distilled=distilled)

    # -- the family's answers ----------------------------------------------------------------------

    def defaults(self) -> dict:
        """Sampling as the reference pipeline does: distilled 4 steps without guidance, base 50 steps at CFG 4."""
        if self.distilled:
            return {"sample_steps": 4, "sample_guidance_scale": 1.0}
        return {"sample_steps": 50, "sample_guidance_scale": 4.0}

    def uses_cfg(self) -> bool:
        """Base klein samples with classifier-free guidance (negative prompt ""); the distilled one never does."""
        return not self.distilled

    def latent_shape(self, size: int) -> tuple[int, int, int]:
        """The 2x2 patches of the autoencoder's latents: 128 channels at 1/16 of the image."""
        return self.transformer.config.in_channels, size // 16, size // 16

    def image_seq_len(self, height: int, width: int) -> int:
        """One token per patch."""
        return height * width

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        vae = self.vae
        with torch.no_grad():
            latents = vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist.mode().float()
        b, c, h, w = latents.shape
        patches = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4).reshape(b, c * 4, h // 2, w // 2)
        mean, std = self._latent_statistics()
        return (patches - mean) / std

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        vae = self.vae
        mean, std = self._latent_statistics()
        patches = latents.float().to(mean.device) * std + mean
        b, c, h, w = patches.shape
        latents = patches.reshape(b, c // 4, 2, 2, h, w).permute(0, 1, 4, 2, 5, 3).reshape(b, c // 4, h * 2, w * 2)
        return vae.decode(latents.to(vae.device, vae.dtype)).sample

    def _latent_statistics(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The mean and deviation of each patch channel, from the autoencoder's BatchNorm statistics."""
        bn = self.vae.bn
        mean = bn.running_mean.float().view(1, -1, 1, 1)
        return mean, torch.sqrt(bn.running_var.float().view(1, -1, 1, 1) + self.vae.config.batch_norm_eps)

    def encode_prompts(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        """Qwen3's states entering layers 9, 18 and 27, joined per token, for the chat-templated captions padded to
        512 tokens, as Flux2KleinPipeline computes them (the transformer attends to the padding too)."""
        encoder, tokenizer = self.text_encoders[0], self.tokenizers[0]
        tokens = tokenizer([TEMPLATE.format(p) for p in prompts], padding="max_length", max_length=TEXT_LENGTH,
                           truncation=True, return_tensors="pt")
        device = next(encoder.parameters()).device
        states = encoder(input_ids=tokens.input_ids.to(device), attention_mask=tokens.attention_mask.to(device),
                         output_hidden_states=True, use_cache=False).hidden_states
        return {"txt": torch.cat([states[k] for k in TEXT_LAYERS], dim=-1)}

    def predict(self, network: torch.nn.Module, noisy: torch.Tensor, sigmas: torch.Tensor,
                cond: dict[str, torch.Tensor], guidance: float | None = None) -> torch.Tensor:
        """The transformer on the patches as tokens, with the position ids Flux2KleinPipeline gives them (time,
        row, column, index): image (0, h, w, 0), text (0, 0, 0, l)."""
        b, c, h, w = noisy.shape
        tokens = noisy.reshape(b, c, h * w).transpose(1, 2)
        img_ids = torch.zeros(h, w, 4, device=noisy.device)
        img_ids[..., 1] += torch.arange(h, device=noisy.device)[:, None]
        img_ids[..., 2] += torch.arange(w, device=noisy.device)[None, :]
        text = cond["txt"]
        txt_ids = torch.zeros(text.shape[1], 4, device=noisy.device)
        txt_ids[:, 3] = torch.arange(text.shape[1], device=noisy.device)
        out = network(hidden_states=tokens, encoder_hidden_states=text, timestep=sigmas.to(tokens.dtype),
                      img_ids=img_ids.reshape(-1, 4), txt_ids=txt_ids, guidance=None, return_dict=False)[0]
        return out.transpose(1, 2).reshape(b, c, h, w)

    def sampling_schedule(self, steps: int, seq_len: int) -> list[float]:
        """Times from 1 to 0 shifted by the pipeline's empirical mu (under 'resolution_shift', the preset's)."""
        config = self.run.get("config")
        if config is not None and config.timestep_sampling != "resolution_shift":
            return super().sampling_schedule(steps, seq_len)
        t = torch.linspace(1.0, 1.0 / steps, steps, dtype=torch.float64)
        return [*time_shift(t, "exponential", empirical_mu(seq_len, steps)).tolist(), 0.0]

    def _names(self) -> dict[str, FileTarget]:
        config = self.transformer.config
        hidden = config.num_attention_heads * config.attention_head_dim
        return names(config.num_layers, config.num_single_layers, hidden, int(hidden * config.mlp_ratio))

    def file_targets(self) -> dict[str, FileTarget]:
        return self._names()

    def lora_targets(self, kind: str) -> list[str]:
        """attention: q, k, v and the output projections; a single block's linear1 and linear2 carry its attention
        and MLP together and are taken whole. attention_ff: also the double blocks' MLPs. locon: also the three
        modulation layers all blocks share (ComfyUI and Forge load them; diffusers' kohya reader skips them
        with a warning)."""
        picked = []
        for name in self._names():
            is_ff = ".ff.linear_" in name or ".ff_context.linear_" in name
            is_mod = "stream_modulation" in name
            if (is_ff and kind == "attention") or (is_mod and kind != "locon"):
                continue
            picked.append(name)
        return picked


def size_of(transformer) -> str:
    """'9b' for a transformer 4096 wide (klein 9B), else '4b'."""
    config = transformer.config
    return "9b" if config.num_attention_heads * config.attention_head_dim == 4096 else "4b"


def pipeline_class(folder: Path) -> str | None:
    """The pipeline class a diffusers folder's model_index.json names."""
    index = folder / "model_index.json"
    return json.loads(index.read_text()).get("_class_name") if index.is_file() else None


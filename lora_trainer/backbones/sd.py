"""The Stable Diffusion backbone (SD1.x, SD2.x, SDXL): what the training loop trains.

It offers `encode_images`, `encode_prompts`, `predict` and the names of the modules a LoRA can
wrap. Built from a single-file checkpoint, a diffusers folder, or (for hosts) an LDM UNet state dict
held in memory, which it then shares rather than copies.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDPMScheduler, EulerDiscreteScheduler, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from lora_trainer.backbones import ldm
from lora_trainer.backbones.checkpoint import UNET_PREFIX, checkpoint_keys, detect_family, read_checkpoint
from lora_trainer.backbones.tokenizer import clip_tokenizer
from lora_trainer.errors import CheckpointError

log = logging.getLogger(__name__)

SCHEDULER = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
                 "clip_sample": False, "steps_offset": 1}

ATTENTION = re.compile(r"\.attn[12]\.(to_q|to_k|to_v|to_out\.0)$")
FEED_FORWARD = re.compile(r"\.(ff\.net\.0\.proj|ff\.net\.2)$|attentions\.\d+\.(proj_in|proj_out)$")
RESNET = re.compile(r"(resnets\.\d+\.(conv1|conv2|conv_shortcut|time_emb_proj)|(down|up)samplers\.0\.conv)$")
TEXT = re.compile(r"\.(self_attn\.(q_proj|k_proj|v_proj|out_proj)|mlp\.(fc1|fc2))$")


def family_of(path: str | Path, allow_pickle: bool = False) -> str:
    """The family of a checkpoint file or diffusers folder, read without loading its weights."""
    path = Path(path).expanduser()
    if path.is_dir():
        return _diffusers_family(path)
    return detect_family(checkpoint_keys(path, allow_pickle=allow_pickle), source=path.name)


def _diffusers_family(folder: Path) -> str:
    """The family of a diffusers folder, from its UNet config."""
    config_file = folder / "unet" / "config.json"
    if not config_file.is_file():
        raise CheckpointError(f"{folder} is not a diffusers model folder (no unet/config.json).")
    config = json.loads(config_file.read_text())
    if config.get("addition_embed_type") == "text_time":
        return "sdxl"
    return "sd2" if config.get("cross_attention_dim") == 1024 or config.get("use_linear_projection") else "sd1"


@dataclass
class DiffusionBackbone:
    """A UNet to train plus the frozen parts that turn images and captions into its inputs."""

    family: str
    unet: UNet2DConditionModel
    vae: AutoencoderKL
    text_encoders: list[CLIPTextModel]
    tokenizers: list[CLIPTokenizer]
    prediction_type: str = "epsilon"
    clip_skip: int = 1
    name: str = "model"
    max_token_length: int = 75
    noise_scheduler: DDPMScheduler = field(init=False)
    # what runs the UNet's forward while training: accelerate's wrapper (DDP on several GPUs), else the UNet
    runner: torch.nn.Module | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        self.noise_scheduler = DDPMScheduler(**SCHEDULER, prediction_type=self.prediction_type)

    @classmethod
    def from_file(cls, path: str | Path, *, family: str = "auto", prediction_type: str = "auto",
                  allow_pickle: bool = False, clip_skip: int = 1, max_token_length: int = 75) -> DiffusionBackbone:
        """Load a single-file LDM checkpoint or a diffusers folder, fully offline."""
        path = Path(path).expanduser()
        if path.is_dir():
            backbone = cls._from_diffusers(path, family, prediction_type, allow_pickle, clip_skip)
            backbone.max_token_length = max_token_length
            return backbone
        checkpoint = read_checkpoint(path, allow_pickle=allow_pickle)
        detected = detect_family(checkpoint.keys(), source=path.name)
        if family not in ("auto", detected):
            raise CheckpointError(f"{path.name} is an {detected} checkpoint, but the config says family: {family}.")
        family = detected
        if family == "sd1":
            encoders = [ldm.clip_from_ldm(checkpoint, family)]
        elif family == "sd2":
            encoders = [ldm.open_clip_from_ldm(checkpoint, family)]
        else:
            encoders = [ldm.clip_from_ldm(checkpoint, family), ldm.open_clip_from_ldm(checkpoint, family)]
        unet_sd = {k[len(UNET_PREFIX):]: v for k, v in checkpoint.items() if k.startswith(UNET_PREFIX)}
        pooled = encoders[-1].config.projection_dim if family == "sdxl" else None
        unet = ldm.unet_from_ldm(unet_sd, family, pooled)
        vae = ldm.vae_from_ldm(checkpoint, family)
        return cls(family=family, unet=unet, vae=vae, text_encoders=encoders, tokenizers=default_tokenizers(family),
                   prediction_type=_prediction(prediction_type, family), clip_skip=clip_skip, name=path.stem,
                   max_token_length=max_token_length)

    @classmethod
    def _from_diffusers(cls, folder: Path, family: str, prediction_type: str, allow_pickle: bool,
                        clip_skip: int) -> DiffusionBackbone:
        """Load a diffusers-layout folder (unet/, vae/, text_encoder/, tokenizer/ ...)."""
        detected = _diffusers_family(folder)
        if family not in ("auto", detected):
            raise CheckpointError(f"{folder.name} is an {detected} model, but the config says family: {family}.")
        options = {"use_safetensors": not allow_pickle, "local_files_only": True}
        try:
            unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet", **options)
            vae = AutoencoderKL.from_pretrained(folder, subfolder="vae", **options)
            encoders = [CLIPTextModel.from_pretrained(folder, subfolder="text_encoder", **options)]
            tokenizers = [CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer")]
            if detected == "sdxl":
                encoders.append(CLIPTextModelWithProjection.from_pretrained(folder, subfolder="text_encoder_2", **options))
                tokenizers.append(CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer_2"))
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"Cannot load the diffusers folder {folder}: {exc}") from None
        return cls(family=detected, unet=unet, vae=vae, text_encoders=encoders, tokenizers=tokenizers,
                   prediction_type=_prediction(prediction_type, detected), clip_skip=clip_skip, name=folder.name)

    # -- what the training loop calls -------------------------------------------------------------

    def offload_encoders(self) -> None:
        """Free the accelerator of the text encoders once captions are encoded (the VAE already left)."""
        for encoder in self.text_encoders:
            encoder.to("cpu")

    @property
    def can_render(self) -> bool:
        """Whether preview images can be made from this backbone's own modules."""
        return self.vae is not None and bool(self.text_encoders)

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """Latents of images in [-1, 1] (B, 3, H, W), already multiplied by the VAE's scaling factor."""
        vae = self.vae
        with torch.no_grad():
            latents = vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist.mean
        return latents * vae.config.scaling_factor

    def encode_prompts(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        """The UNet's text conditioning: 'hidden' (B, max_token_length + 2, C) and for SDXL 'pooled' (B, P).

        Longer captions are encoded in 75-token chunks, each framed by start/end tokens, and the chunks'
        states joined between the first start and the last end state (kohya's max_token_length).
        """
        hidden, pooled = [], None
        chunks = self.max_token_length // 75
        for encoder, tokenizer in zip(self.text_encoders, self.tokenizers):
            ids = tokenizer(prompts, padding="max_length", max_length=chunks * 75 + 2, truncation=True,
                            return_tensors="pt").input_ids.to(encoder.device)
            states, first_pooled = [], None
            for index in range(chunks):
                piece = torch.cat([ids[:, :1], ids[:, 1 + 75 * index:76 + 75 * index], ids[:, -1:]], dim=1)
                out = encoder(self._framed(piece, tokenizer), output_hidden_states=True)
                state = self._layer(encoder, out)
                states.append(state if chunks == 1 else state[:, 0 if index == 0 else 1:77 if index == chunks - 1 else 76])
                if first_pooled is None and isinstance(encoder, CLIPTextModelWithProjection):
                    first_pooled = out.text_embeds
            hidden.append(torch.cat(states, dim=1))
            if first_pooled is not None:
                pooled = first_pooled
        result = {"hidden": torch.cat(hidden, dim=-1)}
        if pooled is not None:
            result["pooled"] = pooled
        return result

    @staticmethod
    def _framed(piece: torch.Tensor, tokenizer: CLIPTokenizer) -> torch.Tensor:
        """A chunk of a long caption made to look like a whole one: it ends with end-of-text."""
        eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
        piece = piece.clone()
        cut = (piece[:, -2] != eos) & (piece[:, -2] != pad)
        piece[:, -1] = torch.where(cut, torch.full_like(piece[:, -1], eos), piece[:, -1])
        empty = piece[:, 1] == pad
        piece[:, 1] = torch.where(empty, torch.full_like(piece[:, 1], eos), piece[:, 1])
        return piece

    def _layer(self, encoder: torch.nn.Module, out) -> torch.Tensor:
        """The hidden states this family conditions on (penultimate for SDXL, clip skip for SD1)."""
        if self.family == "sdxl":
            return out.hidden_states[-2]
        if self.clip_skip > 1 and self.family == "sd1":
            return encoder.text_model.final_layer_norm(out.hidden_states[-self.clip_skip])
        return out.last_hidden_state

    def predict(self, noisy: torch.Tensor, timesteps: torch.Tensor, cond: dict[str, torch.Tensor],
                time_ids: torch.Tensor | None = None, runner: torch.nn.Module | None = None) -> torch.Tensor:
        """The UNet's prediction (noise or v) for noisy latents at `timesteps` under `cond`; `runner` is the UNet
        as the training step calls it (a compiled one), where it differs from `self.runner` / `self.unet`."""
        extra = None
        if self.family == "sdxl":
            extra = {"text_embeds": cond["pooled"], "time_ids": time_ids}
        unet = next(m for m in (runner, self.runner, self.unet) if m is not None)  # a compiled module has no bool()
        return unet(noisy, timesteps, cond["hidden"], added_cond_kwargs=extra).sample

    def target(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """What `predict` should output: the noise, or v for v-prediction models."""
        if self.prediction_type == "v_prediction":
            return self.noise_scheduler.get_velocity(latents, noise, timesteps)
        return noise

    def unet_lora_targets(self, kind: str) -> list[str]:
        """Full names of the UNet modules a LoRA of `kind` wraps (attention, attention_ff, locon)."""
        patterns = [ATTENTION] + ([FEED_FORWARD] if kind in ("attention_ff", "locon") else []) + \
            ([RESNET] if kind == "locon" else [])
        return [name for name, module in self.unet.named_modules()
                if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)) and any(p.search(name) for p in patterns)]

    @staticmethod
    def text_lora_targets(encoder: torch.nn.Module) -> list[str]:
        """Full names of a text encoder's attention and MLP layers (kohya's text-encoder targets)."""
        return [name for name, module in encoder.named_modules()
                if isinstance(module, torch.nn.Linear) and TEXT.search(name)]

    def sampling_pipeline(self):
        """A diffusers pipeline over these very modules, for preview images."""
        from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

        scheduler = EulerDiscreteScheduler.from_config(self.noise_scheduler.config)
        if self.family == "sdxl":
            return StableDiffusionXLPipeline(vae=self.vae, text_encoder=self.text_encoders[0],
                                             text_encoder_2=self.text_encoders[1], tokenizer=self.tokenizers[0],
                                             tokenizer_2=self.tokenizers[1], unet=self.unet, scheduler=scheduler)
        return StableDiffusionPipeline(vae=self.vae, text_encoder=self.text_encoders[0], tokenizer=self.tokenizers[0],
                                       unet=self.unet, scheduler=scheduler, safety_checker=None,
                                       feature_extractor=None, requires_safety_checker=False)


def default_tokenizers(family: str) -> list[CLIPTokenizer]:
    """The tokenizers a family's text encoders use, built offline."""
    if family == "sd1":
        return [clip_tokenizer()]
    if family == "sd2":
        return [clip_tokenizer(pad_token="!")]
    return [clip_tokenizer(), clip_tokenizer(pad_token="!")]


def _prediction(prediction_type: str, family: str) -> str:
    """Resolve 'auto': SD2 checkpoints in use are mostly 768-v models, the others predict noise."""
    if prediction_type != "auto":
        return prediction_type
    if family == "sd2":
        log.info("SD2 checkpoint: training with v-prediction (768-v). Set prediction_type: epsilon for 512-base.")
        return "v_prediction"
    return "epsilon"

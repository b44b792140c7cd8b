"""The Stable Diffusion families (SD1.x, SD2.x, SDXL): the UNet the loop trains, and everything around it.

Loading (a single-file checkpoint or a diffusers folder; hosts build one from their loaded UNet, see
backbones/host.py), the LoRA targets (UNet and text encoders, in kohya's naming), the cached inputs (latents
per bucket, text conditioning per caption), the objective (noise or v prediction, Min-SNR weighting),
previews, and the export as a kohya LoRA file that every host reads.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import re
import time
from collections.abc import Hashable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDPMScheduler, EulerDiscreteScheduler, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from lora_trainer.backbones import ldm, weights_identity
from lora_trainer.backbones.checkpoint import UNET_PREFIX, checkpoint_keys, detect_family, read_checkpoint
from lora_trainer.backbones.tokenizer import clip_tokenizer
from lora_trainer.backbones.validation import validation_loss
from lora_trainer.config import TrainConfig
from lora_trainer.data import DatasetScan, process_caption, scan_images, tag_frequency
from lora_trainer.data.cache import assign_buckets, encode_dataset
from lora_trainer.errors import CheckpointError, ConfigError
from lora_trainer.lora.inject import add_lora, fill_lora, keep_lora_input_dtype, load_lora_state, lora_state
from lora_trainer.lora.kohya import (
    FAMILY_NAMES,
    TEXT_PREFIXES,
    kohya_metadata,
    kohya_module_name,
    lora_family,
    lora_modules,
    read_lora_file,
    save_lora_file,
    to_kohya,
)
from lora_trainer.memory import capture_blockers, hold_base
from lora_trainer.memory.checkpointing import enable_checkpointing
from lora_trainer.memory.plan import MemoryParts

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
    zero_terminal_snr: bool = False  # the schedule rescaled so that its last timestep is pure noise
    clip_skip: int = 1
    name: str = "model"
    max_token_length: int = 75
    noise_scheduler: DDPMScheduler = field(init=False)
    model_type = "image"
    can_compile = True
    compile_pays_after = 10_000  # H200, SD1.5: 170 s to compile, 17 ms saved a step
    # what one run sets up in `prepare` and `add_lora` (a backbone trains once: hosts build one per run)
    run: dict = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.zero_terminal_snr and self.prediction_type != "v_prediction":
            raise ConfigError("zero_terminal_snr needs v-prediction: at the last timestep the input is pure noise, so a "
                              "model predicting the noise learns nothing there and samples come out empty. Set "
                              "prediction_type: v_prediction, or zero_terminal_snr: off.")
        self.noise_scheduler = DDPMScheduler(**SCHEDULER, prediction_type=self.prediction_type,
                                             rescale_betas_zero_snr=self.zero_terminal_snr)

    @classmethod
    def detect(cls, config: TrainConfig) -> str | None:
        """The family of `config.base_model` (a checkpoint file or diffusers folder), read from its keys."""
        return family_of(config.base_model, config.allow_pickle)

    @classmethod
    def read_data(cls, config: TrainConfig) -> DatasetScan:
        """The image folder, scanned (nothing decoded yet); an init_lora of another family is refused here too."""
        if config.init_lora:
            _check_init_lora_family(config.init_lora, config.family)
        if config.stream_blocks:
            raise ConfigError("stream_blocks is for the diffusion transformers (Flux.1, Z-Image, klein), whose blocks are "
                              "alike; an SD UNet fits small GPUs with gradient_checkpointing and base_weights: fp8. Set "
                              "stream_blocks: 0.")
        if config.timestep_sampling not in (None, "uniform") or config.loss_weighting != "none":
            raise ConfigError("timestep_sampling and loss_weighting are for the flow-matching families (Flux.1, Z-Image, "
                              "klein); SD models draw timesteps uniformly and weight the loss with min_snr_gamma. "
                              "Leave them at their defaults.")
        return scan_images(config)

    @classmethod
    def load(cls, config: TrainConfig, data: DatasetScan) -> DiffusionBackbone:
        """The checkpoint file or diffusers folder `base_model`."""
        return cls.from_file(config.base_model, family=config.family, prediction_type=config.prediction_type,
                             zero_terminal_snr=config.zero_terminal_snr, allow_pickle=config.allow_pickle,
                             clip_skip=config.clip_skip, max_token_length=config.max_token_length)

    @classmethod
    def from_file(cls, path: str | Path, *, family: str = "auto", prediction_type: str = "auto",
                  zero_terminal_snr: str = "auto", allow_pickle: bool = False, clip_skip: int = 1,
                  max_token_length: int = 75) -> DiffusionBackbone:
        """Load a single-file LDM checkpoint or a diffusers folder, fully offline. `prediction_type` and
        `zero_terminal_snr` 'auto' follow the file: the `v_pred` / `ztsnr` marker keys (as ComfyUI reads them)
        or a diffusers folder's scheduler config."""
        path = Path(path).expanduser()
        if path.is_dir():
            backbone = cls._from_diffusers(path, family, prediction_type, zero_terminal_snr, allow_pickle, clip_skip)
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
        prediction = _prediction(prediction_type, family, marked_v="v_pred" in checkpoint, source=path.name)
        return cls(family=family, unet=unet, vae=vae, text_encoders=encoders, tokenizers=default_tokenizers(family),
                   prediction_type=prediction, zero_terminal_snr=_zero_snr(zero_terminal_snr, "ztsnr" in checkpoint),
                   clip_skip=clip_skip, name=path.stem, max_token_length=max_token_length)

    @classmethod
    def _from_diffusers(cls, folder: Path, family: str, prediction_type: str, zero_terminal_snr: str,
                        allow_pickle: bool, clip_skip: int) -> DiffusionBackbone:
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
        schedule_file = folder / "scheduler" / "scheduler_config.json"
        schedule = json.loads(schedule_file.read_text()) if schedule_file.is_file() else {}
        prediction = _prediction(prediction_type, detected, schedule.get("prediction_type") == "v_prediction",
                                 source=folder.name)
        return cls(family=detected, unet=unet, vae=vae, text_encoders=encoders, tokenizers=tokenizers,
                   prediction_type=prediction, clip_skip=clip_skip, name=folder.name,
                   zero_terminal_snr=_zero_snr(zero_terminal_snr, bool(schedule.get("rescale_betas_zero_snr"))))

    # -- encoders and the UNet --------------------------------------------------------------------

    def offload_encoders(self) -> None:
        """Free the accelerator of the text encoders once captions are encoded (the VAE already left)."""
        for encoder in self.text_encoders:
            encoder.to("cpu")

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
                time_ids: torch.Tensor | None = None, unet: torch.nn.Module | None = None) -> torch.Tensor:
        """The UNet's prediction (noise or v) for noisy latents at `timesteps` under `cond`; `unet` is the UNet as
        the training step calls it (wrapped for several GPUs, or compiled), else this backbone's own."""
        extra = None
        if self.family == "sdxl":
            extra = {"text_embeds": cond["pooled"], "time_ids": time_ids}
        return (self.unet if unet is None else unet)(noisy, timesteps, cond["hidden"], added_cond_kwargs=extra).sample

    def target(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """What `predict` should output: the noise, or v for v-prediction models."""
        if self.prediction_type == "v_prediction":
            return self.noise_scheduler.get_velocity(latents, noise, timesteps)
        return noise

    def memory_parts(self, config: TrainConfig) -> MemoryParts:
        """What the run puts on the GPU (`memory.plan`): the UNet (already there when a host shares it), its blocks
        (quantized), the text encoders (while training, if they train) and the autoencoder."""
        trains_text = config.train_text_encoder or bool(config.init_lora)
        encoders = [] if trains_text else list(self.text_encoders)
        latent = config.resolution // 8
        return MemoryParts(family=self.family, network=self.unet, targets=self.unet_lora_targets(config.lora_targets),
                           blocks=[*self.unet.down_blocks, self.unet.mid_block, *self.unet.up_blocks],
                           encoders=[*encoders, self.vae], tokens=latent * latent,
                           latent_bytes=2 * self.unet.config.in_channels * latent * latent,
                           extra=list(self.text_encoders) if self._encoders_stay(config, trains_text) else [],
                           extra_dtype=None if trains_text else torch.float32, host=self.shares_unet,
                           resident=self.shares_unet and next(self.unet.parameters()).device.type == "cuda")

    shares_unet = False  # a host's UNet: already on its GPU

    def _encoders_stay(self, config: TrainConfig, trains_text: bool) -> bool:
        """Whether the text encoders stay on the GPU while training (`prepare`): they train, or encode each step's
        changing captions, or the previews' prompts. Those that do not train are held there in fp32."""
        return _captions_vary(config, trains_text) or (bool(config.sample_prompts) and self.can_sample)

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

    # -- training: what the loop asks (lora_trainer.backbones.Backbone) ----------------------------

    def prepare(self, config: TrainConfig, data: DatasetScan, accelerator, bus) -> list[tuple[Hashable, int]]:
        """Encode every image (and, when captions never change, every caption) once; place the frozen modules."""
        if config.train_text_encoder and not self.text_encoders:
            raise ConfigError("This model's text encoder cannot be trained here (the host encodes captions itself); "
                              "set train_text_encoder: false.")
        device = accelerator.device
        dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)
        run = self.run
        run.update(config=config, accelerator=accelerator, device=device, dtype=dtype, scan=data)
        init = None
        if config.init_lora:  # read and matched to this model's layers before the slow caching
            init = self.read_lora(config.init_lora, config.lora_alpha)
            _check_init_lora_fits(config.init_lora, init, [self.unet, *self.text_encoders], self.family)
        run["init"] = init
        run["te_train"] = config.train_text_encoder or bool(init and any(init[1:]))
        if self.vae is not None:
            _place(self.vae, device, torch.float32)
        buckets = assign_buckets(data.items, config.resolution, config.enable_buckets,
                                 config.min_bucket_reso, config.max_bucket_reso)
        run["buckets"] = buckets
        cache_file = Path(config.output_dir) / "cache" / "latents.safetensors" if config.cache_latents_to_disk else None
        # the VAE's activations, not the UNet, set the peak at large sizes: 4 images at 512 px, 1 at 768 px and up
        vae_batch = max(1, 4 * 512 * 512 // (config.resolution * config.resolution))
        cache = encode_dataset(data.items, buckets, self.encode_images, flip=config.flip_aug, cache_file=cache_file,
                               batch_size=vae_batch, model_id=self.identity() if cache_file else "",
                               on_progress=lambda done, total: bus.emit("progress", done, total, phase="caching"))
        if self.vae is not None:
            self.vae.to("cpu")
        for entry in cache:  # a few KiB per image: keep them on the GPU so steps never wait for copies
            entry.latents = entry.latents.to(device, dtype)
            if entry.latents_flipped is not None:
                entry.latents_flipped = entry.latents_flipped.to(device, dtype)
        run["cache"] = cache
        for encoder in self.text_encoders:
            encoder.requires_grad_(False)
            _place(encoder, device, dtype if config.train_text_encoder else torch.float32)
        # text conditioning: cached once unless captions change per step or the text encoder trains; before the UNet
        # goes to the GPU, so that the text encoders (SDXL's: 3 GB in fp32) and the UNet are never there together
        run["varying"] = _captions_vary(config, run["te_train"])
        text_cache: dict[str, dict[str, torch.Tensor]] = {}
        if not run["varying"]:
            with torch.no_grad():
                for caption in sorted({entry.item.caption for entry in cache}):
                    text_cache[caption] = {k: v[0] for k, v in self.encode_prompts([caption]).items()}
        if not self._encoders_stay(config, run["te_train"]):
            self.offload_encoders()
        run["text_cache"] = text_cache
        self.unet.requires_grad_(False)
        hold_base([*self.unet.down_blocks, self.unet.mid_block, *self.unet.up_blocks], config.base_weights, device,
                  dtype, what="UNet", fp8_compute=config.fp8_compute == "on")
        _place(self.unet, device, dtype)
        return [(entry.bucket, 0 if entry.item.held_out else entry.item.repeats * config.repeats) for entry in cache]

    def settle(self, config: TrainConfig) -> TrainConfig:
        """The config with what this model decided: its prediction type and noise schedule (for the metadata)."""
        return dataclasses.replace(config, prediction_type=self.prediction_type,
                                   zero_terminal_snr="on" if self.zero_terminal_snr else "off")

    def identity(self) -> str:
        """What the latent cache is keyed by: the weights of the UNet and of the VAE that encodes the images."""
        return weights_identity(self.unet, self.vae)

    def add_lora(self, config: TrainConfig) -> list[dict]:
        """LoRA layers on the UNet (and the text encoders when they train), filled from init_lora if given."""
        init, te_train = self.run["init"], self.run["te_train"]
        targets = sorted(set(self.unet_lora_targets(config.lora_targets)) | set(init[0] if init else ()))
        ranks = {name: parts["down"].shape[0] for name, parts in (init[0] if init else {}).items()}
        params = add_lora(self.unet, targets, config.lora_rank, config.lora_alpha, config.lora_dropout, ranks)
        groups = [{"params": params, "lr": config.learning_rate}]
        if te_train:
            te_params = []
            for index, encoder in enumerate(self.text_encoders):
                modules = init[index + 1] if init else {}
                names = sorted(set(self.text_lora_targets(encoder)) | set(modules))
                te_params += add_lora(encoder, names, config.lora_rank, config.lora_alpha, config.lora_dropout,
                                      {n: p["down"].shape[0] for n, p in modules.items()})
            groups.append({"params": te_params, "lr": config.text_encoder_lr})
        for group in groups:  # before filling: peft makes the LoRA of a quantized layer in its compute dtype
            for p in group["params"]:
                p.data = p.data.float()
        if init:
            for model, modules in zip([self.unet, *self.text_encoders], init):
                if modules:
                    fill_lora(model, modules)
        if self.run["dtype"] != torch.float32 and self.run["device"].type in ("cuda", "cpu"):
            keep_lora_input_dtype(self.unet, *self.text_encoders)  # every forward there runs under autocast
        self.run["checkpointing_captured"] = True
        if config.gradient_checkpointing:
            self.run["checkpointing_captured"] = enable_checkpointing(self.unet)
            for encoder in self.text_encoders if te_train else ():
                encoder.gradient_checkpointing_enable()
        return groups

    def trained_modules(self) -> list[torch.nn.Module]:
        """The UNet, and the text encoders when their LoRA trains."""
        return [self.unet] + (self.text_encoders if self.run["te_train"] else [])

    def compiled(self, network: torch.nn.Module) -> torch.nn.Module:
        """The whole network through torch.compile."""
        return torch.compile(network)

    def uncompiled(self):
        """A context for running the network outside the training step: the compiled wrapper is the step's alone."""
        return contextlib.nullcontext()

    def capture_blockers(self, config: TrainConfig) -> list[str]:
        """Text-encoder training runs outside the captured step; so do some memory levers (`memory.capture_blockers`)."""
        return (["text-encoder training"] if self.run["te_train"] else []) + \
            capture_blockers(config.base_weights, self.run["checkpointing_captured"])

    def batch(self, indices: list[int], gen: torch.Generator, device_gen: torch.Generator,
              times: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Latents (mirrored by coin flips from `gen`), noise and timesteps (from `device_gen`), the noised latents,
        the target, the text conditioning and SDXL's size conditioning. A validation batch gives `times` (in [0, 1),
        a share of the timestep range per example) and is neither mirrored nor has its captions changed."""
        run, config = self.run, self.run["config"]
        cache, device, dtype = run["cache"], run["device"], run["dtype"]
        augment = times is None
        flips = (torch.rand(len(indices), generator=gen) < 0.5).tolist() if augment else [False] * len(indices)
        latents = torch.stack([cache[i].latents_flipped if config.flip_aug and flip else cache[i].latents
                               for i, flip in zip(indices, flips)])
        captions = [cache[i].item.caption for i in indices]
        noise = torch.randn(latents.shape, generator=device_gen, device=device, dtype=dtype)
        if config.noise_offset:
            noise = noise + config.noise_offset * torch.randn(latents.shape[:2] + (1, 1), generator=device_gen,
                                                              device=device, dtype=dtype)
        count = self.noise_scheduler.config.num_train_timesteps
        timesteps = torch.randint(0, count, (len(indices),), generator=device_gen, device=device) if augment else \
            (times * count).long().clamp(max=count - 1).to(device)
        if run["varying"] and augment:
            captions = [process_caption(c, shuffle=config.shuffle_captions, keep_tokens=config.keep_tokens,
                                        dropout=config.caption_dropout, generator=gen) for c in captions]
            with torch.set_grad_enabled(run["te_train"]), run["accelerator"].autocast():
                cond = self.encode_prompts(captions)
        elif run["varying"]:
            with torch.no_grad(), run["accelerator"].autocast():
                cond = self.encode_prompts(captions)
        else:
            cond = {k: torch.stack([run["text_cache"][c][k] for c in captions]) for k in run["text_cache"][captions[0]]}
        inputs = {"noisy": self.noise_scheduler.add_noise(latents, noise, timesteps), "timesteps": timesteps,
                  "target": self.target(latents, noise, timesteps), **{f"cond_{k}": v for k, v in cond.items()}}
        if self.family == "sdxl":
            inputs["time_ids"] = torch.stack([cache[i].time_ids for i in indices]).to(device)
        if config.min_snr_gamma:
            ratio = snr(self.noise_scheduler.alphas_cumprod, timesteps)
            inputs["weight"] = torch.clamp(ratio, max=config.min_snr_gamma) / \
                (ratio + 1 if self.prediction_type == "v_prediction" else ratio)
        return inputs

    def loss(self, network: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """Mean squared error of the prediction against the target, per image weighted by Min-SNR if asked."""
        cond = {k.removeprefix("cond_"): v for k, v in inputs.items() if k.startswith("cond_")}
        pred = self.predict(inputs["noisy"], inputs["timesteps"], cond, inputs.get("time_ids"), network)
        loss = F.mse_loss(pred.float(), inputs["target"].float(), reduction="none").mean(dim=(1, 2, 3))
        if "weight" in inputs:
            loss = loss * inputs["weight"]
        return loss.mean()

    def evaluate(self) -> dict[str, float]:
        """The validation loss of the LoRA as it is now ({} without held-out images)."""
        return validation_loss(self)

    @property
    def can_sample(self) -> bool:
        """Whether preview images can be made from this backbone's own modules."""
        return self.vae is not None and bool(self.text_encoders)

    def sample(self, prompts: list[str], config: TrainConfig) -> list:
        """The sample prompts rendered with the LoRA as it is now, at the training resolution."""
        accelerator, device = self.run["accelerator"], self.run["device"]
        if self.vae is not None:
            self.vae.to(device)
        for encoder in self.text_encoders:
            encoder.to(device)
        modules = self.trained_modules()
        for model in modules:
            model.eval()
        with accelerator.autocast():
            images = [self.render(prompt, steps=config.sample_steps, guidance=config.sample_guidance_scale,
                                  seed=config.seed + index, size=config.resolution)
                      for index, prompt in enumerate(prompts)]
        for model in modules:
            model.train()
        if self.vae is not None:
            self.vae.to("cpu")
        if not self._encoders_stay(config, self.run["te_train"]):  # a preview asked for mid-run (Sample now)
            for encoder in self.text_encoders:
                encoder.to("cpu")
        return images

    def render(self, prompt: str, *, steps: int, guidance: float, seed: int, size: int, negative: str = ""):
        """One image of `prompt` as the model is now (with whatever LoRA it holds): samples, the demo, the Test grid."""
        pipe = self.sampling_pipeline()
        pipe.set_progress_bar_config(disable=True)
        size = size // 8 * 8
        generator = torch.Generator(device="cpu").manual_seed(seed)
        with torch.no_grad():
            return pipe(prompt, negative_prompt=negative or None, num_inference_steps=steps, guidance_scale=guidance,
                        generator=generator, height=size, width=size).images[0]

    def lora_state(self) -> list[dict[str, torch.Tensor]]:
        """The LoRA weights of each trained module (peft naming)."""
        return [lora_state(model) for model in self.trained_modules()]

    def load_lora_state(self, state: list[dict[str, torch.Tensor]]) -> None:
        """Put checkpointed LoRA weights back into the trained modules."""
        modules = self.trained_modules()
        if len(state) != len(modules):
            raise CheckpointError("The checkpoint was saved with train_text_encoder set differently; use the same config.")
        for model, weights in zip(modules, state):
            load_lora_state(model, weights)

    def checkpoint_lora(self, folder: Path, out_dir: Path, config: TrainConfig, meta: dict) -> Path | None:
        """The LoRA of a checkpoint goes beside it, as NAME-stepN.safetensors (ready to use)."""
        return self._write_lora(out_dir / f"{meta['name']}.safetensors", config, meta)

    def export(self, target: Path, config: TrainConfig, meta: dict) -> dict[str, Path]:
        """The finished LoRA: a kohya file that the WebUI, Forge, ComfyUI and diffusers load."""
        return {"final": self._write_lora(target.with_name(f"{target.name}.safetensors"), config, meta)}

    def _write_lora(self, path: Path, config: TrainConfig, meta: dict) -> Path:
        """The trained modules' LoRA as a kohya file at `path`, with the metadata hosts read."""
        modules = self.trained_modules()
        tensors = to_kohya(lora_state(modules[0]), [lora_state(m) for m in modules[1:]], self.family,
                           config.lora_alpha, config.save_dtype)
        run = self.run
        info = {**meta, "scan": run["scan"], "tags": tag_frequency(run["scan"].training), "buckets": run["buckets"],
                "model_name": self.name, "finished_at": time.time()}
        return save_lora_file(path, tensors, kohya_metadata(config, self.family, info))

    # -- LoRA files ------------------------------------------------------------------------------

    def read_lora(self, path: str, alpha: float) -> list[dict[str, dict]]:
        """A kohya LoRA file as per-model {module name: {'down', 'up'}} (UNet first, then the text encoders), with
        `up` rescaled to `alpha`: the file's own rank is kept per module and its scale (alpha/rank) folded into
        `up`, so a LoRA continued from it starts out with exactly the file's effect."""
        tensors, _ = read_lora_file(path)
        lookup = module_lookup(self.unet, self.text_encoders, self.family)
        per_model: list[dict[str, dict]] = [{} for _ in range(1 + len(self.text_encoders))]
        unknown = []
        for name, parts in lora_modules(tensors).items():
            if name not in lookup:
                unknown.append(name)
                continue
            if "down" not in parts or "up" not in parts:
                raise CheckpointError(f"{path}: module {name} lacks its lora_down or lora_up weight.")
            rank = parts["down"].shape[0]
            file_scale = float(parts["alpha"]) / rank if "alpha" in parts else 1.0
            index, module = lookup[name]
            per_model[index][module] = {"down": parts["down"].float(),
                                        "up": parts["up"].float() * file_scale / (alpha / rank)}
        if unknown:
            raise CheckpointError(f"{path} does not fit this {self.family} model: {len(unknown)} modules have no match "
                                  f"(e.g. {', '.join(unknown[:3])}). Was it trained on another model family?")
        if not any(per_model):
            raise CheckpointError(f"{path} holds no LoRA modules.")
        return per_model

    def apply_lora_file(self, path: str, strength: float = 1.0) -> None:
        """Put a kohya LoRA file onto the UNet and text encoders at `strength` (previews, the Test grid, tests).

        Our own reader rather than diffusers' loader, which needs transformers >= 4.34 (the WebUI has 4.30).
        """
        for model, modules in zip([self.unet, *self.text_encoders], self.read_lora(path, alpha=1.0)):
            if not modules:
                continue
            ranks = {name: parts["down"].shape[0] for name, parts in modules.items()}
            for parts in modules.values():
                parts["up"] = parts["up"] * strength
            add_lora(model, sorted(modules), max(ranks.values()), 1.0, 0.0, ranks)
            # peft scales by alpha/rank; read_lora already folded the file's own scale into `up` for alpha 1
            fill_lora(model, modules)
            model.requires_grad_(False)

    def sampling_scheduler(self) -> EulerDiscreteScheduler:
        """Euler over the training schedule. With zero terminal SNR its steps are spaced from the very last
        timestep ('trailing', as the paper says): the leading spacing would start short of pure noise."""
        extra = {"timestep_spacing": "trailing"} if self.zero_terminal_snr else {}
        return EulerDiscreteScheduler.from_config(self.noise_scheduler.config, **extra)

    def sampling_pipeline(self):
        """A diffusers pipeline over these very modules, for preview images."""
        from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

        scheduler = self.sampling_scheduler()
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


def _prediction(prediction_type: str, family: str, marked_v: bool = False, source: str = "The model") -> str:
    """Resolve 'auto': a model marked v-prediction (the `v_pred` key, a diffusers scheduler config) predicts v,
    SD2 checkpoints in use are mostly 768-v models, the others predict noise."""
    if prediction_type != "auto":
        if marked_v and prediction_type != "v_prediction":
            log.warning("%s is marked as a v-prediction model, but prediction_type: %s was set: a LoRA trained so "
                        "will likely draw empty or washed-out images. Use prediction_type: auto.", source, prediction_type)
        return prediction_type
    if marked_v:
        log.info("%s is a v-prediction model: training with v-prediction.", source)
        return "v_prediction"
    if family == "sd2":
        log.info("SD2 checkpoint: training with v-prediction (768-v). Set prediction_type: epsilon for 512-base.")
        return "v_prediction"
    return "epsilon"


def _zero_snr(setting: str, marked: bool) -> bool:
    """Resolve zero_terminal_snr 'auto' from the model's marker (the `ztsnr` key)."""
    return marked if setting == "auto" else setting == "on"


def module_lookup(unet: torch.nn.Module, text_encoders: list[torch.nn.Module], family: str) -> dict[str, tuple[int, str]]:
    """kohya module name -> (0 for the UNet or 1+i for text encoder i, module name in our models).

    UNet names are accepted in diffusers naming (ours, kohya's) and in LDM naming (some other tools).
    """
    lookup: dict[str, tuple[int, str]] = {}
    layers = unet.config.layers_per_block
    weights = [n for n, m in unet.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
    ldm_names = ldm.unet_to_ldm({f"{n}.weight": None for n in weights}, layers)
    for name, ldm_name in zip(weights, ldm_names):
        lookup[kohya_module_name("lora_unet", name)] = (0, name)
        lookup[kohya_module_name("lora_unet", ldm_name.removesuffix(".weight"))] = (0, name)
    for index, (encoder, prefix) in enumerate(zip(text_encoders, TEXT_PREFIXES[family])):
        for name, module in encoder.named_modules():
            if isinstance(module, torch.nn.Linear):
                canonical = name if name.startswith("text_model.") else f"text_model.{name}"
                lookup[kohya_module_name(prefix, canonical)] = (index + 1, name)
    return lookup


def _check_init_lora_family(path: str, family: str) -> None:
    """Refuse an init_lora that is missing, not a plain LoRA, or made for another model family than `family`."""
    try:
        tensors, metadata = read_lora_file(path)
        lora_modules(tensors)
    except CheckpointError as exc:
        raise CheckpointError(f"init_lora: {exc}") from None
    made_for = lora_family(tensors, metadata)
    if made_for and made_for != family:
        raise CheckpointError(f"init_lora {path} is a LoRA for {FAMILY_NAMES[made_for]} models, but the base model is "
                              f"an {FAMILY_NAMES[family]} model. Continue from a LoRA trained on {FAMILY_NAMES[family]}, "
                              f"or train on the {FAMILY_NAMES[made_for]} base model it was made for.")


def _check_init_lora_fits(path: str, init: list[dict[str, dict]], models: list[torch.nn.Module], family: str) -> None:
    """Refuse an init_lora whose weights do not have the shapes of this model's layers (a LoRA of another model)."""
    wrong, total = [], 0
    for model, modules in zip(models, init):
        for name, parts in modules.items():
            total += 1
            weight = model.get_submodule(name).weight  # Linear (out, in) or Conv2d (out, in, kh, kw)
            rank = parts["down"].shape[0]
            down, up = (rank, *weight.shape[1:]), (weight.shape[0], rank, *[1] * (weight.ndim - 2))
            found = tuple(parts["down"].shape), tuple(parts["up"].shape)
            if found != (down, up):
                wrong.append(f"{name}: lora_down {found[0]} and lora_up {found[1]} where this model needs {down} and {up}")
    if wrong:
        raise CheckpointError(f"init_lora {path} does not fit this {FAMILY_NAMES[family]} model: {len(wrong)} of its "
                              f"{total} modules have other shapes (e.g. {wrong[0]}). It was trained on another model "
                              "family or a model with other layer sizes; continue from a LoRA trained on this base model.")


def snr(alphas_cumprod: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """Signal-to-noise ratio at each timestep, as diffusers' compute_snr gives it.

    Written out because importing diffusers.training_utils fails under the WebUI's transformers 4.30.
    """
    alphas = alphas_cumprod.to(timesteps.device)[timesteps].float()
    return alphas / (1 - alphas)


def _captions_vary(config: TrainConfig, trains_text: bool) -> bool:
    """Whether captions are encoded at every step (they change, or the text encoder trains) rather than once."""
    return config.shuffle_captions or config.caption_dropout > 0 or trains_text


def _place(module: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> None:
    """Move a module, casting only when its dtype differs (a cast copies every weight)."""
    current = next(module.parameters()).dtype
    module.to(device) if current == dtype else module.to(device, dtype)

"""A backbone made from a host's loaded model: its UNet shared from memory, its own image and caption encoders.

The WebUI and ComfyUI adapters build one of these: the UNet skeleton takes the host's tensors without a
copy (see `ldm.unet_from_ldm`), while images and captions go through the host's own VAE and text
encoder (its tokenizer, clip skip, SDXL conditioning), so what is trained matches what the host renders.
"""

from __future__ import annotations

import types
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image

from lora_trainer.backbones import ldm, weights_identity
from lora_trainer.backbones.sd import DiffusionBackbone
from lora_trainer.errors import ConfigError


@dataclass
class HostBackbone(DiffusionBackbone):
    """A DiffusionBackbone whose images and captions are encoded by the host."""

    image_encoder: Callable[[torch.Tensor], torch.Tensor] | None = field(default=None, kw_only=True)
    prompt_encoder: Callable[[list[str]], dict[str, torch.Tensor]] | None = field(default=None, kw_only=True)
    release: Callable[[], None] | None = field(default=None, kw_only=True)
    image_decoder: Callable[[torch.Tensor], torch.Tensor] | None = field(default=None, kw_only=True)
    encoder_id: str = field(default="", kw_only=True)  # names the host's image encoder (see `identity`)
    shares_unet = True

    @classmethod
    def from_ldm_unet(cls, unet_state_dict: dict[str, torch.Tensor], family: str, *,
                      encode_images: Callable[[torch.Tensor], torch.Tensor],
                      encode_prompts: Callable[[list[str]], dict[str, torch.Tensor]],
                      pooled_dim: int | None = None, prediction_type: str = "epsilon",
                      name: str = "host model", release: Callable[[], None] | None = None,
                      decode_images: Callable[[torch.Tensor], torch.Tensor] | None = None,
                      encoder_id: str = "", zero_terminal_snr: bool = False) -> HostBackbone:
        """Share a host's LDM UNet tensors (keys without 'model.diffusion_model.') and use its encoders.

        `encode_images` takes pixels in [-1, 1] (B, 3, H, W) and returns latents already scaled by the VAE
        factor; `encode_prompts` returns {'hidden': (B, 77, C)} and for SDXL also {'pooled': (B, P)};
        `decode_images` (optional: it enables preview images) turns such latents back into pixels in [-1, 1];
        `encoder_id` names the host's VAE (e.g. `weights_identity(vae_module)`) for the latent cache's key.
        """
        unet = ldm.unet_from_ldm(unet_state_dict, family, pooled_dim)
        return cls(family=family, unet=unet, vae=None, text_encoders=[], tokenizers=[],
                   prediction_type=prediction_type, zero_terminal_snr=zero_terminal_snr, name=name,
                   image_encoder=encode_images, prompt_encoder=encode_prompts, release=release,
                   image_decoder=decode_images, encoder_id=encoder_id)

    @classmethod
    def for_plan(cls, unet_state_dict: dict[str, torch.Tensor], family: str) -> HostBackbone:
        """A host's loaded UNet (its tensors shared, or as meta tensors) for the memory plan only: no encoders, and
        SDXL's pooled text size, which only sets a small embedding's shape, taken as the base model's 1280."""
        return cls.from_ldm_unet(unet_state_dict, family, encode_images=None, encode_prompts=None,
                                 pooled_dim=1280 if family == "sdxl" else None)

    def prepare(self, config, data, accelerator, bus):
        """As for a file, once `base_weights: fp8` or `nf4` is refused: the host's weights stay where the host keeps
        them, so a quantized copy would add to the memory it is meant to save."""
        if config.fp8_compute == "on":
            raise ConfigError("fp8_compute is for models loaded from files: it multiplies with an fp8 copy of the base, "
                              "and inside a host the LoRA trains on the host's loaded model as the host holds it. Set "
                              "fp8_compute: off.")
        if config.base_weights in ("fp8", "nf4"):
            raise ConfigError(f"base_weights: {config.base_weights} is for models loaded from files. Inside a host the LoRA trains on "
                              "the host's loaded model as the host holds it (a quantized copy would add to its memory, not "
                              "replace it). Set base_weights: auto, or train from the model's file.")
        return super().prepare(config, data, accelerator, bus)

    def identity(self) -> str:
        """The latent cache's key: the shared UNet's weights and the host's image encoder (`encoder_id`)."""
        return f"{weights_identity(self.unet)}|{self.encoder_id}"

    def offload_encoders(self) -> None:
        """Let the host free its VAE and text encoder (`release`), once everything is encoded."""
        if self.release is not None:
            self.release()

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """Latents from the host's VAE."""
        with torch.no_grad():
            return self.image_encoder(pixels)

    def encode_prompts(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        """Text conditioning from the host's text encoder."""
        with torch.no_grad():
            return self.prompt_encoder(prompts)

    @property
    def can_sample(self) -> bool:
        """Preview images need the host's VAE decoder."""
        return self.image_decoder is not None

    def sampling_pipeline(self) -> HostSampler:
        """A small txt2img over the UNet being trained and the host's encoders, for preview images."""
        return HostSampler(self)


class HostSampler:
    """Euler sampling with classifier-free guidance: the host's text encoder and VAE, the trained UNet.

    Called like a diffusers pipeline (`pipe(prompt, num_inference_steps=..., ...).images`), so the training
    loop's preview code serves both kinds of backbone.
    """

    def __init__(self, backbone: HostBackbone) -> None:
        self.backbone = backbone

    def set_progress_bar_config(self, **_) -> None:
        """Nothing to configure: there is no progress bar."""

    def __call__(self, prompt: str, *, num_inference_steps: int, guidance_scale: float, generator: torch.Generator,
                 height: int, width: int, negative_prompt: str | None = None):

        backbone = self.backbone
        weight = next(backbone.unet.parameters())
        cond = backbone.encode_prompts([negative_prompt or "", prompt])
        both = {k: v.to(weight.device, weight.dtype) for k, v in cond.items()}
        scheduler = backbone.sampling_scheduler()
        scheduler.set_timesteps(num_inference_steps, device=weight.device)
        latents = torch.randn((1, 4, height // 8, width // 8), generator=generator).to(weight.device)
        latents = latents * scheduler.init_noise_sigma
        time_ids = None
        if backbone.family == "sdxl":
            time_ids = torch.tensor([[height, width, 0, 0, height, width]] * 2, dtype=torch.float32, device=weight.device)
        with torch.no_grad():
            for t in scheduler.timesteps:
                model_input = scheduler.scale_model_input(torch.cat([latents] * 2), t).to(weight.dtype)
                uncond, text = backbone.predict(model_input, t.expand(2), both, time_ids).float().chunk(2)
                latents = scheduler.step(uncond + guidance_scale * (text - uncond), t, latents).prev_sample
            pixels = backbone.image_decoder(latents)
        array = ((pixels[0].float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).cpu().numpy()
        return types.SimpleNamespace(images=[Image.fromarray(np.ascontiguousarray(array))])

"""A backbone made from a host's loaded model: its UNet shared from memory, its own image and caption encoders.

The WebUI and ComfyUI adapters build one of these: the UNet skeleton takes the host's tensors without a
copy (see `ldm.unet_from_ldm`), while images and captions go through the host's own VAE and text
encoder (its tokenizer, clip skip, SDXL conditioning), so what is trained matches what the host renders.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from lora_trainer.backbones import ldm
from lora_trainer.backbones.sd import DiffusionBackbone


@dataclass
class HostBackbone(DiffusionBackbone):
    """A DiffusionBackbone whose images and captions are encoded by the host."""

    image_encoder: Callable[[torch.Tensor], torch.Tensor] | None = field(default=None, kw_only=True)
    prompt_encoder: Callable[[list[str]], dict[str, torch.Tensor]] | None = field(default=None, kw_only=True)
    release: Callable[[], None] | None = field(default=None, kw_only=True)

    @classmethod
    def from_ldm_unet(cls, unet_state_dict: dict[str, torch.Tensor], family: str, *,
                      encode_images: Callable[[torch.Tensor], torch.Tensor],
                      encode_prompts: Callable[[list[str]], dict[str, torch.Tensor]],
                      pooled_dim: int | None = None, prediction_type: str = "epsilon",
                      name: str = "host model", release: Callable[[], None] | None = None) -> HostBackbone:
        """Share a host's LDM UNet tensors (keys without 'model.diffusion_model.') and use its encoders.

        `encode_images` takes pixels in [-1, 1] (B, 3, H, W) and returns latents already scaled by the VAE
        factor; `encode_prompts` returns {'hidden': (B, 77, C)} and for SDXL also {'pooled': (B, P)}.
        """
        unet = ldm.unet_from_ldm(unet_state_dict, family, pooled_dim)
        return cls(family=family, unet=unet, vae=None, text_encoders=[], tokenizers=[],
                   prediction_type=prediction_type, name=name,
                   image_encoder=encode_images, prompt_encoder=encode_prompts, release=release)

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

"""Model families behind one small interface: what the training loop asks of a model, and which file answers.

A family is one file in this folder: a class with the methods of `Backbone`, registered in `BACKBONES`. The
loop (lora_trainer/train/loop.py) never asks which family it trains; everything that differs lives here.
"""

from __future__ import annotations

import hashlib
import importlib
from collections.abc import Hashable
from pathlib import Path
from typing import Any, Protocol

import torch

from lora_trainer.config import TrainConfig
from lora_trainer.errors import ConfigError


class Backbone(Protocol):
    """A model the loop trains a LoRA on. The loop calls, in this order:

    `read_data` (before any weights load: a bad folder fails at once), `load` (weights from a file or folder;
    a host hands its loaded weights to the constructor instead), `prepare` (cache the inputs, place the frozen
    modules), `settle`, `add_lora`, then per batch `batch` and `loss`, and `evaluate`, `sample`, `checkpoint_lora` and
    `export` when they are due.
    """

    model_type: str  # the config's model_type it trains: "image", "causal_lm"
    family: str  # the preset's key in config.PRESETS: "sd1", "sd2", "sdxl", "causal_lm"
    name: str  # the base model's name, for the LoRA's metadata
    can_compile: bool  # whether torch_compile applies to `network()`
    compile_pays_after: int  # steps per image shape after which compiling has paid for itself ('auto' compiles)

    @classmethod
    def detect(cls, config: TrainConfig) -> str | None:
        """This class's family name for `config.base_model`, or None when the file is not one of ours."""

    @classmethod
    def read_data(cls, config: TrainConfig) -> Any:
        """The training data as found (scanned or tokenized), with a `summary()`; raises DatasetError."""

    @classmethod
    def load(cls, config: TrainConfig, data: Any) -> Backbone:
        """The model from `config.base_model`, offline."""

    def prepare(self, config: TrainConfig, data: Any, accelerator, bus) -> list[tuple[Hashable, int]]:
        """Cache the inputs (encoded images and captions, token rows) and place the frozen modules on the device.
        Returns, per example, the key of the batches it may join (same key = same shape) and its repeats."""

    def settle(self, config: TrainConfig) -> TrainConfig:
        """The config with the values the loaded model decided where it said 'auto' (saved and in the LoRA)."""

    def add_lora(self, config: TrainConfig) -> list[dict]:
        """Put LoRA layers (new, or from `config.init_lora`) into the model; the optimizer's parameter groups."""

    def trained_modules(self) -> list[torch.nn.Module]:
        """The modules holding LoRA layers; the first is the network `loss` runs."""

    def compiled(self, network: torch.nn.Module) -> torch.nn.Module:
        """`network` (the first of `trained_modules`) through torch.compile, for the training step only."""

    def capture_blockers(self, config: TrainConfig) -> list[str]:
        """Why this run's step cannot be captured as a CUDA graph, beyond the loop's own reasons."""

    def batch(self, indices: list[int], gen: torch.Generator, device_gen: torch.Generator,
              times: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """The step's inputs for these examples; random draws come from `gen` (CPU) and `device_gen` (device). Image
        families: a validation batch gives `times`, fixed quantiles of the training's time distribution, and is not
        augmented (`backbones.validation`)."""

    def loss(self, network: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """The objective on `inputs` through `network` (the first trained module, possibly wrapped or compiled),
        under the step's autocast: the same code eagerly and inside a captured CUDA graph."""

    def evaluate(self) -> dict[str, float]:
        """Held-out measures of the LoRA as it is now ({} when this run has none); 'validation_loss', when there,
        picks the best checkpoint and decides early stop."""

    @property
    def can_sample(self) -> bool:
        """Whether `sample` can render preview images."""

    def sample(self, prompts: list[str], config: TrainConfig) -> list[Any]:
        """Preview images of `prompts` with the LoRA as it is now (PIL images)."""

    def lora_state(self) -> list[dict[str, torch.Tensor]]:
        """The LoRA weights per trained module, for checkpoints."""

    def load_lora_state(self, state: list[dict[str, torch.Tensor]]) -> None:
        """Put checkpointed LoRA weights back."""

    def checkpoint_lora(self, folder: Path, out_dir: Path, config: TrainConfig, meta: dict) -> Path | None:
        """Write the usable LoRA of a checkpoint: beside it in `out_dir` (its path), or inside the checkpoint
        folder `folder` being written (None: the checkpoint folder is the LoRA)."""

    def export(self, target: Path, config: TrainConfig, meta: dict) -> dict[str, Path]:
        """Write the finished LoRA named `target` (a file gets its suffix); {'final': path, other outputs...}."""


# model_type -> the backbone classes that may train it, asked in this order (module:class, imported when asked)
BACKBONES = {
    "image": ["lora_trainer.backbones.flux:FluxBackbone", "lora_trainer.backbones.zimage:ZImageBackbone",
              "lora_trainer.backbones.flux2:KleinBackbone", "lora_trainer.backbones.sd:DiffusionBackbone"],
    "causal_lm": ["lora_trainer.backbones.causal_lm:CausalLMBackbone"],
}


def backbone_class(config: TrainConfig) -> tuple[type, str]:
    """The backbone class and family that train `config.base_model` (the first in BACKBONES to claim it)."""
    for entry in BACKBONES[config.model_type]:
        module, name = entry.split(":")
        cls = getattr(importlib.import_module(module), name)
        family = cls.detect(config)
        if family is not None:
            return cls, family
    raise ConfigError(f"{config.base_model} is not a model this trainer knows (model_type: {config.model_type}).")


def memory_report(config: TrainConfig, free: int | None, backbone: Backbone | None = None) -> str:
    """The memory plan (`memory.plan.report`) of `config` trained from its files, or on a host's `backbone`, for
    `free` bytes of GPU memory (None: no GPU to compare with). A model from files is read into CPU memory for its
    shapes; nothing goes to the GPU."""
    from lora_trainer.config import resolve
    from lora_trainer.memory.plan import report

    if config.model_type != "image":
        raise ConfigError("The memory plan is for image models; a language model's memory follows load_in_4bit, "
                          "max_seq_length and gradient_checkpointing.")
    kind, family = (type(backbone), backbone.family) if backbone is not None else backbone_class(config)
    config = resolve(config, family)
    data = kind.read_data(config)
    model = backbone if backbone is not None else kind.load(config, data)
    return report(config, model.memory_parts(config), len(data.items), free)


def weights_identity(*modules: torch.nn.Module | None) -> str:
    """A short hash of the modules' weights: every name, shape and dtype, and a sample of every tensor's values.

    It names the model in caches where a file path may be absent (a host's model) or lie (a file replaced).
    """
    digest = hashlib.sha256()
    for module in modules:
        if module is None:
            continue
        for name, tensor in module.state_dict().items():
            digest.update(f"{name}|{tuple(tensor.shape)}|{tensor.dtype}".encode())
            flat = tensor.detach().reshape(-1)
            if flat.numel():
                picked = flat[:: max(1, flat.numel() // 64)][:64]  # 64 values spread over the tensor
                digest.update(picked.float().cpu().numpy().tobytes())
    return digest.hexdigest()[:32]

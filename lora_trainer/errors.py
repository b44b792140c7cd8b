"""Typed errors: each message tells the user what went wrong and what to do about it."""


class LoraTrainerError(Exception):
    """Base class of every error the trainer raises on purpose."""


class ConfigError(LoraTrainerError):
    """A config key is unknown or a value is out of range."""


class DatasetError(LoraTrainerError):
    """The training folder is missing, empty, or holds no usable image."""


class CheckpointError(LoraTrainerError):
    """A base model or LoRA file cannot be read, or its family is unknown."""


class TrainingError(LoraTrainerError):
    """Training stopped on a problem (NaN loss, out of memory, failed save)."""


class HostError(LoraTrainerError):
    """A host (WebUI, ComfyUI) gave us something we cannot train on."""

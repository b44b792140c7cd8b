"""lora_trainer: LoRA training for Stable Diffusion inside the UIs people already use, and on the command line."""

__version__ = "0.1.0"

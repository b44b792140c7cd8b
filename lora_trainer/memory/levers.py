"""The config keys that lower a run's GPU memory, and which of them a config leaves off: what an out-of-memory
error names, and (later) what the memory plan turns on."""

from __future__ import annotations

from lora_trainer.config import TrainConfig


def levers_off(config: TrainConfig, *, in_host: bool = False) -> list[str]:
    """The memory levers this config does not use yet, the most memory for the least speed first."""
    levers = []
    if not config.gradient_checkpointing:
        levers.append("gradient_checkpointing: true (much less memory for activations; image models keep the "
                      "captured step)")
    if config.model_type == "image" and config.base_weights not in ("fp8", "nf4") and not in_host:
        levers.append("base_weights: fp8 (the frozen model in half the memory)")
    if config.family in ("flux1", "zimage", "klein") and not in_host and config.base_weights != "nf4":
        more = f" (more than {config.stream_blocks})" if config.stream_blocks else ""
        levers.append(f"stream_blocks: N{more} (N of the transformer's blocks kept in CPU memory, about 1% slower; "
                      "with gradient_checkpointing)")
    if config.model_type == "image" and config.base_weights != "nf4" and not in_host:
        levers.append("base_weights: nf4 (a quarter of the memory; moves the LoRA more)")
    if config.model_type == "causal_lm" and not config.load_in_4bit:
        levers.append("load_in_4bit: true (the frozen model in a quarter of the memory)")
    if config.train_text_encoder:
        levers.append("train_text_encoder: false")
    if config.batch_size > 1:
        levers.append(f"batch_size: 1 with gradient_accumulation_steps: {config.batch_size} (the same batch, in steps)")
    if config.model_type == "image" and (config.resolution or 0) > 512:
        levers.append(f"a lower resolution than {config.resolution}")
    if config.model_type == "causal_lm" and (config.max_seq_length or 0) > 512:
        levers.append(f"a shorter max_seq_length than {config.max_seq_length}")
    return levers

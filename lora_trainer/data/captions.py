"""Caption handling at training time: tag shuffle, keep-tokens and dropout, and kohya's tag counts."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

import torch

from lora_trainer.data.images import ImageItem


def split_tags(caption: str) -> list[str]:
    """The comma-separated tags of a caption, stripped, without empty ones."""
    return [tag.strip() for tag in caption.split(",") if tag.strip()]


def process_caption(
    caption: str, *, shuffle: bool, keep_tokens: int, dropout: float, generator: torch.Generator
) -> str:
    """Shuffle the tags after the first keep_tokens and drop the whole caption with probability dropout."""
    # The dropout draw and the shuffle happen whatever the outcome, so the RNG stream (and resume) never
    # depends on which captions were dropped.
    dropped = torch.rand((), generator=generator, device=generator.device).item() < dropout
    tags = split_tags(caption)
    kept, rest = tags[:keep_tokens], tags[keep_tokens:]
    if shuffle and rest:
        order = torch.randperm(len(rest), generator=generator, device=generator.device).tolist()
        rest = [rest[index] for index in order]
    return "" if dropped else ", ".join(kept + rest)


def tag_frequency(items: Iterable[ImageItem]) -> dict[str, dict[str, int]]:
    """Tag counts per dataset folder, in the layout of kohya's `ss_tag_frequency` metadata."""
    counts: dict[str, Counter[str]] = {}
    for item in items:
        counts.setdefault(item.path.parent.name, Counter()).update(split_tags(item.caption))
    return {folder: dict(tags) for folder, tags in counts.items()}

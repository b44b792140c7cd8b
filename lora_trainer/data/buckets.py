"""Aspect-ratio buckets (kohya-style): which sizes to train at, and fitting each image to its bucket."""

from __future__ import annotations

import math
from collections.abc import Sequence

from PIL import Image


def make_buckets(
    resolution: int, *, min_size: int = 256, max_size: int = 1024, step: int = 64
) -> list[tuple[int, int]]:
    """(width, height) buckets, multiples of step with area <= resolution**2, sorted from tall to wide."""
    if resolution < step or step < 1:
        raise ValueError(f"resolution {resolution} must be at least step {step}, and step at least 1")
    square = resolution // step * step
    # Clamp the side limits so small resolutions (tests, tiny models) still get the square and its neighbours.
    low = max(step, min(-(-min_size // step) * step, square))
    high = max(max_size // step * step, square)
    max_area = resolution * resolution
    buckets = {(square, square)}
    for width in range(low, high + 1, step):
        height = min(high, max_area // width // step * step)
        if height >= low:
            buckets.update({(width, height), (height, width)})
    return sorted(buckets, key=lambda size: (size[0] / size[1], size[0]))


def nearest_bucket(width: int, height: int, buckets: Sequence[tuple[int, int]]) -> tuple[int, int]:
    """The bucket whose aspect ratio is closest to width:height on a log scale; ties go to the larger one."""
    if width <= 0 or height <= 0 or not buckets:
        raise ValueError(f"need a positive image size and at least one bucket, got {width}x{height}, {len(buckets)}")
    ratio = math.log(width / height)
    return min(buckets, key=lambda size: (abs(math.log(size[0] / size[1]) - ratio), -size[0] * size[1]))


def resize_and_crop(image: Image.Image, size: tuple[int, int]) -> tuple[Image.Image, tuple[int, int]]:
    """Scale the image to cover size, center-crop to it, and return it with the crop's (top, left)."""
    target_width, target_height = size
    scale = max(target_width / image.width, target_height / image.height)
    scaled_size = (
        max(target_width, round(image.width * scale)),
        max(target_height, round(image.height * scale)),
    )
    if scaled_size != image.size:
        # reducing_gap first shrinks by an integer factor with Image.reduce, which keeps huge downsizes fast.
        image = image.resize(scaled_size, Image.Resampling.LANCZOS, reducing_gap=3.0)
    top = (scaled_size[1] - target_height) // 2
    left = (scaled_size[0] - target_width) // 2
    return image.crop((left, top, left + target_width, top + target_height)), (top, left)

"""A loss curve as a picture, drawn with Pillow (the hosts show it; no plotting library needed)."""

from __future__ import annotations

from PIL import Image, ImageDraw


def loss_plot(losses: list[tuple[int, float]], width: int = 512, height: int = 256) -> Image.Image:
    """The loss against the step, with the first and last values written in the corner."""
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    left, top, right, bottom = 48, 16, width - 12, height - 28
    draw.rectangle((left, top, right, bottom), outline=(160, 160, 160))
    if not losses:
        draw.text((left + 8, top + 8), "no loss recorded", fill="black")
        return image
    steps = [s for s, _ in losses]
    values = [v for _, v in losses]
    low, high = min(values), max(values)
    span = (high - low) or 1.0
    last = max(steps[-1], steps[0] + 1)

    def point(step: int, value: float) -> tuple[float, float]:
        x = left + (right - left) * (step - steps[0]) / (last - steps[0])
        return x, bottom - (bottom - top) * (value - low) / span

    draw.line([point(s, v) for s, v in losses] if len(losses) > 1 else [point(*losses[0])] * 2, fill=(30, 90, 200), width=2)
    draw.text((4, top), f"{high:.3f}", fill="black")
    draw.text((4, bottom - 10), f"{low:.3f}", fill="black")
    draw.text((left, bottom + 6), f"step {steps[0]}", fill="black")
    draw.text((right - 70, bottom + 6), f"step {steps[-1]}", fill="black")
    draw.text((left + 8, top + 4), f"loss {values[0]:.4f} -> {values[-1]:.4f}", fill="black")
    return image

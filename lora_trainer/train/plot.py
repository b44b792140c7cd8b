"""Pictures of a run, drawn with Pillow (the hosts show them; no plotting library needed): the loss curves, and
the grid of sample images, one row per step and one column per prompt."""

from __future__ import annotations

import textwrap
from pathlib import Path

from PIL import Image, ImageDraw

TRAINING = (30, 90, 200)
VALIDATION = (230, 120, 20)


def loss_plot(losses: list[tuple[int, float]], validation: list[tuple[int, float]] = (), width: int = 512,
              height: int = 256) -> Image.Image:
    """The training loss (blue) and the validation loss (orange dots and line) against the step, on one scale, with
    their first and last values written in the corner."""
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    left, top, right, bottom = 48, 16, width - 12, height - 28
    draw.rectangle((left, top, right, bottom), outline=(160, 160, 160))
    if not losses and not validation:
        draw.text((left + 8, top + 8), "no loss recorded", fill="black")
        return image
    points = [*losses, *validation]
    steps = [s for s, _ in points]
    values = [v for _, v in points]
    low, high = min(values), max(values)
    span = (high - low) or 1.0
    first, last = min(steps), max(max(steps), min(steps) + 1)

    def point(step: int, value: float) -> tuple[float, float]:
        x = left + (right - left) * (step - first) / (last - first)
        return x, bottom - (bottom - top) * (value - low) / span

    if losses:
        draw.line([point(s, v) for s, v in losses] if len(losses) > 1 else [point(*losses[0])] * 2, fill=TRAINING,
                  width=2)
        draw.text((left + 8, top + 4), f"training {losses[0][1]:.4f} -> {losses[-1][1]:.4f}", fill=TRAINING)
    if validation:
        if len(validation) > 1:
            draw.line([point(s, v) for s, v in validation], fill=VALIDATION, width=2)
        for s, v in validation:
            x, y = point(s, v)
            draw.ellipse((x - 3, y - 3, x + 3, y + 3), fill=VALIDATION)
        best = min(validation, key=lambda entry: entry[1])
        draw.text((left + 8, top + 18), f"validation {validation[0][1]:.4f} -> {validation[-1][1]:.4f} "
                                        f"(best {best[1]:.4f} at step {best[0]})", fill=VALIDATION)
    draw.text((4, top), f"{high:.3f}", fill="black")
    draw.text((4, bottom - 10), f"{low:.3f}", fill="black")
    draw.text((left, bottom + 6), f"step {first}", fill="black")
    draw.text((right - 70, bottom + 6), f"step {max(steps)}", fill="black")
    return image


def sample_grid(samples: list[tuple[int, str, str | Path]], cell: int = 160) -> Image.Image | None:
    """The sample images of a run as a grid: a row per step (the checkpoints), a column per prompt, each labelled;
    a cell is empty where that step has no image of that prompt. None without samples."""
    if not samples:
        return None
    steps = sorted({step for step, _, _ in samples})
    prompts = list(dict.fromkeys(prompt for _, prompt, _ in samples))
    label, header = 72, 44
    grid = Image.new("RGB", (label + cell * len(prompts), header + cell * len(steps)), "white")
    draw = ImageDraw.Draw(grid)
    for column, prompt in enumerate(prompts):
        text = "\n".join(textwrap.wrap(prompt or "(empty prompt)", width=max(8, cell // 7))[:3])
        draw.multiline_text((label + column * cell + 4, 2), text, fill="black", spacing=1)
    for row, step in enumerate(steps):
        draw.text((4, header + row * cell + cell // 2 - 6), f"step {step}", fill="black")
    for step, prompt, path in samples:
        try:
            with Image.open(path) as image:
                thumb = image.convert("RGB")
        except OSError:  # deleted since: its cell stays empty
            continue
        thumb.thumbnail((cell - 4, cell - 4))
        x = label + prompts.index(prompt) * cell + (cell - thumb.width) // 2
        y = header + steps.index(step) * cell + (cell - thumb.height) // 2
        grid.paste(thumb, (x, y))
    return grid

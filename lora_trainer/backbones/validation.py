"""The validation loss of an image LoRA: the training objective on the held-out images, at fixed times and noise.

Each held-out image is noised at times spread evenly over the training's own time distribution (quantiles of it,
interleaved between images so that together they cover it finely), at least PAIRS (image, time) pairs in all, with
noise drawn from generators seeded per batch. Two evaluations of the same LoRA are therefore bit-identical, and two
evaluations of different steps differ only because the LoRA changed: the training loss, with a new time and noise
every step, says little about that. The LoRA layers run in eval mode (no dropout) and nothing touches the run's own
random streams.
"""

from __future__ import annotations

import math

import torch

PAIRS = 4  # at least this many (image, time) pairs per evaluation: a single held-out image is measured at 4 times
SEED = 20_261_204  # the validation noise's own seed: the same whatever the run's seed, so runs compare too


def validation_batches(cache: list, batch_size: int) -> list[tuple[list[int], torch.Tensor]]:
    """The fixed validation batches of a run's cached images: (indices of held-out images of one bucket, the time
    quantile of each). Empty when nothing is held out."""
    held = [index for index, entry in enumerate(cache) if entry.item.held_out]
    if not held:
        return []
    per_image = math.ceil(PAIRS / len(held))
    by_bucket: dict = {}
    for k in range(per_image):
        for j, index in enumerate(held):
            quantile = (k + (j + 0.5) / len(held)) / per_image
            by_bucket.setdefault(cache[index].bucket, []).append((index, quantile))
    batches = []
    for pairs in by_bucket.values():
        for start in range(0, len(pairs), batch_size):
            chunk = pairs[start:start + batch_size]
            batches.append(([index for index, _ in chunk], torch.tensor([q for _, q in chunk])))
    return batches


def validation_loss(backbone) -> dict[str, float]:
    """{'validation_loss': the mean loss over every pair} of an image backbone's run as it is now; {} when nothing
    is held out. Uses the backbone's `batch` (with `times`) and `loss`, eagerly, under no_grad."""
    run = backbone.run
    batches = run.get("validation_batches")
    if batches is None:
        batches = run["validation_batches"] = validation_batches(run["cache"], run["config"].batch_size)
    if not batches:
        return {}
    modules = backbone.trained_modules()
    modes = [module.training for module in modules]
    total = torch.zeros((), dtype=torch.float64, device=run["device"])
    count = 0
    try:
        for module in modules:
            module.eval()
        with torch.no_grad(), run["accelerator"].autocast(), backbone.uncompiled():
            for number, (indices, quantiles) in enumerate(batches):
                gen = torch.Generator().manual_seed(SEED + number)
                device_gen = torch.Generator(device=run["device"]).manual_seed(SEED + number)
                inputs = backbone.batch(indices, gen, device_gen, times=quantiles)
                total += backbone.loss(modules[0], inputs).double() * len(indices)
                count += len(indices)
    finally:
        for module, mode in zip(modules, modes):
            module.train(mode)
    return {"validation_loss": float(total / count)}

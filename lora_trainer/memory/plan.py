"""The memory plan: a run's peak GPU memory predicted from its model's shapes before anything moves to the GPU, and
the levers `memory: auto` turns on so that it fits the free memory.

A run has two peaks. Encoding: the text encoders and the autoencoder go onto the GPU one at a time to cache the
captions and images. Training: the network's frozen weights as they are held (bf16, fp8, GGUF, NF4; streamed blocks
leave two buffers), the LoRA's weights, gradients and AdamW's two moments (16 bytes a weight, all fp32), and the
activations. Weights are counted from the modules; activations grow with the tokens a step sees (batch x image
tokens) at a rate measured per family on the H200 (README, "Low VRAM"), with and without gradient checkpointing.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field

import torch

from lora_trainer.config import TrainConfig
from lora_trainer.errors import ConfigError

log = logging.getLogger(__name__)

GIB = 2**30
# activations (GiB) of one step at 1024 px, batch 1, rank 16 on every linear layer, captured, without and with
# gradient checkpointing; the tokens that step saw and the model's `width`: measured peak minus weights and LoRA state
ACTIVATIONS = {
    "flux1": (38.75, 2.62, 4096 + 512, 802427),  # 62.2 GiB bf16 / 15.06 GiB fp8 + checkpointing
    "zimage": (37.2, 2.40, 4096 + 32, 457015),  # 49.4 / 8.87
    "klein": (17.9, 1.78, 4096 + 512, 299846),  # 25.5 / 5.94
    "sdxl": (8.14, 2.50, 128 * 128, 106320),  # 13.55 / 7.91 (kohya's 722 modules)
    # SD1.5 at 512 px, batch 4: 6.86 GiB captured; checkpointing at SDXL's ratio (not measured on SD1.5)
    "sd1": (5.16 / 4, 5.16 / 4 * 2.50 / 8.14, 64 * 64, 80484),
}
ACTIVATIONS["sd2"] = ACTIVATIONS["sd1"]
ENCODER_MARGIN = 0.055  # a text encoder's activations for 8 captions, of its weights (T5-XXL: 0.49 of 8.87 GiB)
RESERVE = 0.5 * GIB  # what the plan leaves free: CUDA's workspaces and the allocator's rounding


@dataclass
class MemoryParts:
    """What a backbone puts on the GPU, for the plan (`Backbone.memory_parts`)."""

    family: str  # ACTIVATIONS' key
    network: torch.nn.Module  # the trained network
    targets: list[str]  # its layers the LoRA wraps
    blocks: list[torch.nn.Module]  # what base_weights quantizes (its linear layers), in the order they run
    encoders: list[torch.nn.Module]  # on the GPU one at a time while the inputs are cached
    tokens: int  # image tokens (SD: latent pixels) plus text tokens of one example
    latent_bytes: int  # one cached image's latents on the GPU
    extra: list[torch.nn.Module] = field(default_factory=list)  # also on the GPU while training (SD's text encoders)
    extra_dtype: torch.dtype | None = None  # the dtype `extra` is held in there (None: as it is now)
    streams: bool = False  # whether stream_blocks applies
    resident: bool = False  # the network already sits on the GPU (a host's model): its weights cost nothing new
    host: bool = False  # a host's model: trained as the host holds it (no fp8, no streaming)
    stored: dict = field(default_factory=dict)  # how a quantized file holds weights (files.read_weights)
    sums: dict = field(default_factory=dict, repr=False)  # the weights' sums, once per way of holding them


@dataclass
class Estimate:
    """A predicted peak, in bytes, and what it is made of."""

    encoding: int
    weights: int
    lora: int
    activations: int
    caches: int

    @property
    def training(self) -> int:
        return self.weights + self.lora + self.activations + self.caches

    @property
    def peak(self) -> int:
        return max(self.encoding, self.training)

    def describe(self) -> str:
        return (f"{self.peak / GIB:.1f} GiB (training {self.training / GIB:.1f}: frozen weights {self.weights / GIB:.1f}, "
                f"LoRA and AdamW {self.lora / GIB:.2f}, activations {self.activations / GIB:.1f}; encoding "
                f"{self.encoding / GIB:.1f})")


def width(blocks: list[torch.nn.Module]) -> int:
    """What a model's activations per token grow with: the sum over its blocks of their width (the square root of a
    block's weights: a block of width d holds ~d^2 of them), so that a small model of a family is planned small."""
    return round(sum(sum(p.numel() for p in block.parameters()) ** 0.5 for block in blocks))


def _bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _linears(module: torch.nn.Module) -> list[torch.nn.Module]:
    return [m for m in module.modules() if isinstance(m, torch.nn.Linear)]


def held_bytes(module: torch.nn.Module, base_weights: str, stored: dict, dtype: torch.dtype) -> int:
    """A block's frozen weights as `hold_linears` will hold them: fp8 (a byte a weight and a float scale a row), NF4
    (half a byte and a float per 64), a GGUF file's own blocks, or in the training dtype."""
    size = torch.empty((), dtype=dtype).element_size()
    linear_weights = {id(m.weight) for m in _linears(module)}
    total = sum(p.numel() * size for p in [*module.parameters(), *module.buffers()]
                if id(p) not in linear_weights and p.is_floating_point())
    for layer in _linears(module):
        weight = layer.weight
        if not weight.is_floating_point() or type(layer) is not torch.nn.Linear:  # already held (fp8, GGUF)
            total += _bytes([weight])
            continue
        entry = stored.get(weight.untyped_storage().data_ptr()) if weight.device.type != "meta" else None
        how = base_weights if base_weights in ("fp8", "nf4", "full") else \
            "fp8" if isinstance(entry, torch.Tensor) else "nf4" if entry == "nf4" else \
            "packed" if entry is not None else "full"
        if how == "fp8":
            total += weight.numel() + 4 * weight.shape[0]
        elif how == "nf4":
            total += weight.numel() // 2 + 4 * (weight.numel() // 64)
        elif how == "packed":
            total += _bytes([entry.data])
        else:
            total += weight.numel() * size
    return total


def estimate(parts: MemoryParts, config: TrainConfig, images: int, dtype: torch.dtype = torch.bfloat16,
             budget: int | None = None) -> Estimate:
    """The peak of a run of `config` over `images` cached images (its levers as they are set); `budget`: the memory
    the run may use, which decides whether a text encoder runs with its layers on demand (`text_placement`)."""
    from lora_trainer.memory.streaming import picked

    quantized = config.base_weights in ("fp8", "nf4") or (config.base_weights == "auto" and bool(parts.stored))
    weights = 0
    if not parts.resident:
        how = config.base_weights if quantized else "full"
        if (how, dtype) not in parts.sums:
            block_ids = {id(p) for block in parts.blocks for p in [*block.parameters(), *block.buffers()]}
            size = torch.empty((), dtype=dtype).element_size()
            rest = [p for p in [*parts.network.parameters(), *parts.network.buffers()] if id(p) not in block_ids]
            parts.sums[how, dtype] = (sum(p.numel() * (size if p.is_floating_point() else p.element_size()) for p in rest),
                                      [held_bytes(block, how, parts.stored, dtype) for block in parts.blocks])
        weights, held = parts.sums[how, dtype]
        streamed = [held[i] for i in picked(len(held), config.stream_blocks)] if parts.streams else []
        weights += sum(held) - sum(streamed) + (2 * max(streamed) if streamed else 0)
        size = None if parts.extra_dtype is None else torch.empty((), dtype=parts.extra_dtype).element_size()
        weights += sum(_bytes(module.parameters()) if size is None else size * sum(p.numel() for p in module.parameters())
                       for module in parts.extra)
    if "lora" not in parts.sums:  # the LoRA's input and output sizes, whatever its rank
        sizes = [parts.network.get_submodule(name).weight.shape for name in parts.targets]
        parts.sums["lora"] = sum(shape[1] * (shape[2] * shape[3] if len(shape) == 4 else 1) + shape[0]
                                 for shape in sizes)
    lora = 16 * config.lora_rank * parts.sums["lora"]  # fp32 weight, gradient, AdamW's two moments
    no_checkpointing, checkpointing, tokens, wide = ACTIVATIONS.get(parts.family, ACTIVATIONS["sdxl"])
    per_token = (checkpointing if config.gradient_checkpointing else no_checkpointing) * GIB / tokens
    parts.sums.setdefault("width", width(parts.blocks))
    activations = int(per_token * parts.tokens * config.batch_size * parts.sums["width"] / wide)
    caches = images * parts.latent_bytes * (2 if config.flip_aug else 1)
    key = ("encoding", config.resolution, config.flip_aug, budget)
    if key not in parts.sums:  # the text encoders encode together, the autoencoder on its own
        texts = [e for e in parts.encoders if e is not None and not hasattr(e, "encode")]
        placed = text_placement(texts, None if budget is None else budget - caches)
        parts.sums[key] = max([sum(text_peak(e, on_demand) for e, on_demand in zip(texts, placed)),
                               *(_encoder_peak(e, config) for e in parts.encoders if hasattr(e, "encode"))])
    encoding = caches + parts.sums[key]
    return Estimate(encoding=encoding, weights=weights, lora=lora, activations=activations, caches=caches)


def _encoder_peak(autoencoder: torch.nn.Module, config: TrainConfig) -> int:
    """The autoencoder on the GPU at work: its weights and about four feature maps of its first width at the image's
    size, for the images it encodes at once."""
    weights = _bytes(autoencoder.parameters())
    size = next(autoencoder.parameters()).element_size()
    pixels = max(config.resolution**2, 4 * 512 * 512)  # it encodes 4 images of 512 px at once, 1 from 724 px
    channels = getattr(getattr(getattr(autoencoder, "encoder", None), "conv_in", None), "out_channels", 128)
    return weights + 4 * channels * pixels * size


def text_peak(encoder: torch.nn.Module, on_demand: bool = False) -> int:
    """A text encoder on the GPU at work: its weights (with its layers on demand: the rest of it and two layers) and
    its activations for 8 captions."""
    weights = _bytes(encoder.parameters())
    held = weights
    if on_demand:
        from lora_trainer.memory.streaming import layers_of

        layers = layers_of(encoder)
        held = weights - _bytes(layers.parameters()) + 2 * max(_bytes(layer.parameters()) for layer in layers)
    return int(held + weights * ENCODER_MARGIN)


def text_placement(encoders: list[torch.nn.Module], budget: int | None) -> list[bool]:
    """Which text encoders (on the GPU together while they encode) run with their layers on demand
    (`streaming.LayersOnDemand`): the largest first, until they fit `budget` bytes; none without a budget."""
    from lora_trainer.memory.streaming import layers_of

    on_demand = [False] * len(encoders)
    if budget is None:
        return on_demand
    for index in sorted(range(len(encoders)), key=lambda i: -_bytes(encoders[i].parameters())):
        if sum(text_peak(e, d) for e, d in zip(encoders, on_demand)) <= budget:
            break
        on_demand[index] = layers_of(encoders[index]) is not None
    return on_demand


def free_memory(device: torch.device) -> int:
    """What this process may still allocate on `device`: the GPU's free memory plus what torch holds unused, within
    the share of the GPU torch is allowed (`torch.cuda.set_per_process_memory_fraction`, as the bench's caps)."""
    device = torch.cuda.current_device() if device.index is None else device.index  # some calls want an index
    free, total = torch.cuda.mem_get_info(device)
    allocated = torch.cuda.memory_allocated(device)
    room = free + torch.cuda.memory_reserved(device) - allocated
    fraction = getattr(torch.cuda, "get_per_process_memory_fraction", None)
    return min(room, int(fraction(device) * total) - allocated) if fraction else room


def candidates(config: TrainConfig, parts: MemoryParts, in_host: bool) -> list[dict]:
    """The lever sets `memory: auto` tries, the fastest first, that only add to what the config turned on. Levers
    that keep the LoRA exact come first (checkpointing, then streaming), then fp8, which moves it a little."""
    sets: list[dict] = [{}, {"gradient_checkpointing": True}]
    if parts.streams and not in_host:
        sets.append({"gradient_checkpointing": True, "stream_blocks": "fit"})
    if config.base_weights == "auto" and not parts.stored and not in_host:
        sets.append({"gradient_checkpointing": True, "base_weights": "fp8"})
        if parts.streams:
            sets.append({"gradient_checkpointing": True, "base_weights": "fp8", "stream_blocks": "fit"})
    out = []
    for levers in sets:
        levers = {k: v for k, v in levers.items() if not (k == "gradient_checkpointing" and config.gradient_checkpointing)}
        if config.base_weights == "nf4" and "stream_blocks" in levers:
            continue
        out.append(levers)
    return out


def fit(config: TrainConfig, parts: MemoryParts, images: int, budget: int, in_host: bool = False,
        dtype: torch.dtype = torch.bfloat16) -> tuple[TrainConfig, Estimate, list[tuple[dict, Estimate]]]:
    """The config with the fastest lever set whose predicted peak fits `budget` bytes, its estimate, and every set
    tried with its estimate. Raises ConfigError when none fits."""
    tried = []
    for levers in candidates(config, parts, in_host):
        trial = _with(config, levers, parts, images, budget, dtype)
        result = estimate(parts, trial, images, dtype, budget)
        tried.append((_changes(config, trial), result))
        if result.peak <= budget:
            return trial, result, tried
    best = min(tried, key=lambda entry: entry[1].peak)
    raise ConfigError(
        f"This run does not fit the GPU: {budget / GIB:.1f} GiB are free, and with every memory lever it would need "
        f"{best[1].describe()}. Free GPU memory (close other programs using it), lower resolution or batch_size, "
        f"use fewer lora_targets or a lower lora_rank, or set memory: off to try anyway.")


def _with(config: TrainConfig, levers: dict, parts: MemoryParts, images: int, budget: int,
          dtype: torch.dtype) -> TrainConfig:
    """`config` with `levers`; stream_blocks 'fit': the fewest streamed blocks that fit `budget` (else all)."""
    values = {k: v for k, v in levers.items() if k != "stream_blocks"}
    trial = dataclasses.replace(config, **values)
    if levers.get("stream_blocks") == "fit":
        for count in range(max(1, config.stream_blocks), len(parts.blocks) + 1):
            trial = dataclasses.replace(trial, stream_blocks=count)
            if estimate(parts, trial, images, dtype, budget).peak <= budget:
                break
    return trial


def _changes(before: TrainConfig, after: TrainConfig) -> dict:
    return {key: getattr(after, key) for key in ("gradient_checkpointing", "base_weights", "stream_blocks")
            if getattr(after, key) != getattr(before, key)}


def describe_changes(changes: dict) -> str:
    return ", ".join(f"{key}: {str(value).lower() if isinstance(value, bool) else value}"
                     for key, value in changes.items()) or "no lever"


def plan_memory(config: TrainConfig, backbone, images: int, device: torch.device
                ) -> tuple[TrainConfig, Estimate | None, str]:
    """Before anything moves to the GPU: the run's predicted peak against the free memory, logged; with `memory:
    auto` the config with the levers that make it fit, and a sentence saying which it turned on ('' for none). A run
    that cannot fit is refused (ConfigError); on a host's model (already on its GPU), whose memory manager may still
    make room, it is only warned about. Nothing on a CPU, or for language models."""
    parts_of = getattr(backbone, "memory_parts", None)
    if parts_of is None or device.type != "cuda":
        return config, None, ""
    parts = parts_of(config)
    in_host = parts.host
    dtype = torch.float32 if config.mixed_precision == "no" else torch.bfloat16
    free = free_memory(device)
    budget = free - int(RESERVE)
    if config.memory == "off":
        planned = estimate(parts, config, images, dtype, budget)
        log.info("Memory plan: %s predicted, %.1f GiB free (memory: off changes nothing).", planned.describe(),
                 free / GIB)
        return config, planned, ""
    try:
        fitted, planned, _ = fit(config, parts, images, budget, in_host, dtype)
    except ConfigError as error:
        if not in_host:
            raise
        log.warning("%s", error)
        return config, None, str(error)
    changes = _changes(config, fitted)
    if not changes:
        log.info("Memory plan: %s predicted, %.1f GiB free.", planned.describe(), free / GIB)
        return fitted, planned, ""
    note = (f"memory: auto turned on {describe_changes(changes)}: without it the run would need more than the "
            f"{free / GIB:.1f} GiB free; now {planned.describe()}.")
    log.warning("%s", note)
    return fitted, planned, note


def report(config: TrainConfig, parts: MemoryParts, images: int, free: int | None) -> str:
    """What `plan` prints: the predicted peak of the config as it is and of each lever set `memory: auto` would try,
    and which one it picks for `free` bytes (None: no GPU here, every set shown)."""
    budget = (free - int(RESERVE)) if free is not None else None
    planned = estimate(parts, config, images, budget=budget)
    lines = [(f"Predicted peak GPU memory of this run ({images} images, {config.resolution} px, batch "
              f"{config.batch_size}, rank {config.lora_rank}, {len(parts.targets)} LoRA layers):"),
             f"  as configured: {planned.describe()}" + (" fits" if budget is not None and planned.peak <= budget else "")]
    picked_levers = None
    for levers in candidates(config, parts, in_host=parts.host):
        trial = _with(config, levers, parts, images, budget or 0, torch.bfloat16)
        result = estimate(parts, trial, images, budget=budget)
        fits = budget is not None and result.peak <= budget
        if fits and picked_levers is None:
            picked_levers = _changes(config, trial)
        changes = _changes(config, trial)
        if changes:
            lines.append(f"  with {describe_changes(changes)}: {result.describe()}" + (" fits" if fits else ""))
    if free is None:
        lines.append("No CUDA GPU here to compare with (on the command line, plan --vram-gib N plans for a card with N "
                     "GiB free).")
    else:
        lines.append(f"Free: {free / GIB:.1f} GiB ({RESERVE / GIB:.1f} kept for CUDA's workspaces). memory: auto "
                     + (f"trains with {describe_changes(picked_levers)}." if picked_levers is not None else
                        "refuses this run: nothing above fits."))
    return "\n".join(lines)

"""The training loop: data, model, LoRA, optimizer, then steps, saves and samples, in that order.

Every random draw of step m comes from generators seeded with (seed, m), and the data order of
epoch e from (seed, e), so a run resumed from a checkpoint continues exactly as if never stopped
(on the same kind of device: noise is drawn on the training device).
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.state import AcceleratorState

from lora_trainer.backbones.sd import DiffusionBackbone, family_of
from lora_trainer.config import TrainConfig, resolve, to_yaml
from lora_trainer.data import process_caption, scan_dataset, tag_frequency
from lora_trainer.data.cache import CachedImage, assign_buckets, encode_dataset
from lora_trainer.errors import CheckpointError, ConfigError, TrainingError
from lora_trainer.events import CancelToken, EventBus, Listener
from lora_trainer.lora.inject import add_lora, fill_lora, keep_lora_input_dtype, read_init_lora
from lora_trainer.lora.kohya import FAMILY_NAMES, lora_family, lora_modules, read_lora_file
from lora_trainer.train import state as checkpoints
from lora_trainer.train.graphs import CapturedStep, average_across_processes, graphs_wanted
from lora_trainer.train.optim import make_optimizer, make_scheduler

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    """What a finished (or stopped) run produced."""

    lora_file: Path | None
    output_dir: Path
    steps: int
    total_steps: int
    interrupted: bool = False
    losses: list[tuple[int, float]] = field(default_factory=list)
    samples: list[Path] = field(default_factory=list)
    metrics: dict = field(default_factory=dict)  # language models: held-out perplexity before/after


class LossLog:
    """Step losses summed on the device and read back every `log_every_n_steps` (the loop's only host sync):
    the mean goes into the result, a 'loss' event and TensorBoard; a NaN or inf stops the run."""

    def __init__(self, device: torch.device, config: TrainConfig, bus: EventBus, writer, result: TrainResult) -> None:
        self.total = torch.zeros((), device=device)
        self.count = 0
        self.tick = time.time()  # the start of the steps since the last read-back
        self.config, self.bus, self.writer, self.result = config, bus, writer, result

    def add(self, loss: torch.Tensor) -> None:
        self.total += loss.detach()
        self.count += 1

    def step_done(self, step: int, total_steps: int, epoch: int, lr: float, last: bool) -> None:
        """A 'progress' event for the optimizer step just taken; the read-back when it is due."""
        self.bus.emit("progress", step, total_steps, epoch=epoch, lr=lr, seconds=time.time() - self.tick,
                      loss=self.result.losses[-1][1] if self.result.losses else None)
        if step % self.config.log_every_n_steps == 0 or last:
            self.read(step, total_steps, lr)

    def read(self, step: int, total_steps: int, lr: float) -> None:
        mean_loss = (self.total / self.count).item()
        self.total.zero_()
        self.count = 0
        if not math.isfinite(mean_loss):
            raise TrainingError(f"The loss became {mean_loss} at step {step}. Lower learning_rate, or use "
                                "mixed_precision: bf16 / no; the last good save is kept.")
        self.result.losses.append((step, mean_loss))
        self.bus.emit("loss", step, total_steps, loss=mean_loss, lr=lr)
        if self.writer:
            self.writer.add_scalar("loss", mean_loss, step)
            self.writer.add_scalar("lr", lr, step)
            self.writer.add_scalar("it_per_s", self.config.log_every_n_steps / max(time.time() - self.tick, 1e-9), step)
        self.tick = time.time()


@contextlib.contextmanager
def stops_cleanly(result: TrainResult, bus: EventBus, cancel: CancelToken, save_interrupted: Callable[[], Path | None],
                  what: str, writer, cleanup: Callable[[], None] = lambda: None) -> Iterator[None]:
    """Around a training loop: Ctrl-C (or a cancel from the UI) saves a resumable checkpoint of the steps done and
    marks the run interrupted, where the caller returns `result`; the command line's Ctrl-C is raised again. Any
    other error becomes an 'error' event. The TensorBoard `writer` is closed and `cleanup` run on every way out."""
    try:
        yield
    except KeyboardInterrupt:
        if result.steps > 0:
            result.lora_file = save_interrupted()
            log.info("Stopped at step %d of %d; the %s so far is %s. Continue with: train --resume %s",
                     result.steps, result.total_steps, what, result.lora_file, result.output_dir)
        else:
            log.info("Stopped before the first step; nothing was saved.")
        result.interrupted = True
        bus.emit("done", result.steps, result.total_steps, interrupted=True, lora_file=str(result.lora_file))
        if not cancel.is_set():
            raise
    except Exception as exc:
        bus.emit("error", result.steps, result.total_steps, message=str(exc))
        raise
    finally:
        if writer:
            writer.close()
        cleanup()


def periodic_save_due(config: TrainConfig, plan: list, micro: int, step: int, epoch: int) -> bool:
    """Whether a resumable checkpoint is due after this step (save_every_n_steps/epochs; never at the very end,
    where the finished result is written instead)."""
    if micro >= len(plan):
        return False
    epoch_done = plan[micro][0] != epoch
    return bool((config.save_every_n_steps and step % config.save_every_n_steps == 0) or
                (epoch_done and config.save_every_n_epochs and (epoch + 1) % config.save_every_n_epochs == 0))


def _rng(seed: int, *stream: int) -> torch.Generator:
    """A CPU generator for one named stream of draws (epoch order, one step's noise, ...)."""
    value = seed
    for s in stream:
        value = (value * 1_000_003 + s + 1) % (2**63 - 1)
    return torch.Generator().manual_seed(value)


def plan_batches(cache: list[CachedImage], config: TrainConfig, epochs: int) -> list[tuple[int, list[int]]]:
    """(epoch, image indices) of every batch, bucket by bucket, in a seeded order per epoch."""
    plan = []
    for epoch in range(epochs):
        gen = _rng(config.seed, 1, epoch)
        pool = [i for i, entry in enumerate(cache) for _ in range(entry.item.repeats * config.repeats)]
        pool = [pool[j] for j in torch.randperm(len(pool), generator=gen).tolist()]
        by_bucket: dict[tuple[int, int], list[int]] = {}
        for index in pool:
            by_bucket.setdefault(cache[index].bucket, []).append(index)
        batches = [members[k:k + config.batch_size] for members in by_bucket.values()
                   for k in range(0, len(members), config.batch_size)]
        plan += [(epoch, batches[j]) for j in torch.randperm(len(batches), generator=gen).tolist()]
    return plan


def _mixed_precision(config: TrainConfig) -> str:
    """Resolve 'auto' precision for the device at hand."""
    if config.mixed_precision != "auto":
        return config.mixed_precision
    if config.device.startswith("cuda") or (config.device == "auto" and torch.cuda.is_available()):
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "no"


def _accelerator(config: TrainConfig, logging_dir: Path) -> Accelerator:
    """An Accelerator on the configured device, with the configured precision."""
    if config.device.startswith("cuda") and not torch.cuda.is_available():
        raise TrainingError("device: cuda was asked for, but torch sees no CUDA GPU. Use device: auto or cpu.")
    if config.device.startswith("cuda:"):
        index = int(config.device.split(":")[1])
        if index >= torch.cuda.device_count():
            raise TrainingError(f"device: {config.device} does not exist; this machine has {torch.cuda.device_count()} GPU(s).")
        torch.cuda.set_device(index)
    if config.device == "mps" and not torch.backends.mps.is_available():
        raise TrainingError("device: mps was asked for, but this torch has no Apple MPS support.")
    precision = _mixed_precision(config)
    if precision != "no" and config.device == "cpu":
        precision = "bf16" if precision == "bf16" else "no"
    # accelerate keeps its settings in a process-wide singleton; a host process runs many trainings with
    # different precisions, so each run starts from a clean one (the distributed set-up is kept).
    AcceleratorState._reset_state()
    return Accelerator(mixed_precision=precision, cpu=config.device == "cpu", project_dir=str(logging_dir))


def train_lora(config: TrainConfig, *, listeners: list[Listener] | tuple[Listener, ...] = (),
               cancel: CancelToken | None = None, backbone: DiffusionBackbone | None = None,
               resume: str | Path | None = None) -> TrainResult:
    """Train a LoRA as `config` says and write it as a kohya-format file; see TrainResult.

    `model_type: causal_lm` trains a peft LoRA on a language model instead (lora_trainer.text.train).
    """
    if config.model_type == "causal_lm":
        if backbone is not None:
            raise ConfigError("model_type: causal_lm trains a language model from base_model, not a host's image model.")
        from lora_trainer.text.train import train_causal_lm

        return train_causal_lm(config, listeners=listeners, cancel=cancel, resume=resume)
    bus = EventBus(listeners)
    cancel = cancel or CancelToken()
    started_at = time.time()

    # 1. config and data
    family = backbone.family if backbone else family_of(config.base_model, config.allow_pickle)
    config = resolve(config, family)
    out_dir = Path(config.output_dir)
    if config.init_lora:
        _check_init_lora_family(config.init_lora, family)
    scan = scan_dataset(config.train_data_dir, caption_extension=config.caption_extension,
                        missing_caption=config.missing_caption, trigger_word=config.trigger_word,
                        default_repeats=1)
    bus.emit("start", data_summary=scan.summary(), config=to_yaml(config))
    accelerator = _accelerator(config, out_dir / "logs")
    device = accelerator.device
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)

    # 2. model and cached inputs
    if backbone is None:
        backbone = DiffusionBackbone.from_file(config.base_model, family=config.family,
                                               prediction_type=config.prediction_type,
                                               allow_pickle=config.allow_pickle, clip_skip=config.clip_skip,
                                               max_token_length=config.max_token_length)
    if config.train_text_encoder and not backbone.text_encoders:
        raise ConfigError("This model's text encoder cannot be trained here (the host encodes captions itself); "
                          "set train_text_encoder: false.")
    init = None
    if config.init_lora:  # read and matched to this model's layers before the slow caching
        init = read_init_lora(config.init_lora, backbone.unet, backbone.text_encoders, family, config.lora_alpha)
        _check_init_lora_fits(config.init_lora, init, [backbone.unet, *backbone.text_encoders], family)
    if backbone.vae is not None:
        _place(backbone.vae, device, torch.float32)
    buckets = assign_buckets(scan.items, config.resolution, config.enable_buckets,
                             config.min_bucket_reso, config.max_bucket_reso)
    cache_file = out_dir / "cache" / "latents.safetensors" if config.cache_latents_to_disk else None
    # the VAE's activations, not the UNet, set the peak at large sizes: 4 images at 512 px, 1 at 768 px and up
    vae_batch = max(1, 4 * 512 * 512 // (config.resolution * config.resolution))
    cache = encode_dataset(scan.items, buckets, backbone.encode_images, flip=config.flip_aug, cache_file=cache_file,
                           batch_size=vae_batch, model_id=f"{config.base_model}|{_model_stamp(config.base_model)}",
                           on_progress=lambda done, total: bus.emit("progress", done, total, phase="caching"))
    if backbone.vae is not None:
        backbone.vae.to("cpu")
    for entry in cache:  # a few KiB per image: keep them on the GPU so steps never wait for copies
        entry.latents = entry.latents.to(device, weight_dtype)
        if entry.latents_flipped is not None:
            entry.latents_flipped = entry.latents_flipped.to(device, weight_dtype)
    for encoder in backbone.text_encoders:
        encoder.requires_grad_(False)
        _place(encoder, device, weight_dtype if config.train_text_encoder else torch.float32)
    backbone.unet.requires_grad_(False)
    _place(backbone.unet, device, weight_dtype)

    # 3. LoRA layers (their random initialisation comes from the seed too)
    torch.manual_seed(config.seed)
    unet_targets = sorted(set(backbone.unet_lora_targets(config.lora_targets)) | set(init[0] if init else ()))
    ranks = {name: parts["down"].shape[0] for name, parts in (init[0] if init else {}).items()}
    params = add_lora(backbone.unet, unet_targets, config.lora_rank, config.lora_alpha, config.lora_dropout, ranks)
    groups = [{"params": params, "lr": config.learning_rate}]
    te_train = config.train_text_encoder or bool(init and any(init[1:]))
    if te_train:
        te_params = []
        for index, encoder in enumerate(backbone.text_encoders):
            modules = init[index + 1] if init else {}
            targets = sorted(set(backbone.text_lora_targets(encoder)) | set(modules))
            te_params += add_lora(encoder, targets, config.lora_rank, config.lora_alpha, config.lora_dropout,
                                  {n: p["down"].shape[0] for n, p in modules.items()})
        groups.append({"params": te_params, "lr": config.text_encoder_lr})
    if init:
        for model, modules in zip([backbone.unet, *backbone.text_encoders], init):
            if modules:
                fill_lora(model, modules)
    for group in groups:
        for p in group["params"]:
            p.data = p.data.float()
    if weight_dtype != torch.float32 and device.type in ("cuda", "cpu"):  # where every forward runs under autocast
        keep_lora_input_dtype(backbone.unet, *backbone.text_encoders)
    if config.gradient_checkpointing:
        backbone.unet.enable_gradient_checkpointing()
        for encoder in backbone.text_encoders if te_train else ():
            encoder.gradient_checkpointing_enable()

    # 4. text conditioning: cached once unless captions change per step or the text encoder trains
    varying = config.shuffle_captions or config.caption_dropout > 0 or te_train
    text_cache: dict[str, dict[str, torch.Tensor]] = {}
    if not varying:
        with torch.no_grad():
            for caption in sorted({entry.item.caption for entry in cache}):
                text_cache[caption] = {k: v[0] for k, v in backbone.encode_prompts([caption]).items()}
        if not config.sample_prompts or not backbone.can_render:
            backbone.offload_encoders()

    # 5. plan, optimizer, schedule
    epochs = config.epochs
    plan = plan_batches(cache, config, epochs)
    accumulation = config.gradient_accumulation_steps
    if config.max_steps:
        epochs = max(epochs, math.ceil(config.max_steps * accumulation / max(len(plan) / epochs, 1)))
        plan = plan_batches(cache, config, epochs)[:config.max_steps * accumulation]
    total_steps = math.ceil(len(plan) / accumulation)
    trained = [backbone.unet] + (backbone.text_encoders if te_train else [])
    shapes = {(len(indices), tuple(cache[indices[0]].latents.shape)) for _, indices in plan}
    use_stepper, capture, why = graphs_wanted(config, device, num_processes=accelerator.num_processes,
                                              text_encoder_trained=te_train, mixed_precision=accelerator.mixed_precision,
                                              total_steps=total_steps, buckets=len(shapes))
    log.info("Training step: %s.", why)
    stepper = None
    if use_stepper:
        # several processes: no DDP wrapper, one all-reduce of the flat gradient inside the step instead
        models = trained if accelerator.num_processes > 1 else [accelerator.prepare(model) for model in trained]
        backbone.runner = models[0]
        step_unet = _compiled(models[0], config, device, total_steps / len(shapes))
        stepper = CapturedStep(lambda inputs: _step_loss(backbone, accelerator, inputs, step_unet), groups,
                               config.weight_decay, config.max_grad_norm, capture=capture,
                               reduce=average_across_processes(accelerator.num_processes),
                               loss_scale=accelerator.mixed_precision == "fp16")
        optimizer = stepper.optimizer
        # the schedule runs on a stand-in optimizer with float rates; each step copies them into the GPU tensors
        shadow = torch.optim.SGD([{"params": [torch.zeros(1, requires_grad=True)], "lr": g["lr"]} for g in groups])
        scheduler = make_scheduler(config.lr_scheduler, shadow, config.lr_warmup_steps, total_steps)
    else:
        optimizer = make_optimizer(config.optimizer, groups, config.weight_decay, device)
        scheduler = make_scheduler(config.lr_scheduler, optimizer, config.lr_warmup_steps, total_steps)
        prepared = accelerator.prepare(*trained, optimizer)
        models, optimizer = list(prepared[:-1]), prepared[-1]
        backbone.runner = models[0]
        step_unet = _compiled(models[0], config, device, total_steps / len(shapes))

    micro, step = 0, 0
    if resume:
        restored = checkpoints.load(resume, trained, optimizer, scheduler)
        micro, step = restored["micro"], restored["step"]
        log.info("Resumed from %s at step %d", resume, step)
    if stepper is not None:
        stepper.rebind_learning_rates()
        stepper.set_learning_rates(scheduler.get_last_lr())

    meta = {"started_at": started_at, "scan": scan, "tags": tag_frequency(scan.items), "buckets": buckets,
            "model_name": backbone.name, "total_steps": total_steps}
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.yaml").write_text(to_yaml(config), encoding="utf-8")
    writer = _tensorboard(out_dir / "logs") if accelerator.is_main_process else None
    result = TrainResult(None, out_dir, step, total_steps)

    def save(kind: str) -> Path | None:
        """A resumable checkpoint plus a usable LoRA file of this step (main process only); the LoRA's path.
        The 'final' one is the finished LoRA, and its checkpoint lets `train --resume` continue with more steps."""
        if not accelerator.is_main_process:
            return None
        # a Ctrl-C between the batches of one accumulated step resumes at that step's first batch
        done = min(step * accumulation, len(plan))
        epoch = plan[min(done, len(plan) - 1)][0] + (1 if done >= len(plan) else 0)
        folder, lora_path = checkpoints.save(out_dir, config, family, backbone, trained, optimizer, scheduler,
                                             micro=done, step=step, epoch=epoch, kind=kind, meta=meta)
        if kind == "final":
            lora_path = checkpoints.save_final(out_dir, config, family, backbone, trained, step, epochs, meta)
        bus.emit("saved", step, total_steps, path=str(lora_path), checkpoint=str(folder), what=kind)
        return lora_path

    # 6. the loop
    for model in models:
        model.train()
    losses = LossLog(device, config, bus, writer, result)
    device_gen = torch.Generator(device=device)
    bus.emit("progress", step, total_steps, phase="training")  # the steps start now: progress bars time from here

    def cleanup() -> None:
        backbone.runner = None

    with stops_cleanly(result, bus, cancel, lambda: save("interrupted"), "LoRA", writer, cleanup):
        while micro < len(plan):
            if cancel.is_set() and micro % accumulation == 0:
                raise KeyboardInterrupt
            epoch, indices = plan[micro]
            indices = indices[accelerator.process_index::accelerator.num_processes] or indices
            gen = _rng(config.seed, 2, micro)
            step_seed = int(torch.randint(0, 2**62, (1,), generator=gen))
            if config.lora_dropout:  # its masks come from the global generators (seeding them all costs ~0.6 ms)
                torch.manual_seed(step_seed)
            device_gen.manual_seed(step_seed + 1)  # noise and timesteps are drawn where they are used: no copies
            flips = torch.rand(len(indices), generator=gen) < 0.5
            latents = torch.stack([
                cache[i].latents_flipped if config.flip_aug and flip else cache[i].latents
                for i, flip in zip(indices, flips.tolist())])
            captions = [cache[i].item.caption for i in indices]
            noise = torch.randn(latents.shape, generator=device_gen, device=device, dtype=weight_dtype)
            if config.noise_offset:
                noise = noise + config.noise_offset * torch.randn(latents.shape[:2] + (1, 1), generator=device_gen,
                                                                  device=device, dtype=weight_dtype)
            timesteps = torch.randint(0, backbone.noise_scheduler.config.num_train_timesteps, (len(indices),),
                                      generator=device_gen, device=device)
            if varying:
                captions = [process_caption(c, shuffle=config.shuffle_captions, keep_tokens=config.keep_tokens,
                                            dropout=config.caption_dropout, generator=gen) for c in captions]
                with torch.set_grad_enabled(te_train), accelerator.autocast():
                    cond = backbone.encode_prompts(captions)
            else:
                cond = {k: torch.stack([text_cache[c][k] for c in captions]) for k in text_cache[captions[0]]}
            time_ids = torch.stack([cache[i].time_ids for i in indices]).to(device) if family == "sdxl" else None

            is_sync = (micro + 1) % accumulation == 0 or micro + 1 == len(plan)
            inputs = {"noisy": backbone.noise_scheduler.add_noise(latents, noise, timesteps), "timesteps": timesteps,
                      "target": backbone.target(latents, noise, timesteps),
                      **{f"cond_{k}": v for k, v in cond.items()}}
            if time_ids is not None:
                inputs["time_ids"] = time_ids
            if config.min_snr_gamma:
                snr = _snr(backbone.noise_scheduler.alphas_cumprod, timesteps)
                inputs["weight"] = torch.clamp(snr, max=config.min_snr_gamma) / \
                    (snr + 1 if backbone.prediction_type == "v_prediction" else snr)
            if stepper is not None:  # forward, backward, clip and update in one graph replay
                losses.add(stepper(inputs))
                micro += 1
                shadow.step()  # a no-op (no gradients); keeps the schedule's step order check quiet
                scheduler.step()
                stepper.set_learning_rates(scheduler.get_last_lr())
            else:
                loss = _step_loss(backbone, accelerator, inputs, step_unet)
                accelerator.backward(loss / accumulation)
                losses.add(loss)
                micro += 1
                if not is_sync:
                    continue
                if te_train and accelerator.num_processes > 1:
                    # the text encoders run outside accelerate's wrapper, so their gradients are averaged here
                    for p in groups[1]["params"]:
                        p.grad = accelerator.reduce(p.grad, reduction="mean")
                if config.max_grad_norm:
                    accelerator.clip_grad_norm_([p for g in groups for p in g["params"]], config.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            step += 1
            result.steps = step
            losses.step_done(step, total_steps, epoch, scheduler.get_last_lr()[0], last=micro == len(plan))
            if periodic_save_due(config, plan, micro, step, epoch):
                save("periodic")
            if config.sample_prompts and config.sample_every_n_steps and step % config.sample_every_n_steps == 0 \
                    and backbone.can_render:
                result.samples += _samples(backbone, config, step, out_dir, bus, writer, accelerator, models)
    if result.interrupted:
        return result

    # 7. the finished LoRA
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if config.sample_prompts and (not config.sample_every_n_steps or step % config.sample_every_n_steps) \
                and backbone.can_render:
            result.samples += _samples(backbone, config, step, out_dir, bus, writer=None, accelerator=accelerator, models=models)
        result.lora_file = save("final")
    bus.emit("done", step, total_steps, interrupted=False, lora_file=str(result.lora_file))
    return result


def _check_init_lora_family(path: str, family: str) -> None:
    """Refuse an init_lora that is missing, not a plain LoRA, or made for another model family than `family`."""
    try:
        tensors, metadata = read_lora_file(path)
        lora_modules(tensors)
    except CheckpointError as exc:
        raise CheckpointError(f"init_lora: {exc}") from None
    made_for = lora_family(tensors, metadata)
    if made_for and made_for != family:
        raise CheckpointError(f"init_lora {path} is a LoRA for {FAMILY_NAMES[made_for]} models, but the base model is "
                              f"an {FAMILY_NAMES[family]} model. Continue from a LoRA trained on {FAMILY_NAMES[family]}, "
                              f"or train on the {FAMILY_NAMES[made_for]} base model it was made for.")


def _check_init_lora_fits(path: str, init: list[dict[str, dict]], models: list[torch.nn.Module], family: str) -> None:
    """Refuse an init_lora whose weights do not have the shapes of this model's layers (a LoRA of another model)."""
    wrong, total = [], 0
    for model, modules in zip(models, init):
        for name, parts in modules.items():
            total += 1
            weight = model.get_submodule(name).weight  # Linear (out, in) or Conv2d (out, in, kh, kw)
            rank = parts["down"].shape[0]
            down, up = (rank, *weight.shape[1:]), (weight.shape[0], rank, *[1] * (weight.ndim - 2))
            found = tuple(parts["down"].shape), tuple(parts["up"].shape)
            if found != (down, up):
                wrong.append(f"{name}: lora_down {found[0]} and lora_up {found[1]} where this model needs {down} and {up}")
    if wrong:
        raise CheckpointError(f"init_lora {path} does not fit this {FAMILY_NAMES[family]} model: {len(wrong)} of its "
                              f"{total} modules have other shapes (e.g. {wrong[0]}). It was trained on another model "
                              "family or a model with other layer sizes; continue from a LoRA trained on this base model.")


def _compiled(unet: torch.nn.Module, config: TrainConfig, device: torch.device,
              steps_per_shape: float) -> torch.nn.Module | None:
    """The UNet through torch.compile for the training step when `torch_compile` asks for it and it can run here
    (None: the step calls the UNet as it is). Previews and text encoding keep the uncompiled UNet: their shapes
    would each cost a compile."""
    if not config.torch_compile:
        return None
    try:
        from torch.utils._triton import has_triton

        triton = has_triton()
    except ImportError:  # torch before 2.1
        triton = False
    if device.type != "cuda" or not triton:
        log.warning("torch_compile: true needs a CUDA GPU and Triton (pip install triton; on Windows "
                    "triton-windows); training without it.")
        return None
    log.info("Compiling the UNet for the training step: the first step of each bucket shape waits for it "
             "(minutes the first time, much less once torch's compile cache has it).")
    if steps_per_shape < 2000:  # H200, SD1.5: 170 s to compile, 17 ms saved a step; ~30 s from the cache
        log.warning("torch_compile: true on %.0f steps per bucket shape: compiling will likely take longer than it "
                    "saves (it pays off after a few thousand steps per shape).", steps_per_shape)
    return torch.compile(unet)


def _step_loss(backbone: DiffusionBackbone, accelerator: Accelerator, inputs: dict[str, torch.Tensor],
               unet: torch.nn.Module | None = None) -> torch.Tensor:
    """The step's loss from its prepared inputs: the same code eagerly and inside a captured CUDA graph."""
    cond = {k.removeprefix("cond_"): v for k, v in inputs.items() if k.startswith("cond_")}
    with accelerator.autocast():
        pred = backbone.predict(inputs["noisy"], inputs["timesteps"], cond, inputs.get("time_ids"), unet)
    loss = F.mse_loss(pred.float(), inputs["target"].float(), reduction="none").mean(dim=(1, 2, 3))
    if "weight" in inputs:
        loss = loss * inputs["weight"]
    return loss.mean()


def _snr(alphas_cumprod: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """Signal-to-noise ratio at each timestep, as diffusers' compute_snr gives it.

    Written out because importing diffusers.training_utils fails under the WebUI's transformers 4.30.
    """
    alphas = alphas_cumprod.to(timesteps.device)[timesteps].float()
    return alphas / (1 - alphas)


def _place(module: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> None:
    """Move a module, casting only when its dtype differs (a cast copies every weight)."""
    current = next(module.parameters()).dtype
    module.to(device) if current == dtype else module.to(device, dtype)


def _model_stamp(path: str) -> str:
    """Size and mtime of the base model file, part of the latent cache's key."""
    try:
        stat = Path(path).stat()
        return f"{stat.st_size}|{stat.st_mtime_ns}"
    except OSError:
        return ""


def _tensorboard(folder: Path):
    """A TensorBoard writer, or None (with a note) when tensorboard is not installed."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        log.warning("tensorboard is not installed: no loss curves will be written (pip install tensorboard).")
        return None
    return SummaryWriter(log_dir=str(folder))


def _samples(backbone: DiffusionBackbone, config: TrainConfig, step: int, out_dir: Path, bus: EventBus, writer,
             accelerator: Accelerator, models: list[torch.nn.Module]) -> list[Path]:
    """Render the sample prompts with the LoRA as it is now; PNG files, events and TensorBoard images."""
    folder = out_dir / "samples"
    folder.mkdir(parents=True, exist_ok=True)
    device = accelerator.device
    if backbone.vae is not None:
        backbone.vae.to(device)
    for encoder in backbone.text_encoders:
        encoder.to(device)
    pipe = backbone.sampling_pipeline()
    pipe.set_progress_bar_config(disable=True)
    size = config.resolution // 8 * 8
    paths = []
    for model in models:
        model.eval()
    with torch.no_grad(), accelerator.autocast():
        for index, prompt in enumerate(config.sample_prompts):
            generator = torch.Generator(device="cpu").manual_seed(config.seed + index)
            image = pipe(prompt, num_inference_steps=config.sample_steps, guidance_scale=config.sample_guidance_scale,
                         generator=generator, height=size, width=size).images[0]
            path = folder / f"step{step:08d}_{index:02d}.png"
            image.save(path)
            paths.append(path)
            bus.emit("sample", step, 0, path=str(path), prompt=prompt)
            if writer:
                import numpy as np

                writer.add_image(f"sample_{index}", np.asarray(image), step, dataformats="HWC")
    for model in models:
        model.train()
    if backbone.vae is not None:
        backbone.vae.to("cpu")
    return paths


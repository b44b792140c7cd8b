"""The training loop: the same for every model family, read top to bottom.

Set-up: the config resolved for the model's family, the data read, the model loaded, its inputs cached, the
LoRA added, the batches planned, the step made. Then for each step: inputs, loss, backward, update, log,
save, sample. The backbone (lora_trainer/backbones) answers every question that depends on the family.

Every random draw of step m comes from generators seeded with (seed, m), and the data order of epoch e from
(seed, e), so a run resumed from a checkpoint continues exactly as if never stopped (on the same kind of
device: noise is drawn on the training device).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import shutil
import time
from collections.abc import Callable, Hashable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState

from lora_trainer.atomic import replaced_atomically
from lora_trainer.backbones import backbone_class
from lora_trainer.config import TrainConfig, resolve, to_yaml
from lora_trainer.errors import ConfigError, TrainingError
from lora_trainer.events import CancelToken, EventBus, Listener
from lora_trainer.memory import with_fp8_compute
from lora_trainer.memory.levers import levers_off
from lora_trainer.memory.plan import plan_memory
from lora_trainer.train import state as checkpoints
from lora_trainer.train.step import make_step

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
    metrics: dict = field(default_factory=dict)  # held-out measures before/after (language models: perplexity)
    validation: list[tuple[int, float]] = field(default_factory=list)  # (step, validation loss) of every evaluation
    saved: list[tuple[int, float | None, Path]] = field(default_factory=list)  # (step, validation loss, LoRA) per save
    best: tuple[int, float, Path] | None = None  # the saved LoRA of the lowest validation loss
    last_file: Path | None = None  # with use_best: the last step's LoRA, when the best one took the LoRA's name
    stopped_early: bool = False  # early_stop ended the run at `steps`, before `total_steps`

    @property
    def best_summary(self) -> dict | None:
        """The best LoRA as the 'done' event and the job status tell it: step, validation_loss, path."""
        if self.best is None:
            return None
        return {"step": self.best[0], "validation_loss": self.best[1], "path": str(self.best[2])}


def train_lora(config: TrainConfig, *, listeners: list[Listener] | tuple[Listener, ...] = (),
               cancel: CancelToken | None = None, backbone=None, resume: str | Path | None = None) -> TrainResult:
    """Train a LoRA as `config` says on `backbone` (a host's loaded model) or on `config.base_model`; see
    TrainResult. The LoRA is written as its family's format: a kohya file for images, a peft folder for LMs."""
    bus = EventBus(listeners)
    cancel = cancel or CancelToken()
    started_at = time.time()

    # 1. the family's preset, the data, the model, its cached inputs
    kind, family = (type(backbone), backbone.family) if backbone is not None else backbone_class(config)
    if kind.model_type != config.model_type:
        raise ConfigError(f"model_type: {config.model_type} does not fit the model given ({kind.model_type}): a host "
                          "hands its loaded image model, language models train from base_model.")
    config = resolve(config, family)
    out_dir = Path(config.output_dir)
    data = kind.read_data(config)
    bus.emit("start", data_summary=data.summary(), config=to_yaml(config))
    accelerator = _accelerator(config, out_dir / "logs")
    device = accelerator.device
    config = with_fp8_compute(config, device)
    given_backbone = backbone is not None  # a host's loaded model
    if backbone is None:
        backbone = kind.load(config, data)
    config, planned, note = plan_memory(config, backbone, len(getattr(data, "items", ())), device)
    if note:  # the tab's status shows it (jobs.JobStatus.warning)
        bus.emit("warning", 0, 0, message=note)
    examples = backbone.prepare(config, data, accelerator, bus)
    config = backbone.settle(config)

    # 2. the LoRA (its random initialisation comes from the seed too), the plan of batches, the step
    torch.manual_seed(config.seed)
    groups = backbone.add_lora(config)
    epochs = config.epochs
    plan = plan_batches(examples, config, epochs)
    accumulation = config.gradient_accumulation_steps
    if config.max_steps:
        epochs = max(epochs, math.ceil(config.max_steps * accumulation / max(len(plan) / epochs, 1)))
        plan = plan_batches(examples, config, epochs)[:config.max_steps * accumulation]
    total_steps = math.ceil(len(plan) / accumulation)
    shapes = len({(len(indices), examples[indices[0]][0]) for _, indices in plan})
    step_fn = make_step(backbone, groups, config, accelerator, total_steps=total_steps, shapes=shapes,
                        network_fn=lambda network: _compiled(network, backbone, config, device, total_steps / shapes))
    micro, step = 0, 0
    if resume:
        restored = checkpoints.load(resume, backbone, step_fn.optimizer, step_fn.scheduler)
        micro, step = restored["micro"], restored["step"]
        step_fn.resumed()

    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.yaml").write_text(to_yaml(config), encoding="utf-8")
    writer = _tensorboard(out_dir / "logs") if accelerator.is_main_process else None
    result = TrainResult(None, out_dir, step, total_steps)
    if planned is not None:
        result.metrics["planned_peak_gib"] = round(planned.peak / 2**30, 2)
    meta = {"started_at": started_at, "total_steps": total_steps}
    watch = Overfitting(config.early_stop_patience)
    if resume:
        result.saved = [(s, v, Path(f)) for s, v, f in restored.get("validation", [])]
        for saved_step, value, _ in result.saved:
            if value is not None:
                watch.add(saved_step, value, None)
    last_eval: list = [None, {}]  # the step of the last evaluation and its measures

    def save(what: str) -> Path | None:
        """A resumable checkpoint plus a usable LoRA of this step (main process only); the LoRA's path.
        The 'final' one goes with the finished LoRA and lets `train --resume` continue with more steps."""
        if not accelerator.is_main_process:
            return None
        # a Ctrl-C between the batches of one accumulated step resumes at that step's first batch
        done = min(step * accumulation, len(plan))
        epoch = plan[min(done, len(plan) - 1)][0] + (1 if done >= len(plan) else 0)
        value = dict(result.validation).get(step)  # measured at this very step, for the LoRA saved here
        best = lowest([*result.saved, (step, value, None)])
        folder, lora_path = checkpoints.save(out_dir, config, backbone, step_fn.optimizer, step_fn.scheduler,
                                             micro=done, step=step, epoch=epoch, kind=what,
                                             meta={**meta, "step": step, "epoch": epoch, "validation_loss": value},
                                             keep_step=best[0] if best else None,
                                             validation=[(s, v, str(f)) for s, v, f in result.saved])
        outputs = {}
        if what == "final":
            outputs = backbone.export(out_dir / config.output_name, config,
                                      {**meta, "step": step, "epoch": epochs, "validation_loss": value})
            lora_path = outputs.pop("final")
        if lora_path is not None and what != "interrupted":
            result.saved.append((step, value, lora_path))
        bus.emit("saved", step, total_steps, path=str(lora_path), checkpoint=str(folder), what=what,
                 validation_loss=value)
        for other, path in outputs.items():  # e.g. a language model merged with its LoRA
            result.metrics[f"{other}_model"] = str(path)
            bus.emit("saved", step, total_steps, path=str(path), what=other)
        return lora_path

    def evaluate(when: str, training_loss: float | None = None) -> bool:
        """The backbone's held-out measures, into the result, the events, the log and TensorBoard; True when the run
        is overfitting (`training_loss`: the mean since the last evaluation) and early_stop is on."""
        values = backbone.evaluate()
        last_eval[:] = [step, values]
        if not values:
            return False
        if when != "step":
            result.metrics.update({f"{name}_{when}": value for name, value in values.items()})
        for name, value in values.items():
            log.info("Held-out %s at step %d: %.4f", name, step, value)
            if writer:
                writer.add_scalar(f"eval/{name}", value, step)
        value = values.get("validation_loss")
        message = None
        if value is not None:
            result.validation.append((step, value))
            if step > 0:
                message = watch.add(step, value, training_loss)
        bus.emit("eval", step, total_steps, when=when, **values)
        if message:
            message += (" Stopping here (early_stop)." if config.early_stop else
                        " Turn early_stop on to stop such a run there; the best LoRA is kept either way.")
            log.warning(message)
            bus.emit("warning", step, total_steps, message=message)
        return bool(message) and config.early_stop

    def sample(prompts: list[str], asked: bool = False) -> None:
        """`prompts` rendered with the LoRA as it is now: PNG files, events, TensorBoard images. Its random draws come
        from its own generators: the run goes on exactly as without it. `asked`: a Sample now (its own file names)."""
        folder = out_dir / "samples"
        folder.mkdir(parents=True, exist_ok=True)
        for index, (prompt, image) in enumerate(zip(prompts, backbone.sample(prompts, config))):
            path = folder / f"step{step:08d}_{index:02d}{'_asked' if asked else ''}.png"
            image.save(path)
            result.samples.append(path)
            bus.emit("sample", step, 0, path=str(path), prompt=prompt, index=index)
            if writer:
                import numpy as np

                writer.add_image(f"sample_{index}", np.asarray(image), step, dataformats="HWC")

    # 3. the loop
    sampling = bool(config.sample_prompts) and backbone.can_sample
    if step == 0:
        evaluate("before")
    for module in backbone.trained_modules():
        module.train()
    levers = functools.partial(levers_off, config, in_host=given_backbone)
    losses = LossLog(device, config, bus, writer, result, levers)
    device_gen = torch.Generator(device=device)
    bus.emit("progress", step, total_steps, phase="training")  # the steps start now: progress bars time from here
    with stops_cleanly(result, bus, cancel, lambda: save("interrupted"), writer, levers):
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
            inputs = backbone.batch(indices, gen, device_gen)
            sync = (micro + 1) % accumulation == 0 or micro + 1 == len(plan)
            losses.add(step_fn(inputs, sync))
            micro += 1
            if not sync:
                continue
            step += 1
            result.steps = step
            lr = step_fn.learning_rate()
            losses.step_done(step, total_steps, epoch, lr, last=micro == len(plan))
            if micro == len(plan):
                break  # the end: measured, sampled and saved below
            saving = periodic_save_due(config, plan, micro, step, epoch)
            asked = cancel.take("save")
            validating = validation_due(config, step, saving or asked)
            with losses.paused():
                if validating and _all_agree(evaluate("step", losses.since_last_call(step, total_steps, lr)),
                                             accelerator):
                    result.stopped_early = True
                    break
                if saving or asked:
                    save("requested" if asked else "periodic")  # asked for: the host publishes it too
                if sampling and (config.sample_every_n_steps and step % config.sample_every_n_steps == 0 or
                                 not config.sample_every_n_steps and saving) and accelerator.is_main_process:
                    sample(config.sample_prompts)
                if (prompts := cancel.take("sample")) is not None and backbone.can_sample and accelerator.is_main_process:
                    sample(prompts or config.sample_prompts or [backbone.run["cache"][0].item.caption], asked=True)
        accelerator.wait_for_everyone()
        if last_eval[0] != step:
            evaluate("after", losses.since_last_call(step, total_steps, step_fn.learning_rate()))
        else:  # measured at this very step already (an early stop)
            result.metrics.update({f"{name}_after": value for name, value in last_eval[1].items()})
    if result.interrupted:
        return result

    # 4. the finished LoRA (and the best one)
    if accelerator.is_main_process:
        if sampling:
            sample(config.sample_prompts)
        result.lora_file = save("final")
        _name_best(result, config, bus)
    bus.emit("done", step, total_steps, interrupted=False, lora_file=str(result.lora_file),
             best=result.best_summary, stopped_early=result.stopped_early, **result.metrics)
    return result


def _all_agree(stop: bool, accelerator: Accelerator) -> bool:
    """Whether any process of a multi-GPU run stops here (each judges its own training loss): all stop together."""
    if accelerator.num_processes == 1:
        return stop
    return bool(accelerator.reduce(torch.tensor(float(stop), device=accelerator.device), "max").item())


def validation_due(config: TrainConfig, step: int, saving: bool) -> bool:
    """Whether the validation loss is measured after this step: every validate_every_n_steps, else at each save."""
    return bool(step % config.validate_every_n_steps == 0) if config.validate_every_n_steps else saving


class Overfitting:
    """Watches the validation losses of a run: the best one, and whether the run is overfitting, which is when the
    validation loss has not improved on its best for `patience` evaluations while the training loss fell."""

    def __init__(self, patience: int) -> None:
        self.patience = patience
        self.best: tuple[int, float, float | None] | None = None  # step, validation loss, training loss then
        self.since = 0  # evaluations since the best
        self.said = False

    def add(self, step: int, value: float, training: float | None) -> str | None:
        """Record an evaluation; the overfitting message, the first time it applies."""
        if self.best is None or value < self.best[1]:
            self.best, self.since = (step, value, training), 0
            return None
        self.since += 1
        fell = training is None or self.best[2] is None or training < self.best[2]
        if self.since < self.patience or not fell or self.said:
            return None
        self.said = True
        return (f"The LoRA is overfitting: its validation loss has not improved for {self.since} evaluations "
                f"(best {self.best[1]:.4f} at step {self.best[0]}, now {value:.4f} at step {step}) while the training "
                "loss fell.")


def _name_best(result: TrainResult, config: TrainConfig, bus: EventBus) -> None:
    """The best saved LoRA into the result; with use_best, it becomes NAME.safetensors and the last NAME-last."""
    result.best = lowest([entry for entry in result.saved if entry[2].exists()])
    if result.best is None:
        return
    best_step, value, best_file = result.best
    log.info("Best LoRA: step %d, validation loss %.4f (%s)", best_step, value, best_file)
    if not config.use_best or best_file == result.lora_file:
        return
    last = result.lora_file.with_name(f"{config.output_name}-last{result.lora_file.suffix}")
    with replaced_atomically(last) as tmp:
        shutil.copyfile(result.lora_file, tmp)
    with replaced_atomically(result.lora_file) as tmp:
        shutil.copyfile(best_file, tmp)
    result.last_file = last
    result.best = (best_step, value, result.lora_file)
    message = (f"use_best: {result.lora_file.name} is now the LoRA of step {best_step} (validation loss {value:.4f}); "
               f"the last step's is {last.name}.")
    log.info(message)
    bus.emit("saved", result.steps, result.total_steps, path=str(last), what="last")


def lowest(saved: list[tuple[int, float | None, Path | None]]) -> tuple[int, float, Path | None] | None:
    """Of (step, validation loss, LoRA) entries, the one of the lowest loss (the first of equals); None when no entry
    has one."""
    return min((entry for entry in saved if entry[1] is not None), key=lambda entry: entry[1], default=None)


SLOWDOWN = 3.0  # steps this many times slower than the run's best stretch: the GPU's memory is spilling


class LossLog:
    """Step losses summed on the device and read back every `log_every_n_steps` (the loop's only host sync):
    the mean goes into the result, a 'loss' event and TensorBoard; a NaN or inf stops the run.

    Each read-back also times the steps since the last one (saves and previews left out, `paused`): when they have
    become SLOWDOWN times slower than the run's best stretch, the GPU is most likely out of memory and its driver
    lending system RAM (which turns a run 10-100x slower without an error), and a 'warning' event says so, once,
    with the `levers` still off."""

    def __init__(self, device: torch.device, config: TrainConfig, bus: EventBus, writer, result: TrainResult,
                 levers: Callable[[], list[str]] = list, watch_spill: bool | None = None) -> None:
        self.total = torch.zeros((), device=device)
        self.count = 0
        self.steps = 0  # optimizer steps since the last read-back
        self.tick = time.time()  # the start of the steps since the last read-back
        self.paused_for = 0.0  # seconds since then spent saving and previewing
        self.best: float | None = None  # the fastest seconds a step over a stretch so far (the first one left out)
        self.stretches = 0
        self.warned = False
        # only a CUDA GPU spills (elsewhere a slower stretch is a busy machine); None: as the device says
        self.watch_spill = device.type == "cuda" if watch_spill is None else watch_spill
        self.window_start = 0  # the step of the last `since_last_call`
        self.config, self.bus, self.writer, self.result, self.levers = config, bus, writer, result, levers

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Time spent here (saving, previews) is not the steps' time."""
        start = time.time()
        try:
            yield
        finally:
            self.paused_for += time.time() - start

    def add(self, loss: torch.Tensor) -> None:
        self.total += loss.detach()
        self.count += 1

    def since_last_call(self, step: int, total_steps: int, lr: float) -> float | None:
        """The mean training loss of the steps since the last call (the steps not read back yet are read now): what
        the training loss was between two validations, steadier than one read-back."""
        if self.count:
            self.read(step, total_steps, lr)
        window = [loss for s, loss in self.result.losses if s > self.window_start]
        self.window_start = step
        return sum(window) / len(window) if window else None

    def step_done(self, step: int, total_steps: int, epoch: int, lr: float, last: bool) -> None:
        """A 'progress' event for the optimizer step just taken; the read-back when it is due."""
        self.steps += 1
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
        per_step = max(time.time() - self.tick - self.paused_for, 1e-9) / max(self.steps, 1)
        if self.writer:
            self.writer.add_scalar("loss", mean_loss, step)
            self.writer.add_scalar("lr", lr, step)
            self.writer.add_scalar("it_per_s", 1 / per_step, step)
        self.watch_speed(step, total_steps, per_step)
        self.tick, self.paused_for, self.steps = time.time(), 0.0, 0

    def watch_speed(self, step: int, total_steps: int, per_step: float) -> None:
        """The spill warning (see the class); the first stretch (capture, compile, warm caches) sets no pace. Only on a
        CUDA GPU: elsewhere a slower stretch is the machine being busy, not memory spilling."""
        self.stretches += 1
        if self.stretches == 1 or not self.watch_spill:
            return
        if self.best is not None and per_step > SLOWDOWN * self.best and not self.warned:
            self.warned = True
            levers = self.levers()
            message = (f"Training slowed down {per_step / self.best:.0f}x at step {step} ({per_step:.2f} s a step "
                       f"against {self.best:.2f} s before). The GPU is most likely out of memory and its driver is "
                       "lending system RAM (on Windows: NVIDIA's 'CUDA - Sysmem Fallback Policy'). Free the GPU of other "
                       "programs" + (", or turn on " + "; or ".join(levers) if levers else "") + ". Setting that policy "
                       "to 'Prefer No Sysmem Fallback' makes such a run stop with an out-of-memory message instead.")
            log.warning(message)
            self.bus.emit("warning", step, total_steps, message=message)
        self.best = per_step if self.best is None else min(self.best, per_step)


@contextlib.contextmanager
def stops_cleanly(result: TrainResult, bus: EventBus, cancel: CancelToken, save_interrupted: Callable[[], Path | None],
                  writer, levers: Callable[[], list[str]] = list) -> Iterator[None]:
    """Around a training loop: Ctrl-C (or a cancel from the UI) saves a resumable checkpoint of the steps done and
    marks the run interrupted, where the caller returns `result`; the command line's Ctrl-C is raised again. Running
    out of GPU memory saves the steps done too and becomes a TrainingError naming the `levers` still off. Any
    other error becomes an 'error' event. The TensorBoard `writer` is closed on every way out."""
    try:
        yield
    except KeyboardInterrupt:
        if result.steps > 0:
            result.lora_file = save_interrupted()
            log.info("Stopped at step %d of %d; the LoRA so far is %s. Continue with: train --resume %s",
                     result.steps, result.total_steps, result.lora_file, result.output_dir)
        else:
            log.info("Stopped before the first step; nothing was saved.")
        result.interrupted = True
        bus.emit("done", result.steps, result.total_steps, interrupted=True, lora_file=str(result.lora_file))
        if not cancel.is_set():
            raise
    except torch.cuda.OutOfMemoryError as exc:  # torch.OutOfMemoryError since 2.5, the same class
        message = _out_of_memory(result, save_interrupted, levers())
        log.error("%s (%s)", message, str(exc).splitlines()[0])
        bus.emit("error", result.steps, result.total_steps, message=message)
        raise TrainingError(message) from exc
    except Exception as exc:
        bus.emit("error", result.steps, result.total_steps, message=str(exc))
        raise
    finally:
        if writer:
            writer.close()


def _out_of_memory(result: TrainResult, save_interrupted: Callable[[], Path | None], levers: list[str]) -> str:
    """What to tell the user when the GPU ran out of memory mid-run, after saving the steps done (which needs the
    memory the failed step held: handed back first). The LoRA's weights are those after the last whole step."""
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    kept = ""
    if result.steps > 0:
        try:
            result.lora_file = save_interrupted()
            kept = (f" The {result.steps} steps done are saved ({result.lora_file}); after turning a lever on, "
                    f"continue with train --resume {result.output_dir}.")
        except Exception as exc:  # noqa: BLE001 - the periodic checkpoints on disk are still there
            kept = f" Saving the steps done failed too ({exc}); the last periodic checkpoint in {result.output_dir} is kept."
    fix = ("Turn on " + "; or ".join(levers) + ".") if levers else \
        "Every memory lever is already on: free the GPU of other programs, or train on a GPU with more memory."
    return f"Out of GPU memory at step {result.steps + 1} of {result.total_steps}.{kept} {fix}"


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


def plan_batches(examples: list[tuple[Hashable, int]], config: TrainConfig, epochs: int) -> list[tuple[int, list[int]]]:
    """(epoch, example indices) of every batch, in a seeded order per epoch. `examples` gives each example's
    group (only examples of one group share a batch: an image bucket, a token length) and its repeats."""
    plan = []
    for epoch in range(epochs):
        gen = _rng(config.seed, 1, epoch)
        pool = [i for i, (_, repeats) in enumerate(examples) for _ in range(repeats)]
        pool = [pool[j] for j in torch.randperm(len(pool), generator=gen).tolist()]
        by_bucket: dict[Hashable, list[int]] = {}
        for index in pool:
            by_bucket.setdefault(examples[index][0], []).append(index)
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


def _compiled(network: torch.nn.Module, backbone, config: TrainConfig, device: torch.device,
              steps_per_shape: float) -> torch.nn.Module:
    """The network through torch.compile for the training step (`backbone.compiled`) when `torch_compile` asks for
    it and it can run here, else as it is: 'auto' compiles when the backbone's compile pays back within the run's
    steps per bucket shape. Previews and text encoding keep the uncompiled network: their shapes would each cost a
    compile."""
    asked = config.torch_compile == "on"
    if config.torch_compile == "off":
        return network
    if not backbone.can_compile:
        if asked:
            log.warning("torch_compile is not used for %s models; training without it.", backbone.family)
        return network
    try:
        from torch.utils._triton import has_triton

        triton = has_triton()
    except ImportError:  # torch before 2.1
        triton = False
    if device.type != "cuda" or not triton:
        (log.warning if asked else log.info)(
            "torch_compile: %s needs a CUDA GPU and Triton (pip install triton; on Windows triton-windows); training "
            "without it.", config.torch_compile)
        return network
    if steps_per_shape < backbone.compile_pays_after:
        if not asked:
            log.info("torch_compile: auto leaves the network uncompiled: %.0f steps per bucket shape are too few to "
                     "pay back compiling (%s: %d).", steps_per_shape, backbone.family, backbone.compile_pays_after)
            return network
        log.warning("torch_compile: on with %.0f steps per bucket shape: compiling will likely take longer than it "
                    "saves (for %s it pays off after about %d steps per shape).", steps_per_shape, backbone.family,
                    backbone.compile_pays_after)
    log.info("Compiling the network for the training step: the first step of each bucket shape waits for it.")
    return backbone.compiled(network)


def _tensorboard(folder: Path):
    """A TensorBoard writer, or None (with a note) when tensorboard is not installed."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        log.warning("tensorboard is not installed: no loss curves will be written (pip install tensorboard).")
        return None
    return SummaryWriter(log_dir=str(folder))

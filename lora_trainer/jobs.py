"""One training job at a time, run in a background thread, watched by the UI and the HTTP API alike.

A host (the standalone app, the WebUI) supplies how to train (its backbone, its locks, its progress bar)
and where a finished LoRA goes; `Trainer` owns the job's life: checks the config before anything starts,
refuses a second job while one runs, turns engine events into a status anyone can poll, and publishes the
LoRA (under `NAME-stepN` when interrupted, so a partial result never takes the finished name).
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

from lora_trainer.config import TrainConfig, lora_name, make_config, renamed_note, step_name
from lora_trainer.errors import DatasetError, LoraTrainerError
from lora_trainer.events import CancelToken, Event, Listener

log = logging.getLogger(__name__)


class BusyError(LoraTrainerError):
    """A job is already running."""


class Host(Protocol):
    """What a front door provides to the Trainer."""

    def prepare(self, values: dict[str, Any]) -> dict[str, Any]:
        """Fill host-chosen keys (base model, output folder, precision) into the form's values (named already)."""

    def run(self, config: TrainConfig, listeners: list[Listener], cancel: CancelToken, job_id: str = ""):
        """Train (taking the host's locks) and return the engine's TrainResult."""

    def publish(self, lora_file: Path, name: str) -> Path:
        """Put a finished LoRA where the host's LoRA loader finds it; its new path."""

    def lora_dir(self) -> Path:
        """The folder the host's LoRA loader reads."""


@dataclass
class JobStatus:
    """Everything a UI or an API client shows of a job; `as_dict` is the API's JSON."""

    id: str
    name: str
    state: str = "starting"  # starting, waiting, caching, training, saving, done, interrupted, error
    step: int = 0
    total: int = 0
    phase_done: int = 0
    phase_total: int = 0
    losses: list[tuple[int, float]] = field(default_factory=list)
    validation: list[tuple[int, float]] = field(default_factory=list)  # (step, validation loss)
    best: dict | None = None  # the saved LoRA of the lowest validation loss so far: step, validation_loss, path
    learning_rate: float | None = None
    steps_per_second: float | None = None
    eta_seconds: float | None = None
    samples: list[str] = field(default_factory=list)
    sample_grid: list[tuple[int, str, str]] = field(default_factory=list)  # (step, prompt, image path) per sample
    saved: list[str] = field(default_factory=list)
    lora_file: str | None = None
    last_file: str | None = None  # after "use best": the last step's LoRA, NAME-last
    message: str = ""
    notice: str = ""  # what the job changed in what the user typed (a name that would have left its folder)
    warning: str = ""  # what the run noticed going wrong while it goes on (steps slowed down: memory spilling)
    data_summary: str = ""
    started_at: float = field(default_factory=time.time)
    finished_at: float | None = None

    @property
    def running(self) -> bool:
        return self.finished_at is None

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["losses"] = [list(pair) for pair in self.losses]
        out["validation"] = [list(pair) for pair in self.validation]
        out["sample_grid"] = [list(entry) for entry in self.sample_grid]
        out["running"] = self.running
        return out


class Trainer:
    """Starts, watches and stops training jobs for one host, one at a time."""

    def __init__(self, host: Host) -> None:
        self.host = host
        self.job: JobStatus | None = None
        self._cancel = CancelToken()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._train_started = 0.0

    def start(self, values: dict[str, Any]) -> JobStatus:
        """Check `values` (form or API config) and start training in the background.

        Raises ConfigError with the key's name for a bad value, DatasetError for a missing, empty or unusable
        image folder, and BusyError while a job runs; in every case nothing has been started.
        """
        with self._lock:
            if self.job is not None and self.job.running:
                raise BusyError(f"A training job is already running ({self.job.name}, step {self.job.step} of "
                                f"{self.job.total}). Interrupt it or wait for it to finish.")
            config, typed = self._config(values)
            if config.model_type == "image":
                check_images(config)
            self._cancel = CancelToken()
            self.job = JobStatus(id=uuid.uuid4().hex[:12], name=config.output_name,
                                 notice=renamed_note(typed, config.output_name) if typed else "")
            if self.job.notice:
                log.warning("LoRA Train: %s", self.job.notice)
            self._thread = threading.Thread(target=self._run, args=(self.job, config, self._cancel),
                                            name="lora_trainer-job", daemon=True)
            self._thread.start()
            return self.job

    def memory_plan(self, values: dict[str, Any]) -> str:
        """The memory plan of a run of `values` on the host's model (`plan` on the command line), as text; raises
        LoraTrainerError for bad values or a host that cannot plan."""
        plan = getattr(self.host, "memory_plan", None)
        if plan is None:
            raise LoraTrainerError("This front door has no memory plan yet: run `python -m lora_trainer plan --config "
                                   "...` on the command line.")
        return plan(self._config(values)[0])

    def _config(self, values: dict[str, Any]) -> tuple[TrainConfig, str]:
        """The config of form or API `values` as the host completes it, and the LoRA name as typed."""
        values = {k: v for k, v in values.items() if v is not None}
        typed = str(values.get("output_name", "")).strip()
        # named before the host derives folders from the name
        values["output_name"] = lora_name(typed, values.get("train_data_dir", ""))
        return make_config(self.host.prepare(values)), typed

    def interrupt(self) -> bool:
        """Ask the running job to save what it has and stop; False when nothing runs."""
        if self.job is None or not self.job.running:
            return False
        self.job.message = "Stopping after the current step; the LoRA so far will be saved."
        self._cancel.set()
        return True

    def save_now(self) -> bool:
        """Ask the running job for a checkpoint and its LoRA now, between two steps (also put into the host's LoRA
        folder as NAME-stepN); False when nothing is training."""
        if self.job is None or not self.job.running:
            return False
        self._cancel.ask("save")
        self.job.message = "Saving after the current step."
        return True

    def sample_now(self, prompt: str = "") -> bool:
        """Ask the running job for previews now, with the LoRA as it is: of `prompt`, else the run's sample prompts,
        else the first image's caption. The run goes on exactly as without them. False when nothing is training."""
        if self.job is None or not self.job.running:
            return False
        self._cancel.ask("sample", [prompt.strip()] if prompt.strip() else None)
        self.job.message = "Rendering a preview after the current step."
        return True

    def use_best(self) -> str:
        """Make the finished job's best checkpoint its LoRA: NAME in the host's LoRA folder becomes the best step's
        LoRA, and the one it replaces NAME-last. Returns what was done; raises LoraTrainerError when it cannot."""
        job = self.job
        if job is None or job.running or not job.lora_file:
            raise LoraTrainerError("Use best works on a finished training: wait for the job to end.")
        if job.best is None:
            raise LoraTrainerError("This training measured no validation loss: give a validation share or folder "
                                   "(validation_split, validation_dir) to know its best checkpoint.")
        if job.last_file:
            return f"{Path(job.lora_file).name} is already the best LoRA (step {job.best['step']}); the last is " \
                   f"{Path(job.last_file).name}."
        best = Path(job.best["path"])
        if best.resolve() == Path(job.lora_file).resolve() or job.best["step"] == job.step:
            return f"The last step ({job.best['step']}) is the best one: {Path(job.lora_file).name} stays."
        if not best.is_file():
            raise LoraTrainerError(f"The best LoRA {best} is gone (deleted or moved): nothing was changed.")
        last = self.host.publish(Path(job.lora_file), f"{job.name}-last")
        job.lora_file = str(self.host.publish(best, job.name))
        job.last_file = str(last)
        job.message = (f"{Path(job.lora_file).name} is now the LoRA of step {job.best['step']} (validation loss "
                       f"{job.best['validation_loss']:.4f}); the last step's is {last.name}.")
        return job.message

    def wait(self, timeout: float | None = None) -> JobStatus | None:
        """Block until the current job ends (for scripts and tests)."""
        if self._thread is not None:
            self._thread.join(timeout)
        return self.job

    def results(self) -> list[dict[str, Any]]:
        """The LoRA files in the host's LoRA folder, newest first."""
        folder = self.host.lora_dir()
        found = []
        for path in folder.glob("*.safetensors") if folder.is_dir() else ():
            try:
                stat = path.stat()
            except OSError:  # deleted or replaced between listing and reading
                continue
            found.append({"name": path.stem, "file": str(path), "size": stat.st_size, "modified": stat.st_mtime,
                          "prompt": f"<lora:{path.stem}:0.8>"})
        return sorted(found, key=lambda entry: entry["modified"], reverse=True)

    # the job's thread

    def _run(self, job: JobStatus, config: TrainConfig, cancel: CancelToken) -> None:
        try:
            job.state = "waiting"
            job.message = "Waiting for the model."
            result = self.host.run(config, [lambda event: self._on_event(job, event)], cancel, job_id=job.id)
            if result.lora_file is None:
                job.state = "interrupted" if result.interrupted else "error"
                job.message = "Stopped before the first step; nothing was saved." if result.interrupted \
                    else "Training ended without a LoRA."
                return
            job.state = "saving"
            name = job.name if not result.interrupted else step_name(job.name, result.steps)
            if result.last_file is not None:  # use_best: the best took the name; the last keeps its own
                job.last_file = str(self.host.publish(Path(result.last_file), f"{job.name}-last"))
            job.lora_file = str(self.host.publish(Path(result.lora_file), name))
            if result.best is not None:
                job.best = result.best_summary
            job.state = "interrupted" if result.interrupted else "done"
            job.message = (f"Interrupted at step {result.steps} of {result.total_steps}; the LoRA so far is "
                           f"{Path(job.lora_file).name}. " if result.interrupted else
                           f"Done: {Path(job.lora_file).name} after {result.steps} steps"
                           f"{' (stopped early: it was overfitting)' if result.stopped_early else ''}. ") + \
                f"Use it as `<lora:{Path(job.lora_file).stem}:0.8>`." + _best_line(job)
        except LoraTrainerError as exc:
            job.state, job.message = "error", str(exc)
            log.error("LoRA training failed: %s", exc)
        except Exception as exc:  # shown in the UI and the API; the traceback goes to the log
            job.state, job.message = "error", f"{type(exc).__name__}: {exc}"
            log.exception("LoRA training failed")
        finally:
            _release_memory()  # the run's modules sit in reference cycles: give the GPU back to the host now
            job.finished_at = time.time()

    def _on_event(self, job: JobStatus, event: Event) -> None:
        data = event.data
        if event.kind == "start":
            job.data_summary = data.get("data_summary", "")
        elif event.kind == "progress" and data.get("phase") == "caching":
            job.state, job.phase_done, job.phase_total = "caching", event.step, event.total
            job.message = f"Encoding images {event.step}/{event.total}"
        elif event.kind == "progress":
            if job.state != "training":
                job.state, self._train_started = "training", time.time() - data.get("seconds", 0.0)
            job.step, job.total = event.step, event.total
            job.learning_rate = data.get("lr")
            elapsed = time.time() - self._train_started
            if event.step > 1 and elapsed > 0:
                job.steps_per_second = event.step / elapsed
                job.eta_seconds = (event.total - event.step) / job.steps_per_second
            if job.message.startswith(("Waiting", "Encoding")):  # the status's first line has the step from here
                job.message = ""
        elif event.kind == "loss":
            job.losses.append((event.step, float(data["loss"])))
        elif event.kind == "eval" and data.get("validation_loss") is not None:
            job.validation.append((event.step, float(data["validation_loss"])))
        elif event.kind == "sample":
            job.samples.append(str(data["path"]))
            job.sample_grid.append((event.step, str(data.get("prompt", "")), str(data["path"])))
            if str(data["path"]).endswith("_asked.png"):  # a Sample now; beside a Save now's answer of the same step
                saved = job.message.split(" Preview of")[0] if job.message.startswith(f"Saved step {event.step} ") else ""
                job.message = f"{saved} Preview of step {event.step} rendered: see Samples.".strip()
        elif event.kind == "saved":
            job.saved.append(str(data["path"]))
            value = data.get("validation_loss")
            if value is not None and data.get("what") != "interrupted" and \
                    (job.best is None or value < job.best["validation_loss"]):
                job.best = {"step": event.step, "validation_loss": float(value), "path": str(data["path"])}
            if data.get("what") == "requested":
                self._publish_requested(job, Path(data["path"]), event.step)
        elif event.kind == "warning":
            job.warning = str(data["message"])


    def _publish_requested(self, job: JobStatus, lora_file: Path, step: int) -> None:
        """A LoRA saved on request goes into the host's LoRA folder as NAME-stepN at once (a plain atomic copy: the
        host's own refresh, which takes its locks, is for finished LoRAs)."""
        from lora_trainer.lora.kohya import publish_lora

        try:
            target = publish_lora(lora_file, self.host.lora_dir(), step_name(job.name, step))
        except LoraTrainerError as exc:
            job.message = f"Saved {lora_file}, but not into the LoRA folder: {exc}"
            return
        job.message = f"Saved step {step} as {target.name}: use it as `<lora:{target.stem}:0.8>`."


def _best_line(job: JobStatus) -> str:
    """The status's sentence on the best checkpoint, when the run measured one."""
    if job.best is None:
        return ""
    if job.last_file:
        return f" It is the best checkpoint, step {job.best['step']}; the last step's is {Path(job.last_file).name}."
    if job.best["step"] == job.step:
        return f" The last step is the best one (validation loss {job.best['validation_loss']:.4f})."
    return (f" The best checkpoint is step {job.best['step']} (validation loss {job.best['validation_loss']:.4f}): "
            "**Use best** makes it the LoRA.")


class _OtherThreadsOnly(logging.Filter):
    """Drops the records of the thread that made it: the run logs the same findings again when it starts."""

    def __init__(self) -> None:
        super().__init__()
        self.thread = threading.get_ident()

    def filter(self, record: logging.LogRecord) -> bool:
        return record.thread != self.thread


def check_images(config: TrainConfig) -> None:
    """Refuse a missing, empty or wholly unusable image or validation folder before a job is accepted (DatasetError)."""
    from lora_trainer.data import scan_images

    if not config.train_data_dir.strip():
        raise DatasetError("Give the folder that holds your training images (train_data_dir).")
    quiet = _OtherThreadsOnly()
    logger = logging.getLogger("lora_trainer.data.images")
    logger.addFilter(quiet)
    try:
        scan_images(config)  # the validation folder or share too
    finally:
        logger.removeFilter(quiet)


def _release_memory() -> None:
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def describe(job: JobStatus | None) -> str:
    """A status line for people: state, step, loss, speed, ETA."""
    if job is None:
        return "No training job yet."
    parts = [f"**{job.name}**: {job.state}"]
    if job.total:
        parts.append(f"step {job.step}/{job.total}")
    if job.losses:
        parts.append(f"loss {job.losses[-1][1]:.4f}")
    if job.validation:
        parts.append(f"validation loss {job.validation[-1][1]:.4f}")
    if job.steps_per_second:
        parts.append(f"{job.steps_per_second:.2f} it/s")
    if job.eta_seconds is not None and job.running and job.state == "training":
        parts.append(f"ETA {_clock(job.eta_seconds)}")
    line = " · ".join(parts)
    for extra in (job.message, job.notice, job.warning):
        line += f"\n\n{extra}" if extra else ""
    return line


def _clock(seconds: float) -> str:
    seconds = round(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}" if seconds >= 3600 else \
        f"{seconds // 60}:{seconds % 60:02d}"

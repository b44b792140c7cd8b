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
    learning_rate: float | None = None
    steps_per_second: float | None = None
    eta_seconds: float | None = None
    samples: list[str] = field(default_factory=list)
    saved: list[str] = field(default_factory=list)
    lora_file: str | None = None
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
            job.lora_file = str(self.host.publish(Path(result.lora_file), name))
            job.state = "interrupted" if result.interrupted else "done"
            job.message = (f"Interrupted at step {result.steps} of {result.total_steps}; the LoRA so far is "
                           f"{Path(job.lora_file).name}. " if result.interrupted else
                           f"Done: {Path(job.lora_file).name} after {result.steps} steps. ") + \
                f"Use it as `<lora:{Path(job.lora_file).stem}:0.8>`."
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
            if not job.message.startswith("Stopping"):
                job.message = f"Step {event.step}/{event.total}"
        elif event.kind == "loss":
            job.losses.append((event.step, float(data["loss"])))
        elif event.kind == "sample":
            job.samples.append(str(data["path"]))
        elif event.kind == "saved":
            job.saved.append(str(data["path"]))
        elif event.kind == "warning":
            job.warning = str(data["message"])


class _OtherThreadsOnly(logging.Filter):
    """Drops the records of the thread that made it: the run logs the same findings again when it starts."""

    def __init__(self) -> None:
        super().__init__()
        self.thread = threading.get_ident()

    def filter(self, record: logging.LogRecord) -> bool:
        return record.thread != self.thread


def check_images(config: TrainConfig) -> None:
    """Refuse a missing, empty or wholly unusable image folder before a job is accepted (DatasetError)."""
    from lora_trainer.data import scan_dataset

    if not config.train_data_dir.strip():
        raise DatasetError("Give the folder that holds your training images (train_data_dir).")
    quiet = _OtherThreadsOnly()
    logger = logging.getLogger("lora_trainer.data.images")
    logger.addFilter(quiet)
    try:
        scan_dataset(config.train_data_dir, caption_extension=config.caption_extension,
                     missing_caption=config.missing_caption, trigger_word=config.trigger_word)
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

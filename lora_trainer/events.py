"""What a training run tells the outside world: events to listeners, and a token to stop it."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger(__name__)


@dataclass
class Event:
    """One thing that happened: kind is 'start', 'progress', 'loss', 'sample', 'saved', 'done' or 'error'."""

    kind: str
    step: int = 0
    total: int = 0
    data: dict[str, Any] = field(default_factory=dict)


Listener = Callable[[Event], None]


class EventBus:
    """Hands every event to each listener; a failing listener is logged, never fatal to training."""

    def __init__(self, listeners: list[Listener] | tuple[Listener, ...] = ()) -> None:
        self.listeners = list(listeners)

    def emit(self, kind: str, step: int = 0, total: int = 0, **data: Any) -> None:
        """Publish one event."""
        event = Event(kind, step, total, data)
        for listener in self.listeners:
            try:
                listener(event)
            except Exception:  # a broken progress bar must not kill a two-hour run
                log.exception("A training listener failed on a %s event", kind)


class CancelToken(threading.Event):
    """Set it (from any thread) and the run saves a resumable state and stops after the current step.

    It also carries what a user asks of a running job from another thread (`ask`), which the run answers between two
    steps (`take`): 'save' (a checkpoint and its LoRA now) and 'sample' (previews now, of the prompts given, else the
    run's sample prompts)."""

    def __init__(self) -> None:
        super().__init__()
        self._asked: dict[str, Any] = {}
        self._lock = threading.Lock()

    def ask(self, what: str, value: Any = None) -> None:
        """Ask the run for `what` ('save' or 'sample'; for 'sample', `value` is a list of prompts or None)."""
        if what not in ("save", "sample"):
            raise ValueError(f"A run can be asked to save or sample, not {what!r}.")
        with self._lock:
            self._asked[what] = value

    def take(self, what: str) -> Any:
        """What was asked for `what` since the last take, and forget it: None when nothing was (a 'sample' asked
        without prompts gives [])."""
        with self._lock:
            if what not in self._asked:
                return None
            value = self._asked.pop(what)
        return [] if value is None and what == "sample" else value if value is not None else True

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
    """Set it (from any thread) and the run saves a resumable state and stops after the current step."""

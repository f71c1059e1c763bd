"""The event bus: how jobs, exports and the block layer tell the monitors what happened.

Producers call ``emit("BLOCK_JOB_COMPLETED", {...})``; every subscriber (each QMP session)
receives the event with its timestamp, in emission order. Subscribers must not block: a QMP
session queues the event for its own writer.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Event:
    """One QMP event: its name, its data, and when it happened (QMP's timestamp)."""

    name: str
    data: dict[str, Any] = field(default_factory=dict)
    seconds: int = 0
    microseconds: int = 0

    def to_qmp(self) -> dict[str, Any]:
        message: dict[str, Any] = {"event": self.name}
        if self.data:
            message["data"] = self.data
        message["timestamp"] = {"seconds": self.seconds, "microseconds": self.microseconds}
        return message


Subscriber = Callable[[Event], None]


class EventBus:
    """Fan-out of events to subscribers; emission order is delivery order."""

    def __init__(self) -> None:
        self._subscribers: list[Subscriber] = []
        self._lock = threading.Lock()

    def subscribe(self, subscriber: Subscriber) -> Callable[[], None]:
        """Adds a subscriber; returns the function that removes it."""
        with self._lock:
            self._subscribers.append(subscriber)

        def unsubscribe() -> None:
            with self._lock:
                if subscriber in self._subscribers:
                    self._subscribers.remove(subscriber)

        return unsubscribe

    def emit(self, name: str, data: dict[str, Any] | None = None) -> Event:
        """Timestamps the event and delivers it to every subscriber, in order."""
        now = time.time_ns() // 1000
        event = Event(name, dict(data or {}), now // 1_000_000, now % 1_000_000)
        # Holding the lock while delivering keeps the order identical for every subscriber.
        with self._lock:
            for subscriber in list(self._subscribers):
                try:
                    subscriber(event)
                except Exception:  # a broken subscriber must not stop the others
                    log.exception("event subscriber failed on %s", name)
        return event

"""Helpers the job and copy-before-write tests share: an event recorder, and one polling
helper with a deadline (the only way these tests wait for a state another thread reaches)."""

from __future__ import annotations

import threading
from typing import Any

from pyfleece.events import Event, EventBus
from tests.support import wait_until  # noqa: F401  (re-exported for the job tests)


class Recorder:
    """Subscribes to a bus and keeps every event, in order."""

    def __init__(self, bus: EventBus) -> None:
        self.events: list[Event] = []
        self._cond = threading.Condition()
        bus.subscribe(self._add)

    def _add(self, event: Event) -> None:
        with self._cond:
            self.events.append(event)
            self._cond.notify_all()

    def wait_for(self, name: str, timeout: float = 10.0, **data: Any) -> Event:
        """Waits for an event with this name (and these data members) and returns it."""

        def found() -> Event | None:
            for event in self.events:
                if event.name == name and all(event.data.get(k) == v for k, v in data.items()):
                    return event
            return None

        with self._cond:
            if not self._cond.wait_for(lambda: found() is not None, timeout):
                raise AssertionError(f"no {name} {data} event; got {self.summary()}")
            event = found()
            assert event is not None
            return event

    def summary(self) -> list[str]:
        """Events as short strings: a JOB_STATUS_CHANGE is its status, others their name."""
        with self._cond:
            return [
                e.data["status"] if e.name == "JOB_STATUS_CHANGE" else e.name for e in self.events
            ]

    def named(self, name: str) -> list[dict[str, Any]]:
        with self._cond:
            return [e.data for e in self.events if e.name == name]

"""Fixtures the job and copy-before-write unit tests share: an event bus, a recorder of its
events, and a job manager that is always shut down."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from pyfleece.events import EventBus
from pyfleece.jobs.manager import JobManager
from tests.jobaids import Recorder


@pytest.fixture
def bus() -> EventBus:
    return EventBus()


@pytest.fixture
def rec(bus: EventBus) -> Recorder:
    return Recorder(bus)


@pytest.fixture
def jobs(bus: EventBus) -> Iterator[JobManager]:
    manager = JobManager(bus, verb_timeout=10)
    yield manager
    manager.shutdown(timeout=10)

"""Fixtures shared by the whole suite: finding the peer tools, scratch directories."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def require_tool(name: str) -> str:
    """The path of a peer tool; in CI a missing tool fails the test instead of skipping."""
    path = shutil.which(name)
    if path is None:
        message = f"peer tool '{name}' is not installed (run 'make test' to install it)"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)
    return path


def require_module(name: str) -> object:
    """Imports a peer's Python module (python3-libnbd's ``nbd``); in CI a missing one fails
    instead of skipping."""
    import importlib

    try:
        return importlib.import_module(name)
    except ImportError:
        message = f"Python module '{name}' is missing (run 'make test' to install it)"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)


@pytest.fixture
def qemu_img() -> str:
    return require_tool("qemu-img")


@pytest.fixture
def qemu_io() -> str:
    return require_tool("qemu-io")


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    return tmp_path

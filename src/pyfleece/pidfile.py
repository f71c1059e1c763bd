"""Pidfiles, written once a server is ready, as QEMU's tools write them.

The pid is written to a temporary name and renamed into place, so a reader polling for the
file never sees it empty or partial: when it exists, the server is serving.
"""

from __future__ import annotations

import contextlib
import os


def write_pidfile(path: str) -> None:
    """Writes this process's pid to ``path`` atomically.

    Raises:
        OSError: the file cannot be written (nothing is left behind).
    """
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        with open(tmp, "w") as f:
            f.write(f"{os.getpid()}\n")
        os.replace(tmp, path)
    except OSError:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def remove_pidfile(path: str) -> None:
    """Removes the pidfile at exit; one already gone is fine."""
    with contextlib.suppress(OSError):
        os.unlink(path)

"""Helpers the integration tests share: waiting with a deadline, daemons with pidfiles,
running peer tools.

Nothing here sleeps to synchronise: ``wait_until`` polls a condition until a deadline, which
is the one place the suite waits for another process to become ready.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

PYFLEECE = [sys.executable, "-m", "pyfleece"]


class Timeout(AssertionError):
    pass


def wait_until(condition: Callable[[], bool], timeout: float = 10.0, what: str = "") -> None:
    """Polls ``condition`` until it holds; fails the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    delay = 0.0005
    while not condition():
        if time.monotonic() > deadline:
            raise Timeout(f"timed out after {timeout} s waiting for {what or condition}")
        time.sleep(delay)  # polling interval, not synchronisation: the condition decides
        delay = min(delay * 2, 0.02)


@contextmanager
def running(
    argv: Sequence[str],
    pidfile: Path,
    *,
    timeout: float = 20.0,
    cwd: Path | None = None,
    env: dict[str, str] | None = None,
) -> Iterator[subprocess.Popen[bytes]]:
    """Starts a server that writes ``pidfile`` once ready; always stops it afterwards.

    Fails early (with the server's stderr) if the process exits before it is ready.
    """
    log = (pidfile.parent / (pidfile.name + ".log")).open("wb")
    proc = subprocess.Popen(
        list(argv), stdout=log, stderr=subprocess.STDOUT, cwd=cwd, env=env,
        start_new_session=True,
    )  # fmt: skip

    def ready() -> bool:
        if proc.poll() is not None:
            log.flush()
            output = (pidfile.parent / (pidfile.name + ".log")).read_text(errors="replace")
            raise AssertionError(f"{argv[0]} exited with {proc.returncode}:\n{output}")
        return pidfile.exists() and pidfile.read_text().strip() != ""

    try:
        wait_until(ready, timeout, f"{' '.join(argv[:4])} to write {pidfile}")
        yield proc
    finally:
        stop(proc)
        log.close()


def stop(proc: subprocess.Popen[bytes], grace: float = 10.0) -> None:
    """Terminates, waits, then kills."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)


def run(argv: Sequence[str], *, check: bool = True, timeout: float = 60.0,
        cwd: Path | None = None) -> subprocess.CompletedProcess[str]:  # fmt: skip
    """Runs a command, capturing text output; failures show the output."""
    result = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout, cwd=cwd)
    if check and result.returncode != 0:
        raise AssertionError(
            f"{' '.join(map(str, argv))} exited with {result.returncode}\n"
            f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
        )
    return result


def qemu_io(target: str, *commands: str, fmt: str = "raw", read_only: bool = False,
            check: bool = True) -> subprocess.CompletedProcess[str]:  # fmt: skip
    """Runs qemu-io commands against an image or NBD URI; pattern mismatches fail."""
    argv = ["qemu-io", "-f", fmt]
    if read_only:
        argv.append("-r")
    for command in commands:
        argv += ["-c", command]
    result = run([*argv, target], check=check)
    if check and ("verification failed" in result.stdout or "error" in result.stdout.lower()):
        raise AssertionError(f"qemu-io {commands} on {target}:\n{result.stdout}")
    return result

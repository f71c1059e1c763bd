"""Real NBD servers for the client's integration tests: qemu-nbd, nbdkit and
qemu-storage-daemon started as child processes, ready when their pid file (and socket)
exists, and always stopped; plus x509 certificates made with the openssl CLI."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from tests.conftest import require_tool

READY_TIMEOUT = 15.0


def wait_until(
    ready: Callable[[], bool], what: str, proc: subprocess.Popen[bytes], log: Path
) -> None:
    """Polls ``ready`` until it holds; fails if ``proc`` dies or the deadline passes. Between
    polls it waits on the process itself, so a crash is noticed at once."""
    deadline = time.monotonic() + READY_TIMEOUT
    while not ready():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not ready after {READY_TIMEOUT} s: {log.read_text()}")
        try:
            proc.wait(timeout=0.02)
        except subprocess.TimeoutExpired:
            continue
        raise RuntimeError(f"{what} exited with {proc.returncode}: {log.read_text()}")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@contextlib.contextmanager
def daemon(args: list[str], pid_file: Path, sock: Path | None = None) -> Iterator[int]:
    """Runs a server until the block ends: ready once ``pid_file`` is written (and ``sock``
    exists); then terminated, waited for, killed if it lingers. Its stderr goes to
    ``<pid_file>.log``."""
    log = pid_file.with_suffix(".log")
    with open(log, "wb") as err:
        proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=err, stderr=err)
    try:

        def ready() -> bool:
            written = pid_file.exists() and pid_file.stat().st_size > 0
            return written and (sock is None or sock.exists())

        wait_until(ready, args[0], proc, log)
        yield proc.pid
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


Server = contextlib.AbstractContextManager[int]


def qemu_nbd(tmp: Path, image: Path, *extra: str, fmt: str = "raw") -> Server:
    """qemu-nbd serving ``image`` on ``tmp/qemu-nbd.sock`` (persistent, several clients)."""
    tool = require_tool("qemu-nbd")
    sock, pid = tmp / "qemu-nbd.sock", tmp / "qemu-nbd.pid"
    args = [tool, "-t", "-e", "4", "-f", fmt, "--pid-file", str(pid)]
    if not any(a in ("-b", "--bind", "-p", "--port") for a in extra):
        args += ["-k", str(sock)]
        return daemon([*args, *extra, str(image)], pid, sock)
    return daemon([*args, *extra, str(image)], pid)


def nbdkit(tmp: Path, *plugin: str, name: str = "nbdkit") -> Server:
    """nbdkit in the foreground on ``tmp/<name>.sock`` with the given plugin arguments."""
    tool = require_tool("nbdkit")
    sock, pid = tmp / f"{name}.sock", tmp / f"{name}.pid"
    return daemon([tool, "-f", "-U", str(sock), "-P", str(pid), *plugin], pid, sock)


def unix_uri(sock: Path, export: str = "", *, tls: str | None = None) -> str:
    if tls is None:
        return f"nbd+unix:///{export}?socket={sock}"
    return f"nbds+unix:///{export}?socket={sock}&tls-certificates={tls}"


def run(*args: str) -> str:
    """Runs a peer tool; its stdout, or an AssertionError carrying its stderr."""
    done = subprocess.run(args, capture_output=True, text=True, timeout=60, check=False)
    if done.returncode != 0:
        raise AssertionError(f"{args[0]} failed ({done.returncode}): {done.stderr.strip()}")
    return done.stdout


def make_certs(root: Path) -> dict[str, Path]:
    """A CA, a server certificate (localhost, 127.0.0.1) and a client certificate, in QEMU's
    directory layout: ``server/``, ``client/`` (with its certificate), ``anonymous/`` (the CA
    only) and ``stranger/`` (a client trusting another CA)."""
    openssl = require_tool("openssl")
    root.mkdir(parents=True, exist_ok=True)

    def sh(*args: str) -> None:
        run(openssl, *args)

    def ca(name: str) -> tuple[Path, Path]:
        key, cert = root / f"{name}-key.pem", root / f"{name}-cert.pem"
        sh("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out",
           str(cert), "-days", "2", "-subj", f"/CN={name}",
           "-addext", "basicConstraints=critical,CA:TRUE",
           "-addext", "keyUsage=critical,keyCertSign,cRLSign")  # fmt: skip
        return key, cert

    ca_key, ca_cert = ca("ca")
    _, other_ca = ca("other-ca")
    dirs = {d: root / d for d in ("server", "client", "anonymous", "stranger")}
    for d in dirs.values():
        d.mkdir(exist_ok=True)
    for role, usage, san in (
        ("server", "serverAuth", "DNS:localhost,IP:127.0.0.1,IP:::1"),
        ("client", "clientAuth", "DNS:client"),
    ):
        key, csr = dirs[role] / f"{role}-key.pem", root / f"{role}.csr"
        ext = root / f"{role}.ext"
        ext.write_text(
            "basicConstraints=critical,CA:FALSE\n"
            "keyUsage=critical,digitalSignature,keyEncipherment\n"
            f"extendedKeyUsage={usage}\nsubjectAltName={san}\n"
        )
        sh("req", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(csr),
           "-subj", f"/CN={role}")  # fmt: skip
        sh("x509", "-req", "-in", str(csr), "-CA", str(ca_cert), "-CAkey", str(ca_key),
           "-CAcreateserial", "-days", "2", "-extfile", str(ext),
           "-out", str(dirs[role] / f"{role}-cert.pem"))  # fmt: skip
    for d in ("server", "client", "anonymous"):
        (dirs[d] / "ca-cert.pem").write_bytes(ca_cert.read_bytes())
    (dirs["stranger"] / "ca-cert.pem").write_bytes(other_ca.read_bytes())
    for name in ("client-cert.pem", "client-key.pem"):
        (dirs["stranger"] / name).write_bytes((dirs["client"] / name).read_bytes())
    os.chmod(dirs["server"] / "server-key.pem", 0o600)
    return dirs

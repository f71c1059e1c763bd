"""Test aids for the NBD server: a raw-socket client that sends what real clients will not,
an in-process server fixture, and helpers to run ``pyfleece nbd`` as a child process.

The raw client speaks through ``pyfleece.nbd.proto`` for layouts but decides nothing: tests
choose every byte, and read every byte the server sends back.
"""

from __future__ import annotations

import os
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from pyfleece.block.node import Node
from pyfleece.nbd import proto
from pyfleece.nbd.server import NbdServer
from tests.conftest import require_module  # noqa: F401  (re-exported for the NBD tests)

SRC = str(Path(__file__).resolve().parent.parent / "src")
TIMEOUT = 10.0


def wait_for(cond: Callable[[], bool], what: str, timeout: float = TIMEOUT) -> None:
    """Polls ``cond`` until true; fails the test after ``timeout`` seconds (the one place
    tests wait on something they cannot be notified of, such as another process)."""
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


@dataclass
class Chunk:
    """One reply message: a simple reply (``kind`` None) or a structured chunk."""

    cookie: int
    error: int = 0
    kind: int | None = None
    flags: int = 0
    payload: bytes = b""

    @property
    def done(self) -> bool:
        return self.kind is None or bool(self.flags & proto.ReplyFlag.DONE)


@dataclass
class Reply:
    """Every chunk of one request's reply, in arrival order."""

    cookie: int
    chunks: list[Chunk] = field(default_factory=list)

    @property
    def error(self) -> int:
        for c in self.chunks:
            if c.kind is None and c.error:
                return c.error
            if c.kind is not None and c.kind & 0x8000:
                return int(struct.unpack_from(">I", c.payload)[0])
        return 0

    def data(self, offset: int, length: int) -> bytes:
        """Reassembles a successful read from its content chunks (holes as zeros)."""
        out = bytearray(length)
        covered = 0
        for c in self.chunks:
            if c.kind is None:
                out[:] = c.payload
                return bytes(out)
            if c.kind == proto.ReplyType.OFFSET_DATA:
                (at,) = struct.unpack_from(">Q", c.payload)
                piece = c.payload[8:]
                out[at - offset : at - offset + len(piece)] = piece
                covered += len(piece)
            elif c.kind == proto.ReplyType.OFFSET_HOLE:
                at, n = struct.unpack_from(">QI", c.payload)
                covered += n
        assert covered == length, f"chunks cover {covered} of {length} bytes"
        return bytes(out)


class RawClient:
    """An NBD client over a plain socket, one byte at a time if need be."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.sock.settimeout(TIMEOUT)
        self.structured = False
        self._read_lengths: dict[int, int] = {}
        self._cookies = iter(range(1, 1 << 62))

    @classmethod
    def connect(cls, address: str | tuple[str, int]) -> RawClient:
        family = socket.AF_UNIX if isinstance(address, str) else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.connect(address)
        return cls(sock)

    def close(self) -> None:
        self.sock.close()

    # -- bytes -------------------------------------------------------------------------------

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def recv_exact(self, n: int) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            got = self.sock.recv(n - len(buf))
            if not got:
                raise EOFError(f"server closed after {len(buf)} of {n} bytes")
            buf += got
        return bytes(buf)

    def closed_by_server(self) -> bool:
        """True when the server closed the connection (reads EOF or reset)."""
        try:
            return self.sock.recv(1) == b""
        except ConnectionResetError:
            return True

    # -- handshake ---------------------------------------------------------------------------

    def greeting(self, client_flags: int = 3) -> int:
        magic, opt_magic, flags = proto.SERVER_GREETING.unpack(self.recv_exact(18))
        assert (magic, opt_magic) == (proto.NBDMAGIC, proto.IHAVEOPT)
        self.send(proto.CLIENT_FLAGS.pack(client_flags))
        return int(flags)

    def send_option(self, opt: int, data: bytes = b"", length: int | None = None) -> None:
        size = len(data) if length is None else length
        self.send(proto.OPTION_HEADER.pack(proto.IHAVEOPT, opt, size) + data)

    def option_reply(self) -> tuple[int, int, bytes]:
        magic, opt, rep, length = proto.OPTION_REPLY.unpack(self.recv_exact(20))
        assert magic == proto.OPTION_REPLY_MAGIC, hex(magic)
        return opt, rep, self.recv_exact(length)

    def option(self, opt: int, data: bytes = b"") -> list[tuple[int, bytes]]:
        """Sends an option and collects its replies up to the final one."""
        self.send_option(opt, data)
        replies = []
        while True:
            got_opt, rep, payload = self.option_reply()
            assert got_opt == opt
            replies.append((rep, payload))
            if rep == proto.Rep.ACK or rep & (1 << 31):
                return replies

    def go(self, name: str = "", *, structured: bool = True, contexts: tuple[str, ...] = ()) -> int:
        """Negotiates and enters transmission; returns the transmission flags."""
        if structured:
            assert self.option(proto.Opt.STRUCTURED_REPLY)[-1][0] == proto.Rep.ACK
            self.structured = True
        if contexts:
            reps = self.option(proto.Opt.SET_META_CONTEXT, proto.encode_meta(name, list(contexts)))
            assert reps[-1][0] == proto.Rep.ACK, reps
        reps = self.option(proto.Opt.GO, proto.encode_go(name, [proto.Info.BLOCK_SIZE]))
        assert reps[-1][0] == proto.Rep.ACK, reps
        for rep, payload in reps:
            if rep == proto.Rep.INFO and payload[:2] == b"\0\0":
                _, _, flags = proto.INFO_EXPORT.unpack(payload)
                return int(flags)
        raise AssertionError("no NBD_INFO_EXPORT in the reply to GO")

    def handshake(self, name: str = "", **kwargs: object) -> int:
        self.greeting()
        return self.go(name, **kwargs)  # type: ignore[arg-type]

    # -- transmission ------------------------------------------------------------------------

    def request(
        self,
        kind: int,
        offset: int = 0,
        length: int = 0,
        *,
        flags: int = 0,
        payload: bytes = b"",
        cookie: int | None = None,
    ) -> int:
        cookie = next(self._cookies) if cookie is None else cookie
        if kind == proto.Cmd.READ:
            self._read_lengths[cookie] = length
        self.send(proto.encode_request(flags, kind, cookie, offset, length) + payload)
        return cookie

    def chunk(self) -> Chunk:
        (magic,) = struct.unpack(">I", self.recv_exact(4))
        if magic == proto.SIMPLE_REPLY_MAGIC:
            error, cookie = struct.unpack(">IQ", self.recv_exact(12))
            length = self._read_lengths.pop(cookie, 0)
            payload = self.recv_exact(length) if length and not error else b""
            return Chunk(cookie, error, None, 0, payload)
        assert magic == proto.STRUCTURED_REPLY_MAGIC, f"bad reply magic {magic:#x}"
        flags, kind, cookie, length = struct.unpack(">HHQI", self.recv_exact(16))
        chunk = Chunk(cookie, 0, kind, flags, self.recv_exact(length))
        if chunk.done:
            self._read_lengths.pop(cookie, None)
        return chunk

    def replies(self, count: int) -> dict[int, Reply]:
        """Reads until ``count`` replies are complete; replies may arrive in any order."""
        out: dict[int, Reply] = {}
        done = 0
        while done < count:
            c = self.chunk()
            out.setdefault(c.cookie, Reply(c.cookie)).chunks.append(c)
            done += c.done
        return out

    def call(self, kind: int, offset: int = 0, length: int = 0, **kwargs: object) -> Reply:
        cookie = self.request(kind, offset, length, **kwargs)  # type: ignore[arg-type]
        return self.replies(1)[cookie]


# -- the tool as a child process --------------------------------------------------------------


@contextmanager
def nbd_tool(
    args: list[str], pid_file: Path, *, env: dict[str, str] | None = None
) -> Iterator[subprocess.Popen[bytes]]:
    """Runs ``pyfleece nbd ARGS --pid-file PID_FILE`` until its pid file appears; always
    terminates, waits, then kills it."""
    full_env = dict(os.environ, PYTHONPATH=SRC, **(env or {}))
    cmd = [sys.executable, "-m", "pyfleece", "nbd", *args, "--pid-file", str(pid_file)]
    proc = subprocess.Popen(cmd, env=full_env, stderr=subprocess.PIPE)
    try:
        wait_for(lambda: pid_file.exists() or proc.poll() is not None, "the pid file")
        if proc.poll() is not None:
            err = proc.stderr.read().decode() if proc.stderr else ""
            raise AssertionError(f"pyfleece nbd exited with {proc.returncode}: {err}")
        yield proc
    finally:
        stop(proc)


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    if proc.stderr:
        proc.stderr.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# -- an in-process server ---------------------------------------------------------------------


@contextmanager
def short_tempdir() -> Iterator[Path]:
    """A directory with a short path (Unix socket paths must fit in 108 bytes)."""
    import shutil
    import tempfile

    path = Path(tempfile.mkdtemp(prefix="nbdt"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@contextmanager
def served(
    node: Node,
    name: str = "disk",
    *,
    writable: bool = True,
    server: dict[str, object] | None = None,
    export: dict[str, object] | None = None,
) -> Iterator[tuple[NbdServer, str]]:
    """An in-process NbdServer on a Unix socket exporting ``node``; stopped afterwards."""
    options: dict[str, object] = {"max_connections": 0, "handshake_timeout": 5.0}
    options.update(server or {})
    srv = NbdServer(**options)  # type: ignore[arg-type]
    with short_tempdir() as tmp:
        try:
            path = srv.listen_unix(str(tmp / "nbd.sock"))
            srv.add_export(node, name, writable=writable, **(export or {}))
            yield srv, path
        finally:
            srv.stop()


def pattern(offset: int, length: int) -> bytes:
    """Recognisable bytes for [offset, offset + length): each 8-byte word holds its offset."""
    first = offset - offset % 8
    words = b"".join(struct.pack(">Q", o) for o in range(first, offset + length + 8, 8))
    return words[offset - first : offset - first + length]


# -- TLS certificates in QEMU's layout ------------------------------------------------------


def make_certs(root: Path, openssl: str) -> tuple[Path, Path, Path]:
    """A CA, a server certificate for localhost/127.0.0.1/::1 and a client certificate,
    made with the ``openssl`` CLI. Returns (server dir, client dir, CA-only dir), laid out
    as QEMU's tls-creds-x509 and libnbd's tls-certificates expect."""
    server, client, bare = root / "server", root / "client", root / "ca-only"
    for d in (server, client, bare):
        d.mkdir(parents=True, exist_ok=True)
    ca_key, ca_cert = root / "ca-key.pem", root / "ca-cert.pem"
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]

    def run(*args: str) -> None:
        subprocess.run([openssl, *args], check=True, capture_output=True, timeout=60)

    run("req", "-x509", *ec, "-keyout", str(ca_key), "-out", str(ca_cert), "-days", "2",
        "-subj", "/CN=pyfleece test CA", "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign")  # fmt: skip
    leaves = {
        "server": "subjectAltName=DNS:localhost,IP:127.0.0.1,IP:::1\n"
        "extendedKeyUsage=serverAuth\nbasicConstraints=CA:FALSE\n",
        "client": "extendedKeyUsage=clientAuth\nbasicConstraints=CA:FALSE\n",
    }
    for role, ext in leaves.items():
        target = server if role == "server" else client
        key, csr, ext_file = target / f"{role}-key.pem", root / f"{role}.csr", root / f"{role}.ext"
        ext_file.write_text(ext)
        run("req", *ec, "-keyout", str(key), "-out", str(csr), "-subj", f"/CN={role}")
        run("x509", "-req", "-in", str(csr), "-CA", str(ca_cert), "-CAkey", str(ca_key),
            "-CAcreateserial", "-out", str(target / f"{role}-cert.pem"), "-days", "2",
            "-extfile", str(ext_file))  # fmt: skip
    for d in (server, client, bare):
        (d / "ca-cert.pem").write_bytes(ca_cert.read_bytes())
    return server, client, bare

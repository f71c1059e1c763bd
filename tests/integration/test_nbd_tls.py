"""TLS (x509, QEMU's tls-creds-x509 layout): nbdinfo with ``nbds://``, qemu-io with
``--object tls-creds-x509``, libnbd under load, and the FORCEDTLS rules over a raw socket."""

from __future__ import annotations

import json
import ssl
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from pyfleece.nbd import proto
from pyfleece.nbd.proto import Cmd, Opt, Rep, TransmitFlag
from tests.conftest import require_tool
from tests.nbdtest import (
    SRC,
    RawClient,
    free_port,
    make_certs,
    nbd_tool,
    pattern,
    require_module,
    short_tempdir,
)

pytestmark = pytest.mark.timeout(120)
MiB = 1 << 20


@dataclass
class Certs:
    server: Path
    client: Path
    ca_only: Path


@dataclass
class TlsServer:
    certs: Certs
    image: Path
    sock: str
    port: int


@pytest.fixture(scope="module")
def certs() -> Iterator[Certs]:
    with short_tempdir() as tmp:
        yield Certs(*make_certs(tmp, require_tool("openssl")))


def _start(certs: Certs, tmp: Path, verify: str, listen: list[str]) -> Any:
    image = tmp / "disk.raw"
    if not image.exists():
        with open(image, "wb") as f:
            f.truncate(8 * MiB)
            f.write(pattern(0, MiB))
    obj = f"tls-creds-x509,id=tls0,endpoint=server,dir={certs.server},verify-peer={verify}"
    args = ["-f", "raw", "-x", "disk", "-t", "-e", "8", "--object", obj, "--tls-creds", "tls0"]
    return nbd_tool([*args, *listen, str(image)], tmp / f"pid{len(listen)}{verify}")


@pytest.fixture(scope="module")
def server(certs: Certs) -> Iterator[TlsServer]:
    """The same image over Unix and TCP, with client certificates required."""
    with short_tempdir() as tmp:
        port = free_port()
        sock = str(tmp / "s")
        with (
            _start(certs, tmp, "on", ["-k", sock]),
            _start(certs, tmp, "on", ["-b", "127.0.0.1", "-p", str(port)]),
        ):
            yield TlsServer(certs, tmp / "disk.raw", sock, port)


def nbdinfo(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [require_tool("nbdinfo"), *args], capture_output=True, text=True, timeout=60
    )
    if check:
        assert result.returncode == 0, result.stderr
    return result


@pytest.mark.parametrize("transport", ["unix", "tcp"])
def test_nbdinfo_over_tls(server: TlsServer, transport: str) -> None:
    certs = f"tls-certificates={server.certs.client}"
    if transport == "unix":
        uri = f"nbds+unix:///disk?socket={server.sock}&{certs}"
    else:
        uri = f"nbds://127.0.0.1:{server.port}/disk?{certs}"
    info = json.loads(nbdinfo("--json", uri).stdout)
    assert info["TLS"] is True and info["exports"][0]["export-size"] == 8 * MiB
    assert nbdinfo("--map", uri).stdout.split()[:4] == ["0", str(MiB), "0", "data"]


def test_plain_client_is_refused(server: TlsServer) -> None:
    result = nbdinfo(f"nbd://127.0.0.1:{server.port}/disk", check=False)
    assert result.returncode != 0


def test_client_without_certificate_is_refused_when_peers_are_verified(server: TlsServer) -> None:
    uri = f"nbds://127.0.0.1:{server.port}/disk?tls-certificates={server.certs.ca_only}"
    assert nbdinfo(uri, check=False).returncode != 0


def test_verify_peer_off_accepts_clients_without_certificates(certs: Certs) -> None:
    with short_tempdir() as tmp:
        port = free_port()
        with _start(certs, tmp, "off", ["-b", "127.0.0.1", "-p", str(port)]):
            uri = f"nbds://127.0.0.1:{port}/disk?tls-certificates={certs.ca_only}"
            assert json.loads(nbdinfo("--json", uri).stdout)["TLS"] is True


def test_qemu_io_with_tls_creds_object(server: TlsServer) -> None:
    qemu_io = require_tool("qemu-io")
    opts = (
        "driver=raw,file.driver=nbd,file.server.type=inet,file.server.host=127.0.0.1,"
        f"file.server.port={server.port},file.export=disk,file.tls-creds=tls0"
    )
    obj = f"tls-creds-x509,id=tls0,endpoint=client,dir={server.certs.client}"
    cmds = ["write -P 0x42 2M 64k", "write -z 3M 64k", "flush", "read -P 0x42 2M 64k"]
    args = [qemu_io, "--object", obj, "--image-opts", opts]
    for c in [*cmds, "read -P 0 3M 64k"]:
        args += ["-c", c]
    result = subprocess.run([*args], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and "fail" not in result.stdout.lower(), result.stdout
    with open(server.image, "rb") as f:
        f.seek(2 * MiB)
        assert f.read(65536) == b"\x42" * 65536


def test_libnbd_pipelined_over_tls(server: TlsServer) -> None:
    """Many requests in flight, replies from the reader and the workers at once: the TLS
    transport keeps its records in order."""
    nbd: Any = require_module("nbd")
    h = nbd.NBD()
    h.set_tls(nbd.TLS_REQUIRE)
    h.set_tls_certificates(str(server.certs.client))
    h.connect_uri(f"nbds+unix:///disk?socket={server.sock}")
    buffers = []
    for i in range(64):
        buf = nbd.Buffer(4096 * (1 + i % 8))
        h.aio_pread(buf, (i * 12345) % (MiB - 32768))
        buffers.append((buf, (i * 12345) % (MiB - 32768)))
        if i % 8 == 0:
            h.aio_flush()
    while h.aio_in_flight():
        h.poll(-1)
    for buf, offset in buffers:
        assert buf.to_bytearray() == pattern(offset, len(buf.to_bytearray()))
    h.shutdown()


def _tls_client(server: TlsServer) -> tuple[RawClient, ssl.SSLContext]:
    ctx = ssl.create_default_context(cafile=str(server.certs.client / "ca-cert.pem"))
    ctx.load_cert_chain(
        server.certs.client / "client-cert.pem", server.certs.client / "client-key.pem"
    )
    return RawClient.connect(server.sock), ctx


def test_options_before_starttls_need_tls(server: TlsServer) -> None:
    c, _ = _tls_client(server)
    c.greeting()
    for opt, data in [
        (Opt.LIST, b""),
        (Opt.STRUCTURED_REPLY, b""),
        (Opt.INFO, proto.encode_go("disk", [])),
        (Opt.GO, proto.encode_go("disk", [])),
        (0xBAD, b"x"),
    ]:
        assert c.option(opt, data)[-1][0] == Rep.ERR_TLS_REQD, opt
    assert c.option(Opt.ABORT) == [(Rep.ACK, b"")]


def test_export_name_before_starttls_disconnects(server: TlsServer) -> None:
    c, _ = _tls_client(server)
    c.greeting()
    c.send_option(Opt.EXPORT_NAME, b"disk")
    assert c.closed_by_server()


def test_starttls_then_a_fresh_negotiation(server: TlsServer) -> None:
    c, ctx = _tls_client(server)
    c.greeting()
    assert c.option(Opt.STRUCTURED_REPLY)[-1][0] == Rep.ERR_TLS_REQD
    assert c.option(Opt.STARTTLS, b"x")[-1][0] == Rep.ERR_INVALID
    assert c.option(Opt.STARTTLS) == [(Rep.ACK, b"")]
    c.sock = ctx.wrap_socket(c.sock, server_hostname="localhost")
    assert c.option(Opt.STARTTLS)[-1][0] == Rep.ERR_INVALID  # already
    flags = c.go("disk", structured=False)  # nothing from before STARTTLS carried over
    assert not flags & TransmitFlag.SEND_DF
    reply = c.call(Cmd.READ, 0, 4096)
    assert reply.chunks[0].kind is None and reply.chunks[0].payload == pattern(0, 4096)
    c.request(Cmd.DISC)
    assert c.sock.recv(1) == b""  # a TLS close_notify, then the end of the connection


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--tls-creds", "nope"], "No TLS credentials with id 'nope'"),
        (
            ["--object", "tls-creds-x509,id=t,endpoint=client,dir=/tmp", "--tls-creds", "t"],
            "Expecting TLS credentials with a server endpoint",
        ),
        (
            [
                "--object",
                "tls-creds-x509,id=t,endpoint=server,dir=/nonexistent",
                "--tls-creds",
                "t",
            ],
            "Unable to access credentials /nonexistent/ca-cert.pem",
        ),
        (["--object", "tls-creds-psk,id=t,dir=/tmp"], "does not accept value 'tls-creds-psk'"),
        (
            ["--object", "tls-creds-x509,id=t,endpoint=server,dir=/tmp,verify-peer=maybe"],
            "'verify-peer' expects 'on' or 'off'",
        ),
    ],
    ids=["unknown-id", "client-endpoint", "missing-dir", "psk", "bad-bool"],
)
def test_tls_configuration_errors(args: list[str], message: str, tmp_path: Path) -> None:
    image = tmp_path / "d.raw"
    image.write_bytes(bytes(4096))
    result = subprocess.run(
        [sys.executable, "-m", "pyfleece", "nbd", *args, "-k", str(tmp_path / "s"), str(image)],
        capture_output=True,
        text=True,
        timeout=30,
        env={"PYTHONPATH": SRC},
    )
    assert result.returncode == 1
    assert message in result.stderr and result.stderr.startswith("pyfleece nbd: ")

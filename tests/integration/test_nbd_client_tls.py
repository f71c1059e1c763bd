"""The NBD client over TLS against qemu-nbd with x509 certificates (QEMU's layout, made by
the openssl CLI): accepted with a client certificate the server trusts, refused clearly
without one, with a CA that does not match, or with TLS on only one side."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from pyfleece.block import nbd as nbd_driver
from pyfleece.block.registry import OpenContext, open_node
from pyfleece.errors import ImageError
from pyfleece.nbd.client import NbdClient, list_exports
from pyfleece.nbd.client_transport import TlsTransport
from tests.conftest import require_tool
from tests.integration.nbd_client_peers import free_port, make_certs, qemu_nbd, run, unix_uri

MiB = 1 << 20


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return make_certs(tmp_path_factory.mktemp("certs"))


def tls_args(certs: dict[str, Path]) -> list[str]:
    creds = f"tls-creds-x509,id=tls0,endpoint=server,dir={certs['server']},verify-peer=on"
    return ["--object", creds, "--tls-creds", "tls0"]


@pytest.fixture
def image(tmp_path: Path) -> Path:
    path = tmp_path / "disk.raw"
    run(require_tool("qemu-img"), "create", "-q", "-f", "raw", str(path), str(4 * MiB))
    run(require_tool("qemu-io"), "-f", "raw", "-c", "write -P 0x5a 0 1M", str(path))
    return path


@pytest.fixture
def tls_server(tmp_path: Path, image: Path, certs: dict[str, Path]) -> Iterator[Path]:
    with qemu_nbd(tmp_path, image, "-x", "secret", *tls_args(certs)):
        yield tmp_path / "qemu-nbd.sock"


def test_tls_with_client_certificate(tls_server: Path, certs: dict[str, Path]) -> None:
    uri = unix_uri(tls_server, "secret", tls=str(certs["client"]))
    with NbdClient.connect(uri) as client:
        assert isinstance(client._transport, TlsTransport)
        assert client.read(0, MiB) == b"\x5a" * MiB
        data = os.urandom(3 * MiB)  # several records per request, several requests in flight
        client.write(MiB, data)
        buf = memoryview(bytearray(3 * MiB))
        cmds = [client.submit_read(MiB + o, buf[o : o + 65536]) for o in range(0, 3 * MiB, 65536)]
        for cmd in cmds:
            cmd.wait(30)
        assert bytes(buf) == data
    assert list_exports(uri) == [("secret", "")]


def test_tls_over_tcp_verifies_the_host(
    tmp_path: Path, image: Path, certs: dict[str, Path]
) -> None:
    port = free_port()
    with qemu_nbd(tmp_path, image, "-b", "127.0.0.1", "-p", str(port), *tls_args(certs)):
        client_dir = certs["client"]
        with NbdClient.connect(f"nbds://127.0.0.1:{port}/?tls-certificates={client_dir}") as c:
            assert c.read(0, 4) == b"\x5a" * 4
        # the certificate names localhost and 127.0.0.1, not this name
        wrong = f"nbds://127.0.0.1:{port}/?tls-certificates={client_dir}&tls-hostname=example.org"
        with pytest.raises(ImageError, match=r"TLS handshake .* failed: Hostname mismatch"):
            NbdClient.connect(wrong)


@pytest.mark.parametrize(
    ("which", "message"),
    [
        ("anonymous", r"TLS with NBD server .* failed: .*client certificate"),
        ("stranger", r"TLS handshake .* failed: unable to get local issuer certificate"),
    ],
)
def test_tls_refused(tls_server: Path, certs: dict[str, Path], which: str, message: str) -> None:
    with pytest.raises(ImageError, match=message):
        NbdClient.connect(unix_uri(tls_server, "secret", tls=str(certs[which])))


def test_plain_client_told_tls_is_required(tls_server: Path) -> None:
    with pytest.raises(ImageError, match="requires TLS; use an nbds://"):
        NbdClient.connect(unix_uri(tls_server, "secret"))


def test_tls_client_refused_by_plain_server(
    tmp_path: Path, image: Path, certs: dict[str, Path]
) -> None:
    with qemu_nbd(tmp_path, image):
        sock = tmp_path / "qemu-nbd.sock"
        with pytest.raises(ImageError, match="refused TLS"):
            NbdClient.connect(unix_uri(sock, tls=str(certs["client"])))


def test_missing_certificates_directory(tls_server: Path, tmp_path: Path) -> None:
    with pytest.raises(ImageError, match="does not exist"):
        NbdClient.connect(unix_uri(tls_server, "secret", tls=str(tmp_path / "nope")))


def test_driver_with_tls_creds(tls_server: Path, certs: dict[str, Path]) -> None:
    nbd_driver.register_tls_creds("tls-client", str(certs["client"]))
    try:
        server = {"type": "unix", "path": str(tls_server)}
        options = {"driver": "nbd", "server": server, "export": "secret", "tls-creds": "tls-client"}
        node = open_node(options, OpenContext(read_only=True))
        try:
            assert node.read_only and node.size == 4 * MiB
            assert node.read(MiB - 2, 4) == b"\x5a\x5a\x00\x00"
        finally:
            node.close()
    finally:
        nbd_driver.register_tls_creds("tls-client", None)

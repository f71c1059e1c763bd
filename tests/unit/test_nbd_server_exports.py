"""The exports API the daemon calls: add/remove (safe, hard), the soft reference released by
drive_del, max-connections, multi-conn, and a clean stop."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator

import pytest

from pyfleece.block.fault import FaultNode, Rule
from pyfleece.block.graph import Graph
from pyfleece.block.memory import MemoryNode
from pyfleece.errors import NodeBusy
from pyfleece.events import Event, EventBus
from pyfleece.nbd import proto
from pyfleece.nbd.exports import ExportError, ExportExists, ExportInUse, ExportNotFound
from pyfleece.nbd.proto import Cmd, Opt, Rep, TransmitFlag
from pyfleece.nbd.server import NbdServer
from tests.nbdtest import RawClient, short_tempdir, wait_for

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def events() -> tuple[EventBus, list[Event]]:
    bus = EventBus()
    seen: list[Event] = []
    bus.subscribe(seen.append)
    return bus, seen


@pytest.fixture
def server(events: tuple[EventBus, list[Event]]) -> Iterator[tuple[NbdServer, str]]:
    srv = NbdServer(events=events[0], grace=2.0)
    with short_tempdir() as tmp:
        path = srv.listen_unix(str(tmp / "s"))
        try:
            yield srv, path
        finally:
            srv.stop()


def deleted(seen: list[Event]) -> list[str]:
    return [e.data["id"] for e in seen if e.name == "BLOCK_EXPORT_DELETED"]


def test_add_export_refuses_duplicates(server: tuple[NbdServer, str]) -> None:
    srv, _ = server
    node = MemoryNode("n", 4096)
    srv.add_export(node, "a")
    with pytest.raises(ExportExists, match="Block export id 'a' is already in use"):
        srv.add_export(node, "a")
    with pytest.raises(ExportExists, match="already has export named 'a'"):
        srv.add_export(node, "a", export_id="other")
    with pytest.raises(ExportError, match="read-only"):
        srv.add_export(MemoryNode("r", 4096, read_only=True), "r", writable=True)


def test_export_name_defaults_to_the_node_name(server: tuple[NbdServer, str]) -> None:
    srv, path = server
    srv.add_export(MemoryNode("drive0", 8192))
    c = RawClient.connect(path)
    c.greeting()
    reply = c.option(Opt.INFO, proto.encode_go("drive0", []))
    assert reply[-1][0] == Rep.ACK
    assert srv.get_export("drive0").info() == {
        "id": "drive0",
        "type": "nbd",
        "node-name": "drive0",
        "shutting-down": False,
    }


def test_safe_removal(server: tuple[NbdServer, str], events: tuple[EventBus, list[Event]]) -> None:
    srv, path = server
    node = MemoryNode("n", 4096)
    srv.add_export(node, "disk")
    assert [r.holder for r in node.refs()] == ["NBD export 'disk'"]
    client = RawClient.connect(path)
    client.handshake("disk")
    with pytest.raises(ExportInUse, match="export 'disk' still in use"):
        srv.remove_export("disk")
    assert client.call(Cmd.READ, 0, 512).error == 0  # still served
    client.request(Cmd.DISC)
    assert client.closed_by_server()
    wait_for(lambda: not srv.sessions(), "the client to leave")
    srv.remove_export("disk")
    assert deleted(events[1]) == ["disk"] and node.refs() == []
    with pytest.raises(ExportNotFound, match="Export 'disk' is not found"):
        srv.remove_export("disk")
    late = RawClient.connect(path)
    late.greeting()
    assert late.option(Opt.GO, proto.encode_go("disk", []))[-1][0] == Rep.ERR_UNKNOWN


def test_hard_removal_finishes_requests_in_flight_then_disconnects(
    server: tuple[NbdServer, str], events: tuple[EventBus, list[Event]]
) -> None:
    srv, path = server
    image = MemoryNode("img", 1 << 20)
    node = FaultNode("f", image, owned=True, rules=[])
    hold = threading.Event()
    rule = node.add_rule(Rule(op="write", pause=hold))
    srv.add_export(node, "disk", writable=True)
    client = RawClient.connect(path)
    client.handshake("disk")
    bystander = RawClient.connect(path)
    bystander.handshake("disk")
    write = client.request(Cmd.WRITE, 0, 512, payload=b"w" * 512)
    assert rule.reached.wait(10)
    queued = client.request(Cmd.READ, 0, 512)  # received behind the held write
    remover = threading.Thread(target=srv.remove_export, args=("disk", "hard"))
    remover.start()
    wait_for(lambda: all(s.stopping for s in srv.sessions()), "the clients to be stopping")
    hold.set()
    replies = client.replies(2)
    assert replies[write].error == 0
    assert replies[queued].error == proto.Err.ESHUTDOWN
    assert client.closed_by_server() and bystander.closed_by_server()
    remover.join(10)
    assert not remover.is_alive()
    assert deleted(events[1]) == ["disk"] and node.refs() == []
    assert image.read(0, 512) == b"w" * 512


def test_hard_removal_of_a_client_that_does_not_read(server: tuple[NbdServer, str]) -> None:
    srv, path = server
    srv.grace = 0.2
    srv.add_export(MemoryNode("n", 64 << 20), "disk")
    client = RawClient.connect(path)
    client.handshake("disk")
    client.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    for _ in range(16):  # 256 MiB of replies that are never read
        client.request(Cmd.READ, 0, 16 << 20)
    srv.remove_export("disk", mode="hard")
    assert srv.sessions() == []


def test_drive_del_releases_the_soft_reference(
    server: tuple[NbdServer, str], events: tuple[EventBus, list[Event]]
) -> None:
    srv, path = server
    graph = Graph()
    node = graph.open({"driver": "memory", "node-name": "drive0", "size": 65536})
    srv.add_export(node, "exp", export_id="exp0")
    client = RawClient.connect(path)
    client.handshake("exp")
    with pytest.raises(NodeBusy, match="in use by block export 'exp0'"):
        graph.remove("drive0")  # blockdev-del refuses while the export exists
    graph.remove("drive0", release_soft=True)  # drive_del: the export goes first
    assert client.closed_by_server()
    assert deleted(events[1]) == ["exp0"]
    assert srv.exports() == [] and "drive0" not in graph


def test_max_connections_makes_clients_wait(events: tuple[EventBus, list[Event]]) -> None:
    srv = NbdServer(max_connections=1)
    with short_tempdir() as tmp:
        path = srv.listen_unix(str(tmp / "s"))
        try:
            srv.add_export(MemoryNode("n", 4096), "disk")
            first = RawClient.connect(path)
            flags = first.handshake("disk")
            assert not flags & TransmitFlag.CAN_MULTI_CONN  # one client: no multi-conn
            second = RawClient.connect(path)  # connects (backlog) but is not served yet
            second.sock.settimeout(0.3)
            with pytest.raises(TimeoutError):
                second.sock.recv(1)
            first.request(Cmd.DISC)
            assert first.closed_by_server()
            second.sock.settimeout(10)
            assert second.handshake("disk") & TransmitFlag.HAS_FLAGS
        finally:
            srv.stop()


def test_flush_on_one_connection_reaches_the_shared_node(server: tuple[NbdServer, str]) -> None:
    srv, path = server
    node = FaultNode("f", MemoryNode("img", 1 << 20), owned=True, rules=[])
    probe = node.add_rule(Rule(op="flush", pause=threading.Event()))
    probe.pause.set()  # type: ignore[union-attr]
    srv.add_export(node, "disk", writable=True)
    a, b = RawClient.connect(path), RawClient.connect(path)
    assert a.handshake("disk") & TransmitFlag.CAN_MULTI_CONN
    b.handshake("disk")
    assert a.call(Cmd.WRITE, 0, 4, payload=b"data").error == 0
    assert b.call(Cmd.FLUSH).error == 0
    assert probe.hits == 1  # the one node (and its one fdatasync) serves every connection
    assert b.call(Cmd.READ, 0, 4).data(0, 4) == b"data"


def test_stop_closes_everything_and_joins_its_threads(
    events: tuple[EventBus, list[Event]],
) -> None:
    before = set(threading.enumerate())
    srv = NbdServer(events=events[0])
    with short_tempdir() as tmp:
        path = srv.listen_unix(str(tmp / "s"))
        tcp = srv.listen_tcp("127.0.0.1", 0)
        node = MemoryNode("n", 4096)
        srv.add_export(node, "disk")
        clients = [RawClient.connect(path), RawClient.connect(tcp[0])]
        for c in clients:
            c.handshake("disk")
        half_open = RawClient.connect(path)
        srv.stop()
        assert all(c.closed_by_server() for c in clients)
        got = b""
        while chunk := half_open.sock.recv(64):  # the greeting if it was accepted, then EOF
            got += chunk
        assert len(got) in (0, 18)
        assert not (tmp / "s").exists()
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(tcp[0], timeout=5)
    assert set(threading.enumerate()) <= before
    assert deleted(events[1]) == ["disk"] and node.refs() == []
    srv.stop()  # idempotent


def test_tcp_clients_get_nodelay(server: tuple[NbdServer, str]) -> None:
    srv, _ = server
    (address,) = srv.listen_tcp("127.0.0.1", 0)
    srv.add_export(MemoryNode("n", 4096), "disk")
    client = RawClient.connect(address)
    client.handshake("disk")
    (session,) = srv.sessions()
    assert session.transport.sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)


def test_remove_mode_is_checked(server: tuple[NbdServer, str]) -> None:
    srv, _ = server
    srv.add_export(MemoryNode("n", 4096), "disk")
    with pytest.raises(ExportError, match="'mode' does not accept value 'soft'"):
        srv.remove_export("disk", mode="soft")

"""NBD server handshake over a raw socket: every option, its errors, and its limits."""

from __future__ import annotations

import struct
from collections.abc import Iterator

import pytest

from pyfleece.block.memory import MemoryNode
from pyfleece.nbd import proto
from pyfleece.nbd.handshake import HandshakeLimits
from pyfleece.nbd.proto import Info, Opt, Rep, TransmitFlag
from pyfleece.nbd.server import NbdServer
from tests.nbdtest import RawClient, served

pytestmark = pytest.mark.timeout(30)


@pytest.fixture
def server() -> Iterator[tuple[NbdServer, str]]:
    limits = HandshakeLimits(max_options=64, max_option=4096, max_drain=1 << 16)
    with served(
        MemoryNode("mem", 1 << 20),
        server={"limits": limits},
        export={"description": "the test disk"},
    ) as (srv, path):
        srv.add_export(MemoryNode("ro", 4096, read_only=True), "ro", writable=False)
        yield srv, path


@pytest.fixture
def client(server: tuple[NbdServer, str]) -> Iterator[RawClient]:
    c = RawClient.connect(server[1])
    yield c
    c.close()


def test_greeting_offers_fixed_newstyle_and_no_zeroes(client: RawClient) -> None:
    assert client.greeting() == proto.HandshakeFlag.FIXED_NEWSTYLE | proto.HandshakeFlag.NO_ZEROES


def test_unknown_client_flags_close_the_connection(client: RawClient) -> None:
    client.greeting(client_flags=0x3 | 0x40)
    assert client.closed_by_server()


def test_list_names_every_export_with_its_description(client: RawClient) -> None:
    client.greeting()
    replies = client.option(Opt.LIST)
    assert replies[-1][0] == Rep.ACK
    servers = []
    for rep, data in replies[:-1]:
        assert rep == Rep.SERVER
        (n,) = struct.unpack_from(">I", data)
        servers.append((data[4 : 4 + n].decode(), data[4 + n :].decode()))
    assert sorted(servers) == [("disk", "the test disk"), ("ro", "")]


def test_list_with_data_is_invalid_and_haggling_goes_on(client: RawClient) -> None:
    client.greeting()
    assert client.option(Opt.LIST, b"x")[-1][0] == Rep.ERR_INVALID
    assert client.option(Opt.LIST)[-1][0] == Rep.ACK


@pytest.mark.parametrize("opt", [Opt.INFO, Opt.GO], ids=["info", "go"])
def test_unknown_export_is_err_unknown(client: RawClient, opt: int) -> None:
    client.greeting()
    replies = client.option(opt, proto.encode_go("nope", []))
    assert replies == [(Rep.ERR_UNKNOWN, b"export 'nope' not present")]


def test_info_answers_what_was_asked(client: RawClient) -> None:
    client.greeting()
    asked = [Info.NAME, Info.DESCRIPTION, Info.BLOCK_SIZE]
    replies = client.option(Opt.INFO, proto.encode_go("disk", asked))
    assert replies[-1][0] == Rep.ACK
    infos = {struct.unpack_from(">H", d)[0]: d for rep, d in replies[:-1] if rep == Rep.INFO}
    assert proto.INFO_EXPORT.unpack(infos[Info.EXPORT])[1] == 1 << 20
    assert infos[Info.NAME][2:] == b"disk"
    assert infos[Info.DESCRIPTION][2:] == b"the test disk"
    assert proto.INFO_BLOCK_SIZE.unpack(infos[Info.BLOCK_SIZE])[1:] == (1, 4096, 32 << 20)
    # INFO does not end the handshake: GO still works
    assert client.go("disk") & TransmitFlag.HAS_FLAGS


@pytest.mark.parametrize(
    ("name", "structured", "present", "absent"),
    [
        ("disk", True, TransmitFlag.SEND_TRIM | TransmitFlag.SEND_DF, TransmitFlag.READ_ONLY),
        ("disk", False, TransmitFlag.SEND_WRITE_ZEROES, TransmitFlag.SEND_DF),
        ("ro", True, TransmitFlag.READ_ONLY | TransmitFlag.SEND_FLUSH, TransmitFlag.SEND_TRIM),
    ],
    ids=["writable", "simple-replies", "read-only"],
)
def test_transmission_flags(
    client: RawClient, name: str, structured: bool, present: int, absent: int
) -> None:
    client.greeting()
    flags = client.go(name, structured=structured)
    assert flags & present == present
    assert not flags & absent
    assert flags & TransmitFlag.CAN_MULTI_CONN


@pytest.mark.parametrize("no_zeroes", [True, False])
def test_export_name_reply(client: RawClient, no_zeroes: bool) -> None:
    client.greeting(client_flags=1 | (2 if no_zeroes else 0))
    client.send_option(Opt.EXPORT_NAME, b"disk")
    size, flags = proto.EXPORT_NAME_REPLY.unpack(client.recv_exact(10))
    assert size == 1 << 20 and flags & TransmitFlag.HAS_FLAGS
    if not no_zeroes:
        assert client.recv_exact(124) == bytes(124)
    reply = client.call(proto.Cmd.READ, 0, 512)
    assert reply.error == 0 and reply.chunks[0].payload == bytes(512)


def test_export_name_of_unknown_export_disconnects(client: RawClient) -> None:
    client.greeting()
    client.send_option(Opt.EXPORT_NAME, b"nope")
    assert client.closed_by_server()


def test_non_fixed_newstyle_client_may_only_send_export_name(server: tuple[NbdServer, str]) -> None:
    ok = RawClient.connect(server[1])
    ok.greeting(client_flags=0)
    ok.send_option(Opt.EXPORT_NAME, b"disk")
    assert proto.EXPORT_NAME_REPLY.unpack(ok.recv_exact(10))[0] == 1 << 20
    bad = RawClient.connect(server[1])
    bad.greeting(client_flags=0)
    bad.send_option(Opt.LIST)
    assert bad.closed_by_server()


def test_structured_reply_is_negotiated_once(client: RawClient) -> None:
    client.greeting()
    assert client.option(Opt.STRUCTURED_REPLY, b"x")[-1][0] == Rep.ERR_INVALID
    assert client.option(Opt.STRUCTURED_REPLY)[-1][0] == Rep.ACK
    assert client.option(Opt.STRUCTURED_REPLY)[-1][0] == Rep.ERR_INVALID


def _contexts(replies: list[tuple[int, bytes]]) -> dict[str, int]:
    assert replies[-1][0] == Rep.ACK, replies
    out = {}
    for rep, data in replies[:-1]:
        assert rep == Rep.META_CONTEXT
        out[data[4:].decode()] = struct.unpack_from(">I", data)[0]
    return out


def test_meta_contexts_need_structured_replies(client: RawClient) -> None:
    client.greeting()
    for opt in (Opt.LIST_META_CONTEXT, Opt.SET_META_CONTEXT):
        reps = client.option(opt, proto.encode_meta("disk", ["base:allocation"]))
        assert reps[-1][0] == Rep.ERR_INVALID


@pytest.mark.parametrize(
    ("queries", "expected"),
    [
        ([], {"base:allocation", "qemu:allocation-depth"}),
        (["base:"], {"base:allocation"}),
        (["qemu:"], {"qemu:allocation-depth"}),
        (["qemu:dirty-bitmap:"], set()),
        (["x-unknown:thing", "nocolon", "base:allocation"], {"base:allocation"}),
    ],
    ids=["all", "base-wildcard", "qemu-wildcard", "no-bitmaps-yet", "unknown-ignored"],
)
def test_list_meta_context(client: RawClient, queries: list[str], expected: set[str]) -> None:
    client.greeting()
    client.option(Opt.STRUCTURED_REPLY)
    found = _contexts(client.option(Opt.LIST_META_CONTEXT, proto.encode_meta("disk", queries)))
    assert set(found) == expected
    assert set(found.values()) <= {0}


def test_set_meta_context_selects_exact_names_with_distinct_ids(client: RawClient) -> None:
    client.greeting()
    client.option(Opt.STRUCTURED_REPLY)
    none = client.option(Opt.SET_META_CONTEXT, proto.encode_meta("disk", ["base:", "qemu:"]))
    assert _contexts(none) == {}
    queries = ["base:allocation", "qemu:allocation-depth"]
    chosen = _contexts(client.option(Opt.SET_META_CONTEXT, proto.encode_meta("disk", queries)))
    assert set(chosen) == set(queries) and len(set(chosen.values())) == 2


def test_meta_context_for_unknown_export(client: RawClient) -> None:
    client.greeting()
    client.option(Opt.STRUCTURED_REPLY)
    reps = client.option(Opt.SET_META_CONTEXT, proto.encode_meta("nope", ["base:allocation"]))
    assert reps[-1][0] == Rep.ERR_UNKNOWN


@pytest.mark.parametrize(
    "payload",
    [b"", b"\x00\x00\x00\x09disk", proto.encode_meta("disk", []) + b"junk"],
    ids=["empty", "truncated", "trailing"],
)
def test_malformed_meta_context_is_invalid(client: RawClient, payload: bytes) -> None:
    client.greeting()
    client.option(Opt.STRUCTURED_REPLY)
    assert client.option(Opt.SET_META_CONTEXT, payload)[-1][0] == Rep.ERR_INVALID


def test_contexts_set_for_another_export_do_not_apply(client: RawClient) -> None:
    client.greeting()
    client.option(Opt.STRUCTURED_REPLY)
    client.option(Opt.SET_META_CONTEXT, proto.encode_meta("ro", ["base:allocation"]))
    client.go("disk", structured=False)
    client.structured = True
    assert client.call(proto.Cmd.BLOCK_STATUS, 0, 4096).error == proto.Err.EINVAL


@pytest.mark.parametrize("opt", [Opt.PEEK_EXPORT, Opt.EXTENDED_HEADERS, 0xDEAD, 0x7FFFFFFF])
def test_unknown_options_are_unsupported_and_haggling_goes_on(client: RawClient, opt: int) -> None:
    client.greeting()
    assert client.option(opt, b"some data")[-1][0] == Rep.ERR_UNSUP
    assert client.go("disk") & TransmitFlag.HAS_FLAGS


def test_starttls_without_tls_is_refused_by_policy(client: RawClient) -> None:
    client.greeting()
    assert client.option(Opt.STARTTLS)[-1][0] == Rep.ERR_POLICY
    assert client.go("disk") & TransmitFlag.HAS_FLAGS


def test_abort_is_acknowledged_then_closed(client: RawClient) -> None:
    client.greeting()
    assert client.option(Opt.ABORT) == [(Rep.ACK, b"")]
    assert client.closed_by_server()


def test_long_option_is_drained_and_refused(client: RawClient) -> None:
    client.greeting()
    assert client.option(Opt.LIST, bytes(10_000))[-1][0] == Rep.ERR_TOO_BIG
    assert client.option(Opt.LIST)[-1][0] == Rep.ACK


@pytest.mark.parametrize("opt", [Opt.LIST, Opt.EXPORT_NAME, 0xBAD])
def test_absurd_option_length_disconnects(client: RawClient, opt: int) -> None:
    client.greeting()
    client.send_option(opt, b"", length=0xFFFFFFF0)
    assert client.closed_by_server()


def test_bad_option_magic_disconnects(client: RawClient) -> None:
    client.greeting()
    client.send(struct.pack(">QII", 0x1234, Opt.LIST, 0))
    assert client.closed_by_server()


def test_too_many_options_disconnect(client: RawClient) -> None:
    client.greeting()
    for _ in range(64):  # the fixture's limit
        assert client.option(0xBAD)[-1][0] == Rep.ERR_UNSUP
    client.send_option(0xBAD)
    assert client.closed_by_server()


def test_handshake_time_is_capped() -> None:
    with served(MemoryNode("m", 4096), server={"handshake_timeout": 0.3}) as (_, path):
        c = RawClient.connect(path)
        c.greeting()
        c.send(proto.OPTION_HEADER.pack(proto.IHAVEOPT, Opt.LIST, 8))  # and never the data
        assert c.closed_by_server()

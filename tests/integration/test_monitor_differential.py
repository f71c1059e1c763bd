"""The same bad input to qemu-storage-daemon 7.2 and to us: the same error classes and texts.

This is what proves the expected strings used elsewhere. Each case runs on a fresh connection
to each server (negotiated first unless the case is about negotiation), followed by a
synchronising command; every reply before the synchronising one is compared: errors by class
and text, successes by their id.

Block commands are described but not registered by the framework; here they get a stub
handler, so their arguments are validated as they will be in the daemon. Every case is one
that QEMU rejects before running the command, so reaching the stub ("STUB") is a mismatch.
Left out on purpose: messages with several unexpected members (QEMU reports whichever its
hash table yields first), capability ``oob`` (QEMU offers it, we do not), input crossing the
size limits (we answer once per message, QEMU once per token; see jsonstream.py), and our
own drivers ``memory`` and ``fault`` (unknown to QEMU).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from pyfleece.errors import CommandError
from pyfleece.monitor.client import QmpConnection
from pyfleece.monitor.core import create_dispatcher
from pyfleece.monitor.jsonvalue import encode
from tests.integration.test_monitor_support import qemu_storage_daemon, register_stubs, serving

SYNC = b'{"execute": "query-version", "id": "sync"}\n'

BEFORE_NEGOTIATION = [
    b'{"execute": "query-version"}',
    b'{"execute": "query-version", "id": 5}',
    b'{"execute": "nosuch", "id": [1, 2]}',
    b'{"execute": "nosuch", "foo": 1, "id": 7}',
    b'{"execute": "qmp_capabilities", "arguments": {"x": 1}}',
    b'{"execute": "qmp_capabilities", "arguments": {"enable": "oob"}}',
    b'{"execute": "qmp_capabilities", "arguments": {"enable": [1]}}',
    b'{"execute": "qmp_capabilities", "arguments": {"enable": ["foo"]}}',
    b'{"execute": "qmp_capabilities", "arguments": {"enable": null}}',
    b"[1, 2]",
    b'{ "execute": }',
]

PROTOCOL = [
    b'{"execute": "qmp_capabilities"}',
    b'{"execute": "qmp_capabilities", "id": 10}',
    b'{"execute": "nosuch", "id": "x"}',
    b"[1,2]\n",
    b'"str"\n',
    b"42\n",
    b"null\n",
    b"{}",
    b'{"id": 9}',
    b'{"execute": 1, "id": 7}',
    b'{"exec": "x"}',
    b'{"execute": "query-version", "arguments": [], "id": 7}',
    b'{"execute": "query-version", "arguments": {"a": 1}}',
    b'{"execute": "query-version", "arguments": {"x": {"y": 1}}}',
    b'{"execute": "query-version", "foo": 1}',
    b'{"exec-oob": "query-version"}',
    b'{"execute": "quit", "arguments": {"x": 1}}',
    b'{"execute": "query-version"}{"execute": "query-version", "id": 2}',
    b'{"execute":\n"query-version", "id": "split"}',
    b"{'execute': 'query-version', 'id': 'single'}",
    b'{"execute": "query-version", "id": {"a": [1, null, true, "s", -0, 1.5]}}',
    b'{"execute": "query-version", "id": "\\u00e9\\ud83d\\ude00\\/\\\'"}',
    b'{"execute": "query-version", "id": "\xc3\xa9\xc0\x80"}',
    b'{"execute": "query-version", "id": 18446744073709551615}',
]

BROKEN_JSON = [
    b'{ "execute": }',
    b"\x01",
    b"}\n",
    b"]]]\n",
    b'{"a": \xff}',
    b'{"a": \xff',
    b'{"execute": "query-version", "id": "\xc3"}',
    b'{"execute": "query-version", "id": "\xed\xa0\x80"}',
    b'{"execute": "query-version", "id": "\xf4\x90\x80\x80"}',
    b'{"execute": "query-version", "id": "\\ud83d"}',
    b'{"execute": "query-version", "id": "\\uD800\\u0041"}',
    b'{"execute": "query-version", "id": "\\u12"}',
    b'{"execute": "query-version", "id": NaN}',
    b'{"execute": "query-version", "id": "a\\qb"}',
    b'{"execute": "query-version", "id": "a\tb"}',
    b'{"execute": "query-version", "id": "a\nb"}',
    b'{"execute": "query-version", "id": "a\x01b"}',
    b'{"execute": "query-version", "id": 3,}',
    b'{"execute": "query-version", "id": 4 5}',
    b'{"execute" "query-version", "id": 6}',
    b'{"execute": "query-version", "id": 7}  \x00 {"execute": "query-version", "id": 8}',
    b'{"execute": "query-version", "id": 9, "id": 10}',
    b'{"execute": "query-version", "id": [1,]}',
    b'{"execute": "query-version", "id": %d}',
    b'{"execute": "query-version", "id": 11}\x1b',
    b'{"execute": "query-version", "id": "unterminated}\n{"execute": "query-version", "id": 13}\n',
    b'"\n{"execute": "query-version", "id": 14}\n',
    b'{"execute": "query-version", "id": tru}',
    b'{"execute": "query-version", "id": 01}',
    b'{"execute": "query-version", "id": 1.}',
    b'{"execute": "query-version", "id": {1: 2}}',
    b'{"execute": "query-version", "id": 0x10}',
    b'{"execute": "query-version", "id": +1}',
    b'{"execute": "query-version", "id": .5}',
    b'\xef\xbb\xbf{"execute": "query-version", "id": 15}',
    b'{"execute": "query-version", "id": 1}}',
    b'{"execute": "query-version", "id": 1]',
    b"{}}",
    b"nul\n",
    b"1 2 3\n",
    b'{"execute": "query-version", "id": ' + b"[" * 1023 + b"]" * 1023 + b"}",
]

ARGUMENTS = [
    b'{"execute": "blockdev-add", "arguments": {}}',
    b'{"execute": "blockdev-add", "arguments": {"driver": "foo"}}',
    b'{"execute": "blockdev-add", "arguments": {"driver": 1}}',
    b'{"execute": "blockdev-add", "arguments": {"driver": "file"}}',
    b'{"execute": "blockdev-add", "arguments": {"driver": "file", "filename": 1}}',
    b'{"execute": "blockdev-add", "arguments": {"driver": "file", "filename": "/x", "x": 1}}',
    b'{"execute": "blockdev-add", "arguments": {"driver": "file", "filename": "/x",'
    b' "read-only": "yes"}}',
    b'{"execute": "blockdev-add", "arguments": {"driver": "file", "filename": "/x", "aio": "b"}}',
    b'{"execute": "blockdev-add", "arguments": {"driver": "host_device"}}',
    b'{"execute": "blockdev-add", "arguments": {"driver": "qcow2"}}',
    b'{"execute": "blockdev-add", "arguments": {"driver": "qcow2", "file": 1}}',
    b'{"execute": "blockdev-add", "arguments": {"driver": "qcow2", "file": null}}',
    b'{"execute": "blockdev-add", "arguments": {"driver": "qcow2", "file": {}}}',
    b'{"execute": "blockdev-add", "arguments": {"driver": "qcow2", "file": {"driver": "file"}}}',
    b'{"execute": "blockdev-add", "arguments": {"driver": "qcow2", "file": {"driver": "file",'
    b' "filename": "/x", "y": 2}}}',
    b'{"execute": "blockdev-add", "arguments": {"driver": "qcow2", "file": "n", "backing": 1}}',
    b'{"execute": "blockdev-add", "arguments": {"driver": "qcow2", "file": "n", "backing": []}}',
    b'{"execute": "blockdev-add", "arguments": {"driver": "qcow2", "node-name": "q",'
    b' "file": {"driver": "qcow2", "file": "x", "backing": {"driver": "null-co",'
    b' "size": "x"}}}}',
    b'{"execute": "blockdev-add", "arguments": {"driver": "qcow2", "file": "x",'
    b' "overlap-check": "bogus"}}',
    b'{"execute": "blockdev-add", "arguments": {"driver": "qcow2", "file": "x",'
    b' "overlap-check": 5}}',
    b'{"execute": "blockdev-add", "arguments": {"driver": "qcow2", "file": "x",'
    b' "overlap-check": {"template": "all", "x": 1}}}',
    b'{"execute": "blockdev-add", "arguments": {"driver": "qcow2", "file": "x",'
    b' "encrypt": {"format": "luks", "key-secret": 1}}}',
    b'{"execute": "blockdev-add", "arguments": {"driver": "qcow2", "file": "x", "encrypt": {}}}',
    b'{"execute": "blockdev-add", "arguments": {"driver": "qcow2", "file": "x",'
    b' "encrypt": {"format": "bogus"}}}',
    b'{"execute": "blockdev-add", "arguments": {"driver": "qcow2", "file": "x",'
    b' "discard-no-unref": true}}',
    b'{"execute": "blockdev-add", "arguments": {"driver": "null-co", "active": true}}',
    b'{"execute": "blockdev-add", "arguments": {"driver": "null-co", "size": 1.5}}',
    b'{"execute": "blockdev-add", "arguments": {"driver": "null-co",'
    b' "size": 18446744073709551615}}',
    b'{"execute": "blockdev-add", "arguments": {"driver": "null-co", "latency-ns": "x"}}',
    b'{"execute": "blockdev-add", "arguments": {"driver": "null-co",'
    b' "latency-ns": 18446744073709551616}}',
    b'{"execute": "blockdev-add", "arguments": {"driver": "null-co", "node-name": 1, "x": 1}}',
    b'{"execute": "blockdev-add", "arguments": {"driver": "null-co", "cache": {"x": 1}}}',
    b'{"execute": "blockdev-add", "arguments": {"driver": "null-co", "cache": 5}}',
    b'{"execute": "blockdev-add", "arguments": {"driver": "null-co", "detect-zeroes": 1}}',
    b'{"execute": "blockdev-add", "arguments": {"driver": "null-co", "discard": "foo"}}',
    b'{"execute": "blockdev-add", "arguments": {"node-name": "z", "detect-zeroes": 1}}',
    b'{"execute": "blockdev-add", "arguments": {"driver": "raw", "x": 1}}',
    b'{"execute": "blockdev-add", "arguments": {"driver": "raw", "file": "x", "offset": 1.0}}',
    b'{"execute": "blockdev-add", "arguments": {"driver": "nbd", "server": {"type": "inet",'
    b' "host": "x"}}}',
    b'{"execute": "blockdev-add", "arguments": {"driver": "nbd", "server": {"type": "unix"}}}',
    b'{"execute": "blockdev-add", "arguments": {"driver": "nbd", "server": {"type": "bogus"}}}',
    b'{"execute": "blockdev-add", "arguments": {"driver": "nbd", "server": {"type": "inet",'
    b' "host": "x", "port": 1}}}',
    b'{"execute": "blockdev-add", "arguments": {"driver": "nbd", "server": {"type": "inet",'
    b' "host": "x", "port": "1", "to": 70000}}}',
    b'{"execute": "blockdev-add", "arguments": {"driver": "nbd", "server": {"type": "inet",'
    b' "host": "x", "port": "1", "to": 1.5}}}',
    b'{"execute": "blockdev-add", "arguments": {"driver": "nbd", "server": {"type": "unix",'
    b' "path": "/x"}, "reconnect-delay": -1}}',
    b'{"execute": "blockdev-del"}',
    b'{"execute": "blockdev-del", "arguments": {"node-name": 1}}',
    b'{"execute": "blockdev-del", "arguments": {"node-name": null}}',
    b'{"execute": "blockdev-del", "arguments": {"node-name": "x", "y": 2}}',
    b'{"execute": "query-named-block-nodes", "arguments": {"flat": 1}}',
    b'{"execute": "query-block", "arguments": {"x": 1}}',
    b'{"execute": "blockdev-backup"}',
    b'{"execute": "blockdev-backup", "arguments": {"device": "a", "target": "b"}}',
    b'{"execute": "blockdev-backup", "arguments": {"device": "a", "sync": "none"}}',
    b'{"execute": "blockdev-backup", "arguments": {"device": "a", "target": "b", "sync": "bogus"}}',
    b'{"execute": "blockdev-backup", "arguments": {"device": "a", "target": "b",'
    b' "sync": "none", "speed": "1"}}',
    b'{"execute": "blockdev-backup", "arguments": {"device": "a", "target": "b",'
    b' "sync": "none", "x-perf": {"max-chunk": "x"}}}',
    b'{"execute": "blockdev-backup", "arguments": {"device": "a", "target": "b",'
    b' "sync": "none", "x-perf": {"min-cluster-size": 1}}}',
    b'{"execute": "blockdev-backup", "arguments": {"device": "a", "target": "b",'
    b' "sync": "none", "auto-finalize": 1}}',
    b'{"execute": "blockdev-backup", "arguments": {"device": "a", "target": "b",'
    b' "sync": "none", "on-cbw-error": "break-guest-write"}}',
    b'{"execute": "drive-backup", "arguments": {"device": "a", "target": "b", "sync": "none",'
    b' "format": "qcow2", "mode": "bogus"}}',
    b'{"execute": "drive-backup", "arguments": {"device": "a", "target": "b", "sync": "none",'
    b' "format": 1}}',
    b'{"execute": "block-job-cancel", "arguments": {"device": "a", "force": "yes"}}',
    b'{"execute": "block-job-set-speed", "arguments": {"device": "a"}}',
    b'{"execute": "block-job-pause", "arguments": {}}',
    b'{"execute": "block-job-dismiss", "arguments": {"device": "a"}}',
    b'{"execute": "job-cancel", "arguments": {"id": 1}}',
    b'{"execute": "job-finalize"}',
    b'{"execute": "query-jobs", "arguments": {"x": 1}}',
    b'{"execute": "nbd-server-start", "arguments": {}}',
    b'{"execute": "nbd-server-start", "arguments": {"addr": {"type": "unix"}}}',
    b'{"execute": "nbd-server-start", "arguments": {"addr": {"type": "inet",'
    b' "host": "127.0.0.1", "port": "0"}, "max-connections": -1}}',
    b'{"execute": "nbd-server-start", "arguments": {"addr": {"type": "unix",'
    b' "data": {"path": "/x"}}, "max-connections": 4294967296}}',
    b'{"execute": "nbd-server-start", "arguments": {"addr": {"type": "unix",'
    b' "data": {"path": "/x"}}, "max-connections": "x"}}',
    b'{"execute": "nbd-server-start", "arguments": {"addr": {"type": "unix",'
    b' "data": {"path": "/x"}}, "handshake-max-seconds": 1}}',
    b'{"execute": "nbd-server-add", "arguments": {"device": "x", "bitmap": 1}}',
    b'{"execute": "nbd-server-add", "arguments": {"device": "x", "writable": 1}}',
    b'{"execute": "nbd-server-remove", "arguments": {"name": "x", "mode": "bogus"}}',
    b'{"execute": "nbd-server-stop", "arguments": {"x": 1}}',
    b'{"execute": "block-export-add", "arguments": {"type": "bogus", "id": "e", "node-name": "n"}}',
    b'{"execute": "block-export-add", "arguments": {"type": "nbd", "id": "e"}}',
    b'{"execute": "block-export-add", "arguments": {"type": "nbd", "id": "e",'
    b' "node-name": "n", "bitmaps": ["a", 1]}}',
    b'{"execute": "block-export-add", "arguments": {"type": "nbd", "id": "e",'
    b' "node-name": "n", "bitmaps": [{"node": "a"}]}}',
    b'{"execute": "block-export-add", "arguments": {"type": "nbd", "id": "e",'
    b' "node-name": "n", "bitmaps": "x"}}',
    b'{"execute": "block-export-add", "arguments": {"type": "nbd", "id": "e",'
    b' "node-name": "n", "allow-inactive": true}}',
    b'{"execute": "block-export-del", "arguments": {"id": "e", "mode": "x"}}',
    b'{"execute": "transaction", "arguments": {}}',
    b'{"execute": "transaction", "arguments": {"actions": {}}}',
    b'{"execute": "transaction", "arguments": {"actions": [5]}}',
    b'{"execute": "transaction", "arguments": {"actions": [{"data": {}}]}}',
    b'{"execute": "transaction", "arguments": {"actions": [{"type": 5, "data": {}}]}}',
    b'{"execute": "transaction", "arguments": {"actions": [{"type": "bogus", "data": {}}]}}',
    b'{"execute": "transaction", "arguments": {"actions": [{"type": "blockdev-backup"}]}}',
    b'{"execute": "transaction", "arguments": {"actions": [{"type": "blockdev-backup",'
    b' "data": 5}]}}',
    b'{"execute": "transaction", "arguments": {"actions": [{"type": "blockdev-backup",'
    b' "data": {"device": "a"}}]}}',
    b'{"execute": "transaction", "arguments": {"actions": [{"type": "blockdev-backup",'
    b' "data": {"device": "a", "target": "b", "sync": "none", "x-perf": {"max-workers":'
    b' "x"}}}]}}',
    b'{"execute": "transaction", "arguments": {"actions": [{"type": "drive-backup",'
    b' "data": {"device": "a", "target": "b", "sync": "none", "y": 5}}]}}',
    b'{"execute": "transaction", "arguments": {"actions": [{"type": "blockdev-backup",'
    b' "data": {"device": "a", "target": "b", "sync": "none"}, "x": 1}]}}',
    b'{"execute": "transaction", "arguments": {"actions": [], "properties": {"x": 1}}}',
    b'{"execute": "transaction", "arguments": {"actions": [],'
    b' "properties": {"completion-mode": "bogus"}}}',
]

CASES = (
    [(False, c) for c in BEFORE_NEGOTIATION]
    + [(True, c) for c in PROTOCOL + BROKEN_JSON + ARGUMENTS]
)  # fmt: skip


def _stub(ctx: Any, args: dict[str, Any]) -> None:
    raise CommandError("STUB")


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    dispatcher = create_dispatcher()
    register_stubs(dispatcher, _stub)
    with (
        qemu_storage_daemon(tmp_path_factory.mktemp("qsd")) as theirs,
        serving(tmp_path_factory.mktemp("ours"), dispatcher=dispatcher) as (_, _, ours, _),
    ):
        yield theirs, ours


def _answers(path: str, negotiate: bool, data: bytes) -> list[Any]:
    with QmpConnection(path, timeout=10) as conn:
        if negotiate:
            conn.negotiate()
        conn.send_raw(data)
        conn.send_raw(SYNC)
        sync, before = conn.reply_to("sync")
    answers: list[Any] = []
    for reply in [*before, sync]:
        ident = encode(reply.get("id"))  # as text: ids may nest deeper than == recurses
        if "error" in reply:
            answers.append((ident, reply["error"]["class"], reply["error"]["desc"]))
        else:
            answers.append((ident, "return"))
    return answers


@pytest.mark.parametrize(("negotiate", "data"), CASES, ids=[repr(c)[:60] for _, c in CASES])
def test_same_answers_as_qemu_storage_daemon(
    servers: tuple[str, str], negotiate: bool, data: bytes
) -> None:
    theirs, ours = servers
    assert _answers(ours, negotiate, data) == _answers(theirs, negotiate, data)

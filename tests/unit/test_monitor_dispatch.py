"""The registry and dispatcher: described vs registered, error mapping, serialisation."""

from __future__ import annotations

import logging
import threading
from typing import Any

import pytest

from pyfleece.errors import CommandError, NodeBusy
from pyfleece.events import EventBus
from pyfleece.monitor.core import create_dispatcher
from pyfleece.monitor.dispatch import Dispatcher, MonitorContext
from pyfleece.monitor.qapi.commands import CommandSpec
from pyfleece.monitor.schema import STR, struct


class Ctx:
    def __init__(self) -> None:
        self.events = EventBus()
        self.quits = 0

    def request_quit(self) -> None:
        self.quits += 1


def test_context_protocol_is_small() -> None:
    ctx: MonitorContext = Ctx()  # mypy checks that Ctx satisfies it
    assert ctx.events is not None


def test_described_but_unregistered_is_unknown() -> None:
    dispatcher = create_dispatcher()
    reply = dispatcher.qmp_reply(Ctx(), "blockdev-add", {"driver": "bogus"})
    assert reply == {
        "error": {"class": "CommandNotFound", "desc": "The command blockdev-add has not been found"}
    }
    dispatcher.qmp.register("blockdev-add", lambda ctx, args: args)
    reply = dispatcher.qmp_reply(Ctx(), "blockdev-add", {"driver": "bogus"})
    assert reply["error"]["desc"] == "Parameter 'driver' does not accept value 'bogus'"
    reply = dispatcher.qmp_reply(Ctx(), "blockdev-add", {"driver": "memory", "size": 4096})
    assert reply == {"return": {"driver": "memory", "size": 4096}}
    names = [c["name"] for c in dispatcher.execute(Ctx(), "query-commands", {})]
    assert names[-1] == "blockdev-add"


def test_registration_rules() -> None:
    dispatcher = Dispatcher()
    with pytest.raises(ValueError, match="no argument description"):
        dispatcher.qmp.register("x-my-command", lambda ctx, args: None)
    dispatcher.qmp.describe(CommandSpec("x-my-command", struct("A", {"name": STR})))
    dispatcher.qmp.register("x-my-command", lambda ctx, args: f"hello {args['name']}")
    with pytest.raises(ValueError, match="already registered"):
        dispatcher.qmp.register("x-my-command", lambda ctx, args: None)
    dispatcher.qmp.register("x-my-command", lambda ctx, args: "again", replace=True)
    assert dispatcher.execute(Ctx(), "x-my-command", {"name": "n"}) == "again"
    dispatcher.qmp.unregister("x-my-command")
    assert dispatcher.qmp.lookup("x-my-command") is None


def test_errors_map_to_qmp_classes(caplog: pytest.LogCaptureFixture) -> None:
    dispatcher = create_dispatcher()
    failures = {
        "a": CommandError("Job 'j' not found", "DeviceNotActive"),
        "b": NodeBusy("Node 'n' is busy: block device is in use by an export"),
        "c": KeyError("bug"),
    }

    def handler(ctx: Any, args: dict[str, Any]) -> None:
        raise failures[args["node-name"]]

    dispatcher.qmp.register("blockdev-del", handler)
    with caplog.at_level(logging.ERROR):
        replies = {k: dispatcher.qmp_reply(Ctx(), "blockdev-del", {"node-name": k}) for k in "abc"}
    assert replies["a"]["error"] == {"class": "DeviceNotActive", "desc": "Job 'j' not found"}
    assert replies["b"]["error"] == {
        "class": "GenericError",
        "desc": "Node 'n' is busy: block device is in use by an export",
    }
    assert replies["c"]["error"]["class"] == "GenericError"
    assert replies["c"]["error"]["desc"] == "internal error: KeyError: 'bug'"
    assert [r.levelname for r in caplog.records] == ["ERROR"]  # only the bug is logged loudly


def test_builtins() -> None:
    dispatcher = create_dispatcher()
    ctx = Ctx()
    reply = dispatcher.qmp_reply(ctx, "qmp_capabilities", {})
    assert reply["error"] == {
        "class": "CommandNotFound",
        "desc": "Capabilities negotiation is already complete, command ignored",
    }
    assert dispatcher.execute(ctx, "quit", {}) == {}
    assert ctx.quits == 1
    assert dispatcher.execute(ctx, "human-monitor-command", {"command-line": "help quit"}) == (
        "quit|q  -- shut the daemon down\r\n"
    )
    assert dispatcher.run_hmp(ctx, "q") == ""
    assert ctx.quits == 2


def test_hmp_handler_failures_are_printed_with_their_message() -> None:
    dispatcher = create_dispatcher()

    def drive_del(ctx: Any, args: dict[str, Any]) -> None:
        if args["id"] == "bug":
            raise ZeroDivisionError("boom")
        raise NodeBusy(f"Node '{args['id']}' is busy: node is used as backing hd of 'top'")

    dispatcher.hmp.register("drive_del", "id:B", "device", "remove a drive", drive_del)
    assert dispatcher.run_hmp(Ctx(), "drive_del target0") == (
        "Error: Node 'target0' is busy: node is used as backing hd of 'top'\n"
    )
    assert dispatcher.run_hmp(Ctx(), "drive_del bug") == (
        "Error: internal error: ZeroDivisionError: boom\n"
    )


def test_human_monitor_command_runs_inside_the_command_lock() -> None:
    dispatcher = create_dispatcher()
    held = []
    dispatcher.hmp.register(
        "probe", "", "", "", lambda ctx, args: held.append(dispatcher.lock._is_owned()) or "x\n"
    )
    other_thread_got_in = []

    def other() -> None:
        got = dispatcher.lock.acquire(timeout=0)
        other_thread_got_in.append(got)
        if got:
            dispatcher.lock.release()

    def probe_and_race(ctx: Any, args: dict[str, Any]) -> str:
        thread = threading.Thread(target=other)
        thread.start()
        thread.join()
        return "done\n"

    dispatcher.hmp.register("race", "", "", "", probe_and_race)
    out = dispatcher.execute(Ctx(), "human-monitor-command", {"command-line": "probe"})
    assert out == "x\r\n" and held == [True]
    dispatcher.run_hmp(Ctx(), "race")
    assert other_thread_got_in == [False]

"""The commands the monitor framework provides itself, needing nothing from the block graph.

QMP: ``qmp_capabilities`` (in command mode; negotiation is the session's business),
``query-version``, ``query-commands``, ``quit``, ``human-monitor-command``.
HMP: ``help``/``?``, ``info`` (with ``info version``), ``quit``/``q``.

Version numbers: we speak QEMU 7.2's protocols and report ourselves as QEMU 7.2.0 so that
clients gating features on the version (libvirt, qemu.qmp users) treat us as that QEMU; the
``package`` string says what we really are.
"""

from __future__ import annotations

from typing import Any

from pyfleece import __version__
from pyfleece.errors import CommandError
from pyfleece.monitor.dispatch import Dispatcher
from pyfleece.monitor.hmp import HmpCommand, HmpTable, help_text, split_words

QEMU_VERSION = (7, 2, 0)
PACKAGE = f"pyfleece {__version__}"
VERSION_TEXT = ".".join(map(str, QEMU_VERSION))

#: HMP's greeting line (before the first prompt).
HMP_BANNER = f"QEMU {VERSION_TEXT} monitor - type 'help' for more information"
HMP_PROMPT = "(qemu) "


def version_info() -> dict[str, Any]:
    """QMP's ``VersionInfo`` (greeting and ``query-version``)."""
    major, minor, micro = QEMU_VERSION
    return {"qemu": {"micro": micro, "minor": minor, "major": major}, "package": PACKAGE}


def create_dispatcher() -> Dispatcher:
    """A dispatcher with the framework's own QMP and HMP commands registered."""
    dispatcher = Dispatcher()
    _register_qmp(dispatcher)
    _register_hmp(dispatcher)
    return dispatcher


def _register_qmp(dispatcher: Dispatcher) -> None:
    qmp = dispatcher.qmp

    def qmp_capabilities(ctx: Any, args: dict[str, Any]) -> None:
        # Only reached in command mode: the session handles negotiation itself.
        raise CommandError(
            "Capabilities negotiation is already complete, command ignored", "CommandNotFound"
        )

    def query_version(ctx: Any, args: dict[str, Any]) -> dict[str, Any]:
        return version_info()

    def query_commands(ctx: Any, args: dict[str, Any]) -> list[dict[str, str]]:
        return [{"name": name} for name in qmp.names()]

    def quit_(ctx: Any, args: dict[str, Any]) -> None:
        ctx.request_quit()

    def human_monitor_command(ctx: Any, args: dict[str, Any]) -> str:
        # QEMU's monitor output always ends lines with CRLF, this one included.
        return dispatcher.run_hmp(ctx, args["command-line"]).replace("\n", "\r\n")

    qmp.register("qmp_capabilities", qmp_capabilities)
    qmp.register("query-version", query_version)
    qmp.register("query-commands", query_commands)
    qmp.register("quit", quit_)
    qmp.register("human-monitor-command", human_monitor_command)


def _register_hmp(dispatcher: Dispatcher) -> None:
    table = dispatcher.hmp
    info = HmpTable()

    def help_(ctx: Any, args: dict[str, Any]) -> str:
        return help_text(table, split_words(args.get("name", "")))

    def info_(ctx: Any, args: dict[str, Any]) -> str:
        return help_text(table, ["info"])

    def info_version(ctx: Any, args: dict[str, Any]) -> str:
        return f"{VERSION_TEXT} ({PACKAGE})\n"

    def quit_(ctx: Any, args: dict[str, Any]) -> None:
        ctx.request_quit()

    table.register("help|?", "name:S?", "[cmd]", "show the help for all commands or one", help_)
    table.add(
        HmpCommand(
            "info", "item:s?", "[subcommand]", "show information about the daemon", info_, info
        )
    )
    table.register("quit|q", "", "", "shut the daemon down", quit_)
    info.register("version", "", "", "show the version of QEMU this daemon speaks as", info_version)

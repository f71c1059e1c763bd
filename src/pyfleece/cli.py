"""The ``pyfleece`` console script: picks the tool, configures logging, runs it.

Each tool parses its own command line (they mirror different QEMU programs) and returns an
exit status; this module only dispatches and owns the logging handlers.

Start-up time counts for the short-lived tools (``pyfleece img convert`` is benchmarked
against ``qemu-img``, process start included), so nothing is imported here that a tool
does not need: a tool's module is imported only once chosen, and ``logging`` only for the
tools that log (see ``setup_logging``).
"""

from __future__ import annotations

import importlib
import os
import sys
from typing import TYPE_CHECKING

from pyfleece import __version__

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

#: tool name -> (module with ``main(argv) -> int``, one-line summary, logs by default)
TOOLS: dict[str, tuple[str, str, bool]] = {
    "img": ("pyfleece.img.main", "create, inspect, check, map, compare and convert images", False),
    "nbd": ("pyfleece.nbd.tool", "export one image over NBD (like qemu-nbd)", True),
    "daemon": (
        "pyfleece.daemon.main",
        "storage daemon with QMP/HMP, jobs and NBD (like qsd)",
        True,
    ),
}

USAGE = """\
usage: pyfleece TOOL [ARGS...]

pyfleece serves disks, takes point-in-time snapshots of them by copy-before-write
(image fleecing) and exports them over NBD, speaking QEMU's command lines and protocols.

tools:
{tools}

Run 'pyfleece TOOL --help' for a tool's options.
"""


def usage() -> str:
    lines = [f"  {name:<8} {summary}" for name, (_, summary, _) in TOOLS.items()]
    return USAGE.format(tools="\n".join(lines))


def setup_logging(always: bool = True) -> None:
    """Logs to stderr; PYFLEECE_LOG=debug|info|warning picks the level (default warning).

    With ``always`` False (the short-lived ``img`` tool) the handler is installed only
    when PYFLEECE_LOG is set, which spares importing ``logging`` (a few milliseconds of
    every run); a warning logged otherwise still reaches stderr, through Python's
    last-resort handler (the message alone).
    """
    if not always and "PYFLEECE_LOG" not in os.environ:
        return
    import logging

    level = os.environ.get("PYFLEECE_LOG", "warning").upper()
    logging.basicConfig(
        level=getattr(logging, level, logging.WARNING),
        format="%(asctime)s %(name)s %(levelname)s: %(message)s",
        stream=sys.stderr,
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help", "help"):
        sys.stdout.write(usage())
        return 0 if args else 1
    if args[0] in ("-V", "--version"):
        print(f"pyfleece {__version__}")
        return 0
    tool = TOOLS.get(args[0])
    if tool is None:
        sys.stderr.write(f"pyfleece: unknown tool '{args[0]}'\n\n{usage()}")
        return 1
    setup_logging(tool[2])
    module = importlib.import_module(tool[0])
    run: Callable[[list[str]], int] = module.main
    try:
        return run(args[1:])
    except KeyboardInterrupt:
        return 130

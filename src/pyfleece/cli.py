"""The ``pyfleece`` console script: picks the tool, configures logging, runs it.

Each tool parses its own command line (they mirror different QEMU programs) and returns an
exit status; this module only dispatches and owns the logging handlers.

Start-up and exit time count for the short-lived tool (``pyfleece img convert`` is
benchmarked against ``qemu-img``, process start included), so nothing is imported here
that a tool does not need: a tool's module is imported only once chosen, ``logging`` only
for the tools that log (see ``setup_logging``); and run as the program, the short-lived
tool ends the process without the interpreter's teardown (see ``exit_now``).
"""

from __future__ import annotations

import importlib
import os
import sys
from typing import TYPE_CHECKING

from pyfleece import __version__

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

#: tool name -> (module with ``main(argv) -> int``, one-line summary, short-lived)
TOOLS: dict[str, tuple[str, str, bool]] = {
    "img": ("pyfleece.img.main", "create, inspect, check, map, compare and convert images", True),
    "nbd": ("pyfleece.nbd.tool", "export one image over NBD (like qemu-nbd)", False),
    "daemon": (
        "pyfleece.daemon.main",
        "storage daemon with QMP/HMP, jobs and NBD (like qsd)",
        False,
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


def setup_logging(short_lived: bool = False) -> None:
    """Logs to stderr; PYFLEECE_LOG=debug|info|warning picks the level (default warning).

    For a short-lived tool (``img``) the handler is installed only when PYFLEECE_LOG is
    set, which spares importing ``logging`` (a few milliseconds of every run); a warning
    logged otherwise still reaches stderr, through Python's last-resort handler (the
    message alone).
    """
    if short_lived and "PYFLEECE_LOG" not in os.environ:
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
    short_lived = tool[2]
    setup_logging(short_lived)
    try:
        run: Callable[[list[str]], int] = importlib.import_module(tool[0]).main
        status = run(args[1:])
    except KeyboardInterrupt:  # Ctrl-C at any point: no traceback, the shell's status
        status = 130
    if short_lived and argv is None:  # run as the program, not called by Python code
        exit_now(status)
    return status


def exit_now(status: int) -> None:
    """Ends the process at once, skipping the interpreter's teardown (freeing every
    module and object: 5 ms, a sixth of a small ``img`` run).

    Only for a tool that has finished everything: its threads joined, its nodes closed,
    and nothing buffered but the standard streams (``img`` writes images through file
    descriptors). The streams are flushed first; if that fails (a closed pipe), this
    returns and the interpreter's usual exit reports it.
    """
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except (OSError, ValueError):
        return
    os._exit(status)

"""``pyfleece daemon``: parse the command line, start everything, serve until told to stop."""

from __future__ import annotations

import logging
import sys

from pyfleece import __version__
from pyfleece.daemon.args import USAGE, parse_args
from pyfleece.daemon.core import Daemon, remove_pidfile, write_pidfile
from pyfleece.errors import PyfleeceError

log = logging.getLogger(__name__)


def main(argv: list[str]) -> int:
    try:
        args = parse_args(argv)
    except PyfleeceError as err:
        sys.stderr.write(f"pyfleece daemon: {err}\nTry 'pyfleece daemon --help'.\n")
        return 1
    if args.show_help:
        sys.stdout.write(USAGE)
        return 0
    if args.show_version:
        print(f"pyfleece daemon {__version__} (speaks QEMU 7.2's protocols)")
        return 0
    daemon = Daemon()
    daemon.install_signal_handlers()
    try:
        for action in args.actions:
            try:
                daemon.apply(action)
            except PyfleeceError as err:
                raise PyfleeceError(f"--{action.kind} {action.text}: {err}") from err
        daemon.start_monitors()
    except PyfleeceError as err:
        sys.stderr.write(f"pyfleece daemon: {err}\n")
        daemon.shutdown()
        return 1
    if args.pidfile:
        write_pidfile(args.pidfile)
    log.info("ready")
    try:
        daemon.wait()
    finally:
        daemon.shutdown()
        if args.pidfile:
            remove_pidfile(args.pidfile)
    return 0

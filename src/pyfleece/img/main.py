"""``pyfleece img``: qemu-img's create, info, check, map, compare and convert.

Each command lives in its own module exposing ``run(argv) -> int`` and ``HELP``; this
module dispatches on the first word and turns ``Fail`` into qemu-img's error line and exit
status. Exit statuses follow qemu-img: 0 success, 1 error, and the commands' own
(``check``: 2 corruption, 3 leaks, 63 unsupported; ``compare``: 1 different, 2 error).
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Sequence
from typing import cast

from pyfleece import __version__
from pyfleece.img.common import PROG, TRY_HELP, Fail, print_fail

#: command -> module holding ``run(argv) -> int`` and ``HELP``
COMMANDS: dict[str, str] = {
    "check": "pyfleece.img.check",
    "compare": "pyfleece.img.compare",
    "convert": "pyfleece.img.convert",
    "create": "pyfleece.img.create",
    "info": "pyfleece.img.info",
    "map": "pyfleece.img.map",
}

USAGE = f"""\
usage: {PROG} [standard options] command [command options]
Disk image utility with qemu-img's syntax, output and exit codes

    '-h', '--help'       display this help and exit
    '-V', '--version'    output version information and exit

Command syntax:
  check [-q] [-f fmt] [--output=ofmt] [-r [leaks | all]] [-U] filename
  compare [-f fmt] [-F fmt] [-p] [-q] [-s] [-U] filename1 filename2
  convert [-U] [-p] [-q] [-n] [-f fmt] [-O output_fmt] [-B backing_file [-F backing_fmt]] \
[-o options] [-S sparse_size] [-m num_workers] [-W] filename [filename2 [...]] output_filename
  create [-q] [-f fmt] [-b backing_file [-F backing_fmt]] [-u] [-o options] filename [size]
  info [-f fmt] [--output=ofmt] [--backing-chain] [-U] filename
  map [-f fmt] [--start-offset=offset] [--max-length=len] [--output=ofmt] [-U] filename

Command parameters:
  'filename' is a disk image filename
  'fmt' is the disk image format (raw or qcow2). It is guessed automatically when omitted
  'size' is the disk image size in bytes. Optional suffixes 'k' or 'K' (kilobyte, 1024),
    'M' (megabyte, 1024k), 'G' (gigabyte, 1024M), 'T' (terabyte, 1024G), 'P' (petabyte,
    1024T) and 'E' (exabyte, 1024P) are supported. 'b' is ignored.
  'output_filename' is the destination disk image filename
  'output_fmt' is the destination format
  'options' is a comma separated list of format specific options in a name=value format.
    Use -o help for an overview of the options supported by the format
  '-p' show progress of command (only certain commands)
  '-q' use Quiet mode - do not print any output (except errors)
  '-S' the consecutive number of bytes (defaults to 4k) that must contain only zeros for
    convert to leave them unallocated in the target; 0 writes every byte
  '--output' takes the format in which the output must be done (human or json)
  '-n' skips the target volume creation (useful if the volume is created beforehand)
  '-U' opens images shared (read-only), even if another process holds them for writing

Parameters to check subcommand:
  '-r' tries to repair any inconsistencies that are found during the check.
       '-r leaks' repairs only cluster leaks, whereas '-r all' fixes all kinds of errors.

Parameters to compare subcommand:
  '-f' first image format
  '-F' second image format
  '-s' run in Strict mode - fail on different image size or sector allocation

Run '{PROG} COMMAND --help' for one command's options.
Supported formats: raw qcow2
"""


def usage() -> str:
    return USAGE


def main(argv: Sequence[str]) -> int:
    """Runs one command; returns its exit status."""
    args = list(argv)
    if not args:
        print_fail(Fail("Not enough arguments", usage=True))
        return 1
    first = args[0]
    if first in ("-h", "--help", "help"):
        sys.stdout.write(usage())
        return 0
    if first in ("-V", "--version"):
        print(f"{PROG} version {__version__}")
        return 0
    module_name = COMMANDS.get(first)
    if module_name is None:
        if first.startswith("-"):
            print_fail(Fail(f"unrecognized option '{first}'", usage=True))
        else:
            print_fail(Fail(f"Command not found: {first}", usage=True))
        return 1
    module = importlib.import_module(module_name)
    rest = args[1:]
    if "-h" in rest or "--help" in rest:
        sys.stdout.write(cast(str, module.HELP))
        return 0
    run = cast(Callable[[list[str]], int], module.run)
    try:
        return run(rest)
    except Fail as fail:
        print_fail(fail)
        return fail.status
    except BrokenPipeError:
        return 1


__all__ = ["TRY_HELP", "main", "usage"]

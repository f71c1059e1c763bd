"""``pyfleece img check``: ``qemu-img check`` for qcow2 images, with its exit codes.

Exit status: 0 clean, 2 corruptions, 3 leaks only, 1 the check could not be completed,
63 the format has no check (raw). With ``-r leaks`` or ``-r all`` the image is repaired
and checked a second time; the report is the second check's, with the repair counts of the
first, as qemu-img prints it. The work is ``block.qcow2.check``; this module opens the
image (its backing chain must open too, as for qemu-img) and prints. The check works on the
image's file node, which claims what QEMU's qcow2 would (read, plus write and resize when
repairing), so a locked image is refused as qemu-img refuses it; ``-U`` reads it anyway.
"""

from __future__ import annotations

import sys
from typing import Any

from pyfleece.block import locking
from pyfleece.block.image import TOOL_HOLDER, protocol_options
from pyfleece.block.node import Node
from pyfleece.block.qcow2 import check as qcheck
from pyfleece.block.registry import OpenContext, open_node
from pyfleece.errors import PyfleeceError
from pyfleece.img.common import (
    Fail,
    describe,
    lock_hint,
    open_for,
    output_format,
    parse_args,
    qjson,
)

HELP = """\
usage: pyfleece img check [-q] [-f fmt] [--output=ofmt] [-r [leaks | all]] [-U] filename

Checks a qcow2 image's metadata for consistency, as qemu-img check does.
  -r leaks   repair cluster leaks
  -r all     repair all kinds of errors (rebuilding the refcounts if needed)
  --output   'human' (default) or 'json'
  -q         quiet
  -U, --force-share  check an image another process holds open for writing (no repair)
Exit status: 0 no errors, 1 check not completed, 2 corruptions found, 3 leaks found,
63 the image format does not support checks.
"""

UNSUPPORTED = 63


def run(argv: list[str]) -> int:
    opts, operands = parse_args(
        argv,
        "hf:r:T:qU",
        ["help", "format=", "repair=", "output=", "force-share", "object=", "image-opts"],
    )
    fmt: str | None = None
    output: str | None = None
    fix = qcheck.Fix.NONE
    quiet = force_share = False
    for opt, value in opts:
        if opt in ("-f", "--format"):
            fmt = value
        elif opt in ("-r", "--repair"):
            fix = _repair_mode(value)
        elif opt == "--output":
            output = value
        elif opt == "-q":
            quiet = True
        elif opt in ("-U", "--force-share"):
            force_share = True
        elif opt in ("--object", "--image-opts"):
            raise Fail(f"{opt} is not supported by pyfleece")
    if len(operands) != 1:
        raise Fail("Expecting one image file name", usage=True)
    ofmt = output_format(output)
    filename = operands[0]
    if fix and force_share:
        raise Fail(f"Could not open '{filename}': {FORCE_SHARE_RW}")
    if fix:  # qemu-img opens for writing first: another user is reported as its lock
        _open_file(filename, writable=True).close()
    node = open_for(filename, fmt, force_share=force_share)
    driver = node.driver
    node.close()
    if driver != "qcow2":
        raise Fail("This image format does not support checks", UNSUPPORTED)
    return check_image(filename, fix, ofmt, quiet, force_share=force_share)


FORCE_SHARE_RW = "force-share=on can only be used with read-only images"


def _repair_mode(value: str) -> qcheck.Fix:
    if value == "leaks":
        return qcheck.Fix.LEAKS
    if value == "all":
        return qcheck.Fix.LEAKS | qcheck.Fix.ERRORS
    raise Fail(f"Unknown option value for -r (expecting 'leaks' or 'all'): {value}", usage=True)


def check_image(
    filename: str, fix: qcheck.Fix, ofmt: str, quiet: bool, *, force_share: bool = False
) -> int:
    """Runs the check (and repair) and prints the report; returns the exit status."""
    file = _open_file(filename, writable=bool(fix), force_share=force_share)
    try:
        res = _run_check(file, fix)
        if res.corruptions_fixed or res.leaks_fixed:
            if ofmt == "human" and not quiet:
                print(
                    "The following inconsistencies were found and repaired:\n\n"
                    f"    {res.leaks_fixed} leaked clusters\n"
                    f"    {res.corruptions_fixed} corruptions\n\n"
                    "Double checking the fixed image now..."
                )
            fixed = (res.corruptions_fixed, res.leaks_fixed)
            res = _run_check(file, qcheck.Fix.NONE)
            res.corruptions_fixed, res.leaks_fixed = fixed
    finally:
        file.close()
    if not quiet:
        print(qjson(as_json(res, filename)) if ofmt == "json" else human(res), end="\n")
    if res.check_errors:
        raise Fail("Check failed")
    if res.corruptions:
        return 2
    return 3 if res.leaks else 0


def _open_file(filename: str, writable: bool, force_share: bool = False) -> Node:
    """The image's file node, claimed as QEMU's qcow2 claims its file."""
    options = protocol_options(filename)
    options["force-share"] = force_share
    perm = locking.Perm.CONSISTENT_READ
    if writable:
        perm |= locking.Perm.WRITE | locking.Perm.RESIZE
    try:
        with locking.opening(options, not writable):
            file = open_node(options, OpenContext(read_only=not writable))
        try:
            locking.claim(file, locking.Claim(TOOL_HOLDER, "file", perm, locking.SHARED_READ))
        except BaseException:
            file.close()
            raise
    except PyfleeceError as err:
        message = f"Could not open '{filename}': {describe(err)}"
        raise Fail(message, hint=lock_hint(err)) from err
    return file


def _run_check(file: Node, fix: qcheck.Fix) -> qcheck.CheckResult:
    try:
        return qcheck.check(file, fix, log=_stderr)
    except (qcheck.CheckFailed, PyfleeceError, OSError) as err:
        raise Fail(f"Check failed: {describe(err)}") from err


def _stderr(line: str) -> None:
    sys.stderr.write(line + "\n")


def as_json(res: qcheck.CheckResult, filename: str) -> dict[str, Any]:
    """qemu-img's ImageCheck object: optional counters appear only when non-zero."""
    out: dict[str, Any] = {"filename": filename, "format": "qcow2"}
    out["check-errors"] = res.check_errors
    for key in (
        "image_end_offset",
        "corruptions",
        "leaks",
        "corruptions_fixed",
        "leaks_fixed",
        "total_clusters",
        "allocated_clusters",
        "fragmented_clusters",
        "compressed_clusters",
    ):
        value = getattr(res, key)
        if value:
            out[key.replace("_", "-")] = value
    return out


def human(res: qcheck.CheckResult) -> str:
    """qemu-img's human-readable report."""
    lines: list[str] = []
    if not (res.corruptions or res.leaks or res.check_errors):
        lines.append("No errors were found on the image.")
    if res.corruptions:
        lines += [
            "",
            f"{res.corruptions} errors were found on the image.",
            "Data may be corrupted, or further writes to the image may corrupt it.",
        ]
    if res.leaks:
        lines += [
            "",
            f"{res.leaks} leaked clusters were found on the image.",
            "This means waste of disk space, but no harm to data.",
        ]
    if res.check_errors:
        lines += ["", f"{res.check_errors} internal errors have occurred during the check."]
    if res.total_clusters and res.allocated_clusters:
        alloc = res.allocated_clusters
        lines.append(
            f"{alloc}/{res.total_clusters} = {alloc * 100.0 / res.total_clusters:.2f}% "
            f"allocated, {res.fragmented_clusters * 100.0 / alloc:.2f}% fragmented, "
            f"{res.compressed_clusters * 100.0 / alloc:.2f}% compressed clusters"
        )
    if res.image_end_offset:
        lines.append(f"Image end offset: {res.image_end_offset}")
    return "\n".join(lines)


__all__ = ["HELP", "as_json", "check_image", "human", "run"]

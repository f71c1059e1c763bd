"""``pyfleece img info``: what ``qemu-img info`` reports, human or JSON.

Each image is opened without its backing chain (as qemu-img does); with
``--backing-chain`` the chain is walked by the full backing file names the images report,
refusing a name seen twice. The keys, their values and their order are qemu-img 7.2's:
``virtual-size``, ``filename``, ``cluster-size``, ``format``, ``actual-size`` (the blocks
the image's files occupy), ``format-specific``, the backing names and ``dirty-flag``.
"""

from __future__ import annotations

import time
from typing import Any

from pyfleece.block.node import Node
from pyfleece.block.qcow2.check import Snapshot, read_snapshots
from pyfleece.block.qcow2.format import Header
from pyfleece.img.common import (
    Fail,
    allocated_size,
    nbd_name,
    open_for,
    output_format,
    parse_args,
    qdict_order,
    qjson,
    size_to_str,
)

HELP = """\
usage: pyfleece img info [-f fmt] [--output=ofmt] [--backing-chain] [-U] filename

Shows an image's format, virtual size, disk usage, cluster size, backing file and
format-specific details, as qemu-img info does.
  -f fmt           the image's format (probed when omitted)
  --output=ofmt    'human' (default) or 'json'
  --backing-chain  also show every image of the backing chain
  -U, --force-share  open the image shared, even if another process holds it for writing
"""


def run(argv: list[str]) -> int:
    opts, operands = parse_args(
        argv, "f:hU", ["format=", "output=", "backing-chain", "force-share", "help", "object="]
    )
    fmt: str | None = None
    output: str | None = None
    chain = force_share = False
    for opt, value in opts:
        if opt in ("-f", "--format"):
            fmt = value
        elif opt in ("-U", "--force-share"):
            force_share = True
        elif opt == "--output":
            output = value
        elif opt == "--backing-chain":
            chain = True
        elif opt == "--object":
            raise Fail("--object is not supported by pyfleece")
    if len(operands) != 1:
        raise Fail("Expecting one image file name", usage=True)
    ofmt = output_format(output)
    infos = collect(operands[0], fmt, chain, force_share=force_share)
    if ofmt == "json":
        print(qjson(infos if chain else infos[0]))
    else:
        print("\n".join(human(info) for info in infos), end="")
    return 0


def collect(
    filename: str, fmt: str | None, chain: bool, *, force_share: bool = False
) -> list[dict[str, Any]]:
    """Info for the image, and with ``chain`` for each image below it (``force_share``:
    qemu-img's ``-U``).

    Raises:
        Fail: an image cannot be opened, or the chain loops.
    """
    seen: set[str] = set()
    infos = []
    name: str | None = filename
    while name is not None:
        if name in seen:
            raise Fail(f"Backing file '{name}' creates an infinite loop.")
        seen.add(name)
        node = open_for(name, fmt, no_backing=True, force_share=force_share)
        try:
            info = image_info(node, name)
        finally:
            node.close()
        infos.append(info)
        if not chain:
            break
        name = info.get("full-backing-filename")
        fmt = info.get("backing-filename-format")
    return infos


def image_info(node: Node, filename: str) -> dict[str, Any]:
    """The ImageInfo qemu-img reports for one opened image (without its backing)."""
    info: dict[str, Any] = {
        "virtual-size": -(-node.size // 512) * 512,
        "filename": nbd_name(node) or filename,  # QEMU shows NBD images by its own name
        "format": node.driver,
        "dirty-flag": False,
    }
    actual = allocated_size(node)
    if actual is not None:
        info["actual-size"] = actual
    describe = getattr(node, "info", None)
    if callable(describe):
        info.update(describe())
    header, file = getattr(node, "header", None), node.child("file")
    if isinstance(header, Header) and header.nb_snapshots and file is not None:
        info["snapshots"] = [_snapshot(sn) for sn in read_snapshots(file, header)[0]]
    return info


def _snapshot(sn: Snapshot) -> dict[str, Any]:
    """QEMU's SnapshotInfo."""
    out: dict[str, Any] = {
        "id": sn.id,
        "name": sn.name,
        "vm-state-size": sn.vm_state_size,
        "date-sec": sn.date_sec,
        "date-nsec": sn.date_nsec,
        "vm-clock-sec": sn.vm_clock_nsec // 1_000_000_000,
        "vm-clock-nsec": sn.vm_clock_nsec % 1_000_000_000,
    }
    if sn.icount is not None:
        out["icount"] = sn.icount
    return out


def snapshot_lines(snapshots: list[dict[str, Any]]) -> list[str]:
    """qemu-img's "Snapshot list:" table."""
    lines = ["Snapshot list:", f"{'ID':<10}{'TAG':<17}{'VM SIZE':>8}{'DATE':>20}{'VM CLOCK':>13}"
             f"{'ICOUNT':>11}"]  # fmt: skip
    for sn in snapshots:
        date = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(sn["date-sec"]))
        secs = sn["vm-clock-sec"]
        clock = (
            f"{secs // 3600:02d}:{secs // 60 % 60:02d}:{secs % 60:02d}."
            f"{sn['vm-clock-nsec'] // 1_000_000:03d}"
        )
        icount = str(sn["icount"]) if "icount" in sn else ""
        size = size_to_str(sn["vm-state-size"])
        lines.append(f"{sn['id']:<9} {sn['name']:<16} {size:>8}{date:>20}{clock:>13}{icount:>11}")
    return lines


def human(info: dict[str, Any]) -> str:
    """qemu-img's human-readable block for one image."""
    actual = info.get("actual-size")
    lines = [
        f"image: {info['filename']}",
        f"file format: {info['format']}",
        f"virtual size: {size_to_str(info['virtual-size'])} ({info['virtual-size']} bytes)",
        f"disk size: {size_to_str(actual) if actual is not None else 'unavailable'}",
    ]
    if "cluster-size" in info:
        lines.append(f"cluster_size: {info['cluster-size']}")
    if info.get("dirty-flag"):
        lines.append("cleanly shut down: no")
    if "backing-filename" in info:
        line = f"backing file: {info['backing-filename']}"
        full = info.get("full-backing-filename")
        if full is None:
            line += " (cannot determine actual path)"
        elif full != info["backing-filename"]:
            line += f" (actual path: {full})"
        lines.append(line)
        if "backing-filename-format" in info:
            lines.append(f"backing file format: {info['backing-filename-format']}")
    if info.get("snapshots"):
        lines.extend(snapshot_lines(info["snapshots"]))
    specific = info.get("format-specific")
    if specific:
        lines.append("Format specific information:")
        lines.extend(dump(specific["data"], 1))
    return "\n".join(lines) + "\n"


def dump(value: Any, indent: int) -> list[str]:
    """QEMU's indented dump of a QObject: dict keys with dashes as spaces, lists as [i]."""
    lines: list[str] = []
    pad = " " * (4 * indent)
    if isinstance(value, dict):
        items = [(key.replace("-", " "), item) for key, item in qdict_order(value).items()]
    else:
        items = [(f"[{i}]", item) for i, item in enumerate(value)]
    for label, item in items:
        if isinstance(item, dict | list):
            lines.append(f"{pad}{label}:")
            lines.extend(dump(item, indent + 1))
        else:
            lines.append(f"{pad}{label}: {_scalar(item)}")
    return lines


def _scalar(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)

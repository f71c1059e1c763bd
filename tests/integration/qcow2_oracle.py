"""QEMU's tools as oracles for the qcow2 tests: create, fill, convert, check, map, compare.

Every helper finds its tool through ``require_tool`` (a skip locally, a failure in CI).
``our_map`` renders a node's extents the way ``qemu-img map --output=json`` does, so the
two can be compared entry for entry.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

from pyfleece.block.node import Node
from tests.conftest import require_tool

MapEntry = dict[str, Any]


def run(tool: str, *args: str, cwd: Path | None = None, check: bool = True) -> str:
    """Runs a QEMU tool; returns its stdout. With ``check``, a non-zero exit fails loudly."""
    proc = subprocess.run(
        [require_tool(tool), *args], cwd=cwd, capture_output=True, text=True, timeout=60
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"{tool} {' '.join(args)} exited {proc.returncode}: {proc.stderr}")
    return proc.stdout


def create(
    path: Path,
    size: int | str,
    options: str = "",
    *,
    backing: str | None = None,
    backing_fmt: str | None = None,
    fmt: str = "qcow2",
) -> Path:
    """``qemu-img create``; a relative ``backing`` stays relative to the image's directory."""
    args = ["create", "-q", "-f", fmt]
    if options:
        args += ["-o", options]
    if backing is not None:
        args += ["-b", backing, "-F", backing_fmt or "raw"]
    run("qemu-img", *args, path.name, str(size), cwd=path.parent)
    return path


def qemu_io(path: Path, *commands: str, fmt: str = "qcow2", shared: bool = False) -> str:
    """qemu-io commands on an image; ``shared`` reads (only) an image another process
    holds open for writing (``-r -U``: QEMU's locking refuses it otherwise)."""
    args = ["-f", fmt, *(["-r", "-U"] if shared else [])]
    for command in commands:
        args += ["-c", command]
    out = run("qemu-io", *args, str(path))
    if "failed" in out or "error" in out.lower():
        raise AssertionError(f"qemu-io {commands}: {out}")
    return out


def to_raw(path: Path) -> bytes:
    """The guest contents as ``qemu-img convert -O raw`` sees them."""
    out = path.with_name(path.name + ".converted.raw")
    run("qemu-img", "convert", "-O", "raw", str(path), str(out))
    data = out.read_bytes()
    out.unlink()
    return data


def check(path: Path, *, shared: bool = False) -> tuple[int, dict[str, Any]]:
    """``qemu-img check --output=json``: (exit code, report); ``shared`` (``-U``) checks an
    image another process holds open for writing."""
    proc = subprocess.run(
        [
            require_tool("qemu-img"),
            "check",
            "--output=json",
            *(["-U"] if shared else []),
            str(path),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    try:
        report = json.loads(proc.stdout) if proc.stdout.strip() else {}
    except json.JSONDecodeError:
        report = {"unparsed": proc.stdout}
    report["stderr"] = proc.stderr
    return proc.returncode, report


def assert_clean(path: Path, *, leaks_allowed: bool = False, shared: bool = False) -> None:
    code, report = check(path, shared=shared)
    allowed = (0, 3) if leaks_allowed else (0,)
    assert code in allowed, f"qemu-img check exit {code}: {report}"


def compare_raw(path: Path, expected: bytes) -> None:
    """``qemu-img compare`` of the image against ``expected`` as a raw image."""
    raw = path.with_name(path.name + ".expected.raw")
    raw.write_bytes(expected)
    proc = subprocess.run(
        [require_tool("qemu-img"), "compare", "-F", "raw", str(path), str(raw)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    raw.unlink()
    assert proc.returncode == 0, f"qemu-img compare: {proc.stdout}{proc.stderr}"


def qemu_map(path: Path) -> list[MapEntry]:
    return list(json.loads(run("qemu-img", "map", "--output=json", str(path))))


def info(path: Path) -> dict[str, Any]:
    return dict(json.loads(run("qemu-img", "info", "--output=json", str(path))))


def our_map(node: Node) -> list[MapEntry]:
    """The node's extents in ``qemu-img map --output=json``'s shape and merging."""
    out: list[MapEntry] = []
    for ext in node.extents():
        entry: MapEntry = {
            "start": ext.offset,
            "length": ext.length,
            "depth": ext.depth,
            "present": ext.allocated,
            "zero": ext.zero,
            "data": ext.data,
        }
        if ext.host_offset is not None:
            entry["offset"] = ext.host_offset
        if out and _continues(out[-1], entry):
            out[-1]["length"] += entry["length"]
        else:
            out.append(entry)
    return out


def _continues(prev: MapEntry, entry: MapEntry) -> bool:
    keys = ("depth", "present", "zero", "data")
    if any(prev[k] != entry[k] for k in keys) or ("offset" in prev) != ("offset" in entry):
        return False
    return "offset" not in prev or prev["offset"] + prev["length"] == entry["offset"]


def without_offsets(entries: list[MapEntry]) -> list[MapEntry]:
    """Map entries with host offsets reduced to whether there is one, re-merged."""
    out: list[MapEntry] = []
    for entry in entries:
        item = {k: v for k, v in entry.items() if k != "offset"}
        item["has_offset"] = "offset" in entry
        keys = ("depth", "present", "zero", "data", "has_offset")
        if out and all(out[-1][k] == item[k] for k in keys):
            out[-1]["length"] += item["length"]
        else:
            out.append(item)
    return out

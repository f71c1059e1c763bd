"""The ``qcow2`` format driver: opening (options, header, backing chain) and ``info()``.

Options follow QEMU's ``BlockdevOptionsQcow2``: ``file`` (required), ``backing`` (absent: the
header's backing file; null: none; a string: a node in the graph; a dict: options to open),
and QEMU's tuning options, accepted and validated (only the cache sizes have an effect).

A backing file named by the header is resolved against the image's directory (``json:``
names, URIs and absolute names as they are), opened read-only with the header's backing
format (probed when absent), and refused when the chain loops back to an image already in
it or grows deeper than ``MAX_CHAIN_DEPTH``. The backing edge may be swapped while the node
is open (fleecing does): every read looks it up anew.

Permissions (``block/locking.py``), as QEMU's qcow2 takes them on its file: consistent read,
plus write and resize when writable; it shares only consistent read and write-unchanged, so
no other writer (or resizer) may use the file while the image is open. They are claimed
before the header is read, so a locked image fails with the lock's error.

Writable opens are refused for images with the corrupt bit (they open read-only). An image
with the dirty bit (lazy refcounts not written back) is repaired on a writable open, as
QEMU does, by ``check.repair_dirty``; a read-only open reads it as it is.
"""

from __future__ import annotations

import os
from typing import Any

from pyfleece.block import locking
from pyfleece.block.file import FileNode
from pyfleece.block.image import image_options, is_uri
from pyfleece.block.node import Node
from pyfleece.block.options import Options
from pyfleece.block.qcow2.bitmaps import bitmaps_info
from pyfleece.block.qcow2.format import (
    Compat,
    CompressionType,
    Header,
    Incompat,
    decode_header,
    l1_entries_needed,
)
from pyfleece.block.qcow2.writes import Qcow2Writer
from pyfleece.block.registry import MAX_CHAIN_DEPTH, OpenContext, open_child, open_node, register
from pyfleece.errors import ConfigError, CorruptImage, ImageError, UnsupportedImage

MiB = 1 << 20
_FROM_HEADER = object()  # no ``backing`` option: use the header's backing file
DEFAULT_L2_CACHE = 32 * MiB
HEADER_READ = 2 * MiB


class Qcow2Node(Qcow2Writer):
    """A qcow2 image over its ``file`` child, with an optional ``backing`` child.

    Attributes:
        header: the decoded header (``format.Header``), kept current.
        cluster_size: bytes per cluster (the copy unit a fleecing job should respect).
        filename: the image's host file name, when its container is a file.
    """

    def __init__(self, *args: Any, filename: str | None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.filename = filename

    @property
    def backing_filename(self) -> str | None:
        """The backing file name as the header stores it."""
        return self.header.backing_file

    @property
    def backing_format(self) -> str | None:
        return self.header.backing_format

    @property
    def full_backing_filename(self) -> str | None:
        """The header's backing file name resolved against the image's directory."""
        name = self.header.backing_file
        return resolve_backing(name, self.filename) if name else None

    def _close(self) -> None:
        try:
            super()._close()  # writes metadata back: the locks still hold meanwhile
        finally:
            file = self.child("file")
            if file is not None:
                locking.release(file, f"node '{self.node_name}'", "file")

    def info(self) -> dict[str, Any]:
        """What ``qemu-img info --output=json`` reports from the image itself: the cluster
        size, the backing file, the dirty flag and the "format-specific" block.

        Raises:
            CorruptImage: the bitmaps extension is malformed.
        """
        h = self.header
        v3 = h.version >= 3
        data: dict[str, Any] = {
            "compat": "1.1" if v3 else "0.10",
            "compression-type": "zstd" if h.compression_type == CompressionType.ZSTD else "zlib",
        }
        if v3:
            data["lazy-refcounts"] = bool(h.compatible & Compat.LAZY_REFCOUNTS)
            bitmaps = bitmaps_info(self.file, h)
            if bitmaps is not None:
                data["bitmaps"] = bitmaps
        data["refcount-bits"] = h.refcount_bits
        if v3:
            data["corrupt"] = bool(h.incompatible & Incompat.CORRUPT)
            data["extended-l2"] = bool(h.incompatible & Incompat.EXTL2)
        out: dict[str, Any] = {"cluster-size": self.cluster_size}
        if h.backing_file:
            out["backing-filename"] = h.backing_file
            out["full-backing-filename"] = self.full_backing_filename
            if h.backing_format:
                out["backing-filename-format"] = h.backing_format
        out["format-specific"] = {"type": "qcow2", "data": data}
        out["dirty-flag"] = bool(h.incompatible & Incompat.DIRTY)
        return out


def resolve_backing(name: str, image_filename: str | None) -> str:
    """A header's backing file name as QEMU resolves it: relative to the image's directory."""
    if name.startswith("json:") or is_uri(name) or os.path.isabs(name) or not image_filename:
        return name
    return os.path.join(os.path.dirname(image_filename), name)


def read_header(file: Node) -> Header:
    """Reads and decodes the header of the image in ``file``.

    Raises:
        CorruptImage, UnsupportedImage: see ``format.decode_header``.
    """
    size = file.size
    head = bytearray(min(size, HEADER_READ))
    file.readinto(0, memoryview(head))
    return decode_header(bytes(head), size)


@register("qcow2")
def _open_qcow2(opts: Options, name: str, ctx: OpenContext) -> Node:
    file, owned = open_child(opts.raw("file"), ctx, "file")
    try:
        _claim_file(file, name, writable=not ctx.read_only)
        backing = opts.raw("backing") if opts.has("backing") else _FROM_HEADER
        l2_cache, refcount_cache, lazy = _tuning(opts)
        opts.finish()
        filename = file.filename if isinstance(file, FileNode) else None
        # Images not in a host file (NBD...) still count toward the chain's depth.
        real = os.path.realpath(filename) if filename else f"<node {name}>"
        _check_chain(filename or name, real, ctx)
        header = read_header(file)
        if lazy and header.version < 3:
            raise ConfigError(
                "Lazy refcounts require a qcow2 image with at least qemu 1.1 compatibility level"
            )
        if not ctx.read_only:
            header = _check_writable(header, file)
        if l2_cache is None:
            tables = l1_entries_needed(header.size, header.cluster_bits)
            l2_cache = min(DEFAULT_L2_CACHE, tables << header.cluster_bits)
        node = Qcow2Node(
            name,
            file,
            header,
            owned=owned,
            read_only=ctx.read_only,
            l2_cache=l2_cache,
            refcount_cache=refcount_cache or max(l2_cache // 4, MiB),
            filename=filename,
        )
    except BaseException:
        locking.release(file, f"node '{name}'", "file")
        if owned:
            file.close()
        raise
    try:
        _attach_backing(node, backing, ctx, real)
    except BaseException:
        node.close()
        raise
    return node


def _claim_file(file: Node, name: str, *, writable: bool) -> None:
    """QEMU's qcow2 permissions on its file (see the module docstring)."""
    perm = locking.Perm.CONSISTENT_READ
    if writable and not file.read_only:
        perm |= locking.Perm.WRITE | locking.Perm.RESIZE
    locking.claim(file, locking.Claim(f"node '{name}'", "file", perm, locking.SHARED_READ))


def _check_chain(filename: str, real: str, ctx: OpenContext) -> None:
    if len(ctx.chain) >= MAX_CHAIN_DEPTH:
        raise ImageError(
            f"Backing chain too deep at '{filename}': more than {MAX_CHAIN_DEPTH} images"
        )
    if real in ctx.chain:
        path = " -> ".join([*ctx.chain[ctx.chain.index(real) :], real])
        raise ImageError(f"Backing file chain loops back to '{filename}' ({path})")


def _check_writable(header: Header, file: Node) -> Header:
    """Refuses what must not be written; repairs a dirty image. Returns the header to use."""
    if file.read_only:
        raise ConfigError("The image's file node is read-only; open the image read-only")
    if header.incompatible & Incompat.CORRUPT:
        raise ImageError(
            "qcow2: Image is corrupt; cannot be opened read/write "
            "(open it read-only, or repair it with 'qemu-img check -r all')"
        )
    if header.incompatible & Incompat.DIRTY:
        try:
            from pyfleece.block.qcow2.check import repair_dirty  # rarely needed: lazily

            repair_dirty(file)
        except CorruptImage as err:
            raise CorruptImage(
                f"qcow2: {err}; open the image read-only, or try 'qemu-img check -r all'"
            ) from err
        header = read_header(file)
        if header.incompatible & Incompat.DIRTY:
            raise CorruptImage("qcow2: the dirty bit survived the repair")
    return header


def _attach_backing(node: Qcow2Node, value: Any, ctx: OpenContext, real: str) -> None:
    sub = OpenContext(ctx.graph, True, (*ctx.chain, real))
    if value is None:
        return
    if value is not _FROM_HEADER:
        child, owned = open_child(value, sub, "backing")
        node.attach_child("backing", child, owned=owned)
        return
    if not node.header.backing_file:
        return
    target = resolve_backing(node.header.backing_file, node.filename)
    try:
        child = open_node(image_options(target, node.header.backing_format), sub)
    except ImageError as err:
        if str(err).startswith(("Could not open backing file", "Backing")):
            raise
        raise type(err)(f"Could not open backing file: {err}") from err
    node.attach_child("backing", child, owned=True)


_FLAGS = ("lazy-refcounts", "pass-discard-request", "pass-discard-snapshot", "pass-discard-other")
_OVERLAP_MODES = ("none", "constant", "cached", "all")
_OVERLAP_FLAGS = (
    "main-header",
    "active-l1",
    "active-l2",
    "refcount-table",
    "refcount-block",
    "snapshot-table",
    "inactive-l1",
    "inactive-l2",
    "bitmap-directory",
)


def _tuning(opts: Options) -> tuple[int | None, int | None, bool]:
    """QEMU's qcow2 tuning options: (L2 cache bytes, refcount cache bytes, lazy refcounts)."""
    lazy = False
    for key in _FLAGS:
        value = opts.get_bool(key, False)
        lazy = lazy or (key == "lazy-refcounts" and value)
    # discard-no-unref (QEMU 8.1) only changes which host clusters stay preallocated.
    opts.get_bool("discard-no-unref", False)
    sizes = {}
    for key in ("cache-size", "l2-cache-size", "l2-cache-entry-size", "refcount-cache-size"):
        value = opts.get_size(key, None)
        if value is not None and value < 0:
            raise ConfigError(f"Parameter '{key}' must not be negative")
        sizes[key] = value
    interval = opts.get_int("cache-clean-interval", 0)
    if interval < 0 or interval > 0xFFFFFFFF:
        raise ConfigError("Cache clean interval too big")
    _overlap_check(opts.raw("overlap-check", None))
    for unsupported in ("encrypt", "data-file"):
        if opts.raw(unsupported, None) is not None:
            raise UnsupportedImage(f"qcow2: option '{unsupported}' is not supported")
    l2 = sizes["l2-cache-size"] or sizes["cache-size"]
    refcount = sizes["refcount-cache-size"] or (sizes["cache-size"] and sizes["cache-size"] // 4)
    return l2, refcount, lazy


def _overlap_check(value: Any) -> None:
    if value is None:
        return
    if isinstance(value, str):
        if value not in _OVERLAP_MODES:
            raise ConfigError(f"Unsupported value '{value}' for qcow2 option 'overlap-check'")
        return
    if not isinstance(value, dict):
        raise ConfigError("Invalid parameter type for 'overlap-check'")
    flags = Options(value, "qcow2 option 'overlap-check'")
    flags.get_choice("template", _OVERLAP_MODES, None)
    for key in _OVERLAP_FLAGS:
        flags.get_bool(key, None)
    flags.finish()

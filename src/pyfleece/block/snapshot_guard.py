"""The snapshot guard: where snapshot reads meet copy-before-write (see
``copy_before_write``, whose locks it takes through ``share``/``unshare``), and how the node
to guard is found under a fleecing target's filters.

The guard replaces the source as the ``backing`` child of the target's overlay while a job
runs, so every read that falls through the target to the live disk passes it. It keeps no
lock of its own: for each unit it asks the ``CopyBeforeWrite`` to hold it shared, then
reads the target's copy (unit copied) or the source (unit held, so not copied meanwhile).
"""

from __future__ import annotations

import errno
import threading
from collections.abc import Iterator
from typing import TYPE_CHECKING

from pyfleece.block.file import pread_full
from pyfleece.block.node import Extent, Node, Ref
from pyfleece.errors import BlockError

if TYPE_CHECKING:
    from pyfleece.block.copy_before_write import CopyBeforeWrite


#: Drivers that pass every request to one child unchanged (role "image" or "file"); the
#: search for the overlay to guard goes down through them.
FILTER_DRIVERS = frozenset({"fault"})


def cluster_size_of(target: Node) -> int:
    """The cluster size of ``target``, or of the node under its filters (``FILTER_DRIVERS``)
    that has one; 0 if none does. The copy unit must cover whole clusters of the node that
    allocates, or each copy would make it fill the rest of a cluster from its backing."""
    node: Node | None = target
    seen: set[int] = set()
    while node is not None and id(node) not in seen:
        seen.add(id(node))
        size = int(getattr(node, "cluster_size", 0) or 0)
        if size or node.driver not in FILTER_DRIVERS:
            return size
        node = node.child("image") or node.child("file")
    return 0


def backed_by(target: Node, source: Node) -> Node | None:
    """The node whose ``backing`` is ``source``: ``target`` itself or one reached from it
    through filters (``FILTER_DRIVERS``), or None."""
    node: Node | None = target
    seen: set[int] = set()
    while node is not None and id(node) not in seen:
        seen.add(id(node))
        backing = node.children.get("backing")
        if backing is not None and backing.node is source:
            return node
        if node.driver not in FILTER_DRIVERS:
            return None
        node = node.child("image") or node.child("file")
    return None


class SnapshotGuard(Node):
    """The ``backing`` child of ``overlay`` (the target, or the node under the target's
    filters whose backing the source is) while copy-before-write runs: reads the snapshot.

    An implicit filter (like QEMU's): user-facing code should show ``filtered`` instead.
    It holds the source with the same reason as the edge it replaces, so deleting the
    source names the overlay as QEMU does.
    """

    driver = "copy-before-write-guard"
    implicit = True

    def __init__(self, cbw: CopyBeforeWrite, overlay: Node) -> None:
        super().__init__(f"#cbw-{cbw.target.node_name}", read_only=True)
        self.cbw = cbw
        self.overlay = overlay
        self.filtered = cbw.source
        self._ref: Ref | None = cbw.source.add_ref(
            f"node '{overlay.node_name}'",
            f"node is used as backing hd of '{overlay.node_name}'",
            hard=True,
        )
        self._local = threading.local()

    @property
    def size(self) -> int:
        return self.cbw.size

    def _readinto(self, offset: int, buf: memoryview) -> None:
        cbw = self.cbw
        if getattr(self._local, "in_target", False):
            raise BlockError(
                errno.EIO, f"{cbw.target.node_name} does not hold a unit it copied at {offset}"
            )
        end = offset + len(buf)
        if not len(buf):
            return
        first, last = offset // cbw.unit, (end - 1) // cbw.unit
        held = cbw.share(first, last)
        try:
            for lo, hi, copied in self._spans(first, last, set(held)):
                s, e = max(lo * cbw.unit, offset), min((hi + 1) * cbw.unit, end)
                part = buf[s - offset : e - offset]
                if copied:
                    self._local.in_target = True
                    try:
                        cbw.target.readinto(s, part)
                    finally:
                        self._local.in_target = False
                else:
                    self._read_source(s, part)
        finally:
            cbw.unshare(held)

    def _read_source(self, offset: int, part: memoryview) -> None:
        """Reads the live disk under the shared hold. A source that lies plainly in a host
        file is read straight from it (the raw and file layers would only add checks and
        request tracking the hold already makes redundant); others through their node."""
        source = self.cbw.source
        try:
            mapping = source.host_map(offset, len(part))
            if mapping is not None and mapping.length == len(part):
                pread_full(mapping.fd, part, mapping.offset)
                return
        except OSError as err:
            raise BlockError.from_os(err, f"read from {source.node_name}") from err
        source.readinto(offset, part)

    @staticmethod
    def _spans(first: int, last: int, held: set[int]) -> Iterator[tuple[int, int, bool]]:
        """Runs of units [lo, hi] that are all copied or all held (uncopied)."""
        lo = first
        for u in range(first + 1, last + 2):
            if u > last or ((u in held) != (lo in held)):
                yield lo, u - 1, lo not in held
                lo = u

    def _block_status(self, offset: int, length: int) -> Extent:
        cbw = self.cbw
        if offset >= cbw.size:
            return Extent(offset, length, False, True, False, 1)
        end = min(offset + length, cbw.size)
        first, last = offset // cbw.unit, (end - 1) // cbw.unit
        held = cbw.share(first, last)
        try:
            copied = first not in held
            hi = first
            while hi < last and ((hi + 1) in held) != copied:
                hi += 1
            n = min((hi + 1) * cbw.unit, end) - offset
            if copied:
                ext = cbw.target.block_status(offset, n)
            else:
                ext = cbw.source.block_status(offset, n)
            return ext._replace(offset=offset, length=min(ext.length, n))
        finally:
            cbw.unshare(held)

    def _close(self) -> None:
        if self._ref is not None:
            self._ref.release()
            self._ref = None

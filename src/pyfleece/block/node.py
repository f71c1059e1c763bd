"""The block node: the one interface every driver implements and every user speaks to.

A node has a size and serves read, write (with FUA), write-zeroes (may-unmap, fast),
discard, flush and block status. Nodes stack: a node's children are other nodes, by role
(``file`` for a format's container, ``backing`` for the layer below in a chain, ``image``
for a filter's child). Users hold references on nodes (see ``Ref``): a hard reference forbids
deletion, a soft one is released when the node's drive is deleted.

The public methods here do the work every driver would otherwise repeat: permission and
bounds checks, request tracking, before-write hooks (copy-before-write hangs there), and
turning ``OSError`` into ``BlockError``. Drivers implement the underscored methods.

Invariants kept here:
- a read-only node never reaches a driver's write path (EPERM);
- a bounded node never sees a request past its end (EINVAL);
- every request is tracked from before its before-write hooks to after its driver call.
"""

from __future__ import annotations

import errno
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import ClassVar, NamedTuple

from pyfleece.block.tracking import ReqKind, RequestTracker, TrackedRequest
from pyfleece.errors import BlockError, NodeBusy

Buffer = bytes | bytearray | memoryview

#: Largest single request the block layer accepts (reads materialise in memory).
MAX_REQUEST = 1 << 31


class Extent(NamedTuple):
    """What a range of a node reads as, and where it comes from.

    Attributes:
        offset, length: the range described (``length`` may be shorter than asked).
        data: the range is backed by stored data (not a hole).
        zero: the range reads as zeros.
        allocated: some layer of the chain (this node or a backing) provides the range.
        depth: which layer provides it: 0 for this node, 1 for its backing, and so on; for a
            range no layer allocates, the depth at which the lookup stopped, as
            ``qemu-img map`` reports it (the deepest layer consulted).
        host_offset: where the data lies in the providing layer's file, when it is stored
            plainly there (``qemu-img map``'s ``offset``).
        compressed: the providing layer stores the range compressed.
    """

    offset: int
    length: int
    data: bool
    zero: bool
    allocated: bool
    depth: int
    host_offset: int | None = None
    compressed: bool = False


class HostMapping(NamedTuple):
    """A prefix of a node's range that lies contiguously in a host file, for zero-copy I/O."""

    fd: int
    offset: int
    length: int


#: Called before a write, write-zeroes or discard reaches the driver:
#: hook(node, offset, length, kind). Raising BlockError fails the request.
WriteHook = Callable[["Node", int, int, ReqKind], None]


class Ref:
    """A reference that keeps a node alive.

    Attributes:
        holder: who holds it, as a user would name it ("node 'top'", "block job 'job0'").
        reason: why, in QEMU's words, completing "Node 'x' is busy: <reason>".
        hard: a hard reference forbids deletion; a soft one is released by ``drive_del``.
        on_release: for soft references, how the holder lets go when asked to.
    """

    def __init__(
        self,
        node: Node,
        holder: str,
        reason: str,
        *,
        hard: bool,
        on_release: Callable[[], None] | None = None,
    ) -> None:
        self.node = node
        self.holder = holder
        self.reason = reason
        self.hard = hard
        self.on_release = on_release
        self.released = False

    def release(self) -> None:
        """Drops this reference; releasing twice is harmless."""
        self.node._drop_ref(self)

    def __repr__(self) -> str:
        kind = "hard" if self.hard else "soft"
        return f"<Ref {kind} {self.node.node_name!r} by {self.holder}>"


class Child(NamedTuple):
    """A parent's edge to a child node: the role, the node, and the hard reference it holds."""

    role: str
    node: Node
    ref: Ref
    owned: bool


class Node:
    """Base class of every block node. See the module docstring for the contract."""

    #: QEMU's driver name ("file", "raw", "qcow2", ...).
    driver: ClassVar[str] = ""
    #: Protocol nodes may grow: reads past the end give zeros, writes past it extend.
    growable: ClassVar[bool] = False

    def __init__(self, node_name: str, *, read_only: bool) -> None:
        self.node_name = node_name
        self.read_only = read_only
        self.children: dict[str, Child] = {}
        self.tracker = RequestTracker()
        self.write_hooks: list[WriteHook] = []
        self._refs: list[Ref] = []
        self._refs_lock = threading.Lock()
        self.closed = False

    # -- what drivers provide ---------------------------------------------------------------

    @property
    def size(self) -> int:
        raise NotImplementedError

    def _readinto(self, offset: int, buf: memoryview) -> None:
        raise NotImplementedError

    def _write(self, offset: int, data: memoryview, fua: bool) -> None:
        raise BlockError(errno.EPERM, f"{self.driver} node does not support writing")

    def _write_zeroes(self, offset: int, length: int, may_unmap: bool, fua: bool) -> None:
        """Default: write explicit zeros, in bounded chunks."""
        chunk = min(length, 1 << 20)
        zeros = memoryview(bytes(chunk))
        end = offset + length
        while offset < end:
            n = min(chunk, end - offset)
            self._write(offset, zeros[:n], fua)
            offset += n

    def _discard(self, offset: int, length: int) -> None:
        """Default: discard is advisory; doing nothing is correct."""

    def _flush(self) -> None:
        for child in self.children.values():
            child.node.flush()

    def _block_status(self, offset: int, length: int) -> Extent:
        return Extent(offset, length, data=True, zero=False, allocated=True, depth=0)

    def _host_map(self, offset: int, length: int) -> HostMapping | None:
        return None

    def _truncate(self, size: int) -> None:
        raise BlockError(errno.ENOTSUP, f"{self.driver} node cannot be resized")

    def _close(self) -> None:
        """Releases the driver's own resources; children are handled by ``close``."""

    #: Whether write_zeroes with may_unmap reliably reads back zeros quickly (FAST_ZERO).
    def can_fast_zero(self) -> bool:
        return False

    # -- the public interface ---------------------------------------------------------------

    def readinto(self, offset: int, buf: memoryview) -> None:
        """Fills ``buf`` with the node's contents at ``offset``.

        Raises:
            BlockError: EINVAL for a range outside the node, or the I/O error met.
        """
        length = len(buf)
        self._check_range(offset, length, errno.EINVAL)
        tracker = self.tracker
        req = tracker.begin(offset, length, ReqKind.READ)
        try:
            self._readinto(offset, buf)
        except OSError as err:
            raise BlockError.from_os(err, f"read from {self.node_name}") from err
        finally:
            tracker.end(req)

    def read(self, offset: int, length: int) -> bytes:
        """Reads ``length`` bytes at ``offset`` into a new buffer."""
        buf = bytearray(length)
        self.readinto(offset, memoryview(buf))
        return bytes(buf)

    def write(self, offset: int, data: Buffer, *, fua: bool = False) -> None:
        """Writes ``data`` at ``offset``; with ``fua`` it is durable when this returns.

        Raises:
            BlockError: EPERM on a read-only node, ENOSPC past the end, or the I/O error met.
        """
        view = data if isinstance(data, memoryview) else memoryview(data)
        with self._writing(offset, len(view), ReqKind.WRITE):
            self._write(offset, view, fua)

    def write_zeroes(
        self,
        offset: int,
        length: int,
        *,
        may_unmap: bool = False,
        fua: bool = False,
        fast: bool = False,
    ) -> None:
        """Makes the range read as zeros; ``may_unmap`` allows deallocating it.

        With ``fast``, fails with ENOTSUP instead of writing zeros slowly.
        """
        if fast and not self.can_fast_zero():
            raise BlockError(errno.ENOTSUP, "fast zeroing is not supported")
        with self._writing(offset, length, ReqKind.ZERO):
            self._write_zeroes(offset, length, may_unmap, fua)

    def discard(self, offset: int, length: int) -> None:
        """Tells the node the range's contents are no longer needed (advisory)."""
        with self._writing(offset, length, ReqKind.DISCARD):
            self._discard(offset, length)

    def flush(self) -> None:
        """Makes every write completed so far durable."""
        req = self.tracker.begin(0, 0, ReqKind.FLUSH)
        try:
            self._flush()
        except OSError as err:
            raise BlockError.from_os(err, f"flush of {self.node_name}") from err
        finally:
            self.tracker.end(req)

    def block_status(self, offset: int, length: int) -> Extent:
        """Describes the range starting at ``offset``; the answer may cover less than asked."""
        self._check_range(offset, length, errno.EINVAL)
        try:
            return self._block_status(offset, length)
        except OSError as err:
            raise BlockError.from_os(err, f"block status of {self.node_name}") from err

    def extents(self, offset: int = 0, length: int | None = None) -> Iterator[Extent]:
        """Yields extents covering the range, merging neighbours that read alike."""
        end = self.size if length is None else offset + length
        pending: Extent | None = None
        while offset < end:
            ext = self.block_status(offset, end - offset)
            if ext.length <= 0:
                raise BlockError(errno.EIO, f"{self.node_name}: empty block status at {offset}")
            offset += ext.length
            if pending is not None and _mergeable(pending, ext):
                host = pending.host_offset
                pending = pending._replace(length=pending.length + ext.length, host_offset=host)
                continue
            if pending is not None:
                yield pending
            pending = ext
        if pending is not None:
            yield pending

    def host_map(self, offset: int, length: int) -> HostMapping | None:
        """Where a prefix of the range lies plainly in a host file, or None.

        Callers may then ``sendfile`` or ``copy_file_range`` from the mapping. Only nodes
        whose mapping cannot change under a reader (plain files) answer.
        """
        return self._host_map(offset, length)

    def truncate(self, size: int) -> None:
        """Changes the node's size."""
        if self.read_only:
            raise BlockError(errno.EPERM, f"{self.node_name} is read-only")
        try:
            self._truncate(size)
        except OSError as err:
            raise BlockError.from_os(err, f"resize of {self.node_name}") from err

    def close(self) -> None:
        """Closes the node, releasing its children; children it owns are closed too."""
        if self.closed:
            return
        self.closed = True
        try:
            self._close()
        finally:
            for child in list(self.children.values()):
                self.detach_child(child.role)

    # -- children and references ------------------------------------------------------------

    def attach_child(self, role: str, node: Node, *, owned: bool) -> Node:
        """Makes ``node`` this node's child in ``role``, holding a hard reference on it."""
        if role in self.children:
            self.detach_child(role)
        what = {"backing": "backing hd", "file": "file"}.get(role, role)
        ref = node.add_ref(
            f"node '{self.node_name}'",
            f"node is used as {what} of '{self.node_name}'",
            hard=True,
        )
        self.children[role] = Child(role, node, ref, owned)
        return node

    def detach_child(self, role: str) -> None:
        child = self.children.pop(role, None)
        if child is None:
            return
        child.ref.release()
        if child.owned and not child.node.refs():
            child.node.close()

    def child(self, role: str) -> Node | None:
        entry = self.children.get(role)
        return entry.node if entry is not None else None

    def add_ref(
        self,
        holder: str,
        reason: str,
        *,
        hard: bool,
        on_release: Callable[[], None] | None = None,
    ) -> Ref:
        ref = Ref(self, holder, reason, hard=hard, on_release=on_release)
        with self._refs_lock:
            self._refs.append(ref)
        return ref

    def _drop_ref(self, ref: Ref) -> None:
        with self._refs_lock:
            if ref.released:
                return
            ref.released = True
            self._refs.remove(ref)

    def refs(self) -> list[Ref]:
        with self._refs_lock:
            return list(self._refs)

    def check_deletable(self, *, allow_soft: bool) -> None:
        """Raises NodeBusy naming a holder if a reference forbids deleting the node."""
        for ref in self.refs():
            if ref.hard or not allow_soft:
                raise NodeBusy(f"Node '{self.node_name}' is busy: {ref.reason}")

    # -- helpers ----------------------------------------------------------------------------

    def _check_range(self, offset: int, length: int, err: int) -> None:
        if offset < 0 or length < 0 or length > MAX_REQUEST:
            raise BlockError(errno.EINVAL, f"invalid request: offset {offset}, length {length}")
        if not self.growable and offset + length > self.size:
            raise BlockError(
                err,
                f"request [{offset}, {offset + length}) is past the end of "
                f"{self.node_name} ({self.size} bytes)",
            )

    @contextmanager
    def _writing(self, offset: int, length: int, kind: ReqKind) -> Iterator[TrackedRequest]:
        if self.read_only:
            raise BlockError(errno.EPERM, f"{self.node_name} is read-only")
        self._check_range(offset, length, errno.ENOSPC)
        req = self.tracker.begin(offset, length, kind)
        try:
            for hook in self.write_hooks:
                hook(self, offset, length, kind)
            yield req
        except OSError as err:
            raise BlockError.from_os(err, f"{kind.value} on {self.node_name}") from err
        finally:
            self.tracker.end(req)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.node_name!r}>"


def _mergeable(a: Extent, b: Extent) -> bool:
    if (a.data, a.zero, a.allocated, a.depth, a.compressed) != (
        b.data,
        b.zero,
        b.allocated,
        b.depth,
        b.compressed,
    ):
        return False
    if a.host_offset is None or b.host_offset is None:
        return a.host_offset is None and b.host_offset is None
    return a.host_offset + a.length == b.host_offset

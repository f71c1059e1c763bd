"""An NBD export: a block node offered under a name, and the sessions attached to it.

The export holds a *soft* reference on its node (``Node.add_ref(hard=False)``): deleting the
drive releases it, which removes the export and disconnects its clients first. The server
owns the table of exports (``server.NbdServer``); this module holds what one export knows:
its name and description, whether clients may write, the transmission flags it advertises,
its metadata contexts, and who is connected.

Invariants:
- a session attaches only while the export is not closing, so once ``close`` returns no new
  client can reach the node through this export;
- the transmission flags never promise what the session will refuse (READ_ONLY exports
  advertise no TRIM/WRITE_ZEROES; DF only with structured replies).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from pyfleece.block import locking
from pyfleece.block.node import Node, Ref
from pyfleece.errors import ConfigError
from pyfleece.nbd import meta
from pyfleece.nbd.proto import MAX_STRING, TransmitFlag

_ALWAYS = TransmitFlag.HAS_FLAGS | TransmitFlag.SEND_FLUSH | TransmitFlag.SEND_FUA
_ALWAYS |= TransmitFlag.SEND_CACHE
_WRITABLE = TransmitFlag.SEND_TRIM | TransmitFlag.SEND_WRITE_ZEROES | TransmitFlag.SEND_FAST_ZERO


class ExportError(ConfigError):
    """An export operation was refused (bad options from a command line or monitor)."""


class ExportNotFound(ExportError):
    pass


class ExportExists(ExportError):
    pass


class ExportInUse(ExportError):
    pass


class Attached(Protocol):
    """What an export needs of a connected session."""

    def begin_disconnect(self) -> None: ...

    def force_disconnect(self) -> None: ...

    def wait_closed(self, timeout: float | None) -> bool: ...


class Export:
    """One export. Create it through ``NbdServer.add_export``."""

    def __init__(
        self,
        node: Node,
        name: str,
        *,
        export_id: str | None = None,
        description: str = "",
        writable: bool = False,
        unmap: bool = True,
        allocation_depth: bool = True,
        multi_conn: bool = True,
        extra_contexts: Sequence[meta.MetaContext] = (),
    ) -> None:
        if len(name.encode()) > MAX_STRING:
            raise ExportError(f"export name '{name}' too long")
        if len(description.encode()) > MAX_STRING:
            raise ExportError(f"description '{description}' too long")
        if writable and node.read_only:
            raise ExportError(f"Node '{node.node_name}' is read-only: cannot export it writable")
        self.node = node
        self.name = name
        self.id = export_id if export_id is not None else name
        self.description = description
        self.writable = writable
        self.unmap = unmap
        self.multi_conn = multi_conn
        contexts: list[meta.MetaContext] = [meta.BaseAllocation()]
        if allocation_depth:
            contexts.append(meta.AllocationDepth())
        contexts.extend(extra_contexts)
        self.contexts = contexts
        self.ref: Ref | None = None
        self.closing = False
        self._sessions: set[Attached] = set()
        self._lock = threading.Lock()

    # -- what clients see --------------------------------------------------------------------

    @property
    def size(self) -> int:
        return self.node.size

    def flags(self, *, structured: bool) -> int:
        """The transmission flags for a client that did (not) negotiate structured replies."""
        flags = _ALWAYS
        flags |= _WRITABLE if self.writable else TransmitFlag.READ_ONLY
        if structured:
            flags |= TransmitFlag.SEND_DF
        if self.multi_conn:
            flags |= TransmitFlag.CAN_MULTI_CONN
        return int(flags)

    def match_contexts(self, queries: Sequence[str], *, listing: bool) -> list[meta.MetaContext]:
        return meta.match(self.contexts, queries, listing=listing)

    def context_id(self, ctx: meta.MetaContext) -> int:
        return self.contexts.index(ctx)

    # -- sessions ----------------------------------------------------------------------------

    def attach(self, session: Attached) -> bool:
        """Registers a session entering transmission; False once the export is closing."""
        with self._lock:
            if self.closing:
                return False
            self._sessions.add(session)
            return True

    def detach(self, session: Attached) -> None:
        with self._lock:
            self._sessions.discard(session)

    def sessions(self) -> list[Attached]:
        with self._lock:
            return list(self._sessions)

    def close_if_unused(self) -> bool:
        """Starts closing only if no session is attached (QEMU's ``mode=safe``)."""
        with self._lock:
            if self._sessions:
                return False
            self.closing = True
            return True

    def begin_close(self) -> list[Attached]:
        """Refuses new sessions from now on; returns those still attached."""
        with self._lock:
            self.closing = True
            return list(self._sessions)

    def hold(self, on_release: Callable[[], None]) -> None:
        """Claims the node's permissions as QEMU's exports do (read, and write when
        writable; resize unshared), then takes the soft reference on the node;
        ``on_release`` runs on drive deletion.

        Raises:
            PermissionConflict, LockConflict: another user forbids those permissions.
        """
        perm = locking.Perm.CONSISTENT_READ
        if self.writable:
            perm |= locking.Perm.WRITE
        shared = locking.ALL & ~locking.Perm.RESIZE
        locking.claim(self.node, locking.Claim(self._holder, "root", perm, shared))
        self.ref = self.node.add_ref(
            f"NBD export '{self.id}'",
            f"block device is in use by block export '{self.id}'",
            hard=False,
            on_release=on_release,
        )

    @property
    def _holder(self) -> str:
        return f"block export '{self.id}'"

    def release(self) -> None:
        if self.ref is not None:
            self.ref.release()
            self.ref = None
        locking.release(self.node, self._holder, "root")

    def info(self) -> dict[str, Any]:
        """QEMU's BlockExportInfo for ``query-block-exports``."""
        return {
            "id": self.id,
            "type": "nbd",
            "node-name": self.node.node_name,
            "shutting-down": self.closing,
        }

    def __repr__(self) -> str:
        return f"<Export {self.id!r} name={self.name!r} node={self.node.node_name!r}>"

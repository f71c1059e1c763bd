"""Image locking and node permissions, as QEMU's block layer and file-posix driver do them.

Permissions (QEMU's BlockPermission): what a user of a node does with it (``perm``) and what
it lets others do at the same time (``shared``). Users *claim* permissions on a node: a
qcow2 node on its ``file`` (read, and write and resize when writable; it shares only
consistent read and write-unchanged), a backup job on its source and target, a tool on the
image it opened. A node's demand is the union of the claims' ``perm`` and the intersection
of their ``shared``. Claims on one node must agree (no claim requires what another
unshares), else ``PermissionConflict`` with QEMU's text. Pass-through nodes (raw, fault)
forward their demand to their child as their own claim; file nodes turn theirs into locks.

Locks (QEMU's file-posix, measured on QEMU 7.2 with F_OFD_GETLK probes, docs/locking.md):
shared open-file-description locks (``F_OFD_SETLK``, ``F_RDLCK``) on single bytes of the
image file: byte 100+i while holding permission i, byte 200+i while not sharing it, for i
over consistent read (0), write (1), write unchanged (2), resize (3). Before taking
permission i a node tests byte 200+i, and before unsharing i byte 100+i, for a lock held
by any other open file description (another process, or another node of this one): 'Failed
to get "write" lock' / 'Failed to get shared "write" lock'. Locks are applied (old and new
together) before they are checked, so two racing openers may both fail but never both win;
closing the descriptor drops them.

Invariants: a file node holds exactly the bytes its current demand calls for (after a
failed change, the previous ones); the permission graph changes under one lock.

``force-share`` (a read-only node shares everything: ``qemu-img -U``) is given to every node
opened inside ``opening()`` (QEMU's children inherit it); file nodes read it when they open.
"""

from __future__ import annotations

import contextvars
import errno
import fcntl
import os
import struct
import threading
import weakref
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from enum import IntFlag
from typing import Any, NamedTuple, Protocol

from pyfleece.errors import ConfigError, GraphError, ImageError


class Perm(IntFlag):
    """QEMU's BlockPermission bits (block-core.json, BlockPermission)."""

    CONSISTENT_READ = 1
    WRITE = 2
    WRITE_UNCHANGED = 4
    RESIZE = 8


NONE = Perm(0)
ALL = Perm.CONSISTENT_READ | Perm.WRITE | Perm.WRITE_UNCHANGED | Perm.RESIZE
#: What a format node shares of its file, and a tool that wants a stable image shares.
SHARED_READ = Perm.CONSISTENT_READ | Perm.WRITE_UNCHANGED
_NAMES = {
    Perm.CONSISTENT_READ: "consistent read",
    Perm.WRITE: "write",
    Perm.WRITE_UNCHANGED: "write unchanged",
    Perm.RESIZE: "resize",
}
PERM_BASE = 100
SHARED_BASE = 200


def perm_names(perm: Perm) -> str:
    """QEMU's bdrv_perm_names: "write, resize"."""
    return ", ".join(name for bit, name in _NAMES.items() if perm & bit)


class PermissionConflict(GraphError):
    """Two users of one node in this process want incompatible permissions."""


class LockConflict(ImageError):
    """Another open of the image holds a lock that forbids what this one needs.

    Attributes:
        hint: the line QEMU's tools print after the message.
    """

    def __init__(self, message: str, filename: str) -> None:
        super().__init__(message)
        self.hint = f"Is another process using the image [{filename}]?"


class Claim(NamedTuple):
    """One user's permissions on a node.

    Attributes:
        holder: the user, as QEMU names it in conflicts ("node 'q'").
        role: the edge's role ("file", "target", "root"...).
    """

    holder: str
    role: str
    perm: Perm
    shared: Perm
    #: A copy-before-write claim on its source. QEMU inserts its filter above the source
    #: and moves the source's parents (exports, role "root") on top of it, so their writes
    #: pass through the filter; ours pass through the node's write hook, which is the
    #: same thing. Such a claim therefore never conflicts with "root" claims in this
    #: process; its unshared bits still lock the file against other processes.
    interposed: bool = False


class PermissionUser(Protocol):
    """A node that acts on its demand: a file node locks, a filter forwards."""

    def permissions_changed(self, perm: Perm, shared: Perm) -> None: ...


_lock = threading.RLock()
_claims: weakref.WeakKeyDictionary[Any, dict[tuple[str, str], Claim]] = weakref.WeakKeyDictionary()


def claim(node: Any, new: Claim) -> None:
    """Adds (or replaces) ``new.holder``'s claim in ``new.role`` on ``node``.

    Raises:
        PermissionConflict: another claim on the node is incompatible.
        LockConflict: another open of the image file holds a conflicting lock.
    """
    with _lock:
        table = _claims.setdefault(node, {})
        key = (new.holder, new.role)
        for other_key, other in table.items():
            if other_key != key:
                _check_pair(node, new, other)
        old = table.get(key)
        table[key] = new
        try:
            _apply(node)
        except BaseException:
            if old is None:
                del table[key]
            else:
                table[key] = old
            _apply(node)  # back to the locks held before: only releases bytes
            raise


def release(node: Any, holder: str, role: str) -> None:
    """Drops a claim (absent: nothing happens); the node's locks relax accordingly."""
    with _lock:
        table = _claims.get(node)
        if table is not None and table.pop((holder, role), None) is not None:
            _apply(node)


def demand(node: Any) -> tuple[Perm, Perm]:
    """(perm, shared): what the node's claims need together."""
    with _lock:
        perm, shared = NONE, ALL
        for c in _claims.get(node, {}).values():
            perm |= c.perm
            shared &= c.shared
        return perm, shared


def claims(node: Any) -> list[Claim]:
    with _lock:
        return list(_claims.get(node, {}).values())


def _check_pair(node: Any, new: Claim, other: Claim) -> None:
    name = getattr(node, "node_name", "?")
    for required_by, unshared_by in ((new, other), (other, new)):
        if unshared_by.interposed and required_by.role == "root":
            continue
        clash = required_by.perm & ~unshared_by.shared & ALL
        if clash:
            raise PermissionConflict(
                f"Permission conflict on node '{name}': permissions '{perm_names(clash)}' "
                f"are both required by {required_by.holder} (uses node '{name}' as "
                f"'{required_by.role}' child) and unshared by {unshared_by.holder} "
                f"(uses node '{name}' as '{unshared_by.role}' child)."
            )


def _apply(node: Any) -> None:
    if getattr(node, "closed", False):
        return
    hook = getattr(node, "permissions_changed", None)
    if hook is not None:
        hook(*demand(node))


def forward(parent: Any, child: Any, role: str, perm: Perm, shared: Perm) -> None:
    """A pass-through node's demand becomes its claim on ``child`` (none when idle)."""
    holder = f"node '{parent.node_name}'"
    if perm == NONE and shared == ALL:
        release(child, holder, role)
    else:
        claim(child, Claim(holder, role, perm, shared))


# -- force-share --------------------------------------------------------------------------------

_force_share: contextvars.ContextVar[bool] = contextvars.ContextVar("force_share", default=False)


def force_share() -> bool:
    """Whether the node being opened now shares everything (``force-share=on``)."""
    return _force_share.get()


@contextmanager
def opening(options: Mapping[str, Any], read_only: bool) -> Iterator[None]:
    """The scope of one top-level open: its ``force-share`` holds for every node opened
    inside (backing files included), as QEMU's children inherit it.

    Raises:
        ConfigError: force-share on a writable node (QEMU's text).
    """
    shared = _flag(options.get("force-share", False), "force-share")
    if shared and not _flag(options.get("read-only", read_only), "read-only"):
        raise ConfigError("force-share=on can only be used with read-only images")
    token = _force_share.set(shared or _force_share.get())
    try:
        yield
    finally:
        _force_share.reset(token)


def _flag(value: Any, key: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value in ("on", "off", "true", "false"):
        return value in ("on", "true")
    raise ConfigError(f"Parameter '{key}' expects 'on' or 'off', not {value!r}")


# -- lock bytes ---------------------------------------------------------------------------------

# C: struct flock { short l_type; short l_whence; off_t l_start; off_t l_len; pid_t l_pid; }
# (32 bytes on 64-bit Linux, with padding). F_OFD_* needs l_pid == 0.
_FLOCK = struct.Struct("hhqqi4x")


def _fcntl_lock(fd: int, cmd: int, kind: int, offset: int) -> int:
    arg = _FLOCK.pack(kind, os.SEEK_SET, offset, 1, 0)
    result = fcntl.fcntl(fd, cmd, arg)
    return int(_FLOCK.unpack(result)[0]) if isinstance(result, bytes) else kind


def lock_byte(fd: int, offset: int, locked: bool) -> None:
    """Takes (shared) or drops the lock on one byte for this open file description."""
    _fcntl_lock(fd, fcntl.F_OFD_SETLK, fcntl.F_RDLCK if locked else fcntl.F_UNLCK, offset)


def byte_locked_by_others(fd: int, offset: int) -> bool:
    """Whether another open file description holds any lock on the byte."""
    return _fcntl_lock(fd, fcntl.F_OFD_GETLK, fcntl.F_WRLCK, offset) != fcntl.F_UNLCK


class ImageLocks:
    """The lock bytes one open file description holds for its node (file-posix's state).

    ``update`` moves from the held (perm, shared) to new ones: apply both, check, then drop
    what is no longer needed; on a conflict, back to what was held.
    """

    def __init__(self, fd: int, filename: str) -> None:
        self.fd = fd
        self.filename = filename
        self.perm = NONE
        self.shared = ALL

    def update(self, perm: Perm, shared: Perm) -> None:
        """Raises: LockConflict, or ImageError when the host refuses a lock."""
        old_perm, old_unshared = self.perm, ~self.shared & ALL
        try:
            self._apply(old_perm | perm, old_unshared | (~shared & ALL), unlock=False)
            self._check(perm, shared)
        except BaseException:
            self._apply(old_perm, old_unshared, unlock=True)
            raise
        self._apply(perm, ~shared & ALL, unlock=True)
        self.perm, self.shared = perm, shared

    def _apply(self, perm: Perm, unshared: Perm, *, unlock: bool) -> None:
        """Locks 100+i for i in ``perm`` and 200+i for i in ``unshared``; with ``unlock``
        also drops the bytes of the other bits."""
        for bit in Perm:
            i = bit.bit_length() - 1
            for base, wanted in ((PERM_BASE, perm & bit), (SHARED_BASE, unshared & bit)):
                if wanted or unlock:
                    try:
                        lock_byte(self.fd, base + i, bool(wanted))
                    except OSError as err:
                        reason = os.strerror(err.errno or errno.EIO)
                        raise ImageError(f"Failed to lock byte {base + i}: {reason}") from err

    def _check(self, perm: Perm, shared: Perm) -> None:
        for bit in Perm:
            i = bit.bit_length() - 1
            if perm & bit and byte_locked_by_others(self.fd, SHARED_BASE + i):
                raise LockConflict(f'Failed to get "{_NAMES[bit]}" lock', self.filename)
        for bit in Perm:
            i = bit.bit_length() - 1
            if not shared & bit and byte_locked_by_others(self.fd, PERM_BASE + i):
                raise LockConflict(f'Failed to get shared "{_NAMES[bit]}" lock', self.filename)


#: What creating an image takes (QEMU's file-posix create): write and resize, sharing all
#: but resize, so nobody who holds the image open, or stops others writing it, is truncated.
CREATE_PERM = Perm.WRITE | Perm.RESIZE
CREATE_SHARED = ALL & ~Perm.RESIZE


def open_for_create(path: str, mode: int = 0o644) -> int:
    """Opens ``path`` to (re)create an image: created if missing, locked as QEMU's create
    locks it, and only then truncated to nothing. The caller writes and closes the fd (the
    locks go with it).

    Raises:
        LockConflict: another process holds the image (nothing was truncated).
        OSError: the file cannot be created or opened.
    """
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, mode)
    try:
        ImageLocks(fd, path).update(CREATE_PERM, CREATE_SHARED)
        os.ftruncate(fd, 0)
    except BaseException:
        os.close(fd)
        raise
    return fd

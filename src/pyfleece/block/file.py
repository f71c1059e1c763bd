"""The ``file`` protocol driver: a host file or block device.

Reads use ``preadv`` into the caller's buffer (short reads past the end give zeros), writes
``pwritev``; write-zeroes and discard punch holes or zero ranges with ``fallocate``; block
status comes from ``SEEK_DATA``/``SEEK_HOLE``; flush is ``fdatasync``. A file node grows when
written past its end, as qcow2 needs of its container.

Image locking (``locking=on|off|auto``, auto meaning on): the node's demand (what the nodes
and users above it claim, ``block/locking.py``) is held as QEMU's lock bytes on its own open
file description; ``force-share`` (inherited from the open) makes it unshare nothing.
"""

from __future__ import annotations

import errno
import os
import stat
import threading
from collections.abc import Callable

from pyfleece.block import locking
from pyfleece.block.node import Extent, HostMapping, Node
from pyfleece.block.options import Options
from pyfleece.block.registry import OpenContext, register
from pyfleece.errors import BlockError, ConfigError, ImageError

_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02
_FALLOC_FL_ZERO_RANGE = 0x10

_fallocate: Callable[[int, int, int, int], int] | None = None


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    """fallocate(2) with mode flags, which ``os`` does not expose.

    libc's function is looked up on first use: ``ctypes`` costs start-up time every
    command would pay, and ``ctypes.util.find_library`` even runs ``ldconfig``. The
    process's own symbol table (``CDLL(None)``) holds libc's ``fallocate``.
    """
    global _fallocate
    import ctypes

    if _fallocate is None:
        func = ctypes.CDLL(None, use_errno=True).fallocate
        func.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
        func.restype = ctypes.c_int
        _fallocate = func
    if _fallocate(fd, mode, offset, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


#: ``filesystem_type`` of ext2, ext3 and ext4 (EXT4_SUPER_MAGIC)
EXT4_MAGIC = 0xEF53


def filesystem_type(fd: int) -> int:
    """The ``f_type`` fstatfs(2) reports for the filesystem holding ``fd`` (``os.statvfs``
    leaves it out), such as ``EXT4_MAGIC``.

    Raises:
        OSError: fstatfs failed.
    """
    import ctypes

    buf = ctypes.create_string_buffer(256)  # struct statfs is 120 bytes on 64-bit Linux
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.fstatfs(fd, buf) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return ctypes.c_long.from_buffer(buf).value  # f_type comes first, a long


def pread_full(fd: int, buf: memoryview, offset: int) -> None:
    """Fills ``buf`` from ``fd`` at ``offset``; what lies past the end of the file reads as
    zeros (a short read at EOF is not an error for a growable file)."""
    want = len(buf)
    done = 0
    while done < want:
        n = os.preadv(fd, [buf[done:]], offset + done)
        if n == 0:
            buf[done:] = bytes(want - done)
            return
        done += n


class FileNode(Node):
    driver = "file"
    growable = True

    def __init__(
        self, node_name: str, filename: str, *, read_only: bool, lock: bool = True
    ) -> None:
        super().__init__(node_name, read_only=read_only)
        self.filename = filename
        flags = (os.O_RDONLY if read_only else os.O_RDWR) | os.O_CLOEXEC
        try:
            self.fd = os.open(filename, flags)
        except OSError as err:
            raise ImageError(f"Could not open '{filename}': {os.strerror(err.errno or 5)}") from err
        st = os.fstat(self.fd)
        self.is_block_device = stat.S_ISBLK(st.st_mode)
        if not (stat.S_ISREG(st.st_mode) or self.is_block_device):
            os.close(self.fd)
            raise ImageError(f"'file' driver requires '{filename}' to be a regular file")
        self._size = os.lseek(self.fd, 0, os.SEEK_END) if self.is_block_device else st.st_size
        self._size_lock = threading.Lock()
        self._punch_ok = not self.is_block_device
        self._zero_range_ok = True
        #: Set once fdatasync failed: from then on every flush fails (see ``_sync``).
        self._sync_error: OSError | None = None
        self.locks = locking.ImageLocks(self.fd, filename) if lock else None
        self.force_share = locking.force_share()

    def permissions_changed(self, perm: locking.Perm, shared: locking.Perm) -> None:
        """Holds the lock bytes for the node's demand (locking.PermissionUser).

        Raises:
            LockConflict: another open of the file holds a conflicting lock.
        """
        if self.locks is not None:
            self.locks.update(perm, locking.ALL if self.force_share else shared)

    @property
    def size(self) -> int:
        return self._size

    def refresh_size(self) -> int:
        """Re-reads the size from the host (another process may have changed it)."""
        self._size = os.lseek(self.fd, 0, os.SEEK_END)
        return self._size

    def _readinto(self, offset: int, buf: memoryview) -> None:
        pread_full(self.fd, buf, offset)

    def _write(self, offset: int, data: memoryview, fua: bool) -> None:
        done = 0
        total = len(data)
        while done < total:
            done += os.pwritev(self.fd, [data[done:]], offset + done)
        self._grew_to(offset + total)
        if fua:
            self._sync()

    def _grew_to(self, end: int) -> None:
        if end > self._size:
            with self._size_lock:
                self._size = max(self._size, end)

    def _write_zeroes(self, offset: int, length: int, may_unmap: bool, fua: bool) -> None:
        end = min(offset + length, self._size)
        if offset < end and self._zero_in_place(offset, end - offset, may_unmap):
            if offset + length > self._size:
                super()._write_zeroes(self._size, offset + length - self._size, may_unmap, fua)
            elif fua:
                self._sync()
            return
        super()._write_zeroes(offset, length, may_unmap, fua)

    def _zero_in_place(self, offset: int, length: int, may_unmap: bool) -> bool:
        """Zeroes a range inside the file without writing buffers; False if unsupported."""
        modes = []
        if may_unmap and self._punch_ok:
            modes.append(_FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE)
        if self._zero_range_ok:
            modes.append(_FALLOC_FL_ZERO_RANGE | _FALLOC_FL_KEEP_SIZE)
        for mode in modes:
            try:
                fallocate(self.fd, mode, offset, length)
                return True
            except OSError as err:
                if err.errno not in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                    raise
                if mode & _FALLOC_FL_PUNCH_HOLE:
                    self._punch_ok = False
                else:
                    self._zero_range_ok = False
        return False

    def can_fast_zero(self) -> bool:
        return self._punch_ok or self._zero_range_ok

    def _discard(self, offset: int, length: int) -> None:
        end = min(offset + length, self._size)
        if offset >= end or not self._punch_ok:
            return
        try:
            fallocate(self.fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, offset, end - offset)
        except OSError as err:
            if err.errno not in (errno.EOPNOTSUPP, errno.ENOSYS):
                raise
            self._punch_ok = False

    def _flush(self) -> None:
        self._sync()

    def _sync(self) -> None:
        """fdatasync, failing for good once it has failed: Linux may then have marked the
        pages it could not write clean, so a later fdatasync would succeed without them and
        a flush would acknowledge writes that are not on disk."""
        if self._sync_error is not None:
            raise OSError(
                errno.EIO, f"an earlier flush of {self.filename} failed: {self._sync_error}"
            )
        try:
            os.fdatasync(self.fd)
        except OSError as err:
            self._sync_error = err
            raise

    def _block_status(self, offset: int, length: int) -> Extent:
        size = self._size
        if offset >= size:
            return Extent(offset, length, False, True, True, 0, offset)
        end = min(offset + length, size)
        try:
            data_at = os.lseek(self.fd, offset, os.SEEK_DATA)
        except OSError as err:
            if err.errno == errno.ENXIO:  # nothing but a hole up to the end
                return Extent(offset, end - offset, False, True, True, 0, offset)
            if err.errno == errno.EINVAL:  # SEEK_DATA unsupported: all data
                return Extent(offset, end - offset, True, False, True, 0, offset)
            raise
        if data_at > offset:
            return Extent(offset, min(data_at, end) - offset, False, True, True, 0, offset)
        hole_at = os.lseek(self.fd, offset, os.SEEK_HOLE)
        return Extent(offset, min(hole_at, end) - offset, True, False, True, 0, offset)

    def _host_map(self, offset: int, length: int) -> HostMapping | None:
        avail = self._size - offset
        if avail <= 0:
            return None
        return HostMapping(self.fd, offset, min(length, avail))

    def _truncate(self, size: int) -> None:
        if self.is_block_device:
            if size != self._size:
                raise BlockError(errno.ENOTSUP, "cannot resize a block device")
            return
        os.ftruncate(self.fd, size)
        with self._size_lock:
            self._size = size

    def _close(self) -> None:
        os.close(self.fd)


@register("file")
@register("host_device")
def _open_file(opts: Options, name: str, ctx: OpenContext) -> Node:
    filename = opts.get_str("filename")
    mode = opts.get_str("locking", "auto")
    if mode not in ("on", "off", "auto"):
        raise ConfigError(f"Parameter 'locking' does not accept value '{mode}'")
    for legacy in ("x-check-cache-dropped", "pr-manager"):
        opts.raw(legacy, None)
    opts.finish()
    return FileNode(name, filename, read_only=ctx.read_only, lock=mode != "off")

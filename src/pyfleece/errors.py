"""The whole pyfleece exception tree.

::

    PyfleeceError                   anything pyfleece raises on purpose
    ├── BlockError                  one I/O request on a node failed; carries an errno
    │   │                           (NBD turns it into an error reply, the guest sees EIO...)
    │   └── InjectedError           raised by the fault-injection node
    ├── ImageError                  an image file cannot be opened or used as asked
    │   ├── CorruptImage            the metadata contradicts itself or the spec
    │   └── UnsupportedImage        valid, but uses a feature we do not implement
    ├── GraphError                  the node graph refuses an operation
    │   ├── NodeNotFound
    │   ├── DuplicateNode
    │   └── NodeBusy                a reference keeps the node alive; names the holder
    ├── ConfigError                 bad options from a command line or a monitor
    ├── ProtocolError               a peer broke a wire protocol: close that connection
    └── CommandError                a monitor command failed; carries QEMU's error class

Each protocol maps these to its replies in exactly one place: NBD in ``nbd/errors``,
QMP in ``monitor/dispatch``, the command-line tools in ``cli``.
"""

from __future__ import annotations

import errno as _errno
import os


class PyfleeceError(Exception):
    """Base of every error pyfleece raises on purpose."""


class BlockError(PyfleeceError):
    """An I/O request on a block node failed.

    Attributes:
        errno: the POSIX errno that describes the failure (EIO, ENOSPC, EPERM, EINVAL...).
    """

    def __init__(self, err: int, message: str | None = None) -> None:
        self.errno = err
        super().__init__(message or os.strerror(err))

    @classmethod
    def from_os(cls, err: OSError, what: str) -> BlockError:
        """Wraps an OSError raised while doing ``what``; unknown errnos become EIO."""
        code = err.errno if err.errno is not None else _errno.EIO
        return cls(code, f"{what}: {os.strerror(code)}")


class InjectedError(BlockError):
    """An error the fault-injection node was told to produce."""


class ImageError(PyfleeceError):
    """An image cannot be opened or used as asked."""


class CorruptImage(ImageError):
    """The image's metadata is inconsistent or violates the format specification."""


class UnsupportedImage(ImageError):
    """The image is valid but needs a feature pyfleece does not implement."""


class GraphError(PyfleeceError):
    """The block graph refuses an operation."""


class NodeNotFound(GraphError):
    """No node (or device) has the given name."""


class DuplicateNode(GraphError):
    """A node or device with that name already exists."""


class NodeBusy(GraphError):
    """A reference keeps the node in use; the message names the holder."""


class ConfigError(PyfleeceError):
    """Invalid options, from a command line or a monitor command."""


class ProtocolError(PyfleeceError):
    """A peer broke the wire protocol; only its connection is closed."""


class CommandError(PyfleeceError):
    """A monitor command failed.

    Attributes:
        error_class: QEMU's error class ("GenericError", "CommandNotFound",
            "DeviceNotFound", "DeviceNotActive").
    """

    def __init__(self, message: str, error_class: str = "GenericError") -> None:
        self.error_class = error_class
        super().__init__(message)

"""The ``fault`` filter driver: fails chosen requests, like QEMU's blkdebug.

A rule names an operation (read, write, write-zeroes, discard, flush), optionally a range
that the request must overlap, which matching request fails (``nth``, counting from 1),
whether only that one fails (``once``, the default) or every later one too, and the errno.
Everything else passes through to the ``image`` child unchanged, and the node grows as its
image does (a qcow2 on a fault node over a file allocates past the file's end, as it would on
the file itself): ``open`` picks ``GrowableFaultNode`` for a growable image.

Command line: ``driver=fault,image.driver=file,image.filename=d.img,``
``rules.0.op=write,rules.0.nth=3,rules.0.errno=28``. Tests may also add rules at run time,
including ones that hold a request until an event is set (to stage races without sleeping).
"""

from __future__ import annotations

import errno
import threading
from dataclasses import dataclass, field

from pyfleece.block import locking
from pyfleece.block.node import Extent, Node
from pyfleece.block.options import Options
from pyfleece.block.registry import OpenContext, open_child, register
from pyfleece.errors import ConfigError, InjectedError

OPS = ("read", "write", "write-zeroes", "discard", "flush")


@dataclass
class Rule:
    """One injected failure (or pause). ``hits`` counts the requests it matched so far."""

    op: str
    errno: int = errno.EIO
    nth: int = 1
    once: bool = True
    offset: int = 0
    length: int | None = None
    #: When set, a matching request waits for this event instead of failing.
    pause: threading.Event | None = None
    #: Set when a request reaches this rule (so a test can wait for it).
    reached: threading.Event = field(default_factory=threading.Event)
    hits: int = 0

    def matches(self, op: str, offset: int, length: int) -> bool:
        if op != self.op:
            return False
        if op == "flush":
            return True
        end = offset + max(length, 1)
        return self.offset < end and (self.length is None or offset < self.offset + self.length)


class FaultNode(Node):
    driver = "fault"

    def __init__(self, node_name: str, image: Node, *, owned: bool, rules: list[Rule]) -> None:
        super().__init__(node_name, read_only=image.read_only)
        self.attach_child("image", image, owned=owned)
        self.image = image
        self.rules = rules
        self._lock = threading.Lock()

    def add_rule(self, rule: Rule) -> Rule:
        with self._lock:
            self.rules.append(rule)
        return rule

    def _check(self, op: str, offset: int, length: int) -> None:
        pause: threading.Event | None = None
        failure: Rule | None = None
        with self._lock:
            for rule in self.rules:
                if not rule.matches(op, offset, length):
                    continue
                rule.hits += 1
                fires = rule.hits == rule.nth or (not rule.once and rule.hits > rule.nth)
                if not fires:
                    continue
                rule.reached.set()
                if rule.pause is not None:
                    pause = rule.pause
                else:
                    failure = rule
                break
        if pause is not None:
            pause.wait()
        if failure is not None:
            raise InjectedError(
                failure.errno, f"injected error on {op} at {offset} (+{length}) of {self.node_name}"
            )

    @property
    def size(self) -> int:
        return self.image.size

    def _readinto(self, offset: int, buf: memoryview) -> None:
        self._check("read", offset, len(buf))
        self.image.readinto(offset, buf)

    def _write(self, offset: int, data: memoryview, fua: bool) -> None:
        self._check("write", offset, len(data))
        self.image.write(offset, data, fua=fua)

    def _write_zeroes(self, offset: int, length: int, may_unmap: bool, fua: bool) -> None:
        self._check("write-zeroes", offset, length)
        self.image.write_zeroes(offset, length, may_unmap=may_unmap, fua=fua)

    def _discard(self, offset: int, length: int) -> None:
        self._check("discard", offset, length)
        self.image.discard(offset, length)

    def _flush(self) -> None:
        self._check("flush", 0, 0)
        self.image.flush()

    def _block_status(self, offset: int, length: int) -> Extent:
        return self.image.block_status(offset, length)

    def can_fast_zero(self) -> bool:
        return self.image.can_fast_zero()

    def _truncate(self, size: int) -> None:
        self.image.truncate(size)

    def permissions_changed(self, perm: locking.Perm, shared: locking.Perm) -> None:
        """Permissions pass through to the image, as the requests do."""
        locking.forward(self, self.image, "image", perm, shared)

    def _close(self) -> None:
        locking.release(self.image, f"node '{self.node_name}'", "image")


class GrowableFaultNode(FaultNode):
    """A fault node over a growable image (a file, memory): writes past the end extend it."""

    growable = True


def fault_node(image: Node, name: str, *, owned: bool, rules: list[Rule]) -> FaultNode:
    """A fault node over ``image``, growable exactly when the image is."""
    cls = GrowableFaultNode if image.growable else FaultNode
    return cls(name, image, owned=owned, rules=rules)


def _parse_rule(raw: object, index: int) -> Rule:
    if not isinstance(raw, dict):
        raise ConfigError(f"rules.{index} must be an object")
    opts = Options(raw, f"Fault rule {index}")
    rule = Rule(
        op=opts.get_choice("op", OPS),
        errno=opts.get_int("errno", errno.EIO),
        nth=opts.get_int("nth", 1),
        once=opts.get_bool("once", True),
        offset=opts.get_size("offset", 0),
        length=opts.get_size("length", None),
    )
    opts.finish()
    if rule.nth < 1:
        raise ConfigError(f"rules.{index}.nth must be at least 1")
    if not 0 < rule.errno < 4096:
        raise ConfigError(f"rules.{index}.errno must be a positive errno")
    return rule


@register("fault")
def _open_fault(opts: Options, name: str, ctx: OpenContext) -> Node:
    image, owned = open_child(opts.raw("image"), ctx, "image")
    raw_rules = opts.raw("rules", [])
    if not isinstance(raw_rules, list):
        raise ConfigError("Parameter 'rules' expects a list")
    rules = [_parse_rule(r, i) for i, r in enumerate(raw_rules)]
    opts.finish()
    return fault_node(image, name, owned=owned, rules=rules)

"""In-memory forms of qcow2 metadata clusters: L2 tables, refcount blocks, and their cache.

Tables are held as ``array`` objects in host byte order (converted once when read or
written: every entry in qcow2 is big endian), so lookups and scans run at C speed.

A cached table carries a ``version`` bumped on every change and the version last written
to disk (``written``): it is dirty while they differ. A writer may copy a table's bytes,
write them out without holding the metadata lock, and then record the copied version as
written; changes made meanwhile keep the table dirty. Dirty tables are never evicted.
"""

from __future__ import annotations

import sys
from array import array
from bisect import bisect_left
from collections import OrderedDict
from collections.abc import Iterable, Iterator
from typing import Generic, TypeVar

from pyfleece.block.qcow2.format import RefcountCodec
from pyfleece.errors import CorruptImage

_SWAP = sys.byteorder == "little"
_TYPECODES = {8: "B", 16: "H", 32: "I", 64: "Q"}


def be_array(typecode: str, data: bytes | bytearray | memoryview) -> array[int]:
    """Big-endian bytes -> an array of native integers."""
    values = array(typecode)
    values.frombytes(data)
    if _SWAP and values.itemsize > 1:
        values.byteswap()
    return values


def array_be(values: array[int]) -> bytes:
    """An array of native integers -> big-endian bytes."""
    if not _SWAP or values.itemsize == 1:
        return values.tobytes()
    copy = array(values.typecode, values)
    copy.byteswap()
    return copy.tobytes()


class Table:
    """A cached metadata cluster (an L2 table) at host ``offset``."""

    __slots__ = ("entries", "offset", "version", "written")

    def __init__(self, offset: int, entries: array[int], *, dirty: bool = False) -> None:
        self.offset = offset
        self.entries = entries
        self.version = 1 if dirty else 0
        self.written = 0

    @property
    def dirty(self) -> bool:
        return self.version != self.written

    def touch(self) -> None:
        self.version += 1


class RefBlock:
    """A refcount block: ``entries`` refcounts of ``1 << order`` bits each."""

    __slots__ = ("_codec", "_data", "_values", "dirty", "offset")

    def __init__(self, offset: int, order: int, data: bytes | bytearray) -> None:
        self.offset = offset
        self.dirty = False
        bits = 1 << order
        self._codec = RefcountCodec(order)
        self._values: array[int] | None = None
        self._data = bytearray()
        if bits in _TYPECODES and array(_TYPECODES[bits]).itemsize * 8 == bits:
            self._values = be_array(_TYPECODES[bits], data)
        else:
            self._data = bytearray(data)

    def get(self, index: int) -> int:
        if self._values is not None:
            return self._values[index]
        return self._codec.get(self._data, index)

    def set(self, index: int, value: int) -> None:
        if not 0 <= value <= self._codec.max:
            raise CorruptImage(f"qcow2: refcount {value} overflows {self._codec.bits} bits")
        if self._values is not None:
            self._values[index] = value
        else:
            self._codec.set(self._data, index, value)
        self.dirty = True

    def add(self, start: int, stop: int, delta: int) -> int:
        """Adds ``delta`` to the refcounts in [start, stop); returns the new minimum.

        Raises:
            CorruptImage: a refcount would leave its range (nothing is changed then).
        """
        values = self._values
        if values is None:
            new = [self._codec.get(self._data, i) + delta for i in range(start, stop)]
        else:
            new = [v + delta for v in values[start:stop]]
        low, high = min(new), max(new)
        if low < 0 or high > self._codec.max:
            raise CorruptImage(f"qcow2: refcount {low if low < 0 else high} out of range")
        if values is not None:
            values[start:stop] = array(values.typecode, new)
        else:
            for i, value in enumerate(new, start):
                self._codec.set(self._data, i, value)
        self.dirty = True
        return low

    def next_free(self, start: int, stop: int) -> int:
        """The first index in [start, stop) whose refcount is 0, or -1."""
        if self._values is not None:
            try:
                return self._values.index(0, start, stop)
            except ValueError:
                return -1
        for i in range(start, stop):
            if self._codec.get(self._data, i) == 0:
                return i
        return -1

    def free_run(self, start: int, stop: int) -> int:
        """How many refcounts from ``start`` (up to ``stop``) are 0 in a row."""
        if self._values is not None:
            raw = memoryview(self._values)[start:stop].tobytes()
            return (len(raw) - len(raw.lstrip(b"\0"))) // self._values.itemsize
        n = 0
        while start + n < stop and self._codec.get(self._data, start + n) == 0:
            n += 1
        return n

    def to_bytes(self) -> bytes:
        if self._values is not None:
            return array_be(self._values)
        return bytes(self._data)


K = TypeVar("K")
V = TypeVar("V")


class LRU(Generic[K, V]):
    """A least-recently-used map; the owner decides what may be evicted."""

    def __init__(self) -> None:
        self._items: OrderedDict[K, V] = OrderedDict()

    def get(self, key: K) -> V | None:
        item = self._items.get(key)
        if item is not None:
            self._items.move_to_end(key)
        return item

    def put(self, key: K, value: V) -> None:
        self._items[key] = value
        self._items.move_to_end(key)

    def pop(self, key: K) -> V | None:
        return self._items.pop(key, None)

    def __len__(self) -> int:
        return len(self._items)

    def oldest(self) -> Iterator[tuple[K, V]]:
        """Items from least to most recently used (a snapshot: safe to evict while iterating)."""
        return iter(list(self._items.items()))

    def values(self) -> list[V]:
        return list(self._items.values())


class OffsetSet:
    """A sorted set of cluster offsets, 8 bytes each, with range queries (for the checks
    that keep allocations off live metadata)."""

    def __init__(self, offsets: Iterable[int]) -> None:
        self._items = array("Q", sorted(set(offsets)))

    def add(self, offset: int) -> None:
        i = bisect_left(self._items, offset)
        if i == len(self._items) or self._items[i] != offset:
            self._items.insert(i, offset)

    def discard(self, offset: int) -> None:
        i = bisect_left(self._items, offset)
        if i < len(self._items) and self._items[i] == offset:
            del self._items[i]

    def first_in(self, start: int, end: int) -> int | None:
        """The smallest offset in [start, end), or None."""
        i = bisect_left(self._items, start)
        if i < len(self._items) and self._items[i] < end:
            return self._items[i]
        return None

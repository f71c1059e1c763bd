"""The writer a crash test kills: ``python -m tests.integration.qcow2_crash_child IMAGE SEED``.

It applies ``crash_ops(seed, size, cluster_size)`` to the image through our qcow2 driver and
prints one line per completed operation: ``<index>`` after a write, write-zeroes or discard,
``f <index>`` after a flush returned (everything before it is then durable).
"""

from __future__ import annotations

import os
import random
import sys

Op = tuple[str, int, int, int]


def crash_ops(seed: int, size: int, cluster_size: int, count: int = 400) -> list[Op]:
    """A deterministic mix of writes, zeroes, discards and periodic flushes."""
    rnd = random.Random(seed)
    ops: list[Op] = []
    for i in range(count):
        if i % 7 == 6:
            ops.append(("flush", 0, 0, 0))
            continue
        kind = rnd.choice(["write", "write", "write", "zero", "discard"])
        offset = rnd.randrange(size // 512) * 512 + rnd.choice([0, 0, rnd.randrange(512)])
        offset = min(offset, size - 1)
        length = min(size - offset, rnd.randrange(1, 8) * rnd.choice([512, cluster_size]) + 7)
        ops.append((kind, offset, length, rnd.randrange(1, 256)))
    return ops


def main() -> None:
    from pyfleece.block.image import open_image

    path, seed = sys.argv[1], int(sys.argv[2])
    node = open_image(path, read_only=False)
    ops = crash_ops(seed, node.size, node.cluster_size)  # type: ignore[attr-defined]
    for index, (kind, offset, length, arg) in enumerate(ops):
        if kind == "write":
            node.write(offset, bytes([arg]) * length)
        elif kind == "zero":
            node.write_zeroes(offset, length, may_unmap=bool(arg & 1))
        elif kind == "discard":
            node.discard(offset, length)
        else:
            node.flush()
            os.write(1, f"f {index}\n".encode())
            continue
        os.write(1, f"{index}\n".encode())
    node.close()


if __name__ == "__main__":
    main()

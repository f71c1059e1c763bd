"""``make demo``: the main job on an embedded default.

Until the daemon lands, the demo shows the block layer at work on a generated image: it
creates a sparse raw disk, writes the image-fleecing test's patterns, zeroes and discards a
range, and prints the allocation map and a checksum of what reads back.
"""

from __future__ import annotations

import hashlib
import sys
import tempfile
from pathlib import Path

from pyfleece.block.image import open_image

MiB = 1 << 20
#: (offset, length, byte): QEMU's image-fleecing test patterns on a 64 MiB disk.
PATTERNS = [(0, 64 << 10, 0x5D), (1 * MiB, 64 << 10, 0xD5), (32 * MiB, 64 << 10, 0xDC),
            (64 * MiB - (64 << 10), 64 << 10, 0xCD)]  # fmt: skip


def run(workdir: Path) -> int:
    disk = workdir / "disk.raw"
    with open(disk, "wb") as f:
        f.truncate(64 * MiB)
    node = open_image(str(disk), "raw", read_only=False)
    try:
        for offset, length, byte in PATTERNS:
            node.write(offset, bytes([byte]) * length)
            print(f"wrote {length} bytes of {byte:#04x} at offset {offset:#x}")
        node.write_zeroes(1 * MiB, 32 << 10, may_unmap=True)
        print(f"zeroed {32 << 10} bytes at offset {1 * MiB:#x}")
        node.flush()
        print("\nallocation map (offset, length, data/zero):")
        for ext in node.extents():
            kind = "data" if ext.data else "zero"
            print(f"  {ext.offset:#010x} {ext.length:>10} {kind}")
        digest = hashlib.sha256()
        for offset in range(0, node.size, 4 * MiB):
            digest.update(node.read(offset, 4 * MiB))
        print(f"\nsha256 of the {node.size // MiB} MiB disk: {digest.hexdigest()}")
    finally:
        node.close()
    return 0


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="pyfleece-demo-") as tmp:
        return run(Path(tmp))


if __name__ == "__main__":
    sys.exit(main())

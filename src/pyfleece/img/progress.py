"""qemu-img's ``-p`` progress line: ``    (12.34/100%)`` rewritten in place with ``\\r``.

The arithmetic is QEMU's, in single precision as QEMU keeps it, so that the same lines
appear: a line is printed at 0 and 100 and whenever the value moved by more than the
command's minimum step since the last line; ``end`` prints the final newline.
"""

from __future__ import annotations

import struct
import sys

_F32 = struct.Struct("f")


def f32(value: float) -> float:
    """``value`` rounded to single precision (QEMU's ``float``)."""
    return float(_F32.unpack(_F32.pack(value))[0])


class Progress:
    """One command's progress display (a no-op unless enabled)."""

    def __init__(self, enabled: bool, min_skip: float) -> None:
        self.enabled = enabled
        self.min_skip = min_skip
        self.current = 0.0
        self.last_print = 0.0

    def advance(self, delta: float, maximum: int) -> None:
        """Adds ``delta`` percent of ``maximum`` (QEMU: ``qemu_progress_print``); with
        ``maximum`` 0, ``delta`` is the new absolute value."""
        if maximum == 0:
            current = f32(delta)
        else:
            current = f32(self.current + f32(f32(delta / 100) * maximum))
        current = min(current, 100.0)
        self.current = current
        if (
            current > self.last_print + self.min_skip
            or current < self.last_print - self.min_skip
            or current == 0
            or current == 100
        ):
            self.last_print = current
            if self.enabled:
                sys.stdout.write(f"    ({current:3.2f}/100%)\r")
                sys.stdout.flush()

    def end(self) -> None:
        if self.enabled:
            sys.stdout.write("\n")
            sys.stdout.flush()

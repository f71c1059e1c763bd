"""``make demo`` runs the main job end to end and says the pull matches the snapshot."""

from __future__ import annotations

import sys

from tests.support import run


def test_demo_pulls_the_snapshot_instant() -> None:
    result = run([sys.executable, "-m", "pyfleece.demo"], timeout=120)
    assert "IDENTICAL" in result.stdout, result.stdout
    assert "(hmp) OK" in result.stdout

"""``make demo`` runs the main job end to end and says the pull matches the snapshot."""

from __future__ import annotations

import sys

from tests.support import run


def test_demo_pulls_the_snapshot_instant() -> None:
    result = run([sys.executable, "-m", "pyfleece.demo"], timeout=120)
    assert "IDENTICAL" in result.stdout, result.stdout
    assert "drive_add backing=ide0-hd0,file=BACKUP.qcow2,id=target0,if=none  -> OK" in result.stdout

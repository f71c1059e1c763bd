"""Runs every side-by-side benchmark in bench/ (``make bench``), one after the other.

Each benchmark script prints its own figures and ratios; this only sequences them so that
no two compete for the machine's two cores.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main() -> int:
    scripts = sorted(p for p in HERE.glob("*.py") if p.name != "run.py")
    failed = 0
    for script in scripts:
        print(f"=== {script.name}", flush=True)
        failed += subprocess.run([sys.executable, str(script)]).returncode != 0
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

"""Keep the fast set fast: time the tests not yet marked slow and add every one that takes longer
than the threshold to ``tests/slow_tests.txt`` (``tests/conftest.py`` marks those ``slow``).

    python tests/tools/mark_slow.py [--threshold 0.25]      (or: make mark-slow)

Tests only ever join the list; remove a line by hand when a test became fast.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

LIST = Path(__file__).resolve().parents[1] / "slow_tests.txt"


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threshold", type=float, default=0.25, help="seconds (setup + call + teardown)")
    args = ap.parse_args()
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as tmp:
        out = tmp.name
    env = dict(os.environ, CHOLINE_DURATIONS_FILE=out)
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-m",
            "not slow",
            "-q",
            "-p",
            "tests.tools.durations",
            "-p",
            "no:cacheprovider",
        ],
        env=env,
        check=False,
    )
    times = json.loads(Path(out).read_text())
    known = set(LIST.read_text().split()) if LIST.exists() else set()
    slow = {node for node, t in times.items() if t >= args.threshold}
    merged = sorted(known | slow)
    header = "# tests marked slow by tests/tools/mark_slow.py (they take longer than the fast set allows)\n"
    LIST.write_text(header + "".join(f"{n}\n" for n in merged))
    fast = sum(t for n, t in times.items() if n not in slow)
    print(f"{len(slow - known)} tests newly marked slow; the fast set left takes {fast:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

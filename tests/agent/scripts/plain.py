"""A script that knows nothing of choline: prints, writes outputs, changes a file it was shipped with."""

import os
import sys
import time
from pathlib import Path

n = int(sys.argv[1]) if len(sys.argv) > 1 else 5
pause = float(sys.argv[2]) if len(sys.argv) > 2 else 0.0
for i in range(n):
    print(f"line {i}", flush=True)
    if pause:
        time.sleep(pause)
print("to stderr", file=sys.stderr, flush=True)
print(f"run {os.environ.get('CHOLINE_RUN_ID')} attempt {os.environ.get('CHOLINE_ATTEMPT')}", flush=True)
Path("outputs").mkdir(exist_ok=True)
Path("outputs/result.txt").write_text("42\n")
with open("data.csv", "a") as fh:
    fh.write("3,4\n")
Path("model").mkdir(exist_ok=True)
Path("model/card.json").write_text('{"name": "tiny"}')
Path("model/weights.bin").write_bytes(b"\x00" * 64)

"""Runs until stopped."""

import time

print("sleeping", flush=True)
for _ in range(600):
    time.sleep(0.1)

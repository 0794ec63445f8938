"""Waits for a control command from the agent and prints it."""

import time

import choline

run = choline.init(seed=0, threads=1)
print("waiting for a control", flush=True)
got = []
deadline = time.time() + 60
while time.time() < deadline and not got:
    got = run.pending_controls()
    time.sleep(0.05)
for c in got:
    print(f"control {c.action} {sorted(c.params.items())}", flush=True)
run.finish()

"""The end of the `make run` demo: deploy the digits model the run just trained and ask it about one image
of the validation split, next to the image's true label.

    python examples/digits/predict_demo.py [--index N] [--undeploy]

It drives the real CLI against the control plane `choline up` started: `choline models show digits` (the
version the successful run registered), `choline deploy model digits` (a serving process; prints the URL),
`choline predict digits --json '{"pixels": [...]}'` through the gateway.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def say(text: str) -> None:
    sys.stderr.write(f"\n=== demo: {text}\n\n")
    sys.stderr.flush()


def choline(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    out = subprocess.run(
        [sys.executable, "-m", "choline.cli.main", *args], capture_output=True, text=True, timeout=timeout
    )
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--index", type=int, default=0, help="which image of the validation split")
    ap.add_argument("--model", default="digits")
    ap.add_argument("--undeploy", action="store_true", help="stop the deployment at the end")
    args = ap.parse_args()

    deadline = time.monotonic() + 60  # the syncer registers the run's bundle as it hears the run succeeded
    while True:
        show = choline("models", "show", args.model, "--json")
        if show.returncode == 0:
            break
        if time.monotonic() > deadline:
            sys.stderr.write(show.stderr)
            return 1
        time.sleep(1)
    model = json.loads(show.stdout)
    say(f"model {model['name']}:{model['version']} (from run {model['run_id']}): {model['card']['purpose']}")

    say(f"choline deploy model {args.model}")
    deploy = choline("deploy", "model", args.model)
    sys.stderr.write(deploy.stderr)
    if deploy.returncode != 0:
        return deploy.returncode
    print(deploy.stdout.strip())

    sys.path.insert(0, str(HERE))
    from train import load  # the same split the run trained on (seed 0)

    x, y, _, val = load(0)
    i = int(val[args.index % len(val)])
    pixels = [float(v) for v in x[i].tolist()]
    say(f"choline predict {args.model} --json '{{\"pixels\": [...64 values...]}}'  (image {i} of sklearn digits)")
    pred = choline("predict", args.model, "--json", json.dumps({"pixels": pixels}))
    sys.stderr.write(pred.stderr)
    if pred.returncode != 0:
        return pred.returncode
    out = json.loads(pred.stdout)["digit"]
    rows = [" ".join(" .:-=+*#%@"[min(9, int(v * 10 / 17))] for v in pixels[r * 8 : r * 8 + 8]) for r in range(8)]
    sys.stderr.write("\n".join("    " + r for r in rows) + "\n")
    print(f"predicted: {out['label']} (probability {out['score']:.2f})    true label: {int(y[i])}")
    if args.undeploy:
        choline("undeploy", args.model)
    else:
        say(f"the deployment stays up: choline deployments ls; stop it with: choline undeploy {args.model}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

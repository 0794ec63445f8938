"""A run's material as the advisor gathers it, made up for tests: a diverging run with secrets
planted everywhere a careless context would pick them up."""

from __future__ import annotations

import math
from datetime import datetime, timezone

from choline_core.events import DataMount, RunSpec, RunState
from choline_core.rpc import AttemptInfo, RunInfo
from choline_monitor.context import DatasetCard, MetricSummary, RunMaterial

# secrets: an env var by name, values that look like keys, one assigned in the script, one in a URL
SECRETS = {
    "WANDB_API_KEY": "wandbkey0123456789abcdefwandbkey0123456789",
    "HF_TOKEN": "hf_QwErTyUiOpAsDfGhJkLzXcVbNm123456",
    "DB_PASSWORD": "correct-horse-battery-staple",
    "script": "sk-proj-AbCdEf0123456789GhIjKlMnOpQr",
    "url": "s3cr3tPassw0rd",
    "log": "ghp_0123456789abcdefghijABCDEFGHIJklmnop",
    "aws": "AKIAIOSFODNN7EXAMPLE",
}

TRACEBACK = """Traceback (most recent call last):
  File "/box/attempts/1/code/train.py", line 61, in <module>
    main()
  File "/box/attempts/1/code/train.py", line 55, in main
    loss.backward()
  File "/usr/lib/python3.11/site-packages/torch/_tensor.py", line 522, in backward
    torch.autograd.backward(
RuntimeError: Function 'MseLossBackward0' returned nan values in its 0th output."""


def script(extra_lines: int = 0) -> str:
    body = [
        '"""A small regression script."""',
        "import argparse",
        "import os",
        "import torch",
        "",
        f'API_KEY = "{SECRETS["script"]}"',
        f'STORE = "https://trainer:{SECRETS["url"]}@data.example.com/bucket"',
        "",
        "def main():",
        "    ap = argparse.ArgumentParser()",
        "    ap.add_argument('--lr', type=float, default=3e-3)",
        "    ap.add_argument('--epochs', type=int, default=10)",
        "    ap.add_argument('--batch-size', type=int, default=32)",
        "    args = ap.parse_args()",
    ]
    body += [f"    helper_{i} = {i}  # filler line {i}" for i in range(extra_lines)]
    body += [
        "    model = torch.nn.Linear(8, 1)",
        "    opt = torch.optim.AdamW(model.parameters(), lr=args.lr)",
        "    for epoch in range(args.epochs):",
        "        x, y = torch.randn(args.batch_size, 8), torch.randn(args.batch_size, 1)",
        "        loss = torch.nn.functional.mse_loss(model(x), y)",
        "        opt.zero_grad()",
        "        loss.backward()",
        "        opt.step()",
        "",
        "if __name__ == '__main__':",
        "    main()",
    ]
    return "\n".join(body) + "\n"


def run_info(run_id: str = "r-div1") -> RunInfo:
    now = datetime(2026, 11, 23, 16, 0, tzinfo=timezone.utc)
    return RunInfo(
        run_id=run_id,
        owner="admin",
        name="regression",
        state=RunState.running,
        spec=RunSpec(
            script="train.py",
            args=["--lr", "50", "--epochs", "3"],
            gpus="1xcpu",
            code_digest="0" * 64,
            env={
                "WANDB_API_KEY": SECRETS["WANDB_API_KEY"],
                "HF_TOKEN": SECRETS["HF_TOKEN"],
                "DB_PASSWORD": SECRETS["DB_PASSWORD"],
                "OMP_NUM_THREADS": "1",
            },
            data=[DataMount(name="digits-csv", manifest="a" * 64)],
        ),
        created_at=now,
        updated_at=now,
        attempts=[AttemptInfo(attempt=1, box_id="b-1", price_per_hour=0.2, last_step=120)],
        cost=0.01,
    )


def finding(run_id: str = "r-div1") -> dict[str, object]:
    return {
        "id": "f" * 32,
        "run_id": run_id,
        "detector": "divergence",
        "severity": "critical",
        "step": 45,
        "message": "loss is diverging: 31.2 (median of the last 20 points) is 13.4x its best 2.33 (step 1)",
        "evidence": {"loss": 31.2, "best": 2.33, "best_step": 1, "ratio": 13.4, "k": 4.0, "episode": 1},
    }


def material(
    *, log_lines: int = 40, metric_points: int = 200, extra_script: int = 0, question: str | None = None
) -> RunMaterial:
    m = RunMaterial(run_id="r-div1", run=run_info(), finding=finding(), question=question)
    m.findings = [m.finding or {}]
    loss = [(s, 2.3 if s < 10 else 30 + 5 * math.sin(s)) for s in range(1, metric_points + 1)]
    m.metrics = {
        "train/loss": MetricSummary.of("train/loss", loss),
        "lr": MetricSummary.of("lr", [(s, 50.0) for s in range(1, metric_points + 1)]),
        "grad_norm": MetricSummary.of(
            "grad_norm", [(s, None if s > metric_points - 3 else float(s)) for s in range(1, metric_points + 1)]
        ),
    }
    m.logs = [f"epoch 0 step {i} loss {30 + i % 7}" for i in range(log_lines)]
    m.logs.insert(len(m.logs) // 2, f"using token {SECRETS['log']} and key {SECRETS['aws']}")
    m.logs += TRACEBACK.splitlines()
    m.logs.append(f"wandb: logging in with {SECRETS['WANDB_API_KEY']}")
    m.traceback = TRACEBACK
    m.script_path = "train.py"
    m.script = script(extra_script)
    m.environment = {"python": "3.11.9", "torch": "2.13.0 (base)", "requirements": "numpy, scikit-learn"}
    m.datasets = [
        DatasetCard(
            name="digits-csv",
            manifest="a" * 64,
            size=1_200_000,
            files=3,
            modality="tabular",
            columns=["pixel_0", "pixel_1", "label"],
        )
    ]
    return m

"""Record the monitor's evaluation corpus: real small training runs on this machine's CPU.

Each run is a child process that trains a real torch model on an offline scikit-learn data set
and writes one JSON line per step to stdout (the metric points a training script logs through
``choline``). This parent plays the worker agent: it reads those lines, sends a heartbeat every
``HB_INTERVAL_S`` (step, phase, cpu percent and RSS of the child from ``/proc``, and a device
utilisation), and records how the process ended (exit code, the tail of stderr).

Device utilisation on a CPU box: ``util`` in the heartbeat's ``GpuReport`` is the child's
compute duty cycle, the share of wall-clock time spent in forward/backward/optimizer work
(what ``nvidia-smi`` reports for a GPU: the share of time a kernel ran). Time the child spends
waiting on its data loader counts as idle, exactly as a starved GPU idles.

Faults are real, not drawn: a learning rate far too high, a learning rate multiplied mid-run, a
NaN in the input data, a numerically naive loss, label noise that makes a big network memorise,
a data loader that blocks, a data loader that becomes slow (or is slow from the start), a label
out of range (a traceback), a process killed with SIGKILL, corrupted batches, and stuck
training (a tiny learning rate, frozen parameters, ``zero_grad`` in the wrong place, labels
shuffled against their inputs).

Usage::

    python services/monitor/corpus/record.py record --work /tmp/corpus-work [--jobs 2] [--only KIND]
    python services/monitor/corpus/record.py freeze --work /tmp/corpus-work

``record`` is resumable (a run already in the work folder is skipped). ``freeze`` applies the
ground-truth labelling rules (``ground_truth``), drops runs whose fault did not show in the data
(and says so), and writes ``runs.jsonl.gz`` and ``manifest.json`` next to this file.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import gzip
import hashlib
import json
import math
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
HB_INTERVAL_S = 0.25
MAX_RUN_S = 600.0
STALL_FREEZE_S = 150.0  # a blocked loader is given up on (SIGTERM, reason "stopped") after this long
FORMAT_VERSION = 1


def out(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


# =============================================================================================
# The plan: which runs, with which hyper-parameters and faults (deterministic)
# =============================================================================================
DATASETS = {
    # name: (task, target steps per healthy run low/high)
    "digits": ("cls", 500, 1200),
    "breast_cancer": ("cls", 300, 900),
    "wine": ("cls", 300, 700),
    "iris": ("cls", 300, 600),
    "diabetes": ("reg", 300, 900),
    "synth_cls": ("cls", 600, 1600),
    "synth_reg": ("reg", 600, 1600),
    "moons": ("cls", 400, 1200),
}

KINDS = {
    # kind: number of runs
    "healthy": 130,
    "lr_high": 12,
    "lr_jump": 12,
    "nan": 14,
    "overfit": 14,
    "stall": 10,
    "crash": 8,
    "kill": 8,
    "spike": 14,
    "plateau": 14,
    "starve": 20,
    "starve_start": 16,
}


def _base_spec(rng: random.Random, kind: str, i: int) -> dict[str, Any]:
    ds = rng.choice(list(DATASETS))
    task, lo, hi = DATASETS[ds]
    model = "mlp"
    if ds == "digits" and rng.random() < 0.35:
        model = "cnn"
    elif rng.random() < 0.08:
        model = "linear"
    if ds in ("wine", "iris", "breast_cancer", "diabetes"):
        hidden = rng.choice([512, 768, 1024])
        batch = rng.choice([8, 16, 32])
    else:
        hidden = rng.choice([256, 384, 512, 768])
        batch = rng.choice([64, 128, 256])
    opt = rng.choice(["adam", "adamw", "sgd"])
    lr = {
        "adam": rng.choice([3e-4, 1e-3, 2e-3]),
        "adamw": rng.choice([3e-4, 1e-3]),
        "sgd": rng.choice([0.01, 0.03, 0.05]),
    }[opt]
    return {
        "kind": kind,
        "index": i,
        "seed": rng.randrange(1_000_000),
        "dataset": ds,
        "task": task,
        "model": model,
        "hidden": hidden,
        "depth": rng.choice([2, 3]),
        "dropout": rng.choice([0.0, 0.0, 0.1, 0.2]),
        "batch": batch,
        "opt": opt,
        "lr": lr,
        "wd": rng.choice([0.0, 1e-4, 1e-3, 1e-2]) if opt != "sgd" else rng.choice([0.0, 1e-4]),
        "sched": rng.choice(["const", "cosine", "step"]),
        "clip": rng.choice([None, None, 1.0, 5.0]),
        "target_steps": rng.randint(lo, hi),
        "faults": {},
    }


def split_of(kind: str, i: int) -> str:
    """Runs pair up (0-1, 2-3, ...); a fixed coin per pair sends one to each half, so halves stay balanced
    and adding runs never moves an existing one."""
    first_is_tune = random.Random(f"split-{kind}-{i // 2}").random() < 0.5
    return "tune" if (i % 2 == 0) == first_is_tune else "heldout"


def plan() -> list[dict[str, Any]]:
    specs: list[dict[str, Any]] = []
    for kind, n in KINDS.items():
        for i in range(n):
            rng = random.Random(f"{kind}-{i}")
            s = _base_spec(rng, kind, i)
            if kind == "healthy" and i >= 66:  # the second batch: regularised, on the larger data sets
                s["dataset"] = rng.choice(["digits", "synth_cls", "synth_reg", "moons", "breast_cancer"])
                s["task"] = DATASETS[s["dataset"]][0]
                s["wd"] = rng.choice([1e-4, 1e-3, 1e-2]) if s["opt"] != "sgd" else 1e-4
                s["dropout"] = rng.choice([0.1, 0.2])
                if s["model"] == "cnn" and s["dataset"] != "digits":
                    s["model"] = "mlp"
                if s["dataset"] == "breast_cancer":
                    s["target_steps"] = rng.randint(150, 400)
            f = s["faults"]
            steps = s["target_steps"]
            if kind == "lr_high":
                s["clip"] = None
                if rng.random() < 0.6:
                    s["opt"], s["lr"] = "sgd", rng.choice([2.0, 5.0, 20.0, 50.0])
                else:
                    s["opt"], s["lr"] = rng.choice(["adam", "adamw"]), rng.choice([0.3, 1.0, 3.0])
                s["sched"] = "const"
            elif kind == "lr_jump":
                s["clip"] = None
                s["sched"] = "const"
                f["lr_jump_step"] = rng.randint(int(steps * 0.3), int(steps * 0.6))
                f["lr_jump_factor"] = (
                    rng.choice([100.0, 300.0, 1000.0]) if s["opt"] != "sgd" else rng.choice([100.0, 300.0])
                )
            elif kind == "nan":
                f["nan_step"] = rng.randint(int(steps * 0.2), int(steps * 0.8))
                f["nan_how"] = "data" if (s["task"] == "reg" or rng.random() < 0.55) else "lossfn"
            elif kind == "overfit":
                s["model"] = "mlp"
                s["dataset"] = rng.choice(["digits", "breast_cancer", "synth_cls", "wine", "diabetes", "moons"])
                s["task"] = DATASETS[s["dataset"]][0]
                s["hidden"], s["depth"], s["dropout"], s["wd"] = rng.choice([512, 1024]), 3, 0.0, 0.0
                s["opt"], s["lr"], s["sched"], s["clip"] = "adam", rng.choice([1e-3, 2e-3]), "const", None
                f["label_noise"] = rng.choice([0.3, 0.45, 0.6])
                if s["dataset"] in ("synth_cls", "moons"):
                    f["subsample"] = rng.choice([600, 1000])  # memorising needs a small training set
                s["target_steps"] = rng.randint(1500, 2500)
            elif kind == "stall":
                f["stall_step"] = rng.randint(int(steps * 0.2), int(steps * 0.7))
            elif kind == "crash":
                f["crash_step"] = rng.randint(int(steps * 0.1), int(steps * 0.9))
            elif kind == "kill":
                f["kill_step"] = rng.randint(int(steps * 0.1), int(steps * 0.9))
            elif kind == "spike":
                first = rng.randint(int(steps * 0.25), int(steps * 0.6))
                f["spike_steps"] = sorted({first, *(first + rng.randint(30, 300) for _ in range(rng.randint(0, 2)))})
                f["spike_mult"] = rng.choice([30.0, 100.0, 300.0])
            elif kind == "plateau":
                f["stuck"] = ["lr_tiny", "frozen", "zero_grad_bug", "shuffled_labels"][i % 4]
                if f["stuck"] == "lr_tiny":
                    s["opt"], s["lr"] = "sgd", rng.choice([1e-6, 3e-6])
            elif kind == "starve":
                if i >= 12:  # the second batch: slower storage, shorter runs
                    s["target_steps"] = steps = rng.randint(250, 600)
                f["starve_step"] = rng.randint(int(steps * 0.25), int(steps * 0.6))
                f["starve_delay_s"] = rng.choice([0.03, 0.05, 0.08] if i < 12 else [0.12, 0.2, 0.3])
            elif kind == "starve_start":
                if i >= 8:
                    s["target_steps"] = rng.randint(200, 400)
                f["starve_step"] = 0
                f["starve_delay_s"] = rng.choice([0.03, 0.05, 0.08] if i < 8 else [0.12, 0.2, 0.3])
            s["run_id"] = f"c-{kind.replace('_', '-')}-{i:02d}"
            s["split"] = split_of(kind, i)
            specs.append(s)
    return specs


# =============================================================================================
# The child: a real training script
# =============================================================================================
def _fmt(v: float) -> float | str:
    if math.isnan(v):
        return "nan"
    if math.isinf(v):
        return "inf" if v > 0 else "-inf"
    return float(f"{v:.5g}")


def child(spec: dict[str, Any]) -> None:
    import numpy as np
    import torch
    import torch.nn.functional as F
    from sklearn import datasets

    torch.set_num_threads(1)
    seed = spec["seed"]
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    f = spec["faults"]
    ds, task = spec["dataset"], spec["task"]

    if ds == "digits":
        X, y = datasets.load_digits(return_X_y=True)
    elif ds == "breast_cancer":
        X, y = datasets.load_breast_cancer(return_X_y=True)
    elif ds == "wine":
        X, y = datasets.load_wine(return_X_y=True)
    elif ds == "iris":
        X, y = datasets.load_iris(return_X_y=True)
    elif ds == "diabetes":
        X, y = datasets.load_diabetes(return_X_y=True)
    elif ds == "synth_cls":
        X, y = datasets.make_classification(
            n_samples=12000, n_features=40, n_informative=20, n_classes=5, flip_y=0.03, random_state=seed
        )
    elif ds == "synth_reg":
        X, y = datasets.make_regression(n_samples=12000, n_features=30, n_informative=15, noise=10.0, random_state=seed)
        y = y + 30.0 * np.sin(X[:, 0] * 2.0)
    elif ds == "moons":
        X, y = datasets.make_moons(n_samples=8000, noise=0.25, random_state=seed)
    else:
        raise ValueError(ds)

    n = len(X)
    perm = rng.permutation(n)
    n_val = max(30, n // 5)
    va, tr = perm[:n_val], perm[n_val:]
    if "subsample" in f:
        tr = tr[: f["subsample"]]
    mu, sd = X[tr].mean(0), X[tr].std(0)
    sd[sd < 1e-6] = 1.0  # constant columns (digits' border pixels) stay as they are
    Xtr = torch.tensor((X[tr] - mu) / sd, dtype=torch.float32)
    Xva = torch.tensor((X[va] - mu) / sd, dtype=torch.float32)
    if task == "cls":
        n_out = int(y.max()) + 1
        ytr_np = y[tr].copy()
        if f.get("label_noise"):
            flip = rng.random(len(ytr_np)) < f["label_noise"]
            ytr_np[flip] = rng.integers(0, n_out, flip.sum())
        ytr, yva = torch.tensor(ytr_np, dtype=torch.long), torch.tensor(y[va], dtype=torch.long)
    else:
        n_out = 1
        ym, ys = y[tr].mean(), y[tr].std()
        ytr_np = (y[tr] - ym) / ys
        if f.get("label_noise"):
            ytr_np = ytr_np + rng.normal(0, 1.5 * f["label_noise"] * 2, len(ytr_np))
        ytr = torch.tensor(ytr_np, dtype=torch.float32)
        yva = torch.tensor((y[va] - ym) / ys, dtype=torch.float32)

    d_in = Xtr.shape[1]
    if spec["model"] == "cnn":
        Xtr, Xva = Xtr.view(-1, 1, 8, 8), Xva.view(-1, 1, 8, 8)
        model = torch.nn.Sequential(
            torch.nn.Conv2d(1, 32, 3, padding=1),
            torch.nn.ReLU(),
            torch.nn.Conv2d(32, 64, 3, padding=1),
            torch.nn.ReLU(),
            torch.nn.MaxPool2d(2),
            torch.nn.Flatten(),
            torch.nn.Dropout(spec["dropout"]),
            torch.nn.Linear(64 * 16, 128),
            torch.nn.ReLU(),
            torch.nn.Linear(128, n_out),
        )
    elif spec["model"] == "linear":
        model = torch.nn.Sequential(torch.nn.Linear(d_in, n_out))
    else:
        layers: list[torch.nn.Module] = []
        width = d_in
        for _ in range(spec["depth"]):
            layers += [torch.nn.Linear(width, spec["hidden"]), torch.nn.ReLU()]
            if spec["dropout"]:
                layers.append(torch.nn.Dropout(spec["dropout"]))
            width = spec["hidden"]
        layers.append(torch.nn.Linear(width, n_out))
        model = torch.nn.Sequential(*layers)

    params = list(model.parameters())
    if f.get("stuck") == "frozen":  # the bug: everything frozen but the last bias
        for p in params[:-1]:
            p.requires_grad_(False)
    base_lr = spec["lr"]
    if spec["opt"] == "sgd":
        opt: torch.optim.Optimizer = torch.optim.SGD(params, lr=base_lr, momentum=0.9, weight_decay=spec["wd"])
    elif spec["opt"] == "adam":
        opt = torch.optim.Adam(params, lr=base_lr, weight_decay=spec["wd"])
    else:
        opt = torch.optim.AdamW(params, lr=base_lr, weight_decay=spec["wd"] or 0.01)

    B = spec["batch"]
    ntr = len(Xtr)
    steps_per_epoch = max(1, ntr // B)
    epochs = max(2, math.ceil(spec["target_steps"] / steps_per_epoch))
    total = epochs * steps_per_epoch

    def lr_at(step: int) -> float:
        if spec["sched"] == "cosine":
            factor = 0.5 * (1 + math.cos(math.pi * min(step, total) / total))
        elif spec["sched"] == "step":
            factor = 0.1 ** (step // max(1, total // 3))
        else:
            factor = 1.0
        if "lr_jump_step" in f and step >= f["lr_jump_step"]:
            factor *= f["lr_jump_factor"]
        return base_lr * max(factor, 0.01 if spec["sched"] == "cosine" else 0.0)

    temperature = 1.0

    def loss_fn(outp: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if task == "reg":
            return F.mse_loss(outp.squeeze(-1), target)
        if f.get("nan_how") == "lossfn":  # the script's own softmax, without the max subtracted
            e = torch.exp(outp / temperature)
            probs = e / e.sum(-1, keepdim=True)
            return -torch.log(probs.gather(1, target[:, None])).mean()
        return F.cross_entropy(outp, target)

    def evaluate() -> dict[str, float | str]:
        model.eval()
        with torch.no_grad():
            o = model(Xva)
            res: dict[str, float | str] = {"val_loss": _fmt(float(loss_fn(o, yva)))}
            if task == "cls":
                res["val_acc"] = _fmt(float((o.argmax(-1) == yva).float().mean()))
        model.train()
        return res

    step = 0
    compute = 0.0
    t_thr, n_thr = time.time(), 0
    spike_steps = set(f.get("spike_steps", []))
    for epoch in range(epochs):
        order = torch.randperm(ntr)
        labels = ytr
        if f.get("stuck") == "shuffled_labels":  # the bug: labels shuffled apart from their inputs
            labels = ytr[torch.randperm(ntr)]
        for b in range(steps_per_epoch):
            # ---- the data loader
            idx = order[b * B : (b + 1) * B]
            xb, yb = Xtr[idx].clone(), labels[idx].clone()
            step += 1
            if f.get("stall_step") == step:
                time.sleep(10**6)  # a worker that never returns
            if "starve_step" in f and step >= f["starve_step"]:
                time.sleep(f["starve_delay_s"])  # reads from slow remote storage
            if f.get("crash_step") == step:
                if task == "cls":
                    yb[0] = n_out + 7  # a corrupt label file: IndexError in cross_entropy
                else:
                    xb = xb[..., :-1]  # a corrupt shard with a column missing: shape error
            if f.get("nan_step") == step:
                if f["nan_how"] == "data":
                    xb.view(len(xb), -1)[0, 0] = float("nan")
                else:
                    temperature = 0.01  # a temperature schedule gone wrong: exp() overflows
            if step in spike_steps:
                xb = xb * f["spike_mult"]
            lr = lr_at(step)
            for g in opt.param_groups:
                g["lr"] = lr
            # ---- the step
            c0 = time.perf_counter()
            opt.zero_grad()
            loss = loss_fn(model(xb), yb)
            loss.backward()
            gn = torch.nn.utils.clip_grad_norm_([p for p in params if p.grad is not None], spec["clip"] or float("inf"))
            if f.get("stuck") == "zero_grad_bug":
                opt.zero_grad()
            opt.step()
            compute += time.perf_counter() - c0
            n_thr += len(xb)
            m: dict[str, float | str] = {"loss": _fmt(float(loss)), "grad_norm": _fmt(float(gn))}
            if step % 10 == 0:
                now = time.time()
                m["lr"] = _fmt(lr)
                m["throughput"] = _fmt(n_thr / max(now - t_thr, 1e-6))
                t_thr, n_thr = now, 0
            out(json.dumps({"s": step, "t": time.time(), "e": epoch, "c": round(compute, 4), "m": m}))
        c0 = time.perf_counter()
        ev = evaluate()
        compute += time.perf_counter() - c0
        out(json.dumps({"s": step, "t": time.time(), "e": epoch, "c": round(compute, 4), "m": ev}))


# =============================================================================================
# The parent: plays the agent (heartbeats, exit) and writes one run record
# =============================================================================================
def _proc_stats(pid: int) -> tuple[float, float] | None:
    """(cpu seconds, rss MB) of a process from /proc, or None when it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        ticks = os.sysconf("SC_CLK_TCK")
        cpu = (int(stat[11]) + int(stat[12])) / ticks
        rss = 0.0
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1]) / 1024
        return cpu, rss
    except (OSError, IndexError, ValueError):
        return None


def _mem_total_mb() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) / 1024
    return 0.0


def record_one(spec: dict[str, Any], work: Path) -> Path:
    dest = work / f"{spec['run_id']}.json"
    if dest.exists():
        return dest
    f = spec["faults"]
    t0 = time.time()
    proc = subprocess.Popen(
        [sys.executable, str(Path(__file__).resolve()), "child", json.dumps(spec)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        bufsize=1,
    )
    lock = threading.Lock()
    metrics: dict[str, list[list[Any]]] = {}
    progress: dict[str, Any] = {"step": None, "compute": 0.0, "last_line": time.time()}
    heartbeats: list[list[Any]] = []
    stderr_lines: list[str] = []
    stopped_by: list[str] = []

    def read_stdout() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            with lock:
                for key, v in rec["m"].items():
                    metrics.setdefault(key, []).append([rec["s"], round(rec["t"] - t0, 3), v, rec["e"]])
                progress["step"], progress["compute"], progress["last_line"] = rec["s"], rec["c"], time.time()

    def read_stderr() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            stderr_lines.append(line.rstrip("\n"))
            del stderr_lines[:-40]

    threads = [threading.Thread(target=read_stdout, daemon=True), threading.Thread(target=read_stderr, daemon=True)]
    for th in threads:
        th.start()
    mem_total = _mem_total_mb()
    last_cpu, last_compute, last_t = 0.0, 0.0, time.time()
    while proc.poll() is None:
        time.sleep(HB_INTERVAL_S)
        now = time.time()
        stats = _proc_stats(proc.pid)
        with lock:
            step, compute, last_line = progress["step"], progress["compute"], progress["last_line"]
        if stats is None:
            continue
        cpu, rss = stats
        dt = max(now - last_t, 1e-6)
        cpu_pct = 100.0 * (cpu - last_cpu) / dt
        util = min(100.0, max(0.0, 100.0 * (compute - last_compute) / dt))
        last_cpu, last_compute, last_t = cpu, compute, now
        phase = "training" if step is not None else "fetching"
        heartbeats.append(
            [round(now - t0, 3), step, phase, round(cpu_pct, 1), round(rss, 1), round(util, 1), round(mem_total)]
        )
        if "kill_step" in f and step is not None and step >= f["kill_step"]:
            proc.send_signal(signal.SIGKILL)  # the kernel's OOM killer, say
            stopped_by.append("killed")
        if "stall_step" in f and step is not None and now - last_line > STALL_FREEZE_S:
            proc.send_signal(signal.SIGTERM)  # the user gives up on the frozen run
            stopped_by.append("stopped")
        if now - t0 > MAX_RUN_S:
            proc.send_signal(signal.SIGTERM)
            stopped_by.append("timeout")
    for th in threads:
        th.join(timeout=5)
    code = proc.returncode
    with lock:
        last_step = progress["step"]
    tail = "\n".join(stderr_lines[-15:]) if code != 0 else None
    reason = "stopped" if stopped_by and stopped_by[0] in ("stopped", "timeout") else "exited"
    heartbeats.append([round(time.time() - t0, 3), last_step, "idle", 0.0, 0.0, 0.0, round(mem_total)])
    record = {
        "format": FORMAT_VERSION,
        "run_id": spec["run_id"],
        "kind": spec["kind"],
        "split": spec["split"],
        "spec": spec,
        "device": "cpu",
        "hb_interval_s": HB_INTERVAL_S,
        "started_at": round(t0, 3),
        "metrics": metrics,
        "heartbeats": heartbeats,
        "end": {
            "t": round(time.time() - t0, 3),
            "exit_code": code,
            "reason": reason,
            "last_step": last_step,
            "traceback_tail": tail[-2000:] if tail else None,
            "stopped_by": stopped_by[0] if stopped_by else None,
        },
    }
    tmp = dest.with_suffix(".tmp")
    tmp.write_text(json.dumps(record, separators=(",", ":")))
    tmp.rename(dest)
    return dest


# =============================================================================================
# Ground truth: labels from what the recorded data shows (independent of the detectors' code)
# =============================================================================================
def _finite(series: list[list[Any]]) -> list[tuple[int, float]]:
    return [(s, v) for s, _t, v, _e in series if isinstance(v, (int, float))]


def _med(xs: list[float]) -> float:
    xs = sorted(xs)
    n = len(xs)
    return xs[n // 2] if n % 2 else 0.5 * (xs[n // 2 - 1] + xs[n // 2])


def _smooth(points: list[tuple[int, float]], w: int = 20) -> list[tuple[int, float]]:
    return [(points[i][0], _med([v for _, v in points[max(0, i - w + 1) : i + 1]])) for i in range(len(points))]


def ground_truth(rec: dict[str, Any]) -> tuple[dict[str, int], list[str], str | None]:
    """(labels {detector: onset step}, detectors allowed to fire as well, why the run is dropped or None).

    The rules read the raw stream; thresholds here are the labeller's judgement of "clearly
    broken", written before and apart from the detectors:

    - nan: a non-finite loss, gradient norm or validation loss appears (onset: its step).
    - divergence: lr_high runs whose smoothed loss (running median of 20) exceeds twice the
      untrained model's loss (the least of the first 3 points) for 20 points or more (onset: the
      first of them); lr_jump runs whose smoothed loss after the jump exceeds 3x its level just
      before it (onset: the jump step).
    - plateau, for lr_high runs that neither diverged nor went NaN: the smoothed loss never got
      below 90% of the untrained model's loss.
    - overfit: the smoothed training loss at the end is below its value at the validation
      loss's minimum, and the last validation loss is 1.2x that minimum or more (onset: the
      minimum's step). Applied to every run, healthy ones included, up to the step where another
      fault (a NaN, divergence, a spike, a learning-rate jump) began.
    - stall: the loader blocked (onset: the blocked step), with heartbeats continuing.
    - crash: the process ended with a non-zero exit, not stopped by the user (onset: last step).
    - spike: the loss at a corrupted step is 3x the median of the 50 steps before or more.
    - plateau: the smoothed training loss never improves on its first value by 10% or more.
    - throughput: mean throughput after the loader slowed is under half the mean before it.
    - gpu_util: mean device utilisation of training heartbeats after the onset is under 30%.
    - throughput, on any run: for 10 throughput points in a row (100 steps) the trailing median
      of 5 stays under 30% of the pace the run had before (the 75th percentile of the 30 points
      before the stretch; onset: where it first fell under 60% going back). On this shared
      machine other processes sometimes take the CPU from a run for that long; the run really did
      slow down, so it is labelled as such and does not count as healthy. A moderate slowdown
      (under 60% for 5 points in a row, but not the above) puts throughput in ``allow``: a
      throughput finding there is neither a hit nor a false alarm.
    """
    kind, f = rec["kind"], rec["spec"]["faults"]
    m = rec["metrics"]
    loss = m.get("loss", [])
    labels: dict[str, int] = {}
    allow: list[str] = []
    nonfinite = [
        s for key in ("loss", "grad_norm", "val_loss") for s, _t, v, _e in m.get(key, []) if isinstance(v, str)
    ]
    if nonfinite:
        labels["nan"] = min(nonfinite)
    fl = _finite(loss)
    sm = _smooth(fl)
    drop: str | None = None
    if kind == "healthy" and nonfinite:
        drop = "a healthy configuration produced a non-finite loss"
    if kind == "lr_high":
        allow = ["spike", "plateau", "overfit", "throughput"]
        start = min(v for _, v in fl[:3]) if fl else 0.0  # the untrained model's loss
        above = [s for s, v in sm if v > 2 * start]
        if start > 0 and len(above) >= 20:  # a NaN within a few steps leaves nothing to call divergent
            labels["divergence"] = above[0]
        if not labels:
            if sm and min(v for _, v in sm) > 0.9 * start:
                labels["plateau"] = 0
                allow = ["spike"]
            else:
                drop = "the learning rate did not break the run"
    elif kind == "lr_jump":
        allow = ["spike", "plateau", "throughput"]
        j = f["lr_jump_step"]
        before = [v for s, v in sm if s < j][-1:] or [float("nan")]
        after = [v for s, v in sm if s >= j]
        if any(v > 3 * before[0] for v in after):
            labels["divergence"] = j
        elif "nan" not in labels:
            drop = "the learning-rate jump did not make the loss diverge"
    elif kind == "nan":
        allow = ["spike", "divergence"]
        if "nan" not in labels:
            drop = "the injected NaN did not reach the loss"
    elif kind == "stall":
        allow = ["gpu_util"]
        labels["stall"] = f["stall_step"] - 1
        if rec["end"]["stopped_by"] != "stopped":
            drop = "the run was not stopped for stalling"
    elif kind in ("crash", "kill"):
        if rec["end"]["exit_code"] in (0, None) or rec["end"]["reason"] != "exited":
            drop = "the process did not fail"
        else:
            labels["crash"] = rec["end"]["last_step"] or 0
    elif kind == "spike":
        allow = ["divergence", "nan", "plateau"]
        first = None
        for s0 in f["spike_steps"]:
            prev = [v for s, v in fl if s0 - 50 <= s < s0]
            at = [v for s, v in fl if s == s0]
            if prev and at and at[0] >= 3 * _med(prev):
                first = s0
                break
        if first is None:
            drop = "no corrupted batch made the loss spike"
        else:
            labels["spike"] = first
    elif kind == "plateau":
        allow = ["overfit"]
        first = _med([v for _, v in fl[:20]]) if fl else 0.0
        if sm and min(v for _, v in sm[20:] or sm) < 0.9 * first:
            drop = "the stuck configuration still learned"
        else:
            labels["plateau"] = 0
    elif kind in ("starve", "starve_start"):
        s0 = f["starve_step"]
        thr = [(s, v) for s, v in _finite(m.get("throughput", []))]
        pre = [v for s, v in thr if s < s0]
        post = [v for s, v in thr if s > s0 + 10]
        hbs = [hb for hb in rec["heartbeats"] if hb[2] == "training" and hb[1] is not None and hb[1] > s0]
        util = sum(hb[5] for hb in hbs) / len(hbs) if hbs else 100.0
        if util < 30.0:
            labels["gpu_util"] = s0
        if kind == "starve" and pre and post and sum(post) / len(post) < 0.5 * sum(pre) / len(pre):
            labels["throughput"] = s0
        if kind == "starve_start":
            allow = ["throughput"]  # a starved loader's pace varies with the machine's load
        if kind == "starve" and ("throughput" not in labels or "gpu_util" not in labels):
            drop = "the slow loader did not slow the run enough"
        if kind == "starve_start" and "gpu_util" not in labels:
            drop = "the slow loader did not starve the device"
    # overfitting, on every run with a validation loss, up to where another fault began
    cut = min([labels[k] for k in ("nan", "divergence", "spike") if k in labels], default=10**12)
    if kind == "lr_jump":
        cut = min(cut, f["lr_jump_step"])
    vl = [(s, v) for s, v in _finite(m.get("val_loss", [])) if s < cut]
    sm_cut = [(s, v) for s, v in sm if s < cut]
    if len(vl) >= 4 and sm_cut:
        i_min = min(range(len(vl)), key=lambda i: vl[i][1])
        s_min, v_min = vl[i_min]
        tr_at = [v for s, v in sm_cut if s <= s_min][-1:]
        if tr_at and vl[-1][1] >= 1.2 * v_min and sm_cut[-1][1] < tr_at[0] and i_min < len(vl) - 1:
            labels["overfit"] = s_min
    if kind == "overfit" and "overfit" not in labels:
        drop = "label noise did not make the network overfit"
    # a slowdown the machine caused (other processes took the CPU), on any run: it is one
    if kind not in ("starve", "starve_start"):
        thr = _finite(m.get("throughput", []))
        clear = _sustained_slowdown(thr, below=0.3, points=10, began_below=0.6)
        if clear is not None:
            labels["throughput"] = clear
        elif _sustained_slowdown(thr, below=0.6, points=5) is not None and "throughput" not in allow:
            allow = [*allow, "throughput"]  # a moderate slowdown: either answer is right
    return labels, allow, drop


def _sustained_slowdown(
    thr: list[tuple[int, float]], *, below: float, points: int, began_below: float | None = None
) -> int | None:
    """The start of a slowdown, or None: a stretch of ``points`` throughput points whose trailing
    median of 5 stays under ``below`` times the pace the run had before the stretch (the 75th
    percentile of the 30 points before it, at least 10 of them). The slowdown began where the
    trailing median first fell under ``began_below`` times that pace, going back from the
    stretch (default: the stretch's own start). A run that is slow first and fast later has not
    slowed down."""
    start, count, ref = None, 0, 0.0

    def rmed(i: int) -> float:
        return _med([v for _, v in thr[max(0, i - 4) : i + 1]])

    for i in range(4, len(thr)):
        if start is None:
            before = sorted(v for _, v in thr[max(0, i - 34) : i - 4])  # the 30 points before
            if len(before) < 10:
                continue
            ref = before[int(0.75 * (len(before) - 1))]
        if rmed(i) < below * ref:
            start = i if start is None else start
            count += 1
            if count >= points:
                j = start
                while began_below is not None and j > 4 and rmed(j - 1) < began_below * ref:
                    j -= 1
                return thr[max(0, j - 4)][0]
        else:
            start, count = None, 0
    return None


# =============================================================================================
# Freeze: the work folder -> runs.jsonl.gz + manifest.json
# =============================================================================================
def freeze(work: Path, dest: Path) -> None:
    specs = {s["run_id"]: s for s in plan()}
    runs, dropped = [], []
    for rid in sorted(specs):
        path = work / f"{rid}.json"
        if not path.exists():
            dropped.append({"run_id": rid, "why": "not recorded"})
            continue
        rec = json.loads(path.read_text())
        labels, allow, drop = ground_truth(rec)
        if drop:
            dropped.append({"run_id": rid, "why": drop})
            continue
        rec["labels"] = labels
        rec["split"] = specs[rid]["split"]
        rec["allow"] = allow
        runs.append(rec)
    data = "".join(json.dumps(r, separators=(",", ":")) + "\n" for r in runs).encode()
    gz = gzip.compress(data, compresslevel=9, mtime=0)
    (dest / "runs.jsonl.gz").write_bytes(gz)
    counts: dict[str, dict[str, int]] = {}
    label_counts: dict[str, dict[str, int]] = {}
    for r in runs:
        counts.setdefault(r["kind"], {"tune": 0, "heldout": 0})[r["split"]] += 1
        for d in r["labels"]:
            label_counts.setdefault(d, {"tune": 0, "heldout": 0})[r["split"]] += 1
    manifest = {
        "format": FORMAT_VERSION,
        "file": "runs.jsonl.gz",
        "sha256": hashlib.sha256(gz).hexdigest(),
        "runs": len(runs),
        "points": sum(len(v) for r in runs for v in r["metrics"].values()),
        "heartbeats": sum(len(r["heartbeats"]) for r in runs),
        "kinds": counts,
        "labels": label_counts,
        "healthy": {s: sum(1 for r in runs if not r["labels"] and r["split"] == s) for s in ("tune", "heldout")},
        "dropped": dropped,
        "recorded_on": "cpu, torch " + _torch_version(),
        "hb_interval_s": HB_INTERVAL_S,
    }
    (dest / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    sys.stdout.write(json.dumps({k: manifest[k] for k in ("runs", "points", "heartbeats", "healthy")}) + "\n")
    for d in dropped:
        sys.stdout.write(f"dropped {d['run_id']}: {d['why']}\n")


def _torch_version() -> str:
    try:
        import torch

        return str(torch.__version__)
    except ImportError:
        return "?"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("child")
    c.add_argument("spec")
    r = sub.add_parser("record")
    r.add_argument("--work", type=Path, required=True)
    r.add_argument("--jobs", type=int, default=1)
    r.add_argument("--only", default=None, help="comma-separated kinds")
    r.add_argument("--ids", default=None, help="comma-separated run ids")
    fz = sub.add_parser("freeze")
    fz.add_argument("--work", type=Path, required=True)
    fz.add_argument("--dest", type=Path, default=HERE)
    p = sub.add_parser("plan")
    p.add_argument("--only", default=None)
    args = ap.parse_args()
    if args.cmd == "child":
        child(json.loads(args.spec))
    elif args.cmd == "plan":
        for s in plan():
            if not args.only or s["kind"] in args.only.split(","):
                sys.stdout.write(json.dumps(s) + "\n")
    elif args.cmd == "record":
        args.work.mkdir(parents=True, exist_ok=True)
        specs = plan()
        if args.only:
            specs = [s for s in specs if s["kind"] in args.only.split(",")]
        if args.ids:
            specs = [s for s in specs if s["run_id"] in args.ids.split(",")]
        with concurrent.futures.ThreadPoolExecutor(args.jobs) as ex:
            futs = {ex.submit(record_one, s, args.work): s for s in specs}
            for fut in concurrent.futures.as_completed(futs):
                s = futs[fut]
                try:
                    fut.result()
                    sys.stdout.write(f"recorded {s['run_id']}\n")
                except Exception as exc:
                    sys.stdout.write(f"FAILED {s['run_id']}: {exc!r}\n")
                sys.stdout.flush()
    elif args.cmd == "freeze":
        freeze(args.work, args.dest)


if __name__ == "__main__":
    main()

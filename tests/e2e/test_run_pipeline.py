"""`choline run` end to end on the embedded control plane and a local box: the digits example and
a plain script, then every kind of bad input."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pytest

from .conftest import REPO, ControlPlane

pytestmark = [pytest.mark.slow, pytest.mark.e2e]


def wait_no_boxes(cp: ControlPlane, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while cp.live_boxes():
        assert time.monotonic() < deadline, f"boxes left running: {cp.live_boxes()}"
        time.sleep(0.2)


def run_id_of(stderr: str) -> str:
    for line in stderr.splitlines():
        if " queued on " in line:
            return line.split("run ", 1)[1].split()[0]
    raise AssertionError(f"no run id in: {stderr}")


def test_digits_example_end_to_end(controlplane: ControlPlane, tmp_path: Path) -> None:
    project = tmp_path / "digits"
    shutil.copytree(REPO / "examples" / "digits", project, ignore=shutil.ignore_patterns("choline-runs", "__pycache__"))
    out = controlplane.cli("train.py", "--1xcpu", "--epochs", "3", cwd=project)
    assert out.returncode == 0, out.stderr[-3000:]
    run_id = run_id_of(out.stderr)
    summary = json.loads(out.stdout.strip().splitlines()[-1])  # the script's own last line, streamed back
    assert summary["step"] > 0 and summary["attempt"] == 1
    assert "succeeded" in out.stderr.splitlines()[-1]
    # results came back, the model bundle among them, and it loads and predicts
    results = project / "choline-runs" / run_id
    assert (results / "model.safetensors").is_file()
    bundles = list(results.glob("*.choline-bundle.tar.gz"))
    assert len(bundles) == 1
    from sklearn.datasets import load_digits

    import choline

    bundle = choline.load_bundle(bundles[0])
    assert bundle.card["purpose"] and bundle.inputs
    x, y = load_digits(return_X_y=True)
    predicted = bundle.predict(x[:64]).argmax(dim=1).tolist()
    assert sum(int(p == t) for p, t in zip(predicted, y[:64], strict=True)) >= 50  # a trained model, not noise
    # logs stored in order, metrics stored with steps
    show = controlplane.cli("show", run_id, "--json")
    info = json.loads(show.stdout)
    assert info["state"] == "succeeded" and len(info["attempts"]) == 1
    logs = controlplane.cli("logs", run_id)
    assert logs.returncode == 0 and summary["run_dir"] in logs.stdout
    from choline.client import CholineClient
    from choline_core.settings import CholineSettings

    os.environ["CHOLINE_HOME"] = str(controlplane.home)  # restored by the autouse choline_home fixture
    with CholineClient.from_settings(CholineSettings()) as api:
        lines = list(api.iter_logs(run_id))
        seqs = [(line.attempt, line.seq) for line in lines]
        assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
        points = api.metrics(run_id, ["train/loss"])
        steps = [p.step for p in points]
        assert steps and steps == sorted(steps) and steps[-1] == summary["step"]
        assert api.checkpoints(run_id)
    wait_no_boxes(controlplane)


def test_plain_script_output_files_come_back(controlplane: ControlPlane, tmp_path: Path) -> None:
    (tmp_path / "job.py").write_text(
        "import sys\nprint('hello from', sys.argv[1:])\nopen('result.txt', 'w').write('42')\n"
    )
    out = controlplane.cli("job.py", "--1xcpu", "--alpha", "7", "--", "--4x3090", cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "hello from ['--alpha', '7', '--4x3090']" in out.stdout
    run_id = run_id_of(out.stderr)
    assert (tmp_path / "choline-runs" / run_id / "result.txt").read_text() == "42"
    wait_no_boxes(controlplane)


def one_line_error(out) -> str:  # type: ignore[no-untyped-def]
    err = out.stderr.strip().splitlines()
    assert err and err[-1].startswith("choline: error:"), out.stderr
    return str(err[-1])


def test_bad_input_is_one_clear_line_and_no_box(controlplane: ControlPlane, tmp_path: Path) -> None:
    (tmp_path / "ok.py").write_text("print(1)\n")
    cases = {
        ("missing.py", "--1xcpu"): ("no such script", 1),
        ("--gpus", "9x9999", "ok.py"): ("accepted forms", 1),
        ("ok.py", "--4x3091"): ("unknown GPU model", 1),
        ("--data", str(tmp_path / "nope"), "ok.py"): ("does not exist", 1),
        ("--provider", "nimbus", "ok.py"): ("nimbus", 1),
        ("--retries",): ("needs a value", 2),
    }
    for argv, (text, code) in cases.items():
        out = controlplane.cli("run", *argv, cwd=tmp_path)
        assert out.returncode == code, (argv, out.stderr)
        assert text in one_line_error(out), (argv, out.stderr)
    wait_no_boxes(controlplane)


def test_failures_on_the_box_are_recorded_with_their_reason(controlplane: ControlPlane, tmp_path: Path) -> None:
    # a script that exits non-zero: its traceback's tail, a failed run, no box
    (tmp_path / "crash.py").write_text("def f():\n    raise ValueError('bad shapes')\nf()\n")
    out = controlplane.cli("crash.py", "--1xcpu", cwd=tmp_path)
    assert out.returncode == 1
    assert "ValueError: bad shapes" in out.stderr
    run_id = run_id_of(out.stderr)
    info = json.loads(controlplane.cli("show", run_id, "--json").stdout)
    assert info["state"] == "failed" and "exited with code 1: ValueError: bad shapes" in (info["reason"] or "")
    # requirements that cannot be installed: the install log's tail, a failed run
    (tmp_path / "requirements.txt").write_text("this-package-does-not-exist-choline==0.0.1\n")
    out = controlplane.cli("crash.py", "--1xcpu", cwd=tmp_path)
    assert out.returncode == 1
    run_id = run_id_of(out.stderr)
    info = json.loads(controlplane.cli("show", run_id, "--json").stdout)
    assert info["state"] == "failed"
    assert "this-package-does-not-exist-choline" in json.dumps(info)
    # no offer under the maximum price
    out = controlplane.cli("crash.py", "--1xH100", cwd=tmp_path)
    assert out.returncode == 1
    run_id = run_id_of(out.stderr)
    info = json.loads(controlplane.cli("show", run_id, "--json").stdout)
    assert info["state"] == "failed" and "no local offer" in info["reason"]
    wait_no_boxes(controlplane)


def test_stop_keeps_the_results_and_ends_succeeded(controlplane: ControlPlane, tmp_path: Path) -> None:
    from choline_core import faults

    project = tmp_path / "digits"
    shutil.copytree(REPO / "examples" / "digits", project, ignore=shutil.ignore_patterns("choline-runs", "__pycache__"))
    held = tmp_path / "faults"
    out = controlplane.cli(
        "run",
        "--detach",
        "--env",
        "CHOLINE_FAULTS=train.step=pause#40",
        "--env",
        f"CHOLINE_FAULTS_DIR={held}",
        "train.py",
        "--1xcpu",
        "--epochs",
        "3",
        cwd=project,
    )
    assert out.returncode == 0, out.stderr
    run_id = out.stdout.strip().splitlines()[-1]
    faults.wait_reached("train.step#40", held, timeout=180)
    assert controlplane.cli("stop", run_id).returncode == 0
    deadline = time.monotonic() + 60
    while "control: stop" not in controlplane.cli("logs", run_id).stderr:
        assert time.monotonic() < deadline, "the stop never reached the box"
        time.sleep(0.3)
    faults.release("train.step#40", held)
    assert controlplane.cli("wait", run_id).returncode == 0  # exit 0 only when the run succeeded
    info = json.loads(controlplane.cli("show", run_id, "--json").stdout)
    assert info["state"] == "succeeded" and info["attempts"][0]["end_reason"] == "stopped"
    assert info["attempts"][0]["last_step"] < 3 * 45  # it stopped early
    assert controlplane.cli("pull", run_id, "--dest", str(tmp_path / "out")).returncode == 0
    assert list((tmp_path / "out").glob("*.choline-bundle.tar.gz"))  # the results of a stopped run are kept
    wait_no_boxes(controlplane)

"""The model and deployment commands refuse bad usage before calling anyone (exit 2, one line), and say so
in one line when no control plane answers (exit 1)."""

from __future__ import annotations

import pytest

from choline.cli.main import main


@pytest.mark.parametrize(
    ("argv", "words"),
    [
        (["deploy", "model", "bad name!"], "is not a model name"),
        (["deploy", "model", "digits:0"], "is not a model version"),
        (["deploy", "model", "digits", "--provider", "vast"], "--provider is for a rented box"),
        (["deploy", "model", "digits", "--gpus", "9xFOO"], "unknown GPU model 'FOO'"),
        (["deploy", "model", "digits", "--replicas", "0"], "--replicas and --max-batch must be >= 1"),
        (["deploy", "model", "digits", "--local", "--gpus", "1x3090"], "not allowed with argument"),
        (["predict", "digits"], "one of the arguments --json --file is required"),
        (["predict", "digits", "--json", "{nope"], "the input is not JSON"),
        (["predict", "digits", "--file", "/nonexistent/x.json"], "cannot read /nonexistent/x.json"),
        (["models", "show", "a:b:c"], "is not a model version"),
    ],
)
def test_bad_usage_is_exit_2_and_one_line(argv: list[str], words: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert words in err and err.count("\n") == 1, err


@pytest.mark.parametrize(
    "argv",
    [["models", "ls"], ["deployments", "ls"], ["undeploy", "digits"], ["predict", "digits", "--json", "{}"]],
)
def test_without_a_control_plane_it_says_so(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith("choline: error: ") and err.count("\n") == 1

import json
import subprocess
import sys

from choline.cli.main import main


def test_spec_human_and_json(capsys) -> None:  # type: ignore[no-untyped-def]
    assert main(["spec", "4x3090"]) == 0
    assert "4 x RTX 3090" in capsys.readouterr().out
    assert main(["spec", "1xA100-80GB", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == {
        "spec": "1xA100-80GB",
        "count": 1,
        "model": "A100",
        "memory_gb": 80,
        "cpu": False,
    }


def test_bad_spec_is_one_line_and_exit_1(capsys) -> None:  # type: ignore[no-untyped-def]
    assert main(["spec", "9x9999"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "accepted forms" in err


def test_bad_usage_exits_2(capsys) -> None:  # type: ignore[no-untyped-def]
    assert main(["no-such-command"]) == 2
    assert main(["spec"]) == 2
    assert "--help" in capsys.readouterr().err


def test_console_script() -> None:
    from choline import __version__

    out = subprocess.run([sys.executable, "-m", "choline.cli.main", "--version"], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == __version__

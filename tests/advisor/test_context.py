"""The condensed context (what the advisor sends a model), the answer's parsing, and applying a fix.

Pure functions, no servers: the context holds the traceback, the finding's evidence, the script's
relevant lines and the metrics; it stays within its token budget however much there is; it holds
no secret; a model's answer is read leniently and validated; a fix's config changes make the
spec of a new run."""

from __future__ import annotations

import json

import pytest

from choline_core.advice import AdviceAnswer, ConfigChange, apply_changes, extract_json, parse_answer
from choline_core.errors import BadSpec
from choline_core.events import RunSpec
from choline_core.logs import register_secret
from choline_monitor.context import build_context, estimate_tokens, relevant_lines, scrub
from choline_monitor.sources import describe

from .material import SECRETS, TRACEBACK, material, script


def test_the_context_holds_what_went_wrong() -> None:
    ctx = build_context(material())
    text = ctx.text
    assert "RuntimeError: Function 'MseLossBackward0' returned nan values" in text  # the traceback
    assert '"ratio":13.4' in text and "13.4x its best 2.33" in text  # the finding's evidence and message
    assert "command: python train.py --lr 50 --epochs 3" in text  # the run's configuration
    assert "add_argument('--lr'" in text and "loss.backward()" in text  # the script's relevant lines
    assert "train/loss: 200 points" in text and "NaN/inf 3" in text  # the metric summaries
    assert "python: 3.11.9" in text and "digits-csv" in text
    assert ctx.tokens <= ctx.budget and not ctx.dropped
    # the metrics come first by importance: the loss before the learning rate
    assert text.index("train/loss:") < text.index("lr:")


def test_the_context_contains_no_secret() -> None:
    register_secret("registered-secret-of-this-process")
    m = material()
    m.logs.append("connecting with registered-secret-of-this-process")
    ctx = build_context(m)
    sent = ctx.system + ctx.text
    for name, value in SECRETS.items():
        assert value not in sent, f"the {name} secret leaked into the context"
    assert "registered-secret-of-this-process" not in sent
    assert "WANDB_API_KEY=***" in sent and "DB_PASSWORD=***" in sent and "OMP_NUM_THREADS=1" in sent
    assert "https://trainer:***@data.example.com" in sent  # the URL stays useful, its password goes


@pytest.mark.parametrize("budget", [1500, 2500, 4000, 8000])
def test_the_context_stays_within_its_budget_however_much_there_is(budget: int) -> None:
    m = material(log_lines=5000, metric_points=20000, extra_script=3000)
    m.metrics.update({f"extra/metric_{i}": m.metrics["lr"] for i in range(100)})
    ctx = build_context(m, budget=budget)
    assert ctx.tokens <= budget
    assert estimate_tokens(ctx.system) + estimate_tokens(ctx.text) <= budget
    # what matters most survives the cuts: the finding always, the traceback's last line while it fits
    assert "13.4x its best" in ctx.text
    if budget >= 2500:
        assert "returned nan values" in ctx.text
        assert ctx.dropped or "lines cut)" in ctx.text  # something had to give
    for value in SECRETS.values():
        assert value not in ctx.text


def test_a_model_choice_question_puts_the_dataset_first() -> None:
    ctx = build_context(material(question="which model should I try next for this dataset?"))
    assert ctx.sections[0] == "finding" and ctx.sections[1] == "dataset"
    assert "The user asks: which model should I try next" in ctx.text
    assert "columns: pixel_0, pixel_1, label" in ctx.text


def test_token_estimate_is_conservative() -> None:
    code = script(200)
    assert estimate_tokens(code) >= len(code) / 4  # at least the usual 4 characters per token
    assert estimate_tokens("") == 0 and estimate_tokens("é" * 10) == 10


def test_relevant_lines_keep_the_traceback_and_the_training_loop() -> None:
    source = script(400)  # long: windows, not the whole file
    lines = relevant_lines(source, "train.py", TRACEBACK)
    joined = "\n".join(lines)
    assert len(lines) < 120 and "..." in lines
    assert "loss.backward()" in joined and "add_argument('--lr'" in joined and "AdamW" in joined
    assert "filler line 200" not in joined
    # numbered as in the file
    n = source.splitlines().index("        loss.backward()") + 1
    assert any(line.strip().startswith(f"{n} |") and "loss.backward()" in line for line in lines)
    # a short script is shown whole
    assert len(relevant_lines(script(0), "train.py", None)) == len(script(0).splitlines())


def test_scrub_keeps_numbers_digests_and_paths() -> None:
    text = (
        "tokens_per_sec: 51234 loss=2.31 digest 9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08 "
        "/usr/lib/python3.11/site-packages/torch/nn/modules/module.py"
    )
    assert scrub(text) == text
    assert scrub("password: hunter22 Authorization: Bearer abcdefghijklmnop") == "password: *** Authorization: ***"
    key = "-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjEAAAAA\n-----END OPENSSH PRIVATE KEY-----"
    assert scrub(key) == "***"


# --------------------------------------------------------------------------------------- answers
def test_a_valid_answer_validates() -> None:
    answer = parse_answer(
        json.dumps(
            {
                "diagnosis": "diverged",
                "likely_causes": ["lr too high"],
                "fix": {"config_changes": [{"target": "arg", "name": "--lr", "value": "0.003"}], "diff": None},
                "confidence": 0.8,
                "recommended_action": "restart_with_fix",
            }
        )
    )
    assert answer.fix.config_changes == [ConfigChange(target="arg", name="--lr", value="0.003")]
    assert answer.confidence == 0.8 and answer.recommended_action == "restart_with_fix"


def test_answers_are_read_leniently() -> None:
    text = """Here is my analysis.
```json
{"diagnosis": "The loss went NaN at step 45.", "causes": "lr too high", "confidence": "high",
 "fix": {"config_changes": {"lr": 0.001, "env:OMP_NUM_THREADS": "2", "gpus": "1x4090"},
         "diff": "--- a/train.py\\n+++ b/train.py\\n@@ -1,1 +1,1 @@\\n-x = 1\\n+x = 2"},
 "recommended_action": "Pause the run"}
```
Good luck!"""
    a = parse_answer(text)
    assert a.diagnosis.startswith("The loss went NaN") and a.likely_causes == ["lr too high"]
    assert a.confidence == 0.8 and a.recommended_action == "pause"
    changes = {(c.target, c.name, c.value) for c in a.fix.config_changes}
    assert changes == {("arg", "--lr", "0.001"), ("env", "OMP_NUM_THREADS", "2"), ("gpus", "gpus", "1x4090")}
    assert a.fix.diff is not None and a.fix.diff.startswith("--- a/train.py")
    # a percentage, a number above 1, an unknown action, a "diff" that is not one
    b = parse_answer('{"diagnosis": "x", "confidence": "85%", "recommended_action": "dance", "diff": "change x"}')
    assert b.confidence == 0.85 and b.recommended_action == "investigate" and b.fix.diff is None
    assert parse_answer('{"diagnosis": "x", "confidence": 70}').confidence == 0.7


@pytest.mark.parametrize(
    "text",
    ["", "I think the learning rate is too high.", '{"likely_causes": ["x"]}', "[1, 2, 3]", '{"diagnosis": ""}'],
)
def test_unusable_answers_are_refused(text: str) -> None:
    with pytest.raises(ValueError):
        parse_answer(text)


def test_extract_json_skips_braces_in_prose() -> None:
    assert extract_json('use {braces} like {"a": {"b": "}"}} then') == {"a": {"b": "}"}}


def test_the_answer_model_is_strict_when_written() -> None:
    with pytest.raises(ValueError):
        AdviceAnswer(diagnosis="x", confidence=2.0)


# --------------------------------------------------------------------------------------- applying
def test_apply_changes_makes_the_spec_of_a_new_run() -> None:
    args = ["--lr", "50", "--epochs=3", "--amp", "--seed", "1"]
    spec = RunSpec(script="train.py", args=args, gpus="1xcpu", env={"A": "1"})
    new, done = apply_changes(
        spec,
        [
            ConfigChange(name="--lr", value="0.003"),
            ConfigChange(name="--epochs", value="5"),
            ConfigChange(name="--amp", value=None),
            ConfigChange(name="--batch_size", value="64"),
            ConfigChange(target="env", name="A", value="2"),
            ConfigChange(target="gpus", name="gpus", value="1x4090"),
        ],
    )
    assert new.args == ["--lr", "0.003", "--epochs=5", "--seed", "1", "--batch_size", "64"]
    assert new.env == {"A": "2"} and new.gpus == "1xRTX_4090"
    assert ("--lr", "50", "0.003") in done and ("--amp", "", None) in done and ("gpus", "1xcpu", "1xRTX_4090") in done
    assert spec.args[1] == "50"  # the old spec is untouched
    # a flag written with hyphens where the model used underscores is found
    hyphens = RunSpec(script="t.py", args=["--batch-size", "8"])
    new2, _ = apply_changes(hyphens, [ConfigChange(name="--batch_size", value="16")])
    assert new2.args == ["--batch-size", "16"]
    with pytest.raises(BadSpec):
        apply_changes(spec, [ConfigChange(target="gpus", name="gpus", value="9x9999")])


def test_a_dataset_card_from_its_manifest() -> None:
    from choline_core.pipeline import DatasetManifest, ManifestFile

    sha = "b" * 64
    chunk = [(0, 0, 1, sha)]
    files = [ManifestFile(path=f"train/{c}/{i}.png", size=1, chunks=chunk) for c in ("cat", "dog") for i in range(5)]
    files += [ManifestFile(path=f"val/{c}/{i}.png", size=1, chunks=chunk) for c in ("cat", "dog") for i in range(2)]
    files.append(ManifestFile(path="README.md", size=1, chunks=[(0, 0, 1, sha)]))
    card = describe_card(DatasetManifest(packs=[sha], files=files))
    assert card.modality is not None and card.modality.startswith("images")
    assert card.splits == {"train": 10, "val": 4} and card.labels == {"cat": 7, "dog": 7}
    assert card.files == 15 and "labels (2 class folders): cat 7, dog 7" in card.render()


def describe_card(manifest):  # type: ignore[no-untyped-def]
    from choline_monitor.context import DatasetCard

    card = DatasetCard(name="pets")
    describe(card, manifest)
    return card

"""The HTTP client's pieces that need no server: error bodies back into CholineErrors, the SSE
parser, and how ``choline set`` reads KEY=VALUE."""

from __future__ import annotations

import pytest

from choline.cli.commands.runs import parse_params
from choline.client import _parse_sse, error_from_body
from choline_core import errors
from choline_core.events import RunState


@pytest.mark.parametrize(
    ("status", "body", "cls"),
    [
        (404, {"type": "not_found", "message": "no run r1", "detail": None}, errors.NotFound),
        (400, {"type": "bad_spec", "message": "unknown GPU model", "detail": None}, errors.BadSpec),
        (503, {"type": "no_capacity", "message": "no offer", "detail": None}, errors.NoCapacity),
        (503, {"type": "bus_error", "message": "the provisioner is not answering"}, errors.BusError),
        (401, {"type": "unauthorized", "message": "the token is unknown or revoked"}, errors.Unauthorized),
        (409, {"type": "something_newer", "message": "a kind this client does not know"}, errors.Conflict),
        (413, {"type": "too_large", "message": "over the limit"}, errors.UserError),
        (502, "<html>bad gateway</html>", errors.InfraError),
    ],
)
def test_error_bodies_become_their_choline_errors(status: int, body: object, cls: type[errors.CholineError]) -> None:
    err = error_from_body(status, body, "/v1/runs")
    assert type(err) is cls
    assert err.one_line() == (
        body["message"] if isinstance(body, dict) else f"the gateway answered {status} for /v1/runs"
    )
    assert err.exit_code == (2 if cls is errors.BadUsage else 1)


def test_server_sent_events_are_parsed_into_follow_events() -> None:
    stream = [
        "retry: 2000",
        "",
        "id: 7",
        "event: line",
        'data: {"id": 7, "attempt": 1, "seq": 0, "ts": "2026-01-01T00:00:00Z", "stream": "stdout", "text": "hi"}',
        "",
        ": ping",
        "",
        "event: state",
        'data: {"run_id": "r1", "state": "running", "reason": null}',
        "",
        "event: end",
        'data: {"run_id": "r1", "state": "failed", "reason": "exit code 3"}',
        "",
    ]
    events = list(_parse_sse(iter(stream)))
    assert [e.kind for e in events] == ["line", "state", "end"]
    assert events[0].line is not None and (events[0].line.id, events[0].line.text) == (7, "hi")
    assert (events[2].state, events[2].reason) == (RunState.failed, "exit code 3")


def test_set_reads_numbers_text_and_relative_values() -> None:
    assert parse_params(["lr=3e-4", "epochs=+5", "warmup=100", "note=warm up", "amp=true", "decay=-1"]) == {
        "lr": 3e-4,
        "epochs": "+5",
        "warmup": 100,
        "note": "warm up",
        "amp": True,
        "decay": "-1",
    }
    for bad in (["lr"], ["=3"], ["lr="]):
        with pytest.raises(errors.BadUsage):
            parse_params(bad)

"""The serving process over real HTTP (uvicorn on a free loopback port): predictions equal the bundle's
in-process outputs, every malformed request gets a precise 4xx, batching gives each caller its own result,
timeouts, tokens, the OpenAPI document made from the card."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest
import torch

import choline

from .conftest import serving


def digit_samples(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 17, (n, 64), generator=g).to(torch.float32)


async def test_predictions_over_http_equal_the_bundle_in_process(digits_bundle: Path) -> None:
    bundle = choline.load_bundle(digits_bundle)
    xs = digit_samples(12)
    async with serving(digits_bundle, max_wait_ms=0) as client:
        for x in xs:  # one at a time: each is a batch of one, exactly as in process
            r = await client.post("/predict", json={"pixels": x.tolist()})
            assert r.status_code == 200, r.text
            got = r.json()["digit"]
            want = bundle.predict(x[None])[0]
            assert torch.equal(torch.tensor(got["value"], dtype=torch.float32), want)
            assert got["label"] == str(int(want.argmax())) and got["index"] == int(want.argmax())
            assert got["score"] == pytest.approx(float(torch.softmax(want, 0).max()), rel=1e-6)
        r = await client.post("/predict/batch", json={"instances": [{"pixels": x.tolist()} for x in xs]})
        assert r.status_code == 200, r.text
        preds = r.json()["predictions"]
        want_all = bundle.predict(xs)
        assert len(preds) == len(xs)
        assert torch.equal(torch.tensor([p["digit"]["value"] for p in preds], dtype=torch.float32), want_all)
        stats = (await client.get("/stats")).json()
        assert stats["batches"] == 13 and stats["largest_batch"] == 12 and stats["errors"] == 0


async def test_metadata_health_and_openapi_come_from_the_card(digits_bundle: Path) -> None:
    async with serving(digits_bundle, name="digits-prod", version="3") as client:
        assert (await client.get("/healthz")).json()["status"] == "ok"
        assert (await client.get("/readyz")).status_code == 200
        meta = (await client.get("/metadata")).json()
        assert meta["name"] == "digits-prod" and meta["version"] == "3"
        assert meta["card"]["inputs"][0] == {"name": "pixels", "dtype": "float32", "shape": [64], "range": [0, 16]}
        assert meta["serving"]["max_batch"] == 32 and "token" not in meta["serving"]
        doc = (await client.get("/openapi.json")).json()
        assert doc["openapi"].startswith("3.1") and doc["info"]["version"] == "3"
        pixels = doc["components"]["schemas"]["Sample"]["properties"]["pixels"]
        assert pixels["type"] == "array" and pixels["minItems"] == pixels["maxItems"] == 64
        assert pixels["items"] == {"type": "number", "minimum": 0, "maximum": 16}
        assert doc["components"]["schemas"]["Sample"]["additionalProperties"] is False
        assert set(doc["paths"]) >= {"/predict", "/predict/batch", "/healthz", "/readyz", "/metadata"}
        assert "422" in doc["paths"]["/predict"]["post"]["responses"]
        r = await client.get("/nowhere")
        assert r.status_code == 404 and r.json()["type"] == "not_found"
        r = await client.get("/predict")
        assert r.status_code == 405 and "POST" in r.json()["message"]


GOOD = {"pixels": [1.0] * 64}

# (description, body as bytes or JSON, content type, status, type, words in the message, field)
DIGITS_CASES: list[tuple[str, Any, str, int, str, list[str], str | None]] = [
    ("short", {"pixels": [1.0] * 63}, "application/json", 422, "invalid_input",
     ["pixels", "expected shape [64]", "got [63]"], "pixels"),
    ("nested", {"pixels": [[1.0] * 64]}, "application/json", 422, "invalid_input",
     ["pixels", "expected shape [64]", "got [1, 64]"], "pixels"),
    ("string", {"pixels": [1.0] * 10 + ["a"] + [1.0] * 53}, "application/json", 422, "invalid_input",
     ["pixels", "expected numbers", "float32", "got a string at pixels[10]"], "pixels"),
    ("null", {"pixels": None}, "application/json", 422, "invalid_input",
     ["pixels", "expected shape [64]", "got null"], "pixels"),
    ("range high", {"pixels": [1.0] * 5 + [17.5] + [1.0] * 58}, "application/json", 422, "invalid_input",
     ["pixels", "values must be in [0, 16]", "17.5 at pixels[5]"], "pixels"),
    ("range low", {"pixels": [-1] + [1.0] * 63}, "application/json", 422, "invalid_input",
     ["values must be in [0, 16]", "-1"], "pixels"),
    ("overflow", b'{"pixels": [1e400' + b", 1" * 63 + b"]}", "application/json", 422, "invalid_input",
     ["pixels", "not a finite float32"], "pixels"),
    ("missing", {"pixel": [1.0] * 64}, "application/json", 422, "invalid_input",
     ["pixels: missing", "float32 [64] in [0, 16]"], "pixels"),
    ("extra", {**GOOD, "colour": 1}, "application/json", 422, "invalid_input",
     ["colour", "not an input of this model", "pixels"], "colour"),
    ("not an object", [1, 2, 3], "application/json", 422, "invalid_input", ["a sample is a JSON object"], ""),
    ("not json", b"{pixels: [1, 2", "application/json", 400, "invalid_json", ["not valid JSON"], None),
    ("nan", b'{"pixels": [NaN' + b", 1" * 63 + b"]}", "application/json", 400, "invalid_json",
     ["NaN is not JSON"], None),
    ("empty", b"", "application/json", 400, "invalid_json", ["empty"], None),
    ("form", b"pixels=1", "application/x-www-form-urlencoded", 415, "unsupported_media_type",
     ["Content-Type: application/json", "x-www-form-urlencoded"], None),
    ("no type", json.dumps(GOOD).encode(), "", 415, "unsupported_media_type", ["application/json"], None),
    ("too large", {"pixels": [1.0] * 64, "pad": "x" * 5000}, "application/json", 413, "too_large",
     ["limit is 4096"], None),
]  # fmt: skip


@pytest.mark.parametrize("case", DIGITS_CASES, ids=[c[0] for c in DIGITS_CASES])
async def test_malformed_requests_get_a_precise_4xx(digits_bundle: Path, case: tuple[Any, ...]) -> None:
    _, body, ctype, status, kind, words, field = case
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    async with serving(digits_bundle, max_body_bytes=4096) as client:
        headers = {"Content-Type": ctype} if ctype else {}
        r = await client.post("/predict", content=content, headers=headers)
        assert r.status_code == status, r.text
        err = r.json()
        assert err["type"] == kind
        for w in words:
            assert w in err["message"], (w, err["message"])
        if field is not None:
            assert err["detail"]["field"] == field
        if kind == "invalid_input" and field == "pixels":
            assert err["detail"]["expected"] == {"dtype": "float32", "shape": [64], "range": [0, 16]}
        # nothing was lost: the same server answers a good request right after
        ok = await client.post("/predict", json=GOOD)
        assert ok.status_code == 200


MIXED_GOOD = {"tokens": [1, 2, 3], "mask": [True, False, True], "image": [[1, 2, 3], [4, 5, 6]]}
MIXED_CASES: list[tuple[str, dict[str, Any], list[str]]] = [
    ("float for int", {**MIXED_GOOD, "tokens": [1, 2.5, 3]},
     ["tokens", "expected integers", "int64", "2.5 at tokens[1]"]),
    ("token range", {**MIXED_GOOD, "tokens": [1, 200]}, ["tokens", "values must be in [0, 99]", "200 at tokens[1]"]),
    ("uint8 bounds", {**MIXED_GOOD, "image": [[1, 2, 3], [4, 300, 6]]}, ["image", "300 at image[1][1]", "uint8"]),
    ("ragged", {**MIXED_GOOD, "image": [[1, 2, 3], [4, 5]]},
     ["image", "expected shape [2, 3]", "image[1] has 2 items, not 3"]),
    ("ragged varying", {**MIXED_GOOD, "tokens": [[1], [2, 3]]}, ["tokens", "expected shape [*]", "nested deeper"]),
    ("number for bool", {**MIXED_GOOD, "mask": [1, 0, 1]}, ["mask", "expected booleans", "got a number at mask[0]"]),
    ("bool for int", {**MIXED_GOOD, "tokens": [True, False]}, ["tokens", "expected numbers", "booleans"]),
    ("empty varying", {**MIXED_GOOD, "tokens": []}, ["tokens", "expected shape [*]", "empty"]),
    ("scalar for list", {**MIXED_GOOD, "image": 3}, ["image", "expected shape [2, 3]", "got a number"]),
]  # fmt: skip


@pytest.mark.parametrize("case", MIXED_CASES, ids=[c[0] for c in MIXED_CASES])
async def test_other_dtypes_and_varying_sizes_are_checked(mixed_bundle: Path, case: tuple[Any, ...]) -> None:
    _, body, words = case
    async with serving(mixed_bundle) as client:
        r = await client.post("/predict", json=body)
        assert r.status_code == 422, r.text
        for w in words:
            assert w in r.json()["message"], (w, r.json()["message"])
        r = await client.post("/predict/batch", json={"instances": [MIXED_GOOD, MIXED_GOOD, body]})
        assert r.status_code == 422
        assert r.json()["message"].startswith("instances[2].") and r.json()["detail"]["field"].startswith(
            "instances[2]."
        )


async def test_a_batch_of_mixed_sizes_and_a_failing_model(mixed_bundle: Path) -> None:
    async with serving(mixed_bundle, max_batch=2) as client:
        instances = [
            {"tokens": [1, 2, 3], "mask": [True, True, False], "image": [[0, 0, 0], [0, 0, 1]]},
            {"tokens": [5], "mask": [True], "image": [[1, 1, 1], [1, 1, 1]]},
            {"tokens": [7, 8, 9], "mask": [True, True, True], "image": [[9, 9, 9], [9, 9, 9]]},
            {"tokens": [4, 4], "mask": [False, True], "image": [[0, 0, 0], [0, 0, 0]]},
            {"tokens": [1, 1, 1], "mask": [True, True, True], "image": [[2, 0, 0], [0, 0, 0]]},
        ]
        r = await client.post("/predict/batch", json={"instances": instances})
        assert r.status_code == 200, r.text
        assert [p["summary"]["value"] for p in r.json()["predictions"]] == [
            [3.0, 1.0], [5.0, 6.0], [24.0, 54.0], [4.0, 0.0], [3.0, 2.0]
        ]  # fmt: skip
        bad = await client.post("/predict", json={**instances[0], "tokens": [13, 1, 1]})
        assert bad.status_code == 500 and bad.json()["type"] == "model_error"
        assert "unlucky token" in bad.json()["message"]
        assert (await client.post("/predict", json=instances[1])).json()["summary"]["value"] == [5.0, 6.0]


async def test_batching_gives_every_concurrent_caller_its_own_result(digits_bundle: Path) -> None:
    bundle = choline.load_bundle(digits_bundle)
    xs = digit_samples(64, seed=1)
    want = torch.cat([bundle.predict(x[None]) for x in xs])
    async with serving(digits_bundle, max_batch=16, max_wait_ms=30) as client:

        async def one(i: int) -> tuple[int, list[float]]:
            r = await client.post("/predict", json={"pixels": xs[i].tolist()})
            assert r.status_code == 200, r.text
            return i, r.json()["digit"]["value"]

        async def batch(lo: int, hi: int) -> list[tuple[int, list[float]]]:
            r = await client.post("/predict/batch", json={"instances": [{"pixels": x.tolist()} for x in xs[lo:hi]]})
            assert r.status_code == 200, r.text
            return [(lo + k, p["digit"]["value"]) for k, p in enumerate(r.json()["predictions"])]

        results = await asyncio.gather(*(one(i) for i in range(48)), batch(48, 56), batch(56, 64))
        flat: list[tuple[int, list[float]]] = []
        for res in results:
            flat.extend(res if isinstance(res, list) else [res])
        assert sorted(i for i, _ in flat) == list(range(64))
        for i, value in flat:
            # another batch composition may round the last bit differently; another sample's output never
            assert torch.allclose(torch.tensor(value), want[i], rtol=1e-5, atol=1e-6), i
            others = torch.cat([want[:i], want[i + 1 :]])
            assert not torch.isclose(others, torch.tensor(value), rtol=1e-5, atol=1e-6).all(dim=1).any()
        stats = (await client.get("/stats")).json()
        assert stats["largest_batch"] > 1 and stats["batches"] < 50, stats
        assert stats["largest_batch"] <= 16 and stats["samples"] == 64


async def test_a_request_larger_than_the_batch_runs_in_chunks_in_order(digits_bundle: Path) -> None:
    bundle = choline.load_bundle(digits_bundle)
    xs = digit_samples(10, seed=2)
    async with serving(digits_bundle, max_batch=4, max_wait_ms=0) as client:
        r = await client.post("/predict/batch", json={"instances": [{"pixels": x.tolist()} for x in xs]})
        got = torch.tensor([p["digit"]["value"] for p in r.json()["predictions"]])
        assert torch.allclose(got, bundle.predict(xs), rtol=1e-5, atol=1e-6)
        stats = (await client.get("/stats")).json()
        assert stats["batch_sizes"] == {"2": 1, "4": 2}


async def test_a_slow_prediction_times_out_and_the_server_goes_on(slow_bundle: Path) -> None:
    async with serving(slow_bundle, timeout_s=0.05, max_batch=1) as client:
        r = await client.post("/predict", json={"x": [1, 1, 1, 1]})
        assert r.status_code == 504 and r.json()["type"] == "timeout"
        assert "0.05 s" in r.json()["message"]
        client.app.config.timeout_s = 5  # type: ignore[attr-defined]
        r = await client.post("/predict", json={"x": [1, 1, 1, 1]})
        assert r.status_code == 200 and r.json()["y"]["value"] == [1.0, 2.0, 3.0, 4.0]


async def test_a_token_guards_predictions_not_health(digits_bundle: Path) -> None:
    async with serving(digits_bundle, token="s3cret-token") as client:
        assert (await client.get("/healthz")).status_code == 200
        assert (await client.get("/readyz")).status_code == 200
        r = await client.post("/predict", json=GOOD)
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
        r = await client.post("/predict", json=GOOD, headers={"Authorization": "Bearer wrong"})
        assert r.status_code == 401
        assert (await client.get("/metadata")).status_code == 401
        r = await client.post("/predict", json=GOOD, headers={"Authorization": "Bearer s3cret-token"})
        assert r.status_code == 200
        meta = await client.get("/metadata", headers={"Authorization": "Bearer s3cret-token"})
        assert "s3cret" not in meta.text and meta.json()["serving"]["auth"] is True


async def test_queue_limit_answers_503_not_a_pileup(slow_bundle: Path) -> None:
    async with serving(slow_bundle, max_batch=1, max_queue=2, max_wait_ms=0) as client:
        rs = await asyncio.gather(*(client.post("/predict", json={"x": [1, 2, 3, 4]}) for _ in range(6)))
        codes = sorted(r.status_code for r in rs)
        assert 200 in codes and 503 in codes, codes
        assert all(r.json()["type"] == "overloaded" for r in rs if r.status_code == 503)
        assert all(r.headers.get("retry-after") == "1" for r in rs if r.status_code == 503)

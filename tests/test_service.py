"""Tests for the HTTP service (service/): a real ``bentoml serve`` on 127.0.0.1 and the handlers in-process.

The server (tests/service_server.py) serves a random-weight nh-tiny checkpoint
with small limits (64 units, 40 000 spikes, 1 MiB bodies, 16 windows, 3 adapt
steps), so every limit is cheap to cross. Predictions are compared with an
in-process Predictor loaded from the same file.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from service_server import (
    TEST_LIMITS,
    ServeProcess,
    bentoml_env,
    make_tiny_checkpoint,
    shared_server,
    stop_shared_server,
)

from nh_serve.client.wire import encode_array
from nh_serve.data.synth import make_session
from nh_serve.errors import InputError
from nh_serve.inference.backends import choose_backend
from nh_serve.inference.limits import Limits
from nh_serve.inference.predictor import Predictor
from service import schemas
from service.handlers import ApiError, Handlers, api_field_names
from service.middleware import validation_message
from service.settings import Settings

REPO = Path(__file__).resolve().parents[1]
MAX_UNITS = int(TEST_LIMITS["NH_SERVE_MAX_UNITS"])
MAX_SPIKES = int(TEST_LIMITS["NH_SERVE_MAX_SPIKES"])
MAX_SESSIONS = int(TEST_LIMITS["NH_SERVE_MAX_SESSIONS"])
MAX_WINDOWS = int(TEST_LIMITS["NH_SERVE_MAX_WINDOWS"])


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="session")
def server():
    yield shared_server()
    stop_shared_server()  # session fixtures end after the last test of every module


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, timeout=30.0) as c:
        yield c


@pytest.fixture(scope="module")
def local(server):
    return Predictor.load(str(server.checkpoint), backend="torch")


@pytest.fixture(scope="module")
def rec():
    """A 75 s synthetic recording of 30 units: reference [0, 60) s, context windows after it."""
    d = make_session(seed=3, n_units=30, duration=75.0)
    return {"t": d["spike_times"], "ids": d["unit_ids"][d["unit_index"]], "unit_ids": d["unit_ids"]}


def _ref(rec):
    m = rec["t"] < 60.0
    return rec["t"][m], rec["ids"][m]


def _ctx(rec, start: float):
    m = (rec["t"] >= start) & (rec["t"] < start + 1.0)
    return rec["t"][m], rec["ids"][m]


def _train(times, ids) -> dict:
    return {"times": np.asarray(times, dtype=float).tolist(), "unit_ids": [str(u) for u in ids]}


def _register_body(rec, **extra) -> dict:
    t, ids = _ref(rec)
    return {"reference": _train(t, ids), "reference_start": 0.0, "reference_end": 60.0, **extra}


def _post(http, path, body, **kw):
    return (
        http.post(path, json=body, **kw)
        if not isinstance(body, (bytes, str))
        else http.post(path, content=body, headers={"content-type": "application/json"}, **kw)
    )


@pytest.fixture
def token(http, rec):
    r = _post(http, "/register", _register_body(rec))
    assert r.status_code == 200, r.text
    return r.json()["token"]


# ----------------------------------------------------------------------------- happy paths


@pytest.mark.service
@pytest.mark.slow
def test_register_then_predict_equals_local_predictor(http, rec, local):
    r = _post(http, "/register", _register_body(rec))
    assert r.status_code == 200, r.text
    reg = r.json()
    assert reg["n_units"] == 30 and reg["unit_ids"] == sorted(rec["unit_ids"].tolist())
    assert (reg["reference_start"], reg["reference_end"]) == (0.0, 60.0)
    assert reg["model"] == "nh-tiny" and reg["adaptation"] is None

    ct, cids = _ctx(rec, 62.0)
    r = _post(http, "/predict", {"token": reg["token"], "context": _train(ct, cids), "context_start": 62.0})
    assert r.status_code == 200, r.text
    got = r.json()
    assert got["token"] is None  # no registration happened in this request

    ltok = local.register(*_ref(rec), reference_window=(0.0, 60.0))
    want = local.predict(ltok, ct, cids, context_start=62.0)
    rates = np.asarray(got["rates_hz"], dtype=np.float32)
    assert rates.shape == (30, 50)
    np.testing.assert_allclose(rates, want.rates_hz, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(got["bin_edges"]), want.bin_edges)
    assert got["bin_edges"][0] == 63.0 and len(got["bin_edges"]) == 51
    assert got["unit_ids"] == want.unit_ids.tolist()
    assert got["model_hash"] == local.model_hash


@pytest.mark.service
@pytest.mark.slow
def test_predict_with_reference_registers_and_returns_token(http, rec, local):
    ct, cids = _ctx(rec, 61.0)
    body = {**_register_body(rec), "context": _train(ct, cids), "context_start": 61.0, "horizon_s": 0.5}
    r = _post(http, "/predict", body)
    assert r.status_code == 200, r.text
    got = r.json()
    assert isinstance(got["token"], str) and got["token"]
    assert np.asarray(got["rates_hz"]).shape == (30, 25)  # 0.5 s = 25 bins of 20 ms
    # The returned token works for the next window.
    ct2, cids2 = _ctx(rec, 62.0)
    r2 = _post(
        http, "/predict", {"token": got["token"], "context": _train(ct2, cids2), "context_start": 62.0}
    )
    assert r2.status_code == 200, r2.text
    ltok = local.register(*_ref(rec), reference_window=(0.0, 60.0))
    local.predict(ltok, ct, cids, context_start=61.0, horizon_s=0.5)  # the same stream as the service's session
    np.testing.assert_allclose(
        np.asarray(r2.json()["rates_hz"], np.float32),
        local.predict(ltok, ct2, cids2, context_start=62.0).rates_hz,
        rtol=1e-5,
        atol=1e-6,
    )


@pytest.mark.service
@pytest.mark.slow
def test_units_order_is_the_callers_including_silent_units(http, rec, local):
    order = list(reversed(sorted(rec["unit_ids"].tolist()))) + ["silent_unit"]
    r = _post(http, "/register", _register_body(rec, units=order))
    assert r.status_code == 200, r.text
    assert r.json()["unit_ids"] == order
    ct, cids = _ctx(rec, 63.0)
    got = _post(
        http, "/predict", {"token": r.json()["token"], "context": _train(ct, cids), "context_start": 63.0}
    ).json()
    assert got["unit_ids"] == order
    ltok = local.register(*_ref(rec), reference_window=(0.0, 60.0), units=order)
    want = local.predict(ltok, ct, cids, context_start=63.0)
    np.testing.assert_allclose(np.asarray(got["rates_hz"], np.float32), want.rates_hz, rtol=1e-5, atol=1e-6)
    assert np.all(np.isfinite(want.rates_hz[-1])) and want.rates_hz[-1].min() >= 0


@pytest.mark.service
@pytest.mark.slow
def test_predict_batch_equals_local_and_base64_encoding(http, rec, local, token):
    starts = [60.0, 61.5, 63.25, 70.0]
    windows = [{"context": _train(*_ctx(rec, s)), "context_start": s} for s in starts]
    r = _post(http, "/predict_batch", {"token": token, "windows": windows, "encoding": "base64"})
    assert r.status_code == 200, r.text
    got = r.json()
    assert got["rates_hz"]["dtype"] == "float32" and got["rates_hz"]["shape"] == [4, 30, 50]
    rates = np.frombuffer(base64.b64decode(got["rates_hz"]["b64"]), "<f4").reshape(4, 30, 50)
    edges = np.frombuffer(base64.b64decode(got["bin_edges"]["b64"]), "<f8").reshape(4, 51)
    ltok = local.register(*_ref(rec), reference_window=(0.0, 60.0))
    want = local.predict_batch(
        ltok, [dict(zip(("spike_times", "unit_ids"), _ctx(rec, s)), context_start=s) for s in starts]
    )
    for i, w in enumerate(want):
        np.testing.assert_allclose(rates[i], w.rates_hz, rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(edges[i], w.bin_edges)
    # The same windows one by one give the same rates (batching does not change the answer).
    one = _post(http, "/predict", {"token": token, **windows[2], "encoding": "base64"}).json()
    np.testing.assert_allclose(
        np.frombuffer(base64.b64decode(one["rates_hz"]["b64"]), "<f4").reshape(30, 50),
        rates[2],
        rtol=1e-5,
        atol=1e-6,
    )


@pytest.mark.service
@pytest.mark.slow
def test_compact_binary_request_forms(http, rec):
    """b64 float64 times + int32 indices into unit_table, and .npy string ids, equal the JSON form."""
    t, ids = _ref(rec)
    table, index = np.unique(ids, return_inverse=True)
    binary = {
        "reference": {
            "times": encode_array(t, dtype="float64"),
            "unit_ids": encode_array(index.astype(np.int32)),
            "unit_table": table.tolist(),
        },
        "reference_start": 0.0,
        "reference_end": 60.0,
    }
    ct, cids = _ctx(rec, 64.0)
    ctx_npy = {"times": encode_array(ct, npy=True), "unit_ids": encode_array(cids.astype("U16"), npy=True)}
    a = _post(http, "/predict", {**binary, "context": ctx_npy, "context_start": 64.0}).json()
    b = _post(
        http, "/predict", {**_register_body(rec), "context": _train(ct, cids), "context_start": 64.0}
    ).json()
    assert "error" not in a, a
    assert a["rates_hz"] == b["rates_hz"] and a["unit_ids"] == b["unit_ids"]


@pytest.mark.service
@pytest.mark.slow
def test_adapt_steps_run_and_are_reported(http, rec):
    r = _post(http, "/register", _register_body(rec, adapt_steps=2))
    assert r.status_code == 200, r.text
    ad = r.json()["adaptation"]
    assert 1 <= ad["steps"] <= 2 and ad["windows"] > 0  # the time budget may stop it early
    assert all(np.isfinite(v) for v in ad.values() if isinstance(v, float))


@pytest.mark.service
@pytest.mark.slow
def test_model_info(http, server):
    from nh_serve.inference.checkpoint import read_metadata

    info = http.get("/model").json()
    assert info["name"] == "nh-tiny"
    assert info["hash"] == read_metadata(server.checkpoint)["short_hash"]
    assert info["config"]["n_bins"] == 50 and info["config"]["bin_size_s"] == 0.02
    assert info["training"] == {"note": "random weights for tests"}
    assert info["limits"]["max_units"] == MAX_UNITS and info["limits"]["max_body_bytes"] == 2**20
    assert set(info["sessions"]) == {"active", "hits", "misses", "evictions"}


@pytest.mark.service
@pytest.mark.slow
def test_health_and_docs_endpoints(http):
    assert http.get("/livez").status_code == 200
    assert http.get("/readyz").status_code == 200
    docs = http.get("/docs")  # the page itself, not a redirect
    assert docs.status_code == 200 and "swagger" in docs.text.lower()
    assert docs.headers["content-type"].startswith("text/html") and "googletagmanager" not in docs.text
    spec = http.get("/docs.json").json()
    assert "/model" in spec["paths"] and "get" in spec["paths"]["/model"]
    assert "ModelInfo" in spec["components"]["schemas"]


# ----------------------------------------------------------------------------- bad input


def _bad_cases(rec):
    """(name, path, body, status, substrings the message must contain) for every kind of bad input."""
    ref_body = _register_body(rec)
    ct, cids = _ctx(rec, 62.0)
    ctx = _train(ct, cids)
    nan_times = np.array(ct, dtype=float)
    nan_times[1] = np.nan
    inf_times = np.array(ct, dtype=float)
    inf_times[-1] = np.inf
    many_units = {
        "times": [float(i) * 0.1 for i in range(MAX_UNITS + 1)],
        "unit_ids": [f"u{i}" for i in range(MAX_UNITS + 1)],
    }
    many_spikes = np.linspace(0, 59.9, MAX_SPIKES + 1)
    w = {"context": ctx, "context_start": 62.0}
    T = "TOKEN"  # replaced by a registered token
    return [
        ("malformed JSON", "/predict", b'{"token": "x", "context": {', 400, ["body", "JSON"]),
        ("not an object", "/register", b"[1, 2, 3]", 400, ["invalid request"]),
        ("missing fields", "/predict", {"token": T}, 400, ["context", "context_start", "Field required"]),
        ("missing reference", "/register", {}, 400, ["reference", "Field required"]),
        (
            "wrong type of number",
            "/predict",
            {"token": T, "context": ctx, "context_start": "soon"},
            400,
            ["context_start"],
        ),
        (
            "wrong type of array",
            "/predict",
            {"token": T, "context": {"times": "x", "unit_ids": []}, "context_start": 62.0},
            400,
            ["context.times"],
        ),
        ("unknown field", "/predict", {"token": T, **w, "horizon": 1.0}, 400, ["horizon", "Extra inputs"]),
        (
            "empty reference",
            "/register",
            {"reference": {"times": [], "unit_ids": []}},
            400,
            ["reference.times", "no spikes"],
        ),
        (
            "NaN time",
            "/predict",
            {
                "token": T,
                "context": {"times": encode_array(nan_times, dtype="float64"), "unit_ids": ctx["unit_ids"]},
                "context_start": 62.0,
            },
            400,
            ["context", "finite"],
        ),
        (
            "inf time",
            "/predict",
            {
                "token": T,
                "context": {"times": encode_array(inf_times, dtype="float64"), "unit_ids": ctx["unit_ids"]},
                "context_start": 62.0,
            },
            400,
            ["context", "finite"],
        ),
        (
            "negative time",
            "/register",
            {
                "reference": {"times": [-1.0, 5.0, 20.0], "unit_ids": ["a", "a", "a"]},
                "reference_start": -1.0,
                "reference_end": 30.0,
            },
            400,
            ["reference", "negative"],
        ),
        (
            "unsorted times",
            "/predict",
            {
                "token": T,
                "context": {"times": [62.5, 62.1], "unit_ids": ctx["unit_ids"][:2]},
                "context_start": 62.0,
            },
            400,
            ["context", "sorted"],
        ),
        (
            "unsorted reference",
            "/register",
            {
                "reference": {"times": [5.0, 1.0, 20.0], "unit_ids": ["a", "a", "a"]},
                "reference_start": 0.0,
                "reference_end": 30.0,
            },
            400,
            ["reference", "sorted"],
        ),
        (
            "context outside its window",
            "/predict",
            {
                "token": T,
                "context": {"times": [61.5, 62.5], "unit_ids": ctx["unit_ids"][:2]},
                "context_start": 62.0,
            },
            400,
            ["context", "outside the window"],
        ),
        (
            "length mismatch",
            "/predict",
            {
                "token": T,
                "context": {"times": [62.1, 62.2], "unit_ids": ["synth_u000"]},
                "context_start": 62.0,
            },
            400,
            ["context", "unit"],
        ),
        (
            "unit not in the reference",
            "/predict",
            {"token": T, "context": {"times": [62.1], "unit_ids": ["nobody"]}, "context_start": 62.0},
            400,
            ["context.unit_ids", "nobody"],
        ),
        (
            "unit_table index out of range",
            "/predict",
            {
                "token": T,
                "context": {"times": [62.1], "unit_ids": [3], "unit_table": ["a"]},
                "context_start": 62.0,
            },
            400,
            ["unit_table"],
        ),
        (
            "bad base64",
            "/predict",
            {
                "token": T,
                "context": {"times": {"b64": "@@@", "dtype": "float64"}, "unit_ids": []},
                "context_start": 62.0,
            },
            400,
            ["context.times.b64", "base64"],
        ),
        (
            "base64 of the wrong length",
            "/predict",
            {
                "token": T,
                "context": {"times": {"b64": "AAAA", "dtype": "float64"}, "unit_ids": []},
                "context_start": 62.0,
            },
            400,
            ["context.times.b64"],
        ),
        (
            "reference window too short",
            "/register",
            {**ref_body, "reference_end": 5.0, "reference": _train(*_ctx(rec, 1.0))},
            400,
            ["reference_start/reference_end", "10 s"],
        ),
        (
            "horizon longer than the model's",
            "/predict",
            {"token": T, **w, "horizon_s": 2.0},
            400,
            ["horizon_s", "1"],
        ),
        (
            "horizon not a whole number of bins",
            "/predict",
            {"token": T, **w, "horizon_s": 0.011},
            400,
            ["horizon_s"],
        ),
        (
            "absurd history rate",
            "/predict",
            {"token": T, **w, "history_counts": [1e300] * 30, "history_duration_s": 1e-300},
            400,
            ["history_counts"],
        ),
        (
            "history_counts of the wrong length",
            "/predict",
            {"token": T, **w, "history_counts": [1.0, 2.0]},
            400,
            ["history_counts"],
        ),
        ("both token and reference", "/predict", {"token": T, **ref_body, **w}, 400, ["token/reference"]),
        ("neither token nor reference", "/predict", w, 400, ["token/reference"]),
        (
            "behaviour for a model without it",
            "/predict",
            {"token": T, **w, "behavior": {"times": [62.1], "values": [[0.5, 0.1]]}},
            400,
            ["behavior"],
        ),
        (
            "adapt_steps over the limit",
            "/register",
            {**ref_body, "adapt_steps": 99},
            400,
            ["adapt_steps", "limit"],
        ),
        ("negative adapt_steps", "/register", {**ref_body, "adapt_steps": -1}, 400, ["adapt_steps"]),
        ("unknown token", "/predict", {"token": "no-such-token", **w}, 404, ["token", "unknown or expired"]),
        (
            "unknown token in a batch",
            "/predict_batch",
            {"token": "no-such-token", "windows": [w]},
            404,
            ["token"],
        ),
        (
            "too many units",
            "/register",
            {"reference": many_units, "reference_start": 0.0, "reference_end": 30.0},
            413,
            ["units", str(MAX_UNITS)],
        ),
        (
            "too many units in units",
            "/register",
            {**ref_body, "units": [f"u{i}" for i in range(MAX_UNITS + 1)]},
            413,
            ["units"],
        ),
        (
            "too many spikes",
            "/register",
            {
                "reference": {
                    "times": encode_array(many_spikes, dtype="float64"),
                    "unit_ids": encode_array(np.zeros(MAX_SPIKES + 1, np.int32)),
                    "unit_table": ["a"],
                }
            },
            413,
            ["reference.times", str(MAX_SPIKES)],
        ),
        (
            "too many windows",
            "/predict_batch",
            {"token": T, "windows": [w] * (MAX_WINDOWS + 1)},
            413,
            ["windows", str(MAX_WINDOWS)],
        ),
        ("no windows", "/predict_batch", {"token": T, "windows": []}, 400, ["windows", "empty"]),
        (
            "bad window in a batch",
            "/predict_batch",
            {"token": T, "windows": [w, {"context": ctx, "context_start": 10.0}]},
            400,
            ["windows[1]", "context"],
        ),
        (
            "body over the size limit",
            "/predict",
            b'{"token": "x", "pad": "' + b"x" * (2**20 + 10) + b'"}',
            413,
            ["body", "limit"],
        ),
    ]


def _fill_token(body, token):
    if isinstance(body, dict):
        return {k: (token if v == "TOKEN" else v) for k, v in body.items()}
    return body


@pytest.mark.service
@pytest.mark.slow
def test_every_bad_input_gets_a_4xx_naming_the_field(http, rec, token):
    failures = []
    for name, path, body, status, needles in _bad_cases(rec):
        r = _post(http, path, _fill_token(body, token))
        try:
            msg = r.json()["error"]
        except (ValueError, KeyError, TypeError):
            msg = r.text
        missing = [n for n in needles if n.lower() not in msg.lower()]
        if r.status_code != status or missing:
            failures.append(f"{name}: HTTP {r.status_code} (want {status}), message {msg!r} lacks {missing}")
    assert not failures, "\n".join(failures)
    # The server is still up and answers a good request.
    assert http.get("/readyz").status_code == 200
    ct, cids = _ctx(rec, 62.0)
    assert (
        _post(
            http, "/predict", {"token": token, "context": _train(ct, cids), "context_start": 62.0}
        ).status_code
        == 200
    )


@pytest.mark.service
@pytest.mark.slow
def test_chunked_body_over_the_limit_gets_413(http):
    def chunks():
        for _ in range(40):
            yield b" " * 32768  # 1.25 MiB in all, sent without Content-Length

    r = http.post("/predict", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413 and "limit" in r.json()["error"]


@pytest.mark.service
@pytest.mark.slow
def test_only_json_bodies_are_accepted(http, rec):
    """A browser's cross-origin 'simple' POST (text/plain, form types) is refused before anything runs."""
    body = json.dumps(_register_body(rec)).encode()
    for ctype in ("application/x-www-form-urlencoded", "text/plain", "multipart/form-data; boundary=x", ""):
        r = http.post("/register", content=body, headers={"content-type": ctype})
        assert r.status_code == 415 and "application/json" in r.json()["error"], (ctype, r.text)
    for ctype in ("application/json", "application/json; charset=utf-8", "Application/JSON"):
        r = http.post("/register", content=body, headers={"content-type": ctype})
        assert r.status_code == 200, (ctype, r.text)


@pytest.mark.service
@pytest.mark.slow
def test_evicted_session_gets_404_and_memory_stays_bounded(http, rec, server):
    first = _post(http, "/register", _register_body(rec)).json()["token"]
    for _ in range(MAX_SESSIONS):
        assert _post(http, "/register", _register_body(rec)).status_code == 200
    ct, cids = _ctx(rec, 62.0)
    r = _post(http, "/predict", {"token": first, "context": _train(ct, cids), "context_start": 62.0})
    assert r.status_code == 404 and "register the reference again" in r.json()["error"]
    info = http.get("/model").json()["sessions"]
    assert info["active"] <= MAX_SESSIONS and info["evictions"] >= 1


# ----------------------------------------------------------------------------- OpenAPI, metrics


@pytest.mark.service
@pytest.mark.slow
def test_openapi_documents_every_field_and_its_examples_work(http):
    spec = http.get("/docs.json").json()
    comps = spec["components"]["schemas"]
    undocumented = []
    for name, sch in comps.items():
        if name in ("TaskStatusResponse", "InvalidArgument", "NotFound", "InternalServerError"):
            continue
        for field, prop in (sch.get("properties") or {}).items():
            if not prop.get("description"):
                undocumented.append(f"{name}.{field}")
    assert not undocumented, undocumented
    props = comps["SpikeTrain"]["properties"]
    assert "seconds" in props["times"]["description"]
    assert "Hz" in comps["PredictionIODescriptor"]["properties"]["rates_hz"]["description"]
    for path in ("/register", "/predict", "/predict_batch"):
        schema = spec["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]
        example = schema["example"]
        assert (
            example
            == getattr(
                schemas,
                {
                    "/register": "RegisterRequest",
                    "/predict": "PredictRequest",
                    "/predict_batch": "PredictBatchRequest",
                }[path],
            ).model_config["json_schema_extra"]["example"]
        )
        r = http.post(path, json=example)
        assert r.status_code == 200, (path, r.text)
    pred = http.post(
        "/predict",
        json=spec["paths"]["/predict"]["post"]["requestBody"]["content"]["application/json"]["schema"][
            "example"
        ],
    ).json()
    assert np.asarray(pred["rates_hz"]).shape == (2, 5) and pred["bin_edges"][0] == 13.0


def _metric(text: str, name: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and not line.startswith("#"):
            head = line.split(" ")[0]
            if head == name or head.startswith(name + "{"):
                total += float(line.rsplit(" ", 1)[1])
    return total


@pytest.mark.service
@pytest.mark.slow
def test_metrics_have_the_service_counters(http, rec, token):
    before = http.get("/metrics").text
    for name in (
        "nh_serve_session_cache_hits_total",
        "nh_serve_session_cache_misses_total",
        "nh_serve_sessions",
        "nh_serve_prediction_seconds_count",
        "nh_serve_registration_seconds_count",
        "nh_serve_windows_predicted_total",
        "bentoml_service_request_total",
    ):
        assert name in before, name
    ct, cids = _ctx(rec, 62.0)
    for _ in range(3):
        assert (
            _post(
                http, "/predict", {"token": token, "context": _train(ct, cids), "context_start": 62.0}
            ).status_code
            == 200
        )
    assert (
        _post(
            http, "/predict", {"token": "gone", "context": _train(ct, cids), "context_start": 62.0}
        ).status_code
        == 404
    )
    assert _post(http, "/predict", b"{oops").status_code == 400
    after = http.get("/metrics").text
    assert (
        _metric(after, "nh_serve_session_cache_hits_total")
        - _metric(before, "nh_serve_session_cache_hits_total")
        == 3
    )
    assert (
        _metric(after, "nh_serve_session_cache_misses_total")
        - _metric(before, "nh_serve_session_cache_misses_total")
        == 1
    )
    assert (
        _metric(after, "nh_serve_windows_predicted_total")
        - _metric(before, "nh_serve_windows_predicted_total")
        == 3
    )
    assert (
        _metric(after, "nh_serve_rejected_requests_total")
        - _metric(before, "nh_serve_rejected_requests_total")
        == 2
    )
    assert _metric(after, "nh_serve_sessions") >= 1


# ----------------------------------------------------------------------------- concurrency


@pytest.mark.service
@pytest.mark.slow
def test_concurrent_clients_get_no_5xx(server, rec, local):
    """8 clients x 10 s of predictions (and some bad requests) against one server: zero 5xx, right answers."""
    from nh_serve.client import Client, RequestRejected

    rss0 = server.process.rss_bytes()
    ct, cids = _ctx(rec, 65.0)
    ltok = local.register(*_ref(rec), reference_window=(0.0, 60.0))
    want = local.predict(ltok, ct, cids, context_start=65.0).rates_hz
    statuses: dict[int, int] = {}
    wrong = []
    lock = threading.Lock()
    stop = time.monotonic() + 10.0

    def run(i: int) -> None:
        with Client(server.url, timeout=30.0) as c:
            tok = c.register(*_ref(rec), reference_window=(0.0, 60.0))
            n = 0
            while time.monotonic() < stop:
                n += 1
                try:
                    if n % 10 == 0:
                        c.predict(tok, ct[::-1], cids[::-1], context_start=65.0)  # unsorted: must be 400
                        code = 200
                    else:
                        p = c.predict(tok, ct, cids, context_start=65.0)
                        code = 200
                        if not np.allclose(p.rates_hz, want, rtol=1e-5, atol=1e-6):
                            wrong.append(i)
                except RequestRejected as e:
                    code = e.status_code
                except Exception as e:  # ServerError and anything unexpected
                    code = getattr(e, "status_code", None) or 599
                with lock:
                    statuses[code] = statuses.get(code, 0) + 1

    threads = [threading.Thread(target=run, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not any(t.is_alive() for t in threads)
    assert sum(statuses.values()) > 8, statuses
    assert not any(code >= 500 for code in statuses), statuses
    assert statuses.get(400, 0) > 0 and not wrong
    rss1 = server.process.rss_bytes()
    assert rss1 - rss0 < 300 * 2**20, (rss0, rss1)  # bounded by the session cache, not by the request count


# ----------------------------------------------------------------------------- start-up and packaging


@pytest.mark.service
@pytest.mark.slow
def test_start_fails_with_a_clear_message_without_a_checkpoint(tmp_path):
    env = bentoml_env(tmp_path / "bentoml", NH_SERVE_CHECKPOINT=str(tmp_path / "missing.safetensors"))
    bentoml = Path(sys.executable).parent / "bentoml"
    r = subprocess.run(
        [str(bentoml), "serve", "service.service:NHServe", "--host", "127.0.0.1", "--port", "1"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode != 0
    assert "missing.safetensors" in r.stderr and "NH_SERVE_CHECKPOINT" in r.stderr


@pytest.mark.service
@pytest.mark.slow
def test_start_stops_the_server_on_a_damaged_checkpoint(tmp_path):
    good = make_tiny_checkpoint(tmp_path / "good.safetensors")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(good.read_bytes()[:200])  # truncated
    proc = ServeProcess(
        env=bentoml_env(tmp_path / "bentoml", NH_SERVE_CHECKPOINT=str(bad)), log_path=tmp_path / "log"
    )
    try:
        proc.proc.wait(timeout=60)  # the worker stops the whole server instead of restarting forever
    except subprocess.TimeoutExpired:
        pytest.fail("bentoml serve kept running with a damaged checkpoint; log:\n" + proc.log())
    finally:
        proc.stop()
    log = proc.log(20000)
    assert "nh-serve cannot start" in log and "bad.safetensors" in log


@pytest.mark.service
@pytest.mark.slow
def test_bentoml_build_works_offline_and_the_bento_serves(tmp_path, server):
    """`bentoml build` with BENTOML_HOME in tmp (a few seconds), then serve the built Bento."""
    env = bentoml_env(tmp_path / "bentoml")
    bentoml = Path(sys.executable).parent / "bentoml"
    t0 = time.monotonic()
    r = subprocess.run(
        [str(bentoml), "build", "-o", "tag"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
    )
    build_s = time.monotonic() - t0
    assert r.returncode == 0, r.stdout + r.stderr
    tag = r.stdout.strip().splitlines()[-1].replace("__tag__:", "").strip()
    assert tag.startswith("nh_serve:"), r.stdout
    name, version = tag.split(":")
    bento = tmp_path / "bentoml" / "bentos" / name / version
    assert (bento / "src" / "service" / "service.py").is_file()
    assert (bento / "src" / "nh_serve" / "inference" / "predictor.py").is_file()
    assert "/predict_batch" in (bento / "apis" / "openapi.yaml").read_text()
    # Serve the built Bento from outside the repository.
    serve_env = bentoml_env(tmp_path / "bentoml", NH_SERVE_CHECKPOINT=str(server.checkpoint))
    proc = ServeProcess(target=tag, env=serve_env, cwd=tmp_path, log_path=tmp_path / "bento.log")
    try:
        proc.wait_ready(60)
        info = httpx.get(f"{proc.url}/model", timeout=10).json()
        assert info["name"] == "nh-tiny"
        assert info["backend"] == choose_backend("cpu")  # auto: the plugin backends are found when served
    finally:
        proc.stop()
    print(f"bentoml build took {build_s:.1f} s")


# ----------------------------------------------------------------------------- handlers in-process


@pytest.fixture(scope="module")
def handlers(tmp_path_factory):
    ckpt = make_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "m.safetensors")
    limits = Limits(max_units=10, max_spikes=1000, max_windows=2, max_adapt_steps=1)
    p = Predictor.load(str(ckpt), max_sessions=4, session_ttl_s=0.2, limits=limits)
    return Handlers(p, settings=Settings(limits=limits))


def test_handlers_limits_and_expired_token(handlers, rec):
    with pytest.raises(ApiError) as e:  # ~7700 reference spikes > max_spikes 1000
        handlers.register(schemas.RegisterRequest.model_validate(_register_body(rec)))
    assert e.value.status == 413 and "reference.times" in e.value.message and "1000" in e.value.message
    t, ids = _ref(rec)
    eleven = {"times": t[:500].tolist(), "unit_ids": [f"u{i % 11}" for i in range(500)]}
    with pytest.raises(ApiError) as e:
        handlers.register(schemas.RegisterRequest.model_validate({"reference": eleven}))
    assert e.value.status == 413 and "11 units" in e.value.message
    keep = np.isin(ids, rec["unit_ids"][:5])
    sub = {"times": t[keep][:900].tolist(), "unit_ids": ids[keep][:900].tolist()}
    reg = handlers.register(schemas.RegisterRequest.model_validate({"reference": sub}))
    assert reg.n_units == 5
    ctx = {"times": [], "unit_ids": []}
    ok = handlers.predict(
        schemas.PredictRequest.model_validate({"token": reg.token, "context": ctx, "context_start": 30.0})
    )
    assert np.asarray(ok.rates_hz.root).shape == (5, 50)
    time.sleep(0.3)  # past the 0.2 s time limit
    with pytest.raises(ApiError) as e:
        handlers.predict(
            schemas.PredictRequest.model_validate({"token": reg.token, "context": ctx, "context_start": 30.0})
        )
    assert e.value.status == 404 and "expire" in e.value.message


def test_handlers_pass_behaviour_images_and_schedule_to_the_predictor(tmp_path):
    ckpt = make_tiny_checkpoint(tmp_path / "mm.safetensors", behavior_dim=2, image_dim=32)
    p = Predictor.load(str(ckpt), backend="torch")
    h = Handlers(p, settings=Settings())
    d = make_session(seed=5, n_units=8, duration=40.0, multimodal=True)
    t, u, ids = d["spike_times"], d["unit_index"], d["unit_ids"]
    ref = t < 30.0
    reg = h.register(
        schemas.RegisterRequest.model_validate(
            {"reference": {"times": t[ref].tolist(), "unit_ids": ids[u[ref]].tolist()},
             "reference_start": 0.0, "reference_end": 30.0}
        )
    )
    c = 32.0
    ctx = (t >= c) & (t < c + 1.0)
    bt, bv = d["behavior"]
    b = (bt >= c) & (bt < c + 1.0)
    it, iv = d["image_embeddings"]
    i = (it >= c) & (it < c + 2.0)
    window = {"token": reg.token, "context": {"times": t[ctx].tolist(), "unit_ids": ids[u[ctx]].tolist()},
              "context_start": c, "behavior": {"times": bt[b].tolist(), "values": bv[b].tolist()},
              "images": {"times": it[i].tolist(), "values": iv[i].tolist()}}
    local = p.predict(reg.token, t[ctx], ids[u[ctx]], context_start=c, behavior=(bt[b], bv[b]), images=(it[i], iv[i]))
    got = h.predict(schemas.PredictRequest.model_validate(window))
    np.testing.assert_allclose(np.asarray(got.rates_hz.root), local.rates_hz, rtol=1e-5)
    shown = {**window, "images": {"times": it[i][it[i] < c + 1].tolist(), "values": iv[i][it[i] < c + 1].tolist()}}
    none_coming = h.predict(schemas.PredictRequest.model_validate({**shown, "image_schedule_s": 1.0}))
    unknown = h.predict(schemas.PredictRequest.model_validate(shown))
    assert np.abs(np.asarray(none_coming.rates_hz.root) - np.asarray(unknown.rates_hz.root)).max() > 1e-6
    assert (it[i] >= c + 1.0).any()
    with pytest.raises(ApiError) as e:
        h.predict(schemas.PredictRequest.model_validate({**window, "image_schedule_s": 0.0}))
    assert e.value.status == 400 and "images" in e.value.message and "image_schedule_s" in e.value.message


def test_handlers_split_batches_by_tokens_and_name_windows_by_their_place(tmp_path, rec):
    ckpt = make_tiny_checkpoint(tmp_path / "m.safetensors")
    limits = Limits(max_context_spikes=300)
    p = Predictor.load(str(ckpt), backend="torch", limits=limits)
    h = Handlers(p, settings=Settings(limits=limits))
    reg = h.register(schemas.RegisterRequest.model_validate(_register_body(rec)))
    starts = [60.0, 61.0, 62.0, 63.0, 64.0]
    windows = [{"context": _train(*_ctx(rec, s)), "context_start": s} for s in starts]
    n = [len(w["context"]["times"]) for w in windows]
    assert max(n) <= 300 < sum(n)  # so the batch runs in several groups
    got = h.predict_batch(schemas.PredictBatchRequest.model_validate({"token": reg.token, "windows": windows}))
    ltok = p.register(*_ref(rec), reference_window=(0.0, 60.0))
    for i, s in enumerate(starts):
        want = p.predict(ltok, *_ctx(rec, s), context_start=s).rates_hz
        np.testing.assert_allclose(np.asarray(got.rates_hz.root)[i], want, rtol=1e-5, atol=1e-6)
    bad = [*windows[:4], {"context": _train(*_ctx(rec, 64.0)), "context_start": 66.0}]  # spikes outside its window
    with pytest.raises(ApiError) as e:
        h.predict_batch(schemas.PredictBatchRequest.model_validate({"token": reg.token, "windows": bad}))
    assert e.value.status == 400 and e.value.message.startswith("windows[4]"), e.value.message


def test_handlers_warm_up_leaves_no_session(handlers):
    n = len(handlers.predictor.sessions)
    assert handlers.warm_up(n_units=20, seconds=20.0, repeats=1) > 0
    assert len(handlers.predictor.sessions) == n


def test_api_field_names_and_validation_messages():
    assert api_field_names("reference_window: too short") == "reference_start/reference_end: too short"
    assert api_field_names("windows[3]: context spikes: unsorted") == "windows[3].context: unsorted"
    assert api_field_names("horizon_s: bad") == "horizon_s: bad"
    msg = validation_message(
        [
            {
                "type": "list_type",
                "loc": ["context", "times", "list[float]"],
                "msg": "Input should be a valid array",
            },
            {
                "type": "model_type",
                "loc": ["context", "times", "EncodedArray"],
                "msg": "Input should be an object",
            },
            {"type": "missing", "loc": ["windows", 2, "context_start"], "msg": "Field required"},
        ]
    )
    assert msg == (
        "invalid request: context.times: Input should be a valid array or Input should be an object; "
        "windows[2].context_start: Field required"
    )


def test_settings_from_env(monkeypatch):
    monkeypatch.setenv("NH_SERVE_MAX_BODY_MB", "0.5")
    monkeypatch.setenv("NH_SERVE_MAX_SESSIONS", "7")
    monkeypatch.setenv("NH_SERVE_MAX_REFERENCE_S", "120")
    monkeypatch.setenv("NH_SERVE_ALLOWED_HOSTS", "Example.org, 10.0.0.5")
    s = Settings.from_env()
    assert s.max_body_bytes == 2**19 and s.max_sessions == 7 and s.limits.max_reference_s == 120.0
    assert s.max_sessions_per_client == 1  # a quarter of the sessions by default
    assert s.allowed_hosts == ("example.org", "10.0.0.5") and s.api_key == ""
    monkeypatch.setenv("NH_SERVE_API_KEY", "s3cret")
    s = Settings.from_env()
    assert s.api_key == "s3cret" and "s3cret" not in repr(s) and "s3cret" not in json.dumps(s.public())
    assert s.public()["api_key_required"] is True
    monkeypatch.setenv("NH_SERVE_MAX_UNITS", "many")
    with pytest.raises(InputError, match="NH_SERVE_MAX_UNITS"):
        Settings.from_env()


def test_serve_script_is_valid_bash():
    r = subprocess.run(["bash", "-n", str(REPO / "scripts" / "serve.sh")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert os.access(REPO / "scripts" / "serve.sh", os.X_OK)


# ----------------------------------------------------------------------------- abandoned work stops


@pytest.mark.service
@pytest.mark.slow
def test_abandoned_registrations_stop_and_keep_nothing(tmp_path, rec):
    """A registration over the request time limit answers 503 and stops between its steps; so does one
    whose client went away. Either way no session is kept and the fit thread is free at once."""
    ckpt = make_tiny_checkpoint(tmp_path / "m.safetensors")
    env = bentoml_env(
        tmp_path / "bentoml", NH_SERVE_CHECKPOINT=str(ckpt), NH_SERVE_BACKEND="torch",
        NH_SERVE_REQUEST_TIMEOUT_S="3", NH_SERVE_ADAPT_BUDGET_S="60", NH_SERVE_MAX_ADAPT_STEPS="1000000",
    )
    proc = ServeProcess(env=env, log_path=tmp_path / "log")
    try:
        proc.wait_ready(90)
        with httpx.Client(base_url=proc.url, timeout=30) as h:
            long_fit = _register_body(rec, adapt_steps=1_000_000)  # would adapt for the 60 s budget
            t0 = time.monotonic()
            r = h.post("/register", json=long_fit)
            assert r.status_code == 503 and "NH_SERVE_REQUEST_TIMEOUT_S" in r.json()["error"], r.text
            assert r.headers["retry-after"] == "1" and 3 <= time.monotonic() - t0 < 7
            # The client gives up (disconnects) after 0.5 s, well before the 3 s limit: the work stops too,
            # so the fit thread is free for a short fit at once instead of after the limit.
            t0 = time.monotonic()
            with pytest.raises(httpx.ReadTimeout):
                httpx.post(f"{proc.url}/register", json=long_fit, timeout=0.5)
            r = h.post("/register", json=_register_body(rec, adapt_steps=1))
            took = time.monotonic() - t0
            assert r.status_code == 200 and took < 2.0, (r.text, took)
            assert h.get("/model").json()["sessions"]["active"] == 1  # only the last one was kept
    finally:
        proc.stop()
    log = proc.log(50000)
    assert "refused 503 POST /register" in log and "refused 499 POST /register" in log, log[-3000:]
    assert "Traceback" not in log, log[-3000:]


@pytest.mark.service
@pytest.mark.slow
def test_serve_without_host_binds_the_loopback_interface(tmp_path):
    """`bentoml serve service.service:NHServe` with no --host listens on 127.0.0.1 only."""
    import psutil

    ckpt = make_tiny_checkpoint(tmp_path / "m.safetensors")
    env = bentoml_env(tmp_path / "bentoml", NH_SERVE_CHECKPOINT=str(ckpt), NH_SERVE_BACKEND="torch")
    proc = ServeProcess(env=env, log_path=tmp_path / "log", host=None)
    try:
        proc.wait_ready(90)
        listening = {
            c.laddr.ip
            for p in proc.processes()
            for c in p.net_connections(kind="inet")
            if c.status == psutil.CONN_LISTEN and c.laddr.port == proc.port
        }
        assert listening == {"127.0.0.1"}, listening
    finally:
        proc.stop()

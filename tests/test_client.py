"""Tests for nh_serve.client (against the shared test server) and its wire encodings (nh_serve.client.wire)."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import httpx
import numpy as np
import pytest
from service_server import shared_server, stop_shared_server

from nh_serve.client import Client, RequestRejected, ServerError, SessionNotFound
from nh_serve.client.wire import TooLarge, decode_array, decode_spikes, encode_array, encode_spikes
from nh_serve.data.synth import make_session
from nh_serve.errors import InputError
from nh_serve.inference.predictor import Prediction, Predictor
from nh_serve.prediction import IndexedIds

# ----------------------------------------------------------------------------- wire encodings


def test_encode_decode_round_trips_exactly():
    rng = np.random.default_rng(0)
    x = np.sort(rng.uniform(0, 60, 1000))
    enc = encode_array(x, dtype="float64")
    assert enc["dtype"] == "float64" and enc["shape"] == [1000]
    assert base64.b64decode(enc["b64"]) == x.astype("<f8").tobytes()  # raw little-endian values
    np.testing.assert_array_equal(decode_array(enc, name="x"), x)
    m = rng.normal(size=(3, 4)).astype(np.float32)
    np.testing.assert_array_equal(decode_array(encode_array(m), name="m", ndim=2), m)
    i = np.array([0, 5, 2**31 - 1], dtype=np.int32)
    assert decode_array(encode_array(i), name="i", kinds="i").tolist() == [0, 5, 2**31 - 1]
    # JSON lists
    assert decode_array([1, 2.5], name="l").tolist() == [1.0, 2.5]
    assert decode_array([], name="l").shape == (0,)


def test_npy_form_numbers_strings_big_endian_and_fortran():
    ids = np.array(["u1", "unit_22", "x"])
    np.testing.assert_array_equal(decode_array(encode_array(ids, npy=True), name="ids", kinds="iU"), ids)
    for a in (np.arange(6, dtype=">f8").reshape(2, 3), np.asfortranarray(np.arange(6.0).reshape(2, 3))):
        buf = io.BytesIO()
        np.save(buf, a)
        got = decode_array({"npy": base64.b64encode(buf.getvalue()).decode()}, name="a", ndim=2)
        np.testing.assert_array_equal(got, np.asarray(a, dtype=float))


def test_pickled_or_malformed_npy_is_refused():
    buf = io.BytesIO()
    np.save(buf, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(InputError, match="no pickles"):
        decode_array({"npy": base64.b64encode(buf.getvalue()).decode()}, name="x")
    buf = io.BytesIO()
    np.save(buf, np.arange(10.0))
    truncated = buf.getvalue()[:-8]
    with pytest.raises(InputError, match="9 values|80 bytes"):
        decode_array({"npy": base64.b64encode(truncated).decode()}, name="x")
    with pytest.raises(InputError, match="not a valid .npy"):
        decode_array({"npy": base64.b64encode(b"hello world").decode()}, name="x")


@pytest.mark.parametrize(
    "obj, match",
    [
        ({"b64": "!!!", "dtype": "float64"}, "base64"),
        ({"b64": "AAAA", "dtype": "float64"}, "3 bytes"),
        ({"b64": "AAAAAAAAAAA=", "dtype": "float16"}, "dtype"),
        ({"b64": base64.b64encode(b"\0" * 16).decode(), "dtype": "float64", "shape": [3]}, "shape"),
        ({"dtype": "float64"}, "b64"),
        ({"npy": "AA==", "b64": "AA=="}, "only the key"),
        ("1,2,3", "JSON list"),
        ([[1, 2], [3]], "same length"),
        ([1, "a"], "numbers"),
        ([True, False], "true/false"),
    ],
)
def test_bad_wire_arrays_name_the_field(obj, match):
    with pytest.raises(InputError, match=match) as e:
        decode_array(obj, name="context.times", kinds="f")
    assert str(e.value).startswith("context.times")


def test_limits_raise_too_large_before_decoding():
    with pytest.raises(TooLarge, match="limit of 4"):
        decode_array(encode_array(np.zeros(5)), name="x", max_items=4)
    with pytest.raises(TooLarge):
        decode_array([0.0] * 5, name="x", max_items=4)
    with pytest.raises(TooLarge, match="unit_table"):
        decode_spikes(
            {"times": [1.0], "unit_ids": [0], "unit_table": ["a", "b", "c"]}, name="ref", max_units=2
        )


def test_encode_spikes_is_compact_and_decodes_to_the_ids_in_their_type():
    t = np.array([0.1, 0.2, 0.3, 0.4])
    ids = np.array([7, 3, 7, 12])
    w = encode_spikes(t, ids)
    assert w["unit_table"] == [3, 7, 12]  # integers stay integers, in numeric order
    assert w["unit_ids"]["dtype"] == "int32"
    times, got = decode_spikes(w, name="s")
    np.testing.assert_array_equal(times, t)
    assert got.dtype == np.int64 and got.tolist() == [7, 3, 7, 12]
    times, got = decode_spikes(encode_spikes(t, ids.astype(str), binary=False), name="s")
    assert got.tolist() == ["7", "3", "7", "12"]
    _, compact = decode_spikes(w, name="s", compact=True)
    assert isinstance(compact, IndexedIds) and compact.table.tolist() == [3, 7, 12]
    assert compact.table[compact.index].tolist() == [7, 3, 7, 12]
    _, plain = decode_spikes({"times": [1.0, 2.0], "unit_ids": [5, 2]}, name="s")
    assert plain.dtype == np.int64
    with pytest.raises(InputError, match="outside unit_table"):
        decode_spikes({"times": [1.0], "unit_ids": [5], "unit_table": ["a"]}, name="s")
    with pytest.raises(InputError, match="2 spike times but 1"):
        decode_spikes({"times": [1.0, 2.0], "unit_ids": ["a"]}, name="s")


@pytest.mark.parametrize(
    "train, match",
    [
        ({"times": [1.0, 2.0], "unit_ids": [0, 1], "unit_table": ["a", "a"]}, "'a' appears more than once"),
        ({"times": [1.0], "unit_ids": [0], "unit_table": [7, 7]}, "appears more than once"),
        ({"times": [1.0], "unit_ids": [0], "unit_table": ["x" * 200, "a"]}, "200 characters"),
        ({"times": [1.0], "unit_ids": ["x" * 200]}, "200 characters"),
        ({"times": [1.0], "unit_ids": [0], "unit_table": [True]}, "list of unit ids"),
        ({"times": [1.0], "unit_ids": [0], "unit_table": [2**70]}, "64 bits"),
        ({"times": [True, False], "unit_ids": ["a", "b"]}, "true/false"),
        ({"times": [1.0], "unit_ids": [1.5]}, "integers or strings"),
    ],
)
def test_bad_unit_tables_and_ids_name_the_field(train, match):
    with pytest.raises(InputError, match=match) as e:
        decode_spikes(train, name="reference", max_id_chars=128)
    assert str(e.value).startswith("reference")


def test_nested_true_false_is_refused():
    with pytest.raises(InputError, match="true/false"):
        decode_array([[1.0, True]], name="behavior.values", kinds="f", ndim=2)


# ----------------------------------------------------------------------------- against the server


@pytest.fixture(scope="session")
def server():
    yield shared_server()
    stop_shared_server()  # session fixtures end after the last test of every module


@pytest.fixture(scope="module")
def local(server):
    return Predictor.load(str(server.checkpoint), backend="torch")


@pytest.fixture(scope="module")
def rec():
    d = make_session(seed=5, n_units=25, duration=70.0)
    return d["spike_times"], d["unit_ids"][d["unit_index"]]


def _win(rec, start):
    t, ids = rec
    m = (t >= start) & (t < start + 1.0)
    return t[m], ids[m]


@pytest.mark.service
@pytest.mark.slow
@pytest.mark.parametrize("encoding", ["base64", "json"])
def test_client_round_trip_equals_local_predictor(server, local, rec, encoding):
    t, ids = rec
    ref = t < 60.0
    with Client(server.url, encoding=encoding) as remote:
        for p in (remote, local):  # the same calls work on both
            token = p.register(t[ref], ids[ref], reference_window=(0.0, 60.0))
            ct, cids = _win(rec, 61.0)
            pred = p.predict(token, ct, cids, context_start=61.0, horizon_s=0.6)
            batch = p.predict_batch(
                token,
                [
                    dict(spike_times=_win(rec, s)[0], unit_ids=_win(rec, s)[1], context_start=s)
                    for s in (60.0, 65.5)
                ],
            )
            if p is remote:
                r_pred, r_batch = pred, batch
            else:
                l_pred, l_batch = pred, batch
    assert isinstance(r_pred, Prediction) and r_pred.rates_hz.dtype == np.float32
    assert r_pred.rates_hz.shape == (25, 30)
    np.testing.assert_allclose(r_pred.rates_hz, l_pred.rates_hz, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(r_pred.bin_edges, l_pred.bin_edges)
    np.testing.assert_array_equal(r_pred.unit_ids, l_pred.unit_ids)
    assert (r_pred.model, r_pred.model_hash) == (l_pred.model, l_pred.model_hash)
    np.testing.assert_allclose(r_pred.expected_counts, l_pred.expected_counts, rtol=1e-5, atol=1e-8)
    assert len(r_batch) == 2
    for a, b in zip(r_batch, l_batch):
        np.testing.assert_allclose(a.rates_hz, b.rates_hz, rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(a.bin_edges, b.bin_edges)


@pytest.mark.service
@pytest.mark.slow
def test_client_errors_carry_the_servers_message(server, rec):
    t, ids = rec
    with Client(server.url) as c:
        token = c.register(t[t < 60], ids[t < 60], reference_window=(0.0, 60.0), units=np.unique(ids))
        assert c.unit_ids(token).tolist() == sorted(np.unique(ids).tolist())
        ct, cids = _win(rec, 62.0)
        with pytest.raises(RequestRejected) as e:
            c.predict(token, ct[::-1], cids[::-1], context_start=62.0)
        assert e.value.status_code == 400 and "sorted" in str(e.value) and "context" in e.value.message
        assert isinstance(e.value, InputError)
        with pytest.raises(SessionNotFound) as e:
            c.predict("not-a-token", ct, cids, context_start=62.0)
        assert e.value.status_code == 404 and "register the reference again" in e.value.message
        with pytest.raises(RequestRejected, match="reference_start/reference_end"):
            c.register(t[t < 5], ids[t < 5], reference_window=(0.0, 5.0))
        with pytest.raises(InputError, match="missing field"):
            c.predict_batch(token, [dict(spike_times=ct, unit_ids=cids)])
        info = c.info()
        assert info["name"] == "nh-tiny" and "limits" in info
        assert c.ready()


def _mock_client(handler, **kw) -> tuple[Client, list]:
    calls = []

    def wrapped(request):
        calls.append(request)
        return handler(request, len(calls))

    return Client(
        "http://nh-serve.test", backoff_s=0.001, transport=httpx.MockTransport(wrapped), **kw
    ), calls


def test_retries_connection_errors_and_503_with_backoff_but_not_4xx():
    def flaky(request, n):
        if n == 1:
            raise httpx.ConnectError("refused", request=request)
        if n == 2:
            return httpx.Response(503, json={"error": "warming up"})
        return httpx.Response(200, json={"name": "ok"})

    c, calls = _mock_client(flaky, retries=3)
    assert c.info() == {"name": "ok"} and len(calls) == 3

    c, calls = _mock_client(lambda r, n: httpx.Response(400, json={"error": "context: bad"}), retries=3)
    with pytest.raises(RequestRejected, match="context: bad"):
        c.info()
    assert len(calls) == 1  # a 4xx is never retried

    c, calls = _mock_client(lambda r, n: httpx.Response(500, json={"error": "boom"}), retries=3)
    with pytest.raises(ServerError, match="boom") as e:
        c.info()
    assert e.value.status_code == 500 and len(calls) == 1

    def down(request, n):
        raise httpx.ConnectError("refused", request=request)

    c, calls = _mock_client(down, retries=2)
    with pytest.raises(ServerError, match="3 attempt"):
        c.info()
    assert len(calls) == 3


def test_unreachable_server_raises_server_error():
    from service_server import free_port

    c = Client(f"http://127.0.0.1:{free_port()}", timeout=1.0, retries=1, backoff_s=0.01)
    assert not c.ready()
    with pytest.raises(ServerError, match="ConnectError"):
        c.register(np.array([1.0]), np.array(["a"]))


def test_client_argument_checks():
    with pytest.raises(InputError, match="encoding"):
        Client("http://x", encoding="xml")
    with pytest.raises(InputError, match="retries"):
        Client("http://x", retries=-1)


@pytest.mark.service
@pytest.mark.slow
def test_stream_predictions_example_runs(server, tmp_path):
    """examples/stream_predictions.py streams a small synthetic recording through the server and writes a PNG."""
    import importlib.util

    from nh_serve.data.session import write_session

    d = make_session(seed=9, n_units=12, duration=66.0, multimodal=True)
    keys = (
        "spike_times",
        "unit_index",
        "unit_ids",
        "start",
        "end",
        "behavior",
        "image_embeddings",
        "true_rates",
    )
    session = write_session(tmp_path / "rec.h5", **{k: d[k] for k in keys})
    path = Path(__file__).resolve().parents[1] / "examples" / "stream_predictions.py"
    spec = importlib.util.spec_from_file_location("stream_predictions", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = tmp_path / "plot.png"
    argv = [
        "--url",
        server.url,
        "--session",
        str(session),
        "--windows",
        "3",
        "--units",
        "2",
        "--out",
        str(out),
        "--refit-every",
        "60",
    ]
    assert mod.main(argv) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ----------------------------------------------------------------------------- unit ids 0..20 end to end


def _integer_units(n_units: int = 21, seed: int = 11):
    """Units 0..n-1 whose rates differ (unit i at 1 + 1.5 i Hz) over 70 s."""
    rng = np.random.default_rng(seed)
    trains = [np.sort(rng.uniform(0, 70, rng.poisson((1 + 1.5 * i) * 70))) for i in range(n_units)]
    t = np.concatenate(trains)
    u = np.concatenate([np.full(x.size, i, dtype=np.int64) for i, x in enumerate(trains)])
    o = np.argsort(t, kind="stable")
    return t[o], u[o]


@pytest.mark.service
@pytest.mark.slow
@pytest.mark.parametrize("encoding", ["base64", "json"])
def test_integer_unit_ids_round_trip_in_numeric_order(server, local, encoding):
    """Row i is unit i through the Predictor, the client and the running service.

    The reference for "unit i" is a local registration with string ids 'u00'..'u20', whose text
    order is the numeric one; with ids sorted as text ('0', '1', '10', ...) row 2 would be unit 10.
    """
    t, u = _integer_units()
    ref, ctx = t < 60, (t >= 62) & (t < 63)
    names = np.array([f"u{i:02d}" for i in range(21)])
    truth = local.predict(
        local.register(t[ref], names[u[ref]], reference_window=(0, 60)), t[ctx], names[u[ctx]], context_start=62.0
    ).rates_hz
    assert len({tuple(np.round(r, 4)) for r in truth}) == 21  # every row is a different unit
    lpred = local.predict(local.register(t[ref], u[ref], reference_window=(0, 60)), t[ctx], u[ctx], context_start=62.0)
    with Client(server.url, encoding=encoding) as c:
        tok = c.register(t[ref], u[ref], reference_window=(0, 60))
        assert c.unit_ids(tok).dtype == np.int64 and c.unit_ids(tok).tolist() == list(range(21))
        rpred = c.predict(tok, t[ctx], u[ctx], context_start=62.0)
        rbatch = c.predict_batch(tok, [dict(spike_times=t[ctx], unit_ids=u[ctx], context_start=62.0)])[0]
        shuffled = np.random.default_rng(0).permutation(21)
        stok = c.register(t[ref], u[ref], reference_window=(0, 60), units=shuffled)
        spred = c.predict(stok, t[ctx], u[ctx], context_start=62.0)
    for p in (lpred, rpred, rbatch):
        assert p.unit_ids.dtype == np.int64 and p.unit_ids.tolist() == list(range(21))
        np.testing.assert_allclose(p.rates_hz, truth, rtol=1e-5, atol=1e-6)
        for i in range(21):  # row i is unit i
            np.testing.assert_allclose(p.rates_hz[list(p.unit_ids).index(i)], truth[i], rtol=1e-5, atol=1e-6)
    assert spred.unit_ids.tolist() == shuffled.tolist()  # units= gives the order
    for row, uid in enumerate(spred.unit_ids):
        np.testing.assert_allclose(spred.rates_hz[row], truth[uid], rtol=1e-5, atol=1e-6)
    # The service's own JSON carries numbers, not strings.
    body = {"reference": {"times": t[ref].tolist(), "unit_ids": u[ref].tolist()}, "reference_start": 0.0,
            "reference_end": 60.0}
    got = httpx.post(f"{server.url}/register", json=body, timeout=30).json()
    assert got["unit_ids"] == list(range(21))


# ----------------------------------------------------------------------------- registering again


def test_predict_registers_again_once_when_the_session_is_gone():
    """A 404 for a session this client registered: the kept reference is sent again, once, and the
    prediction comes back; the old token keeps working through the client. reregister=False raises."""
    tokens = (f"tok{i}" for i in range(1, 100))
    live: set = set()
    seen = []

    def server(request, n):
        body = json.loads(request.content)
        seen.append((request.url.path, body.get("token")))
        if request.url.path == "/register":
            tok = next(tokens)
            live.add(tok)
            return httpx.Response(200, json={"token": tok, "unit_ids": [0, 1], "n_units": 2})
        if body["token"] not in live:
            return httpx.Response(404, json={"error": "token: unknown or expired"})
        batch = request.url.path == "/predict_batch"
        return httpx.Response(200, json={"rates_hz": [[[1.0], [2.0]]] if batch else [[1.0], [2.0]],
                                         "bin_edges": [[1.0, 1.02]] if batch else [1.0, 1.02], "unit_ids": [0, 1],
                                         "model": "m", "model_hash": "h"})

    c, _ = _mock_client(server)
    tok = c.register(np.array([1.0, 2.0]), np.array([0, 1]), reference_window=(0.0, 30.0))
    assert c.predict(tok, [], [], context_start=10.0).unit_ids.tolist() == [0, 1]
    live.clear()  # the server restarted
    p = c.predict(tok, [], [], context_start=10.0)
    assert p.rates_hz.shape == (2, 1) and c.current_token(tok) == "tok2"
    assert [s[0] for s in seen] == ["/register", "/predict", "/predict", "/register", "/predict"]
    assert c.predict(tok, [], [], context_start=11.0) is not None and seen[-1] == ("/predict", "tok2")
    live.clear()
    c.predict_batch(tok, [dict(spike_times=[], unit_ids=[], context_start=12.0)])  # batches too
    assert c.current_token(tok) == "tok3"

    off, _ = _mock_client(server, reregister=False)
    t2 = off.register(np.array([1.0]), np.array([0]), reference_window=(0.0, 30.0))
    live.clear()
    with pytest.raises(SessionNotFound):
        off.predict(t2, [], [], context_start=10.0)


def test_429_is_retried_after_its_retry_after():
    def busy(request, n):
        if n == 1:
            return httpx.Response(429, json={"error": "busy"}, headers={"retry-after": "0"})
        return httpx.Response(200, json={"name": "ok"})

    c, calls = _mock_client(busy, retries=2)
    assert c.info() == {"name": "ok"} and len(calls) == 2
    assert calls[0].headers["x-client-id"] == c.client_id and "authorization" not in calls[0].headers
    k, calls = _mock_client(busy, api_key="k3y")
    k.info()
    assert calls[0].headers["authorization"] == "Bearer k3y"


@pytest.mark.service
@pytest.mark.slow
@pytest.mark.parametrize("fit", ["reference", "reference-dense", "none"])
def test_fit_modes_through_the_service_equal_the_local_predictor(server, local, rec, fit):
    """register(fit=...) reaches the server; its read-outs (fitted or zero-shot) give the local answer."""
    t, ids = rec
    ref = t < 60.0
    ct, cids = _win(rec, 62.0)
    with Client(server.url) as remote:
        token_r = remote.register(t[ref], ids[ref], reference_window=(0.0, 60.0), fit=fit)
        info = remote.last_registration["fit"]
        r = remote.predict(token_r, ct, cids, context_start=62.0)
    token_l = local.register(t[ref], ids[ref], reference_window=(0.0, 60.0), fit=fit)
    s = local.session(token_l)
    assert info["mode"] == fit == s.fit["mode"]
    if fit != "none":
        assert info["units_fitted"] == s.fit["units_fitted"] and info["windows"] == s.fit["windows"]
        assert info["window_step_s"] == s.fit["window_step_s"] == {"reference": 0.1, "reference-dense": 0.05}[fit]
    else:
        assert float(s.readout.abs().sum()) == 0.0
    here = local.predict(token_l, ct, cids, context_start=62.0)
    np.testing.assert_allclose(r.rates_hz, here.rates_hz, rtol=1e-5, atol=1e-6)
    with Client(server.url) as remote:
        with pytest.raises(RequestRejected, match="fit"):
            remote.register(t[ref], ids[ref], reference_window=(0.0, 60.0), fit="all")
        if fit == "reference":  # the streaming refit's settings reach the Predictor, which checks them
            tok = remote.register(t[ref], ids[ref], reference_window=(0.0, 60.0), refit_every_s=60, refit_window_s=180)
            assert remote.predict(tok, ct, cids, context_start=62.0).rates_hz.shape == r.rates_hz.shape
            with pytest.raises(RequestRejected, match="refit_window_s"):
                remote.register(t[ref], ids[ref], reference_window=(0.0, 60.0), refit_every_s=60, refit_window_s=20)
            with pytest.raises(RequestRejected, match="refit_window_s"):
                remote.register(t[ref], ids[ref], reference_window=(0.0, 60.0), refit_window_s=180)

"""Reliability suite of the HTTP service: the requests that once cost gigabytes, outlived their answer or
got a 5xx each get a 4xx or their documented bound, a load test survives a kill -9 of the worker, and
the worker's memory stays under a stated limit.

Every request goes through :func:`call` (or :func:`record`), which keeps its status and the worker's
resident memory at that moment; the last test checks the whole run (no 5xx, no traceback in the
server's log, worker RSS under ``MAX_WORKER_RSS``) and prints one line: cases tried / 4xx / 5xx /
max RSS. ``NH_SERVE_WRITE_BENCHMARKS=1`` also writes the figures into docs/benchmarks.md (section
``reliability``). Servers bind 127.0.0.1 on free ports and are stopped at the end.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import tempfile
import threading
import time
from pathlib import Path

import h5py
import httpx
import numpy as np
import psutil
import pytest
from service_server import ServeProcess, bentoml_env, make_tiny_checkpoint

from nh_serve.client import Client
from nh_serve.client.wire import encode_array
from nh_serve.core.config import COUNT_HISTORY
from nh_serve.inference.predictor import Predictor

REPO = Path(__file__).resolve().parents[1]
MAX_WORKER_RSS = 2 * 2**30  # the stated bound: the worker never holds more than 2 GiB (it starts near 0.9)
BODY_TIMEOUT_S = 2.0
ADAPT_BUDGET_S = 1.5
PER_CLIENT = 4
SERVER_ENV = {
    "NH_SERVE_BACKEND": "torch",
    "NH_SERVE_BODY_TIMEOUT_S": str(BODY_TIMEOUT_S),
    "NH_SERVE_ADAPT_BUDGET_S": str(ADAPT_BUDGET_S),
    "NH_SERVE_MAX_SESSIONS": "16",
    "NH_SERVE_MAX_SESSIONS_PER_CLIENT": str(PER_CLIENT),
}  # every request limit at the service's default

CASES: list[dict] = []
pytestmark = [pytest.mark.service, pytest.mark.slow]


# ----------------------------------------------------------------------------- servers and bookkeeping


class Server:
    """One ``bentoml serve`` of a tiny random-weight checkpoint, with a sampler of its worker's RSS."""

    def __init__(self, tmp: Path, name: str, *, model_overrides: dict | None = None, **env):
        self.tmp = tmp
        self.checkpoint = tmp / ("nh-tiny.safetensors" if not model_overrides else f"nh-tiny-{name}.safetensors")
        if not self.checkpoint.exists():
            make_tiny_checkpoint(self.checkpoint, **(model_overrides or {}))
        self.env = bentoml_env(tmp / f"bentoml-{name}", NH_SERVE_CHECKPOINT=str(self.checkpoint),
                               NH_SERVE_CACHE_DIR=str(tmp / "cache"), **{**SERVER_ENV, **env})
        self.log_path = tmp / f"{name}.log"
        self.start()
        self.max_rss = 0
        self._stop = threading.Event()
        self._sampler = threading.Thread(target=self._sample, daemon=True)
        self._sampler.start()

    def start(self, port: int | None = None) -> None:
        self.process = ServeProcess(env=self.env, log_path=self.log_path, port=port)
        self.url = self.process.url
        self.process.wait_ready(90)

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.max_rss = max(self.max_rss, self.worker_rss())
            time.sleep(0.05)

    def worker_rss(self) -> int:
        return self.process.worker_rss_bytes()

    def worker(self) -> psutil.Process:
        return self.process.processes()[-1]

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def close(self) -> None:
        self._stop.set()
        self.process.stop()


@pytest.fixture(scope="module")
def tmp():
    d = Path(tempfile.mkdtemp(prefix="nh-serve-reliability-"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="module")
def server(tmp):
    s = Server(tmp, "reliability")
    yield s
    s.close()


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, timeout=60.0) as c:
        yield c


@pytest.fixture(scope="module")
def rec():
    """21 integer units with distinct rates (unit i at 2 + 3 i Hz) over 70 s."""
    rng = np.random.default_rng(5)
    trains = [np.sort(rng.uniform(0, 70, rng.poisson((2 + 3 * i) * 70))) for i in range(21)]
    t = np.concatenate(trains)
    u = np.concatenate([np.full(x.size, i, dtype=np.int64) for i, x in enumerate(trains)])
    o = np.argsort(t, kind="stable")
    return t[o], u[o]


@pytest.fixture(scope="module")
def token(http, rec):
    t, u = rec
    m = t < 60
    r = http.post("/register", json={"reference": {"times": t[m].tolist(), "unit_ids": u[m].tolist()},
                                     "reference_start": 0.0, "reference_end": 60.0})
    assert r.status_code == 200, r.text
    return r.json()["token"]


def record(case: str, status: int | str, expect: str, *, seconds: float, server: Server | None = None) -> None:
    CASES.append({"case": case, "status": status, "expect": expect, "seconds": round(seconds, 3),
                  "worker_rss_mb": round(server.worker_rss() / 2**20) if server is not None else None})


def call(http, server, case: str, path: str, body, *, expect: int, needles=(), headers=None, max_s=None):
    """POST ``body`` (dict -> JSON, bytes as they are), check the status and message, record the case."""
    t0 = time.monotonic()
    if isinstance(body, (bytes, str)):
        r = http.post(path, content=body, headers={"content-type": "application/json", **(headers or {})})
    else:
        r = http.post(path, json=body, headers=headers)
    took = time.monotonic() - t0
    record(case, r.status_code, str(expect), seconds=took, server=server)
    msg = r.json().get("error", r.text) if r.headers.get("content-type", "").startswith("application/json") else r.text
    assert r.status_code == expect, (case, r.status_code, r.text[:500])
    for n in needles:
        assert n.lower() in str(msg).lower(), (case, n, msg)
    if max_s is not None:
        assert took < max_s, (case, took)
    return r


def _spikes(n: int, seed: int = 0, duration: float = 60.0):
    rng = np.random.default_rng(seed)
    return np.sort(rng.uniform(0, duration, n))


# ----------------------------------------------------------------------------- the table, row by row


def test_absurd_reference_windows_are_refused(http, server):
    """6,015 spikes with reference_end 1e300 / 1e12 / 1e8 (500s, up to 146 TiB) and 1e7 (200 after 8 s, +3 GB)."""
    t = _spikes(6015)
    ids = np.random.default_rng(1).integers(0, 20, 6015)
    for end in (1e300, 1e12, 1e8, 1e7):
        body = {"reference": {"times": encode_array(t, dtype="float64"), "unit_ids": encode_array(ids.astype(np.int32)),
                              "unit_table": list(range(20))}, "reference_start": 0.0, "reference_end": end}
        call(http, server, f"register, 6,015 spikes, reference_end {end:g}", "/register", body, expect=400,
             needles=["reference_start/reference_end", "max_"], max_s=5)


def test_non_finite_horizon_is_a_400(http, server, token, rec):
    t, u = rec
    m = (t >= 62) & (t < 63)
    w = {"context": {"times": t[m].tolist(), "unit_ids": u[m].tolist()}, "context_start": 62.0}
    for literal in ("NaN", "Infinity", "-Infinity", "1e400"):
        body = json.dumps({"token": token, **w}).rstrip("}") + f', "horizon_s": {literal}}}'
        call(http, server, f"/predict horizon_s {literal}", "/predict", body, expect=400, needles=["horizon_s", "finite"])
        batch = json.dumps({"token": token, "windows": [w]}).rstrip("}") + f', "horizon_s": {literal}}}'
        call(http, server, f"/predict_batch horizon_s {literal}", "/predict_batch", batch, expect=400,
             needles=["horizon_s"])


def _table_body(ids: list, n_spikes: int) -> dict:
    """A reference of ``n_spikes`` spikes over 60 s whose unit_table is ``ids`` (indices alternate)."""
    t = _spikes(n_spikes, seed=2)
    index = (np.arange(n_spikes) % len(ids)).astype(np.int32)
    times = encode_array(t, dtype="float32")  # float32 seconds keep 2 M spikes under the 32 MiB body limit
    return {"reference": {"times": times, "unit_ids": encode_array(index), "unit_table": ids},
            "reference_start": 0.0, "reference_end": 60.0}


def test_huge_unit_ids_are_refused_before_anything_is_built(http, server):
    """unit_table ["x" * 1e6, "a"] with 2 M indices (a 7.28 TiB allocation) and 200-character ids (504, 7.6 GB)."""
    rss0 = server.worker_rss()
    call(http, server, "unit_table ['x' * 1e6, 'a'], 2 M spikes", "/register", _table_body(["x" * 10**6, "a"], 2_000_000),
         expect=400, needles=["reference.unit_table", "1000000 characters", "limit of 128"], max_s=10)
    call(http, server, "unit_table of 200-character ids, 2 M spikes", "/register",
         _table_body(["y" * 200, "b"], 2_000_000), expect=400, needles=["200 characters"], max_s=10)
    # Two units firing at 17 kHz: the autocorrelogram would count 3e9 pairs of close spikes.
    call(http, server, "2 units x 1 M spikes in 60 s (close pairs)", "/register", _table_body(["p", "q"], 2_000_000),
         expect=413, needles=["max_close_pairs"], max_s=10)
    # The bound: 1000 ids of 128 characters and 2 M spikes cost what the spikes cost, no per-spike strings
    # (zero-shot: the reference fit of 1000 units takes its own tens of seconds, docs/benchmarks.md).
    ids = [f"{i:0128d}" for i in range(1000)]
    r = call(http, server, "1000 ids of 128 characters, 2 M spikes (bound)", "/register",
             {**_table_body(ids, 2_000_000), "fit": "none"}, expect=200, max_s=20)
    assert r.json()["n_units"] == 1000
    assert server.max_rss - rss0 < 700 * 2**20, (rss0, server.max_rss)


def test_adaptation_on_a_long_reference_is_refused_up_front(http, server):
    """adapt_steps 1 with a 2,000 s reference (504: the 5 s budget covered only the gradient steps)."""
    t = _spikes(40_000, seed=3, duration=2000.0)
    ids = (np.arange(t.size) % 20).astype(np.int32)
    body = {"reference": {"times": encode_array(t, dtype="float64"), "unit_ids": encode_array(ids),
                          "unit_table": list(range(20))},
            "reference_start": 0.0, "reference_end": 2000.0, "adapt_steps": 1}
    call(http, server, "adapt_steps 1 on a 2,000 s reference", "/register", body, expect=400,
         needles=["adapt_steps", "max_adapt_unit_windows"], max_s=5)
    # The bound: the budget covers the whole registration (features, embeddings, set-up, steps).
    body = {**body, "reference_end": 300.0, "adapt_steps": 200}
    body["reference"] = {"times": encode_array(t[t < 300], dtype="float64"), "unit_ids": encode_array(ids[t < 300]),
                         "unit_table": list(range(20))}
    r = call(http, server, "adapt_steps 200 on a 300 s reference (bound: the budget)", "/register", body, expect=200,
             max_s=ADAPT_BUDGET_S + 4)
    assert r.json()["adaptation"]["seconds"] <= ADAPT_BUDGET_S + 0.5


def test_many_bad_ids_give_one_short_answer_and_one_log_line(http, server, token):
    """100 k unit_ids of 1.5 (2.4 MB): 400 after 11 s, a 43 MB answer and 46 MB of log with tracebacks."""
    before = len(server.log())
    body = {"token": token, "context": {"times": [62.5] * 100_000, "unit_ids": [1.5] * 100_000}, "context_start": 62.0}
    r = call(http, server, "100 k unit_ids of 1.5", "/predict", body, expect=400,
             needles=["context.unit_ids", "integers or strings"], max_s=3)
    assert len(r.content) < 2000, len(r.content)
    time.sleep(0.3)
    grown = server.log()[before:]
    rid = r.headers["x-request-id"]
    assert len(grown) < 2000 and grown.count(rid) == 1 and "Traceback" not in grown, grown[:3000]
    # A body with many invalid fields lists the first few problems and counts the rest.
    bad = {f"extra{i}": i for i in range(40)}
    r = call(http, server, "40 unknown fields", "/predict", {"token": token, **bad}, expect=400,
             needles=["and 37 more"])  # 40 extra + context + context_start missing = 42 problems, 5 listed
    assert r.json()["problems"] == 42 and len(r.json()["detail"]) == 5


def test_predictions_do_not_wait_behind_fits(server, rec):
    """4 concurrent adapt_steps=200 registrations: predicts waited up to 11.7 s behind the lock."""
    t, u = rec
    m = t < 60
    ctx = (t >= 62) & (t < 63)
    with Client(server.url, timeout=60) as c:
        tok = c.register(t[m], u[m], reference_window=(0, 60))
        c.predict(tok, t[ctx], u[ctx], context_start=62.0)
        results: list = []

        def fit(i: int) -> None:
            with Client(server.url, timeout=60, client_id=f"fitter{i}") as f:
                t0 = time.monotonic()
                f.register(t[m], u[m], reference_window=(0, 60), adapt_steps=200)
                results.append(time.monotonic() - t0)

        fitters = [threading.Thread(target=fit, args=(i,)) for i in range(4)]
        for th in fitters:
            th.start()
        time.sleep(0.5)
        lat = []
        while any(th.is_alive() for th in fitters):
            t0 = time.monotonic()
            c.predict(tok, t[ctx], u[ctx], context_start=62.0)
            lat.append(time.monotonic() - t0)
            time.sleep(0.02)
        for th in fitters:
            th.join()
    record("4 concurrent adapt_steps=200 registrations + predicts", 200, "200", seconds=max(results), server=server)
    record(f"predicts during the fits (max of {len(lat)})", 200, "200 without waiting", seconds=max(lat), server=server)
    assert len(results) == 4 and len(lat) >= 10
    assert max(lat) < 1.0, sorted(lat)[-5:]  # a fit takes ADAPT_BUDGET_S; a predict never waits for one


def test_connections_that_never_finish_their_body_are_closed(server, rec):
    """500 connections that never finish their body (never closed after 60 s)."""
    port = server.process.port
    head = (b"POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b"Content-Length: 1000\r\n\r\n{\"token\": \"")
    socks = []
    t0 = time.monotonic()
    for _ in range(500):
        s = socket.create_connection(("127.0.0.1", port), timeout=30)
        s.sendall(head)
        socks.append(s)
    # A well-behaved client still gets through while they hang (429s are retried after Retry-After).
    t, u = rec
    with Client(server.url, timeout=30, retries=6) as c:
        c.register(t[t < 60], u[t < 60], reference_window=(0, 60))
    statuses: dict[str, int] = {}
    for s in socks:
        data = b""
        while True:
            chunk = s.recv(4096)
            if not chunk:
                break  # closed by the server
            data += chunk
        code = data.split(b" ", 2)[1].decode() if data.startswith(b"HTTP/1.1") else "closed"
        statuses[code] = statuses.get(code, 0) + 1
        s.close()
    took = time.monotonic() - t0
    for code, n in statuses.items():
        for _ in range(n):
            record("a connection that never finishes its body", int(code) if code.isdigit() else code,
                   "408 or 429, closed", seconds=took, server=server)
    assert set(statuses) <= {"408", "429"} and statuses.get("408", 0) >= 1, statuses
    assert took < BODY_TIMEOUT_S + 15, took


def test_true_false_duplicates_and_absurd_times_are_400(http, server, token, rec):
    """true/false as spike times, duplicate unit_table entries, context_start 1e300 (all accepted before)."""
    t, u = rec
    m = t < 60
    ref = {"times": t[m].tolist(), "unit_ids": u[m].tolist()}
    bool_times = {"reference": {**ref, "times": [True] + t[m][1:].tolist()}, "reference_end": 60.0}
    call(http, server, "true as a spike time", "/register", bool_times, expect=400, needles=["reference.times", "true/false"])
    dup = {"reference": {"times": [1.0, 2.0, 3.0], "unit_ids": [0, 1, 0], "unit_table": ["a", "a"]},
           "reference_end": 30.0}
    call(http, server, "duplicate unit_table entries", "/register", dup, expect=400,
         needles=["reference.unit_table", "more than once"])
    far = {"token": token, "context": {"times": [], "unit_ids": []}, "context_start": 1e300}
    call(http, server, "context_start 1e300", "/predict", far, expect=400, needles=["context_start", "max_time_s"])
    for field, value in (("context_start", "true"), ("reference_start", "false")):
        body = json.dumps({"token": token, "context": {"times": [], "unit_ids": []}, "context_start": 62.0})
        body = body.replace('"context_start": 62.0', f'"context_start": {value}' if field == "context_start"
                            else f'"context_start": 62.0, "{field}": {value}')
        call(http, server, f"{field} {value}", "/predict", body, expect=400, needles=[field])
    call(http, server, "adapt_steps 2.0", "/register", {"reference": ref, "adapt_steps": 2.0}, expect=400,
         needles=["adapt_steps"])


def test_cross_origin_pages_and_rebinding_are_refused(http, server, rec):
    """A cross-origin browser text/plain POST was executed; no Origin or Host check."""
    t, u = rec
    m = t < 60
    body = json.dumps({"reference": {"times": t[m].tolist(), "unit_ids": u[m].tolist()}, "reference_end": 60.0})
    call(http, server, "text/plain POST (a browser's 'simple' request)", "/register", body, expect=415,
         headers={"content-type": "text/plain"}, needles=["application/json"])
    call(http, server, "POST with a foreign Origin", "/register", body, expect=403,
         headers={"origin": "http://attacker.example"}, needles=["origin"])
    call(http, server, "POST with a rebound Host name", "/register", body, expect=403,
         headers={"host": "attacker.example:3000"}, needles=["host", "NH_SERVE_ALLOWED_HOSTS"])
    same = call(http, server, "POST from the server's own /docs page", "/register", body, expect=200,
                headers={"origin": server.url})
    assert same.json()["n_units"] == 21
    r = http.get("/model", headers={"host": "attacker.example"})
    record("GET /model with a rebound Host name", r.status_code, "403", seconds=0, server=server)
    assert r.status_code == 403


def test_model_info_shows_no_paths_or_command_lines(http, server):
    r = http.get("/model")
    record("GET /model", r.status_code, "200, no paths", seconds=0, server=server)
    info = r.json()
    strings: list[tuple[str, str]] = []

    def walk(obj, key=""):
        if isinstance(obj, dict):
            for k, v in obj.items():
                assert k not in ("command", "argv", "cwd"), k
                walk(v, k)
        elif isinstance(obj, list):
            for v in obj:
                walk(v, key)
        elif isinstance(obj, str):
            strings.append((key, obj))

    walk(info)
    assert not [s for s in strings if s[1].startswith(("/", "~"))], strings
    assert str(server.tmp) not in r.text and "limits" in info and info["limits"]["max_reference_s"] == 3600.0


def test_unknown_token_is_not_echoed(http, server, rec):
    secret = "s3cret-token-abcdef"
    r = call(http, server, "unknown token", "/predict",
             {"token": secret, "context": {"times": [], "unit_ids": []}, "context_start": 62.0}, expect=404,
             needles=["token", "register the reference again"])
    assert secret not in r.text


def test_one_client_cannot_evict_everyone(server, rec):
    t, u = rec
    m = t < 60
    ctx = (t >= 62) & (t < 63)
    with Client(server.url, client_id="quiet", reregister=False) as quiet, \
         Client(server.url, client_id="busy", reregister=False) as busy:
        tok = quiet.register(t[m], u[m], reference_window=(0, 60))
        t0 = time.monotonic()
        for _ in range(PER_CLIENT * 5):
            busy.register(t[m], u[m], reference_window=(0, 60))
        quiet.predict(tok, t[ctx], u[ctx], context_start=62.0)  # still there
    record(f"a client registering {PER_CLIENT * 5} sessions (quota {PER_CLIENT})", 200,
           "200, others' sessions kept", seconds=time.monotonic() - t0, server=server)


def test_session_files_do_not_follow_external_links(tmp):
    """An HDF5 external link inside spikes was followed to another file on disk."""
    from nh_serve.data.session import open_session, write_session
    from nh_serve.errors import SessionFileError

    other = tmp / "other.h5"
    write_session(other, spike_times=np.arange(10.0), unit_index=np.zeros(10, int), unit_ids=["a"], start=0.0, end=10.0)
    bad = tmp / "linked.h5"
    write_session(bad, spike_times=np.arange(10.0), unit_index=np.zeros(10, int), unit_ids=["a"], start=0.0, end=10.0)
    with h5py.File(bad, "a") as f:
        del f["spikes/timestamps"]
        f["spikes/timestamps"] = h5py.ExternalLink(str(other), "/spikes/timestamps")
    t0 = time.monotonic()
    with pytest.raises(SessionFileError, match="external link"):
        open_session(bad)
    record("session file with an external link in spikes", "refused", "SessionFileError (exit 2 / 4xx)",
           seconds=time.monotonic() - t0)


def test_checkpoint_claiming_a_huge_model_stops_the_start_cleanly(tmp):
    """Metadata claiming dim 65,536 / depth 64 with a recomputed hash: a 17 GB allocation attempt, a traceback."""
    import safetensors.torch

    from nh_serve.inference.checkpoint_header import metadata_hash

    src = tmp / "nh-tiny.safetensors"
    if not src.exists():
        make_tiny_checkpoint(src)
    n = int.from_bytes(src.read_bytes()[:8], "little")
    header = json.loads(src.read_bytes()[8 : 8 + n])
    doc = json.loads(header["__metadata__"]["nh_serve"])
    doc["config"].update(dim=65536, depth=64, dim_head=64)
    doc.pop("metadata_hash")
    doc["metadata_hash"] = metadata_hash(doc)
    huge = tmp / "huge.safetensors"
    safetensors.torch.save_file(safetensors.torch.load_file(src), huge, metadata={"nh_serve": json.dumps(doc)})
    env = bentoml_env(tmp / "bentoml-huge", NH_SERVE_CHECKPOINT=str(huge), NH_SERVE_BACKEND="torch")
    proc = ServeProcess(env=env, log_path=tmp / "huge.log")
    t0 = time.monotonic()
    peak = 0
    try:
        while proc.proc.poll() is None and time.monotonic() - t0 < 90:
            peak = max(peak, proc.worker_rss_bytes())
            time.sleep(0.05)
        assert proc.proc.poll() is not None, "the server kept running with a checkpoint it cannot use"
    finally:
        proc.stop()
    log = proc.log(20000)
    record("checkpoint claiming dim 65,536 / depth 64", "refused", "start stops with one message",
           seconds=time.monotonic() - t0)
    CASES[-1]["worker_rss_mb"] = round(peak / 2**20)
    assert "nh-serve cannot start" in log and "dim = 65536 (at most 4096)" in log, log[-3000:]
    assert "Traceback" not in log and peak < MAX_WORKER_RSS, (peak, log[-3000:])


def test_api_key_and_kill_of_the_parent(tmp, rec):
    """With NH_SERVE_API_KEY: 401 without it. kill -9 of `bentoml serve`: the worker survived as an orphan,
    kept serving, and a restart failed with "Address already in use"."""
    key = "correct-horse-battery-staple"
    s = Server(tmp, "secured", NH_SERVE_API_KEY=key)
    try:
        with httpx.Client(base_url=s.url, timeout=30) as h:
            t, u = rec
            m = t < 60
            body = {"reference": {"times": t[m].tolist(), "unit_ids": u[m].tolist()}, "reference_end": 60.0}
            call(h, s, "POST without the API key", "/register", body, expect=401, needles=["Authorization: Bearer"])
            call(h, s, "POST with a wrong API key", "/register", body, expect=401,
                 headers={"authorization": "Bearer wrong"})
            call(h, s, "POST with the API key", "/register", body, expect=200, headers={"authorization": f"Bearer {key}"})
            for path, want in (("/model", 401), ("/metrics", 401), ("/livez", 200), ("/readyz", 200), ("/docs", 200)):
                r = h.get(path)
                record(f"GET {path} without the API key", r.status_code, str(want), seconds=0, server=s)
                assert r.status_code == want, (path, r.status_code)
            assert "securitySchemes" in h.get("/docs.json").json()["components"]
        with Client(s.url, api_key=key) as c:
            assert c.info()["limits"]["api_key_required"] is True
        # kill -9 of the parent: the worker goes with it and the port is free again.
        worker, port = s.worker(), s.process.port
        t0 = time.monotonic()
        os.kill(s.process.pid, signal.SIGKILL)
        s.process.proc.wait(10)
        worker.wait(10)  # psutil: raises TimeoutExpired if the worker outlives its parent
        gone = time.monotonic() - t0
        with socket.socket() as probe:
            assert probe.connect_ex(("127.0.0.1", port)) != 0  # nobody serves the port any more
        s.process.stop()
        s.start(port=port)  # the same port binds again
        assert httpx.get(f"{s.url}/readyz", timeout=10).status_code == 200
        record("kill -9 of the bentoml serve process", "worker gone", f"worker ends ({gone:.2f} s), port free",
               seconds=gone, server=s)
        assert gone < 5.0
    finally:
        s.close()


@pytest.fixture(scope="module")
def stateless_server(tmp):
    """A server of a model whose answer depends on the request alone (no per-session history stream),
    so answers given in any order, and after any re-registration, compare with one local Predictor's."""
    s = Server(tmp, "stateless", model_overrides=dict(COUNT_HISTORY))
    yield s
    s.close()


def test_load_with_a_worker_killed_mid_run(stateless_server, rec):
    """Clients registering, fitting and predicting for a bounded time while the worker is killed (-9) and
    restarted by BentoML: every call of every client returns (re-registering after the restart), the
    answers equal a local Predictor's, and no 5xx is seen."""
    server = stateless_server
    t, u = rec
    m = t < 60
    local = Predictor.load(str(server.checkpoint), backend="torch")
    ltok = local.register(t[m], u[m], reference_window=(0, 60))
    starts = [60.0 + 0.5 * i for i in range(18)]
    want = {s: local.predict(ltok, t[(t >= s) & (t < s + 1)], u[(t >= s) & (t < s + 1)], context_start=s).rates_hz
            for s in starts}
    statuses: dict[int, int] = {}
    errors: list[str] = []
    wrong: list[str] = []
    calls = {"predict": 0, "register": 0, "fit": 0, "batch": 0}
    lock = threading.Lock()
    stop_at = time.monotonic() + 40.0

    def hook(response):
        with lock:
            statuses[response.status_code] = statuses.get(response.status_code, 0) + 1

    def client_loop(i: int) -> None:
        c = Client(server.url, timeout=60, retries=12, backoff_s=0.25, client_id=f"load{i}")
        c._http.event_hooks["response"].append(hook)
        try:
            tok = c.register(t[m], u[m], reference_window=(0, 60))
            n = 0
            while time.monotonic() < stop_at:
                n += 1
                s = starts[n % len(starts)]
                w = (t >= s) & (t < s + 1)
                if i == 0 and n % 15 == 0:
                    c.register(t[m], u[m], reference_window=(0, 60), adapt_steps=3)
                    kind = "fit"
                elif i == 1 and n % 10 == 0:
                    c.register(t[m], u[m], reference_window=(0, 60))
                    kind = "register"
                elif n % 7 == 0:
                    got = c.predict_batch(tok, [dict(spike_times=t[w], unit_ids=u[w], context_start=s)])[0]
                    kind = "batch"
                    if not np.allclose(got.rates_hz, want[s], rtol=1e-5, atol=1e-6):
                        wrong.append(f"client {i} batch at {s}")
                else:
                    got = c.predict(tok, t[w], u[w], context_start=s)
                    kind = "predict"
                    if not np.allclose(got.rates_hz, want[s], rtol=1e-5, atol=1e-6) or got.unit_ids.tolist() != list(range(21)):
                        wrong.append(f"client {i} predict at {s}")
                with lock:
                    calls[kind] += 1
        except Exception as e:  # any call that did not come back is a failure of the test
            errors.append(f"client {i}: {type(e).__name__}: {e}")
        finally:
            c.close()

    threads = [threading.Thread(target=client_loop, args=(i,)) for i in range(6)]
    t0 = time.monotonic()
    for th in threads:
        th.start()
    time.sleep(8.0)
    old = server.worker()
    old.kill()  # kill -9 of the worker mid-run; BentoML starts a new one
    for th in threads:
        th.join(120)
    took = time.monotonic() - t0
    assert not any(th.is_alive() for th in threads)
    new = server.worker()
    assert new.pid != old.pid
    five = sum(n for code, n in statuses.items() if code >= 500)
    for code, n in statuses.items():
        for _ in range(n):
            CASES.append({"case": "load: a request of the load test", "status": code, "expect": "200 (404 once after the restart)",
                          "seconds": None, "worker_rss_mb": None})
    record("load test: 6 clients x 40 s, worker killed at 8 s", "recovered" if not errors else "failed",
           "every call returns", seconds=took, server=server)
    print(f"\nload: calls {calls}, HTTP statuses {dict(sorted(statuses.items()))}, {took:.1f} s")
    assert not errors, errors
    assert not wrong, wrong[:5]
    assert five == 0, statuses
    assert statuses.get(404, 0) >= 1  # the sessions died with the worker and were registered again
    assert calls["predict"] > 50 and calls["fit"] >= 1 and calls["register"] >= 1


# ----------------------------------------------------------------------------- the whole run


def test_zz_reliability_summary(server):
    """No 5xx anywhere, no traceback in the server's log, the worker under MAX_WORKER_RSS; one summary line."""
    statuses = [c["status"] for c in CASES if isinstance(c["status"], int)]
    n4 = sum(400 <= s < 500 for s in statuses)
    n5 = sum(s >= 500 for s in statuses)
    max_rss = max([server.max_rss] + [c["worker_rss_mb"] * 2**20 for c in CASES if c["worker_rss_mb"]])
    line = (f"reliability: {len(CASES)} cases tried, {n4} answered 4xx, {n5} answered 5xx, "
            f"worker max RSS {max_rss / 2**20:.0f} MB (limit {MAX_WORKER_RSS / 2**20:.0f} MB)")
    print("\n" + line)
    log = server.log()
    assert n5 == 0, [c for c in CASES if isinstance(c["status"], int) and c["status"] >= 500]
    assert "Traceback" not in log, log[log.find("Traceback") - 500 : log.find("Traceback") + 3000]
    assert max_rss < MAX_WORKER_RSS, max_rss
    if os.environ.get("NH_SERVE_WRITE_BENCHMARKS") == "1":
        _write_benchmarks(n4, n5, max_rss)


def _write_benchmarks(n4: int, n5: int, max_rss: int) -> None:
    from nh_serve.evaluation.reporting import machine_line, markdown_table, write_doc_section

    rows, seen = [], {}
    for c in CASES:
        if c["case"].startswith("load: "):
            continue
        key = c["case"]
        if key in seen:  # the 500 slow connections: one row with the counts
            seen[key]["answers"] += f", {c['status']}" if str(c["status"]) not in seen[key]["answers"] else ""
            seen[key]["n"] += 1
            continue
        row = {"case": key, "answers": str(c["status"]), "n": 1, "expected": c["expect"],
               "seconds": c["seconds"] if c["seconds"] is not None else "", "worker RSS MB": c["worker_rss_mb"] or ""}
        seen[key] = row
        rows.append(row)
    for r in rows:
        r["case"] = r["case"] + (f" (x{r['n']})" if r["n"] > 1 else "")
        del r["n"]
    load = [c for c in CASES if c["case"].startswith("load: ")]
    codes: dict = {}
    for c in load:
        codes[c["status"]] = codes.get(c["status"], 0) + 1
    md = "\n".join([
        "## Reliability (`pytest tests/test_service_reliability.py`)",
        "",
        machine_line(("nh-serve", "torch", "numpy", "bentoml")),
        f"- Load average (1/5/15 min) at the end: {' / '.join(f'{x:.2f}' for x in os.getloadavg())} on 2 cores: "
        "the machine was shared with other jobs; seconds are noisy, statuses and memory are not.",
        "",
        f"**{len(CASES)} cases tried: {n4} answered 4xx, {n5} answered 5xx; the worker's resident memory peaked at "
        f"{max_rss / 2**20:.0f} MB** (the stated limit is {MAX_WORKER_RSS / 2**20:.0f} MB; it starts near 900 MB "
        "with torch and BentoML loaded). The cases are the rows below (the issue's table row by row, then the "
        f"security and lifecycle checks; one row stands for the {sum(1 for c in CASES if 'never finishes' in c['case'])} "
        f"slow connections) and the load test's {len(load)} requests. Every request limit at the service's default "
        "(docs/service.md); the server serves a "
        f"random-weight nh-tiny with a {BODY_TIMEOUT_S:g} s body timeout and a {ADAPT_BUDGET_S:g} s adaptation budget. "
        f"The load test's {len(load)} HTTP answers: {dict(sorted(codes.items()))} (the 404s are the sessions lost "
        "with the killed worker, which the client registers again). Written by the suite with "
        "`NH_SERVE_WRITE_BENCHMARKS=1`.",
        "",
        markdown_table(rows, ["case", "answers", "expected", "seconds", "worker RSS MB"]),
    ])
    write_doc_section(REPO / "docs" / "benchmarks.md", "reliability", md)


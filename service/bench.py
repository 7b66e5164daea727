"""End-to-end HTTP benchmark of the service (``nh-serve bench service``).

Starts ``bentoml serve service.service:NHServe`` on 127.0.0.1 (a free port,
usage tracking off, BENTOML_HOME in a temporary folder) with the given
checkpoint -- by default the built-in one, or, while it does not exist, an
``nh-small`` model with random weights (same architecture and cost) -- and measures:

* single-client latency over one keep-alive connection through
  :class:`nh_serve.client.Client` (encoding, HTTP, server, decoding) for a
  registered session of 100 and 300 units with a 1 s context, base64 vs JSON;
* the first request of a new session (reference + context in one ``/predict``), and ``/register`` alone;
* load: ``--clients`` concurrent clients (asyncio + httpx in a separate
  process, each with its own session and connection, loopback only) for
  ``--duration`` seconds: status counts, throughput, p50/p99 latency, and the
  server's resident memory (server + worker) before and after;
* throughput under the same load with 1 or 2 request threads and 1 or 2 torch threads;
* whether batching windows helps on this machine: in-process ``Predictor.predict``
  vs ``predict_batch`` per window (what BentoML's adaptive batching could gain at best).

The machine's load average is recorded with the figures: on a shared machine
latencies are noisy. Results go to the ``service`` section of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from nh_serve.core.config import get_config
from nh_serve.core.model import NeuroHorizon
from nh_serve.data.features import FeatureNorm
from nh_serve.data.synth import make_session
from nh_serve.errors import InputError
from nh_serve.evaluation.reporting import machine_line, markdown_table, write_doc_section
from nh_serve.inference.model_io import default_checkpoint_path, save_model
from nh_serve.inference.predictor import Predictor
from nh_serve.util import help_text
from service.launcher import ServeProcess, bentoml_env

DOC = Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md"


# ----------------------------------------------------------------------------- data


def _recording(n_units: int, *, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(times s, unit ids str) of a 75 s synthetic recording with ``n_units`` units."""
    d = make_session(seed=seed, n_units=n_units, duration=75.0)
    return d["spike_times"], d["unit_ids"][d["unit_index"]]


def _window(rec, start: float, length: float = 1.0):
    t, ids = rec
    m = (t >= start) & (t < start + length)
    return t[m], ids[m]


def _stats_ms(seconds) -> dict[str, float]:
    a = np.asarray(seconds, dtype=np.float64) * 1e3
    return {
        "p50 ms": float(np.percentile(a, 50)),
        "p90 ms": float(np.percentile(a, 90)),
        "p99 ms": float(np.percentile(a, 99)),
        "mean ms": float(a.mean()),
    }


def _loadavg() -> str:
    try:
        return " / ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


# ----------------------------------------------------------------------------- measurements


def _model_seconds(url: str) -> tuple[float, float]:
    """(sum of seconds, count) of the server's ``nh_serve_prediction_seconds{endpoint="predict"}``."""
    import httpx

    total = count = 0.0
    for line in httpx.get(f"{url}/metrics", timeout=10).text.splitlines():
        if line.startswith('nh_serve_prediction_seconds_sum{endpoint="predict"}'):
            total = float(line.rsplit(" ", 1)[1])
        elif line.startswith('nh_serve_prediction_seconds_count{endpoint="predict"}'):
            count = float(line.rsplit(" ", 1)[1])
    return total, count


def single_client(url: str, recs: dict[int, tuple], *, requests: int, warmup: int) -> list[dict]:
    """Latency of predictions of a registered session through one keep-alive Client.

    ``server model ms`` is the mean model time inside the server (from its metrics), the rest
    of the latency is HTTP, JSON, encoding and thread hand-offs on both sides.
    """
    from nh_serve.client import Client  # needs httpx, an optional dependency (nh-serve[serve])

    rows = []
    for n_units, rec in recs.items():
        ref = rec[0] < 60.0
        starts = 60.0 + (np.arange(requests + warmup) % 14)  # windows inside [60, 75) s
        for encoding in ("base64", "json"):
            with Client(url, encoding=encoding, timeout=30.0) as c:
                token = c.register(rec[0][ref], rec[1][ref], reference_window=(0.0, 60.0))
                times = []
                for i, s in enumerate(starts):
                    if i == warmup:
                        m0 = _model_seconds(url)
                    ct, cids = _window(rec, float(s))
                    t0 = time.perf_counter()
                    c.predict(token, ct, cids, context_start=float(s))
                    if i >= warmup:
                        times.append(time.perf_counter() - t0)
                m1 = _model_seconds(url)
            spikes = int(np.mean([_window(rec, float(s))[0].size for s in starts[:14]]))
            rows.append(
                {
                    "units": n_units,
                    "encoding": encoding,
                    "context spikes": spikes,
                    "requests": len(times),
                    **_stats_ms(times),
                    "server model ms": (m1[0] - m0[0]) / max(m1[1] - m0[1], 1) * 1e3,
                    "load avg 1 min": os.getloadavg()[0],
                }
            )
    return rows


def first_requests(url: str, recs: dict[int, tuple], *, repeats: int) -> list[dict]:
    """A new session's first /predict (reference + context in one body) and /register alone."""
    import httpx

    from nh_serve.client.wire import encode_spikes  # the client package needs httpx (nh-serve[serve])

    rows = []
    with httpx.Client(base_url=url, timeout=60.0) as http:
        for n_units, rec in recs.items():
            ref = rec[0] < 60.0
            for encoding in ("base64", "json"):
                reference = encode_spikes(rec[0][ref], rec[1][ref], binary=encoding == "base64")
                context = encode_spikes(*_window(rec, 61.0), binary=encoding == "base64")
                reg_body = json.dumps(
                    {"reference": reference, "reference_start": 0.0, "reference_end": 60.0}
                ).encode()
                pred_body = json.dumps(
                    {
                        "reference": reference,
                        "reference_start": 0.0,
                        "reference_end": 60.0,
                        "context": context,
                        "context_start": 61.0,
                        "encoding": encoding,
                    }
                ).encode()
                for name, path, body in (
                    ("first /predict (with reference)", "/predict", pred_body),
                    ("/register", "/register", reg_body),
                ):
                    times = []
                    for _ in range(repeats):
                        t0 = time.perf_counter()
                        r = http.post(path, content=body, headers={"content-type": "application/json"})
                        times.append(time.perf_counter() - t0)
                        if r.status_code != 200:
                            raise InputError(f"{path} answered {r.status_code}: {r.text[:300]}")
                    st = _stats_ms(times)
                    rows.append(
                        {
                            "request": name,
                            "units": n_units,
                            "encoding": encoding,
                            "reference spikes": int(ref.sum()),
                            "body KB": round(len(body) / 1024, 1),
                            "p50 ms": st["p50 ms"],
                            "max ms": float(np.max(times) * 1e3),
                        }
                    )
    return rows


def batching_gain(checkpoint: str, rec, *, runs: int, rounds: int = 3) -> list[dict]:
    """Per-window model time of predict() vs predict_batch() in this process (1 torch thread, like the server).

    The cost is this process's CPU time (``time.process_time``), which other jobs on a shared
    machine do not inflate the way they inflate wall time; each batch size is timed in ``rounds``
    interleaved rounds and the cheapest round kept.
    """
    import torch

    torch.set_num_threads(1)
    p = Predictor.load(checkpoint)
    ref = rec[0] < 60.0
    token = p.register(rec[0][ref], rec[1][ref], reference_window=(0.0, 60.0))
    windows = [
        dict(zip(("spike_times", "unit_ids"), _window(rec, 60.0 + i % 14)), context_start=60.0 + i % 14)
        for i in range(32)
    ]
    sizes = (1, 4, 8, 32)
    for b in sizes:  # warm-up
        p.predict_batch(token, windows[:b])
    best = dict.fromkeys(sizes, float("inf"))
    for _ in range(rounds):
        for b in sizes:
            n = max(1, runs // b)
            t0 = time.process_time()
            for i in range(n):
                if b == 1:
                    p.predict(token, **windows[i % 32])
                else:
                    p.predict_batch(token, windows[:b])
            best[b] = min(best[b], (time.process_time() - t0) / (n * b))
    return [{"batch": b, "CPU ms per window": best[b] * 1e3, "speed-up": best[1] / best[b]} for b in sizes]


def run_load(url: str, *, clients: int, duration_s: float, n_units: int, timeout_s: float = 30.0) -> dict:
    """Run the load clients in a separate process (so they do not share this process's GIL)."""
    cmd = [
        sys.executable,
        "-m",
        "service.bench",
        "--load-client",
        url,
        str(clients),
        str(duration_s),
        str(n_units),
    ]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=duration_s + 300)
    if r.returncode != 0:
        raise RuntimeError(f"load client failed ({r.returncode}):\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


async def _load_clients(url: str, clients: int, duration_s: float, n_units: int) -> dict:
    """``clients`` asyncio clients, each registering its own session and predicting in a loop."""
    import httpx

    from nh_serve.client.wire import encode_spikes  # the client package needs httpx (nh-serve[serve])

    rec = _recording(n_units, seed=1)
    ref = rec[0] < 60.0
    reg = json.dumps(
        {"reference": encode_spikes(rec[0][ref], rec[1][ref]), "reference_start": 0.0, "reference_end": 60.0}
    )
    ctx = [(60.0 + i, encode_spikes(*_window(rec, 60.0 + i))) for i in range(14)]
    headers = {"content-type": "application/json"}
    lat: list[float] = []
    status: dict[str, int] = {}
    errors: list[str] = []

    async def one(i: int, start_at: float, stop_at: float) -> None:
        limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)
        async with httpx.AsyncClient(base_url=url, timeout=60.0, limits=limits) as c:
            r = await c.post("/register", content=reg, headers=headers)
            if r.status_code != 200:
                errors.append(f"register {r.status_code}: {r.text[:200]}")
                return
            token = r.json()["token"]
            bodies = [
                json.dumps({"token": token, "context": w, "context_start": s, "encoding": "base64"}).encode()
                for s, w in ctx
            ]
            while time.monotonic() < start_at:  # all clients registered: start together
                await asyncio.sleep(0.01)
            k = i
            while time.monotonic() < stop_at:
                t0 = time.perf_counter()
                try:
                    r = await c.post("/predict", content=bodies[k % len(bodies)], headers=headers)
                    code = str(r.status_code)
                except httpx.HTTPError as e:
                    code = type(e).__name__
                t1 = time.perf_counter()
                status[code] = status.get(code, 0) + 1
                if code == "200" and time.monotonic() <= stop_at:
                    lat.append(t1 - t0)
                k += 1

    t_reg = time.monotonic()
    start_at = t_reg + 5.0 + 0.25 * clients  # time for every client to register first
    stop_at = start_at + duration_s
    await asyncio.gather(*(one(i, start_at, stop_at) for i in range(clients)))
    done = sum(status.values())
    return {
        "clients": clients,
        "duration_s": duration_s,
        "requests": done,
        "status": status,
        "errors": errors[:5],
        "throughput_rps": len(lat) / duration_s,
        **(_stats_ms(lat) if lat else {}),
    }


# ----------------------------------------------------------------------------- driver


def _checkpoint(spec: str | None, tmp: Path) -> tuple[str, str]:
    """(path, description) of the checkpoint to serve; a random-weight nh-small when there is none."""
    if spec not in (None, "default"):
        return str(spec), f"`{spec}`"
    if default_checkpoint_path().is_file():
        return str(default_checkpoint_path()), "the built-in default checkpoint"
    import torch

    torch.manual_seed(0)
    path = tmp / "nh-small-random.safetensors"
    model = NeuroHorizon(get_config("nh-small"))
    save_model(path, model, feature_norm=FeatureNorm.identity(model.cfg.n_features))
    return (
        str(path),
        "nh-small with random weights (the default checkpoint is not installed yet; same architecture and cost)",
    )


def run(
    *,
    checkpoint: str | None = None,
    clients: int = 32,
    duration_s: float = 60.0,
    requests: int = 300,
    warmup: int = 30,
    units: tuple[int, ...] = (100, 300),
    load_units: int = 100,
    compare_s: float = 20.0,
    write: bool = True,
    server_env: dict[str, str] | None = None,
) -> str:
    """Run every measurement; return the Markdown section (and write it into docs/benchmarks.md)."""

    load_before = _loadavg()
    with tempfile.TemporaryDirectory(prefix="nh-serve-bench-") as tmp_s:
        tmp = Path(tmp_s)
        ckpt, ckpt_desc = _checkpoint(checkpoint, tmp)
        recs = {u: _recording(u) for u in units}
        print(f"batching in-process ({load_units} units) ...", flush=True)
        batch_rows = batching_gain(ckpt, _recording(load_units), runs=60)
        env = bentoml_env(
            tmp / "bentoml",
            NH_SERVE_CHECKPOINT=ckpt,
            NH_SERVE_CACHE_DIR=str(tmp / "export-cache"),
            **(server_env or {}),
        )
        with ServeProcess(env=env, log_path=tmp / "serve.log") as server:
            server.wait_ready(120)
            import httpx

            info = httpx.get(f"{server.url}/model", timeout=10).json()
            print(f"server {server.url}: {info['name']} {info['hash']} backend {info['backend']}", flush=True)
            print("single client ...", flush=True)
            lat_rows = single_client(server.url, recs, requests=requests, warmup=warmup)
            print("first requests ...", flush=True)
            first_rows = first_requests(server.url, recs, repeats=5)
            rss_start = server.rss_bytes()
            print(f"load: {clients} clients x {duration_s:g} s ...", flush=True)
            load = run_load(server.url, clients=clients, duration_s=duration_s, n_units=load_units)
            rss_end = server.rss_bytes()
            sessions = httpx.get(f"{server.url}/model", timeout=10).json()["sessions"]
            alive = httpx.get(f"{server.url}/readyz", timeout=10).status_code == 200
        thread_rows = []
        for threads, torch_threads in ((1, 1), (2, 1), (1, 2)) if compare_s > 0 else ():
            print(f"load with {threads} request thread(s) x {torch_threads} torch thread(s) ...", flush=True)
            env_t = {**env, "NH_SERVE_THREADS": str(threads), "NH_SERVE_TORCH_THREADS": str(torch_threads)}
            with ServeProcess(env=env_t, log_path=tmp / f"serve-{threads}-{torch_threads}.log") as server_t:
                server_t.wait_ready(120)
                r = run_load(server_t.url, clients=clients, duration_s=compare_s, n_units=load_units)
            thread_rows.append(
                {
                    "request threads": threads,
                    "torch threads": torch_threads,
                    "seconds": compare_s,
                    "requests/s": r["throughput_rps"],
                    "p50 ms": r.get("p50 ms", float("nan")),
                    "p99 ms": r.get("p99 ms", float("nan")),
                    "statuses": json.dumps(r["status"]),
                    "load average": _loadavg(),
                }
            )
    load_after = _loadavg()

    n5xx = sum(n for code, n in load["status"].items() if code.isdigit() and int(code) >= 500)
    n_err = sum(n for code, n in load["status"].items() if not code.isdigit())
    p99_100 = next((r["p99 ms"] for r in lat_rows if r["units"] == 100 and r["encoding"] == "base64"), None)
    load_row = {
        "clients": clients,
        "seconds": duration_s,
        "requests": load["requests"],
        "requests/s": load["throughput_rps"],
        "p50 ms": load.get("p50 ms", float("nan")),
        "p99 ms": load.get("p99 ms", float("nan")),
        "5xx": n5xx,
        "transport errors": n_err,
        "server RSS start MB": rss_start / 2**20,
        "server RSS end MB": rss_end / 2**20,
    }
    limits = info["limits"]
    md = [
        "## HTTP service (`nh-serve bench service`)",
        "",
        machine_line(("nh-serve", "torch", "numpy", "bentoml")),
        f"- Load average (1/5/15 min) before: {load_before}; after: {load_after}. The machine was shared with other "
        "jobs: latencies are noisy, rerun on a quiet machine for final numbers.",
        f"- Model: {info['name']} `{info['hash']}`, backend `{info['backend']}`: {ckpt_desc}.",
        f"- Server: one worker, {limits['threads']} request thread(s), {limits['torch_threads']} torch thread(s); "
        "127.0.0.1, keep-alive connections; client and server on the same 2 cores.",
        "",
        "### Single client, registered session, 1 s context (Client: encode + HTTP + server + decode)",
        "",
        markdown_table(lat_rows),
        "",
        f"Target p99 < 20 ms at 100 units (base64): **{'met' if p99_100 is not None and p99_100 < 20 else 'not met'}** "
        f"({p99_100:.1f} ms)."
        if p99_100 is not None
        else "",
        "",
        "### First request of a new session, and /register alone (60 s reference)",
        "",
        markdown_table(first_rows),
        "",
        f"### Load: {clients} concurrent clients for {duration_s:g} s ({load_units} units each, base64)",
        "",
        markdown_table([load_row]),
        "",
        f"Status counts: {json.dumps(load['status'])}; sessions after the run: {sessions}; server still ready: {alive}. "
        f"Memory grew from {rss_start / 2**20:.0f} to {rss_end / 2**20:.0f} MB over the run: the session cache (at most "
        f"{limits['max_sessions']} sessions, {limits.get('max_sessions_per_client', '-')} per client) plus what the "
        "allocator keeps of the requests' working memory, which levels off rather than growing with the request count "
        "but is not bounded by the session cache alone; the worker's peak under the largest requests the limits allow "
        "is in the Reliability section.",
        "",
        f"### Request threads vs torch threads under load ({clients} clients, {load_units} units)",
        "",
        markdown_table(thread_rows) if thread_rows else "(not measured)",
        "",
        "One worker process holds the sessions; concurrency comes from request threads (torch releases the GIL). "
        "The service defaults to one request thread per core with one torch thread each (`NH_SERVE_THREADS`, "
        "`NH_SERVE_TORCH_THREADS`).",
        "",
        f"### Does batching windows help on this machine? (in-process CPU time, {load_units} units, 1 torch thread)",
        "",
        markdown_table(batch_rows),
        "",
        _batching_note(batch_rows),
    ]
    text = "\n".join(md)
    if write:
        write_doc_section(DOC, "service", text)
        print(f"wrote the service section of {DOC}")
    return text


def _batching_note(rows: list[dict]) -> str:
    best = max(rows, key=lambda r: r["speed-up"])
    if best["speed-up"] < 1.2:
        return (
            "A batch of windows costs about as much CPU per window as single windows on this machine, so "
            "BentoML's adaptive batching (which also adds queueing delay) cannot help here and the service does "
            "not use it; `/predict_batch` serves offline scoring of many windows in one request."
        )
    return (
        f"Batches of {best['batch']} windows of one session cost {best['speed-up']:.2f}x less CPU per window than "
        "single windows (larger batches lose it to padding). Concurrent clients mostly send windows of different "
        "sessions, and the Predictor batches one session at a time, so BentoML's adaptive batching (which also adds "
        "queueing delay) is not used: `/predict_batch` gives this gain to a client with many windows of one session. "
        "A multi-session batch in the Predictor would let adaptive batching raise throughput under load."
    )


def add_cli(bench_subparsers) -> None:
    """Register ``service`` under ``nh-serve bench``."""
    p = bench_subparsers.add_parser(
        "service",
        help="end-to-end HTTP latency and load of the BentoML service",
        description=help_text(__doc__),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--checkpoint", default=None, help="checkpoint or artifact to serve (default: the built-in one)"
    )
    p.add_argument("--clients", type=int, default=32, help="concurrent clients of the load test (default 32)")
    p.add_argument("--duration", type=float, default=60.0, help="seconds of the load test (default 60)")
    p.add_argument(
        "--requests", type=int, default=300, help="timed single-client requests per case (default 300)"
    )
    p.add_argument("--units", type=int, nargs="+", default=[100, 300], help="unit counts (default 100 300)")
    p.add_argument(
        "--compare-duration",
        type=float,
        default=20.0,
        help="seconds of each load run comparing request/torch thread settings (0 = skip; default 20)",
    )
    p.add_argument(
        "--no-write", action="store_true", help="print the table only; leave docs/benchmarks.md alone"
    )
    p.set_defaults(func=_main)


def _main(args) -> int:
    if args.clients < 1 or args.clients > 256:
        raise InputError(f"--clients: must be 1..256, got {args.clients}")
    if not 1 <= args.duration <= 600:
        raise InputError(f"--duration: must be 1..600 seconds, got {args.duration}")
    if not 0 <= args.compare_duration <= 600:
        raise InputError(f"--compare-duration: must be 0..600 seconds, got {args.compare_duration}")
    text = run(
        checkpoint=args.checkpoint,
        clients=args.clients,
        duration_s=args.duration,
        requests=args.requests,
        units=tuple(args.units),
        compare_s=args.compare_duration,
        write=not args.no_write,
    )
    print(text)
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 6 and sys.argv[1] == "--load-client":
        _, _, url, n, dur, units = sys.argv
        print(json.dumps(asyncio.run(_load_clients(url, int(n), float(dur), int(units)))))
    else:
        ap = argparse.ArgumentParser(prog="python -m service.bench")
        add_cli(ap.add_subparsers(dest="bench"))
        ns = ap.parse_args(["service", *sys.argv[1:]])
        sys.exit(ns.func(ns))

"""Stream a recording through a running nh-serve server, window by window, and plot predicted vs actual rates.

Start a server first (``bash scripts/serve.sh``), then::

    .venv/bin/python examples/stream_predictions.py                     # the demo recording (made if missing)
    .venv/bin/python examples/stream_predictions.py --session my.h5 --url http://127.0.0.1:3000
    .venv/bin/python examples/stream_predictions.py --session my.h5 --windows 1800 --refit-every 60  # long, drifting

The first 60 s of the recording register the session (one request); then one
context window per second goes to ``/predict``, as a closed-loop tool would
send it, with the spike counts of the 30 s before each window. The predicted
rates of the next second are stitched together and plotted against the
observed rates (and the true rates of a synthetic recording) for a few units;
the script prints bits/spike of the predictions and of the baselines, and the
request latency.

Switching to local inference is one line: replace ``Client(args.url)`` with
``Predictor.load()``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from nh_serve.client import Client  # noqa: E402
from nh_serve.data.session import open_session  # noqa: E402
from nh_serve.data.synth import make_demo  # noqa: E402
from nh_serve.evaluation.metrics import evaluate  # noqa: E402
from nh_serve.evaluation.sliding import collect_targets, oracle_rates, plan_windows  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--url", default="http://127.0.0.1:3000", help="the server (default %(default)s)")
    ap.add_argument(
        "--session", default=None, help="session file (default: demo/demo.h5, written if missing)"
    )
    ap.add_argument(
        "--reference-s", type=float, default=60.0, help="reference window length, seconds (default 60)"
    )
    ap.add_argument(
        "--windows", type=int, default=120, help="context windows to stream, one per second (default 120)"
    )
    ap.add_argument("--units", type=int, default=4, help="units to plot (default 4, the most active)")
    ap.add_argument("--out", default="demo/stream_predictions.png", help="PNG to write (default %(default)s)")
    ap.add_argument(
        "--json", action="store_true", help="send JSON lists instead of the compact base64 encoding"
    )
    ap.add_argument(
        "--refit-every", type=float, default=None, metavar="S",
        help="refit the session every S seconds of the stream on its last 3 minutes (refit_every_s; off by "
        "default; worth it for recordings that drift over minutes, see docs/model-card.md)",
    )
    args = ap.parse_args(argv)

    path = Path(args.session) if args.session else Path("demo") / "demo.h5"
    if args.session is None and not path.exists():
        print(f"writing the demo recording to {path}")
        path = make_demo(path.parent)

    client = Client(args.url, encoding="json" if args.json else "base64")
    client.wait_ready(60)
    info = client.info()
    cfg = info["config"]
    print(f"server {args.url}: model {info['name']} ({info['hash']}), backend {info.get('backend')}")

    with open_session(path) as s:
        plan = plan_windows(
            start=s.start,
            end=s.end,
            reference=(s.start, s.start + args.reference_s),
            context_s=cfg["context_s"],
            n_bins=cfg["n_bins"],
            bin_size=cfg["bin_size_s"],
            stride_s=1.0,
            max_windows=args.windows,
            name=str(path),
        )
        r0, r1 = plan.reference
        ref_t, ref_u = s.spikes(r0, r1)
        t0 = time.perf_counter()
        token = client.register(ref_t, s.unit_ids[ref_u], reference_window=(r0, r1), units=s.unit_ids,
                                refit_every_s=args.refit_every)
        print(
            f"{path}: {s.n_units} units; registered [{r0:g}, {r1:g}) s ({ref_t.size} spikes) in "
            f"{(time.perf_counter() - t0) * 1e3:.0f} ms; streaming {len(plan)} windows"
        )

        U, W, T = s.n_units, len(plan), plan.n_bins
        pred = np.zeros((W, U, T), dtype=np.float32)  # expected counts per bin
        latency = []
        for i, c in enumerate(tqdm(plan.ctx_starts, desc="windows")):
            c = float(c)
            ct, cu = s.spikes(c, c + plan.context_s)
            extra = {}
            if not cfg.get("history_taus"):  # a count-history model takes the spikes before the context;
                h0 = max(float(s.start), c - cfg["history_s"])  # a history model keeps the stream per session
                ht, hu = s.spikes(h0, c)
                extra.update(history_counts=np.bincount(hu, minlength=U), history_duration_s=max(c - h0, 1e-3))
            if cfg.get("behavior_dim", 0) and s.behavior_dim == cfg["behavior_dim"]:
                extra["behavior"] = s.behavior(c, c + plan.context_s)
            if cfg.get("image_dim", 0) and s.image_dim == cfg["image_dim"]:
                # images shown in the context and those scheduled in the forecast window
                horizon = cfg["n_bins"] * cfg["bin_size_s"]
                extra["images"] = s.image_events(c, c + plan.context_s + horizon)
                extra["image_schedule_s"] = horizon  # the recording's schedule is complete
            t_req = time.perf_counter()
            p = client.predict(
                token,
                ct,
                s.unit_ids[cu],
                context_start=c,
                **extra,
            )
            latency.append(time.perf_counter() - t_req)
            pred[i] = p.expected_counts

        targets = collect_targets(s, plan, progress=False)
        oracle = oracle_rates(s, plan)
        rows = {"nh-serve": evaluate(pred, targets.counts, bin_size=plan.bin_size)}
        rows.update(
            {k: evaluate(v, targets.counts, bin_size=plan.bin_size) for k, v in targets.baselines.items()}
        )
        if oracle is not None:
            rows["true rates"] = evaluate(oracle, targets.counts, bin_size=plan.bin_size)
        lat = np.asarray(latency) * 1e3
        print(f"latency per window: p50 {np.median(lat):.1f} ms, p99 {np.percentile(lat, 99):.1f} ms")
        for name, m in rows.items():
            print(f"  {name:<16} bits/spike {m['bits_per_spike']:+.4f}  corr {m['correlation']:.3f}")

        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        _plot(plan, pred, targets.counts, oracle, s.unit_ids, n_plot=args.units, out=args.out)
    print(f"wrote {args.out}")
    client.close()
    return 0


def _plot(plan, pred, counts, oracle, unit_ids, *, n_plot: int, out: str) -> None:
    """Predicted vs observed (100 ms smoothed) vs true rates (Hz) of the most active units over time."""
    W, U, T = pred.shape
    t = (plan.t_now[:, None] + plan.bin_size * (np.arange(T) + 0.5)[None, :]).ravel()  # bin centres, s
    to_hz = 1.0 / plan.bin_size
    pred_hz = pred.transpose(1, 0, 2).reshape(U, -1) * to_hz  # (U, W*T)
    obs_hz = counts.transpose(1, 0, 2).reshape(U, -1) * to_hz
    k = max(1, int(round(0.1 / plan.bin_size)))
    obs_smooth = np.apply_along_axis(lambda x: np.convolve(x, np.ones(k) / k, mode="same"), 1, obs_hz)
    units = np.argsort(-counts.sum(axis=(0, 2)))[: min(n_plot, U)]
    fig, axes = plt.subplots(len(units), 1, figsize=(11, 2.2 * len(units)), sharex=True, squeeze=False)
    for ax, u in zip(axes[:, 0], units):
        ax.plot(t, obs_smooth[u], color="0.6", lw=0.8, label="observed (100 ms smoothing)")
        if oracle is not None:
            ax.plot(
                t,
                oracle.transpose(1, 0, 2).reshape(U, -1)[u] * to_hz,
                color="tab:green",
                lw=1,
                ls="--",
                label="true rate",
            )
        ax.plot(t, pred_hz[u], color="tab:blue", lw=1.2, label="predicted")
        ax.set_ylabel(f"{unit_ids[u]}\nHz")
    axes[0, 0].legend(loc="upper right", fontsize=8, ncol=3)
    axes[-1, 0].set_xlabel("time (s)")
    fig.suptitle("nh-serve: next-second firing rates predicted window by window")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())

# Over 500 lines: the recording's figures and the one HTML page that holds them, read top to bottom.
"""Plots of a scored recording and the one-page ``report.html``.

Figures are drawn with matplotlib's object-oriented API on an Agg canvas (no
display, no global backend switch) and returned as PNG bytes:

- ``heatmap.png``: observed vs predicted rate (Hz) of the most active units over
  about 20 s from the middle of the scored windows (the title gives the times).
  With the default 1 s stride the 1 s horizons of consecutive windows tile time,
  so the predicted panel is the model's next-second forecast stitched window
  after window; with another stride each window contributes its first ``stride``
  seconds of bins. Every heatmap of every recording uses one fixed colour scale
  (:data:`HEATMAP_MAX_HZ`, square root), so colours compare across recordings,
  runs and shards (each recording's plots are drawn when it is scored, before the
  others are known, so a scale fitted to all of them is not possible).
- ``bands.png``: bits/spike of the model, the baselines (and the oracle) in each
  horizon band, and per 20 ms horizon bin.
- ``units.png``: the distribution of per-unit bits/spike of every predictor
  (units with spikes in the scored horizons), and model vs best baseline per unit,
  where a point's size grows with the unit's spike count (a legend gives the scale).

``report.html`` (:func:`write_report_html`) is self-contained HTML with inline
CSS and no scripts; it links the PNGs by relative path, so the output folder
can be moved or copied as a whole and opened offline.
"""

from __future__ import annotations

import html
import io

import numpy as np

from nh_serve.util import atomic_write

COLORS = {
    "model": "#d62728",
    "reference_rate": "#7f7f7f",
    "persistence": "#1f77b4",
    "exp_smooth": "#2ca02c",
    "oracle": "#111111",
}
HEATMAP_UNITS = 60  # most units in the heatmap
SMOOTH_BINS = 5  # boxcar over observed counts in the heatmap (5 x 20 ms = 100 ms)
HEATMAP_MAX_HZ = 40.0  # top of the heatmaps' colour scale, the same for every recording; brighter is clipped
HEATMAP_GAMMA = 0.5  # square-root colour scale: low rates stay visible next to bursts


def _figure(w: float, h: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(w, h), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None})
    return buf.getvalue()


def _color(name: str) -> str:
    return COLORS.get(name, "#9467bd")


def heatmap_figure(record: dict, sample: dict):
    """Observed (top) and predicted (bottom) rates, units x time, for the sample stretch."""
    pred, obs = sample["pred"], sample["obs"]  # (n, U, T) expected / observed counts per bin
    oracle = sample.get("oracle")  # (n, U, T) true expected counts, synthetic recordings only
    bs, stride = sample["bin_size_s"], sample["stride_s"]
    n, U, T = pred.shape
    k = int(min(T, max(1, round(stride / bs))))  # bins each window contributes
    ref = np.asarray(record["units"]["ref_rate_hz"])
    order = np.argsort(-(obs.sum(axis=(0, 2)) + pred.sum(axis=(0, 2)) + 1e-9 * ref), kind="stable")[
        :HEATMAP_UNITS
    ]

    def timeline(a: np.ndarray) -> np.ndarray:  # (n, U, T) counts -> (units, time) Hz
        return a[:, order, :k].transpose(1, 0, 2).reshape(len(order), n * k) / bs

    p, o = timeline(pred), timeline(obs)
    if SMOOTH_BINS > 1 and o.shape[1] >= SMOOTH_BINS:
        kernel = np.ones(SMOOTH_BINS) / SMOOTH_BINS
        o = np.apply_along_axis(lambda r: np.convolve(r, kernel, mode="same"), 1, o)
    t0 = float(sample["t_now"][0])
    t1 = float(sample["t_now"][-1]) + k * bs
    w = record["windows"]
    s0, s1 = float(w["first_prediction_s"]), float(w["last_prediction_s"]) + T * bs
    from matplotlib.colors import PowerNorm

    panels = [
        (o, f"observed ({SMOOTH_BINS * bs * 1000:g} ms boxcar)"),
        (p, f"model prediction (each window's first {k * bs:g} s)"),
    ]
    if oracle is not None:
        panels.append((timeline(oracle), "true rate (synthetic ground truth)"))
    fig = _figure(10, 0.6 + 2.8 * len(panels))
    axes = fig.subplots(len(panels), 1, sharex=True)
    norm = PowerNorm(HEATMAP_GAMMA, vmin=0.0, vmax=HEATMAP_MAX_HZ)
    gap = " (gaps between windows)" if stride > T * bs + 1e-9 else ""
    for ax, (data, title) in zip(axes, panels):
        im = ax.imshow(
            data,
            aspect="auto",
            origin="upper",
            cmap="magma",
            norm=norm,
            extent=(t0, t1, len(order), 0),
            interpolation="nearest",
        )
        ax.set_title(title, fontsize=10, loc="left")
        ax.set_ylabel("unit (by activity)")
    axes[-1].set_xlabel("prediction time (s)" + gap)
    clipped = max(float(p.max(initial=0.0)), float(o.max(initial=0.0))) > HEATMAP_MAX_HZ
    fig.colorbar(
        im,
        ax=axes,
        label=f"rate (Hz; square-root scale, 0-{HEATMAP_MAX_HZ:g} Hz in every recording)",
        shrink=0.9,
        extend="max" if clipped else "neither",
    )
    fig.suptitle(
        f"{record['name']}: observed vs predicted rate, {len(order)} most active of {U} units\n"
        f"time slice shown: prediction times {t0:.1f}-{t1:.1f} s (the middle of the scored {s0:.1f}-{s1:.1f} s)",
        fontsize=11,
    )
    return fig


def heatmap_png(record: dict, sample: dict) -> bytes:
    return _png(heatmap_figure(record, sample))


def bands_png(record: dict) -> bytes:
    """Bits/spike per horizon band (bars) and per horizon bin (lines) of every predictor."""
    preds = record["predictors"]
    names = list(preds)
    bands = list(preds[names[0]]["per_band"])
    bs = record["windows"]["bin_size_s"]
    fig = _figure(11, 4.2)
    ax1, ax2 = fig.subplots(1, 2, width_ratios=(1, 1.4))
    width = 0.8 / len(names)
    x = np.arange(len(bands))
    for i, n in enumerate(names):
        vals = [preds[n]["per_band"][b]["bits_per_spike"] for b in bands]
        ax1.bar(x + (i - (len(names) - 1) / 2) * width, vals, width, label=n, color=_color(n))
    ax1.axhline(0, color="k", lw=0.6)
    ax1.set_xticks(x, bands)
    ax1.set_xlabel("horizon band after the prediction time")
    ax1.set_ylabel("bits/spike")
    ax1.set_title("by horizon band", fontsize=10, loc="left")
    lag_ms = (np.arange(len(preds[names[0]]["per_bin"]["bits_per_spike"])) + 0.5) * bs * 1000
    for n in names:
        ax2.plot(
            lag_ms,
            preds[n]["per_bin"]["bits_per_spike"],
            color=_color(n),
            lw=1.4 if n == "model" else 1.0,
            label=n,
        )
    ax2.axhline(0, color="k", lw=0.6)
    ax2.set_xlabel("horizon bin centre (ms after the prediction time)")
    ax2.set_ylabel("bits/spike")
    ax2.set_title(f"per {bs * 1000:g} ms bin", fontsize=10, loc="left")
    ax2.legend(fontsize=8, frameon=False)
    fig.suptitle(f"{record['name']}: bits/spike over the horizon", fontsize=11)
    return _png(fig)


def spike_marker_size(n_spikes) -> np.ndarray:
    """Marker area (points^2) of a unit with ``n_spikes`` spikes: the diameter grows by the same
    step for every tenfold more spikes (2.5 pt at 1 spike, 6 at 10, 9.5 at 100, 13 at 1000, ...)."""
    return (2.5 + 3.5 * np.log10(np.maximum(np.asarray(n_spikes, dtype=np.float64), 1.0))) ** 2


def _size_legend(ax, n_spikes: np.ndarray) -> None:
    """A legend of marker sizes for the powers of ten that span ``n_spikes``."""
    lo = int(np.floor(np.log10(max(float(n_spikes.min()), 1.0))))
    hi = int(np.ceil(np.log10(max(float(n_spikes.max()), 1.0))))
    steps = list(range(lo, hi + 1))
    steps = steps[:: int(np.ceil(len(steps) / 4))]  # at most 4, evenly spaced
    for e in steps:
        ax.scatter(
            [],
            [],
            s=spike_marker_size(10**e),
            color=_color("model"),
            alpha=0.6,
            edgecolors="white",
            linewidths=0.5,
            label=f"{10**e:,}",
        )
    ax.legend(
        title="spikes scored\n(point size)",
        fontsize=8,
        title_fontsize=8,
        frameon=False,
        loc="upper left",
        bbox_to_anchor=(1.01, 1.0),
        labelspacing=1.2,
        borderpad=0.8,
    )


def units_figure(record: dict):
    """Per-unit bits/spike of every predictor (box + points) and model vs best baseline (scatter,
    point size by the unit's spike count in the scored horizons, with a size legend)."""
    preds = record["predictors"]
    names = list(preds)
    n_spk = np.asarray(record["units"]["n_spikes"])
    active = n_spk > 0
    vals = {n: np.asarray(preds[n]["per_unit"]["bits_per_spike"])[active] for n in names}
    fig = _figure(11, 4.4)
    ax1, ax2 = fig.subplots(1, 2)
    allv = np.concatenate(list(vals.values())) if active.any() else np.zeros(1)
    lo, hi = np.percentile(allv, [2, 98]) if allv.size else (0.0, 0.0)
    pad = 0.1 * max(hi - lo, 1e-3)
    lo, hi = lo - pad, hi + pad
    rng = np.random.default_rng(0)
    for i, n in enumerate(names):
        v = vals[n]
        if v.size:
            ax1.boxplot(
                [np.clip(v, lo, hi)], positions=[i], widths=0.5, showfliers=False, medianprops={"color": "k"}
            )
            ax1.scatter(
                i + rng.uniform(-0.18, 0.18, v.size), np.clip(v, lo, hi), s=6, alpha=0.5, color=_color(n)
            )
    ax1.axhline(0, color="k", lw=0.6)
    ax1.set_xticks(range(len(names)), names, rotation=15)
    ax1.set_ylim(lo, hi)
    ax1.set_ylabel("bits/spike per unit")
    n_out = int(((allv < lo) | (allv > hi)).sum()) if allv.size else 0
    ax1.set_title(
        f"{int(active.sum())} units with spikes, one point each"
        + (f"\n({n_out} values clipped to the 2-98% range)" if n_out else ""),
        fontsize=10,
        loc="left",
    )
    best = record["best_baseline"]
    m, b = vals["model"], vals[best]
    if m.size:
        lo, hi = np.percentile(np.concatenate([m, b]), [1, 99])
        pad = 0.1 * max(hi - lo, 1e-3)
        lo, hi = lo - pad, hi + pad
        size = spike_marker_size(n_spk[active])
        ax2.scatter(
            np.clip(b, lo, hi),
            np.clip(m, lo, hi),
            s=size,
            alpha=0.6,
            color=_color("model"),
            edgecolors="white",
            linewidths=0.5,
        )
        _size_legend(ax2, n_spk[active])
        ax2.plot([lo, hi], [lo, hi], color="k", lw=0.6)
        ax2.set_xlim(lo, hi)
        ax2.set_ylim(lo, hi)
        frac = float(np.mean(m > b))
        ax2.set_title(f"model beats {best} on {frac:.0%} of units", fontsize=10, loc="left")
    ax2.set_xlabel(f"{best} bits/spike")
    ax2.set_ylabel("model bits/spike")
    fig.suptitle(
        f"{record['name']}: per-unit bits/spike; right: model vs {best}, point size = the unit's spikes\n"
        "in the scored horizons (log scale, see the legend)",
        fontsize=11,
    )
    return fig


def units_png(record: dict) -> bytes:
    return _png(units_figure(record))


BPS_MEANING = (
    "Bits/spike: higher is better; 0 is each unit's mean rate over the scored period (known only in hindsight, "
    "so a causal forecaster can score below 0); the oracle (the true rates, synthetic recordings only) is the ceiling."
)


def report_headline(doc: dict) -> str:
    """One plain sentence over the held-out recordings: how often the model beat the best baseline beyond
    the paired interval, and by how much on average."""
    held = [r for r in doc["recordings"] if not r.get("in_sample")]
    n_in = len(doc["recordings"]) - len(held)
    skip = f" ({n_in} in-sample recording{'s' if n_in != 1 else ''} left out)" if n_in else ""
    if not held:
        return f"Every scored recording was in-sample for this checkpoint: there is no held-out figure{skip}."
    d = [r["model_minus_best_baseline_bps"] for r in held]
    wins = sum(bool(r.get("model_beats_best_baseline")) for r in held)
    losses = sum((r.get("model_minus_best_baseline_ci95") or [0, 0])[1] < 0 for r in held)
    return (
        f"On {len(held)} held-out recording{'s' if len(held) != 1 else ''}{skip}, the model beats the best "
        f"baseline in hindsight beyond the paired 95% interval on {wins}, loses beyond it on {losses}, and is "
        f"{sum(d) / len(d):+.4f} bits/spike from it on average."
    )


def plot_caption(name: str, record: dict) -> str:
    """The caption under plot ``name`` of ``record`` in report.html: what it shows and how to read it."""
    if name == "heatmap.png":
        truth = (
            ", then the true rate (synthetic ground truth)"
            if record["recording"].get("has_true_rates")
            else ""
        )
        return (
            f"Rates of the most active units (up to {HEATMAP_UNITS}) over about 20 s of prediction times from the "
            f"middle of the scored windows (the title gives the time slice): observed ({SMOOTH_BINS} x "
            f"{record['windows']['bin_size_s'] * 1000:g} ms boxcar), then the model's forecast{truth}. One colour "
            f"scale for every recording's heatmap: 0-{HEATMAP_MAX_HZ:g} Hz on a square-root scale; higher rates "
            "take the top colour."
        )
    if name == "bands.png":
        return (
            "Bits/spike of the model, the baselines and (synthetic recordings) the oracle in each horizon band "
            f"(left) and in each {record['windows']['bin_size_s'] * 1000:g} ms bin after the prediction time (right)."
        )
    if name == "units.png":
        return (
            "Left: each unit's bits/spike for every predictor (box: quartiles, whiskers 1.5 x IQR; one point per "
            f"unit). Right: each unit's model bits/spike against the best baseline's ({record['best_baseline']}); "
            "above the diagonal the model predicts the unit better. Point size grows with the unit's number of "
            "spikes in the scored horizons (log scale; the legend gives sizes for 10, 100, ... spikes)."
        )
    return ""


def render_recording_plots(record: dict, sample: dict | None) -> dict[str, bytes]:
    """All PNGs of one recording: ``{file name: bytes}``."""
    out = {"bands.png": bands_png(record), "units.png": units_png(record)}
    if sample is not None:
        out["heatmap.png"] = heatmap_png(record, sample)
    return out


OVERVIEW_BARS = 40  # up to this many recordings: grouped bars; more: one point per recording


def overview_png(records: list[dict]) -> bytes | None:
    """Pooled bits/spike of every predictor on every scored recording.

    Grouped horizontal bars for up to :data:`OVERVIEW_BARS` recordings; for more,
    a scatter of the model against the best baseline (one point per recording).
    """
    if not records:
        return None
    if len(records) > OVERVIEW_BARS:
        m = np.array([r["predictors"]["model"]["bits_per_spike"] for r in records])
        b = np.array([r["predictors"][r["best_baseline"]]["bits_per_spike"] for r in records])
        fig = _figure(6.5, 6)
        ax = fig.subplots()
        ax.scatter(b, m, s=12, alpha=0.6, color=_color("model"))
        lo, hi = float(min(m.min(), b.min())), float(max(m.max(), b.max()))
        ax.plot([lo, hi], [lo, hi], color="k", lw=0.6)
        ax.set_xlabel("best baseline bits/spike")
        ax.set_ylabel("model bits/spike")
        ax.set_title(
            f"{len(records)} recordings: model beats its best baseline on {np.mean(m > b):.0%}",
            fontsize=11,
            loc="left",
        )
        return _png(fig)
    names = [
        n
        for n in ("model", "exp_smooth", "ema_tau30", "univariate_glm", "population_glm", "population_glm_forecast", "oracle")
        if any(n in r["predictors"] for r in records)
    ]
    fig = _figure(10, 1.2 + 0.22 * len(names) * len(records))
    ax = fig.subplots()
    y = np.arange(len(records))[::-1]
    h = 0.8 / len(names)
    for i, n in enumerate(names):
        vals = [r["predictors"][n]["bits_per_spike"] if n in r["predictors"] else np.nan for r in records]
        ax.barh(y + ((len(names) - 1) / 2 - i) * h, vals, h, color=_color(n), label=n)
    ax.axvline(0, color="k", lw=0.6)
    ax.set_yticks(y, [r["name"] for r in records])
    ax.set_xlabel("bits/spike (pooled over units, windows and bins)")
    ax.legend(fontsize=8, frameon=False, loc="best")
    ax.set_title("bits/spike per recording", fontsize=11, loc="left")
    return _png(fig)


_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:24px;color:#222;max-width:1200px}
h1{font-size:22px;margin-bottom:4px} h2{font-size:17px;margin-top:28px;border-bottom:1px solid #ddd}
.meta{color:#555;font-size:13px} table{border-collapse:collapse;font-size:13px;margin:10px 0}
th,td{border:1px solid #ccc;padding:3px 7px;text-align:right} th{background:#f3f3f3}
td.l,th.l{text-align:left} tr.failed td{background:#fdecea} .good{color:#1a7f37;font-weight:600}
.bad{color:#b42318} img{max-width:100%;border:1px solid #eee;margin:6px 0} code{font-size:12px}
"""


def _cls(cls: str) -> str:
    return f' class="{cls}"' if cls else ""


def _td(v, cls: str = "") -> str:
    c = _cls(cls)
    if isinstance(v, float):
        return f"<td{c}>{v:+.4f}</td>" if abs(v) < 100 else f"<td{c}>{v:.1f}</td>"
    return f"<td{c}>{html.escape(str(v))}</td>"


def write_report_html(path, doc: dict, summary_rows: list[dict], *, overview: str | None) -> None:
    """Write ``report.html``: settings, the summary table, the overview plot and each recording's plots."""
    model, st = doc["model"], doc["settings"]
    used = sorted({str(r.get("backend")) for r in doc["recordings"] if r.get("backend")})
    backend = st["backend"] + (f" (used: {', '.join(used)})" if used and used != [st["backend"]] else "")
    ref = (
        f"[{st['reference'][0]:g}, {st['reference'][1]:g}) s"
        if st.get("reference")
        else f"first {st['reference_s']:g} s"
    )
    parts = [
        "<!DOCTYPE html><html><head><meta charset='utf-8'><title>nh-serve scores</title>",
        f"<style>{_CSS}</style></head><body>",
        "<h1>nh-serve scores</h1>",
        f"<p class='meta'>model <b>{html.escape(str(model['name']))}</b> ({html.escape(str(model['hash']))}), "
        f"backend {html.escape(backend)}; reference window: {ref}; stride {st['stride_s']:g} s; "
        f"baselines see {st['baseline_history_s']:g} s of history. Bits/spike: NLB definition (gain over each "
        "unit's mean rate, per spike); correlation and R² of expected vs observed counts per bin, pooled.</p>",
        f"<p class='meta'>{doc['summary']['n_ok']} of {doc['summary']['n_inputs']} recordings scored"
        + (
            f", <span class='bad'>{doc['summary']['n_failed']} failed</span>"
            if doc["summary"]["n_failed"]
            else ""
        )
        + ".</p>",
    ]
    cols = [
        ("recording", "recording", "l"),
        ("status", "status", "l"),
        ("in-sample?", "in_sample", "l"),
        ("units", "n_units", ""),
        ("windows", "n_windows", ""),
        ("model bps", "model_bps", ""),
        ("corr", "model_corr", ""),
        ("R²", "model_r2", ""),
        ("best baseline (in hindsight)", "best_baseline", "l"),
        ("best baseline bps", "best_baseline_bps", ""),
        ("model − best baseline", "model_minus_best_baseline_bps", ""),
        ("paired 95% interval", "model_minus_best_baseline_ci95", "l"),
        ("oracle bps", "oracle_bps", ""),
        ("flagged units", "flagged_units", ""),
    ]
    parts.append("<table><tr>" + "".join(f"<th{_cls(c)}>{html.escape(h)}</th>" for h, _, c in cols) + "</tr>")
    for row in summary_rows:
        cls = " class='failed'" if row["status"] != "ok" else ""
        cells = []
        for _, k, c in cols:
            v = row.get(k, "")
            lo, hi = row.get("model_minus_best_baseline_ci95_lo"), row.get("model_minus_best_baseline_ci95_hi")
            if k == "best_baseline_bps" and row.get("best_baseline"):
                v = row.get(f"{row['best_baseline']}_bps")
            if k == "model_minus_best_baseline_ci95":
                v = f"[{lo:+.4f}, {hi:+.4f}]" if lo is not None else ""
            if k in ("model_minus_best_baseline_bps", "model_minus_best_baseline_ci95") and lo is not None:
                # green only when the whole interval is above 0, red when it is below 0
                c = (c + (" good" if lo > 0 else " bad" if hi < 0 else "")).strip()
            if k == "in_sample" and v:
                v, c = f"IN-SAMPLE ({v})", (c + " bad").strip()
            if k == "flagged_units" and v:
                anchor = html.escape(str(row.get("key") or ""))
                v = f"<a href='#{anchor}-flags'>{int(v)}</a>"
                cells.append(f"<td>{v}</td>")
                continue
            cells.append(_td(v if v is not None else "", c))
        parts.append(f"<tr{cls}>" + "".join(cells) + "</tr>")
    parts.append("</table>")
    parts.append(
        "<p class='meta'><b>How to read this table.</b> "
        + html.escape(BPS_MEANING)
        + " <b>in-sample?</b>: IN-SAMPLE marks a recording the checkpoint was trained (or validated) on; its "
        "figures are not held-out and the summary below leaves it out. <b>best baseline (in hindsight)</b>: the "
        "best of every baseline on that recording, chosen after seeing the scores. <b>paired 95% interval</b>: "
        "the model's bits/spike minus the best baseline's, block-bootstrapped over windows; green only when "
        "the whole interval is above 0, red when it is below 0. <b>oracle bps</b> is blank for real recordings: "
        "only synthetic recordings carry their true rates. <b>flagged units</b>: units with no spike in the "
        "scored horizons (their bits/spike is 0 by definition) or silent in the reference window; the number "
        "links to the list under the recording, and units.csv gives every unit's flags.</p>"
    )
    parts.append(f"<p><b>Verdict.</b> {html.escape(report_headline(doc))}</p>")
    failed = [r for r in summary_rows if r["status"] != "ok"]
    if failed:
        parts.append("<h2>Not scored</h2><ul>")
        parts += [
            f"<li><code>{html.escape(r['path'])}</code>: {html.escape(r['error'])}</li>" for r in failed
        ]
        parts.append("</ul>")
    if overview:
        parts.append(
            f"<h2>All recordings</h2><img src='{html.escape(overview)}' alt='bits/spike per recording'>"
        )
    for rec in doc["recordings"]:
        w = rec["windows"]
        parts.append(f"<h2 id='{html.escape(rec['key'])}'>{html.escape(rec['name'])}</h2>")
        parts.append(
            f"<p class='meta'><code>{html.escape(rec['path'])}</code><br>{rec['recording']['n_units']} units, "
            f"{rec['recording']['duration_s']:.1f} s; reference [{w['reference'][0]:g}, {w['reference'][1]:g}) s; "
            f"{w['n']} windows, predictions from {w['first_prediction_s']:g} to {w['last_prediction_s']:g} s; "
            f"best baseline {html.escape(rec['best_baseline'])}; units without spikes in the scored horizons: "
            f"{rec['flagged_units']['no_spikes_scored']}."
            + (f" <b class='bad'>In-sample: the checkpoint's {html.escape(rec['in_sample'])} recording.</b>"
               if rec.get("in_sample") else "")
            + "</p>"
        )
        flagged = [(uid, f) for uid, f in zip(rec["units"]["id"], rec["units"]["flags"]) if f]
        parts.append(
            f"<p class='meta' id='{html.escape(rec['key'])}-flags'>Flagged units ({len(flagged)}): "
            + ("; ".join(f"{html.escape(str(uid))} ({html.escape(f.replace(';', ', ').replace('_', ' '))})"
                         for uid, f in flagged[:200]) or "none")
            + (f"; ... and {len(flagged) - 200} more (units.csv)" if len(flagged) > 200 else "")
            + "</p>"
        )
        for name in ("heatmap.png", "bands.png", "units.png"):
            if name in rec.get("plots", []):
                src = f"recordings/{rec['key']}/{name}"
                parts.append(f"<img src='{html.escape(src)}' alt='{html.escape(name)}' loading='lazy'>")
                parts.append(f"<p class='meta'>{html.escape(plot_caption(name, rec))}</p>")
    parts.append(
        "<p class='meta'>Machine-readable results: <code>scores.json</code> (schema "
        f"<code>{html.escape(doc['schema'])}</code>), <code>summary.csv</code>, <code>units.csv</code>.</p>"
    )
    parts.append("</body></html>\n")
    atomic_write(path, "\n".join(parts).encode())

"""The output folder of ``nh-serve score``: per-recording results written atomically, and the combined files.

Layout::

    OUT/
      scores.json          every recording's record + failures (schema nh-serve/scores/v1)
      summary.csv          one line per input recording
      units.csv            one line per (recording, unit)
      report.html          one page: table + plots (links the PNGs below)
      overview.png         bits/spike per recording
      recordings/<key>/    one folder per scored recording
        result.json        its record (written last: the folder is complete when it exists)
        heatmap.png, bands.png, units.png

A recording's folder is first written under ``recordings/.tmp-<key>-<random>``
and then renamed into place, so an interrupted run never leaves a half-written
result behind; the combined files are rebuilt from the result folders at the
end of every run (and by ``nh-serve score merge``), each written to a
temporary file and moved into place.
"""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from nh_serve.errors import InputError
from nh_serve.evaluation.score.core import MODEL, ORACLE, PREDICTORS, SCHEMA, RecordingResult
from nh_serve.evaluation.score.report import overview_png, report_headline, write_report_html
from nh_serve.util import atomic_write, package_version

RESULT = "result.json"
RECORDINGS = "recordings"
TMP_PREFIX = ".tmp-"
STALE_TMP_S = 6 * 3600.0  # temporary folders older than this are from runs that died; removed


def prepare_out(out) -> Path:
    """Create the output folder (and ``recordings/``) and check it is writable; InputError if not."""
    out = Path(out).expanduser()
    try:
        (out / RECORDINGS).mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{uuid.uuid4().hex[:8]}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise InputError(
            f"--out {out}: cannot write there ({e.strerror or e}); pass a folder you can write to"
        ) from None
    now = time.time()
    for p in (out / RECORDINGS).glob(TMP_PREFIX + "*"):
        try:
            if now - p.stat().st_mtime > STALE_TMP_S:
                shutil.rmtree(p, ignore_errors=True)
        except OSError:
            pass
    return out


def write_recording(out: Path, result: RecordingResult) -> Path:
    """Write one recording's folder atomically (temporary folder, then rename); returns the folder."""
    key = result.record["key"]
    root = Path(out) / RECORDINGS
    dest = root / key
    tmp = root / f"{TMP_PREFIX}{key}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir(parents=True)
    try:
        for name, data in result.plots.items():
            (tmp / name).write_bytes(data)
        (tmp / RESULT).write_text(json.dumps(result.record, indent=1) + "\n")
        _replace_dir(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest


def copy_recording(src: Path, out: Path) -> Path:
    """Copy a finished recording folder into ``out/recordings/`` atomically (used by merge)."""
    dest = Path(out) / RECORDINGS / src.name
    if dest.resolve() == src.resolve():
        return dest
    tmp = dest.with_name(f"{TMP_PREFIX}{src.name}-{uuid.uuid4().hex[:8]}")
    try:
        shutil.copytree(src, tmp)
        _replace_dir(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest


def _replace_dir(tmp: Path, dest: Path) -> None:
    if dest.exists():
        old = dest.with_name(f"{TMP_PREFIX}old-{dest.name}-{uuid.uuid4().hex[:8]}")
        os.rename(dest, old)
        os.rename(tmp, dest)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, dest)


def load_recording(folder: Path) -> dict | None:
    """The record in ``folder/result.json``, or None if the folder is missing, incomplete or unreadable."""
    try:
        rec = json.loads((Path(folder) / RESULT).read_text())
    except (OSError, ValueError):
        return None
    return rec if isinstance(rec, dict) and rec.get("status") == "ok" and "key" in rec else None


# --------------------------------------------------------------------------- combined outputs


def summary_rows(records: list[dict], failed: list[dict]) -> list[dict]:
    """One row per input recording (scored or not), sorted by path."""
    rows = []
    for r in records:
        p = r["predictors"]
        row = {
            "recording": r["name"],
            "path": r["path"],
            "status": "ok",
            "n_units": r["recording"]["n_units"],
            "duration_s": r["recording"]["duration_s"],
            "n_windows": r["windows"]["n"],
            "n_spikes": p["model"]["n_spikes"],
            "model_bps": p["model"]["bits_per_spike"],
            "model_corr": p["model"]["correlation"],
            "model_r2": p["model"]["r2"],
        }
        for band, v in p["model"]["per_band"].items():
            row[f"model_bps_{band}"] = v["bits_per_spike"]
        for n in PREDICTORS[1:]:
            row[f"{n}_bps"] = p[n]["bits_per_spike"] if n in p else None
        row["in_sample"] = r.get("in_sample") or ""
        row["key"] = r["key"]
        row["best_baseline"] = r["best_baseline"]
        row["model_minus_best_baseline_bps"] = r["model_minus_best_baseline_bps"]
        lo, hi = r.get("model_minus_best_baseline_ci95", [None, None])
        row["model_minus_best_baseline_ci95_lo"], row["model_minus_best_baseline_ci95_hi"] = lo, hi
        row["flagged_units"] = r["flagged_units"]["no_spikes_scored"]
        row["error"] = ""
        rows.append(row)
    template = list(rows[0]) if rows else ["recording", "path", "status", "error"]
    for f in failed:
        row = dict.fromkeys(template)
        row.update({"recording": f["name"], "path": f["path"], "status": "failed", "error": f["error"]})
        rows.append(row)
    return sorted(rows, key=lambda x: x["path"])


def unit_rows(records: list[dict]) -> list[dict]:
    """One row per (recording, unit): spikes, reference rate, flags and each predictor's bps / corr / R²."""
    rows = []
    for r in records:
        u = r["units"]
        for i, uid in enumerate(u["id"]):
            row = {
                "recording": r["name"],
                "unit_id": uid,
                "n_spikes": u["n_spikes"][i],
                "ref_rate_hz": u["ref_rate_hz"][i],
                "flags": u["flags"][i],
            }
            for n in PREDICTORS:
                pu = r["predictors"][n]["per_unit"] if n in r["predictors"] else None
                row[f"{n}_bps"] = pu["bits_per_spike"][i] if pu else None
                row[f"{n}_corr"] = pu["correlation"][i] if pu else None
                row[f"{n}_r2"] = pu["r2"][i] if pu else None
            rows.append(row)
    return rows


def _csv(rows: list[dict]) -> bytes:
    cols: list[str] = []
    for r in rows:
        cols += [k for k in r if k not in cols]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols, lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in cols})
    return buf.getvalue().encode()


def build_doc(
    *, inputs: list[str], records: list[dict], failed: list[dict], model: dict, settings: dict, run: dict
) -> dict:
    """The scores.json document. Everything but ``run`` and each record's ``timing`` depends only on the inputs."""
    records = sorted(records, key=lambda r: r["path"])
    failed = sorted(failed, key=lambda f: f["path"])
    mean = {}
    for n in PREDICTORS:
        vals = [r["predictors"][n]["bits_per_spike"] for r in records if n in r["predictors"]]
        if vals:
            mean[n] = sum(vals) / len(vals)
    return {
        "schema": SCHEMA,
        "nh_serve_version": package_version("nh-serve", "0+unknown"),
        "model": model,
        "settings": settings,
        "inputs": sorted(inputs),
        "summary": {
            "n_inputs": len(inputs),
            "n_ok": len(records),
            "n_failed": len(failed),
            "mean_bits_per_spike": mean,
            # beyond the paired 95% interval (its lower end above 0), not merely a higher mean; held-out only
            "model_beats_best_baseline": sum(
                bool(r.get("model_beats_best_baseline")) for r in records if not r.get("in_sample")
            ),
            "in_sample": sum(bool(r.get("in_sample")) for r in records),
            "held_out": sum(not r.get("in_sample") for r in records),
        },
        "recordings": records,
        "failed": failed,
        "run": run,
    }


def write_outputs(out: Path, doc: dict) -> dict[str, Path]:
    """Write scores.json, summary.csv, units.csv, overview.png and report.html; returns their paths."""
    out = Path(out)
    paths = {k: out / k for k in ("scores.json", "summary.csv", "units.csv", "report.html")}
    rows = summary_rows(doc["recordings"], doc["failed"])
    atomic_write(paths["scores.json"], (json.dumps(doc, indent=1) + "\n").encode())
    atomic_write(paths["summary.csv"], _csv(rows))
    atomic_write(paths["units.csv"], _csv(unit_rows(doc["recordings"])))
    png = overview_png(doc["recordings"]) if doc["recordings"] else None
    if png is not None:
        paths["overview.png"] = out / "overview.png"
        atomic_write(paths["overview.png"], png)
    write_report_html(paths["report.html"], doc, rows, overview="overview.png" if png else None)
    return paths


def read_doc(path) -> dict:
    """Load a scores.json (a file or the folder holding it) and check its schema."""
    p = Path(path)
    if p.is_dir():
        p = p / "scores.json"
    try:
        doc = json.loads(p.read_text())
    except FileNotFoundError:
        raise InputError(f"{p}: not found; pass an output folder of `nh-serve score`") from None
    except (OSError, ValueError) as e:
        raise InputError(
            f"{p}: cannot be read as JSON ({e}); was the run interrupted? run it again"
        ) from None
    if not isinstance(doc, dict) or doc.get("schema") != SCHEMA:
        raise InputError(
            f"{p}: schema is {doc.get('schema') if isinstance(doc, dict) else None!r}, expected {SCHEMA!r}"
        )
    return doc


def comparable(doc: dict) -> dict:
    """``doc`` without the fields that differ between equivalent runs (``run``, per-record ``timing``)."""
    d = {k: v for k, v in doc.items() if k != "run"}
    d["recordings"] = [{k: v for k, v in r.items() if k != "timing"} for r in doc["recordings"]]
    return d


@dataclass
class RunReport:
    """What a run (or a merge) did."""

    out: Path
    doc: dict  # the scores.json document written
    paths: dict[str, Path]  # combined output files
    scored: list[str] = field(default_factory=list)  # keys scored by this run
    skipped: list[str] = field(default_factory=list)  # keys already scored, reused
    seconds: float = 0.0

    @property
    def exit_code(self) -> int:
        """0 when every input was scored, 1 when some could not be."""
        return 1 if self.doc["failed"] else 0


def _fmt(v, spec: str = "+.4f") -> str:
    return "-" if v is None else format(v, spec)


def summary_table(doc: dict) -> str:
    """Plain-text table: one line per input recording."""
    head = [
        "recording",
        "status",
        "units",
        "windows",
        "model bps",
        "best baseline bps",
        "model - best [95% CI]",
        "oracle bps",
        "corr",
        "R2",
    ]
    lines = [head]
    rows = [(r["path"], r) for r in doc["recordings"]] + [(f["path"], f) for f in doc["failed"]]
    for _, r in sorted(rows, key=lambda x: x[0]):
        if "predictors" not in r:
            lines.append([r["name"], "FAILED", r["error"]])
            continue
        p, best = r["predictors"], r["best_baseline"]
        lo, hi = r.get("model_minus_best_baseline_ci95") or (float("nan"), float("nan"))
        lines.append(
            [
                r["name"],
                f"ok, IN-SAMPLE ({r['in_sample']})" if r.get("in_sample") else "ok",
                str(r["recording"]["n_units"]),
                str(r["windows"]["n"]),
                _fmt(p[MODEL]["bits_per_spike"]),
                f"{_fmt(p[best]['bits_per_spike'])} ({best})",
                f"{_fmt(r['model_minus_best_baseline_bps'])} [{lo:+.4f}, {hi:+.4f}]",
                _fmt(p[ORACLE]["bits_per_spike"]) if ORACLE in p else "-",
                _fmt(p[MODEL]["correlation"], ".3f"),
                _fmt(p[MODEL]["r2"], "+.3f"),
            ]
        )
    widths = [max(len(r[i]) for r in lines if len(r) > i and len(r) == len(head)) for i in range(len(head))]
    out = []
    for r in lines:
        if len(r) == len(head):
            out.append("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
        else:  # failed: name, status, reason
            out.append("  ".join([r[0].ljust(widths[0]), r[1], r[2]]))
    if doc["recordings"]:
        out.append(report_headline(doc))
    return "\n".join(out)

"""Tests of batch scoring (nh_serve.evaluation.score) and the block-wise evaluation helpers it uses."""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from real_data import REAL

from nh_serve.core.config import get_config
from nh_serve.core.model import NeuroHorizon
from nh_serve.data.features import FeatureNorm, reference_rate_hz
from nh_serve.data.history import ema_rates
from nh_serve.data.session import open_session, write_session
from nh_serve.data.spikes import bin_counts
from nh_serve.data.synth import make_session
from nh_serve.errors import InputError
from nh_serve.evaluation.baselines import predict_baselines
from nh_serve.evaluation.metrics import evaluate
from nh_serve.evaluation.score import ScoreSettings, merge_outputs, run_score
from nh_serve.evaluation.score.cli import add_cli
from nh_serve.evaluation.score.shard import parse_shard, select_shard
from nh_serve.evaluation.score.store import comparable
from nh_serve.evaluation.sliding import StreamingMetrics, collect_targets, oracle_rates, plan_windows
from nh_serve.inference.model_io import save_model
from nh_serve.inference.predictor import Predictor

SETTINGS = ScoreSettings(batch_size=16, backend="torch")
WRITE_KEYS = ("spike_times", "unit_index", "unit_ids", "start", "end", "true_rates", "provenance")


def _synth(path: Path, *, seed: int, n_units: int, duration: float, silent_unit: bool = False) -> Path:
    d = make_session(seed=seed, n_units=n_units, duration=duration)
    kw = {k: d[k] for k in WRITE_KEYS}
    if silent_unit:  # one more unit that never fires: scored and flagged
        kw["unit_ids"] = np.append(np.asarray(d["unit_ids"]).astype(str), "silent")
        rates, bs = d["true_rates"]
        kw["true_rates"] = (np.concatenate([rates, np.zeros((rates.shape[0], 1), rates.dtype)], axis=1), bs)
    return write_session(path, **kw)


def _cli(argv: list[str]) -> int:
    """Run ``nh-serve <argv>`` the way nh_serve.cli.main does (InputError -> message, exit 2)."""
    parser = argparse.ArgumentParser(prog="nh-serve")
    add_cli(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except InputError as e:
        print(f"nh-serve {args.command}: error: {e}")
        return 2


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models run fastest on one thread (and a busy machine makes two threads wait on each other)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("score")
    rec = {
        "a": _synth(root / "synth_a.h5", seed=11, n_units=24, duration=160.0),
        "b": _synth(root / "synth_b.h5", seed=12, n_units=32, duration=180.0, silent_unit=True),
    }
    npz = REAL / "ibl_brainbox_fixture" / "spikes_flat.npz"
    if npz.exists():
        z = np.load(npz)
        ids, uidx = np.unique(z["unit_ids"], return_inverse=True)
        rec["real"] = write_session(
            root / "ibl_brainbox_fixture.h5",
            spike_times=z["spike_times"],
            unit_index=uidx,
            unit_ids=ids,
            start=0.0,
            end=float(np.ceil(z["spike_times"].max())),
        )
    torch.manual_seed(0)
    ckpt = root / "tiny.safetensors"
    m = NeuroHorizon(get_config("nh-tiny"))
    save_model(ckpt, m, feature_norm=FeatureNorm.identity(m.cfg.n_features))
    return root, rec, ckpt


@pytest.fixture(scope="module")
def scored(data):
    root, rec, ckpt = data
    out = root / "out_all"
    report = run_score(list(rec.values()), out=out, checkpoint=ckpt, settings=SETTINGS, progress=False)
    return report


def _reference_targets(s, plan, history_s=60.0):
    """The per-window loop: horizon counts and predict_baselines for every window, one at a time."""
    U, T = s.n_units, plan.n_bins
    r0, r1 = plan.reference
    rt, ru = s.spikes(r0, r1)
    ref = reference_rate_hz(rt, ru, n_units=U, start=r0, end=r1)
    counts, base = [], {}
    for t_now in plan.t_now:
        t_now = float(t_now)
        ht, hu = s.spikes(t_now, t_now + plan.horizon_s)
        counts.append(bin_counts(ht, hu, n_units=U, start=t_now, bin_size=plan.bin_size, n_bins=T))
        h0 = max(float(s.start), t_now - history_s)
        pt, pu = s.spikes(float(s.start), t_now)  # the EMA family starts at the recording start
        preds = predict_baselines(
            times=pt,
            unit_index=pu,
            n_units=U,
            t_now=t_now,
            ref_rate_hz=ref,
            n_bins=T,
            bin_size=plan.bin_size,
            history_start=h0,
            recording_start=float(s.start),
        )
        for k, v in preds.items():
            base.setdefault(k, []).append(v)
    return np.stack(counts), {k: np.stack(v) for k, v in base.items()}


def _independent(path, ckpt):
    """Model predictions via Predictor.predict_batch window by window, targets by the per-window loop."""
    p = Predictor.load(ckpt, backend="torch")
    cfg = p.cfg
    with open_session(path) as s:
        plan = plan_windows(
            start=s.start, end=s.end, context_s=cfg.context_s, n_bins=cfg.n_bins, bin_size=cfg.bin_size_s
        )
        r0, r1 = plan.reference
        rt, ru = s.spikes(r0, r1)
        token = p.register(rt, s.unit_ids[ru], reference_window=(r0, r1), units=s.unit_ids)
        windows = []
        at, au = s.spikes(s.start, s.end)
        ref = reference_rate_hz(rt, ru, n_units=s.n_units, start=r0, end=r1)
        for c in plan.ctx_starts:
            c = float(c)
            ct, cu = s.spikes(c, c + cfg.context_s)
            hist = ema_rates(at, au, n_units=s.n_units, t_eval=[c + cfg.context_s], start=s.start, ref_rate_hz=ref,
                             taus=cfg.history_taus)[0]  # each unit's smoothed rates from the recording start
            windows.append(
                {"spike_times": ct, "unit_ids": s.unit_ids[cu], "context_start": c, "history_rates": hist}
            )
        model = np.stack([x.expected_counts for x in p.predict_batch(token, windows, batch_size=5)])
        counts, base = _reference_targets(s, plan)
        oracle = oracle_rates(s, plan)
    return plan, model, counts, base, oracle


def _close(rec: dict, ref: dict, *, rtol: float, atol: float) -> None:
    for k in ("bits_per_spike", "correlation", "r2", "nll", "n_spikes", "corr_unit_mean", "r2_unit_mean"):
        assert rec[k] == pytest.approx(ref[k], rel=rtol, abs=atol), k
    for grp in ("per_unit", "per_bin"):
        for k, v in rec[grp].items():
            np.testing.assert_allclose(v, ref[grp][k], rtol=rtol, atol=atol, err_msg=f"{grp}/{k}")
    assert set(rec["per_band"]) == set(ref["per_band"])
    for band, v in rec["per_band"].items():
        for k in v:
            assert v[k] == pytest.approx(ref["per_band"][band][k], rel=rtol, abs=atol), (band, k)


@pytest.mark.real_data
def test_scores_match_metrics_on_independent_predictions(data, scored):
    root, rec, ckpt = data
    assert scored.exit_code == 0
    doc = json.loads((scored.out / "scores.json").read_text())
    assert doc["schema"] == "nh-serve/scores/v1"
    by_path = {r["path"]: r for r in doc["recordings"]}
    assert set(by_path) == {str(Path(p).resolve()) for p in rec.values()}
    for name, path in rec.items():
        r = by_path[str(Path(path).resolve())]
        plan, model, counts, base, oracle = _independent(path, ckpt)
        assert r["windows"]["n"] == len(plan)
        np.testing.assert_array_equal(r["units"]["n_spikes"], counts.sum(axis=(0, 2)))
        _close(
            r["predictors"]["model"], evaluate(model, counts, bin_size=plan.bin_size), rtol=2e-5, atol=1e-7
        )
        for k, v in base.items():
            # float32 predictions of float64 smoothed rates computed in another order: ~1e-7 apart
            _close(r["predictors"][k], evaluate(v, counts, bin_size=plan.bin_size), rtol=2e-6, atol=1e-9)
        if name == "real":
            assert "oracle" not in r["predictors"] and not r["recording"]["has_true_rates"]
        else:
            assert oracle is not None
            _close(
                r["predictors"]["oracle"],
                evaluate(oracle, counts, bin_size=plan.bin_size),
                rtol=1e-7,
                atol=1e-10,
            )
            assert (
                r["predictors"]["oracle"]["bits_per_spike"] > r["predictors"]["exp_smooth"]["bits_per_spike"]
            )
        assert sorted(r["plots"]) == ["bands.png", "heatmap.png", "units.png"]
        for f in r["plots"]:
            assert (scored.out / "recordings" / r["key"] / f).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the silent unit is scored and flagged
    b = by_path[str(Path(rec["b"]).resolve())]
    i = b["units"]["id"].index("silent")
    assert b["units"]["flags"][i] == "no_spikes_scored;silent_in_reference"
    assert b["flagged_units"] == {"no_spikes_scored": 1, "silent_in_reference": 1}
    assert b["predictors"]["model"]["per_unit"]["bits_per_spike"][i] == 0.0
    # one summary line per recording, units.csv one per unit, a self-contained report
    lines = (scored.out / "summary.csv").read_text().splitlines()
    assert len(lines) == 1 + len(rec)
    assert len((scored.out / "units.csv").read_text().splitlines()) == 1 + sum(
        r["recording"]["n_units"] for r in doc["recordings"]
    )
    html = (scored.out / "report.html").read_text()
    assert "<script" not in html and "http" not in html
    assert all(f"recordings/{r['key']}/heatmap.png" in html for r in doc["recordings"])


def test_multimodal_model_is_given_the_recordings_stimulus_schedule(tmp_path):
    """Behaviour in the context, images shown and due in the forecast window, schedule complete."""
    d = make_session(seed=21, n_units=10, duration=100.0, multimodal=True)
    path = write_session(tmp_path / "mm.h5", **{k: d[k] for k in (*WRITE_KEYS, "behavior", "image_embeddings")})
    torch.manual_seed(0)
    ckpt = tmp_path / "mm.safetensors"
    m = NeuroHorizon(get_config("nh-tiny", behavior_dim=2, image_dim=32))
    save_model(ckpt, m, feature_norm=FeatureNorm.identity(m.cfg.n_features))
    report = run_score([path], out=tmp_path / "out", checkpoint=ckpt, settings=SETTINGS, progress=False)
    r = json.loads((report.out / "scores.json").read_text())["recordings"][0]
    assert r["model_inputs"]["behavior"] and r["model_inputs"]["images"]

    p = Predictor.load(ckpt, backend="torch")
    cfg = p.cfg
    with open_session(path) as s:
        plan = plan_windows(start=s.start, end=s.end, context_s=cfg.context_s, n_bins=cfg.n_bins, bin_size=cfg.bin_size_s)
        r0, r1 = plan.reference
        rt, ru = s.spikes(r0, r1)
        token = p.register(rt, s.unit_ids[ru], reference_window=(r0, r1), units=s.unit_ids)
        preds = {True: [], False: []}
        at, au = s.spikes(s.start, s.end)
        ref = reference_rate_hz(rt, ru, n_units=s.n_units, start=r0, end=r1)
        for c in map(float, plan.ctx_starts):
            ct, cu = s.spikes(c, c + cfg.context_s)
            hist = ema_rates(at, au, n_units=s.n_units, t_eval=[c + cfg.context_s], start=s.start, ref_rate_hz=ref,
                             taus=cfg.history_taus)[0]
            w = {"history_rates": hist, "behavior": s.behavior(c, c + cfg.context_s)}
            for known in (True, False):
                imgs = s.image_events(c, c + cfg.context_s + (cfg.horizon_s if known else 0.0))
                sched = cfg.horizon_s if known else 0.0
                pred = p.predict(token, ct, s.unit_ids[cu], context_start=c, images=imgs, image_schedule_s=sched, **w)
                preds[known].append(pred.expected_counts)
        counts = collect_targets(s, plan, progress=False).counts
    with_schedule = evaluate(np.stack(preds[True]), counts, bin_size=plan.bin_size)["bits_per_spike"]
    shown_only = evaluate(np.stack(preds[False]), counts, bin_size=plan.bin_size)["bits_per_spike"]
    assert r["predictors"]["model"]["bits_per_spike"] == pytest.approx(with_schedule, rel=2e-5, abs=1e-7)
    assert with_schedule != pytest.approx(shown_only, rel=1e-6, abs=1e-9)


@pytest.mark.real_data
def test_real_recording_is_scored(data, scored):
    root, rec, ckpt = data
    if "real" not in rec:
        pytest.skip(f"real recordings not found under {REAL}")
    r = next(r for r in scored.doc["recordings"] if r["name"] == "ibl_brainbox_fixture")
    assert r["recording"]["n_units"] == 289
    assert r["windows"]["n"] == 59  # 120 s: reference 0-60 s, contexts start at 60, 61, ..., 118 s
    assert r["flagged_units"]["no_spikes_scored"] > 0  # many IBL clusters are silent after the first minute


@pytest.mark.real_data
@pytest.mark.parametrize("kw", [{}, {"stride_s": 0.37}, {"reference": (80.0, 100.0), "stride_s": 2.5}])
def test_collect_targets_equals_per_window_loop(data, kw):
    root, rec, _ = data
    with open_session(rec["a"]) as s:
        plan = plan_windows(start=s.start, end=s.end, **kw)
        t = collect_targets(s, plan, progress=False)
        counts, base = _reference_targets(s, plan)
    np.testing.assert_array_equal(t.counts, counts)
    assert list(t.baselines) == list(base) + ["univariate_glm", "population_glm", "population_glm_forecast"]  # the GLMs need the recording
    for k in base:
        np.testing.assert_allclose(t.baselines[k], base[k], rtol=1e-6, atol=0)


def test_streaming_metrics_equal_evaluate():
    rng = np.random.default_rng(3)
    W, U, T = 75, 6, 10
    rates = rng.gamma(2.0, 0.05, size=(W, U, T)).astype(np.float32)
    counts = rng.poisson(rates * 1.3).astype(np.float32)
    counts[:, 0] = 0  # a unit without spikes
    rates[:, 1] = 0.07  # a constant prediction (zero variance -> correlation 0)
    rates[:5, 2, :3] = 0.0  # zero rates (1e-9 in the logs)
    counts[:, 3] = 1.0  # constant counts (R^2 convention)
    sm = StreamingMetrics(["p"], n_units=U, n_bins=T)
    a = 0
    for n in (1, 5, 0, 40, 29):  # uneven blocks, one bigger than the internal chunk
        sm.update(counts[a : a + n], {"p": rates[a : a + n]})
        a += n
    assert sm.n == W
    _close(sm.result("p", bin_size=0.1), evaluate(rates, counts, bin_size=0.1), rtol=1e-9, atol=1e-12)
    with pytest.raises(InputError, match="negative"):
        sm.update(counts[:2], {"p": -rates[:2] - 1})


@pytest.mark.real_data
def test_second_run_does_no_model_work(data, scored, monkeypatch):
    root, rec, ckpt = data
    before = {p: p.stat().st_mtime_ns for p in (scored.out / "recordings").glob("*/result.json")}

    def boom(*a, **k):
        raise AssertionError("the model must not run for recordings that are already scored")

    monkeypatch.setattr(Predictor, "load", classmethod(boom))
    monkeypatch.setattr(Predictor, "predict_windows", boom)
    again = run_score(
        list(rec.values()),
        out=scored.out,
        checkpoint=ckpt,
        settings=SETTINGS,
        progress=False,
        echo=lambda s: None,
    )
    assert again.exit_code == 0 and again.scored == [] and len(again.skipped) == len(rec)
    assert comparable(again.doc) == comparable(scored.doc)
    assert before == {p: p.stat().st_mtime_ns for p in (scored.out / "recordings").glob("*/result.json")}
    assert again.doc["run"]["skipped"] == sorted(again.skipped)


@pytest.mark.real_data
def test_force_and_changed_settings_score_again(data, scored, monkeypatch):
    root, rec, ckpt = data
    out = root / "out_force"
    shutil.copytree(scored.out, out)
    calls = []
    orig = Predictor.predict_windows
    monkeypatch.setattr(
        Predictor, "predict_windows", lambda self, *a, **k: calls.append(1) or orig(self, *a, **k)
    )
    quiet = {"checkpoint": ckpt, "progress": False, "echo": lambda s: None}
    r = run_score(
        [rec["a"]], out=out, force=True, settings=ScoreSettings(backend="torch", plots=False), **quiet
    )
    assert r.scored and calls
    calls.clear()
    r = run_score(
        [rec["a"]], out=out, settings=ScoreSettings(backend="torch", stride_s=2.0, plots=False), **quiet
    )
    assert r.scored and calls  # other settings: scored again, not mixed with the old ones
    assert r.doc["recordings"][0]["windows"]["n"] == 50


@pytest.mark.real_data
def test_shards_merge_to_the_unsharded_result(data, scored, tmp_path):
    root, rec, ckpt = data
    inputs = [str(p) for p in rec.values()]
    quiet = {"checkpoint": ckpt, "settings": SETTINGS, "progress": False, "echo": lambda s: None}
    shards = [run_score(inputs, out=tmp_path / f"s{i}", shard=f"{i}/2", **quiet) for i in range(2)]
    assert sorted(k for s in shards for k in s.scored) == sorted(scored.scored)
    assert all(s.doc["run"]["all_inputs"] == scored.doc["run"]["all_inputs"] for s in shards)
    assert (
        _cli(["score", "merge", str(shards[0].out), str(shards[1].out), "--out", str(tmp_path / "merged")])
        == 0
    )
    merged = json.loads((tmp_path / "merged" / "scores.json").read_text())
    full = json.loads((scored.out / "scores.json").read_text())
    assert comparable(merged) == comparable(full)
    for f in ("summary.csv", "units.csv"):
        assert (tmp_path / "merged" / f).read_bytes() == (scored.out / f).read_bytes()
    for r in merged["recordings"]:
        assert sorted(p.name for p in (tmp_path / "merged" / "recordings" / r["key"]).iterdir()) == sorted(
            ["result.json", *r["plots"]]
        )
    # a merge that lacks a shard says which one and fails
    part = merge_outputs([shards[0].out], out=tmp_path / "part", echo=lambda s: None)
    assert part.exit_code == 1
    assert part.doc["failed"] and all("1/2" in f["error"] for f in part.doc["failed"])


def test_shard_selection_is_deterministic():
    jobs = list(range(10))
    assert select_shard(jobs, "0/3") == [0, 3, 6, 9] and select_shard(jobs, (2, 3)) == [2, 5, 8]
    assert sorted(sum((select_shard(jobs, f"{i}/4") for i in range(4)), [])) == jobs
    for bad in ("3/3", "1/0", "a/b", "1", "-1/2"):
        with pytest.raises(InputError, match="--shard"):
            parse_shard(bad)


@pytest.mark.real_data
def test_bad_recordings_are_reported_and_the_rest_scored(data, tmp_path, capsys):
    root, rec, ckpt = data
    not_session = tmp_path / "notes.h5"
    not_session.write_text("not an HDF5 file")
    short = _synth(tmp_path / "short.h5", seed=5, n_units=8, duration=50.0)
    out = tmp_path / "out"
    argv = [
        "score",
        str(rec["a"]),
        str(tmp_path / "missing.h5"),
        str(not_session),
        str(short),
        "--checkpoint",
        str(ckpt),
        "--out",
        str(out),
        "--quiet",
        "--no-plots",
        "--backend",
        "torch",
    ]
    assert _cli(argv) == 1
    doc = json.loads((out / "scores.json").read_text())
    assert [r["name"] for r in doc["recordings"]] == ["synth_a"]
    errors = {Path(f["path"]).name: f["error"] for f in doc["failed"]}
    assert "file not found" in errors["missing.h5"]
    assert "not an HDF5 file" in errors["notes.h5"]
    assert "too short" in errors["short.h5"] and "50 s long" in errors["short.h5"]
    text = capsys.readouterr().out
    assert "FAILED" in text and "failed 3" in text
    summary = (out / "summary.csv").read_text().splitlines()
    assert len(summary) == 5 and sum(",failed," in line for line in summary) == 3


@pytest.mark.real_data
def test_usage_errors_exit_2(data, tmp_path, capsys):
    root, rec, ckpt = data
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert _cli(["score", str(rec["a"]), "--checkpoint", str(ckpt), "--out", str(blocker / "out")]) == 2
    assert "cannot write there" in capsys.readouterr().out
    assert (
        _cli(
            [
                "score",
                str(rec["a"]),
                "--checkpoint",
                str(tmp_path / "nope.safetensors"),
                "--out",
                str(tmp_path / "o"),
            ]
        )
        == 2
    )
    assert (
        _cli(
            [
                "score",
                str(rec["a"]),
                "--checkpoint",
                str(ckpt),
                "--out",
                str(tmp_path / "o"),
                "--shard",
                "2/2",
            ]
        )
        == 2
    )
    assert _cli(["score", "merge", str(tmp_path / "o"), "--out", str(tmp_path / "m"), "--stride", "2"]) == 2
    assert "only apply when scoring" in capsys.readouterr().out
    assert _cli(["score", "merge", str(tmp_path / "nothing"), "--out", str(tmp_path / "m")]) == 2

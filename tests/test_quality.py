"""Quality benchmark (nh_serve.evaluation.quality, ``nh-serve eval``) on a tiny checkpoint and synthetic recordings."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from nh_serve.core.config import get_config
from nh_serve.core.model import NeuroHorizon
from nh_serve.data.features import FeatureNorm, auto_reference_s
from nh_serve.data.history import ema_rates
from nh_serve.data.session import open_session
from nh_serve.data.synth import write_synthetic_sessions
from nh_serve.data.windows import history_counts
from nh_serve.errors import InputError
from nh_serve.evaluation import quality_cli
from nh_serve.evaluation.metrics import evaluate
from nh_serve.evaluation.sliding import collect_targets, oracle_rates, plan_windows
from nh_serve.inference.model_io import build_model, load_model, save_model
from nh_serve.inference.predictor import Predictor


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("quality")
    sessions = write_synthetic_sessions(root / "synth", n_sessions=2, seed=5, duration=40.0, n_units=8)
    torch.manual_seed(0)
    model = NeuroHorizon(get_config("nh-tiny"))
    ckpt = save_model(root / "tiny.safetensors", model, feature_norm=FeatureNorm.identity(model.cfg.n_features))
    torch.manual_seed(1)
    abl = build_model(get_config("nh-tiny"), head_ablation="no_activity")
    save_model(
        root / "noact.safetensors",
        abl,
        feature_norm=FeatureNorm.identity(abl.cfg.n_features),
        training={"head_ablation": "no_activity"},
    )
    return root, sessions, ckpt


def _cli(argv: list[str]) -> int:
    p = argparse.ArgumentParser()
    quality_cli.add_cli(p.add_subparsers())
    args = p.parse_args(argv)
    return args.func(args)


def test_auto_reference_and_history_counts():
    assert auto_reference_s(120.0) == 30.0  # the 2-minute IBL recording
    assert auto_reference_s(2820.0) == 60.0
    assert auto_reference_s(20.0) == 10.0
    t = np.array([0.5, 1.0, 2.0, 4.9, 5.0, 7.0])
    u = np.array([0, 1, 0, 1, 0, 2])
    counts, dur = history_counts(t, u, n_units=4, ctx_start=5.0, history_s=3.0, start=0.0)
    np.testing.assert_array_equal(counts, [1, 1, 0, 0])  # [2, 5): spikes at 2.0 (unit 0) and 4.9 (unit 1)
    assert dur == 3.0
    counts, dur = history_counts(t, u, n_units=4, ctx_start=5.0, history_s=30.0, start=0.2)
    np.testing.assert_array_equal(counts, [2, 2, 0, 0])
    assert dur == pytest.approx(4.8)


def test_eval_json_equals_metric_functions(setup, tmp_path):
    root, sessions, _ = setup
    out = tmp_path / "q.json"
    rc = _cli(
        [
            "eval",
            "--checkpoint",
            str(root / "tiny.safetensors"),
            *map(str, sessions),
            "--json",
            str(out),
            "--stride",
            "2",
            "--no-progress",
        ]
    )
    assert rc == 0
    res = json.loads(out.read_text())
    assert len(res["recordings"]) == 2 and res["summary"]["synthetic_recordings"] == 2

    # The same figures computed by hand with the shared functions.
    p = Predictor.load(root / "tiny.safetensors", backend="torch")
    cfg = p.cfg
    per_session = []
    for path, rec in zip(sessions, res["recordings"]):
        with open_session(path) as s:
            plan = plan_windows(start=s.start, end=s.end, reference_s=10.0, stride_s=2.0)
            targets = collect_targets(s, plan, progress=False)
            oracle = oracle_rates(s, plan)
            t, u = s.spikes(s.start, s.end)
            ids = np.asarray(s.unit_ids).astype(str)
            start = s.start
        assert rec["reference_s"] == [pytest.approx(plan.reference[0]), pytest.approx(plan.reference[1])]
        r0, r1 = plan.reference
        ref = (t >= r0) & (t < r1)
        token = p.register(t[ref], ids[u[ref]], reference_window=(r0, r1), units=ids)
        ref_rate = np.bincount(u[ref], minlength=ids.size) / (r1 - r0)
        wins = []
        for c in plan.ctx_starts:
            ctx = (t >= c) & (t < c + cfg.context_s)
            # each unit's smoothed rates at the context end, from the recording start
            hist = ema_rates(t, u, n_units=ids.size, t_eval=[c + cfg.context_s], start=start, ref_rate_hz=ref_rate,
                             taus=cfg.history_taus)[0]
            wins.append({"spike_times": t[ctx], "unit_ids": ids[u[ctx]], "context_start": float(c), "history_rates": hist})
        rates = np.stack([pr.expected_counts for pr in p.predict_batch(token, wins)])
        token0 = p.register(t[ref], ids[u[ref]], reference_window=(r0, r1), units=ids, fit="none")
        zero_shot = np.stack([pr.expected_counts for pr in p.predict_batch(token0, wins)])
        # the model's offset alone, by hand: the 30 s smoothed rate + 0.1 Hz, flat over the horizon
        base = np.stack([w["history_rates"][:, list(cfg.history_taus).index(30.0)] + 0.1 for w in wins])  # (W, U) Hz
        offset = np.repeat((base * plan.bin_size)[:, :, None], plan.n_bins, axis=2)
        direct = {
            "model": evaluate(rates, targets.counts, bin_size=plan.bin_size),
            "model zero-shot": evaluate(zero_shot, targets.counts, bin_size=plan.bin_size),
            "model offset only": evaluate(offset, targets.counts, bin_size=plan.bin_size),
            "oracle": evaluate(oracle, targets.counts, bin_size=plan.bin_size),
            **{n: evaluate(b, targets.counts, bin_size=plan.bin_size) for n, b in targets.baselines.items()},
        }
        assert set(rec["scores"]) == set(direct)
        for name, m in direct.items():
            got = rec["scores"][name]
            tol = 1e-5 if name == "model offset only" else 1e-6  # the model's float32 offset vs float64 here
            for key in ("bits_per_spike", "correlation", "r2", "corr_unit_mean", "r2_unit_mean"):
                assert got[key] == pytest.approx(m[key], rel=tol, abs=1e-9), (name, key)
            for band, b in m["per_band"].items():
                assert got["bands"][band] == pytest.approx(b["bits_per_spike"], rel=1e-6, abs=1e-9)
        per_session.append({n: m["bits_per_spike"] for n, m in direct.items()})
        # the best baseline in hindsight, and the paired differences with their intervals
        base_bps = {n: direct[n]["bits_per_spike"] for n in targets.baselines}
        assert rec["baselines"] == list(targets.baselines)
        assert rec["best_baseline"] == max(base_bps, key=base_bps.get)
        for n, bps in base_bps.items():
            pr = rec["paired"]["model"][n]
            assert pr["diff"] == pytest.approx(direct["model"]["bits_per_spike"] - bps, rel=1e-5, abs=1e-8)
            assert pr["lo"] <= pr["diff"] <= pr["hi"]
        best = rec["paired"]["model"][rec["best_baseline"]]
        assert rec["beats_best_baseline"]["model"] == (best["lo"] > 0)
        assert res["summary"]["beats_every_baseline"][rec["recording"]] == (best["lo"] > 0)
    mean = res["summary"]["synthetic_mean"]
    for name in per_session[0]:
        assert mean[name]["bits_per_spike"] == pytest.approx(
            np.mean([d[name] for d in per_session]), rel=1e-6
        )
    assert res["summary"]["fraction_of_oracle"]["model"] == pytest.approx(
        mean["model"]["bits_per_spike"] / mean["oracle"]["bits_per_spike"], rel=1e-6
    )
    for band, f in res["summary"]["fraction_of_oracle_bands"]["model"].items():
        assert f == pytest.approx(mean["model"]["bands"][band] / mean["oracle"]["bands"][band], rel=1e-6)
    sp = res["summary"]["synthetic_paired"]["model"]["best_baseline"]
    want = np.mean([rec["paired"]["model"][rec["best_baseline"]]["diff"] for rec in res["recordings"]])
    assert sp["diff"] == pytest.approx(want, rel=1e-6) and sp["lo"] <= sp["diff"] <= sp["hi"]


def test_compare_adapt_and_report(setup, tmp_path):
    root, sessions, _ = setup
    out = tmp_path / "q.json"
    rc = _cli(
        [
            "eval",
            "--checkpoint",
            str(root / "tiny.safetensors"),
            "--compare",
            f"noact={root / 'noact.safetensors'}",
            str(sessions[0]),
            "--adapt-steps",
            "3",
            "--max-windows",
            "4",
            "--refit-every",
            "30",
            "--json",
            str(out),
            "--no-progress",
        ]
    )
    assert rc == 0
    res = json.loads(out.read_text())
    rec = res["recordings"][0]
    assert rec["windows"] == 4
    assert {"model", "model adapted", "noact", "noact adapted", "oracle", "persistence"} <= set(rec["scores"])
    # a 40 s recording ends before a refit window (180 s by default) has passed since its 10 s reference
    assert rec["scores"]["model refit every 30 s"]["bits_per_spike"] == rec["scores"]["model"]["bits_per_spike"]
    assert rec["refits"]["model refit every 30 s"]["refits"] == 0 and res["settings"]["refit_every_s"] == 30.0
    assert "--refit-every 30" in res["command"]
    # what each registration fit kept is recorded: here a 10 s reference, too short to fit; zero-shot rows have none
    assert rec["fits"]["model"]["mode"] == "reference" and "20 s" in rec["fits"]["model"]["note"]
    assert "model zero-shot" not in rec["fits"] and "model offset only" not in rec["fits"]
    assert rec["adaptation"]["model"]["steps"] == 3 and rec["adaptation"]["model"]["seconds"] > 0
    assert res["checkpoints"]["noact"]["head_ablation"] == "no_activity"
    assert res["command"].startswith("nh-serve eval --checkpoint")
    doc = tmp_path / "results.md"
    doc.write_text("# Results\n\nkeep me\n")
    assert _cli(["eval", "--report", str(out), "--doc", str(doc)]) == 0
    text = doc.read_text()
    assert "keep me" in text and "<!-- quality:start -->" in text and "| noact adapted |" in text
    assert "model's registration fit on these 1 recordings: no calibration on 1 (a fit needs at least 20 s" in text


def test_no_activity_ablation_ignores_activity_inputs(setup):
    root, _, _ = setup
    m = load_model(root / "noact.safetensors")[0]
    assert not m.cfg.head_activity and not m.cfg.baseline_offset
    # the switch is in the checkpoint's config: every loader (scoring, the service) gets the ablation
    assert not Predictor.load(root / "noact.safetensors", backend="torch").cfg.head_activity
    emb = torch.randn(1, 3, m.cfg.dim)
    v1 = m.unit_vectors(emb, torch.rand(1, 3, 3) * 10, torch.rand(1, 3) * 5, torch.rand(1, 3) * 5)
    v2 = m.unit_vectors(emb, torch.zeros(1, 3, 3), torch.zeros(1, 3), torch.zeros(1, 3))
    assert torch.equal(v1, v2) and torch.equal(v1[..., : m.cfg.dim], emb)
    # The plain model does use them.
    q = load_model(root / "tiny.safetensors")[0]
    assert not torch.equal(
        q.unit_vectors(emb, torch.ones(1, 3, 3), torch.ones(1, 3), torch.ones(1, 3)),
        q.unit_vectors(emb, torch.zeros(1, 3, 3), torch.zeros(1, 3), torch.zeros(1, 3)),
    )
    # a checkpoint saved before the switch existed (ablation only in its training record) is rebuilt
    legacy = NeuroHorizon(get_config("nh-tiny", baseline_offset=False))
    save_model(root / "legacy.safetensors", legacy, feature_norm=FeatureNorm.identity(legacy.cfg.n_features),
               training={"head_ablation": "no_activity"})
    assert not load_model(root / "legacy.safetensors")[0].cfg.head_activity
    assert not Predictor.load(root / "legacy.safetensors", backend="torch").cfg.head_activity  # every loader


def test_bad_input(setup, tmp_path):
    root, sessions, _ = setup
    ck = str(root / "tiny.safetensors")
    with pytest.raises(InputError, match="reference-s: must be at least 10"):
        _cli(["eval", "--checkpoint", ck, str(sessions[0]), "--reference-s", "5"])
    with pytest.raises(InputError, match="expected NAME=PATH"):
        _cli(["eval", "--checkpoint", ck, str(sessions[0]), "--compare", "nope"])
    with pytest.raises(InputError, match="pass at least one session file"):
        _cli(["eval", "--checkpoint", ck])
    with pytest.raises(InputError, match="no prediction window fits outside the reference window"):
        _cli(["eval", "--checkpoint", ck, str(sessions[0]), "--reference-s", "39", "--no-progress"])
    with pytest.raises(InputError, match="refit-every: must be at least 1 second"):
        _cli(["eval", "--checkpoint", ck, str(sessions[0]), "--refit-every", "0.5", "--max-windows", "2", "--no-progress"])
    with pytest.raises(InputError, match="set --refit-every too"):
        _cli(["eval", "--checkpoint", ck, str(sessions[0]), "--refit-window", "60"])
    with pytest.raises(InputError, match="pass --doc"):
        _cli(["eval", "--report", str(tmp_path / "x.json")])
    with pytest.raises(InputError):
        _cli(["eval", "--checkpoint", str(tmp_path / "missing.safetensors"), str(sessions[0])])
    assert Path(sessions[0]).is_file()


def test_calibration_reads_as_words_and_records_average():
    from nh_serve.core.calibration import mean_record
    from nh_serve.evaluation.quality_cli import _calibration_text

    fit = {"floor_beta": 0.94, "shrink_gamma": 0.912, "level_lambda": {"5": 0.01, "120": 0.99}}
    assert _calibration_text(fit) == "floor taken out 0.94, departures shrunk by 0.91, level moved toward r5 0.01, r120 0.99"
    assert _calibration_text({"floor_beta": 0.5, "shrink_gamma": 0.0, "level_lambda": {}}) == "floor taken out 0.50, departures shrunk by 0.00"
    # a registration record has no level weights: they count as 0 in the mean; records without a calibration are left out
    mean = mean_record([fit, {"floor_beta": 0.06, "shrink_gamma": 0.088}, {"note": "too short"}])
    assert mean["floor_beta"] == pytest.approx(0.5) and mean["shrink_gamma"] == pytest.approx(0.5)
    assert mean["level_lambda"] == {"5": pytest.approx(0.005), "120": pytest.approx(0.495)}
    assert mean_record([{"note": "too short"}]) == {}

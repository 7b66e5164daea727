"""Streaming refits replayed on a recording (``nh-serve eval --refit-every``) match a live streaming session."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from nh_serve.data.history import ema_rates
from nh_serve.data.synth import make_session
from nh_serve.data.windows import cut_windows
from nh_serve.errors import InputError
from nh_serve.evaluation.refits import RefitReplay
from nh_serve.evaluation.sliding import WindowPlan
from nh_serve.inference.predictor import Predictor


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


@pytest.fixture(scope="module")
def predictor(tmp_path_factory, make_tiny_checkpoint):
    path = make_tiny_checkpoint(tmp_path_factory.mktemp("ck") / "tiny.safetensors", seed=1, norm_seed=1)
    return Predictor.load(path, backend="torch")


def test_replayed_refits_equal_a_live_stream(predictor):
    """The replay refits at the stream times a live session does, on the same data, and predicts the same rates."""
    p = predictor
    d = make_session(seed=8, n_units=15, duration=175.0)
    ids = np.asarray(d["unit_ids"]).astype(str)
    t, u = d["spike_times"], d["unit_index"]
    m = t < 60.0
    ctx = np.arange(60.0, 170.0)
    live = p.register(t[m], ids[u[m]], reference_window=(0.0, 60.0), units=ids, refit_every_s=50.0, refit_window_s=50.0)
    live_rates = []
    for c in ctx:
        w = (t >= c) & (t < c + 1.0)
        live_rates.append(p.predict(live, t[w], ids[u[w]], context_start=float(c)).rates_hz)
    s_live = p.session(live)

    def read(a, b):
        k = (t >= a) & (t < b)
        return t[k], u[k]

    tok = p.register(t[m], ids[u[m]], reference_window=(0.0, 60.0), units=ids)
    replay = RefitReplay("model refit", p, tok, read=read, every_s=50.0, window_s=50.0)
    hist = ema_rates(t, u, n_units=ids.size, t_eval=ctx + 1.0, start=0.0, ref_rate_hz=p.session(tok).ref_rate_hz,
                     taus=p.cfg.history_taus)  # what the live stream carries to each context end
    windows = cut_windows(t, u, ctx, n_units=ids.size, cfg=p.cfg, history_start=0.0, history_rates=hist)
    plan = WindowPlan((0.0, 60.0), ctx, 1.0, p.cfg.n_bins, p.cfg.bin_size_s)
    counts = np.concatenate([replay.rates(windows[i : i + 37], plan) for i in range(0, len(windows), 37)])  # blocks
    plain = np.stack([pr.rates_hz for pr in p.predict_windows(
        p.register(t[m], ids[u[m]], reference_window=(0.0, 60.0), units=ids), windows)])  # never refitted

    assert [r["window"] for r in replay.records] == [[60.0, 110.0], [110.0, 160.0]]
    assert s_live.fit["refits"] == 2 and s_live.fit["last_refit"]["window"] == pytest.approx([110.0, 160.0])
    assert torch.allclose(p.session(tok).readout, s_live.readout, atol=1e-5)
    np.testing.assert_allclose(counts / p.cfg.bin_size_s, np.stack(live_rates), rtol=1e-4, atol=1e-6)
    first = int(np.flatnonzero(ctx + 1.0 >= 110.0)[0])  # the first window predicted after a refit
    np.testing.assert_allclose(counts[:first] / p.cfg.bin_size_s, plain[:first], rtol=1e-5, atol=1e-6)
    assert not np.allclose(counts[first:] / p.cfg.bin_size_s, plain[first:], rtol=1e-3)  # the refits changed them
    summary = replay.summary()
    assert summary["refits"] == 2 and summary["every_s"] == 50.0
    assert all(isinstance(r["population_corrected"], bool) for r in replay.records)
    assert summary["corrected"] == sum(r["population_corrected"] for r in replay.records)
    assert replay.records[-1]["population_corrected"] == s_live.fit["last_refit"]["population_corrected"]
    assert set(summary["calibration"]) == {"floor_beta", "shrink_gamma", "level_lambda"}
    assert set(summary["calibration"]["level_lambda"]) == {"5", "120"}


def test_replay_refuses_bad_settings(predictor):
    d = make_session(seed=9, n_units=8, duration=70.0)
    ids = np.asarray(d["unit_ids"]).astype(str)
    m = d["spike_times"] < 60.0
    tok = predictor.register(d["spike_times"][m], ids[d["unit_index"][m]], reference_window=(0.0, 60.0), units=ids)
    with pytest.raises(InputError, match="at least 1 second"):
        RefitReplay("m", predictor, tok, read=None, every_s=0.5)
    with pytest.raises(InputError, match="refit window"):
        RefitReplay("m", predictor, tok, read=None, every_s=30.0, window_s=20.0)
    # without a window the replay refits on what a live session would: the reference length, at least 180 s
    assert RefitReplay("m", predictor, tok, read=None, every_s=30.0).window_s == 180.0
    live = predictor.register(d["spike_times"][m], ids[d["unit_index"][m]], reference_window=(0.0, 60.0), units=ids,
                              refit_every_s=30.0)
    assert predictor.session(live).refit.window_s == 180.0

"""The Predictor: registration, prediction, batching, the session cache and bad input."""

from __future__ import annotations

import time
import warnings

import numpy as np
import pytest
import torch

from nh_serve.core.calibration import FLOOR_HZ, Calibration
from nh_serve.core.config import COUNT_HISTORY, get_config
from nh_serve.core.glm import CORRECTION_MAX_LOG, PopulationGLM
from nh_serve.core.model import NeuroHorizon
from nh_serve.data.coupling import unit_descriptors
from nh_serve.data.features import FeatureNorm
from nh_serve.data.history import LOG_FLOOR_HZ, SLOW_TAU, ema_rates
from nh_serve.data.synth import make_session
from nh_serve.errors import CheckpointError, InputError
from nh_serve.inference.model_io import load_model, save_model
from nh_serve.inference.predictor import Predictor
from nh_serve.inference.reference_fit import MAX_WINDOWS, WARMUP_S, RateCorrection, fit_readout, fit_windows
from nh_serve.inference.sessions import RegisteredSession, SessionCache


@pytest.fixture(scope="module")
def recording():
    d = make_session(seed=3, n_units=23, duration=90.0)
    ids = np.asarray(d["unit_ids"]).astype(str)
    return d["spike_times"], ids[d["unit_index"]], ids


@pytest.fixture(scope="module")
def ckpt_path(tmp_path_factory):
    torch.manual_seed(0)
    model = NeuroHorizon(get_config("nh-tiny"))
    rng = np.random.default_rng(0)
    F = model.cfg.n_features
    norm = FeatureNorm(mean=rng.normal(size=F).astype(np.float32), std=rng.uniform(0.5, 2, F).astype(np.float32))
    path = tmp_path_factory.mktemp("ck") / "tiny.safetensors"
    save_model(path, model, feature_norm=norm, training={"note": "random weights"})
    return path


@pytest.fixture()
def predictor(ckpt_path):
    return Predictor.load(ckpt_path, backend="torch")


def _window(rec, t0, t1):
    t, ids, _ = rec
    m = (t >= t0) & (t < t1)
    return t[m], ids[m]


def test_predict_matches_the_model_called_directly(predictor, recording):
    t, ids, all_ids = recording
    rt, rid = _window(recording, 0.0, 60.0)
    token = predictor.register(rt, rid, reference_window=(0.0, 60.0), units=all_ids)
    ct, cid = _window(recording, 70.0, 71.0)
    pred = predictor.predict(token, ct, cid, context_start=70.0)

    U, T = all_ids.size, predictor.cfg.n_bins
    assert pred.rates_hz.shape == (U, T) and pred.rates_hz.dtype == np.float32
    assert np.all(np.isfinite(pred.rates_hz)) and np.all(pred.rates_hz > 0)
    np.testing.assert_allclose(pred.bin_edges, 71.0 + 0.02 * np.arange(T + 1))
    assert list(pred.unit_ids) == list(all_ids)
    np.testing.assert_allclose(pred.expected_counts, pred.rates_hz * 0.02, rtol=1e-6)

    # The same computation by hand: descriptors -> norm -> model.forward, with the true history and
    # without a read-out (fit="none"), then with the fitted read-out (fit="reference").
    index = {u: i for i, u in enumerate(all_ids)}
    cfg = predictor.cfg
    ref_idx = np.array([index[u] for u in rid])
    ref_rate = np.bincount(ref_idx, minlength=U) / 60.0
    feats = unit_descriptors(rt, ref_idx, n_units=U, start=0.0, end=60.0, ref_rate_hz=ref_rate,
                             components=cfg.coupling_components)
    m = t < 71.0
    hist = ema_rates(t[m], np.array([index[u] for u in ids[m]]), n_units=U, t_eval=[71.0], start=0.0,
                     ref_rate_hz=ref_rate, taus=cfg.history_taus)[0]
    model = predictor.model
    item = model.tokenize(
        unit_features=predictor.feature_norm.apply(feats),
        spike_times=ct,
        spike_unit_index=np.array([index[u] for u in cid]),
        ctx_start=70.0,
        ref_rate_hz=ref_rate,
        history_rates=hist,
    )
    for fit in ("none", "reference"):
        tok = predictor.register(rt, rid, reference_window=(0.0, 60.0), units=all_ids, fit=fit)
        got = predictor.predict(tok, ct, cid, context_start=70.0, history_rates=hist)
        readout = predictor.session(tok).readout
        assert predictor.session(tok).fit["mode"] == fit  # zero-shot sessions fit nothing
        if fit == "none":
            assert readout.abs().sum() == 0
        with torch.inference_mode():
            want = torch.exp(model(**model.collate([item]), unit_readout=readout.unsqueeze(0)))[0].numpy()
        correction = predictor.session(tok).correction  # a reference fit may keep a correction
        assert correction is None or fit == "reference"
        if correction is not None:  # the reference fit's rate correction on top of the network
            want = correction.apply(want[None], hist[None].astype(np.float64), item["unit_bins"][None].numpy())[0]
        np.testing.assert_allclose(got.rates_hz, want, rtol=1e-5, atol=1e-6)


def test_unit_order_follows_units_argument(predictor, recording):
    _, _, all_ids = recording
    rt, rid = _window(recording, 0.0, 60.0)
    ct, cid = _window(recording, 70.0, 71.0)
    a = predictor.predict(predictor.register(rt, rid, reference_window=(0, 60), units=all_ids), ct, cid, context_start=70.0)
    perm = np.random.default_rng(1).permutation(all_ids.size)
    b = predictor.predict(predictor.register(rt, rid, reference_window=(0, 60), units=all_ids[perm]), ct, cid, context_start=70.0)
    assert list(b.unit_ids) == list(all_ids[perm])
    np.testing.assert_allclose(b.rates_hz, a.rates_hz[perm], rtol=1e-5, atol=1e-6)


def test_predict_batch_equals_single_predictions_and_horizon_truncates(predictor, recording):
    rt, rid = _window(recording, 0.0, 60.0)
    token = predictor.register(rt, rid, reference_window=(0.0, 60.0))
    windows = []
    for c in (61.0, 65.5, 80.0):
        ct, cid = _window(recording, c, c + 1.0)
        windows.append({"spike_times": ct, "unit_ids": cid, "context_start": c})
    batch = predictor.predict_batch(token, windows, horizon_s=0.5)
    for w, b in zip(windows, batch):
        single = predictor.predict(token, **w)
        assert b.rates_hz.shape[1] == 25 and b.bin_edges.shape == (26,)
        np.testing.assert_allclose(b.rates_hz, single.rates_hz[:, :25], rtol=1e-5, atol=1e-6)
        assert b.bin_edges[0] == pytest.approx(w["context_start"] + 1.0)


def test_predict_batch_chunks_large_sessions_by_unit_windows(predictor, recording, monkeypatch):
    import nh_serve.inference.predictor as mod

    rt, rid = _window(recording, 0.0, 60.0)
    token = predictor.register(rt, rid, reference_window=(0.0, 60.0))
    U = predictor.session(token).n_units
    windows = []
    for c in np.arange(61.0, 68.0):
        ct, cid = _window(recording, c, c + 1.0)
        windows.append({"spike_times": ct, "unit_ids": cid, "context_start": float(c)})
    whole = predictor.predict_batch(token, windows)
    sizes = []
    run = predictor._run
    monkeypatch.setattr(predictor, "_run", lambda s, items: sizes.append(len(items)) or run(s, items))
    monkeypatch.setattr(mod, "MAX_UNIT_WINDOWS", 3 * U)  # room for 3 windows of this session
    chunked = predictor.predict_batch(token, windows)
    assert sizes == [3, 3, 1]
    for a, b in zip(whole, chunked):
        np.testing.assert_allclose(a.rates_hz, b.rates_hz, rtol=1e-5, atol=1e-6)
    for bad in (0, 2.0, True):
        with pytest.raises(InputError, match="batch_size"):
            predictor.predict_batch(token, windows, batch_size=bad)
    assert len(predictor.predict_batch(token, windows, batch_size=np.int64(2))) == len(windows)


def test_history_rates_change_the_prediction(predictor, recording):
    rt, rid = _window(recording, 0.0, 60.0)
    token = predictor.register(rt, rid, reference_window=(0.0, 60.0))
    ct, cid = _window(recording, 70.0, 71.0)
    U, K = predictor.session(token).n_units, len(predictor.cfg.history_taus)
    lo = predictor.predict(token, ct, cid, context_start=70.0, history_rates=np.full((U, K), 0.1))
    hi = predictor.predict(token, ct, cid, context_start=70.0, history_rates=np.full((U, K), 50.0))
    assert np.all(hi.rates_hz.mean(axis=1) > lo.rates_hz.mean(axis=1))
    with pytest.raises(InputError, match="history_counts"):
        predictor.predict(token, ct, cid, context_start=70.0, history_counts=np.zeros(U))
    with pytest.raises(InputError, match="history_rates"):
        predictor.predict(token, ct, cid, context_start=70.0, history_rates=np.full((U, K + 1), 1.0))


def test_history_counts_change_a_count_history_models_prediction(tmp_path, recording, make_tiny_checkpoint):
    path = make_tiny_checkpoint(tmp_path / "v1.safetensors", overrides=COUNT_HISTORY)
    p = Predictor.load(path, backend="torch")
    rt, rid = _window(recording, 0.0, 60.0)
    token = p.register(rt, rid, reference_window=(0.0, 60.0))
    ct, cid = _window(recording, 70.0, 71.0)
    U = p.session(token).n_units
    lo = p.predict(token, ct, cid, context_start=70.0, history_counts=np.zeros(U))
    hi = p.predict(token, ct, cid, context_start=70.0, history_counts=np.full(U, 3000.0))
    assert np.all(hi.rates_hz.mean(axis=1) > lo.rates_hz.mean(axis=1))
    assert p.session(token).readout is None and p.session(token).history is None


def test_streamed_history_equals_the_recording_history(predictor, recording):
    """Consecutive contexts carry each unit's smoothed rates exactly; a window asked again gets the
    same answer; a gap or a window older than the kept states warns."""
    t, ids, all_ids = recording
    rt, rid = _window(recording, 0.0, 60.0)
    token = predictor.register(rt, rid, reference_window=(0.0, 60.0), units=all_ids, fit="none")
    index = {u: i for i, u in enumerate(all_ids)}
    u = np.array([index[x] for x in ids])
    ref = predictor.session(token).ref_rate_hz
    got = []
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no gap: no warning
        for c in np.arange(60.0, 66.0):
            ct, cid = _window(recording, c, c + 1.0)
            got.append(predictor.predict(token, ct, cid, context_start=float(c)).rates_hz)
    cfg = predictor.cfg
    for k, c in enumerate(np.arange(60.0, 66.0)):
        hist = ema_rates(t, u, n_units=all_ids.size, t_eval=[c + 1.0], start=0.0, ref_rate_hz=ref, taus=cfg.history_taus)[0]
        ct, cid = _window(recording, c, c + 1.0)
        explicit = predictor.predict(token, ct, cid, context_start=float(c), history_rates=hist)
        np.testing.assert_allclose(got[k], explicit.rates_hz, rtol=1e-5, atol=1e-6)
    ct, cid = _window(recording, 62.0, 63.0)  # asked again, after the stream moved on
    again = predictor.predict(token, ct, cid, context_start=62.0)
    np.testing.assert_allclose(again.rates_hz, got[2], rtol=1e-5, atol=1e-6)
    ct, cid = _window(recording, 80.0, 81.0)
    with pytest.warns(UserWarning, match="history incomplete"):
        predictor.predict(token, ct, cid, context_start=80.0)


def test_reference_fit_is_deterministic_and_keeps_only_units_it_helps(predictor, recording):
    _, _, all_ids = recording
    rt, rid = _window(recording, 0.0, 60.0)
    a = predictor.session(predictor.register(rt, rid, reference_window=(0.0, 60.0), units=all_ids))
    b = predictor.session(predictor.register(rt, rid, reference_window=(0.0, 60.0), units=all_ids))
    assert torch.equal(a.readout, b.readout)
    info = a.fit
    assert info["mode"] == "reference" and info["windows"] >= 50
    kept = (a.readout.abs().sum(1) > 0).sum().item()
    assert kept == info["units_fitted"] <= all_ids.size
    assert info["heldout_nll_fitted"] <= info["heldout_nll_zero_shot"]
    with pytest.raises(InputError, match="fit"):
        predictor.register(rt, rid, reference_window=(0.0, 60.0), fit="all")


def test_dense_reference_fit_uses_twice_the_windows_and_refits_alike(predictor, recording):
    """fit="reference-dense": the same fit on windows every 0.05 s (twice as many, the same span),
    deterministic, and a streaming refit keeps the registration's spacing."""
    _, _, all_ids = recording
    rt, rid = _window(recording, 0.0, 60.0)
    normal = predictor.session(predictor.register(rt, rid, reference_window=(0.0, 60.0), units=all_ids)).fit
    tok = predictor.register(rt, rid, reference_window=(0.0, 60.0), units=all_ids, fit="reference-dense")
    dense = predictor.session(tok)
    again = predictor.session(predictor.register(rt, rid, reference_window=(0.0, 60.0), units=all_ids, fit="reference-dense"))
    assert dense.fit["mode"] == "reference-dense" and dense.fit["window_step_s"] == 0.05 and normal["window_step_s"] == 0.1
    assert dense.fit["windows"] == 2 * normal["windows"] - 1  # every 0.05 s from the same first to the same last
    assert torch.equal(dense.readout, again.readout) and dense.fit["population_judged_gain"] == again.fit["population_judged_gain"]
    starts = fit_windows(0.0, 600.0, context_s=1.0, horizon_s=1.0, step_s=0.05)
    assert starts.size == 2 * MAX_WINDOWS and starts[0] == pytest.approx(WARMUP_S) and starts[-1] == pytest.approx(598.0)
    with pytest.raises(ValueError, match="step_s"):
        fit_readout(predictor.model, times=rt, units=np.zeros(rt.size, dtype=np.int64), reference=(0.0, 60.0),
                    unit_features=dense.features, ref_rate_hz=dense.ref_rate_hz, embeddings=dense.embeddings, step_s=0.0)
    d = make_session(seed=8, n_units=15, duration=115.0)  # a refit while streaming keeps the dense spacing
    ids = np.asarray(d["unit_ids"]).astype(str)
    t, ids_s = d["spike_times"], ids[d["unit_index"]]
    m = t < 60.0
    tok = predictor.register(t[m], ids_s[m], reference_window=(0.0, 60.0), units=ids, fit="reference-dense",
                             refit_every_s=50.0, refit_window_s=50.0)
    for c in np.arange(60.0, 111.0):
        w = (t >= c) & (t < c + 1.0)
        predictor.predict(tok, t[w], ids_s[w], context_start=float(c))
    last = predictor.session(tok).fit["last_refit"]
    assert last["window_step_s"] == 0.05 and last["windows"] > 1.9 * fit_windows(60.0, 110.0, context_s=1.0, horizon_s=1.0).size


def test_default_refit_window_is_the_reference_length_and_at_least_three_minutes(predictor, recording):
    from nh_serve.inference.streaming import DEFAULT_REFIT_WINDOW_S, default_refit_window

    _, _, all_ids = recording
    rt, rid = _window(recording, 0.0, 60.0)
    s = predictor.session(predictor.register(rt, rid, reference_window=(0.0, 60.0), units=all_ids, refit_every_s=60.0))
    assert DEFAULT_REFIT_WINDOW_S == 180.0 and s.refit.window_s == 180.0
    s = predictor.session(predictor.register(rt, rid, reference_window=(0.0, 60.0), units=all_ids, refit_every_s=60.0,
                                             refit_window_s=50.0))
    assert s.refit.window_s == 50.0
    assert default_refit_window((10.0, 310.0)) == 300.0 and default_refit_window((0.0, 30.0)) == 180.0


def test_short_reference_gets_the_calibration_alone(predictor, recording, monkeypatch):
    """A reference of 20-45 s is too short for per-unit fits: no read-outs and no population correction, but the
    pooled calibration is fitted (and judged) on it; under 20 s nothing is fitted."""
    import nh_serve.inference.reference_fit as rf

    _, _, all_ids = recording
    seen = []
    real_fit = rf.Calibration.fit

    def fit(**kw):  # the real fit, then a known floor weight, so that the calibration is kept whatever the data say
        seen.append(kw)
        cal, info = real_fit(**kw)
        cal.beta = 0.5
        return cal, info

    monkeypatch.setattr(rf.Calibration, "fit", fit)
    monkeypatch.setattr(rf.PopulationGLM, "fit", lambda *a, **k: pytest.fail("no population GLM on a 30 s reference"))
    rt, rid = _window(recording, 0.0, 30.0)
    s = predictor.session(predictor.register(rt, rid, reference_window=(0.0, 30.0), units=all_ids))
    assert s.fit["calibration_only"] and s.fit["units_fitted"] == 0 and "population_corrected" not in s.fit
    assert "floor_beta" in s.fit and "note" not in s.fit and "heldout_nll_fitted" not in s.fit and not s.readout.any()
    assert s.correction.population is None and s.correction.calibration.beta == 0.5
    assert len(seen) == 1 and seen[0]["level_taus"] == ()  # a registration: no level time scale
    rt, rid = _window(recording, 0.0, 15.0)
    s = predictor.session(predictor.register(rt, rid, reference_window=(0.0, 15.0), units=all_ids))
    assert "20 s" in s.fit["note"] and "floor_beta" not in s.fit and "calibration_only" not in s.fit
    assert s.correction is None and len(seen) == 1


def test_calibration_is_fitted_on_top_of_the_population_correction(predictor, recording, monkeypatch):
    """The calibration's offset is the population GLM's offset on the read-out's windows plus the kept correction;
    each of its folds is judged with that fold's own correction (fitted without the part that judges), not the
    correction refitted on every window."""
    import nh_serve.inference.reference_fit as rf

    seen = {}
    real_pop_fit, real_cal_fit = rf.PopulationGLM.fit, rf.Calibration.fit

    def pop_fit(self, R, y, *, offset=None, bins=None, gap=0):
        out = real_pop_fit(self, R, y, offset=offset, bins=bins, gap=gap)
        seen["offset"] = offset.copy()  # (W, U, T) log expected counts
        out.corrected = True  # kept, with a known correction (another per fold)
        out.log_correction = lambda R, bins=None, fold=None: np.full(
            (*R.shape[:2], predictor.cfg.n_bins), 0.25 if fold is None else 0.5 + fold, np.float32)
        return out

    def cal_fit(cls, **kw):
        seen["log_expected"] = kw["log_expected"].copy()
        seen["folds"] = [e.copy() for e in kw["log_expected_folds"]]
        return real_cal_fit(**kw)

    monkeypatch.setattr(rf.PopulationGLM, "fit", pop_fit)
    monkeypatch.setattr(rf.Calibration, "fit", classmethod(cal_fit))
    _, _, all_ids = recording
    rt, rid = _window(recording, 0.0, 60.0)
    predictor.register(rt, rid, reference_window=(0.0, 60.0), units=all_ids)
    step = int(round(rf.READOUT_STEP_S / rf.STEP_S))
    np.testing.assert_allclose(seen["log_expected"], seen["offset"][::step] + 0.25, rtol=1e-12)
    for f, e in enumerate(seen["folds"]):
        np.testing.assert_allclose(e, seen["offset"][::step] + 0.5 + f, rtol=1e-12)


def test_rate_correction_multiplies_the_network_rates(predictor, recording):
    """fit="reference" also fits a population GLM and the recording's calibration on top of the network (every
    backend applies them alike): a session without them predicts the network's rates, and the ratio is
    exp(population correction) times the calibration's factor of the window's history and rates."""
    _, _, all_ids = recording
    rt, rid = _window(recording, 0.0, 60.0)
    tok = predictor.register(rt, rid, reference_window=(0.0, 60.0), units=all_ids)
    s = predictor.session(tok)
    assert isinstance(s.fit["population_corrected"], bool)
    assert 0.0 <= s.fit["floor_beta"] <= 1.0 and 0.0 <= s.fit["shrink_gamma"] <= 1.0
    # whatever this reference earned, apply a known correction: a population GLM, half the floor, a third of
    # the departures
    rng = np.random.default_rng(0)
    R = np.stack([h for _, h in s.history_states] * 20) * np.exp(0.3 * rng.normal(size=(20, *s.history_states[0][1].shape)))
    population = PopulationGLM(n_bins=predictor.cfg.n_bins, bin_size=predictor.cfg.bin_size_s,
                               taus=predictor.cfg.history_taus).fit(R, rng.poisson(0.1, (20, len(all_ids), predictor.cfg.n_bins)))
    population.W *= 0.1
    population.max_log = CORRECTION_MAX_LOG
    i_slow = list(predictor.cfg.history_taus).index(SLOW_TAU)
    cal = Calibration(beta=0.5, gamma=1 / 3, i_slow=i_slow, n_bins=predictor.cfg.n_bins, bin_size=predictor.cfg.bin_size_s)
    s.correction = RateCorrection(population=population, calibration=cal)
    bare = predictor.session(predictor.register(rt, rid, reference_window=(0.0, 60.0), units=all_ids))
    bare.correction = None
    ct, cid = _window(recording, 60.0, 61.0)
    with_c = predictor.predict(tok, ct, cid, context_start=60.0)
    without = predictor.predict(bare.token, ct, cid, context_start=60.0)
    hist = s.history_states[-1][1][None]  # (1, U, K) at the context end
    slow = hist[0, :, i_slow].astype(np.float64)
    corrected = without.rates_hz * np.exp(population.log_correction(hist.astype(np.float64))[0])  # (U, T)
    bands = cal.bands
    band_mean = np.stack([corrected[:, bands == b].mean(1) for b in range(bands.max() + 1)], 1)[:, bands]  # (U, T)
    want = corrected * np.sqrt((slow + FLOOR_HZ) / (slow + LOG_FLOOR_HZ))[:, None] * ((slow + LOG_FLOOR_HZ)[:, None] / band_mean) ** (1 / 3)
    np.testing.assert_allclose(with_c.rates_hz, want, rtol=1e-4, atol=1e-6)
    assert predictor.session(predictor.register(rt, rid, reference_window=(0.0, 60.0), fit="none")).correction is None


def test_adaptation_lowers_the_reference_loss_and_stays_within_budget(predictor, recording):
    rt, rid = _window(recording, 0.0, 60.0)
    token = predictor.register(rt, rid, reference_window=(0.0, 60.0), adapt_steps=30, adapt_time_budget_s=30.0)
    s = predictor.session(token)
    info = s.adaptation
    assert info["steps"] > 0 and info["windows"] > 10
    base = predictor.session(predictor.register(rt, rid, reference_window=(0.0, 60.0)))
    assert not torch.equal(s.embeddings, base.embeddings)
    assert info["loss_after"] < info["loss_before"]
    # Model weights stay frozen and trainable afterwards.
    assert all(p.requires_grad for p in predictor.model.parameters())
    t0 = time.monotonic()
    predictor.register(rt, rid, reference_window=(0.0, 60.0), adapt_steps=10_000, adapt_time_budget_s=0.5)
    assert time.monotonic() - t0 < 10.0


def test_session_cache_is_lru_with_ttl():
    def sess(tok):
        return RegisteredSession(
            token=tok, unit_ids=np.array(["a"]), reference=(0, 10), features=np.zeros((1, 33)),
            ref_rate_hz=np.ones(1), embeddings=torch.zeros(1, 4),
        )

    c = SessionCache(max_sessions=2, ttl_s=60.0)
    c.put(sess("a"))
    c.put(sess("b"))
    c.get("a")  # a is now most recent
    c.put(sess("c"))  # evicts b
    assert c.get("a").token == "a" and c.get("c").token == "c"
    with pytest.raises(InputError, match="unknown or expired"):
        c.get("b")
    assert c.evictions == 1 and c.misses == 1 and c.hits >= 2
    c.get("a").last_used -= 120.0  # pretend a was last used 2 minutes ago
    with pytest.raises(InputError, match="expired"):
        c.get("a")
    with pytest.raises(ValueError):
        SessionCache(max_sessions=0)


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(unit_ids=["nope"] * 3), "not in the registered reference"),
        (dict(spike_times=[70.1, 70.2, 71.5]), "outside the window"),
        (dict(spike_times=[70.2, 70.1, 70.3]), "not sorted"),
        (dict(spike_times=[70.1, float("nan"), 70.3]), "finite"),
        (dict(spike_times=[70.1, 70.2]), "one unit id per spike"),
        (dict(spike_times=np.array(["a", "b", "c"])), "numbers"),
        (dict(horizon_s=2.0), "horizon"),
        (dict(horizon_s=0.013), "multiple"),
        (dict(history_counts=[1.0, 2.0]), "history_counts"),
        (dict(history_counts=np.full(23, 1e300), history_duration_s=1e-300), "rate above"),
        (dict(behavior=(np.array([70.5]), np.ones((1, 3)))), "behavior"),
        (dict(session="not-a-token"), "unknown or expired"),
    ],
)
def test_predict_rejects_bad_input(predictor, recording, change, match):
    _, _, all_ids = recording
    rt, rid = _window(recording, 0.0, 60.0)
    token = predictor.register(rt, rid, reference_window=(0.0, 60.0), units=all_ids)
    kw = dict(session=token, spike_times=[70.1, 70.2, 70.3], unit_ids=list(all_ids[:3]), context_start=70.0)
    kw.update(change)
    with pytest.raises(InputError, match=match):
        predictor.predict(kw.pop("session"), kw.pop("spike_times"), kw.pop("unit_ids"), **kw)


@pytest.mark.parametrize(
    "args, kwargs, match",
    [
        (([], []), {}, "no spikes"),
        (([1.0, 2.0], ["a"]), {}, "one unit id per spike"),
        (([1.0, 20.0], ["a", "a"]), dict(reference_window=(0.0, 5.0)), "at least 10 s"),
        (([1.0, 30.0], ["a", "b"]), dict(units=[]), "zero units"),
        (([1.0, 30.0], ["a", "b"]), dict(units=["a", "a", "b"]), "unique"),
        (([1.0, 30.0], ["a", "c"]), dict(units=["a", "b"]), "not in the registered reference"),
        (([30.0, 1.0], ["a", "b"]), dict(reference_window=(0.0, 60.0)), "not sorted"),
        (([1.0, 70.0], ["a", "b"]), dict(reference_window=(0.0, 60.0)), "outside the window"),
    ],
)
def test_register_rejects_bad_input(predictor, args, kwargs, match):
    with pytest.raises(InputError, match=match):
        predictor.register(*args, **kwargs)


def test_unknown_backend_and_bad_checkpoints(ckpt_path, tmp_path):
    with pytest.raises(InputError, match="backend"):
        Predictor.load(ckpt_path, backend="no-such-backend")
    with pytest.raises(CheckpointError):
        Predictor.load(tmp_path / "missing.safetensors")
    # Weights that do not fit the stored config are named, not a torch traceback.
    model, norm, ck = load_model(ckpt_path)
    bad = dict(ck.state_dict)
    bad.pop(next(iter(bad)))
    from nh_serve.inference.checkpoint import save_checkpoint

    save_checkpoint(tmp_path / "bad.safetensors", state_dict=bad, config=ck.config, feature_norm=ck.feature_norm)
    with pytest.raises(CheckpointError, match="missing"):
        Predictor.load(tmp_path / "bad.safetensors")
    cfg = dict(ck.config, dim=64)
    save_checkpoint(tmp_path / "bad2.safetensors", state_dict=ck.state_dict, config=cfg, feature_norm=ck.feature_norm)
    with pytest.raises(CheckpointError, match="shape"):
        Predictor.load(tmp_path / "bad2.safetensors")


def test_multimodal_model_serves_with_and_without_extra_inputs(tmp_path, recording):
    torch.manual_seed(0)
    model = NeuroHorizon(get_config("nh-tiny", behavior_dim=2, image_dim=8))
    save_model(tmp_path / "mm.safetensors", model, feature_norm=FeatureNorm.identity(model.cfg.n_features))
    p = Predictor.load(tmp_path / "mm.safetensors", backend="torch")
    rt, rid = _window(recording, 0.0, 60.0)
    token = p.register(rt, rid, reference_window=(0.0, 60.0))
    ct, cid = _window(recording, 70.0, 71.0)
    plain = p.predict(token, ct, cid, context_start=70.0)
    rng = np.random.default_rng(0)
    beh = (np.linspace(70.0, 70.99, 50), rng.normal(size=(50, 2)))
    img = (np.array([70.3, 70.8]), rng.normal(size=(2, 8)))
    full = p.predict(token, ct, cid, context_start=70.0, behavior=beh, images=img)
    assert np.all(np.isfinite(plain.rates_hz)) and np.all(np.isfinite(full.rates_hz))
    assert not np.allclose(plain.rates_hz, full.rates_hz)
    with pytest.raises(InputError, match="image"):
        p.predict(token, ct, cid, context_start=70.0, images=(np.array([70.3]), np.ones((1, 5))))


def test_streaming_refit_fits_the_read_outs_again_on_recent_data(predictor):
    d = make_session(seed=8, n_units=15, duration=175.0)
    ids = np.asarray(d["unit_ids"]).astype(str)
    t, ids_s = d["spike_times"], ids[d["unit_index"]]
    m = t < 60.0
    token = predictor.register(t[m], ids_s[m], reference_window=(0.0, 60.0), units=ids, refit_every_s=50.0,
                               refit_window_s=50.0)
    s = predictor.session(token)
    first_judged = (s.fit["readout_judged_gain"], s.fit["population_judged_gain"])
    for c in np.arange(60.0, 170.0):
        w = (t >= c) & (t < c + 1.0)
        predictor.predict(token, t[w], ids_s[w], context_start=float(c))
    assert s.fit["refits"] == 2  # at 110 and 160 s of stream time
    assert s.fit["last_refit"]["window"] == [pytest.approx(110.0), pytest.approx(160.0)]
    last = s.fit["last_refit"]  # both fits were made again, on other data: they judge it differently
    assert isinstance(last["population_corrected"], bool)
    assert (last["readout_judged_gain"], last["population_judged_gain"]) != first_judged
    # the same stream again gives the same read-outs (deterministic)
    token2 = predictor.register(t[m], ids_s[m], reference_window=(0.0, 60.0), units=ids, refit_every_s=50.0,
                                refit_window_s=50.0)
    for c in np.arange(60.0, 170.0):
        w = (t >= c) & (t < c + 1.0)
        predictor.predict(token2, t[w], ids_s[w], context_start=float(c))
    s2 = predictor.session(token2)
    assert torch.equal(s2.readout, s.readout) and s2.fit["last_refit"]["population_judged_gain"] == last["population_judged_gain"]
    assert (last["floor_beta"], last["shrink_gamma"]) == (s2.fit["last_refit"]["floor_beta"], s2.fit["last_refit"]["shrink_gamma"])
    # a refit's rates come from the stream that ran before its window: it may move the level toward every time scale
    # the history holds; a registration (whose rates inside the reference start at its mean) toward none
    assert last["level_lambda"] == s2.fit["last_refit"]["level_lambda"] and set(last["level_lambda"]) == {"5", "120"}
    assert s.fit["level_lambda"] == {}
    assert (s2.correction is None) == (s.correction is None)
    if s.correction is not None and s.correction.population is not None:
        np.testing.assert_array_equal(s2.correction.population.W, s.correction.population.W)
    with pytest.raises(InputError, match="refit_window_s"):
        predictor.register(t[m], ids_s[m], reference_window=(0.0, 60.0), refit_every_s=20.0, refit_window_s=20.0)
    with pytest.raises(InputError, match="refit_every_s"):
        predictor.register(t[m], ids_s[m], reference_window=(0.0, 60.0), refit_every_s=0.1)
    with pytest.raises(InputError, match="set refit_every_s too"):
        predictor.register(t[m], ids_s[m], reference_window=(0.0, 60.0), refit_window_s=120.0)

"""The population forecast (nh_serve.core.population_forecast): its lag features by hand, the context counts
the model's tokenizer makes, fits that see only the times they are given, and a population whose latent
oscillation the forecast reads better than the population GLM's components now."""

import math

import numpy as np
import pytest

from nh_serve.core.config import get_config
from nh_serve.core.glm import (
    BASELINE_CONTEXT_BINS,
    PopulationGLM,
    _band_targets,
    band_index,
    fit_population_glm,
    window_counts,
)
from nh_serve.core.population_forecast import (
    BIN_PRIOR,
    FORECAST_LAG_S,
    PopulationForecast,
    lag_features,
    n_lags,
)
from nh_serve.data.history import HISTORY_TAUS, ema_rates
from nh_serve.data.tokens import tokenize
from nh_serve.data.windows import target_counts
from nh_serve.evaluation.metrics import bits_per_spike

NB, BS = 50, 0.02


def oscillating_population(seed=0, n_units=40, duration=200.0, freq=1.5):
    """Poisson units whose log rates load on a 1.5 Hz oscillation of random phase drift (a damped AR(2)-like
    latent): its phase, not its value now, says where the rates go in the next second."""
    rng = np.random.default_rng(seed)
    dt = 0.005
    n = int(duration / dt)
    z = np.zeros(n, dtype=complex)
    a = np.exp((-1.0 / 3.0 + 2j * np.pi * freq) * dt)
    noise = (rng.normal(size=n) + 1j * rng.normal(size=n)) * math.sqrt(1 - abs(a) ** 2)
    for i in range(1, n):
        z[i] = a * z[i - 1] + noise[i]
    lat = np.stack([z.real, z.imag], 1) / np.std(z.real)
    w = rng.normal(size=(n_units, 2)) * 0.6
    base = rng.uniform(3.0, 12.0, n_units)
    rates = base * np.exp(lat @ w.T)  # (n, U) Hz
    counts = rng.poisson(rates * dt)
    tt, uu = np.nonzero(counts)
    reps = counts[tt, uu]
    t = np.repeat((tt + rng.uniform(size=tt.size)) * dt, reps)
    u = np.repeat(uu, reps)
    o = np.argsort(t, kind="stable")
    return t[o], u[o].astype(np.int64), n_units


def test_lag_features_by_hand_most_recent_bin_first():
    bins = np.array([[[0.0, 1.0, 2.0, 3.0]]])  # (P=1, U=1, nb=4), oldest first
    r = np.array([[4.0]])
    got = lag_features(bins, r, 0.1, 3)
    c = np.array([3.0, 2.0, 1.0])
    want = np.log((c + BIN_PRIOR * 4.0 * 0.1) / (0.1 * (1 + BIN_PRIOR)) + 0.1) - np.log(4.1)
    np.testing.assert_allclose(got[0, 0], want, rtol=1e-12)
    assert n_lags(0.1, 10) == round(FORECAST_LAG_S / 0.1)
    assert n_lags(0.5, 10) == 1 and n_lags(0.01, 5) == 5  # at least one bin, at most all of them


def _hist(t, u, U, t0, span, nb):
    """Each unit's counts in ``nb`` equal bins of ``[t0, t0 + span)``, by histogram (independent of the module)."""
    edges = t0 + np.linspace(0.0, span, nb + 1)
    return np.stack([np.histogram(t[u == k], bins=edges)[0] for k in range(U)]).astype(np.float32)


def test_window_counts_and_the_tokenizers_unit_bins_are_the_contexts_binned_counts():
    t, u, U = oscillating_population(duration=20.0, n_units=7)
    nb = BASELINE_CONTEXT_BINS[1]
    t_now = np.array([3.0, 7.55, 12.0])
    got = window_counts(t, u, t_now, n_units=U)
    for i, tn in enumerate(t_now):
        m = (t >= tn - 1.0) & (t < tn)
        assert got[i].sum() == m.sum() > 0
        np.testing.assert_array_equal(got[i], _hist(t[m], u[m], U, tn - 1.0, 1.0, nb))
    cfg = get_config("nh-tiny")  # the model's tokenizer bins its context the same way
    assert cfg.pop_context_bins
    m = (t >= 2.0) & (t < 3.0)
    item = tokenize(cfg, unit_features=np.zeros((U, cfg.n_features), np.float32), spike_times=t[m],
                    spike_unit_index=u[m], ctx_start=2.0, ref_rate_hz=np.ones(U))
    np.testing.assert_array_equal(item["unit_bins"].numpy(), _hist(t[m], u[m], U, 2.0, cfg.context_s, cfg.pop_context_bins))


def _fit_inputs(seed=0, U=30, P=200):
    rng = np.random.default_rng(seed)
    pcs = rng.normal(size=(P, 8))
    bins = rng.poisson(0.5, size=(P, U, 10)).astype(np.float64)
    r = rng.uniform(1.0, 8.0, size=(P, U))
    per = rng.poisson(2.0, size=(6, P, U)).astype(np.float64)
    return pcs, bins, r, per, np.array([2.0, 3, 5, 10, 15, 15])


def test_forecast_is_deterministic_and_each_fold_sees_only_its_own_times():
    """The correction's folds: a fold's forecast is fitted on its fit times only, so changing the targets of the
    other times leaves its design as it was, while the forecast fitted on all times follows them."""
    t, u, U = oscillating_population(duration=80.0, n_units=20)
    ref = np.bincount(u[t < 60.0], minlength=U) / 60.0
    pos = np.arange(1.0, 59.0, 0.1)
    R = ema_rates(t, u, n_units=U, t_eval=pos, start=0.0, ref_rate_hz=ref, taus=HISTORY_TAUS)
    y = target_counts(t, u, pos, n_units=U, bin_size=BS, n_bins=NB)
    bins = window_counts(t, u, pos, n_units=U)
    per, nb = _band_targets(y, band_index(NB, BS), 6)
    changed = per.copy()
    changed[:, 300:] = changed[:, 300:][:, ::-1]  # other targets after the first 300 times

    def designs(targets):
        glm = PopulationGLM(n_bins=NB, bin_size=BS, context_bins=(0.1, 10))
        glm._fit_pcs(R)
        X, _, folds = glm._design(R, bins, fitting=True, targets=(targets, nb), fold_rows=(slice(0, 300),))
        return np.stack([x.shared for x in X]), np.stack([x.shared for x in folds[0]])

    all_a, fold_a = designs(per)
    all_b, fold_b = designs(changed)
    np.testing.assert_array_equal(fold_a, fold_b)
    assert np.abs(all_a - all_b).max() > 1e-3
    np.testing.assert_array_equal(all_a, designs(per)[0])  # deterministic
    # on the times it was fitted on each band's forecast is standardised (the last column is the 1)
    np.testing.assert_allclose(fold_a[:, :300, :-1].std(1), 1.0, atol=0.05)


def test_bad_arguments_say_what_is_wrong():
    with pytest.raises(ValueError, match="ridge"):
        PopulationForecast(components=8, bin_s=0.1, n_bins=10, ridge=0.0)
    pcs, bins, r, per, nb = _fit_inputs()
    f = PopulationForecast(components=8, bin_s=0.1, n_bins=10)
    f.fit(pcs, f.lags(bins, r), per, nb)
    with pytest.raises(ValueError, match="context bins"):
        f.lags(bins[..., :5], r)
    R = np.ones((20, 3, len(HISTORY_TAUS)))
    glm = PopulationGLM(n_bins=NB, bin_size=BS, context_bins=(0.1, 10))
    with pytest.raises(ValueError, match="context counts"):
        glm.fit(R, np.zeros((20, 3, NB)))


def test_the_forecast_reads_an_oscillation_the_components_now_miss():
    """Fitted on the first 100 s and scored on the next 100 s: the forecast GLM beats the population GLM, most of
    all past the first 200 ms, where only the oscillation's phase tells which way the rates go."""
    t, u, U = oscillating_population()
    ref = np.bincount(u[t < 100.0], minlength=U) / 100.0
    kw = dict(n_units=U, start=0.0, ref_rate_hz=ref, fit_from=0.0, fit_to=100.0, n_bins=NB, bin_size=BS)
    plain = fit_population_glm(t, u, **kw)
    fc = fit_population_glm(t, u, forecast=True, **kw)
    pos = np.arange(101.0, 198.0, 0.5)
    R = ema_rates(t, u, n_units=U, t_eval=pos, start=0.0, ref_rate_hz=ref, taus=HISTORY_TAUS)
    y = target_counts(t, u, pos, n_units=U, bin_size=BS, n_bins=NB)
    bins = window_counts(t, u, pos, n_units=U)
    a, b = plain.predict(R), fc.predict(R, bins)
    late = band_index(NB, BS) >= 3  # 200 ms and later
    assert bits_per_spike(b, y) > bits_per_spike(a, y) + 0.01
    assert bits_per_spike(b[..., late], y[..., late]) > bits_per_spike(a[..., late], y[..., late]) + 0.01
    # the forecast differs per band
    X, _, _ = fc._design(R, bins)
    assert len(X) == 6 and not np.allclose(X[0].shared, X[5].shared)


def test_a_correction_reading_the_forecast_is_kept_and_helps_later_windows():
    """The registration's correction with the forecast: fitted on the first minute on top of a flat predictor, it
    is kept, never scales a rate past its bound, needs the windows' counts at prediction time, and predicts the
    next minute better than the predictor alone."""
    t, u, U = oscillating_population(duration=125.0, n_units=25)
    ref = np.bincount(u[t < 60.0], minlength=U) / 60.0

    def windows(pos):
        R = ema_rates(t, u, n_units=U, t_eval=pos, start=0.0, ref_rate_hz=ref, taus=HISTORY_TAUS)
        y = target_counts(t, u, pos, n_units=U, bin_size=BS, n_bins=NB)
        flat = np.broadcast_to(np.log(ref * BS + 1e-3)[None, :, None], y.shape).copy()  # log expected counts
        return R, y, window_counts(t, u, pos, n_units=U), flat

    R, y, bins, flat = windows(np.arange(1.0, 59.0, 0.1))
    glm = PopulationGLM(n_bins=NB, bin_size=BS, context_bins=(0.1, 10)).fit(R, y, offset=flat, bins=bins)
    assert glm.corrected
    corr = glm.log_correction(R, bins)
    assert corr.shape == y.shape and np.abs(corr).max() <= glm.max_log + 1e-6
    with pytest.raises(ValueError, match="context counts"):
        glm.log_correction(R)
    R, y, bins, flat = windows(np.arange(61.0, 124.0, 0.5))
    alone = bits_per_spike(np.exp(flat), y)
    corrected = bits_per_spike(np.exp(flat + glm.log_correction(R, bins)), y)
    assert corrected > alone + 0.02


def test_forecast_directions_are_the_top_directions_of_the_ridge_fit():
    """Each band's forecast is the ridge regression's fitted values projected on their leading right singular
    vectors (the module computes them from a small triangular factor; here straight from an SVD)."""
    pcs, bins, r, per, nb = _fit_inputs(seed=3, U=25, P=160)
    f = PopulationForecast(components=8, bin_s=0.1, n_bins=10)
    X = f.lags(bins, r)
    f.fit(pcs, X, per, nb)
    S = (f._shared(pcs, X) - f.s_mu) / f.s_sd
    S1 = np.concatenate([S, np.ones((S.shape[0], 1))], 1)
    pen = f.ridge * S.shape[0] * np.diag(np.r_[np.ones(S.shape[1]), 0.0])
    for b in (0, 5):
        Y = np.sqrt(per[b] / nb[b])
        Y = (Y - Y.mean(0)) / (Y.std(0) + 0.05)
        B = np.linalg.solve(S1.T @ S1 + pen, S1.T @ Y)
        fitted = S1 @ B
        _, _, vt = np.linalg.svd(fitted - fitted.mean(0), full_matrices=False)
        want = B @ vt[: f.rank].T  # (F + 1, rank), each column up to its sign
        got = f.M[b]
        signs = np.sign((want * got).sum(0))
        np.testing.assert_allclose(got, want * signs, rtol=1e-6, atol=1e-9)

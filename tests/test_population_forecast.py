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
from nh_serve.data.tokens import context_counts, tokenize
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


def test_window_counts_are_the_tokenizers_unit_bins():
    t, u, U = oscillating_population(duration=20.0, n_units=7)
    cfg = get_config("nh-tiny")
    nb = BASELINE_CONTEXT_BINS[1]
    t_now = np.array([3.0, 7.55, 12.0])
    got = window_counts(t, u, t_now, n_units=U)
    for i, tn in enumerate(t_now):
        m = (t >= tn - 1.0) & (t < tn)
        assert got[i].sum() == m.sum()
        np.testing.assert_array_equal(got[i], context_counts(t[m] - (tn - 1.0), u[m], n_units=U, context_s=1.0, n_bins=nb))
    if cfg.pop_context_bins:  # the model's tokenizer bins its context with the same function
        item = tokenize(cfg, unit_features=np.zeros((U, cfg.n_features), np.float32), spike_times=t[(t >= 2.0) & (t < 3.0)],
                        spike_unit_index=u[(t >= 2.0) & (t < 3.0)], ctx_start=2.0, ref_rate_hz=np.ones(U))
        want = context_counts(t[(t >= 2.0) & (t < 3.0)] - 2.0, u[(t >= 2.0) & (t < 3.0)], n_units=U, context_s=cfg.context_s,
                              n_bins=cfg.pop_context_bins)
        np.testing.assert_array_equal(item["unit_bins"].numpy(), want)


def _fit_inputs(seed=0, U=30, P=200):
    rng = np.random.default_rng(seed)
    pcs = rng.normal(size=(P, 8))
    bins = rng.poisson(0.5, size=(P, U, 10)).astype(np.float64)
    r = rng.uniform(1.0, 8.0, size=(P, U))
    per = rng.poisson(2.0, size=(6, P, U)).astype(np.float64)
    return pcs, bins, r, per, np.array([2.0, 3, 5, 10, 15, 15])


def test_forecast_is_deterministic_and_sees_only_the_times_it_is_fitted_on():
    pcs, bins, r, per, nb = _fit_inputs()
    f = PopulationForecast(components=8, bin_s=0.1, n_bins=10)
    X = f.lags(bins, r)  # (P, U, n_lag)
    a = f.fit(pcs[:150], X[:150], per[:, :150], nb).features(pcs, X)
    assert a.shape == (6, 200, 8) and np.all(np.isfinite(a)) and np.abs(a).max() <= 5.0
    changed = per.copy()
    changed[:, 150:] *= 7.0  # later targets differ: a fit on the first 150 times must not notice
    b = PopulationForecast(components=8, bin_s=0.1, n_bins=10).fit(pcs[:150], X[:150], changed[:, :150], nb)
    np.testing.assert_array_equal(a, b.features(pcs, X))
    # on the fitted times each band's features are standardised
    np.testing.assert_allclose(a[:, :150].std(1), 1.0, atol=1e-3)


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
    # the plain GLM's design is one for every band; the forecast's differs per band
    X, _ = fc._design(R, bins)
    assert len(X) == 6 and not np.allclose(X[0].shared, X[5].shared)
    per, nbb = _band_targets(y, band_index(NB, BS), 6)
    assert per.shape == (6, pos.size, U) and nbb.sum() == NB


def test_a_correction_reading_the_forecast_is_applied_from_the_windows_counts():
    """The registration's correction with the forecast: fitted with an offset, it needs the windows' counts at
    prediction time and gives a finite, bounded log factor."""
    t, u, U = oscillating_population(duration=120.0, n_units=25)
    ref = np.bincount(u[t < 60.0], minlength=U) / 60.0
    pos = np.arange(1.0, 59.0, 0.1)
    R = ema_rates(t, u, n_units=U, t_eval=pos, start=0.0, ref_rate_hz=ref, taus=HISTORY_TAUS)
    y = target_counts(t, u, pos, n_units=U, bin_size=BS, n_bins=NB)
    bins = window_counts(t, u, pos, n_units=U)
    offset = np.broadcast_to(np.log(ref * BS + 1e-3)[None, :, None], y.shape).copy()
    glm = PopulationGLM(n_bins=NB, bin_size=BS, context_bins=(0.1, 10)).fit(R, y, offset=offset, bins=bins)
    assert glm.level in ("strict", "none")
    corr = glm.log_correction(R, bins)
    assert corr.shape == y.shape and np.all(np.abs(corr) <= glm.max_log + 1e-6)
    if glm.level == "strict":
        assert np.abs(corr).max() > 0
    with pytest.raises(ValueError, match="context counts"):
        glm.log_correction(R)


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

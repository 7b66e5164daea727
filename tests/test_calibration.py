"""A recording's calibration (nh_serve.core.calibration): the pooled weights are the Poisson maximum-likelihood
ones on the box [0, 1]^n, kept only where held-out data gain, and applied as the documented factor."""

from __future__ import annotations

import numpy as np
import pytest

from nh_serve.core.calibration import (
    FLOOR_HZ,
    LEVEL_TAUS,
    Calibration,
    fit_calibration,
    floor_feature,
    level_features,
)
from nh_serve.core.glm import band_index, band_sums
from nh_serve.data.history import LOG_FLOOR_HZ

BIN_S, T = 0.02, 50
BANDS = band_index(T, BIN_S)


def _recording(beta: float, gamma: float, *, P: int = 300, U: int = 40, seed: int = 0, draw_seed: int | None = None):
    """Half busy, half nearly silent units; a model whose bands depart from the slow rate by noise; band counts
    drawn (with ``draw_seed``, default ``seed``) from the model's rates with the floor taken out by ``beta`` and
    the departures shrunk by ``gamma``."""
    rng = np.random.default_rng(seed)
    level = np.concatenate([rng.uniform(2.0, 20.0, U // 2), rng.uniform(0.0, 0.3, U - U // 2)])  # (U,) Hz
    slow = level[None] * np.exp(0.5 * rng.normal(size=(P, U)))  # (P, U) r30 at each fit time
    o = np.log(slow + LOG_FLOOR_HZ)
    d = 0.4 * rng.normal(size=(P, U, BANDS.max() + 1))  # (P, U, B) the model's departures
    per_band = np.bincount(BANDS)
    expected = np.exp(o[..., None] + d) * per_band * BIN_S  # (P, U, B) counts the model expects
    f = floor_feature(slow)
    draw = rng if draw_seed is None else np.random.default_rng(draw_seed)
    counts = draw.poisson(expected * np.exp(beta * f[..., None] - gamma * d))
    return f, d, counts, expected


def test_floor_feature_is_zero_for_busy_units_and_log_ratio_for_silent():
    f = floor_feature(np.array([0.0, 1e6, 0.5, -1.0]))
    assert f[0] == pytest.approx(np.log(FLOOR_HZ / LOG_FLOOR_HZ))
    assert f[1] == pytest.approx(0.0, abs=1e-6)
    assert f[2] == pytest.approx(np.log((0.5 + FLOOR_HZ) / (0.5 + LOG_FLOOR_HZ)))
    assert f[3] == f[0]  # a negative rate counts as silent


@pytest.mark.parametrize(("beta", "gamma"), [(0.3, 0.0), (0.8, 0.5), (0.0, 0.7), (0.5, 1.0)])
def test_fit_recovers_both_weights(beta, gamma):
    f, d, c, m = _recording(beta, gamma)
    (b, g), info = fit_calibration(f, d, c, m)
    assert b == pytest.approx(beta, abs=0.1) and g == pytest.approx(gamma, abs=0.1)
    assert info["calibration_judged_gain_nats"] > 2.0
    # the maximum of the pooled likelihood in the box: no nearby feasible point fits better
    eta = lambda bb, gg: bb * f[..., None] - gg * d  # noqa: E731
    nll = lambda bb, gg: float((m * np.exp(eta(bb, gg)) - c * eta(bb, gg)).sum())  # noqa: E731
    for db, dg in ((0.02, 0), (-0.02, 0), (0, 0.02), (0, -0.02)):
        nb, ng = b + db, g + dg
        if 0.0 <= nb <= 1.0 and 0.0 <= ng <= 1.0:
            assert nll(b, g) <= nll(nb, ng) + 1e-6


def test_weights_outside_the_box_land_on_its_edge():
    f, d, c, m = _recording(1.6, 0.4)
    (b, g), _ = fit_calibration(f, d, c, m)
    assert b == 1.0 and g == pytest.approx(0.4, abs=0.1)
    f, d, c, m = _recording(0.5, -0.8, seed=2)  # the data want the departures amplified: the box keeps none of that
    assert fit_calibration(f, d, c, m)[0][1] == 0.0


def test_nothing_to_calibrate_keeps_none():
    f, d, c, m = _recording(0.0, 0.0, seed=3)
    (b, g), info = fit_calibration(f, d, c, m)
    assert (b, g) == (0.0, 0.0) and info["calibration_judged_gain_nats"] <= 2.0


def test_a_gain_that_does_not_carry_over_is_not_kept():
    """The weights are judged on held-out times: a calibration that only the fitted times show is dropped."""
    f, d, c, m = _recording(0.9, 0.8, P=400)
    _, _, c0, _ = _recording(0.0, 0.0, P=400, draw_seed=9)  # the same model, counts without the effect
    c = c.copy()
    c[280:] = c0[280:]  # the effect only in times 120-280, which both folds fit on (the first 70% forward,
    c[:120] = c0[:120]  # the last 70% mirrored) and neither judges on (the last 15%, the first 15%)
    (b, g), info = fit_calibration(f, d, c, m)
    assert info["calibration_judged_gain_nats"] < 2.0 and (b, g) == (0.0, 0.0)


def test_each_fold_is_judged_with_its_own_offset():
    """``folds`` gives each fold the offset of a predictor fitted without its judging part: the gain is judged
    with those, the weights kept are fitted with the one offset. A fold offset that already holds the
    calibration's effect leaves nothing to gain; the default (the one offset for both folds) is the same as
    passing it twice."""
    f, d, c, m = _recording(0.8, 0.5)
    w, info = fit_calibration(f, d, c, m)
    w2, info2 = fit_calibration(f, d, c, m, folds=[(d, m), (d, m)])
    np.testing.assert_array_equal(w, w2)
    assert info == info2 and info["calibration_judged_gain_nats"] > 2.0
    m_true = m * np.exp(0.8 * f[..., None] - 0.5 * d)  # the counts' own expectation: nothing left to calibrate
    d_true = d + np.log(m_true / m)
    w3, info3 = fit_calibration(f, d, c, m, folds=[(d_true, m_true), (d_true, m_true)])
    assert info3["calibration_judged_gain_nats"] < 2.0 and not w3.any()
    with pytest.raises(ValueError, match="folds"):
        fit_calibration(f, d, c, m, folds=[(d, m)])


def test_calibration_applies_the_documented_factor():
    rng = np.random.default_rng(1)
    W, U, K, i_slow = 3, 5, 6, 4
    R = rng.uniform(0.0, 4.0, size=(W, U, K))
    log_r = np.log(rng.uniform(0.5, 8.0, size=(W, U, T)))
    cal = Calibration(beta=0.6, gamma=0.3, i_slow=i_slow, n_bins=T, bin_size=BIN_S)
    got = cal.log_factor(log_r, R)
    r30 = R[..., i_slow]
    for b in range(BANDS.max() + 1):
        band_mean = np.exp(log_r[..., BANDS == b]).mean(-1)  # (W, U) Hz
        want = 0.6 * np.log((r30 + FLOOR_HZ) / (r30 + LOG_FLOOR_HZ)) - 0.3 * np.log(band_mean / (r30 + LOG_FLOOR_HZ))
        np.testing.assert_allclose(got[..., BANDS == b], np.repeat(want[..., None], (BANDS == b).sum(), -1), rtol=1e-10)
    # gamma = 1 brings every band's mean rate to the slow rate (times the floor factor)
    full = Calibration(beta=0.0, gamma=1.0, i_slow=i_slow, n_bins=T, bin_size=BIN_S)
    shrunk = np.exp(log_r + full.log_factor(log_r, R))
    np.testing.assert_allclose(band_sums(shrunk, BANDS) / np.bincount(BANDS), np.repeat((r30 + LOG_FLOOR_HZ)[..., None], BANDS.max() + 1, -1),
                               rtol=1e-9)


def test_bad_shapes_raise():
    with pytest.raises(ValueError, match=r"\(P, U, B\)"):
        fit_calibration(np.zeros((5, 3)), np.zeros((5, 3, 2)), np.zeros((5, 3, 2)), np.zeros((5, 4, 2)))


def test_band_sums_add_the_bins_of_each_band():
    x = np.random.default_rng(2).random((3, 4, T))
    want = np.stack([x[..., BANDS == b].sum(-1) for b in range(BANDS.max() + 1)], -1)
    np.testing.assert_allclose(band_sums(x, BANDS), want, rtol=1e-12)
    padded = band_sums(x, BANDS, BANDS.max() + 3)  # bands past the last bin's sum to 0
    np.testing.assert_array_equal(padded[..., : BANDS.max() + 1], band_sums(x, BANDS))
    assert padded.shape[-1] == BANDS.max() + 3 and not padded[..., BANDS.max() + 1 :].any()
    with pytest.raises(ValueError, match="in order"):
        band_sums(x, BANDS[::-1])


def test_calibration_fit_from_per_bin_predictions_matches_the_band_fit():
    """Calibration.fit sums per-bin predictions and counts into bands and fits what fit_calibration fits."""
    rng = np.random.default_rng(5)
    P, U, K, i_slow = 300, 30, 6, 4
    R = rng.uniform(0.0, 3.0, size=(P, U, K))
    slow = R[..., i_slow]
    d_band = 0.4 * rng.normal(size=(P, U, BANDS.max() + 1))
    log_expected = np.log((slow + LOG_FLOOR_HZ) * BIN_S)[..., None] + d_band[..., BANDS]  # (P, U, T)
    f = floor_feature(slow)
    counts = rng.poisson(np.exp(log_expected + 0.6 * f[..., None] - 0.5 * d_band[..., BANDS]))
    cal, info = Calibration.fit(log_expected=log_expected, counts=counts, R=R, i_slow=i_slow, bin_size=BIN_S)
    assert cal.lam.size == 0 and info["level_lambda"] == {}  # no time scales given: no level weights
    assert cal.active and cal.beta == pytest.approx(0.6, abs=0.15) and cal.gamma == pytest.approx(0.5, abs=0.1)
    per_band = np.bincount(BANDS)
    (b, g), _ = fit_calibration(f, np.log(band_sums(np.exp(log_expected), BANDS) / (per_band * BIN_S)) - np.log(slow + LOG_FLOOR_HZ)[..., None],
                              band_sums(counts, BANDS), band_sums(np.exp(log_expected), BANDS))
    assert (cal.beta, cal.gamma) == pytest.approx((b, g), abs=1e-9) and info["floor_beta"] == pytest.approx(b, abs=1e-6)
    none, _ = Calibration.fit(log_expected=log_expected, counts=rng.poisson(np.exp(log_expected)), R=R, i_slow=i_slow,
                              bin_size=BIN_S)
    assert not none.active


def test_rate_correction_keeps_rates_finite():
    """An infinite or zero rate from a backend stays finite and non-negative through the calibration."""
    from nh_serve.inference.reference_fit import RateCorrection

    rates = np.full((1, 3, T), 5.0, dtype=np.float32)
    rates[0, 0, 3], rates[0, 1, :] = np.inf, 0.0
    R = np.full((1, 3, 6), 2.0)
    cal = Calibration(beta=0.5, gamma=0.5, i_slow=4, n_bins=T, bin_size=BIN_S)
    out = RateCorrection(population=None, calibration=cal).apply(rates, R)
    assert np.all(np.isfinite(out)) and np.all(out >= 0.0)
    np.testing.assert_allclose(out[0, 2], rates[0, 2] * np.exp(cal.log_factor(np.log(rates[:, 2:]), R[:, 2:])[0, 0]), rtol=1e-6)


def _level_recording(lam: tuple[float, float], *, P: int = 300, U: int = 40, seed: int = 0):
    """Smoothed rates at the history's time scales (r5 and r120 wander around r30), a model that predicts r30 + 0.1 Hz
    with noisy departures, and per-bin counts drawn with the level moved toward r5 and r120 by ``lam``."""
    rng = np.random.default_rng(seed)
    taus = (0.05, 0.25, 1.0, 5.0, 30.0, 120.0)
    r30 = rng.uniform(1.0, 15.0, U)[None] * np.exp(0.3 * rng.normal(size=(P, U)))
    R = np.repeat(r30[..., None], len(taus), -1) * np.exp(0.5 * rng.normal(size=(P, U, len(taus))))
    R[..., taus.index(30.0)] = r30
    d = 0.2 * rng.normal(size=(P, U, BANDS.max() + 1))
    log_expected = np.log((r30 + LOG_FLOOR_HZ) * BIN_S)[..., None] + d[..., BANDS]  # (P, U, T)
    lv = level_features(R, taus.index(30.0), [taus.index(t) for t in LEVEL_TAUS])  # (P, U, 2)
    counts = rng.poisson(np.exp(log_expected + (lv @ np.asarray(lam))[..., None]))
    return taus, R, log_expected, counts


@pytest.mark.parametrize("lam", [(0.0, 0.8), (0.5, 0.0), (0.3, 0.4)])
def test_fit_recovers_the_level_time_scale(lam):
    taus, R, log_expected, counts = _level_recording(lam)
    cal, info = Calibration.fit(log_expected=log_expected, counts=counts, R=R, i_slow=4, bin_size=BIN_S, taus=taus,
                                level_taus=LEVEL_TAUS)
    assert cal.levels == LEVEL_TAUS and cal.active
    np.testing.assert_allclose(cal.lam, lam, atol=0.08)
    assert info["level_lambda"] == {f"{t:g}": pytest.approx(x, abs=1e-6) for t, x in zip(LEVEL_TAUS, cal.lam)}


def test_level_time_scales_are_fitted_only_where_asked():
    """level_taus picks the time scales the level may move toward; () (a registration's reference, and the default)
    fits none."""
    taus, R, log_expected, counts = _level_recording((0.0, 0.8))
    cal, info = Calibration.fit(log_expected=log_expected, counts=counts, R=R, i_slow=4, bin_size=BIN_S, taus=taus,
                                level_taus=(120.0,))
    assert cal.levels == (120.0,) and list(info["level_lambda"]) == ["120"] and cal.lam[0] == pytest.approx(0.8, abs=0.08)
    none, info = Calibration.fit(log_expected=log_expected, counts=counts, R=R, i_slow=4, bin_size=BIN_S, taus=taus)
    assert none.lam.size == 0 and info["level_lambda"] == {}


def test_level_weights_apply_the_documented_factor():
    rng = np.random.default_rng(4)
    W, U, i_slow = 2, 6, 4
    R = rng.uniform(0.0, 6.0, size=(W, U, 6))
    log_r = np.log(rng.uniform(0.5, 8.0, size=(W, U, T)))
    cal = Calibration(beta=1.0, gamma=1.0, i_slow=i_slow, n_bins=T, bin_size=BIN_S, lam=[0.0, 1.0], i_levels=[3, 5],
                      levels=LEVEL_TAUS)
    # every weight at 1: each band's mean rate is the long average with the small floor
    out = np.exp(log_r + cal.log_factor(log_r, R))
    np.testing.assert_allclose(band_sums(out, BANDS) / np.bincount(BANDS), np.repeat((R[..., 5] + FLOOR_HZ)[..., None], BANDS.max() + 1, -1),
                               rtol=1e-9)
    half = Calibration(beta=0.0, gamma=0.0, i_slow=i_slow, n_bins=T, bin_size=BIN_S, lam=[0.5, 0.0], i_levels=[3, 5],
                       levels=LEVEL_TAUS)
    want = 0.5 * np.log((R[..., 3] + FLOOR_HZ) / (R[..., i_slow] + FLOOR_HZ))
    np.testing.assert_allclose(half.log_factor(log_r, R), np.repeat(want[..., None], T, -1), rtol=1e-10)
    with pytest.raises(ValueError, match="level weights"):
        Calibration(beta=0.0, gamma=0.0, i_slow=i_slow, n_bins=T, bin_size=BIN_S, lam=[0.5], i_levels=[3, 5], levels=LEVEL_TAUS)

import json
import math

import numpy as np
import pytest
from real_data import REAL

from nh_serve.data.features import (
    ACORR_EDGES_S,
    DEFAULT_REFERENCE_S,
    FEATURE_NAMES,
    ISI_EDGES_S,
    MIN_REFERENCE_S,
    N_FEATURES,
    SILENT_DEFAULTS,
    STD_FLOOR,
    FeatureNorm,
    reference_features,
    reference_rate_hz,
)
from nh_serve.errors import InputError

CV, FANO = 1, 32
HIST = slice(2, 22)
ACORR = slice(22, 32)


def merge(*trains):
    """[(times, unit)] -> sorted (times, unit_index)."""
    t = np.concatenate([np.asarray(x, dtype=np.float64) for x, _ in trains])
    u = np.concatenate([np.full(len(x), k, dtype=np.int64) for x, k in trains])
    o = np.argsort(t, kind="stable")
    return t[o], u[o]


def poisson_train(rng, rate, t0, t1):
    n = rng.poisson(rate * (t1 - t0))
    return np.sort(rng.uniform(t0, t1, n))


def expected_pairs(n, T):
    w = np.diff(ACORR_EDGES_S)
    m = 0.5 * (ACORR_EDGES_S[1:] + ACORR_EDGES_S[:-1])
    return n * (n - 1) / T * w * (1 - m / T)


def test_names_and_constants():
    assert len(FEATURE_NAMES) == N_FEATURES == 33
    assert len(set(FEATURE_NAMES)) == 33
    assert (
        FEATURE_NAMES[0] == "log1p_rate_hz"
        and FEATURE_NAMES[1] == "isi_cv"
        and FEATURE_NAMES[32] == "fano_1s"
    )
    assert all(n.startswith("isi_hist_") for n in FEATURE_NAMES[HIST])
    assert all(n.startswith("acorr_") for n in FEATURE_NAMES[ACORR])
    assert MIN_REFERENCE_S == 10.0 and DEFAULT_REFERENCE_S == 60.0


def test_regular_train():
    # 25 Hz clock: ISI 40 ms, exactly 25 spikes in every 1 s window.
    t = 0.02 + 0.04 * np.arange(1500)
    f = reference_features(t, np.zeros_like(t, dtype=np.int64), n_units=1, start=0.0, end=60.0)
    assert f.shape == (1, 33) and f.dtype == np.float32
    f = f[0].astype(np.float64)
    assert f[0] == pytest.approx(math.log1p(25.0), rel=1e-6)
    assert abs(f[CV]) < 1e-6
    # 40 ms lies in [39.8 ms, 63.1 ms): histogram bin 8.
    assert ISI_EDGES_S[8] <= 0.04 < ISI_EDGES_S[9]
    assert FEATURE_NAMES[2 + 8] == "isi_hist_39.8ms-63.1ms"
    np.testing.assert_allclose(f[HIST], np.eye(20)[8], atol=1e-7)
    assert abs(f[FANO]) < 1e-6
    # Autocorrelogram: 1499 forward pairs at lag 40 ms (lag bin 8), 1498 at 80 ms (lag bin 9).
    assert ACORR_EDGES_S[8] <= 0.04 < ACORR_EDGES_S[9] <= 0.08 < ACORR_EDGES_S[10]
    c = np.zeros(10)
    c[8], c[9] = 1499, 1498
    want = np.log((c + 1) / (expected_pairs(1500, 60.0) + 1))
    np.testing.assert_allclose(f[ACORR], want, rtol=1e-5, atol=1e-6)
    assert f[22 + 8] > 0 and f[22 + 9] > 0 and np.all(f[ACORR][:8] < -2)


def test_poisson_train():
    rng = np.random.default_rng(0)
    rate, T = 20.0, 600.0
    t = poisson_train(rng, rate, 0.0, T)
    f = reference_features(t, np.zeros(t.size, dtype=np.int64), n_units=1, start=0.0, end=T)[0].astype(
        np.float64
    )
    assert f[0] == pytest.approx(math.log1p(t.size / T), rel=1e-6)
    assert f[CV] == pytest.approx(1.0, abs=0.05)
    assert f[FANO] == pytest.approx(1.0, abs=0.25)
    # log-ISI histogram follows the exponential ISI distribution
    lo, hi = ISI_EDGES_S[:-1], ISI_EDGES_S[1:]
    p = np.exp(-rate * lo) - np.exp(-rate * hi)
    p[0] += 1 - np.exp(-rate * lo[0])  # ISIs below 1 ms go into the first bin
    np.testing.assert_allclose(f[HIST], p, atol=0.015)
    assert f[HIST].sum() == pytest.approx(1.0, abs=1e-6)
    # flat autocorrelogram: log-ratios near 0 (small +1 shrinkage bias at short lags)
    assert np.all(np.abs(f[ACORR][4:]) < 0.15)
    assert np.all(np.abs(f[ACORR]) < 0.5)


def test_bursty_train():
    rng = np.random.default_rng(1)
    starts = np.cumsum(0.05 + rng.exponential(0.45, 200))
    starts = starts[starts < 59.9]
    t = (starts[:, None] + 0.003 * np.arange(4)[None, :]).ravel()  # 4-spike bursts, 3 ms apart
    f = reference_features(t, np.zeros(t.size, dtype=np.int64), n_units=1, start=0.0, end=60.0)[0]
    assert f[CV] > 1.3
    # 3 of every 4 ISIs are 3 ms: histogram bin [2.51, 3.98) ms
    assert ISI_EDGES_S[2] <= 0.003 < ISI_EDGES_S[3]
    n_isi = t.size - 1
    assert f[2 + 2] == pytest.approx(3 * starts.size / n_isi, abs=1e-6)
    # strong excess of pairs at 3 ms lag and at 6 ms (bins [2.51, 3.98) and [3.98, 6.31) ms);
    # 9 ms falls in [6.31, 10) ms
    assert f[22 + 2] > 2.0 and f[22 + 4] > 2.0
    assert f[FANO] > 2.0


def test_near_silent_units_get_documented_values():
    rng = np.random.default_rng(2)
    t, u = merge(([], 0), ([12.0], 1), ([3.0, 4.0], 2), (poisson_train(rng, 10, 0, 60), 3))
    f = reference_features(t, u, n_units=4, start=0.0, end=60.0)
    assert np.all(np.isfinite(f))
    for k, n in enumerate([0, 1, 2]):
        assert f[k, 0] == pytest.approx(math.log1p(n / 60.0), rel=1e-6)
        np.testing.assert_array_equal(f[k, 1:], SILENT_DEFAULTS[1:])
        assert f[k, CV] == 1.0 and f[k, FANO] == 1.0
        assert np.all(f[k, HIST] == 0) and np.all(f[k, ACORR] == 0)
    # units with no spikes at all (beyond those present)
    f2 = reference_features(np.array([]), np.array([], dtype=np.int64), n_units=3, start=5.0, end=20.0)
    np.testing.assert_array_equal(f2, np.tile(SILENT_DEFAULTS, (3, 1)))
    # 3 spikes: real values
    f3 = reference_features(
        np.array([1.0, 2.0, 4.0]), np.zeros(3, dtype=np.int64), n_units=1, start=0.0, end=60.0
    )[0]
    assert f3[CV] == pytest.approx(np.std([1.0, 2.0]) / 1.5, rel=1e-6)
    assert f3[FANO] == pytest.approx(np.var([0, 1, 1, 0, 1] + [0] * 55, ddof=1) / (3 / 60), rel=1e-5)


def test_units_are_independent_and_order_free():
    rng = np.random.default_rng(3)
    trains = [
        (poisson_train(rng, 5, 0, 60), 0),
        (0.01 + 0.05 * np.arange(1200), 1),
        (poisson_train(rng, 40, 0, 60), 2),
        ([], 3),
        (poisson_train(rng, 0.5, 0, 60), 4),
    ]
    t, u = merge(*trains)
    f = reference_features(t, u, n_units=5, start=0.0, end=60.0)
    for times, k in trains:
        alone = reference_features(
            np.asarray(times, float), np.zeros(len(times), dtype=np.int64), n_units=1, start=0.0, end=60.0
        )
        np.testing.assert_allclose(f[k], alone[0], rtol=1e-6, atol=1e-7)
    perm = np.array([3, 0, 4, 1, 2])  # unit k -> perm[k]
    fp = reference_features(t, perm[u], n_units=5, start=0.0, end=60.0)
    np.testing.assert_array_equal(fp[perm], f)


def test_window_offset_and_rate_helper():
    rng = np.random.default_rng(4)
    t = poisson_train(rng, 8, 100.0, 130.0)
    u = np.zeros(t.size, dtype=np.int64)
    f = reference_features(t, u, n_units=2, start=100.0, end=130.0)
    g = reference_features(t - 100.0, u, n_units=2, start=0.0, end=30.0)
    np.testing.assert_allclose(f, g, rtol=1e-5, atol=1e-6)
    r = reference_rate_hz(t, u, n_units=2, start=100.0, end=130.0)
    np.testing.assert_allclose(r, [t.size / 30.0, 0.0])


def test_window_validation():
    t = np.array([1.0, 2.0, 3.0])
    u = np.zeros(3, dtype=np.int64)
    with pytest.raises(InputError, match="at least 10"):
        reference_features(t, u, n_units=1, start=0.0, end=9.99)
    with pytest.raises(InputError):
        reference_features(t, u, n_units=1, start=float("nan"), end=60.0)
    with pytest.raises(InputError, match="outside the window"):
        reference_features(t, u, n_units=1, start=1.5, end=60.0)
    with pytest.raises(InputError, match="not sorted"):
        reference_features(t[::-1].copy(), u, n_units=1, start=0.0, end=60.0)
    with pytest.raises(InputError):
        reference_features(t, np.array([0, 1, 2]), n_units=2, start=0.0, end=60.0)
    f = reference_features(t, u, n_units=1, start=0.0, end=10.0)  # exactly 10 s is fine
    assert np.all(np.isfinite(f))


def test_feature_norm_fit_apply_roundtrip():
    rng = np.random.default_rng(5)
    a = rng.normal(2.0, 3.0, (40, 33))
    b = rng.normal(-1.0, 0.5, (25, 33))
    a[:, 5] = 7.0
    b[:, 5] = 7.0  # constant feature -> std floored
    norm = FeatureNorm.fit([a, b])
    allf = np.concatenate([a, b])
    np.testing.assert_allclose(norm.mean, allf.mean(0))
    want_std = allf.std(0)
    want_std[5] = STD_FLOOR
    np.testing.assert_allclose(norm.std, want_std)
    z = norm.apply(b)
    assert z.dtype == np.float32 and z.shape == b.shape
    np.testing.assert_allclose(z, (b - allf.mean(0)) / want_std, rtol=1e-5, atol=1e-5)
    assert np.all(z[:, 5] == 0)
    zz = norm.apply(allf)
    np.testing.assert_allclose(np.delete(zz.mean(0), 5), 0, atol=1e-5)
    np.testing.assert_allclose(np.delete(zz.std(0), 5), 1, atol=1e-5)

    d = json.loads(json.dumps(norm.to_dict()))
    back = FeatureNorm.from_dict(d)
    np.testing.assert_array_equal(back.mean, norm.mean)
    np.testing.assert_array_equal(back.std, norm.std)
    np.testing.assert_array_equal(back.apply(a[:3]), norm.apply(a[:3]))
    x = rng.normal(size=(2, 4, 33))
    np.testing.assert_allclose(FeatureNorm.identity().apply(x), x.astype(np.float32))


def test_feature_norm_rejects_bad_input():
    good = FeatureNorm.identity().to_dict()
    with pytest.raises(InputError, match="33"):
        FeatureNorm.from_dict({"mean": good["mean"][:32], "std": good["std"]})
    with pytest.raises(InputError, match="NaN"):
        FeatureNorm.from_dict({"mean": [float("nan")] + good["mean"][1:], "std": good["std"]})
    with pytest.raises(InputError):
        FeatureNorm.from_dict({"mean": good["mean"]})
    with pytest.raises(InputError):
        FeatureNorm.from_dict({"mean": good["mean"], "std": [0.0] * 33})
    with pytest.raises(InputError):
        FeatureNorm.from_dict({"mean": ["a"] * 33, "std": good["std"]})
    with pytest.raises(InputError):
        FeatureNorm.fit([np.zeros((3, 32))])
    with pytest.raises(InputError):
        FeatureNorm.fit([])
    with pytest.raises(InputError):
        FeatureNorm.identity().apply(np.zeros((2, 30)))


@pytest.mark.real_data
def test_real_recording_features_are_finite():
    path = REAL / "ibl_brainbox_fixture" / "spikes_flat.npz"
    if not path.exists():
        pytest.skip(f"real data not available at {path}")
    z = np.load(path)
    times, ids = z["spike_times"], z["unit_ids"]
    uids, unit_index = np.unique(ids, return_inverse=True)
    sel = times < DEFAULT_REFERENCE_S
    f = reference_features(times[sel], unit_index[sel], n_units=uids.size, start=0.0, end=DEFAULT_REFERENCE_S)
    assert f.shape == (uids.size, 33)
    assert np.all(np.isfinite(f))
    n = np.bincount(unit_index[sel], minlength=uids.size)
    np.testing.assert_allclose(f[:, 0], np.log1p(n / 60.0), rtol=1e-6)
    active = n >= 3
    np.testing.assert_allclose(f[active][:, HIST].sum(1), 1.0, atol=1e-5)
    # refractory periods: almost no pairs at lags < 1.58 ms in active units
    busy = n > 300
    assert np.median(f[busy, 22]) < 0
    norm = FeatureNorm.fit([f])
    assert np.all(np.isfinite(norm.apply(f)))


def _dense_fano(t, u, *, n_units, start, end):
    """The Fano factor as a dense units x 1 s windows count array gives it (the definition)."""
    from nh_serve.data.spikes import bin_counts

    n_win = int(math.floor((end - start) + 1e-9))
    counts = bin_counts(t, u, n_units=n_units, start=start, bin_size=1.0, n_bins=n_win).astype(np.float64)
    mean, var = counts.mean(axis=1), counts.var(axis=1, ddof=1)
    fano = np.where(mean > 0, var / np.where(mean > 0, mean, 1.0), 1.0)
    fano[np.bincount(u, minlength=n_units) < 3] = 1.0  # SILENT_DEFAULTS
    return fano.astype(np.float32)


@pytest.mark.parametrize("seed", range(6))
def test_fano_without_dense_counts_equals_the_dense_definition(seed):
    """Regular, Poisson, bursty and silent units; windows not starting at 0 and not whole seconds."""
    rng = np.random.default_rng(seed)
    start = float(rng.uniform(0, 50))
    end = start + float(rng.uniform(10, 200))
    trains = [(poisson_train(rng, rng.uniform(0.05, 40), start, end), k) for k in range(12)]
    trains.append((np.arange(start, end, 0.25), 12))  # clock-like: var near 0, cancellation-prone
    bursts = poisson_train(rng, 0.5, start, end - 0.01)
    trains.append(((bursts[:, None] + np.array([0.0, 2e-3, 4e-3])[None, :]).ravel(), 13))  # bursty
    trains.append((np.array([start + 0.5]), 14))  # near-silent
    t, u = merge(*[(np.sort(x), k) for x, k in trains if len(x)])
    n_units = 16  # unit 15 is silent
    got = reference_features(t, u, n_units=n_units, start=start, end=end)[:, FANO]
    want = _dense_fano(t, u, n_units=n_units, start=start, end=end)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)


def test_long_reference_window_costs_no_dense_array():
    """A 1e7 s window with a few thousand spikes: no units x seconds array (that would be 800 MB here)."""
    import time
    import tracemalloc

    rng = np.random.default_rng(0)
    t = np.sort(rng.uniform(0, 1e7, 6000))
    u = rng.integers(0, 20, 6000)
    tracemalloc.start()
    t0 = time.perf_counter()
    f = reference_features(t, u, n_units=20, start=0.0, end=1e7)
    seconds = time.perf_counter() - t0
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert np.all(np.isfinite(f)) and peak < 20 * 2**20 and seconds < 2.0, (peak, seconds)
    # Near-Poisson units over 1e7 one-second windows with ~0.03 spikes each: Fano near 1.
    assert np.all(np.abs(f[:, FANO] - 1.0) < 0.2)
    for end in (1e12, 1e300):  # finite, however absurd: no overflow, no allocation
        assert np.all(np.isfinite(reference_features(t, u, n_units=20, start=0.0, end=end)))

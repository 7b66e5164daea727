import math

import numpy as np
import pytest

from nh_serve.errors import InputError
from nh_serve.evaluation import metrics as M

LN2 = math.log(2.0)


def nlb_bps():
    try:
        from nlb_tools.evaluation import bits_per_spike
    except Exception as e:  # noqa: BLE001 - any import failure means the reference is unavailable
        pytest.skip(f"nlb_tools is not importable ({type(e).__name__}: {e})")
    return bits_per_spike


def random_case(rng, shape, zero_frac=0.2, dead_units=1):
    """Rates and Poisson counts in nlb layout (..., neurons)."""
    rates = rng.gamma(1.5, 0.3, shape)
    counts = rng.poisson(rates * rng.uniform(0.5, 1.5, shape[-1])).astype(np.float64)
    rates[rng.random(shape) < zero_frac] = 0.0
    counts[..., :dead_units] = 0.0  # neurons that never fire
    return rates, counts


@pytest.mark.parametrize("shape", [(6, 10, 5), (1, 50, 3), (30, 8), (4, 3, 40)])
def test_bits_per_spike_matches_nlb_tools(shape):
    ref = nlb_bps()
    rng = np.random.default_rng(sum(shape))
    rates, counts = random_case(rng, shape)
    r0, c0 = rates.copy(), counts.copy()
    want = ref(rates.copy(), counts.copy())
    assert np.isfinite(want)
    got = M.bits_per_spike(rates, counts, unit_axis=-1)
    assert got == pytest.approx(want, rel=1e-10, abs=1e-12)
    # same numbers in the project layout (..., units, bins)
    got2 = M.bits_per_spike(np.swapaxes(rates, -1, -2), np.swapaxes(counts, -1, -2))
    assert got2 == pytest.approx(want, rel=1e-10, abs=1e-12)
    # inputs are not modified (nlb_tools writes 1e-9 into zero rates in place)
    np.testing.assert_array_equal(rates, r0)
    np.testing.assert_array_equal(counts, c0)


def test_bits_per_spike_matches_nlb_tools_with_nan_masking():
    ref = nlb_bps()
    rng = np.random.default_rng(7)
    rates, counts = random_case(rng, (5, 12, 6))
    counts[0, :3, :] = np.nan  # masked bins (nlb: NaN spikes are dropped together with their rates)
    counts[2, 5, 1] = np.nan
    rates[0, :3, :] = np.nan
    want = ref(rates.copy(), counts.copy())
    assert np.isfinite(want)
    assert M.bits_per_spike(rates, counts, unit_axis=-1) == pytest.approx(want, rel=1e-10)
    assert M.poisson_nll(rates, counts) == pytest.approx(
        np.nansum(
            np.where(
                np.isnan(counts),
                np.nan,
                np.where(rates == 0, 1e-9, rates) - counts * np.log(np.where(rates == 0, 1e-9, rates)),
            )
        )
        / np.sum(~np.isnan(counts)),
        rel=1e-10,
    )


def test_bits_per_spike_hand_worked():
    # One window, two units, two bins (units, bins).
    # unit A: counts [0, 2], rates [0.5, 2];  unit B: counts [1, 1], rates [0.5, 2].
    # Null: each unit's mean count = 1 -> null NLL per bin = 1 - n*log(1) = 1 -> 2 per unit.
    # Model NLL A = (0.5 - 0) + (2 - 2 ln 2) = 2.5 - 2 ln 2 ; gain A = 2 ln 2 - 0.5
    # Model NLL B = (0.5 - ln 0.5) + (2 - ln 2) = 2.5        ; gain B = -0.5
    # bits/spike = (2 ln 2 - 1) / 4 spikes / ln 2 = 0.5 - 1 / (4 ln 2)
    rates = np.array([[0.5, 2.0], [0.5, 2.0]])
    counts = np.array([[0.0, 2.0], [1.0, 1.0]])
    want = 0.5 - 1.0 / (4.0 * LN2)
    assert want == pytest.approx(0.139326, abs=1e-6)
    assert M.bits_per_spike(rates, counts) == pytest.approx(want, rel=1e-12)
    pu = M.per_unit(rates, counts)
    np.testing.assert_allclose(pu["bits_per_spike"], [1.0 - 0.25 / LN2, -0.25 / LN2], rtol=1e-12)
    np.testing.assert_allclose(pu["n_spikes"], [2, 2])
    # perfect null prediction -> 0 bits/spike
    assert M.bits_per_spike(np.ones((2, 2)), counts) == pytest.approx(0.0, abs=1e-15)


def test_zero_spike_unit_and_no_spikes():
    rng = np.random.default_rng(3)
    rates = rng.uniform(0.1, 1.0, (4, 3, 10))
    counts = rng.poisson(rates).astype(float)
    counts[:, 1, :] = 0  # unit 1 silent
    res = M.evaluate(rates, counts, bin_size=0.02)
    assert np.isfinite(res["bits_per_spike"])
    assert res["per_unit"]["bits_per_spike"][1] == 0.0
    assert res["per_unit"]["n_spikes"][1] == 0
    # a silent unit predicted at a nonzero rate still costs the pooled score (as in nlb_tools)
    rates_zero = rates.copy()
    rates_zero[:, 1, :] = 0.0
    assert M.bits_per_spike(rates_zero, counts) > res["bits_per_spike"]
    # no spikes at all: defined as 0.0
    z = np.zeros_like(counts)
    assert M.bits_per_spike(rates, z) == 0.0
    res0 = M.evaluate(rates, z, bin_size=0.02)
    assert res0["bits_per_spike"] == 0.0 and res0["r2"] == 0.0 and res0["correlation"] == 0.0
    for k, v in res0.items():
        if isinstance(v, float):
            assert np.isfinite(v), k


def test_poisson_nll_hand_worked():
    rates = np.array([[1.0, 2.0]])
    counts = np.array([[0.0, 2.0]])
    assert M.poisson_nll(rates, counts) == pytest.approx((3.0 - 2.0 * LN2) / 2.0, rel=1e-12)
    assert M.poisson_nll(rates, counts, include_const=True) == pytest.approx((3.0 - LN2) / 2.0, rel=1e-12)
    assert M.poisson_nll(np.zeros((1, 2)), np.zeros((1, 2))) == pytest.approx(1e-9)


def test_correlation_and_r2_known_cases():
    x = np.linspace(0.1, 2.0, 20).reshape(2, 10)
    assert M.rate_correlation(x, 3 * x + 1) == pytest.approx(1.0)
    assert M.rate_correlation(x, 5 - x) == pytest.approx(-1.0)
    assert M.rate_correlation(np.full_like(x, 0.1), x) == 0.0
    assert M.rate_correlation(x, np.full_like(x, 2.0)) == 0.0
    assert M.r2(x, x) == 1.0
    assert M.r2(np.full_like(x, x.mean()), x) == pytest.approx(0.0, abs=1e-12)
    assert M.r2(np.full_like(x, 3.0), np.full_like(x, 3.0)) == 1.0  # constant truth, exact
    assert M.r2(np.full_like(x, 2.0), np.full_like(x, 3.0)) == 0.0  # constant truth, wrong
    rng = np.random.default_rng(0)
    r = rng.gamma(2, 0.5, (3, 4, 25))
    c = rng.poisson(r).astype(float)
    assert M.rate_correlation(r, c) == pytest.approx(np.corrcoef(r.ravel(), c.ravel())[0, 1], rel=1e-10)
    ss_res = ((c - r) ** 2).sum()
    ss_tot = ((c - c.mean()) ** 2).sum()
    assert M.r2(r, c) == pytest.approx(1 - ss_res / ss_tot, rel=1e-10)


def test_breakdowns_are_consistent():
    rng = np.random.default_rng(11)
    W, U, B = 7, 5, 50
    rates = rng.gamma(2.0, 0.1, (W, U, B))
    counts = rng.poisson(rates * rng.uniform(0.7, 1.3, (1, U, 1))).astype(float)
    res = M.evaluate(rates, counts, bin_size=0.02)
    pu, pb = res["per_unit"], res["per_bin"]
    assert pu["bits_per_spike"].shape == (U,) and pb["bits_per_spike"].shape == (B,)
    total = counts.sum()
    # pooled bits/spike is the spike-weighted mean of every breakdown
    assert (pu["bits_per_spike"] * pu["n_spikes"]).sum() / total == pytest.approx(
        res["bits_per_spike"], rel=1e-10
    )
    assert (pb["bits_per_spike"] * pb["n_spikes"]).sum() / total == pytest.approx(
        res["bits_per_spike"], rel=1e-10
    )
    bands = res["per_band"]
    assert list(bands) == ["0-250ms", "250-500ms", "500-1000ms"]
    assert [b["n_bins"] for b in bands.values()] == [12, 13, 25]  # by bin centre
    assert sum(b["bits_per_spike"] * b["n_spikes"] for b in bands.values()) / total == pytest.approx(
        res["bits_per_spike"]
    )
    # per-unit values equal the pooled metrics on that unit alone (same per-unit null)
    for u in range(U):
        ru, cu = rates[:, u, :], counts[:, u, :]
        assert pu["correlation"][u] == pytest.approx(np.corrcoef(ru.ravel(), cu.ravel())[0, 1], rel=1e-10)
        assert pu["r2"][u] == pytest.approx(M.r2(ru, cu), rel=1e-10)
        assert pu["bits_per_spike"][u] == pytest.approx(
            M.bits_per_spike(ru[:, None, :], cu[:, None, :]), rel=1e-10
        )
        assert pu["nll"][u] == pytest.approx(M.poisson_nll(ru, cu), rel=1e-10)
    k = 17
    assert pb["correlation"][k] == pytest.approx(
        np.corrcoef(rates[:, :, k].ravel(), counts[:, :, k].ravel())[0, 1], rel=1e-10
    )
    assert res["nll"] == pytest.approx(M.poisson_nll(rates, counts), rel=1e-12)
    assert res["correlation"] == pytest.approx(M.rate_correlation(rates, counts), rel=1e-12)
    assert res["r2"] == pytest.approx(M.r2(rates, counts), rel=1e-12)
    assert res["corr_unit_mean"] == pytest.approx(pu["correlation"].mean())
    # 2-D input is one window
    one = M.evaluate(rates[0], counts[0], bin_size=0.02)
    assert one["bits_per_spike"] == pytest.approx(M.bits_per_spike(rates[:1], counts[:1]))
    # custom bands; a band beyond the horizon is empty but finite
    cb = M.per_band(rates, counts, bin_size=0.02, bands_ms=((0, 100), (900, 1000), (2000, 3000)))
    assert (
        cb["0-100ms"]["n_bins"] == 5 and cb["900-1000ms"]["n_bins"] == 5 and cb["2000-3000ms"]["n_bins"] == 0
    )
    assert cb["2000-3000ms"]["bits_per_spike"] == 0.0


def test_bad_input_is_rejected():
    r = np.ones((2, 3, 4))
    c = np.ones((2, 3, 4))
    with pytest.raises(InputError, match="same"):
        M.bits_per_spike(r, c[:, :, :3])
    with pytest.raises(InputError, match="negative"):
        M.evaluate(-r, c, bin_size=0.02)
    bad = r.copy()
    bad[0, 0, 0] = np.nan
    with pytest.raises(InputError, match="NaN"):
        M.bits_per_spike(bad, c)
    with pytest.raises(InputError, match="NaN"):
        M.evaluate(bad, c, bin_size=0.02)
    bad[0, 0, 0] = np.inf
    with pytest.raises(InputError):
        M.poisson_nll(bad, c)
    with pytest.raises(InputError):
        M.evaluate(r, -c, bin_size=0.02)
    nanc = c.copy()
    nanc[0, 0, 0] = np.nan
    with pytest.raises(InputError, match="NaN"):
        M.evaluate(r, nanc, bin_size=0.02)
    with pytest.raises(InputError):
        M.evaluate(r[0, 0], c[0, 0], bin_size=0.02)  # 1-D
    with pytest.raises(InputError):
        M.evaluate(np.ones((2, 2, 2, 2)), np.ones((2, 2, 2, 2)), bin_size=0.02)
    with pytest.raises(InputError, match="empty"):
        M.bits_per_spike(np.ones((0, 3)), np.ones((0, 3)))
    with pytest.raises(InputError):
        M.evaluate(r, c, bin_size=0.0)
    with pytest.raises(InputError):
        M.per_band(r, c, bin_size=0.02, bands_ms=((100, 50),))
    with pytest.raises(InputError):
        M.rate_correlation([["a"]], [[1.0]])

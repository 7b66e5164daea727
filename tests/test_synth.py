"""Tests for nh_serve.data.synth: determinism, realistic statistics, ground truth and multimodal structure."""

from __future__ import annotations

import argparse

import h5py
import numpy as np
import pytest
import temporaldata as td

from nh_serve.data.session import open_session
from nh_serve.data.spikes import bin_counts
from nh_serve.data.synth import (
    BIN_SIZE,
    IMAGE_DIM,
    N_IMAGES,
    add_cli,
    image_library,
    image_salience,
    make_demo,
    make_session,
    write_synthetic_sessions,
)
from nh_serve.errors import InputError


@pytest.fixture(scope="module")
def plain():
    return make_session(seed=3, n_units=150, duration=300.0)


@pytest.fixture(scope="module")
def multi():
    return make_session(seed=4, n_units=120, duration=300.0, multimodal=True)


def _counts(d):
    rates, bs = d["true_rates"]
    n_bins, n_units = rates.shape
    return bin_counts(
        d["spike_times"], d["unit_index"], n_units=n_units, start=0.0, bin_size=bs, n_bins=n_bins
    ).T  # (T, U)


def _isis(d):
    t, u = d["spike_times"], d["unit_index"]
    order = np.lexsort((t, u))
    t, u = t[order], u[order]
    n_units = len(d["unit_ids"])
    return [np.diff(x) for x in np.split(t, np.searchsorted(u, np.arange(1, n_units)))]


# --------------------------------------------------------------------------- determinism and shapes


def test_same_seed_same_arrays_different_seed_differs():
    a = make_session(seed=11, n_units=25, duration=20.0, multimodal=True)
    b = make_session(seed=11, n_units=25, duration=20.0, multimodal=True)
    c = make_session(seed=12, n_units=25, duration=20.0, multimodal=True)
    for key in ("spike_times", "unit_index", "unit_ids", "latents"):
        assert a[key].tobytes() == b[key].tobytes(), key
    assert a["true_rates"][0].tobytes() == b["true_rates"][0].tobytes()
    assert a["behavior"][1].tobytes() == b["behavior"][1].tobytes()
    assert a["image_embeddings"][0].tobytes() == b["image_embeddings"][0].tobytes()
    assert a["spike_times"].shape != c["spike_times"].shape or not np.array_equal(
        a["spike_times"], c["spike_times"]
    )
    assert not np.array_equal(a["true_rates"][0], c["true_rates"][0])


def test_unit_count_drawn_between_20_and_400():
    counts = [len(make_session(seed=s, duration=1.0)["unit_ids"]) for s in range(12)]
    assert all(20 <= n <= 400 for n in counts), counts
    assert len(set(counts)) > 6  # sessions differ


def test_shapes_and_sorted_output(plain):
    d = plain
    t, u = d["spike_times"], d["unit_index"]
    assert t.dtype == np.float64 and u.dtype == np.int64
    assert np.all(np.diff(t) >= 0) and t[0] >= 0 and t[-1] < 300.0
    assert u.min() == 0 and u.max() == 149
    rates, bs = d["true_rates"]
    assert bs == BIN_SIZE and rates.shape == (15000, 150) and rates.dtype == np.float32
    assert np.all(np.isfinite(rates)) and rates.min() > 0
    bt, bv = d["behavior"]
    assert bv.shape == (30000, 2) and np.allclose(np.diff(bt), 0.01)
    assert d["image_embeddings"] is None and d["trials"] is None
    assert len(set(d["unit_ids"].tolist())) == 150


def test_bad_arguments():
    with pytest.raises(InputError, match="duration"):
        make_session(seed=0, duration=0.5)
    with pytest.raises(InputError, match="n_units"):
        make_session(seed=0, n_units=0, duration=2.0)
    with pytest.raises(InputError, match="sessions"):
        write_synthetic_sessions("unused", n_sessions=0, seed=0)


# --------------------------------------------------------------------------- rates and ground truth


def test_baseline_rates_are_lognormal_in_range():
    d = make_session(seed=21, n_units=400, duration=2.0)
    base = d["units_extra"]["true_baseline_rate_hz"]
    assert base.min() >= 0.1 and base.max() <= 50.0
    logb = np.log(base)
    assert 2.0 < np.exp(np.median(logb)) < 8.0
    assert 0.7 < logb.std() < 1.2
    assert base.max() / base.min() > 100  # heterogeneous, spanning >2 decades


def test_true_rates_match_spike_counts(plain):
    d = plain
    rates, bs = d["true_rates"]
    counts = _counts(d)
    expected = rates.astype(np.float64) * bs  # expected counts per bin
    # total count within a few sigma (bursty units have Fano factors up to ~4)
    total, exp_total = counts.sum(), expected.sum()
    assert abs(total - exp_total) < 5 * np.sqrt(4 * exp_total), (total, exp_total)
    # per-unit mean rates
    emp = counts.sum(0) / 300.0
    true = expected.sum(0) / 300.0
    assert np.corrcoef(emp, true)[0, 1] > 0.99
    assert np.corrcoef(np.log(emp + 0.01), np.log(true + 0.01))[0, 1] > 0.95
    # calibrated across the range of rates: observed / expected per decile of expected count
    edges = np.quantile(expected, np.linspace(0, 1, 6))
    for lo, hi in zip(edges[:-1], edges[1:]):
        m = (expected >= lo) & (expected < hi)
        ratio = counts[m].sum() / expected[m].sum()
        assert 0.95 < ratio < 1.05, (lo, hi, ratio)


def test_true_rates_are_time_varying_and_track_counts(plain):
    rates, bs = plain["true_rates"]
    counts = _counts(plain)
    # smoothed population count follows the summed true rate
    k = 25  # 0.5 s windows
    pop = counts.sum(1)[: (len(counts) // k) * k].reshape(-1, k).sum(1)
    exp = (rates.sum(1) * bs)[: (len(rates) // k) * k].reshape(-1, k).sum(1)
    assert np.corrcoef(pop, exp)[0, 1] > 0.8
    # units are modulated, not constant
    cv_rate = rates.std(0) / rates.mean(0)
    assert np.median(cv_rate) > 0.2


def test_refractory_period_respected(plain):
    ref = plain["units_extra"]["true_refractory_s"]
    assert ref.min() >= 0.001 and ref.max() <= 0.0025
    n_close = 0
    for u, isi in enumerate(_isis(plain)):
        if isi.size:
            assert isi.min() >= ref[u] * (1 - 1e-9), (u, isi.min(), ref[u])
            n_close += int(np.sum(isi < ref[u] + 0.002))
    assert n_close > 0  # the refractory period is reached, not just implied by low rates


def test_isi_shapes_differ_across_units(plain):
    isis = _isis(plain)
    burst = plain["units_extra"]["true_burst_prob"] > 0
    cv = np.array([x.std() / x.mean() if x.size > 100 else np.nan for x in isis])
    ok = np.isfinite(cv)
    assert ok.sum() > 50
    assert np.nanpercentile(cv, 10) < 0.85 and np.nanpercentile(cv, 90) > 1.2
    assert np.nanmean(cv[burst & ok]) > np.nanmean(cv[~burst & ok]) + 0.2
    # bursting units fire many short ISIs (< 10 ms) compared with their mean ISI
    frac_short = np.array([np.mean(x < 0.01) if x.size > 100 else np.nan for x in isis])
    assert np.nanmedian(frac_short[burst & ok]) > 2 * np.nanmedian(frac_short[~burst & ok])


def test_behavior_is_driven_by_latents(plain):
    z = plain["latents"].astype(np.float64)
    bv = plain["behavior"][1].astype(np.float64)
    x = np.c_[z, np.ones(len(z))]
    coef, *_ = np.linalg.lstsq(x, bv, rcond=None)
    r2 = 1 - ((bv - x @ coef) ** 2).sum(0) / ((bv - bv.mean(0)) ** 2).sum(0)
    assert np.all(r2 > 0.8), r2
    # and it relates to population activity (20 ms behaviour vs binned true rates)
    rates = plain["true_rates"][0]
    b20 = bv[: 2 * len(rates)].reshape(len(rates), 2, 2).mean(1)
    c = np.corrcoef(np.c_[b20, np.log(rates)].T)[:2, 2:]
    assert np.abs(c).max() > 0.3


def test_future_is_predictable_from_past(plain):
    """A ridge model reading the last second of counts beats the session-mean rate on the next 0.5 s."""
    counts = _counts(plain)
    rates, bs = plain["true_rates"]
    T, U = counts.shape
    half = T // 2
    ctx, hor = 50, 25

    def feats(s):
        return counts[s - ctx : s].reshape(5, 10, U).sum(1).ravel()

    def target(s):
        return counts[s : s + hor].mean(0)

    train = np.arange(ctx, half - hor, 5)
    test = np.arange(half + ctx, T - hor, 10)
    x = np.stack([feats(s) for s in train])
    y = np.stack([target(s) for s in train])
    mu, sd = x.mean(0), x.std(0) + 1e-6
    w = np.linalg.solve(
        ((x - mu) / sd).T @ ((x - mu) / sd) + len(x) * np.eye(x.shape[1]), ((x - mu) / sd).T @ (y - y.mean(0))
    )
    mean = counts[:half].mean(0)
    pred = np.maximum(((np.stack([feats(s) for s in test]) - mu) / sd) @ w + y.mean(0), 0.05 * mean)  # (S, U)
    fut = np.stack([counts[s : s + hor] for s in test])  # (S, hor, U)
    oracle = np.stack([rates[s : s + hor] * bs for s in test])

    def ll(lam):
        lam = np.broadcast_to(lam, fut.shape)
        return float((fut * np.log(np.maximum(lam, 1e-9)) - lam).sum())

    n_spikes = fut.sum()
    base = ll(mean)
    bits_model = (ll(pred[:, None, :]) - base) / n_spikes / np.log(2)
    bits_oracle = (ll(oracle) - base) / n_spikes / np.log(2)
    assert bits_oracle > 0.15, bits_oracle
    assert bits_model > 0.02, bits_model
    assert bits_oracle > bits_model


# --------------------------------------------------------------------------- multimodal


def test_image_library_is_fixed():
    lib = image_library()
    assert lib.shape == (N_IMAGES, IMAGE_DIM) and lib.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(lib, axis=1), 1.0, rtol=1e-5)
    np.testing.assert_array_equal(lib, image_library())


def test_multimodal_events_and_embeddings(multi):
    it, emb = multi["image_embeddings"]
    idx = multi["image_index"]
    gaps = np.diff(it)
    assert gaps.min() >= 0.5 - 1e-9 and gaps.max() <= 1.5 + 1e-9
    assert 200 < len(it) < 600
    np.testing.assert_array_equal(emb, image_library()[idx])
    assert len(np.unique(idx)) == N_IMAGES
    np.testing.assert_array_equal(multi["trials"]["start"], it)
    np.testing.assert_array_equal(multi["trials"]["image_index"], idx)
    # the library is shared across sessions with different seeds
    other = make_session(seed=99, n_units=20, duration=30.0, multimodal=True)
    np.testing.assert_array_equal(other["image_embeddings"][1], image_library()[other["image_index"]])


def test_image_responses_in_psth(multi):
    counts = _counts(multi)
    it = multi["image_embeddings"][0]
    gain = multi["units_extra"]["true_image_gain"]
    resp = gain > 0
    assert 0.65 < resp.mean() < 0.95
    on = np.floor(it / BIN_SIZE).astype(int)
    win = np.arange(-10, 20)  # -200 .. +400 ms
    idx = on[:, None] + win[None, :]
    idx = idx[(idx.min(1) >= 0) & (idx.max(1) < len(counts))]

    def psth(units):
        return counts[:, units].sum(1)[idx].mean(0)  # (30,) mean population count per bin

    r, n = psth(resp), psth(~resp)
    before = r[:10].mean()
    after = r[12:20].max()  # 40-200 ms after onset
    assert after > 1.3 * before, (before, after)
    assert n[12:20].max() < 1.15 * n[:10].mean()  # non-responsive units stay flat
    # responses are stimulus specific: PSTHs of the responsive population differ between images
    img = multi["image_index"][: len(idx)]
    per_img = np.array([counts[:, resp].sum(1)[idx[img == j]][:, 12:18].mean() for j in range(N_IMAGES)])
    assert per_img.max() > 1.3 * per_img.min()
    # ... and the shared salience (readable from the embedding) orders the population response
    assert np.corrcoef(image_salience(), per_img)[0, 1] > 0.6


def test_multimodal_behavior_leads_activity(multi):
    bv = multi["behavior"][1].astype(np.float64)
    v = multi["input"].astype(np.float64)
    names = multi["latent_names"]
    z = multi["latents"][:, [names.index("input_1"), names.index("input_2")]].astype(np.float64)
    assert np.corrcoef(bv[:, 0], v[:, 0])[0, 1] > 0.9  # behaviour is the (noisy) input

    def corr_at(lag):  # behaviour now vs input factors `lag` samples (10 ms) later
        x = bv[: len(bv) - lag] if lag else bv
        y = z[lag:]
        c = np.corrcoef(np.c_[x, y].T)[:2, 2:]
        return np.abs(c).max()

    assert corr_at(30) > corr_at(0) + 0.1
    assert corr_at(30) > 0.8


# --------------------------------------------------------------------------- files and command line


def test_write_synthetic_sessions(tmp_path):
    paths = write_synthetic_sessions(tmp_path / "out", n_sessions=2, seed=5, duration=20.0, n_units=30)
    assert [p.name for p in paths] == ["synth_000.h5", "synth_001.h5"]
    d0 = make_session(seed=[5, 0], n_units=30, duration=20.0, session_id="synth_000")
    with open_session(paths[0]) as s:
        assert s.n_units == 30 and (s.start, s.end) == (0.0, 20.0)
        t, u = s.spikes(0.0, 20.0)
        np.testing.assert_array_equal(t, d0["spike_times"])
        np.testing.assert_array_equal(u, d0["unit_index"])
        starts, r = s.true_rates(0.0, 20.0)
        np.testing.assert_array_equal(r, d0["true_rates"][0])
        assert s.behavior_dim == 2 and s.image_dim == 0
        assert s.provenance["seed"] == [5, 0] and s.provenance["session_index"] == 0
        assert "true_baseline_rate_hz" in s.units_table
    with open_session(paths[1]) as s:
        assert s.spikes(0.0, 20.0)[0].shape != t.shape or not np.array_equal(s.spikes(0.0, 20.0)[0], t)
    with h5py.File(paths[1], "r") as f:
        data = td.Data.from_hdf5(f, lazy=True)
        assert data.true_rates.rates.shape == (1000, 30)


def test_cli_and_demo(tmp_path):
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers()
    add_cli(sub)
    args = parser.parse_args(
        [
            "synth",
            "--sessions",
            "1",
            "--out",
            str(tmp_path / "a"),
            "--seed",
            "3",
            "--duration",
            "10",
            "--multimodal",
            "--units",
            "20",
        ]
    )
    assert args.func(args) == 0
    with open_session(tmp_path / "a" / "synth_000.h5") as s:
        assert s.n_units == 20 and s.image_dim == IMAGE_DIM and s.trials is not None
    p = make_demo(tmp_path / "demo")
    assert p.name == "demo.h5"
    with open_session(p) as s:
        assert s.n_units == 120 and s.duration == pytest.approx(300.0)
        assert s.true_rates(0, 1)[1].shape == (50, 120)
        assert s.image_dim == IMAGE_DIM and s.behavior_dim == 2
    args = parser.parse_args(["synth", "--demo", "--out", str(tmp_path / "b")])
    assert args.func(args) == 0
    assert (tmp_path / "b" / "demo.h5").exists()

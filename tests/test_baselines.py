import math

import numpy as np
import pytest
from real_data import REAL

from nh_serve.data.features import DEFAULT_REFERENCE_S, reference_rate_hz
from nh_serve.data.spikes import bin_counts
from nh_serve.errors import InputError
from nh_serve.evaluation import baselines as B
from nh_serve.evaluation.metrics import bits_per_spike

NB, BS = 50, 0.02


def step_recording(seed=0, n_units=4, t_step=100.0, low=2.0, high=20.0, end=240.0):
    """Poisson units whose rate steps from ``low`` to ``high`` Hz at ``t_step``."""
    rng = np.random.default_rng(seed)
    ts, us = [], []
    for k in range(n_units):
        for a, b, r in ((0.0, t_step, low), (t_step, end, high)):
            n = rng.poisson(r * (b - a))
            ts.append(rng.uniform(a, b, n))
            us.append(np.full(n, k))
    t, u = np.concatenate(ts), np.concatenate(us)
    o = np.argsort(t, kind="stable")
    return t[o], u[o].astype(np.int64)


def evaluate_windows(t, u, n_units, ref, t_nows, history_start_fn=None):
    preds = {name: [] for name in B.BASELINES}
    counts = []
    for tn in t_nows:
        hs = max(0.0, tn - 60.0) if history_start_fn is None else history_start_fn(tn)
        a, b = np.searchsorted(t, [hs, tn])
        c = np.searchsorted(t, tn + NB * BS)
        out = B.predict_baselines(
            times=t[a:b],
            unit_index=u[a:b],
            n_units=n_units,
            t_now=tn,
            ref_rate_hz=ref,
            n_bins=NB,
            bin_size=BS,
            history_start=hs,
        )
        for name, p in out.items():
            preds[name].append(p)
        counts.append(bin_counts(t[b:c], u[b:c], n_units=n_units, start=tn, bin_size=BS, n_bins=NB))
    C = np.stack(counts)
    return {name: bits_per_spike(np.stack(p), C) for name, p in preds.items()}


def test_step_up_persistence_beats_reference():
    t, u = step_recording()
    sel = t < 60.0
    ref = reference_rate_hz(t[sel], u[sel], n_units=4, start=0.0, end=60.0)
    assert np.all(ref < 4.0)
    bps = evaluate_windows(t, u, 4, ref, np.arange(101.0, 235.0, 1.0))
    assert bps["persistence"] > bps["reference_rate"] + 1.0
    assert bps["exp_smooth"] > bps["reference_rate"] + 1.0
    assert all(np.isfinite(v) for v in bps.values())


def test_outputs_finite_positive_and_shaped():
    rng = np.random.default_rng(1)
    n_units = 6
    t = np.sort(rng.uniform(40.0, 100.0, 500))
    u = rng.integers(0, 4, t.size)  # units 4, 5 silent
    ref = np.array([3.0, 0.0, 12.0, 1.0, 0.0, 0.5])
    out = B.predict_baselines(
        times=t, unit_index=u, n_units=n_units, t_now=100.0, ref_rate_hz=ref, n_bins=NB, bin_size=BS
    )
    assert set(out) == set(B.BASELINES) == {"reference_rate", "persistence", "exp_smooth"}
    for name, p in out.items():
        assert p.shape == (n_units, NB) and p.dtype == np.float32, name
        assert np.all(np.isfinite(p)) and np.all(p > 0), name
        assert np.all(p >= B.RATE_FLOOR_HZ * BS * (1 - 1e-6)), name
        # same as calling the baseline on its own
        alone = B.BASELINES[name](
            times=t, unit_index=u, n_units=n_units, t_now=100.0, ref_rate_hz=ref, n_bins=NB, bin_size=BS
        )
        np.testing.assert_array_equal(alone, p)
    np.testing.assert_allclose(
        out["reference_rate"], np.maximum(ref, B.RATE_FLOOR_HZ)[:, None] * BS * np.ones(NB), rtol=1e-6
    )
    # no history at all (t_now at the recording start): everything falls back to the reference rate
    empty = np.array([])
    out0 = B.predict_baselines(
        times=empty,
        unit_index=empty.astype(int),
        n_units=n_units,
        t_now=0.0,
        ref_rate_hz=ref,
        n_bins=NB,
        bin_size=BS,
    )
    for name, p in out0.items():
        np.testing.assert_allclose(p, out["reference_rate"], rtol=1e-6, err_msg=name)


def test_hand_computed_values():
    ref = np.array([2.0, 0.0])
    t_now = 200.0
    times = np.array([150.0, 190.0, 199.2, 199.5, 199.9])
    units = np.array([1, 0, 0, 0, 0])
    kw = dict(times=times, unit_index=units, n_units=2, t_now=t_now, ref_rate_hz=ref, n_bins=3, bin_size=0.1)
    # persistence: 3 spikes of unit 0 in [199, 200)
    p = B.persistence(**kw)
    r_ctx = (3 + B.PERSIST_PRIOR_S * 2.0) / (1.0 + B.PERSIST_PRIOR_S)
    lags = np.array([0.05, 0.15, 0.25])
    np.testing.assert_allclose(
        p[0], (2.0 + (r_ctx - 2.0) * np.exp(-lags / B.PERSIST_DECAY_S)) * 0.1, rtol=1e-6
    )
    np.testing.assert_allclose(p[1], B.RATE_FLOOR_HZ * 0.1, rtol=1e-6)  # no context spikes, ref 0 -> floor
    # exp_smooth over the default 60 s history [140, 200)
    tau, k = B.SMOOTH_TAU_S, B.SMOOTH_PRIOR_S
    e = tau * (1 - math.exp(-60.0 / tau))
    s0 = sum(math.exp(-(t_now - x) / tau) for x in (190.0, 199.2, 199.5, 199.9))
    s1 = math.exp(-50.0 / tau)
    es = B.exp_smooth(**kw)
    np.testing.assert_allclose(es[0], (s0 + k * 2.0) / (e + k) * 0.1, rtol=1e-6)
    np.testing.assert_allclose(es[1], max(s1 / (e + k), B.RATE_FLOOR_HZ) * 0.1, rtol=1e-6)
    # explicit shorter history: spikes before history_start are ignored
    es_short = B.exp_smooth(**kw, history_start=195.0)
    e5 = tau * (1 - math.exp(-5.0 / tau))
    s0_short = sum(math.exp(-(t_now - x) / tau) for x in (199.2, 199.5, 199.9))
    np.testing.assert_allclose(es_short[0], (s0_short + k * 2.0) / (e5 + k) * 0.1, rtol=1e-6)
    np.testing.assert_allclose(es_short[1], B.RATE_FLOOR_HZ * 0.1, rtol=1e-6)
    # constants can be overridden per call
    p_flat = B.persistence(**kw, prior_s=0.0, decay_s=0.0)
    np.testing.assert_allclose(p_flat[0], 2.0 * 0.1, rtol=1e-6)  # decay 0 -> straight back to the reference


def test_causality_future_spikes_rejected_and_old_spikes_ignored():
    ref = np.array([5.0, 5.0])
    base = dict(n_units=2, t_now=100.0, ref_rate_hz=ref, n_bins=NB, bin_size=BS)
    t = np.array([90.0, 99.0, 99.5])
    u = np.array([0, 1, 0])
    out = B.predict_baselines(times=t, unit_index=u, **base)
    for bad_t in (100.0, 100.3):
        with pytest.raises(InputError, match="causal"):
            B.predict_baselines(times=np.append(t, bad_t), unit_index=np.append(u, 1), **base)
        for fn in B.BASELINES.values():
            with pytest.raises(InputError, match="causal"):
                fn(times=np.append(t, bad_t), unit_index=np.append(u, 1), **base)
    # spikes older than the history window do not change anything
    old = B.predict_baselines(
        times=np.concatenate([[1.0, 20.0], t]), unit_index=np.concatenate([[1, 0], u]), **base
    )
    for name in out:
        np.testing.assert_array_equal(old[name], out[name])


def test_bad_input_rejected():
    t = np.array([1.0, 2.0])
    u = np.array([0, 1])
    ok = dict(times=t, unit_index=u, n_units=2, t_now=3.0, ref_rate_hz=np.ones(2), n_bins=5, bin_size=0.02)
    B.predict_baselines(**ok)
    for change in (
        {"ref_rate_hz": np.ones(3)},
        {"ref_rate_hz": np.array([1.0, -1.0])},
        {"ref_rate_hz": np.array([1.0, np.nan])},
        {"n_bins": 0},
        {"n_bins": 2.5},
        {"bin_size": -0.02},
        {"t_now": float("nan")},
        {"history_start": 5.0},
        {"unit_index": np.array([0, 2])},
        {"times": np.array([2.0, 1.0])},
    ):
        with pytest.raises(InputError):
            B.predict_baselines(**{**ok, **change})


@pytest.mark.real_data
def test_real_recording_baselines_are_honest():
    path = REAL / "ibl_brainbox_fixture" / "spikes_flat.npz"
    if not path.exists():
        pytest.skip(f"real data not available at {path}")
    z = np.load(path)
    t = z["spike_times"]
    ids, u = np.unique(z["unit_ids"], return_inverse=True)
    u = u.astype(np.int64)
    sel = t < DEFAULT_REFERENCE_S
    ref = reference_rate_hz(t[sel], u[sel], n_units=ids.size, start=0.0, end=DEFAULT_REFERENCE_S)
    bps = evaluate_windows(t, u, ids.size, ref, np.arange(61.0, 119.0, 1.0))
    assert all(np.isfinite(v) for v in bps.values())
    # exp_smooth (60 s of history) is the strongest baseline on this recording; all stay within a
    # sane range of the oracle mean-rate null
    assert bps["exp_smooth"] > bps["reference_rate"]
    assert bps["exp_smooth"] > bps["persistence"]
    assert all(-0.3 < v < 0.1 for v in bps.values()), bps

"""The baseline ladder: every forecaster against a hand computation, the GLMs against
scikit-learn's PoissonRegressor, the block runner against the one-window reference, and the
paired bootstrap interval against a known difference."""

import math

import numpy as np
import pytest
import torch
from real_data import REAL
from sklearn.linear_model import PoissonRegressor

from nh_serve.core.glm import (
    CORRECTION_TOL,
    GLM_BANDS_MS,
    POP_INTERCEPT_L2,
    PopulationGLM,
    _log_band_sum,
    _top_right_singular_vectors,
    band_index,
    correction_folds,
    purge_gap,
    shrunk_gains,
)
from nh_serve.core.poisson import fit_poisson, poisson_objective
from nh_serve.core.univariate_glm import GLMRecording, UnivariateGLM
from nh_serve.data.features import DEFAULT_REFERENCE_S, reference_rate_hz
from nh_serve.data.history import HISTORY_TAUS, EmaState, ema_rates, log_history
from nh_serve.data.spikes import bin_counts
from nh_serve.data.windows import target_counts
from nh_serve.errors import InputError
from nh_serve.evaluation import baselines as B
from nh_serve.evaluation.metrics import bits_per_spike, paired_bps_interval, window_nll

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


def evaluate_windows(t, u, n_units, ref, t_nows):
    preds = {name: [] for name in B.HISTORY_ONLY}
    counts = []
    for tn in t_nows:
        b = np.searchsorted(t, tn)
        c = np.searchsorted(t, tn + NB * BS)
        out = B.predict_baselines(
            times=t[:b], unit_index=u[:b], n_units=n_units, t_now=tn, ref_rate_hz=ref, n_bins=NB, bin_size=BS,
            recording_start=0.0,
        )
        for name, p in out.items():
            preds[name].append(p)
        counts.append(bin_counts(t[b:c], u[b:c], n_units=n_units, start=tn, bin_size=BS, n_bins=NB))
    C = np.stack(counts)
    return {name: bits_per_spike(np.stack(p), C) for name, p in preds.items()}


# ------------------------------------------------------------------------------------ history


def test_smoothed_rates_match_the_formula_and_stream():
    rng = np.random.default_rng(0)
    U = 5
    t = np.sort(rng.uniform(0, 40, 600))
    u = rng.integers(0, U, 600)
    ref = rng.uniform(0.5, 5, U)
    taus = (0.05, 1.0, 30.0)
    q = np.array([0.0, 0.3, 4.99, 5.0, 39.99, 25.0, 12.7])  # any order
    got = ema_rates(t, u, n_units=U, t_eval=q, start=0.0, ref_rate_hz=ref, taus=taus)
    for i, qq in enumerate(q):
        for k, tau in enumerate(taus):
            for j in range(U):
                s = t[(u == j) & (t < qq)]
                want = ref[j] * math.exp(-qq / tau) + np.exp(-(qq - s) / tau).sum() / tau
                assert got[i, j, k] == pytest.approx(want, rel=1e-12)
    # streaming one second at a time gives the same state; a gap relaxes toward the reference rate
    st = EmaState(ref_rate_hz=ref, taus=taus, start=0.0)
    for a in range(39):
        st.update(t, u, until=a + 1.0)
    want39 = ema_rates(t, u, n_units=U, t_eval=[39.0], start=0.0, ref_rate_hz=ref, taus=taus)[0]
    np.testing.assert_allclose(st.rates, want39, rtol=1e-12)
    before = st.rates.copy()
    st.skip_to(39.0 + 1e3)
    np.testing.assert_allclose(st.rates, np.repeat(ref[:, None], 3, 1), rtol=1e-9)
    assert st.observed_s == 0.0 and not np.allclose(before, st.rates)
    # continuing from a state equals one pass
    mid = ema_rates(t, u, n_units=U, t_eval=[20.0], start=0.0, ref_rate_hz=ref, taus=taus)[0]
    cont = ema_rates(t, u, n_units=U, t_eval=[33.0], start=20.0, ref_rate_hz=ref, taus=taus, init=mid)
    one = ema_rates(t, u, n_units=U, t_eval=[33.0], start=0.0, ref_rate_hz=ref, taus=taus)
    np.testing.assert_allclose(cont, one, rtol=1e-12)
    with pytest.raises(InputError):
        ema_rates(t, u, n_units=U, t_eval=[-1.0], start=0.0, ref_rate_hz=ref, taus=taus)


# ------------------------------------------------------------------------------------ one window


def test_hand_computed_values():
    ref = np.array([2.0, 0.0])
    t_now = 200.0
    times = np.array([150.0, 190.0, 199.2, 199.5, 199.9])
    units = np.array([1, 0, 0, 0, 0])
    kw = dict(times=times, unit_index=units, n_units=2, t_now=t_now, ref_rate_hz=ref, n_bins=3, bin_size=0.1)
    out = B.predict_baselines(**kw, recording_start=100.0)
    # reference rate: flat, floored at 0.01 Hz
    np.testing.assert_allclose(out["reference_rate"], [[0.2] * 3, [0.001] * 3], rtol=1e-6)
    # persistence: 3 spikes of unit 0 in [199, 200), relaxing toward the reference rate
    r_ctx = (3 + B.PERSIST_PRIOR_S * 2.0) / (1.0 + B.PERSIST_PRIOR_S)
    lags = np.array([0.05, 0.15, 0.25])
    np.testing.assert_allclose(out["persistence"][0], (2.0 + (r_ctx - 2.0) * np.exp(-lags / B.PERSIST_DECAY_S)) * 0.1, rtol=1e-6)
    np.testing.assert_allclose(out["persistence"][1], B.RATE_FLOOR_HZ * 0.1, rtol=1e-6)
    # exp_smooth over the 60 s history [140, 200)
    tau, k = B.SMOOTH_TAU_S, B.SMOOTH_PRIOR_S
    e = tau * (1 - math.exp(-60.0 / tau))
    s0 = sum(math.exp(-(t_now - x) / tau) for x in (190.0, 199.2, 199.5, 199.9))
    s1 = math.exp(-50.0 / tau)
    np.testing.assert_allclose(out["exp_smooth"][0], (s0 + k * 2.0) / (e + k) * 0.1, rtol=1e-6)
    np.testing.assert_allclose(out["exp_smooth"][1], max(s1 / (e + k), B.RATE_FLOOR_HZ) * 0.1, rtol=1e-6)
    # ema_tau10, started at the reference rate at the recording start (100 s), no shrinkage
    for tau in (1.0, 10.0, 60.0):
        r0 = 2.0 * math.exp(-100.0 / tau) + sum(math.exp(-(t_now - x) / tau) for x in (190.0, 199.2, 199.5, 199.9)) / tau
        r1 = 0.0 * math.exp(-100.0 / tau) + math.exp(-50.0 / tau) / tau
        np.testing.assert_allclose(out[f"ema_tau{tau:g}"][:, 0], [max(r0, 0.01) * 0.1, max(r1, 0.01) * 0.1], rtol=1e-6)
    # persistence_k: (n_last_second + k r_ref) / (1 + k)
    for kk in (1, 5, 20):
        np.testing.assert_allclose(
            out[f"persistence_k{kk}"][:, 1], [(3 + kk * 2.0) / (1 + kk) * 0.1, 0.01 * 0.1], rtol=1e-6
        )
    # a shorter 60 s history for the legacy two: spikes before history_start are ignored by them
    short = B.predict_baselines(**kw, history_start=195.0, recording_start=100.0)
    tau_s = B.SMOOTH_TAU_S
    e5 = tau_s * (1 - math.exp(-5.0 / tau_s))
    s0_short = sum(math.exp(-(t_now - x) / tau_s) for x in (199.2, 199.5, 199.9))
    np.testing.assert_allclose(short["exp_smooth"][0], (s0_short + k * 2.0) / (e5 + k) * 0.1, rtol=1e-6)
    np.testing.assert_array_equal(short["ema_tau10"], out["ema_tau10"])  # the EMA still starts at 100 s


def test_outputs_finite_positive_and_no_history_falls_back_to_the_reference_rate():
    rng = np.random.default_rng(1)
    n_units = 6
    t = np.sort(rng.uniform(40.0, 100.0, 500))
    u = rng.integers(0, 4, t.size)  # units 4, 5 silent
    ref = np.array([3.0, 0.0, 12.0, 1.0, 0.0, 0.5])
    out = B.predict_baselines(times=t, unit_index=u, n_units=n_units, t_now=100.0, ref_rate_hz=ref, n_bins=NB, bin_size=BS)
    assert list(out) == list(B.HISTORY_ONLY)
    for name, p in out.items():
        assert p.shape == (n_units, NB) and p.dtype == np.float32, name
        assert np.all(np.isfinite(p)) and np.all(p >= B.RATE_FLOOR_HZ * BS * (1 - 1e-6)), name
    empty = np.array([])
    out0 = B.predict_baselines(times=empty, unit_index=empty.astype(int), n_units=n_units, t_now=0.0,
                               ref_rate_hz=ref, n_bins=NB, bin_size=BS)
    for name, p in out0.items():
        np.testing.assert_allclose(p, out["reference_rate"], rtol=1e-6, err_msg=name)


def test_step_up_history_baselines_beat_the_reference_rate():
    t, u = step_recording()
    sel = t < 60.0
    ref = reference_rate_hz(t[sel], u[sel], n_units=4, start=0.0, end=60.0)
    bps = evaluate_windows(t, u, 4, ref, np.arange(101.0, 235.0, 1.0))
    for name in ("persistence", "exp_smooth", "ema_tau10", "persistence_k1"):
        assert bps[name] > bps["reference_rate"] + 1.0, name
    assert all(np.isfinite(v) for v in bps.values())


def test_causality_and_bad_input():
    ref = np.array([5.0, 5.0])
    base = dict(n_units=2, t_now=100.0, ref_rate_hz=ref, n_bins=NB, bin_size=BS)
    t = np.array([90.0, 99.0, 99.5])
    u = np.array([0, 1, 0])
    B.predict_baselines(times=t, unit_index=u, **base)
    for bad_t in (100.0, 100.3):
        with pytest.raises(InputError, match="causal"):
            B.predict_baselines(times=np.append(t, bad_t), unit_index=np.append(u, 1), **base)
    ok = dict(times=t, unit_index=u, n_units=2, t_now=100.0, ref_rate_hz=np.ones(2), n_bins=5, bin_size=0.02)
    for change in (
        {"ref_rate_hz": np.ones(3)},
        {"ref_rate_hz": np.array([1.0, -1.0])},
        {"ref_rate_hz": np.array([1.0, np.nan])},
        {"n_bins": 0},
        {"n_bins": 2.5},
        {"bin_size": -0.02},
        {"t_now": float("nan")},
        {"history_start": 105.0},
        {"unit_index": np.array([0, 2, 0])},
        {"times": np.array([99.0, 90.0, 99.5])},
        {"names": ("univariate_glm",)},
    ):
        with pytest.raises(InputError):
            B.predict_baselines(**{**ok, **change})


# ------------------------------------------------------------------------------------ GLMs


def test_poisson_solver_with_shared_columns_solves_the_same_problem():
    """Columns every group shares, passed once (``shared=``), give the weights of the same columns copied
    into every group's design."""
    rng = np.random.default_rng(3)
    G, P = 7, 300
    own = rng.normal(size=(G, P, 3))
    shared = np.concatenate([rng.normal(size=(P, 5)), np.ones((P, 1))], 1)
    w_true = 0.3 * rng.normal(size=(G, 9))
    X = np.concatenate([own, np.broadcast_to(shared, (G, P, 6))], 2)
    y = rng.poisson(np.exp(np.einsum("gpf,gf->gp", X, w_true) - 1.0)).astype(float)
    pen = np.r_[np.full(8, 3.0), 0.1]
    full = fit_poisson(X, y, offset=np.full((G, P), -1.0), l2=pen, tol=1e-14)
    split = fit_poisson(own, y, shared=shared, offset=np.full((G, P), -1.0), l2=pen, tol=1e-14)
    np.testing.assert_allclose(split, full, atol=1e-8)
    with pytest.raises(ValueError, match="shared"):
        fit_poisson(shared, y, shared=shared)


@pytest.mark.parametrize("subset_below", [0.0, 0.8, 1.0])
def test_poisson_solver_groups_that_stop_early_keep_their_own_solution(monkeypatch, subset_below):
    """Groups converge after different numbers of Newton steps; the ones that stop stay in the batch
    (computed, not moved) until fewer than ``SUBSET_BELOW`` still move (0: they never leave; 1: at once).
    Each group's weights must equal those of the same group solved alone, for a shared design and for
    per-group columns plus shared ones."""
    import nh_serve.core.poisson as poisson

    monkeypatch.setattr(poisson, "SUBSET_BELOW", subset_below)
    rng = np.random.default_rng(11)
    G, P = 40, 250
    shared = np.concatenate([rng.normal(size=(P, 3)), np.ones((P, 1))], 1)
    own = rng.normal(size=(G, P, 2))
    scale = np.linspace(0.0, 1.5, G)[:, None]  # from no signal (stops at once) to strong (many steps)
    w_true = scale * rng.normal(size=(G, 6))
    X = np.concatenate([own, np.broadcast_to(shared, (G, P, 4))], 2)
    y = rng.poisson(np.exp(np.einsum("gpf,gf->gp", X, w_true) - 0.5)).astype(float)
    pen = np.r_[np.full(5, 2.0), 0.01]
    together = fit_poisson(own, y, shared=shared, offset=-0.5, l2=pen)
    alone = np.stack([fit_poisson(own[g : g + 1], y[g : g + 1], shared=shared, offset=-0.5, l2=pen)[0] for g in range(G)])
    np.testing.assert_allclose(together, alone, atol=1e-6)
    w_shared = fit_poisson(shared, y, offset=-0.5, l2=pen[2:])
    alone = np.stack([fit_poisson(shared, y[g : g + 1], offset=-0.5, l2=pen[2:])[0] for g in range(G)])
    np.testing.assert_allclose(w_shared, alone, atol=1e-6)
    # and each is a minimum: its gradient vanishes
    obj = poisson_objective(w_shared, shared, y, offset=-0.5, l2=pen[2:])
    for d in np.eye(4)[:, None, :] * 1e-4:
        assert np.all(poisson_objective(w_shared + d, shared, y, offset=-0.5, l2=pen[2:]) >= obj - 1e-9)
        assert np.all(poisson_objective(w_shared - d, shared, y, offset=-0.5, l2=pen[2:]) >= obj - 1e-9)


def test_registration_tolerance_fits_the_same_correction():
    """The fits at registration stop Newton at CORRECTION_TOL instead of 1e-9: the correction must be
    the same (same units and bands kept, weights within 1e-4)."""
    rng = np.random.default_rng(2)
    P, U = 400, 12
    R = np.exp(rng.normal(2.5, 0.6, size=(P, U, len(HISTORY_TAUS))))  # smoothed rates, Hz
    eta = np.log(0.02 * R[:, :, -1:]) + rng.normal(0, 0.1, size=(P, U, 50))  # the predictor it corrects
    y = rng.poisson(np.exp(eta + 0.5 * np.log(R[:, :, [1]] / R[:, :, [-1]]))).astype(float)  # it misses a recent-rate term
    fits = {}
    for tol in (1e-9, CORRECTION_TOL):
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr("nh_serve.core.glm.CORRECTION_TOL", tol)
            fits[tol] = PopulationGLM(n_bins=50, bin_size=0.02).fit(R, y, offset=eta)
    a, b = fits[1e-9], fits[CORRECTION_TOL]
    assert a.corrected and b.corrected and np.abs(a.W).sum() > 0
    np.testing.assert_array_equal(a.W != 0, b.W != 0)
    np.testing.assert_allclose(b.W, a.W, atol=1e-4)


def test_principal_directions_and_band_sums_match_their_definitions():
    """The population GLM's components (from the smaller Gram matrix) are the SVD's right singular
    vectors up to sign, with a fixed sign; a band's log expected count is the log of the sum of its bins'."""
    rng = np.random.default_rng(4)
    for n, m, k in ((60, 200, 8), (300, 25, 8), (6, 4, 3)):
        A = rng.normal(size=(n, m)) @ np.diag(np.linspace(3.0, 0.5, m))
        A -= A.mean(0)
        V = _top_right_singular_vectors(A, k)
        vt = np.linalg.svd(A, full_matrices=False)[2][:k]
        np.testing.assert_allclose(np.abs(V), np.abs(vt.T), atol=1e-9)
        assert np.all(V[np.abs(V).argmax(0), np.arange(k)] > 0)
    flat = np.zeros((10, 3))
    flat[:, 0] = np.arange(10.0) - 4.5  # one direction with variance, none elsewhere
    np.testing.assert_allclose(_top_right_singular_vectors(flat, 3), np.eye(3)[:, :3] * [1, 0, 0], atol=1e-12)
    bands = band_index(50, 0.02)
    x = rng.normal(-3.0, 2.0, size=(7, 5, 50))
    x[0, 0, 0] = 40.0  # clipped at 10
    for b in range(len(GLM_BANDS_MS)):
        want = np.log(np.exp(np.clip(x[:, :, bands == b], -30, 10)).sum(-1))
        np.testing.assert_allclose(_log_band_sum(x, bands, b), want, rtol=1e-12)


def test_newton_systems_solve_by_cholesky_and_fall_back_where_it_fails():
    """The solver's batched SPD solve equals a general solve, also for a system that is not positive definite."""
    from nh_serve.core.poisson import _spd_solve

    g = torch.Generator().manual_seed(0)
    A = torch.randn(5, 7, 30, generator=g, dtype=torch.float64)
    H = A @ A.transpose(1, 2) + 1e-3 * torch.eye(7, dtype=torch.float64)
    H[2] = torch.diag(torch.tensor([1.0, -2.0, 3.0, 1.0, 1.0, 1.0, 1.0], dtype=torch.float64))  # indefinite
    b = torch.randn(5, 7, 1, generator=g, dtype=torch.float64)
    torch.testing.assert_close(_spd_solve(H, b), torch.linalg.solve(H, b), rtol=1e-9, atol=1e-12)


def test_poisson_solver_matches_scikit_learn():
    rng = np.random.default_rng(0)
    n = 400
    X = rng.normal(size=(n, 4))
    e = rng.uniform(0.5, 3.0, n)
    off = rng.normal(0.0, 0.3, n)
    y = rng.poisson(e * np.exp(off + 0.3 * X[:, 0] - 0.5 * X[:, 2] + 0.2))
    X1 = np.concatenate([X, np.ones((n, 1))], 1)
    alpha = 0.01
    # exposure and offset fold into scikit-learn's sample weights: mu = (e exp(off)) exp(X w)
    eff = e * np.exp(off)
    ref = PoissonRegressor(alpha=alpha, tol=1e-12, max_iter=5000).fit(X, y / eff, sample_weight=eff)
    # scikit-learn's penalty is alpha/2 |w|^2 times the total weight; the intercept is free
    w = fit_poisson(X1, y[None], exposure=e[None], offset=off[None], l2=np.r_[[eff.sum() * alpha] * 4, 0.0])
    np.testing.assert_allclose(w[0], np.r_[ref.coef_, ref.intercept_], atol=1e-4)
    # many groups at once, and the objective never rises above the start
    G = np.stack([X1] * 3)
    w3 = fit_poisson(G, np.stack([y] * 3), exposure=np.stack([e] * 3), offset=np.stack([off] * 3),
                     l2=np.r_[[eff.sum() * alpha] * 4, 0.0])
    np.testing.assert_allclose(w3, np.repeat(w, 3, 0), atol=1e-8)
    assert np.all(poisson_objective(w3, G, np.stack([y] * 3)) <= poisson_objective(0 * w3, G, np.stack([y] * 3)) + 1e-9)


def _rec(seed, n_units=6, end=200.0):
    rng = np.random.default_rng(seed)
    ts, us = [], []
    for k in range(n_units):
        rate = rng.uniform(1, 20)
        drift = rng.uniform(0.5, 2.0)
        n = rng.poisson(rate * end)
        tt = np.sort(rng.uniform(0, end, n))
        keep = rng.random(n) < np.where(tt > end / 2, 1.0, 1.0 / drift)  # a rate change half-way
        ts.append(tt[keep])
        us.append(np.full(keep.sum(), k))
    t, u = np.concatenate(ts), np.concatenate(us)
    o = np.argsort(t, kind="stable")
    t, u = t[o], u[o].astype(np.int64)
    ref = reference_rate_hz(t[t < 40], u[t < 40], n_units=n_units, start=0.0, end=40.0)
    return GLMRecording(name=f"r{seed}", times=t, units=u, n_units=n_units, start=0.0, end=end,
                        reference=(0.0, 40.0), ref_rate_hz=ref)


def test_univariate_glm_fit_matches_scikit_learn_and_predicts_by_hand():
    recs = [_rec(1), _rec(2, n_units=4)]
    glm = UnivariateGLM.fit(recs, step_s=1.0)
    assert glm.weights.shape == (6, 6) and glm.fitted_on == ("r1", "r2")
    # the same problem for the 0-40 ms band, solved by scikit-learn
    Xs, ys, es, ws = [], [], [], []
    for rec in recs:
        pos = np.arange(40.0, rec.end - 1.0 + 1e-9, 1.0)
        R = ema_rates(rec.times, rec.units, n_units=rec.n_units, t_eval=pos, start=0.0, ref_rate_hz=rec.ref_rate_hz, taus=HISTORY_TAUS)
        rel, slow = log_history(R)
        c = target_counts(rec.times, rec.units, pos, n_units=rec.n_units, bin_size=BS, n_bins=NB)[:, :, :2].sum(-1)
        wgt = 1.0 / (pos.size * rec.n_units)
        Xs.append(rel.reshape(-1, 5))
        ys.append(c.reshape(-1))
        es.append((np.exp(slow) * 2 * BS).reshape(-1))  # exposure 2 bins x exp(offset)
        ws.append(np.full(c.size, wgt))
    X, y, eff, wt = map(np.concatenate, (Xs, ys, es, ws))
    sw = eff * wt
    ref = PoissonRegressor(alpha=1e-3 / sw.sum(), tol=1e-12, max_iter=5000).fit(X, y / eff, sample_weight=sw)
    # the GLM's tiny ridge also touches the intercept; scale it out of the comparison by its size
    np.testing.assert_allclose(glm.weights[0, :5], ref.coef_, atol=1e-4)
    assert glm.weights[0, 5] == pytest.approx(ref.intercept_, abs=1e-3)
    # prediction by hand for one window
    R = ema_rates(recs[0].times, recs[0].units, n_units=6, t_eval=[150.0], start=0.0, ref_rate_hz=recs[0].ref_rate_hz, taus=HISTORY_TAUS)
    pred = glm.predict(R, n_bins=NB, bin_size=BS)  # (1, U, T)
    logs = np.log(R[0] + 0.1)
    slow = logs[:, 4]
    x = np.concatenate([logs[:, [0, 1, 2, 3, 5]] - slow[:, None], np.ones((6, 1))], 1)
    bands = band_index(NB, BS)
    assert list(np.bincount(bands)) == [2, 3, 5, 10, 15, 15]  # 0-40, 40-100, ..., 700-1000 ms
    for k in (0, 1, 4, 30, 49):
        np.testing.assert_allclose(pred[0, :, k], np.exp(slow + x @ glm.weights[bands[k]]) * BS, rtol=1e-5)
    # it round-trips through JSON and rejects broken records
    again = UnivariateGLM.from_dict(glm.to_dict())
    np.testing.assert_allclose(again.weights, glm.weights, atol=1e-8)
    with pytest.raises(InputError):
        UnivariateGLM.from_dict({"weights": [[1.0, 2.0]]})


def test_population_glm_matches_scikit_learn_per_unit():
    rec = _rec(3, n_units=5, end=120.0)
    pos = np.arange(1.0, 40.0 - 1.0 + 1e-9, 0.1)
    R = ema_rates(rec.times, rec.units, n_units=5, t_eval=pos, start=0.0, ref_rate_hz=rec.ref_rate_hz, taus=HISTORY_TAUS)
    counts = target_counts(rec.times, rec.units, pos, n_units=5, bin_size=BS, n_bins=NB)
    pop = PopulationGLM(n_bins=NB, bin_size=BS).fit(R, counts)
    design, slow, _ = pop._design(R)
    design = design[0]  # the same design for every band
    X = design.full()  # (U, P, F)
    F = X.shape[-1]
    for b, (u0, u1) in ((0, (0, 2)), (5, (35, 50))):
        for u in range(5):
            lam = pop.l2[b, u]
            pen = np.full(F, lam)
            pen[-1] = POP_INTERCEPT_L2
            y = counts[:, u, u0:u1].sum(-1)
            eff = np.exp(slow[u] + math.log(BS)) * (u1 - u0)
            # different penalties per weight = one penalty on rescaled features (no free intercept)
            scale = np.sqrt(1.0 / pen)
            m = PoissonRegressor(alpha=1.0 / eff.sum(), fit_intercept=False, tol=1e-12, max_iter=10000)
            m.fit(X[u] * scale, y / eff, sample_weight=eff)
            np.testing.assert_allclose(pop.W[b, u], m.coef_ * scale, atol=1e-4)
    # predictions are finite, positive, band-constant and causal in shape
    out = pop.predict(R[-3:])
    assert out.shape == (3, 5, NB) and np.all(np.isfinite(out)) and np.all(out > 0)
    assert np.all(out[:, :, 0] == out[:, :, 1])


def test_baseline_set_blocks_equal_the_one_window_reference_and_stay_causal():
    rec = _rec(4, n_units=5, end=150.0)
    t, u = rec.times, rec.units
    read = lambda a, b: (t[np.searchsorted(t, a) : np.searchsorted(t, b)], u[np.searchsorted(t, a) : np.searchsorted(t, b)])
    kw = dict(read=read, n_units=5, n_bins=NB, bin_size=BS, ref_rate_hz=rec.ref_rate_hz, start=0.0, reference=(0.0, 40.0))
    bset = B.BaselineSet(B.DEFAULT_BASELINES, univariate=UnivariateGLM(weights=np.full((6, 6), 0.05)), **kw)
    t_now = np.arange(41.0, 148.0, 0.7)
    got = {n: [] for n in bset.names}
    for a, b in ((0, 7), (7, 8), (8, 60), (60, t_now.size)):  # uneven blocks with 60 s of lookback
        lo = max(0.0, t_now[a] - 60.0)
        bt, bu = read(lo, t_now[b - 1] + 1.0)  # the block also holds the horizon spikes: never used
        for n, v in bset.predict(t_now[a:b], bt, bu, t0=lo).items():
            got[n].append(v)
    got = {n: np.concatenate(v) for n, v in got.items()}
    for i, tn in enumerate(t_now):
        k = np.searchsorted(t, tn)
        want = B.predict_baselines(times=t[:k], unit_index=u[:k], n_units=5, t_now=tn, ref_rate_hz=rec.ref_rate_hz,
                                   n_bins=NB, bin_size=BS, recording_start=0.0)
        for n, v in want.items():
            np.testing.assert_allclose(got[n][i], v, rtol=1e-6, err_msg=n)
    R = ema_rates(t, u, n_units=5, t_eval=t_now, start=0.0, ref_rate_hz=rec.ref_rate_hz, taus=HISTORY_TAUS)
    np.testing.assert_allclose(got["univariate_glm"], bset.univariate.predict(R, n_bins=NB, bin_size=BS), rtol=1e-5)
    np.testing.assert_allclose(got["population_glm"], bset.population.predict(R), rtol=1e-5)
    with pytest.raises(InputError):
        B.baseline_names("most")


def test_population_glm_with_an_offset_corrects_a_predictor_only_where_it_helps():
    """With another predictor's log counts as offset, the GLM multiplies that predictor's rates; units whose
    counts the predictor already explains keep no correction, units driven by the population get one."""
    rng = np.random.default_rng(0)
    U, P = 6, 500
    latent = np.convolve(rng.normal(size=P + 40), np.ones(40) / np.sqrt(40), mode="valid")[:P]  # slow shared drive
    base = np.full((P, U, NB), math.log(5.0 * BS))  # the predictor: 5 Hz flat
    drive = np.zeros((P, U))
    drive[:, :3] = 0.8 * latent[:, None]  # units 0-2 follow the latent, 3-5 are the flat 5 Hz the predictor says
    counts = rng.poisson(np.exp(base + drive[:, :, None]))
    # smoothed rates that carry the latent (what the population's history would show)
    R = np.repeat((5.0 * np.exp(drive))[:, :, None], len(HISTORY_TAUS), axis=2)
    R[:, 3:] *= np.exp(0.3 * rng.normal(size=(P, 3, 1)))  # noisy, unrelated rates for the flat units
    pop = PopulationGLM(n_bins=NB, bin_size=BS).fit(R, counts, offset=base)
    assert pop.corrected and pop.judged_gain > 0
    corrected = np.abs(pop.W).sum((0, 2)) > 0
    assert corrected[:3].all()  # the population-driven units are corrected ...
    assert pop.W[:, 3:].std() < 0.5 * pop.W[:, :3].std()  # ... the others hardly or not at all
    corr = pop.log_correction(R)  # (P, U, T)
    assert corr.shape == (P, U, NB)
    gain = (np.exp(base + corr) - counts * (base + corr)).sum() < (np.exp(base) - counts * base).sum()
    assert gain
    # a predictor that already is the truth gets no correction that matters
    exact = PopulationGLM(n_bins=NB, bin_size=BS).fit(R, counts, offset=base + drive[:, :, None])
    assert np.abs(exact.log_correction(R)).mean() < 0.1


def test_a_correction_reaches_units_firing_under_1_hz():
    """Each unit and band keeps the correction wherever it gains on held-out times, however slowly the unit
    fires: population-driven units under 1 Hz are corrected (a rule demanding 1 Hz and 2 nats per unit and band
    dropped such corrections, and the recording-level judgement on unseen times already guards the rest)."""
    rng = np.random.default_rng(3)
    U, P = 6, 500
    latent = np.convolve(rng.normal(size=P + 40), np.ones(40) / np.sqrt(40), mode="valid")[:P]
    base = np.full((P, U, NB), math.log(0.3 * BS))  # the predictor: 0.3 Hz flat
    drive = np.repeat(1.0 * latent[:, None], U, axis=1)
    counts = rng.poisson(np.exp(base + drive[:, :, None]))
    assert (counts.sum((0, 2)) / (P * NB * BS) < 1.0).all()  # every unit under 1 Hz
    R = np.repeat((0.3 * np.exp(drive))[:, :, None], len(HISTORY_TAUS), axis=2)
    pop = PopulationGLM(n_bins=NB, bin_size=BS).fit(R, counts, offset=base)
    assert pop.corrected
    assert (np.abs(pop.W).sum((0, 2)) > 0).all()
    corr = pop.log_correction(R)
    assert (np.exp(base + corr) - counts * (base + corr)).sum() < (np.exp(base) - counts * base).sum()


def test_a_correction_that_does_not_carry_over_in_time_is_dropped():
    """Whether to correct at all is judged on the last fit times, which none of its fits saw: where the units'
    link to the population reverses there (a drifting recording), the correction loses to the predictor and is
    dropped."""
    rng = np.random.default_rng(1)
    U, P = 6, 500
    latent = np.convolve(rng.normal(size=P + 40), np.ones(40) / np.sqrt(40), mode="valid")[:P]
    base = np.full((P, U, NB), math.log(5.0 * BS))
    seen = np.repeat((5.0 * np.exp(0.8 * latent))[:, None, None], len(HISTORY_TAUS), axis=2) * np.ones((1, U, 1))
    drive = 0.8 * latent[:, None] * np.where(np.arange(P) < 0.85 * P, 1.0, -1.0)[:, None]  # reverses at the end
    counts = rng.poisson(np.exp(base + drive[:, :, None]))
    pop = PopulationGLM(n_bins=NB, bin_size=BS).fit(seen, counts, offset=base)
    assert not pop.corrected and not pop.W.any() and not pop.fold_W.any() and pop.judged_gain < 0
    assert not pop.log_correction(seen).any()
    # the same link kept to the end earns a correction
    steady = rng.poisson(np.exp(base + 0.8 * latent[:, None, None]))
    assert PopulationGLM(n_bins=NB, bin_size=BS).fit(seen, steady, offset=base).corrected


def test_each_folds_correction_is_fitted_without_the_part_that_judges_it():
    """A correction keeps each fold's weights (for the calibration judged after it on the same parts): fold 0's
    are fitted on the first 70% of the fit times, so a few spikes added in the last 15% (its judging part) leave
    them as they are where the choices of penalty and kept bands stay the same; fold 1's, mirrored, ignore the
    first 15%; the weights refitted on every time do move."""
    rng = np.random.default_rng(0)
    U, P = 6, 500
    latent = np.convolve(rng.normal(size=P + 40), np.ones(40) / np.sqrt(40), mode="valid")[:P]
    base = np.full((P, U, NB), math.log(5.0 * BS))
    drive = 0.8 * latent[:, None] * np.ones((1, U))
    counts = rng.poisson(np.exp(base + drive[:, :, None])).astype(float)
    R = np.repeat((5.0 * np.exp(drive))[:, :, None], len(HISTORY_TAUS), axis=2)
    ref = PopulationGLM(n_bins=NB, bin_size=BS).fit(R, counts, offset=base)
    assert ref.corrected and ref.fold_W.shape == (2, *ref.W.shape) and np.abs(ref.fold_W).sum() > 0
    for f, rows in ((0, slice(int(0.86 * P), P)), (1, slice(0, int(0.14 * P)))):
        changed = counts.copy()
        changed[rows] += rng.random(changed[rows].shape) < 0.002
        other = PopulationGLM(n_bins=NB, bin_size=BS).fit(R, changed, offset=base)
        assert other.corrected and np.array_equal(other.l2, ref.l2)  # the same choices
        np.testing.assert_array_equal(other.fold_W[f] != 0, ref.fold_W[f] != 0)
        np.testing.assert_array_equal(other.fold_W[f], ref.fold_W[f])
        assert not np.array_equal(other.W, ref.W)
        np.testing.assert_array_equal(other.log_correction(R, fold=f), ref.log_correction(R, fold=f))
    kept = ref.log_correction(R)
    ref.release_folds()  # what a session keeps: the correction, not its folds
    np.testing.assert_array_equal(ref.log_correction(R), kept)
    with pytest.raises(ValueError, match="fold"):
        ref.log_correction(R, fold=0)


def test_purged_folds_leave_no_horizon_shared_between_parts():
    """Fit times 0.1 s apart predict the next second: a part that follows another in time starts only where its
    horizons no longer overlap the other's, in both folds (the mirrored one too); a fit too short for the gap
    gets none."""
    assert (purge_gap(1.0, 0.1), purge_gap(1.0, 0.5), purge_gap(1.0, 1.0), purge_gap(1.0, 0.05)) == (9, 1, 0, 19)
    with pytest.raises(ValueError, match="positive"):
        purge_gap(1.0, 0.0)
    step, horizon, n = 0.1, 1.0, 530
    gap = purge_gap(horizon, step)
    for fold in correction_folds(n, gap):
        parts = sorted((p for p in fold), key=lambda p: p.start)  # in time order
        times = [np.arange(n)[p] * step for p in parts]
        assert all(t.size for t in times)
        for early, late in zip(times, times[1:]):
            assert late.min() >= early.max() + horizon - 1e-9  # no spike is a target of both
            assert late.min() < early.max() + horizon + step  # and no more is left out than that
    assert correction_folds(n, 0) == ((slice(0, 371), slice(371, 450), slice(450, 530)),
                                      (slice(159, 530), slice(80, 159), slice(0, 80)))
    assert correction_folds(20, gap) == correction_folds(20, 0)  # 3 choosing times: too few to leave 9 out


def test_a_correction_chooses_its_penalties_on_purged_parts(monkeypatch):
    """A correction fitted with a gap fits and scores its penalty path on the purged parts (correction_folds),
    not next to the times it was fitted on."""
    rng = np.random.default_rng(2)
    U, P = 4, 200
    base = np.full((P, U, NB), math.log(5.0 * BS))
    seen = np.full((P, U, len(HISTORY_TAUS)), 5.0) * np.exp(0.1 * rng.normal(size=(P, U, 1)))
    counts = rng.poisson(np.exp(base))
    rows = []
    real_path = PopulationGLM._l2_path

    def path(X, y, e, o, fit_rows, held, tol=1e-9):
        rows.append(((fit_rows.start, fit_rows.stop), (held.start, held.stop)))
        return real_path(X, y, e, o, fit_rows, held, tol)

    monkeypatch.setattr(PopulationGLM, "_l2_path", staticmethod(path))
    PopulationGLM(n_bins=NB, bin_size=BS).fit(seen, counts, offset=base, gap=9)
    folds = correction_folds(P, 9)
    assert set(rows) == {((fit.start, fit.stop), (choose.start, choose.stop)) for fit, choose, _ in folds}
    assert folds[0][1].start == folds[0][0].stop + 9 and folds[1][1].stop == folds[1][0].start - 9


def test_shrunk_gains_judge_a_unit_by_the_others_only_as_far_as_they_agree():
    """Units that share one true gain: a unit whose noisy held-out blocks lose is pulled to the common gain.
    Units whose true gains differ far beyond the noise keep their own. Too few units or blocks: unchanged."""
    rng = np.random.default_rng(3)
    U, K = 40, 16
    same = 0.5 + rng.normal(0.0, 2.0, (U, K))  # every unit gains 8 nats in all, each block noisy
    raw, shrunk = same.sum(1), shrunk_gains(same)
    assert (raw < 0).sum() >= 3 and np.all(shrunk > 0)  # noise made some lose; shrunk, none does
    assert shrunk.std() < 0.5 * raw.std()
    apart = np.where(np.arange(U)[:, None] % 2 == 0, 10.0, -10.0) + rng.normal(0.0, 0.5, (U, K))  # +-160 nats
    out = shrunk_gains(apart)
    assert np.all(np.sign(out) == np.sign(apart.sum(1)))
    np.testing.assert_allclose(out, apart.sum(1), rtol=0.02)
    np.testing.assert_array_equal(shrunk_gains(same[:2]), same[:2].sum(1))
    np.testing.assert_array_equal(shrunk_gains(same[:, :1]), same[:, 0])


def test_population_glm_recent_refits_on_the_last_two_minutes():
    rec = _rec(5, n_units=4, end=400.0)
    t, u = rec.times, rec.units
    read = lambda a, b: (t[np.searchsorted(t, a) : np.searchsorted(t, b)], u[np.searchsorted(t, a) : np.searchsorted(t, b)])
    bset = B.BaselineSet(("population_glm", "population_glm_recent"), read=read, n_units=4, n_bins=NB, bin_size=BS,
                         ref_rate_hz=rec.ref_rate_hz, start=0.0, reference=(0.0, 40.0))
    t_now = np.arange(41.0, 398.0, 1.0)
    out = {"population_glm": [], "population_glm_recent": []}
    fits = []
    for a in range(0, t_now.size, 50):
        bt, bu = read(max(0.0, t_now[a] - 60), t_now[min(a + 50, t_now.size) - 1] + 1.0)
        for n, v in bset.predict(t_now[a : a + 50], bt, bu, t0=max(0.0, t_now[a] - 60)).items():
            out[n].append(v)
        fits.append(bset._recent[0])
    recent = np.concatenate(out["population_glm_recent"])
    assert recent.shape == (t_now.size, 4, NB) and np.all(np.isfinite(recent)) and np.all(recent > 0)
    assert not np.allclose(recent, np.concatenate(out["population_glm"]))  # refitted, not the reference fit
    assert fits[-1] >= t_now[-1] - 30.0  # refitted within the last 30 s


# ------------------------------------------------------------------------------------ intervals


def test_paired_interval_covers_a_known_difference():
    rng = np.random.default_rng(0)
    W, U, T = 400, 8, 10
    lam = rng.gamma(2.0, 0.1, size=(W, U, T))
    counts = rng.poisson(lam).astype(float)
    good = window_nll(lam, counts)  # the true rates
    bad = window_nll(lam * 1.6, counts)  # 60% too high everywhere
    spikes = counts.sum(axis=(1, 2))
    truth = (bad.sum() - good.sum()) / spikes.sum() / math.log(2)
    p = paired_bps_interval(good, bad, spikes)
    assert p["diff"] == pytest.approx(truth)
    assert p["lo"] < truth < p["hi"] and p["lo"] > 0
    # the same predictor against itself: exactly 0, and the interval holds 0
    same = paired_bps_interval(good, good, spikes)
    assert same["diff"] == 0.0 and same["lo"] <= 0.0 <= same["hi"]
    # two predictors equally good on average (noise only): the interval holds 0 in most draws
    held = 0
    for seed in range(40):
        r2 = np.random.default_rng(100 + seed)
        a = r2.normal(0.0, 1.0, W) + 100.0
        b = r2.normal(0.0, 1.0, W) + 100.0
        q = paired_bps_interval(a, b, np.full(W, 50.0), seed=seed, n_boot=400)
        held += q["lo"] <= 0.0 <= q["hi"]
    assert held >= 34  # nominal 95% of 40; a broken interval would miss far more often
    # fixed seed: reproducible
    assert paired_bps_interval(good, bad, spikes) == p
    # a list of recordings: the mean of their differences
    two = paired_bps_interval([good, good], [bad, good], [spikes, spikes])
    assert two["diff"] == pytest.approx(truth / 2)


@pytest.mark.real_data
def test_real_recording_ladder_is_finite_and_the_ema_tracks_drift():
    path = REAL / "rat_ca1_linear_track" / "spikes_flat.npz"
    if not path.exists():
        pytest.skip(f"real data not available at {path}")
    z = np.load(path)
    t = z["spike_times"] - z["spike_times"].min()  # its clock starts at 4397 s
    ids, u = np.unique(z["unit_ids"], return_inverse=True)
    u = u.astype(np.int64)
    sel = t < DEFAULT_REFERENCE_S
    ref = reference_rate_hz(t[sel], u[sel], n_units=ids.size, start=0.0, end=DEFAULT_REFERENCE_S)
    bps = evaluate_windows(t, u, ids.size, ref, np.arange(61.0, 1900.0, 5.0))
    assert all(np.isfinite(v) for v in bps.values())
    # this recording's first minute (linear track) is unlike the rest (rest): forecasters that
    # track recent rates beat the stale reference rate by far
    assert bps["ema_tau30"] > bps["reference_rate"] + 0.5
    assert bps["ema_tau30"] > 0.0

"""The Predictor's unit ids (type and order), its limits, cancellation of a registration and per-owner quotas."""

from __future__ import annotations

import time
import tracemalloc

import numpy as np
import pytest
import torch

from nh_serve.core.config import get_config
from nh_serve.core.model import NeuroHorizon
from nh_serve.data.features import FeatureNorm
from nh_serve.errors import InputError
from nh_serve.inference.limits import Cancelled, LimitExceeded, Limits
from nh_serve.inference.model_io import save_model
from nh_serve.inference.predictor import Predictor
from nh_serve.inference.sessions import RegisteredSession, SessionCache
from nh_serve.prediction import IndexedIds, unit_id_array


@pytest.fixture(scope="module")
def ckpt_path(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ck") / "tiny.safetensors"
    m = NeuroHorizon(get_config("nh-tiny"))
    save_model(path, m, feature_norm=FeatureNorm.identity(m.cfg.n_features))
    return path


@pytest.fixture(scope="module")
def predictor(ckpt_path):
    return Predictor.load(ckpt_path, backend="torch")


def integer_id_recording(n_units: int = 21, seed: int = 11):
    """Units 0..n-1 whose rates differ (unit i fires at 2 + 3 i Hz), 70 s: reference [0, 60), context after."""
    rng = np.random.default_rng(seed)
    trains = [np.sort(rng.uniform(0, 70, rng.poisson((2 + 3 * i) * 70))) for i in range(n_units)]
    t = np.concatenate(trains)
    u = np.concatenate([np.full(x.size, i, dtype=np.int64) for i, x in enumerate(trains)])
    o = np.argsort(t, kind="stable")
    return t[o], u[o]


def rows_by_id(pred) -> dict:
    return {uid: pred.rates_hz[i] for i, uid in enumerate(pred.unit_ids.tolist())}


def test_integer_ids_stay_integers_in_numeric_order_and_rows_are_their_units(predictor):
    """Row i is unit i: checked against string ids whose text order is the numeric one ('u00' < 'u01' ...)."""
    t, u = integer_id_recording()
    ref, ctx = t < 60, (t >= 62) & (t < 63)
    ints = predictor.predict(
        predictor.register(t[ref], u[ref], reference_window=(0, 60)), t[ctx], u[ctx], context_start=62.0
    )
    assert ints.unit_ids.dtype == np.int64 and ints.unit_ids.tolist() == list(range(21))
    names = np.array([f"u{i:02d}" for i in range(21)])
    strs = predictor.predict(
        predictor.register(t[ref], names[u[ref]], reference_window=(0, 60)),
        t[ctx], names[u[ctx]], context_start=62.0,
    )
    assert strs.unit_ids.tolist() == names.tolist()
    # Rows are distinct units (so a misaligned row could not match by chance) and line up with the names.
    assert len({tuple(np.round(r, 4)) for r in strs.rates_hz}) == 21
    np.testing.assert_allclose(ints.rates_hz, strs.rates_hz, rtol=1e-5, atol=1e-6)
    # Text order would have put unit 10 in row 2: it does not.
    assert ints.unit_ids[2] == 2 and not np.allclose(ints.rates_hz[2], strs.rates_hz[10])
    # The compact form gives the same answer.
    table, index = np.unique(u, return_inverse=True)
    tok = predictor.register(t[ref], IndexedIds(table, index[ref]), reference_window=(0, 60))
    same = predictor.predict(tok, t[ctx], IndexedIds(table, index[ctx]), context_start=62.0)
    np.testing.assert_array_equal(same.unit_ids, ints.unit_ids)
    np.testing.assert_allclose(same.rates_hz, ints.rates_hz, rtol=1e-6, atol=1e-7)


def test_units_give_the_order_and_rows_follow_the_ids(predictor):
    t, u = integer_id_recording()
    ref, ctx = t < 60, (t >= 62) & (t < 63)
    order = np.random.default_rng(0).permutation(21)
    a = predictor.predict(predictor.register(t[ref], u[ref], reference_window=(0, 60)), t[ctx], u[ctx], context_start=62.0)
    b = predictor.predict(
        predictor.register(t[ref], u[ref], reference_window=(0, 60), units=order), t[ctx], u[ctx], context_start=62.0
    )
    assert b.unit_ids.tolist() == order.tolist()
    ra, rb = rows_by_id(a), rows_by_id(b)
    for uid in range(21):
        np.testing.assert_allclose(rb[uid], ra[uid], rtol=1e-5, atol=1e-6)


def test_ids_of_the_other_kind_are_matched_by_their_text(predictor):
    t, u = integer_id_recording()
    ref, ctx = t < 60, (t >= 62) & (t < 63)
    tok = predictor.register(t[ref], u[ref], reference_window=(0, 60))
    a = predictor.predict(tok, t[ctx], u[ctx], context_start=62.0)
    b = predictor.predict(tok, t[ctx], u[ctx].astype(str), context_start=62.0)  # "7" finds unit 7
    np.testing.assert_array_equal(a.rates_hz, b.rates_hz)
    with pytest.raises(InputError, match=r"context unit_ids: 1 spike\(s\) belong to 1 unit id\(s\).*007"):
        predictor.predict(tok, t[ctx][:1], np.array(["007"]), context_start=62.0)
    stok = predictor.register(t[ref], u[ref].astype(str), reference_window=(0, 60))
    c = predictor.predict(stok, t[ctx], u[ctx], context_start=62.0)  # integers for a string session
    assert c.unit_ids.dtype.kind == "U" and c.unit_ids.tolist() == sorted(map(str, range(21)))


def test_unit_id_array_types():
    assert unit_id_array([3, 1], name="x").dtype == np.int64
    assert unit_id_array(["a", 1], name="x").tolist() == ["a", "1"]  # a mix is strings
    for bad in ([1.5, 2.0], [True, False], np.array([1.0])):
        with pytest.raises(InputError, match="integers or strings"):
            unit_id_array(bad, name="x")
    with pytest.raises(InputError, match="200 characters is longer than the limit of 128"):
        unit_id_array(["a" * 200, "b"], name="x", max_chars=128)


# ----------------------------------------------------------------------------- limits


@pytest.fixture(scope="module")
def limited(ckpt_path):
    lim = Limits(max_units=30, max_spikes=50_000, max_reference_s=120.0, max_windows=4, max_adapt_steps=5,
                 max_adapt_unit_windows=2000, max_unit_id_chars=16)
    return Predictor.load(ckpt_path, backend="torch", limits=lim)


def test_limits_refuse_work_before_doing_it(limited):
    t, u = integer_id_recording()
    ref = t < 60
    p = limited
    with pytest.raises(InputError, match=r"reference_window: .*1e\+07 s long, more than the limit of 120 s"):
        p.register(t[ref], u[ref], reference_window=(0, 1e7))
    for end in (1e300, 1e12):
        with pytest.raises(InputError, match="max_time_s|max_reference_s"):
            p.register(t[ref], u[ref], reference_window=(0, end))
    with pytest.raises(LimitExceeded, match="units: 31 units is more than the limit of 30"):
        p.register(t[ref], u[ref], reference_window=(0, 60), units=np.arange(31))
    with pytest.raises(LimitExceeded, match="max_spikes"):
        p.register(np.linspace(0, 59, 50_001), np.zeros(50_001, int), reference_window=(0, 60))
    with pytest.raises(InputError, match="longer than the limit of 16"):
        p.register(t[ref], np.array(["x" * 17, "a"])[u[ref] % 2], reference_window=(0, 60))
    with pytest.raises(InputError, match="adapt_steps: 6 is more than"):
        p.register(t[ref], u[ref], reference_window=(0, 60), adapt_steps=6)
    with pytest.raises(InputError, match=r"unit-windows\) is more than the limit of 2000.*at most 49 s"):
        p.register(t[ref], u[ref], reference_window=(0, 60), adapt_steps=1)  # 117 windows x 21 units
    tok = p.register(t[ref], u[ref], reference_window=(0, 60))
    ctx = (t >= 62) & (t < 63)
    for bad in (float("nan"), float("inf"), 1e300, -1.0, True):
        with pytest.raises(InputError, match="horizon_s"):
            p.predict(tok, t[ctx], u[ctx], context_start=62.0, horizon_s=bad)
    with pytest.raises(InputError, match="ctx_start"):
        p.predict(tok, [], [], context_start=1e300)
    w = dict(spike_times=t[ctx], unit_ids=u[ctx], context_start=62.0)
    with pytest.raises(LimitExceeded, match="windows: 5 windows is more than the limit of 4"):
        p.predict_batch(tok, [w] * 5)
    assert len(p.predict_batch(tok, [w] * 4)) == 4


def test_dense_units_and_crowded_contexts_are_refused(ckpt_path):
    p = Predictor.load(ckpt_path, backend="torch", limits=Limits(max_close_pairs=1_000_000, max_context_spikes=500))
    rng = np.random.default_rng(0)
    t = np.sort(rng.uniform(0, 60, 300_000))  # 2 units at 2.5 kHz: ~7.5e7 pairs within 100 ms
    with pytest.raises(LimitExceeded, match=r"reference spikes: \d+ pairs .*\(max_close_pairs\)"):
        p.register(t, np.arange(t.size) % 2, reference_window=(0, 60))
    tr, ur = integer_id_recording()
    tok = p.register(tr[tr < 60], ur[tr < 60], reference_window=(0, 60))  # ~0.3 pairs a spike: fine
    ct = np.sort(rng.uniform(62, 63, 501))
    with pytest.raises(LimitExceeded, match="context spikes: 501 spikes is more than the limit of 500"):
        p.predict(tok, ct, np.zeros(501, int), context_start=62.0)
    assert p.predict(tok, ct[:500], np.zeros(500, int), context_start=62.0).rates_hz.shape == (21, 50)


def test_library_predictor_has_no_size_limits_but_checks_values(predictor):
    t, u = integer_id_recording()
    ref = t < 60
    tok = predictor.register(t[ref], u[ref], reference_window=(0, 1000.0))  # a long window is cheap now
    assert predictor.session(tok).reference == (0.0, 1000.0)
    with pytest.raises(InputError, match="horizon_s"):
        predictor.predict(tok, [], [], context_start=62.0, horizon_s=float("nan"))


def test_absurd_reference_window_is_cheap_without_limits(predictor):
    """6,015 spikes and a 1e7 s window used to take 14.9 GiB; now a few MB (1e300 used to overflow)."""
    rng = np.random.default_rng(1)
    t = np.sort(rng.uniform(0, 60, 6015))
    u = rng.integers(0, 20, 6015)
    tracemalloc.start()
    for end in (1e7, 1e8, 1e12, 1e300):
        predictor.register(t, u, reference_window=(0.0, end))
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 50 * 2**20, peak


# ----------------------------------------------------------------------------- time budget and cancellation


def test_adaptation_budget_covers_the_whole_registration(ckpt_path):
    p = Predictor.load(ckpt_path, backend="torch")
    t, u = integer_id_recording()
    ref = t < 60
    t0 = time.monotonic()
    tok = p.register(t[ref], u[ref], reference_window=(0, 60), adapt_steps=10_000, adapt_time_budget_s=0.0)
    took = time.monotonic() - t0
    assert p.session(tok).adaptation["steps"] == 0  # the budget was spent before the first step
    assert took < 10.0


def test_should_stop_cancels_a_registration_and_keeps_nothing(ckpt_path):
    p = Predictor.load(ckpt_path, backend="torch")
    t, u = integer_id_recording()
    ref = t < 60
    calls = []

    def stop_after(n):
        def should_stop():
            calls.append(1)
            return len(calls) > n

        return should_stop

    for n in (0, 1, 2, 5):  # before features, after them, after embeddings, between adaptation steps
        calls.clear()
        with pytest.raises(Cancelled):
            p.register(t[ref], u[ref], reference_window=(0, 60), adapt_steps=50, adapt_time_budget_s=60.0,
                       should_stop=stop_after(n))
    assert len(p.sessions) == 0
    assert all(q.requires_grad for q in p.model.parameters())  # adaptation restored the weights' flags
    tok = p.register(t[ref], u[ref], reference_window=(0, 60), should_stop=lambda: False)
    assert len(p.sessions) == 1 and p.session(tok).n_units == 21


# ----------------------------------------------------------------------------- per-owner quotas


def _session(token, owner=None):
    return RegisteredSession(token=token, unit_ids=np.array(["a"]), reference=(0.0, 10.0),
                             features=np.zeros((1, 33), np.float32), ref_rate_hz=np.zeros(1, np.float32),
                             embeddings=torch.zeros(1, 4), owner=owner)


def test_one_owner_cannot_evict_everyone():
    c = SessionCache(max_sessions=8, ttl_s=60, max_per_owner=3)
    for i in range(4):
        c.put(_session(f"quiet{i}", owner=f"q{i}"))
    for i in range(50):
        c.put(_session(f"busy{i}", owner="busy"))
    kept = set(c._items)
    assert {f"quiet{i}" for i in range(4)} <= kept  # the busy owner only pushed out its own sessions
    assert {k for k in kept if k.startswith("busy")} == {"busy47", "busy48", "busy49"}
    assert len(c) == 7 and c.evictions == 47
    with pytest.raises(ValueError, match="max_per_owner"):
        SessionCache(max_per_owner=0)

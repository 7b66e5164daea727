"""The window pipeline (nh_serve.data.windows): every path gives the model the same inputs.

One multimodal recording goes through the Predictor (windows a caller builds by
hand), ``nh-serve eval`` (nh_serve.evaluation.quality), ``nh-serve score`` and
the training data path (training.data.window_item); the tensors each path hands
to the model must be equal, window by window.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from nh_serve.core.config import get_config
from nh_serve.core.model import NeuroHorizon
from nh_serve.data.features import FeatureNorm
from nh_serve.data.history import ema_rates
from nh_serve.data.session import write_session
from nh_serve.data.spikes import bin_counts
from nh_serve.data.synth import make_session
from nh_serve.data.windows import (
    BEHAVIOR_KEYS,
    IMAGE_KEYS,
    SPIKE_KEYS,
    UNIT_KEYS,
    WINDOW_INPUTS,
    Window,
    collate,
    cut_window,
    cut_windows,
    history_counts,
    target_counts,
)
from nh_serve.evaluation.quality import evaluate_recording
from nh_serve.evaluation.score import ScoreSettings, score_recording
from nh_serve.evaluation.sliding import plan_windows
from nh_serve.inference.model_io import save_model
from nh_serve.inference.predictor import Predictor
from training.data import apply_norm, load_session, window_item

REFERENCE_S = 25.0  # what eval's automatic reference gives a 100 s recording
STRIDE_S = 6.0


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("windows")
    d = make_session(seed=21, n_units=12, duration=100.0, multimodal=True)
    path = write_session(
        root / "rec.h5",
        **{k: d[k] for k in ("spike_times", "unit_index", "unit_ids", "start", "end", "behavior", "image_embeddings")},
    )
    cfg = get_config("nh-tiny", behavior_dim=2, image_dim=32)
    torch.manual_seed(0)
    rng = np.random.default_rng(3)
    norm = FeatureNorm(mean=rng.normal(size=cfg.n_features), std=rng.uniform(0.5, 2.0, cfg.n_features))
    ckpt = save_model(root / "mm.safetensors", NeuroHorizon(cfg), feature_norm=norm).path
    return {"path": path, "ckpt": ckpt, "cfg": cfg, "norm": norm, "rec": d}


class Spy:
    """Stands in for a Predictor's backend and keeps every batch it is asked to run."""

    def __init__(self, inner):
        self.inner = inner
        self.calls: list[tuple[dict, torch.Tensor]] = []

    def __call__(self, batch, unit_embeddings):
        self.calls.append(({k: v.clone() for k, v in batch.items()}, unit_embeddings.clone()))
        return self.inner(batch, unit_embeddings)

    def __getattr__(self, name):
        return getattr(self.inner, name)


def _spied(setup) -> Predictor:
    p = Predictor.load(setup["ckpt"], backend="torch")
    p._backend = Spy(p._backend)
    return p


def _unpad(batch: dict) -> list[dict]:
    """A collated batch -> one dict per window, padding removed (every window has the same units)."""
    out = []
    for b in range(batch["spike_mask"].shape[0]):
        w = {k: batch[k][b] for k in UNIT_KEYS if k in batch}
        for keys in (SPIKE_KEYS, BEHAVIOR_KEYS, IMAGE_KEYS):
            if keys[0] in batch:
                n = int(batch[keys[-1]][b].sum())
                w.update({k: batch[k][b, :n] for k in keys})
        out.append(w)
    return out


def _windows_seen(p: Predictor) -> tuple[list[dict], list[torch.Tensor]]:
    items, emb = [], []
    for batch, e in p._backend.calls:
        items += _unpad(batch)
        emb += list(e)
    return items, emb


def _assert_same(a: list[dict], b: list[dict], what: str) -> None:
    assert len(a) == len(b), what
    for i, (x, y) in enumerate(zip(a, b)):
        assert sorted(x) == sorted(y), (what, i)
        for k in x:
            assert x[k].dtype == y[k].dtype, f"{what}: window {i}, input {k}"
            if k in ("history_rates", "history_rate_hz"):  # float64 sums in another order (blocks, anchors)
                torch.testing.assert_close(x[k], y[k], rtol=1e-6, atol=1e-9, msg=f"{what}: window {i}, input {k}")
            else:
                assert torch.equal(x[k], y[k]), f"{what}: window {i}, input {k}"


def test_predictor_eval_score_and_training_give_the_model_the_same_inputs(setup):
    cfg, rec = setup["cfg"], setup["rec"]
    t, u = rec["spike_times"], rec["unit_index"]
    ids = np.asarray(rec["unit_ids"]).astype(str)
    plan = plan_windows(
        start=rec["start"], end=rec["end"], reference_s=REFERENCE_S, stride_s=STRIDE_S, name="rec"
    )
    r0, r1 = plan.reference
    assert len(plan) >= 10

    # Predictor: a caller builds each window by hand from the recording.
    p = _spied(setup)
    m = (t >= r0) & (t < r1)
    token = p.register(t[m], ids[u[m]], reference_window=(r0, r1), units=ids)
    bt, bv = rec["behavior"]
    it, iv = rec["image_embeddings"]
    windows = []
    ref_rate = np.bincount(u[m], minlength=ids.size) / (r1 - r0)
    for c in plan.ctx_starts:
        ctx = (t >= c) & (t < c + cfg.context_s)
        # each unit's smoothed rates at the context end, from the recording start (nh_serve.data.history)
        hist = ema_rates(t, u, n_units=ids.size, t_eval=[c + cfg.context_s], start=rec["start"],
                         ref_rate_hz=ref_rate, taus=cfg.history_taus)[0]
        b = (bt >= c) & (bt < c + cfg.context_s)
        i = (it >= c) & (it < c + cfg.context_s + cfg.horizon_s)
        windows.append(
            dict(
                spike_times=t[ctx],
                unit_ids=ids[u[ctx]],
                context_start=float(c),
                history_rates=hist,
                behavior=(bt[b], bv[b]),
                images=(it[i], iv[i]),
                image_schedule_s=cfg.horizon_s,
            )
        )
    p.predict_batch(token, windows, batch_size=4)
    by_hand, emb = _windows_seen(p)
    assert len(by_hand) == len(plan)
    assert all(x["image_values"].shape[0] >= 1 for x in by_hand)  # at least the schedule marker
    assert any(x["behavior_values"].shape[0] > 0 for x in by_hand)

    # nh-serve eval (it scores multimodal models with the recording's behaviour and stimulus schedule).
    pe = _spied(setup)
    res = evaluate_recording(setup["path"], predictors={"model": pe}, stride_s=STRIDE_S, progress=False)
    assert res["windows"] == len(plan) and "model" in res["scores"]
    got, emb_e = _windows_seen(pe)
    assert len(got) == 2 * len(plan)  # the model with its reference fit, then zero-shot: the same inputs
    _assert_same(got[: len(plan)], by_hand, "eval")
    _assert_same(got[len(plan) :], by_hand, "eval, zero-shot")
    emb_e = emb_e[: len(plan)]

    # nh-serve score.
    ps = _spied(setup)
    settings = ScoreSettings(reference_s=REFERENCE_S, stride_s=STRIDE_S, batch_size=5, backend="torch", plots=False)
    out = score_recording(setup["path"], predictor=ps, settings=settings, progress=False)
    assert out.record["model_inputs"]["behavior"] == "used" and out.record["model_inputs"]["images"] == "used"
    got, emb_s = _windows_seen(ps)
    _assert_same(got, by_hand, "score")
    for e in (emb_e, emb_s):
        assert all(torch.equal(x, y) for x, y in zip(e, emb))

    # Training (its unit features are the normalised reference features; the Predictor embeds the same).
    s = load_session(setup["path"], cfg=cfg, reference_s=REFERENCE_S, val_time_fraction=0.0)
    assert s.reference == (r0, r1)
    apply_norm([s], setup["norm"])
    items = [window_item(s, float(c), cfg)[0] for c in plan.ctx_starts]
    feats = torch.from_numpy(setup["norm"].apply(p.session(token).features))
    for x in items:
        assert torch.equal(x.pop("unit_features"), feats)
    _assert_same(_unpad(collate(items)), by_hand, "training")


def test_cut_windows_history_rules_and_targets(setup):
    cfg, rec = setup["cfg"], setup["rec"]
    t, u, n = rec["spike_times"], rec["unit_index"], len(rec["unit_ids"])
    starts = [0.0, 10.0, 40.0]
    w = cut_windows(t, u, starts, n_units=n, cfg=cfg, history_start=0.0)
    assert w[0].history_counts is None and w[0].history_duration_s is None  # no history before the start
    assert w[1].history_duration_s == 10.0 and w[2].history_duration_s == cfg.history_s
    counts, dur = history_counts(t, u, n_units=n, ctx_start=40.0, history_s=cfg.history_s, start=0.0)
    np.testing.assert_array_equal(w[2].history_counts, counts)
    assert dur == cfg.history_s
    # full_history: only windows with a whole history_s before them (test-time adaptation)
    full = cut_windows(t, u, starts, n_units=n, cfg=cfg, history_start=0.0, full_history=True)
    assert [x.history_counts is not None for x in full] == [False, False, True]
    # the context and the targets
    one = cut_window(t, u, 40.0, n_units=n, cfg=cfg, history_start=0.0)
    np.testing.assert_array_equal(one.spike_times, t[(t >= 40.0) & (t < 41.0)])
    y = target_counts(t, u, [41.0, 41.5], n_units=n, bin_size=cfg.bin_size_s, n_bins=cfg.n_bins)
    for k, t_now in enumerate((41.0, 41.5)):
        h = (t >= t_now) & (t < t_now + 1.0)
        want = bin_counts(t[h], u[h], n_units=n, start=t_now, bin_size=cfg.bin_size_s, n_bins=cfg.n_bins)
        np.testing.assert_array_equal(y[k], want)
    assert set(WINDOW_INPUTS) == {
        "history_counts", "history_duration_s", "behavior", "images", "image_schedule_s", "history_rates"
    }
    # history models: each unit's smoothed rates at every context end, from the history start
    ref = np.full(n, 4.0)
    hr = cut_windows(t, u, starts, n_units=n, cfg=cfg, history_start=0.0, ref_rate_hz=ref)
    want = ema_rates(t, u, n_units=n, t_eval=np.array(starts) + 1.0, start=0.0, ref_rate_hz=ref, taus=cfg.history_taus)
    for k, x in enumerate(hr):
        np.testing.assert_allclose(x.history_rates, want[k], rtol=1e-12)
        assert x.history_counts is None
    assert isinstance(one, Window)


def test_target_counts_in_chunks_equal_one_pass(monkeypatch):
    """target_counts works a few windows at a time; chunks of any size give the same counts, spikes on
    bin edges included."""
    import nh_serve.data.windows as windows

    rng = np.random.default_rng(5)
    t = np.sort(np.concatenate([rng.uniform(0, 30, 4000), np.round(rng.uniform(0, 30, 500), 2)]))  # some on edges
    u = rng.integers(0, 11, t.size)
    t_now = 1.0 + 0.1 * np.arange(200)
    monkeypatch.setattr(windows, "_TARGET_CHUNK_BINS", 1 << 30)
    whole = target_counts(t, u, t_now, n_units=11, bin_size=0.02, n_bins=50)
    assert whole.dtype == np.float32 and whole.shape == (200, 11, 50)
    for chunk in (1, 11 * 50 * 3 + 7, 11 * 50 * 200):
        monkeypatch.setattr(windows, "_TARGET_CHUNK_BINS", chunk)
        np.testing.assert_array_equal(target_counts(t, u, t_now, n_units=11, bin_size=0.02, n_bins=50), whole)
    k = 17  # and by hand
    h = (t >= t_now[k]) & (t < t_now[k] + 1.0)
    want = np.zeros((11, 50))
    np.add.at(want, (u[h], np.floor((t[h] - t_now[k]) / 0.02).astype(int)), 1)
    np.testing.assert_array_equal(whole[k], want)

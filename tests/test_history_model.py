"""History models (the shipped architecture): the per-unit forecaster, the population read-out,
the population tokens and their ablation switches (nh-tiny, CPU)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from nh_serve.core.config import get_config
from nh_serve.core.glm import band_index
from nh_serve.core.model import NeuroHorizon
from nh_serve.core.univariate_glm import UnivariateGLM
from nh_serve.data.history import HISTORY_TAUS, ema_rates, log_history
from nh_serve.data.windows import collate, tokenize

CTX = 10.0


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


def window(rng, n_units: int, *, rate_hz: float = 8.0, cfg=None) -> dict:
    cfg = cfg or get_config("nh-tiny")
    counts = rng.poisson(rng.uniform(0.5, 2.0, n_units) * rate_hz)
    unit = np.repeat(np.arange(n_units), counts)
    t = CTX + rng.uniform(0, 1.0, unit.size)
    o = np.argsort(t, kind="stable")
    return {
        "unit_features": rng.normal(size=(n_units, cfg.n_features)).astype(np.float32),
        "spike_times": t[o],
        "spike_unit_index": unit[o],
        "ctx_start": CTX,
        "ref_rate_hz": rng.uniform(1, 10, n_units),
        "history_rates": rng.gamma(2.0, 3.0, size=(n_units, len(cfg.history_taus))),
    }


def model(seed: int = 0, **overrides) -> NeuroHorizon:
    torch.manual_seed(seed)
    m = NeuroHorizon(get_config("nh-tiny", **overrides)).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # every path matters
        for p in m.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.1)
    return m


def batch_of(m, items):
    return collate([tokenize(m.cfg, **w) for w in items])


def test_history_features_are_the_univariate_glm_features():
    m = model()
    r = torch.rand(2, 3, len(HISTORY_TAUS)) * 20
    rel, slow = m.history_features(r)
    want_rel, want_slow = log_history(r.double().numpy())
    np.testing.assert_allclose(rel.numpy(), want_rel, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(slow.numpy(), want_slow, rtol=1e-5, atol=1e-6)


def test_started_from_a_glm_the_model_is_that_glm():
    """With the head's output, the zero-shot read-out and no fitted read-out silenced, the model's
    log rate is the univariate GLM it was started from: the GLM is a special case of the model."""
    rng = np.random.default_rng(0)
    m = model()
    glm = UnivariateGLM(weights=rng.normal(0, 0.2, size=(6, len(HISTORY_TAUS))))
    m.init_univariate(glm.weights, band_index(m.cfg.n_bins, m.cfg.bin_size_s))
    with torch.no_grad():
        m.head.out.weight.zero_()
        m.head.out.bias.zero_()
        m.readout.zero_shot.weight.zero_()
    items = [window(rng, 5), window(rng, 3)]
    b = batch_of(m, items)
    with torch.no_grad():
        got = torch.exp(m(**b)) * m.cfg.bin_size_s  # (B, U, T) expected counts
    for i, w in enumerate(items):
        want = glm.predict(w["history_rates"][None], n_bins=m.cfg.n_bins, bin_size=m.cfg.bin_size_s)[0]
        n = w["history_rates"].shape[0]
        np.testing.assert_allclose(got[i, :n].numpy(), want, rtol=1e-4)


def test_the_read_out_enters_through_its_design_and_head_units_pick_rows():
    rng = np.random.default_rng(1)
    m = model()
    b = batch_of(m, [window(rng, 6), window(rng, 4)])
    feats = b.pop("unit_features")
    emb = m.embed_units(feats)
    readout = torch.randn(2, 6, m.cfg.readout_dim + 1)
    with torch.no_grad():
        eta, design, _ = m.log_rate_parts(emb, **b)
        full = m.forward_with_embeddings(emb, **b, unit_readout=readout)
        by_hand = m.finish_log_rate(eta + readout @ design.transpose(1, 2), b["unit_mask"])
        torch.testing.assert_close(full, by_hand)
        rows = torch.tensor([[5, 0, 2], [1, 3, 0]])
        sub, _, _ = m.log_rate_parts(emb, **b, head_units=rows)
        torch.testing.assert_close(sub, eta.gather(1, rows.unsqueeze(-1).expand(-1, -1, eta.shape[2])))


def test_population_inputs_matter_and_units_are_equivariant():
    rng = np.random.default_rng(2)
    m = model()
    w = window(rng, 7)
    b = batch_of(m, [w])
    with torch.no_grad():
        base = m(**b)
        # the last second bin by bin (population tokens) changes every unit's forecast
        b2 = dict(b)
        b2["unit_bins"] = b["unit_bins"].flip(-1)
        assert not torch.allclose(m(**b2), base)
        # another unit's history changes this unit's forecast (the population path)
        b3 = dict(b)
        b3["history_rates"] = b["history_rates"].clone()
        b3["history_rates"][0, 6] *= 5.0
        assert not torch.allclose(m(**b3)[0, 0], base[0, 0])
    # permuting the units permutes the rows
    perm = rng.permutation(7)
    inv = np.argsort(perm)
    wp = dict(w)
    wp["unit_features"] = w["unit_features"][perm]
    wp["ref_rate_hz"] = w["ref_rate_hz"][perm]
    wp["history_rates"] = w["history_rates"][perm]
    wp["spike_unit_index"] = inv[w["spike_unit_index"]]
    with torch.no_grad():
        torch.testing.assert_close(m(**batch_of(m, [wp]))[0], base[0][torch.from_numpy(perm)], rtol=1e-4, atol=1e-5)


def test_ablation_switches():
    rng = np.random.default_rng(3)
    no_uni = model(uni_path=False)
    assert no_uni.univariate is None
    no_pop = model(pop_path=False)
    assert no_pop.readout is None and no_pop.pop_tok is None
    w = window(rng, 5, cfg=no_pop.cfg)
    b = batch_of(no_pop, [w])
    b2 = dict(b)
    b2["history_rates"] = b["history_rates"].clone()
    b2["history_rates"][0, 4] *= 5.0
    with torch.no_grad():  # without the population path a unit ignores every other unit
        torch.testing.assert_close(no_pop(**b2)[0, :4], no_pop(**b)[0, :4])
    short = get_config("nh-tiny", history_taus=(0.25, 1.0, 30.0))
    assert short.n_activity == len(short.activity_scales) + 1 + 3
    with pytest.raises(ValueError, match="30"):
        get_config("nh-tiny", history_taus=(0.25, 1.0))
    with pytest.raises(ValueError, match="history_taus"):
        get_config("nh-tiny", history_taus=(), readout_dim=4)


def test_torchscript_matches_eager_with_every_input():
    rng = np.random.default_rng(4)
    m = model()
    b = batch_of(m, [window(rng, 4), window(rng, 6)])
    b["unit_readout"] = torch.randn(2, 6, m.cfg.readout_dim + 1)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sm = torch.jit.script(m)
    with torch.no_grad():
        torch.testing.assert_close(sm(**b), m(**b))


def test_smoothed_rates_are_what_tokenize_passes():
    rng = np.random.default_rng(5)
    t = np.sort(rng.uniform(0, 20, 300))
    u = rng.integers(0, 4, 300)
    ref = np.full(4, 5.0)
    r = ema_rates(t, u, n_units=4, t_eval=[CTX + 1.0], start=0.0, ref_rate_hz=ref, taus=HISTORY_TAUS)[0]
    m = model()
    ctx = (t >= CTX) & (t < CTX + 1.0)
    item = tokenize(m.cfg, unit_features=np.zeros((4, m.cfg.n_features), np.float32), spike_times=t[ctx],
                    spike_unit_index=u[ctx], ctx_start=CTX, ref_rate_hz=ref, history_rates=r)
    np.testing.assert_allclose(item["history_rates"].numpy(), r, rtol=1e-6)
    assert item["history_rate_hz"].numpy() == pytest.approx(r[:, HISTORY_TAUS.index(30.0)], rel=1e-6)
    # the context's spikes in equal bins
    nb = m.cfg.pop_context_bins
    want = np.stack([np.histogram(t[ctx & (u == k)], bins=CTX + np.arange(nb + 1) / nb)[0] for k in range(4)])
    np.testing.assert_array_equal(item["unit_bins"].numpy(), want)

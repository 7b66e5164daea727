"""NeuroHorizon model, tokenizer and collate (nh-tiny, CPU)."""

from __future__ import annotations

import inspect
import math

import numpy as np
import pytest
import torch
from torch import nn

from nh_serve.core.config import COUNT_HISTORY
from nh_serve.core.config import get_config as _get_config
from nh_serve.core.model import (
    BASELINE_FLOOR_HZ,
    LOG_RATE_MAX,
    LOG_RATE_MIN,
    IDEncoder,
    NeuroHorizon,
    PerNeuronHead,
    baseline_rate_hz,
    poisson_loss,
)
from nh_serve.data.spikes import bin_counts
from nh_serve.data.windows import collate, tokenize
from nh_serve.errors import InputError

CTX_START = 10.0


def get_config(name: str, **overrides):
    """The registered size with the count-history architecture these tests are about (history models:
    tests/test_history_model.py)."""
    return _get_config(name, **{**COUNT_HISTORY, **overrides})


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


def make_window(
    rng: np.random.Generator, n_units: int, *, rate_hz: float = 8.0, ctx_start: float = CTX_START
) -> dict:
    """tokenize() kwargs for one window of Poisson spikes (absolute times)."""
    rates = rng.uniform(0.5, 2.0, n_units) * rate_hz
    counts = rng.poisson(rates)
    unit_index = np.repeat(np.arange(n_units), counts)
    times = ctx_start + rng.uniform(0, 1.0, unit_index.shape[0])
    order = np.argsort(times, kind="stable")
    return {
        "unit_features": rng.normal(size=(n_units, 33)).astype(np.float32),
        "spike_times": times[order],
        "spike_unit_index": unit_index[order],
        "ctx_start": ctx_start,
        "ref_rate_hz": rates.astype(np.float32),
        "history_counts": rng.poisson(rates * 30.0).astype(np.float32),
    }


def randomized(model: nn.Module, seed: int = 0, std: float = 0.3) -> nn.Module:
    """Give every parameter random values so that every path of the network matters."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * std)
    return model.eval()


def tiny(seed: int = 0, **overrides) -> NeuroHorizon:
    torch.manual_seed(seed)
    return randomized(NeuroHorizon(get_config("nh-tiny", **overrides)), seed)


def run(model: NeuroHorizon, items: list[dict]) -> torch.Tensor:
    with torch.no_grad():
        return model(**collate(items))


# ------------------------------------------------------------------------------------------------
# forward basics
# ------------------------------------------------------------------------------------------------


def test_forward_shape_finite_and_clamped():
    rng = np.random.default_rng(0)
    model = tiny()
    out = run(model, [model.tokenize(**make_window(rng, 7))])
    assert out.shape == (1, 7, 50) and out.dtype == torch.float32
    assert torch.isfinite(out).all()
    assert out.min() >= LOG_RATE_MIN and out.max() <= LOG_RATE_MAX
    # the default (untouched) initialisation starts close to the persistence baseline
    torch.manual_seed(0)
    fresh = NeuroHorizon(get_config("nh-tiny")).eval()
    item = fresh.tokenize(**make_window(rng, 7))
    b = collate([item])
    base = baseline_rate_hz(
        b["unit_counts"], b["history_rate_hz"], window_s=1.0, prior_s=2.0, floor_hz=BASELINE_FLOOR_HZ
    )
    with torch.no_grad():
        dev = fresh(**b) - torch.log(base).unsqueeze(-1)
    assert dev.abs().max() < 0.5


def test_collate_keys_are_forward_kwargs():
    rng = np.random.default_rng(1)
    for overrides in ({}, {"behavior_dim": 2, "image_dim": 4}):
        model = tiny(**overrides)
        batch = collate([model.tokenize(**make_window(rng, 3)), model.tokenize(**make_window(rng, 5))])
        params = inspect.signature(model.forward).parameters
        assert set(batch) <= set(params)
        required = {k for k, p in params.items() if p.default is inspect.Parameter.empty}
        assert required <= set(batch)
        if overrides:  # a multimodal batch fills every argument but the history model's inputs
            assert set(batch) == set(params) - {"history_rates", "unit_readout", "unit_bins"}
        assert model(**batch).shape == (2, 5, 50)


def test_tokenize_hand_example():
    cfg = get_config("nh-tiny")
    feats = np.zeros((2, 33), dtype=np.float32)
    times = np.array([10.1, 10.8, 10.97, 10.99])
    units = np.array([0, 1, 0, 1])
    item = tokenize(
        cfg,
        unit_features=feats,
        spike_times=times,
        spike_unit_index=units,
        ctx_start=10.0,
        ref_rate_hz=np.array([4.0, 6.0]),
        history_counts=np.array([30.0, 60.0]),
    )
    # counts in the last 0.05 / 0.25 / 1.0 s of [10, 11)
    np.testing.assert_array_equal(item["unit_counts"].numpy(), [[1, 1, 2], [1, 2, 2]])
    np.testing.assert_allclose(item["history_rate_hz"].numpy(), [1.0, 2.0])  # counts / 30 s
    np.testing.assert_allclose(item["ref_rate_hz"].numpy(), [4.0, 6.0])
    # per-unit start/end tokens first, then the spikes (times relative to ctx_start)
    assert item["spike_unit_index"].tolist() == [0, 0, 1, 1, 0, 1, 0, 1]
    assert item["spike_type"].tolist() == [1, 2, 1, 2, 0, 0, 0, 0]
    np.testing.assert_allclose(item["spike_times"].numpy(), [0, 1, 0, 1, 0.1, 0.8, 0.97, 0.99], atol=1e-6)
    assert item["spike_times"].dtype == torch.float32 and item["spike_mask"].all()
    assert item["unit_mask"].tolist() == [True, True]
    # history fallback: the reference rate; a shorter history window scales the rate
    item = tokenize(
        cfg,
        unit_features=feats,
        spike_times=times,
        spike_unit_index=units,
        ctx_start=10.0,
        ref_rate_hz=np.array([4.0, 6.0]),
    )
    np.testing.assert_allclose(item["history_rate_hz"].numpy(), [4.0, 6.0])
    item = tokenize(
        cfg,
        unit_features=feats,
        spike_times=times,
        spike_unit_index=units,
        ctx_start=10.0,
        ref_rate_hz=np.array([4.0, 6.0]),
        history_counts=[3, 6],
        history_duration_s=3.0,
    )
    np.testing.assert_allclose(item["history_rate_hz"].numpy(), [1.0, 2.0])


def test_collate_pads_with_masks():
    rng = np.random.default_rng(2)
    model = tiny(behavior_dim=2)
    a = model.tokenize(**make_window(rng, 2, rate_hz=2.0))
    w = make_window(rng, 6)
    b = model.tokenize(**w, behavior=(np.array([10.1, 10.5, 10.9]), np.ones((3, 2))))
    batch = collate([a, b])
    n_a, n_b = a["spike_mask"].shape[0], b["spike_mask"].shape[0]
    assert batch["spike_mask"].shape == (2, max(n_a, n_b))
    assert batch["spike_mask"][0].sum() == n_a and batch["unit_mask"][0].tolist() == [True] * 2 + [False] * 4
    assert batch["unit_features"].shape == (2, 6, 33)
    assert batch["behavior_values"].shape == (2, 3, 2)
    assert batch["behavior_mask"].tolist() == [[False] * 3, [True] * 3]
    # windows without any behaviour still get one (masked) token
    single = collate([a])
    assert single["behavior_times"].shape == (1, 1) and not single["behavior_mask"].any()
    with pytest.raises(InputError, match="same model"):
        collate([a, tiny().tokenize(**w)])
    with pytest.raises(InputError, match="non-empty"):
        collate([])


def test_padded_units_get_log_rate_min():
    rng = np.random.default_rng(3)
    model = tiny()
    out = run(model, [model.tokenize(**make_window(rng, 2)), model.tokenize(**make_window(rng, 5))])
    assert torch.all(out[0, 2:] == LOG_RATE_MIN)
    assert torch.all(out[0, :2] > LOG_RATE_MIN)


# ------------------------------------------------------------------------------------------------
# invariances
# ------------------------------------------------------------------------------------------------


def test_padding_invariance():
    rng = np.random.default_rng(4)
    model = tiny(behavior_dim=2, image_dim=3)
    small = model.tokenize(
        **make_window(rng, 4, rate_hz=3.0),
        behavior=(np.array([10.2, 10.6]), rng.normal(size=(2, 2))),
        images=(np.array([10.5]), rng.normal(size=(1, 3))),
    )
    big = model.tokenize(
        **make_window(rng, 11, rate_hz=20.0),
        behavior=(np.linspace(10.0, 10.95, 20), rng.normal(size=(20, 2))),
        images=(np.array([10.1, 10.4, 10.8]), rng.normal(size=(3, 3))),
    )
    assert big["spike_mask"].shape[0] > 2 * small["spike_mask"].shape[0]
    alone = run(model, [small])[0]
    batched = run(model, [big, small, big])[1, :4]
    torch.testing.assert_close(batched, alone, rtol=0, atol=1e-5)
    # and the big session does change when its own inputs change (the test can fail)
    assert not torch.allclose(run(model, [big])[0, :4], alone)


def test_unit_permutation_equivariance():
    rng = np.random.default_rng(5)
    model = tiny()
    w = make_window(rng, 7)
    perm = rng.permutation(7)  # new unit i is old unit perm[i]
    inv = np.argsort(perm)  # old unit u is new unit inv[u]
    wp = dict(w)
    for key in ("unit_features", "ref_rate_hz", "history_counts"):
        wp[key] = w[key][perm]
    wp["spike_unit_index"] = inv[w["spike_unit_index"]]
    out = run(model, [model.tokenize(**w)])[0]
    out_p = run(model, [model.tokenize(**wp)])[0]
    torch.testing.assert_close(out_p, out[perm], rtol=0, atol=1e-5)
    assert not torch.allclose(out_p, out)  # the units really differ


def test_rates_depend_on_spike_times_and_other_units():
    rng = np.random.default_rng(6)
    model = tiny()
    w = make_window(rng, 5)
    out = run(model, [model.tokenize(**w)])[0]
    # shift one spike of unit 0 by 100 ms (counts in every activity window unchanged)
    times = w["spike_times"].copy()
    j = int(
        np.flatnonzero((w["spike_unit_index"] == 0) & (times < CTX_START + 0.5) & (times > CTX_START + 0.2))[
            0
        ]
    )
    times[j] -= 0.1
    order = np.argsort(times, kind="stable")
    w2 = dict(w, spike_times=times[order], spike_unit_index=w["spike_unit_index"][order])
    out2 = run(model, [model.tokenize(**w2)])[0]
    assert (out2 - out).abs().max() > 1e-4
    # every unit's prediction changes (through the shared latents), not only unit 0's
    assert torch.all((out2 - out).abs().amax(dim=1) > 1e-6)


def test_decoder_bins_are_causal():
    rng = np.random.default_rng(7)
    model = tiny()
    b = collate([model.tokenize(**make_window(rng, 3))])
    with torch.no_grad():
        emb = model.embed_units(b["unit_features"])
        args = (emb, b["spike_unit_index"], b["spike_times"], b["spike_type"], b["spike_mask"])
        bins = model.bin_states(*args)
        model.bin_emb.weight[30:] += 1.0
        bins2 = model.bin_states(*args)
    torch.testing.assert_close(bins2[:, :30], bins[:, :30], rtol=0, atol=1e-6)
    assert not torch.allclose(bins2[:, 30:], bins[:, 30:])


# ------------------------------------------------------------------------------------------------
# per-neuron head, embeddings, baseline
# ------------------------------------------------------------------------------------------------


def test_split_head_equals_concatenated_mlp():
    torch.manual_seed(0)
    D, Du, H = 12, 9, 16
    head = randomized(PerNeuronHead(bin_dim=D, unit_dim=Du, hidden=H, n_layers=3))
    first = nn.Linear(D + Du, H)
    with torch.no_grad():
        first.weight.copy_(torch.cat([head.bin_proj.weight, head.unit_proj.weight], dim=1))
        first.bias.copy_(head.bin_proj.bias)
    mlp = nn.Sequential(first, nn.GELU(), head.hidden_layers[0], nn.GELU(), head.out)
    bins, units = torch.randn(2, 5, D), torch.randn(2, 4, Du)
    pairs = torch.cat(
        [bins[:, None, :, :].expand(-1, 4, -1, -1), units[:, :, None, :].expand(-1, -1, 5, -1)], dim=-1
    )  # (B, U, T, D + Du): concat(bin_k, unit_u)
    with torch.no_grad():
        expected = mlp(pairs).squeeze(-1)  # (B, U, T)
        got = head(bins, units)
        parts = head.combine(head.unit_part(units), head.bin_part(bins))
    assert got.shape == (2, 4, 5)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(parts, got, rtol=0, atol=0)


def test_forward_is_the_documented_composition():
    """The pieces a fused kernel or an exporter can replace compose into forward."""
    rng = np.random.default_rng(15)
    model = tiny()
    b = collate([model.tokenize(**make_window(rng, 4)), model.tokenize(**make_window(rng, 2))])
    with torch.no_grad():
        emb = model.embed_units(b["unit_features"])  # (B, U, D)
        bins = model.bin_states(
            emb, b["spike_unit_index"], b["spike_times"], b["spike_type"], b["spike_mask"]
        )
        unit_vec = model.unit_vectors(emb, b["unit_counts"], b["history_rate_hz"], b["ref_rate_hz"])
        offset = model.log_baseline(b["unit_counts"], b["history_rate_hz"])  # (B, U)
        head = model.head
        log_rate = head.combine(head.unit_part(unit_vec), head.bin_part(bins), offset)
        log_rate = log_rate.clamp(LOG_RATE_MIN, LOG_RATE_MAX).masked_fill(
            ~b["unit_mask"][..., None], LOG_RATE_MIN
        )
        torch.testing.assert_close(log_rate, model(**b), rtol=0, atol=0)
        # the offset is added to every bin of its unit
        plain = head.combine(head.unit_part(unit_vec), head.bin_part(bins))
        torch.testing.assert_close(plain + offset[..., None], head(bins, unit_vec, offset), rtol=0, atol=1e-6)
    assert bins.shape == (2, 50, model.cfg.dim) and unit_vec.shape == (
        2,
        4,
        model.cfg.dim + model.cfg.n_activity,
    )


def test_forward_with_embeddings_equals_forward():
    rng = np.random.default_rng(8)
    model = tiny()
    b = collate([model.tokenize(**make_window(rng, 4)), model.tokenize(**make_window(rng, 6))])
    with torch.no_grad():
        out = model(**b)
        rest = {k: v for k, v in b.items() if k != "unit_features"}
        emb = model.embed_units(b["unit_features"])
        assert emb.shape == (2, 6, model.cfg.dim)
        torch.testing.assert_close(
            model.forward_with_embeddings(unit_embeddings=emb, **rest), out, rtol=0, atol=0
        )
        # an override really replaces the embeddings
        other = model.forward_with_embeddings(unit_embeddings=emb.flip(1), **rest)
    assert not torch.allclose(other, out)


@pytest.mark.parametrize("mode", ["idencoder", "random", "mean"])
def test_unit_embedding_modes(mode):
    rng = np.random.default_rng(9)
    torch.manual_seed(0)
    model = NeuroHorizon(get_config("nh-tiny", unit_embedding_mode=mode))
    b = collate([model.tokenize(**make_window(rng, 5))])
    out = model(**b)
    assert out.shape == (1, 5, 50) and torch.isfinite(out).all()
    enc = model.unit_encoder
    n_params = sum(p.numel() for p in enc.parameters())
    if mode == "random":
        assert n_params == 0 and not enc.projection.requires_grad
        assert "unit_encoder.projection" in model.state_dict()  # saved with the model
        before = enc.projection.clone()
        opt = torch.optim.Adam(model.parameters(), lr=0.1)
        poisson_loss(model(**b), torch.ones(1, 5, 50), bin_size_s=0.02).backward()
        opt.step()
        torch.testing.assert_close(enc.projection, before, rtol=0, atol=0)
    elif mode == "mean":
        assert n_params == 33 * 32 + 32  # a single linear layer
    else:
        assert n_params > 33 * 32 + 2 * 32 * 32
    # different features give different embeddings
    x = torch.randn(1, 3, 33)
    emb = enc(x)
    assert emb.shape == (1, 3, 32) and not torch.allclose(emb[0, 0], emb[0, 1])


def test_id_encoder_rejects_unknown_mode():
    with pytest.raises(ValueError, match="unknown unit embedding mode"):
        IDEncoder(n_features=33, dim=8, mode="lookup")


def test_baseline_offset_is_the_shrunk_recent_rate():
    cfg = get_config("nh-tiny")
    torch.manual_seed(0)
    model = NeuroHorizon(cfg).eval()
    with torch.no_grad():  # silence the network: the output is the baseline alone
        model.head.out.weight.zero_()
        model.head.out.bias.zero_()
    feats = np.zeros((2, 33), dtype=np.float32)
    item = model.tokenize(
        unit_features=feats,
        spike_times=np.array([10.1, 10.2, 10.3]),
        spike_unit_index=np.array([0, 0, 0]),
        ctx_start=10.0,
        ref_rate_hz=np.array([5.0, 0.0]),
        history_counts=np.array([60.0, 0.0]),
    )
    rate = run(model, [item])[0].exp()
    # unit 0: (3 spikes + 2 s * 60/30 Hz) / (1 s + 2 s) = 7/3 Hz; unit 1 is silent -> the floor
    torch.testing.assert_close(rate[0], torch.full((50,), 7.0 / 3.0), rtol=1e-5, atol=0)
    torch.testing.assert_close(rate[1], torch.full((50,), BASELINE_FLOOR_HZ), rtol=1e-5, atol=0)
    # without the offset the same silent network predicts a constant exp(0) = 1 Hz
    model2 = NeuroHorizon(cfg.replace(baseline_offset=False)).eval()
    with torch.no_grad():
        model2.head.out.weight.zero_()
        model2.head.out.bias.zero_()
    torch.testing.assert_close(run(model2, [item])[0].exp(), torch.ones(2, 50), rtol=1e-6, atol=0)


def test_poisson_loss_hand_value():
    log_rate = torch.log(torch.tensor([[[50.0, 100.0]]]))  # Hz; mu = 1 and 2 counts per 20 ms bin
    counts = torch.tensor([[[1.0, 0.0]]])
    expected = ((1.0 - 1.0 * math.log(1.0)) + (2.0 - 0.0)) / 2
    assert poisson_loss(log_rate, counts, bin_size_s=0.02).item() == pytest.approx(expected, rel=1e-6)
    masked = poisson_loss(
        torch.cat([log_rate, log_rate]),
        torch.cat([counts, counts + 5]),
        bin_size_s=0.02,
        unit_mask=torch.tensor([[True], [False]]),
    )
    assert masked.item() == pytest.approx(expected, rel=1e-6)


# ------------------------------------------------------------------------------------------------
# multimodal
# ------------------------------------------------------------------------------------------------


def test_multimodal_with_and_without_extra_inputs():
    rng = np.random.default_rng(10)
    model = tiny(behavior_dim=2, image_dim=4)
    w = make_window(rng, 5)
    plain = model.tokenize(**w)
    with_beh = model.tokenize(**w, behavior=(np.linspace(10.0, 10.9, 10), rng.normal(size=(10, 2))))
    with_img = model.tokenize(**w, images=(np.array([10.25, 10.75]), rng.normal(size=(2, 4))))
    out_plain, out_beh, out_img = run(model, [plain])[0], run(model, [with_beh])[0], run(model, [with_img])[0]
    for out in (out_plain, out_beh, out_img):
        assert torch.isfinite(out).all() and out.min() > LOG_RATE_MIN
    assert (out_beh - out_plain).abs().max() > 1e-4
    assert (out_img - out_plain).abs().max() > 1e-4
    # an image model always gets the schedule marker: at the context end when nothing is said
    assert plain["image_times"].tolist() == [1.0] and plain["image_values"][0, -1] == 1.0
    sched = model.tokenize(**w, images=(np.array([10.25, 11.5]), rng.normal(size=(2, 4))))
    assert sched["image_times"].tolist() == [0.25, 1.5, 2.0]  # schedule known to the forecast end
    assert sched["image_values"].shape == (3, 5) and sched["image_values"][:, -1].tolist() == [0, 0, 1]
    told = model.tokenize(**w, images=None, image_schedule_s=0.5)
    assert told["image_times"].tolist() == [1.5]
    # without behaviour the multimodal update is exactly zero: same as passing None
    bmodel = tiny(behavior_dim=2)
    b = collate([bmodel.tokenize(**w)])
    no_mm = {k: v for k, v in b.items() if not k.startswith("behavior")}
    with torch.no_grad():
        torch.testing.assert_close(bmodel(**no_mm)[0], bmodel(**b)[0], rtol=0, atol=1e-6)


def test_multimodal_every_places_cross_attention():
    model = NeuroHorizon(get_config("nh-tiny", depth=4, behavior_dim=2, multimodal_every=2))
    assert [blk.mm_attn is not None for blk in model.blocks] == [True, False, True, False]
    plain = NeuroHorizon(get_config("nh-tiny", depth=4))
    assert all(blk.mm_attn is None for blk in plain.blocks)


# ------------------------------------------------------------------------------------------------
# training
# ------------------------------------------------------------------------------------------------


def _synthetic_poisson(rng: np.random.Generator, *, n_windows: int, n_units: int):
    """Windows of inhomogeneous Poisson spikes (a 2 Hz rhythm around unit base rates) and their targets."""
    dt, cycle_hz = 1e-3, 2.0
    grid = np.arange(0.0, 2.0, dt)  # context [0, 1) + horizon [1, 2), s from ctx_start
    items, targets = [], []
    for _ in range(n_windows):
        base = rng.uniform(2.0, 30.0, n_units)  # Hz
        phase = rng.uniform(0, 2 * np.pi)
        rate = base[:, None] * (1 + 0.9 * np.sin(2 * np.pi * cycle_hz * grid[None] + phase))  # (U, 2000) Hz
        unit, tbin = np.nonzero(rng.random(rate.shape) < rate * dt)
        times = CTX_START + grid[tbin]
        order = np.argsort(times, kind="stable")
        times, unit = times[order], unit[order]
        ctx = times < CTX_START + 1.0
        items.append(
            {
                "unit_features": rng.normal(size=(n_units, 33)).astype(np.float32),
                "spike_times": times[ctx],
                "spike_unit_index": unit[ctx],
                "ctx_start": CTX_START,
                "ref_rate_hz": base,
            }
        )
        targets.append(
            bin_counts(
                times[~ctx], unit[~ctx], n_units=n_units, start=CTX_START + 1.0, bin_size=0.02, n_bins=50
            )
        )
    return items, torch.from_numpy(np.stack(targets))  # (B, U, 50) counts


def test_training_lowers_poisson_loss():
    rng = np.random.default_rng(11)
    torch.manual_seed(0)
    model = NeuroHorizon(get_config("nh-tiny"))
    items, counts = _synthetic_poisson(rng, n_windows=8, n_units=6)
    batch = model.collate([model.tokenize(**it) for it in items])
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(40):
        loss = poisson_loss(model(**batch), counts, bin_size_s=0.02, unit_mask=batch["unit_mask"])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < 0.95 * losses[0], losses


# ------------------------------------------------------------------------------------------------
# bad input and robustness
# ------------------------------------------------------------------------------------------------


def test_tokenize_rejects_bad_input():
    rng = np.random.default_rng(12)
    cfg = get_config("nh-tiny")
    w = make_window(rng, 3)

    def tok(**changes):
        return tokenize(cfg, **{**w, **changes})

    with pytest.raises(InputError, match="outside the window"):
        tok(
            spike_times=np.append(w["spike_times"], CTX_START + 1.0),
            spike_unit_index=np.append(w["spike_unit_index"], 0),
        )
    with pytest.raises(InputError, match="outside the window"):
        tok(
            spike_times=np.insert(w["spike_times"], 0, CTX_START - 0.01),
            spike_unit_index=np.insert(w["spike_unit_index"], 0, 0),
        )
    with pytest.raises(InputError, match="zero units"):
        tok(
            unit_features=np.zeros((0, 33), np.float32),
            spike_times=[],
            spike_unit_index=[],
            ref_rate_hz=[],
            history_counts=None,
        )
    with pytest.raises(InputError, match="unit indices"):
        tok(spike_unit_index=w["spike_unit_index"][:-1])
    with pytest.raises(InputError, match="outside"):
        tok(spike_unit_index=np.full_like(w["spike_unit_index"], 3))
    with pytest.raises(InputError, match="not sorted"):
        tok(spike_times=w["spike_times"][::-1].copy(), spike_unit_index=w["spike_unit_index"][::-1].copy())
    with pytest.raises(InputError, match="dtype"):
        tok(spike_times=w["spike_times"].astype(str))
    with pytest.raises(InputError, match="must be float"):
        tok(unit_features=np.ones((3, 33), dtype=np.int64))
    with pytest.raises(InputError, match="unit_features.*dtype"):
        tok(unit_features=np.full((3, 33), "a"))
    with pytest.raises(InputError, match=r"unit_features.*\(N, 33\)"):
        tok(unit_features=np.zeros((3, 32), np.float32))
    with pytest.raises(InputError, match="NaN"):
        tok(unit_features=np.full((3, 33), np.nan, np.float32))
    with pytest.raises(InputError, match=r"ref_rate_hz.*\(3\)"):
        tok(ref_rate_hz=np.ones(4))
    with pytest.raises(InputError, match="ref_rate_hz.*>= 0"):
        tok(ref_rate_hz=-np.ones(3))
    with pytest.raises(InputError, match="history_counts"):
        tok(history_counts=np.ones(2))
    with pytest.raises(InputError, match="history_duration_s"):
        tok(history_duration_s=0.0)
    with pytest.raises(InputError, match="ctx_start"):
        tok(ctx_start=float("nan"))
    with pytest.raises(InputError, match="takes no behavior"):
        tok(behavior=(np.array([10.5]), np.ones((1, 2))))
    with pytest.raises(InputError, match="takes no images"):
        tok(images=(np.array([10.5]), np.ones((1, 4))))

    mm = get_config("nh-tiny", behavior_dim=2, image_dim=4)
    with pytest.raises(InputError, match="behavior: values have width 3 but this model takes 2"):
        tokenize(mm, **w, behavior=(np.array([10.5]), np.ones((1, 3))))
    with pytest.raises(InputError, match="images: values have width 5 but this model takes 4"):
        tokenize(mm, **w, images=(np.array([10.5]), np.ones((1, 5))))
    with pytest.raises(InputError, match="2 times but 1 value rows"):
        tokenize(mm, **w, behavior=(np.array([10.1, 10.5]), np.ones((1, 2))))
    with pytest.raises(InputError, match="outside the context window"):
        tokenize(mm, **w, behavior=(np.array([11.5]), np.ones((1, 2))))
    with pytest.raises(InputError, match="pair"):
        tokenize(mm, **w, behavior=np.ones((1, 2)))
    with pytest.raises(InputError, match=r"behavior values.*\(N, 2\)"):
        tokenize(mm, **w, behavior=(np.array([10.5]), np.ones(2)))


def test_accepts_tensors_and_empty_context():
    model = tiny()
    feats = torch.randn(3, 33)
    item = model.tokenize(
        unit_features=feats,
        spike_times=torch.zeros(0, dtype=torch.float64),
        spike_unit_index=torch.zeros(0, dtype=torch.long),
        ctx_start=0.0,
        ref_rate_hz=torch.zeros(3),
    )
    assert item["spike_mask"].shape == (6,)  # start/end tokens only
    out = run(model, [item])
    assert torch.isfinite(out).all()


def test_extreme_inputs_never_nan():
    rng = np.random.default_rng(13)
    model = tiny()
    w = make_window(rng, 4, rate_hz=400.0)
    w["unit_features"] = np.full((4, 33), 1e4, np.float32)
    w["ref_rate_hz"] = np.array([0.0, 1e4, 3.0, 500.0], np.float32)
    out = run(model, [model.tokenize(**w)])
    assert torch.isfinite(out).all() and out.max() <= LOG_RATE_MAX


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")
def test_torchscript_matches_eager():
    rng = np.random.default_rng(14)
    model = tiny(behavior_dim=2, image_dim=4)
    b = collate(
        [
            model.tokenize(**make_window(rng, 3), behavior=(np.array([10.3]), np.ones((1, 2)))),
            model.tokenize(**make_window(rng, 5)),
        ]
    )
    scripted = torch.jit.script(model)
    with torch.no_grad():
        torch.testing.assert_close(scripted(**b), model(**b), rtol=0, atol=1e-6)
        emb = scripted.embed_units(b["unit_features"])
        torch.testing.assert_close(emb, model.embed_units(b["unit_features"]), rtol=0, atol=1e-6)

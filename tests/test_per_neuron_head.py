"""Tests for kernels.per_neuron_head: Triton kernel vs float64 reference vs an explicit MLP.

Without a GPU the kernel runs on Triton's CPU interpreter (TRITON_INTERPRET=1,
set below before Triton is first used), so shapes stay small.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

_ROOT = Path(__file__).resolve().parents[1]
if str(_ROOT) not in sys.path:  # top-level package `kernels` from a source checkout
    sys.path.insert(0, str(_ROOT))

import math  # noqa: E402

import pytest  # noqa: E402
import torch.nn as nn  # noqa: E402

from kernels import first_layer_parts, per_neuron_head, per_neuron_head_reference, triton_available  # noqa: E402
from nh_serve.errors import InputError  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
TOL = {torch.float32: dict(atol=2e-5, rtol=1e-5), torch.bfloat16: dict(atol=3e-2, rtol=2e-2)}

needs_triton = pytest.mark.skipif(not triton_available(), reason="triton is not installed")


def _head(*, seed, batch, n_units, n_bins, hidden, hidden2, dtype=torch.float32, unit_batch=None):
    """Random head inputs: parts of O(1) and layer weights scaled like nn.Linear's init."""
    g = torch.Generator().manual_seed(seed)
    unit_part = torch.randn(unit_batch or batch, n_units, hidden, generator=g)
    bin_part = torch.randn(batch, n_bins, hidden, generator=g)
    if hidden2:
        weights = [
            torch.randn(hidden2, hidden, generator=g) / hidden**0.5,
            torch.randn(1, hidden2, generator=g) / hidden2**0.5,
        ]
        biases = [0.1 * torch.randn(hidden2, generator=g), torch.randn(1, generator=g)]
    else:
        weights = [torch.randn(1, hidden, generator=g) / hidden**0.5]
        biases = [torch.randn(1, generator=g)]
    to = dict(device=DEVICE)
    return (
        unit_part.to(dtype=dtype, **to),
        bin_part.to(dtype=dtype, **to),
        [w.to(**to) for w in weights],
        [b.to(**to) for b in biases],
    )


def _oracle(unit_part, bin_part, weights, biases, **kw):
    return per_neuron_head_reference(
        unit_part.cpu().double(),
        bin_part.cpu().double(),
        [w.cpu().double() for w in weights],
        [b.cpu().double() for b in biases],
        **kw,
    )


def _poisoned(shape):
    return torch.full(shape, float("nan"), dtype=torch.float32, device=DEVICE)


# ---------------------------------------------------------------------------
# Reference and layer convention
# ---------------------------------------------------------------------------


def test_reference_hand_computed():
    """relu, one output layer: log_rate = W_out . relu(unit + bin) + b_out."""
    unit_part = torch.tensor([[[1.0, -2.0], [0.0, 0.0]]], dtype=torch.float64)  # (1, U=2, H=2)
    bin_part = torch.tensor([[[0.5, 3.0]]], dtype=torch.float64)  # (1, T=1, H=2)
    w = [torch.tensor([[2.0, 1.0]], dtype=torch.float64)]
    b = [torch.tensor([0.25], dtype=torch.float64)]
    lr = per_neuron_head_reference(unit_part, bin_part, w, b, activation="relu")
    # unit 0: relu([1.5, 1.0]) -> 2 * 1.5 + 1 + 0.25; unit 1: relu([0.5, 3]) -> 1 + 3 + 0.25
    assert torch.allclose(lr, torch.tensor([[[4.25], [4.25]]], dtype=torch.float64))
    rates = per_neuron_head_reference(
        unit_part,
        bin_part,
        w,
        b,
        activation="relu",
        emit_rates=True,
        bin_width=0.02,
        log_rate_clamp=(-5.0, 4.0),
    )
    assert torch.allclose(rates, torch.full((1, 2, 1), math.exp(4.0) / 0.02, dtype=torch.float64))


@pytest.mark.parametrize(
    "activation,module", [("gelu", nn.GELU()), ("gelu_tanh", nn.GELU(approximate="tanh"))]
)
def test_split_head_equals_mlp_on_concat(activation, module):
    """first_layer_parts + reference == the plain MLP applied to concat(bin_k, unit_u)."""
    g = torch.Generator().manual_seed(0)
    B, U, T, d_bin, d_unit, H, H2 = 2, 5, 4, 6, 3, 8, 7
    mlp = nn.Sequential(
        nn.Linear(d_bin + d_unit, H), module, nn.Linear(H, H2), module, nn.Linear(H2, 1)
    ).double()
    bins = torch.randn(B, T, d_bin, generator=g, dtype=torch.float64)
    units = torch.randn(B, U, d_unit, generator=g, dtype=torch.float64)
    pairs = torch.cat(
        (bins[:, None, :, :].expand(B, U, T, d_bin), units[:, :, None, :].expand(B, U, T, d_unit)), dim=-1
    )  # (B, U, T, d_bin + d_unit)
    want = mlp(pairs).squeeze(-1)  # (B, U, T)
    unit_part, bin_part = first_layer_parts(bins, units, mlp[0].weight, mlp[0].bias)
    got = per_neuron_head_reference(
        unit_part, bin_part, [mlp[2].weight, mlp[4].weight], [mlp[2].bias, mlp[4].bias], activation=activation
    )
    assert torch.allclose(got, want, atol=1e-12)


# ---------------------------------------------------------------------------
# The Triton kernel against the float64 reference
# ---------------------------------------------------------------------------

CASES = [
    # seed, batch, units, bins, hidden, hidden2 (0: output layer only), activation
    pytest.param(1, 1, 1, 50, 32, 24, "gelu", id="u1-t50-2layer"),
    pytest.param(2, 3, 7, 13, 20, 16, "gelu_tanh", id="u7-t13-h20"),
    pytest.param(3, 3, 73, 50, 32, 0, "gelu", id="u73-t50-1layer"),
    pytest.param(4, 1, 73, 17, 48, 40, "relu", id="u73-t17-relu"),
    pytest.param(5, 2, 9, 50, 16, 0, "silu", id="silu-1layer"),
    pytest.param(6, 2, 9, 11, 16, 24, "silu", id="silu-2layer"),
]


@needs_triton
@pytest.mark.parametrize("seed,batch,n_units,n_bins,hidden,hidden2,activation", CASES)
@pytest.mark.parametrize("emit_rates", [False, True])
def test_kernel_matches_reference_float32(
    seed, batch, n_units, n_bins, hidden, hidden2, activation, emit_rates
):
    unit_part, bin_part, weights, biases = _head(
        seed=seed, batch=batch, n_units=n_units, n_bins=n_bins, hidden=hidden, hidden2=hidden2
    )
    kw = dict(activation=activation, emit_rates=emit_rates, bin_width=0.02, log_rate_clamp=(-3.0, 1.5))
    out = _poisoned((batch, n_units, n_bins))
    got = per_neuron_head(unit_part, bin_part, weights, biases, out=out, **kw)
    assert got.data_ptr() == out.data_ptr() and got.dtype == torch.float32
    assert torch.isfinite(got).all(), "unwritten (NaN-poisoned) or NaN outputs"
    want = _oracle(unit_part, bin_part, weights, biases, **kw)
    if emit_rates:  # rates in Hz reach exp(1.5) / 0.02 = 224: compare relatively
        torch.testing.assert_close(got.cpu().double(), want, atol=1e-4, rtol=2e-5)
        assert (got.cpu().double() <= math.exp(1.5) / 0.02 * (1 + 1e-5)).all()
    else:
        torch.testing.assert_close(got.cpu().double(), want, **TOL[torch.float32])


@needs_triton
@pytest.mark.parametrize("block_u,block_t,block_k", [(2, 8, 16), (1, 16, 16), (8, 4, 32)])
def test_kernel_tiles_do_not_change_the_result(block_u, block_t, block_k):
    """Small tiles: several unit / bin / hidden blocks with ragged edges."""
    unit_part, bin_part, weights, biases = _head(seed=8, batch=1, n_units=7, n_bins=19, hidden=40, hidden2=20)
    out = _poisoned((1, 7, 19))
    got = per_neuron_head(
        unit_part, bin_part, weights, biases, out=out, block_u=block_u, block_t=block_t, block_k=block_k
    )
    torch.testing.assert_close(
        got.cpu().double(), _oracle(unit_part, bin_part, weights, biases), **TOL[torch.float32]
    )


@needs_triton
def test_kernel_bfloat16():
    unit_part, bin_part, weights, biases = _head(
        seed=9, batch=2, n_units=11, n_bins=50, hidden=32, hidden2=32, dtype=torch.bfloat16
    )
    out = _poisoned((2, 11, 50))
    got = per_neuron_head(unit_part, bin_part, weights, biases, out=out)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(
        got.cpu().double(), _oracle(unit_part, bin_part, weights, biases), **TOL[torch.bfloat16]
    )


@needs_triton
def test_kernel_broadcast_batch_and_strided_inputs():
    """unit_part with batch 1 serves every batch element; bin_part as a transposed view."""
    unit_part, _, weights, biases = _head(
        seed=10, batch=3, n_units=6, n_bins=9, hidden=16, hidden2=16, unit_batch=1
    )
    g = torch.Generator().manual_seed(10)
    bin_store = torch.randn(3, 16, 9, generator=g).to(DEVICE)  # (B, H, T)
    bin_part = bin_store.transpose(1, 2)  # (B, T, H), last-dim stride != 1
    out = _poisoned((3, 6, 9))
    got = per_neuron_head(unit_part, bin_part, weights, biases, out=out)
    want = _oracle(unit_part.expand(3, -1, -1), bin_part, weights, biases)
    torch.testing.assert_close(got.cpu().double(), want, **TOL[torch.float32])


@needs_triton
def test_kernel_matches_split_mlp_end_to_end():
    """Kernel output == nn.Sequential MLP on concat(bin, unit) (the model's head)."""
    torch.manual_seed(12)
    B, U, T, d_bin, d_unit, H = 2, 13, 50, 12, 10, 32
    mlp = nn.Sequential(nn.Linear(d_bin + d_unit, H), nn.GELU(), nn.Linear(H, 1)).to(DEVICE)
    bins = torch.randn(B, T, d_bin, device=DEVICE)
    units = torch.randn(B, U, d_unit, device=DEVICE)
    pairs = torch.cat(
        (bins[:, None, :, :].expand(B, U, T, d_bin), units[:, :, None, :].expand(B, U, T, d_unit)), dim=-1
    )
    with torch.no_grad():
        want = mlp.double()(pairs.double()).squeeze(-1)
        mlp.float()
        unit_part, bin_part = first_layer_parts(bins, units, mlp[0].weight, mlp[0].bias)
        got = per_neuron_head(unit_part, bin_part, [mlp[2].weight], [mlp[2].bias], activation="gelu")
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)


def test_bad_inputs_raise_input_error():
    unit_part, bin_part, weights, biases = _head(seed=1, batch=2, n_units=3, n_bins=4, hidden=8, hidden2=6)
    with pytest.raises(InputError, match="activation"):
        per_neuron_head(unit_part, bin_part, weights, biases, activation="tanh")
    with pytest.raises(InputError, match="bin_width"):
        per_neuron_head(unit_part, bin_part, weights, biases, emit_rates=True)
    with pytest.raises(InputError, match="weight"):
        per_neuron_head(unit_part, bin_part, [weights[0].T, weights[1]], biases)
    with pytest.raises(InputError, match="hidden sizes"):
        per_neuron_head(unit_part, bin_part[..., :4], weights, biases)
    with pytest.raises(InputError, match="log_rate_clamp"):
        per_neuron_head(unit_part, bin_part, weights, biases, log_rate_clamp=(2.0, 1.0))
    with pytest.raises(InputError, match="out"):
        per_neuron_head(unit_part, bin_part, weights, biases, out=torch.empty(2, 3, device=DEVICE))


# ---------------------------------------------------------------------------
# The model's head module: the blocked eager path equals the reference
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("n_layers,B,U,T,H", [(2, 3, 700, 50, 64), (3, 2, 37, 13, 24), (2, 1, 1, 7, 8), (4, 5, 9, 3, 16)])
def test_head_module_blocked_combine_equals_the_reference(monkeypatch, n_layers, B, U, T, H):
    """Without gradients on the CPU, PerNeuronHead.combine runs a block of units at a time; it must give
    the reference's numbers (the path with gradients), with and without the per-unit offset, also when
    the blocks do not divide the units."""
    import nh_serve.core.blocks as blocks
    from nh_serve.core.blocks import PerNeuronHead

    monkeypatch.setattr(blocks, "COMBINE_BLOCK_ELEMENTS", 5 * T * H)  # blocks of 5 units: a partial last one
    g = torch.Generator().manual_seed(n_layers * 100 + U)
    head = PerNeuronHead(bin_dim=5, unit_dim=6, hidden=H, n_layers=n_layers)
    up, bp, off = torch.randn(B, U, H, generator=g), torch.randn(B, T, H, generator=g), torch.randn(B, U, generator=g)
    for offset in (off, None):
        want = head.combine(up, bp, offset)  # gradients on: the reference path
        assert want.requires_grad
        with torch.no_grad():
            got = head.combine(up, bp, offset)
        assert got.shape == (B, U, T)
        torch.testing.assert_close(got, want.detach(), atol=1e-6, rtol=1e-6)
    # a float64 reference of the same MLP
    h = torch.nn.functional.gelu(up.double().unsqueeze(2) + bp.double().unsqueeze(1))
    for layer in head.hidden_layers:
        h = torch.nn.functional.gelu(h @ layer.weight.double().T + layer.bias.double())
    ref = (h @ head.out.weight.double().T).squeeze(-1) + head.out.bias.double()
    with torch.no_grad():
        torch.testing.assert_close(head.combine(up, bp, None).double(), ref, atol=1e-5, rtol=1e-5)

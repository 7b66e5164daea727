"""Tests for kernels.rotary_attention: Triton kernel vs float64 reference vs torch_brain.

Without a GPU the kernels run on Triton's CPU interpreter (TRITON_INTERPRET=1,
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

from kernels import (  # noqa: E402
    pack_keys,
    rotary_cross_attention,
    rotary_cross_attention_reference,
    rotary_frequencies,
    rotary_self_attention,
    triton_available,
)
from nh_serve.core.rotary import rotary_attention  # noqa: E402
from nh_serve.errors import InputError  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
T_MIN, T_MAX = 1e-4, 2.0  # POYO-like periods: angles reach ~6e4 rad at t = 1 s
TOL = {torch.float32: dict(atol=2e-5, rtol=1e-5), torch.bfloat16: dict(atol=2e-2, rtol=2e-2)}

needs_triton = pytest.mark.skipif(not triton_available(), reason="triton is not installed")


def _inputs(*, seed, batch, n_q, lengths, heads, head_dim, dtype=torch.float32, shared_q_t=False):
    """Random padded inputs + key mask (True for the first lengths[b] keys of row b)."""
    g = torch.Generator().manual_seed(seed)
    n_k = max(max(lengths), 1)
    q = torch.randn(batch, n_q, heads, head_dim, generator=g)
    k = torch.randn(batch, n_k, heads, head_dim, generator=g)
    v = torch.randn(batch, n_k, heads, head_dim, generator=g)
    q_t = torch.rand(n_q if shared_q_t else (batch, n_q), generator=g)  # seconds in [0, 1)
    k_t = torch.rand(batch, n_k, generator=g)
    mask = torch.arange(n_k)[None, :] < torch.tensor(lengths)[:, None]
    freqs = rotary_frequencies(head_dim=head_dim, t_min=T_MIN, t_max=T_MAX)
    to = dict(device=DEVICE)
    return (
        q.to(dtype=dtype, **to),
        k.to(dtype=dtype, **to),
        v.to(dtype=dtype, **to),
        q_t.to(**to),
        k_t.to(**to),
        mask.to(**to),
        freqs.to(**to),
    )


def _oracle(q, k, v, q_t, k_t, freqs, **kw):
    """float64 reference on the (possibly bf16-rounded) inputs, on the CPU."""
    cpu = [x.cpu() for x in (q, k, v)]
    kw = {name: (val.cpu() if torch.is_tensor(val) else val) for name, val in kw.items()}
    return rotary_cross_attention_reference(
        *(x.double() for x in cpu), q_t.cpu(), k_t.cpu(), freqs.cpu(), **kw
    )


def _poisoned(shape, dtype):
    return torch.full(shape, float("nan"), dtype=dtype, device=DEVICE)


# ---------------------------------------------------------------------------
# The convention: frequencies and reference against torch_brain
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("head_dim,rotate_dim", [(16, 8), (32, 16), (64, 32), (64, 64), (24, 12)])
def test_frequencies_equal_torch_brain(head_dim, rotate_dim):
    from torch_brain.nn import RotaryTimeEmbedding

    ours = rotary_frequencies(head_dim=head_dim, rotate_dim=rotate_dim, t_min=T_MIN, t_max=T_MAX)
    theirs = RotaryTimeEmbedding(head_dim, rotate_dim, T_MIN, T_MAX).omega
    assert ours.dtype == torch.float32 and ours.shape == (head_dim // 2,)
    assert torch.equal(ours, theirs)
    assert torch.all(ours[rotate_dim // 2 :] == 0)


def test_frequencies_defaults_and_errors():
    f = rotary_frequencies(head_dim=8, t_min=0.5, t_max=2.0)  # rotate_dim = 4: two pairs
    assert torch.allclose(f, torch.tensor([2 * math.pi / 0.5, 2 * math.pi / 2.0, 0.0, 0.0]))
    with pytest.raises(InputError):
        rotary_frequencies(head_dim=8, t_min=2.0, t_max=1.0)
    with pytest.raises(InputError):
        rotary_frequencies(head_dim=7, t_min=0.1, t_max=1.0)


@pytest.mark.parametrize("rotate_value", [False, True])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-6), (torch.float32, 2e-5)])
def test_reference_matches_torch_brain(rotate_value, dtype, tol):
    """Our reference == torch_brain's rotary ops + SDPA (its RotaryCrossAttention math)."""
    from torch_brain.nn import RotaryTimeEmbedding
    from torch_brain.nn.rotary_attention import rotary_attn_pytorch_func

    B, n_q, n_k, H, Dh = 2, 6, 11, 2, 16
    g = torch.Generator().manual_seed(7)
    q = torch.randn(B, n_q, H * Dh, generator=g, dtype=dtype)
    k = torch.randn(B, n_k, H * Dh, generator=g, dtype=dtype)
    v = torch.randn(B, n_k, H * Dh, generator=g, dtype=dtype)
    q_t = torch.rand(B, n_q, generator=g)  # float32 seconds, as in the model
    k_t = torch.rand(B, n_k, generator=g)
    mask = torch.ones(B, n_k, dtype=torch.bool)
    mask[0, 8:] = False
    mask[1, ::3] = False
    emb = RotaryTimeEmbedding(Dh, Dh // 2, T_MIN, T_MAX)
    theirs = rotary_attn_pytorch_func(
        query=q,
        key=k,
        value=v,
        q_pos_emb=emb(q_t),
        kv_pos_emb=emb(k_t),
        attn_mask=mask,
        num_heads=H,
        dropout_p=0.0,
        rotate_value=rotate_value,
    )
    ours = rotary_cross_attention_reference(
        q.unflatten(-1, (H, Dh)),
        k.unflatten(-1, (H, Dh)),
        v.unflatten(-1, (H, Dh)),
        q_t,
        k_t,
        emb.omega,
        key_mask=mask,
        rotate_value=rotate_value,
    ).flatten(-2)
    assert torch.allclose(ours, theirs.to(dtype), atol=tol, rtol=tol)


def test_reference_hand_computed_single_key():
    """One key: softmax weight 1, so out = v, or R(k_t - q_t) v with value rotation."""
    Dh = 8
    freqs = torch.tensor([3.0, 0.5, 0.0, 0.0])
    q = torch.randn(1, 2, 1, Dh, dtype=torch.float64)
    v = torch.arange(1.0, Dh + 1, dtype=torch.float64).reshape(1, 1, 1, Dh)
    k = torch.randn(1, 1, 1, Dh, dtype=torch.float64)
    q_t = torch.tensor([[0.25, 1.0]])
    k_t = torch.tensor([[0.75]])
    plain = rotary_cross_attention_reference(q, k, v, q_t, k_t, freqs)
    assert torch.allclose(plain, v.expand(1, 2, 1, Dh))
    rot = rotary_cross_attention_reference(q, k, v, q_t, k_t, freqs, rotate_value=True)
    for i, tq in enumerate((0.25, 1.0)):
        a0, a1 = 3.0 * (0.75 - tq), 0.5 * (0.75 - tq)  # pair angles; pairs 2, 3 not rotated
        want = [
            1 * math.cos(a0) - 2 * math.sin(a0),
            2 * math.cos(a0) + 1 * math.sin(a0),
            3 * math.cos(a1) - 4 * math.sin(a1),
            4 * math.cos(a1) + 3 * math.sin(a1),
            5,
            6,
            7,
            8,
        ]
        assert torch.allclose(rot[0, i, 0], torch.tensor(want, dtype=torch.float64), atol=1e-6)


def test_reference_empty_rows_are_zero():
    q, k, v, q_t, k_t, mask, freqs = _inputs(seed=1, batch=2, n_q=3, lengths=[0, 4], heads=1, head_dim=16)
    out = _oracle(q, k, v, q_t, k_t, freqs, key_mask=mask, rotate_value=True)
    assert torch.isfinite(out).all()
    assert torch.all(out[0] == 0)


# ---------------------------------------------------------------------------
# The Triton kernel against the float64 reference
# ---------------------------------------------------------------------------

CASES = [
    # seed, batch, n_q, key lengths, heads, head_dim, rotate_value, splits
    pytest.param(101, 1, 7, [50], 1, 16, False, 1, id="b1-h1-d16"),
    pytest.param(102, 3, 13, [37, 0, 70], 2, 32, True, 1, id="b3-empty-row-rotv"),
    pytest.param(103, 3, 13, [37, 0, 70], 2, 32, True, 3, id="b3-empty-row-rotv-split3"),
    pytest.param(104, 2, 5, [1, 33], 2, 16, False, 4, id="split-more-than-blocks"),
    pytest.param(105, 1, 40, [65], 1, 24, True, 2, id="dh24-two-qblocks"),
]


@needs_triton
@pytest.mark.parametrize("seed,batch,n_q,lengths,heads,head_dim,rotate_value,splits", CASES)
@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_kernel_matches_reference_float32(
    seed, batch, n_q, lengths, heads, head_dim, rotate_value, splits, layout
):
    q, k, v, q_t, k_t, mask, freqs = _inputs(
        seed=seed, batch=batch, n_q=n_q, lengths=lengths, heads=heads, head_dim=head_dim
    )
    out = _poisoned(q.shape, q.dtype)
    if layout == "packed":
        cu, k_p, v_p, kt_p = pack_keys(mask, k, v, k_t)
        got = rotary_cross_attention(
            q,
            k_p,
            v_p,
            q_t,
            kt_p,
            freqs,
            cu_seqlens_k=cu,
            rotate_value=rotate_value,
            num_splits=splits,
            out=out,
            block_n=16,
        )
    else:
        got = rotary_cross_attention(
            q,
            k,
            v,
            q_t,
            k_t,
            freqs,
            key_mask=mask,
            rotate_value=rotate_value,
            num_splits=splits,
            out=out,
            block_n=16,
        )
    want = _oracle(q, k, v, q_t, k_t, freqs, key_mask=mask, rotate_value=rotate_value)
    assert got.data_ptr() == out.data_ptr()
    assert torch.isfinite(got).all(), "unwritten (NaN-poisoned) or NaN outputs"
    torch.testing.assert_close(got.cpu().double(), want, **TOL[torch.float32])
    for b, n in enumerate(lengths):
        if n == 0:
            assert torch.all(got[b] == 0)


@needs_triton
@pytest.mark.parametrize("rotate_value", [False, True])
def test_kernel_bfloat16(rotate_value):
    q, k, v, q_t, k_t, mask, freqs = _inputs(
        seed=11, batch=2, n_q=9, lengths=[45, 20], heads=2, head_dim=32, dtype=torch.bfloat16
    )
    out = _poisoned(q.shape, q.dtype)
    got = rotary_cross_attention(
        q, k, v, q_t, k_t, freqs, key_mask=mask, rotate_value=rotate_value, out=out, block_n=16, num_splits=2
    )
    assert got.dtype == torch.bfloat16 and torch.isfinite(got).all()
    want = _oracle(q, k, v, q_t, k_t, freqs, key_mask=mask, rotate_value=rotate_value)
    torch.testing.assert_close(got.cpu().double(), want, **TOL[torch.bfloat16])


@needs_triton
def test_kernel_mask_with_holes_and_shared_query_times():
    """Holes in the key mask (not just right padding), q_t (Nq,) shared across the batch."""
    q, k, v, q_t, k_t, _, freqs = _inputs(
        seed=5, batch=3, n_q=6, lengths=[41, 41, 41], heads=2, head_dim=16, shared_q_t=True
    )
    g = torch.Generator().manual_seed(3)
    mask = (torch.rand(3, 41, generator=g) > 0.4).to(DEVICE)
    mask[2] = False  # a row with every key masked
    out = _poisoned(q.shape, q.dtype)
    got = rotary_cross_attention(
        q, k, v, q_t, k_t, freqs, key_mask=mask, rotate_value=True, out=out, block_n=16
    )
    want = _oracle(q, k, v, q_t, k_t, freqs, key_mask=mask, rotate_value=True)
    torch.testing.assert_close(got.cpu().double(), want, **TOL[torch.float32])
    assert torch.all(got[2] == 0)
    # same keys packed: equal up to float rounding (block boundaries differ around holes)
    cu, k_p, v_p, kt_p = pack_keys(mask, k, v, k_t)
    packed = rotary_cross_attention(
        q, k_p, v_p, q_t, kt_p, freqs, cu_seqlens_k=cu, rotate_value=True, block_n=16
    )
    torch.testing.assert_close(packed, got, atol=1e-6, rtol=1e-6)


@needs_triton
@pytest.mark.parametrize("splits", [1, 2])
def test_padded_and_packed_are_identical(splits):
    """Right-padded + mask and packed inputs run the same key blocks: bit-identical."""
    q, k, v, q_t, k_t, mask, freqs = _inputs(
        seed=9, batch=3, n_q=5, lengths=[19, 50, 3], heads=1, head_dim=16
    )
    padded = rotary_cross_attention(
        q, k, v, q_t, k_t, freqs, key_mask=mask, rotate_value=True, num_splits=splits, block_n=16
    )
    cu, k_p, v_p, kt_p = pack_keys(mask, k, v, k_t)
    packed = rotary_cross_attention(
        q, k_p, v_p, q_t, kt_p, freqs, cu_seqlens_k=cu, rotate_value=True, num_splits=splits, block_n=16
    )
    assert torch.equal(padded, packed)


@needs_triton
def test_packed_key_mask_and_strided_kv_views():
    """k, v as non-contiguous views of one fused kv projection; a packed key mask."""
    g = torch.Generator().manual_seed(21)
    B, n_q, H, Dh, lengths = 2, 4, 2, 16, [23, 17]
    total = sum(lengths)
    kv = torch.randn(total, 2, H, Dh, generator=g).to(DEVICE)  # like to_kv(x).unflatten(...)
    k_p, v_p = kv[:, 0], kv[:, 1]
    assert not k_p.is_contiguous()
    q = torch.randn(B, n_q, H, Dh, generator=g).to(DEVICE)
    q_t = torch.rand(B, n_q, generator=g).to(DEVICE)
    kt_p = torch.rand(total, generator=g).to(DEVICE)
    key_on = (torch.rand(total, generator=g) > 0.3).to(DEVICE)
    cu = torch.tensor([0, lengths[0], total], dtype=torch.int32, device=DEVICE)
    freqs = rotary_frequencies(head_dim=Dh, t_min=T_MIN, t_max=T_MAX).to(DEVICE)
    out = _poisoned((B, n_q, H, Dh), torch.float32)
    got = rotary_cross_attention(
        q, k_p, v_p, q_t, kt_p, freqs, cu_seqlens_k=cu, key_mask=key_on, out=out, block_n=16
    )
    # padded equivalent for the reference
    n_k = max(lengths)
    k_pad = torch.zeros(B, n_k, H, Dh, device=DEVICE)
    v_pad, kt_pad = torch.zeros_like(k_pad), torch.zeros(B, n_k, device=DEVICE)
    m_pad = torch.zeros(B, n_k, dtype=torch.bool, device=DEVICE)
    for b in range(B):
        s, e = cu[b].item(), cu[b + 1].item()
        k_pad[b, : e - s], v_pad[b, : e - s], kt_pad[b, : e - s] = k_p[s:e], v_p[s:e], kt_p[s:e]
        m_pad[b, : e - s] = key_on[s:e]
    want = _oracle(q, k_pad, v_pad, q_t, kt_pad, freqs, key_mask=m_pad)
    torch.testing.assert_close(got.cpu().double(), want, **TOL[torch.float32])


@needs_triton
def test_all_keys_empty_gives_zeros():
    q, k, v, q_t, k_t, _, freqs = _inputs(seed=4, batch=2, n_q=3, lengths=[1, 1], heads=1, head_dim=16)
    cu = torch.zeros(3, dtype=torch.int64, device=DEVICE)
    empty = k[:, :0].reshape(0, 1, 16)
    out = _poisoned(q.shape, q.dtype)
    got = rotary_cross_attention(q, empty, empty, q_t, k_t[:, :0].reshape(0), freqs, cu_seqlens_k=cu, out=out)
    assert torch.equal(got, torch.zeros_like(got))


@needs_triton
@pytest.mark.parametrize("rotate_value", [False, True])
def test_causal_self_attention(rotate_value):
    B, N, H, Dh = 2, 21, 2, 16
    q, k, v, t, _, _, freqs = _inputs(seed=13, batch=B, n_q=N, lengths=[N, N], heads=H, head_dim=Dh)
    t_sorted = torch.sort(t, dim=1).values
    mask = torch.ones(B, N, dtype=torch.bool, device=DEVICE)
    mask[1, 15:] = False  # right padding in row 1
    out = _poisoned(q.shape, q.dtype)
    got = rotary_self_attention(
        q,
        k,
        v,
        t_sorted,
        freqs,
        key_mask=mask,
        causal=True,
        rotate_value=rotate_value,
        out=out,
        block_m=16,
        block_n=16,
    )
    want = _oracle(q, k, v, t_sorted, t_sorted, freqs, key_mask=mask, causal=True, rotate_value=rotate_value)
    torch.testing.assert_close(got.cpu().double(), want, **TOL[torch.float32])


@needs_triton
def test_time_shift_invariance():
    """Scores depend on time differences only: shifting every time by 5 s keeps the output."""
    q, k, v, q_t, k_t, mask, _ = _inputs(seed=17, batch=1, n_q=4, lengths=[30], heads=1, head_dim=16)
    freqs = rotary_frequencies(head_dim=16, t_min=0.5, t_max=4.0).to(
        DEVICE
    )  # small angles: little float32 phase error
    a = rotary_cross_attention(q, k, v, q_t, k_t, freqs, rotate_value=True, block_n=16)
    b = rotary_cross_attention(q, k, v, q_t + 5.0, k_t + 5.0, freqs, rotate_value=True, block_n=16)
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_bad_inputs_raise_input_error():
    q, k, v, q_t, k_t, mask, freqs = _inputs(seed=2, batch=2, n_q=3, lengths=[4, 4], heads=1, head_dim=16)
    with pytest.raises(InputError, match="freqs"):
        rotary_cross_attention(q, k, v, q_t, k_t, freqs[:3])
    with pytest.raises(InputError, match="k_t"):
        rotary_cross_attention(q, k, v, q_t, k_t[:, :2], freqs)
    with pytest.raises(InputError, match="dtypes"):
        rotary_cross_attention(q, k.double(), v, q_t, k_t, freqs)
    with pytest.raises(InputError, match="key_mask"):
        rotary_cross_attention(q, k, v, q_t, k_t, freqs, key_mask=mask.int())
    with pytest.raises(InputError, match="cu_seqlens_k"):
        rotary_cross_attention(
            q,
            k.reshape(8, 1, 16),
            v.reshape(8, 1, 16),
            q_t,
            k_t.reshape(8),
            freqs,
            cu_seqlens_k=torch.tensor([0, 8], device=DEVICE),
        )
    with pytest.raises(InputError, match="out"):
        rotary_cross_attention(q, k, v, q_t, k_t, freqs, out=torch.empty(1, device=DEVICE))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-interpreter path")
def test_interpreter_works_when_triton_was_imported_first():
    """torch._dynamo / torch_brain import Triton early, before TRITON_INTERPRET may be set:
    the kernels must still run on the interpreter (they use no GPU-only Triton helpers)."""
    import subprocess

    code = (
        "import os, torch, triton.language\n"
        "os.environ['TRITON_INTERPRET'] = '1'\n"
        "from kernels.bench import interpreter_smoke_check\n"
        "lines = interpreter_smoke_check()\n"
        "print('\\n'.join(lines))\n"
        "assert all(line.endswith('ok') for line in lines), lines\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(_ROOT), env.get("PYTHONPATH", "")])
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=_ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


@needs_triton
@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_kernel_gathers_keys_from_a_table(layout):
    """kv_index: key n reads row kv_index[n] of the (unit, token type) table, as in the model's encoder."""
    g = torch.Generator().manual_seed(31)
    B, n_q, H, Dh, M, lengths = 2, 6, 2, 16, 7, [29, 12]
    n_k = max(lengths)
    q = torch.randn(B, n_q, H, Dh, generator=g).to(DEVICE)
    k_table = torch.randn(B, M, H, Dh, generator=g).to(DEVICE)
    v_table = torch.randn(B, M, H, Dh, generator=g).to(DEVICE)
    q_t = torch.rand(B, n_q, generator=g).to(DEVICE)
    k_t = torch.rand(B, n_k, generator=g).to(DEVICE)
    index = torch.randint(0, M, (B, n_k), generator=g).to(DEVICE)
    mask = (torch.arange(n_k)[None, :] < torch.tensor(lengths)[:, None]).to(DEVICE)
    freqs = rotary_frequencies(head_dim=Dh, t_min=T_MIN, t_max=T_MAX).to(DEVICE)
    out = _poisoned(q.shape, q.dtype)
    if layout == "padded":
        got = rotary_cross_attention(
            q, k_table, v_table, q_t, k_t, freqs, key_mask=mask, kv_index=index, rotate_value=True, out=out,
            block_n=16,
        )  # fmt: skip
    else:  # one table for the whole batch: batch b's rows start at b * M
        cu, kt_p, idx_p = pack_keys(mask, k_t, index + M * torch.arange(B, device=DEVICE)[:, None])
        got = rotary_cross_attention(
            q, k_table.reshape(B * M, H, Dh), v_table.reshape(B * M, H, Dh), q_t, kt_p, freqs,
            cu_seqlens_k=cu, kv_index=idx_p, rotate_value=True, out=out, block_n=16, num_splits=2,
        )  # fmt: skip
    want = _oracle(
        q, k_table, v_table, q_t, k_t, freqs, key_mask=mask, kv_index=index.cpu(), rotate_value=True
    )
    torch.testing.assert_close(got.cpu().double(), want, **TOL[torch.float32])


@needs_triton
@pytest.mark.parametrize("rotate_value,causal", [(True, False), (False, True)])
def test_kernel_matches_model_rotary_attention(rotate_value, causal):
    """Same result as the model's pure PyTorch rotary_attention (head-major layout via views)."""
    B, N, H, Dh = 2, 19, 2, 16
    q, k, v, t, _, _, freqs = _inputs(seed=41, batch=B, n_q=N, lengths=[N, N], heads=H, head_dim=Dh)
    mask = torch.ones(B, N, dtype=torch.bool, device=DEVICE)
    mask[0, 11:] = False
    qh, kh, vh = (x.transpose(1, 2) for x in (q, k, v))  # the model's (B, H, N, Dh)
    want = rotary_attention(
        qh, kh, vh, t, t, freqs, key_mask=mask, rotate_value=rotate_value, causal=causal
    )  # (B, H, N, Dh)
    got = rotary_cross_attention(
        qh.transpose(1, 2), kh.transpose(1, 2), vh.transpose(1, 2), t, t, freqs, key_mask=mask,
        rotate_value=rotate_value, causal=causal, block_m=16, block_n=16,
    ).transpose(1, 2)  # fmt: skip
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5)

"""Rotary time embedding and rotary attention: parity with torch_brain, masks, causality."""

from __future__ import annotations

import math

import pytest
import torch

from nh_serve.core.rotary import (
    RotaryCrossAttention,
    RotarySelfAttention,
    apply_rotary,
    rotary_attention,
    rotary_freqs,
    rotate_pairs,
    split_heads,
)

tb_nn = pytest.importorskip("torch_brain.nn", reason="torch_brain is the reference implementation")

ATOL = 1e-5


def _times(gen: torch.Generator, *shape: int, span: float = 2.0) -> torch.Tensor:
    return torch.rand(*shape, generator=gen) * span


@pytest.mark.parametrize(
    ("head_dim", "rotate_dim", "t_min", "t_max"),
    [(16, 8, 1e-3, 4.0), (64, 32, 1e-4, 2.0627), (8, 8, 0.01, 1.0)],
)
def test_freqs_match_torch_brain(head_dim, rotate_dim, t_min, t_max):
    ref = tb_nn.RotaryTimeEmbedding(head_dim=head_dim, rotate_dim=rotate_dim, t_min=t_min, t_max=t_max)
    ours = rotary_freqs(head_dim=head_dim, rotate_dim=rotate_dim, t_min=t_min, t_max=t_max)
    assert ours.shape == (head_dim // 2,)
    torch.testing.assert_close(ours, ref.omega, rtol=0, atol=0)
    # periods are log-spaced and inclusive of both ends
    periods = 2 * math.pi / ours[: rotate_dim // 2]
    assert periods[0].item() == pytest.approx(t_min, rel=1e-5)
    assert periods[-1].item() == pytest.approx(t_max, rel=1e-5)
    assert torch.all(ours[rotate_dim // 2 :] == 0)



@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_rotate_pairs_eager_and_scripted_forms_agree(dtype):
    """The eager complex product and the real-valued form TorchScript / ONNX trace give the same rotation,
    on a strided (non-contiguous) input with broadcast angles."""
    gen = torch.Generator().manual_seed(3)
    kv = torch.randn(3, 7, 2 * 2 * 6, generator=gen, dtype=torch.float64).to(dtype)  # (B, N, 2 H Dh)
    x = kv[..., :12].unflatten(-1, (2, 6)).transpose(1, 2)  # (B, H, N, Dh) view, odd N
    angles = torch.rand(3, 1, 7, 3, generator=gen, dtype=torch.float64) * 20.0  # (B, 1, N, Dh / 2)
    cos, sin = torch.cos(angles), torch.sin(angles)
    eager = rotate_pairs(x, cos, sin)
    scripted = torch.jit.script(rotate_pairs)(x, cos, sin)
    x64 = x.double()
    even, odd = x64[..., 0::2], x64[..., 1::2]
    ref = torch.stack((even * cos - odd * sin, odd * cos + even * sin), dim=-1).flatten(-2)  # float64
    assert eager.dtype == dtype and eager.shape == x.shape
    tol = 1e-6 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(eager.double(), ref, rtol=0, atol=tol)
    torch.testing.assert_close(scripted.double(), ref, rtol=0, atol=tol)
    # a view starting at an odd offset cannot be read as complex numbers in place: it is copied first
    odd_view = kv[..., 1:13].unflatten(-1, (2, 6)).transpose(1, 2)
    o64 = odd_view.double()
    want = torch.stack((o64[..., 0::2] * cos - o64[..., 1::2] * sin, o64[..., 1::2] * cos + o64[..., 0::2] * sin), -1)
    torch.testing.assert_close(rotate_pairs(odd_view, cos, sin).double(), want.flatten(-2), rtol=0, atol=tol)


def test_rotary_attention_eager_and_scripted_agree():
    """rotary_attention in eager mode (keys and values share one complex rotation) gives the scripted
    (real-valued) form's output, with value rotation, a key mask and strided head views."""
    gen = torch.Generator().manual_seed(8)
    B, H, Nq, Nk, Dh = 2, 2, 5, 23, 8
    q = torch.randn(B, Nq, H * Dh, generator=gen).unflatten(-1, (H, Dh)).transpose(1, 2)
    kv = torch.randn(B, Nk, 2 * H * Dh, generator=gen)
    k = kv[..., : H * Dh].unflatten(-1, (H, Dh)).transpose(1, 2)
    v = kv[..., H * Dh :].unflatten(-1, (H, Dh)).transpose(1, 2)
    q_t, k_t = torch.rand(B, Nq, generator=gen), torch.rand(B, Nk, generator=gen)
    freqs = rotary_freqs(head_dim=Dh, t_min=1e-3, t_max=4.0)
    mask = torch.rand(B, Nk, generator=gen) > 0.3
    args = (q, k, v, q_t, k_t, freqs)
    for rotate_value in (True, False):
        kw = dict(key_mask=mask, rotate_value=rotate_value, causal=False)
        eager = rotary_attention(*args, **kw)
        scripted = torch.jit.script(rotary_attention)(*args, **kw)
        torch.testing.assert_close(eager, scripted, rtol=1e-5, atol=1e-6)


def test_apply_rotary_matches_torch_brain():
    gen = torch.Generator().manual_seed(0)
    B, H, N, Dh = 2, 3, 17, 16
    emb = tb_nn.RotaryTimeEmbedding(head_dim=Dh, rotate_dim=Dh // 2, t_min=1e-3, t_max=4.0)
    freqs = rotary_freqs(head_dim=Dh, t_min=1e-3, t_max=4.0)
    x = torch.randn(B, H, N, Dh, generator=gen)
    t = _times(gen, B, N)
    ref = tb_nn.RotaryTimeEmbedding.rotate(x, emb(t), unsqueeze_dim=1)
    ours = apply_rotary(x, t.unsqueeze(1), freqs)
    torch.testing.assert_close(ours, ref, rtol=0, atol=ATOL)


def test_apply_rotary_hand_example():
    # Dh = 4, one rotated pair with period t_min = 1 s; t = 0.25 s is a quarter turn.
    freqs = rotary_freqs(head_dim=4, rotate_dim=2, t_min=1.0, t_max=2.0)
    assert freqs.tolist() == pytest.approx([2 * math.pi, 0.0])
    x = torch.tensor([1.0, 0.0, 5.0, 6.0])
    out = apply_rotary(x, torch.tensor(0.25), freqs)
    torch.testing.assert_close(out, torch.tensor([0.0, 1.0, 5.0, 6.0]), atol=1e-6, rtol=0)
    # undoing with -t returns the input
    torch.testing.assert_close(apply_rotary(out, torch.tensor(-0.25), freqs), x, atol=1e-6, rtol=0)


def test_scores_depend_on_relative_time_only():
    gen = torch.Generator().manual_seed(1)
    freqs = rotary_freqs(head_dim=16, t_min=1e-2, t_max=4.0)
    q, k = torch.randn(16, generator=gen), torch.randn(16, generator=gen)
    s1 = apply_rotary(q, torch.tensor(0.3), freqs) @ apply_rotary(k, torch.tensor(0.1), freqs)
    s2 = apply_rotary(q, torch.tensor(1.7), freqs) @ apply_rotary(k, torch.tensor(1.5), freqs)
    s3 = apply_rotary(q, torch.tensor(1.7), freqs) @ apply_rotary(k, torch.tensor(1.4), freqs)
    # float32 angles (up to ~1000 rad here) limit the agreement to ~1e-3
    assert s1.item() == pytest.approx(s2.item(), abs=2e-3)
    assert abs(s1.item() - s3.item()) > 2e-2


def _key_mask(gen: torch.Generator, B: int, N: int) -> torch.Tensor:
    mask = torch.rand(B, N, generator=gen) > 0.3
    mask[:, 0] = True  # every row keeps at least one key (torch_brain would give NaN otherwise)
    mask[-1, N // 2 :] = False  # padding at the end of the last batch element
    return mask


@pytest.mark.parametrize("rotate_value", [False, True])
@pytest.mark.parametrize("use_mask", [False, True])
def test_cross_attention_matches_torch_brain(rotate_value, use_mask):
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(2)
    dim, context_dim, heads, dim_head = 24, 20, 2, 16
    ref = tb_nn.RotaryCrossAttention(
        dim=dim,
        context_dim=context_dim,
        heads=heads,
        dim_head=dim_head,
        rotate_value=rotate_value,
        use_xformers=False,
    ).eval()
    ours = RotaryCrossAttention(
        dim=dim, context_dim=context_dim, heads=heads, dim_head=dim_head, rotate_value=rotate_value
    )
    ours.load_state_dict(ref.state_dict())  # same parameter names and layout
    emb = tb_nn.RotaryTimeEmbedding(head_dim=dim_head, rotate_dim=dim_head // 2, t_min=1e-3, t_max=4.0)
    freqs = rotary_freqs(head_dim=dim_head, t_min=1e-3, t_max=4.0)

    B, Nq, Nk = 3, 9, 31
    x = torch.randn(B, Nq, dim, generator=gen)
    ctx = torch.randn(B, Nk, context_dim, generator=gen)
    xt, ct = _times(gen, B, Nq), _times(gen, B, Nk)
    mask = _key_mask(gen, B, Nk) if use_mask else None
    with torch.no_grad():
        expected = ref(x, ctx, emb(xt), emb(ct), mask)
        got = ours(x, ctx, xt, ct, freqs, mask)
    torch.testing.assert_close(got, expected, rtol=0, atol=ATOL)


@pytest.mark.parametrize("rotate_value", [False, True])
def test_self_attention_matches_torch_brain(rotate_value):
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(3)
    dim, heads, dim_head = 32, 4, 8
    ref = tb_nn.RotarySelfAttention(
        dim=dim, heads=heads, dim_head=dim_head, rotate_value=rotate_value, use_xformers=False
    ).eval()
    ours = RotarySelfAttention(dim=dim, heads=heads, dim_head=dim_head, rotate_value=rotate_value)
    ours.load_state_dict(ref.state_dict())
    emb = tb_nn.RotaryTimeEmbedding(head_dim=dim_head, rotate_dim=dim_head // 2, t_min=1e-3, t_max=4.0)
    freqs = rotary_freqs(head_dim=dim_head, t_min=1e-3, t_max=4.0)
    B, N = 2, 13
    x = torch.randn(B, N, dim, generator=gen)
    t = _times(gen, B, N)
    mask = _key_mask(gen, B, N)
    with torch.no_grad():
        expected = ref(x, emb(t), mask)
        got = ours(x, t, freqs, mask)
    torch.testing.assert_close(got, expected, rtol=0, atol=ATOL)


def test_fully_masked_rows_give_zeros_not_nan():
    gen = torch.Generator().manual_seed(4)
    B, H, Nq, Nk, Dh = 2, 2, 5, 7, 8
    freqs = rotary_freqs(head_dim=Dh, t_min=1e-3, t_max=4.0)
    q = torch.randn(B, H, Nq, Dh, generator=gen, requires_grad=True)
    k = torch.randn(B, H, Nk, Dh, generator=gen)
    v = torch.randn(B, H, Nk, Dh, generator=gen)
    qt, kt = _times(gen, B, Nq), _times(gen, B, Nk)
    mask = torch.ones(B, Nk, dtype=torch.bool)
    mask[1] = False  # batch element 1 has no keys at all
    out = rotary_attention(q, k, v, qt, kt, freqs, key_mask=mask, rotate_value=True, causal=False)
    assert torch.isfinite(out).all()
    assert torch.all(out[1] == 0)
    assert out[0].abs().sum() > 0
    out.sum().backward()
    assert torch.isfinite(q.grad).all()

    # the module skips the whole residual update (no output bias) for such rows
    attn = RotaryCrossAttention(dim=16, heads=2, dim_head=8, rotate_value=True)
    x, ctx = torch.randn(B, Nq, 16, generator=gen), torch.randn(B, Nk, 16, generator=gen)
    upd = attn(x, ctx, qt, kt, freqs, mask)
    assert torch.isfinite(upd).all()
    assert torch.all(upd[1] == 0)
    # and element 0 is unaffected by element 1 being empty
    torch.testing.assert_close(
        upd[:1], attn(x[:1], ctx[:1], qt[:1], kt[:1], freqs, mask[:1]), rtol=0, atol=1e-6
    )


def test_causal_masks_future_keys():
    gen = torch.Generator().manual_seed(5)
    B, H, N, Dh = 1, 2, 6, 8
    freqs = rotary_freqs(head_dim=Dh, t_min=1e-3, t_max=4.0)
    q, k, v = (torch.randn(B, H, N, Dh, generator=gen) for _ in range(3))
    t = torch.arange(N, dtype=torch.float32)[None] * 0.02
    out = rotary_attention(q, k, v, t, t, freqs, key_mask=None, rotate_value=False, causal=True)
    k2, v2 = k.clone(), v.clone()
    k2[:, :, 3:] += 5.0
    v2[:, :, 3:] -= 5.0
    out2 = rotary_attention(q, k2, v2, t, t, freqs, key_mask=None, rotate_value=False, causal=True)
    torch.testing.assert_close(out[:, :, :3], out2[:, :, :3], rtol=0, atol=1e-6)
    assert not torch.allclose(out[:, :, 3:], out2[:, :, 3:])
    # first query sees only the first key: output is exactly its value
    torch.testing.assert_close(out[:, :, 0], v[:, :, 0], rtol=0, atol=1e-6)
    # causal + key mask where row 0's only key is masked -> zeros, not NaN
    mask = torch.ones(B, N, dtype=torch.bool)
    mask[:, 0] = False
    out3 = rotary_attention(q, k, v, t, t, freqs, key_mask=mask, rotate_value=False, causal=True)
    assert torch.isfinite(out3).all() and torch.all(out3[:, :, 0] == 0)


def test_rotary_attention_matches_explicit_softmax():
    gen = torch.Generator().manual_seed(6)
    B, H, Nq, Nk, Dh = 1, 1, 3, 4, 8
    freqs = rotary_freqs(head_dim=Dh, t_min=1e-2, t_max=4.0)
    q, k, v = (
        torch.randn(B, H, Nq, Dh, generator=gen),
        torch.randn(B, H, Nk, Dh, generator=gen),
        torch.randn(B, H, Nk, Dh, generator=gen),
    )
    qt, kt = _times(gen, B, Nq), _times(gen, B, Nk)
    mask = torch.tensor([[True, False, True, True]])
    qr, kr, vr = (
        apply_rotary(q, qt[:, None], freqs),
        apply_rotary(k, kt[:, None], freqs),
        apply_rotary(v, kt[:, None], freqs),
    )
    scores = (qr @ kr.transpose(-1, -2)) / math.sqrt(Dh)
    scores = scores.masked_fill(~mask[:, None, None, :], float("-inf"))
    expected = apply_rotary(torch.softmax(scores, -1) @ vr, -qt[:, None], freqs)
    got = rotary_attention(q, k, v, qt, kt, freqs, key_mask=mask, rotate_value=True, causal=False)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")
def test_torchscript_matches_eager():
    gen = torch.Generator().manual_seed(7)
    freqs = rotary_freqs(head_dim=8, t_min=1e-3, t_max=4.0)
    q = split_heads(torch.randn(2, 5, 16, generator=gen), 2)
    k = split_heads(torch.randn(2, 7, 16, generator=gen), 2)
    qt, kt = _times(gen, 2, 5), _times(gen, 2, 7)
    mask = torch.ones(2, 7, dtype=torch.bool)
    mask[0, 4:] = False
    scripted = torch.jit.script(rotary_attention)
    for rv, causal in [(True, False), (False, True)]:
        a = rotary_attention(q, k, k, qt, kt, freqs, key_mask=mask, rotate_value=rv, causal=causal)
        b = scripted(q, k, k, qt, kt, freqs, key_mask=mask, rotate_value=rv, causal=causal)
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    attn = torch.jit.script(RotaryCrossAttention(dim=16, heads=2, dim_head=8, rotate_value=True))
    assert attn(torch.randn(2, 5, 16), torch.randn(2, 7, 16), qt, kt, freqs, mask).shape == (2, 5, 16)


def test_freqs_validation():
    with pytest.raises(ValueError, match="even"):
        rotary_freqs(head_dim=10, rotate_dim=5, t_min=1e-3, t_max=1.0)
    with pytest.raises(ValueError, match="t_min"):
        rotary_freqs(head_dim=8, t_min=1.0, t_max=1.0)


def test_forward_indexed_equals_forward_on_gathered_context():
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(8)
    attn = RotaryCrossAttention(dim=16, heads=2, dim_head=8, rotate_value=True)
    freqs = rotary_freqs(head_dim=8, t_min=1e-3, t_max=4.0)
    B, M, Nk, Nq = 2, 5, 23, 4
    table = torch.randn(B, M, 16, generator=gen)
    index = torch.randint(0, M, (B, Nk), generator=gen)
    context = torch.stack([table[b, index[b]] for b in range(B)])  # (B, Nk, 16)
    x, xt, ct = torch.randn(B, Nq, 16, generator=gen), _times(gen, B, Nq), _times(gen, B, Nk)
    mask = _key_mask(gen, B, Nk)
    with torch.no_grad():
        expected = attn(x, context, xt, ct, freqs, mask)
        got = attn.forward_indexed(x, table, index, xt, ct, freqs, mask)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)

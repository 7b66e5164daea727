"""Rotary-time cross-attention: a fused Triton kernel and its PyTorch reference.

Convention (identical to torch_brain ``RotaryTimeEmbedding`` +
``rotary_attn_pytorch_func``):

- ``freqs`` (Dh // 2,) float32 holds one angular frequency (rad / s) per
  *interleaved* pair of head dimensions ``(x[2i], x[2i + 1])``; pairs that are
  not rotated have frequency 0. This is exactly torch_brain's
  ``RotaryTimeEmbedding(head_dim, rotate_dim, t_min, t_max).omega`` buffer, and
  :func:`rotary_frequencies` (the model's :func:`nh_serve.core.rotary.rotary_freqs`) builds it (periods
  log-spaced between ``t_min`` and ``t_max``, both inclusive; only the first
  ``rotate_dim`` dims rotated, torch_brain's and the model's
  ``rotate_dim = head_dim // 2``).
- A token at time ``t`` (seconds) rotates pair ``i`` by the angle
  ``t * freqs[i]``, computed as a float32 product (timestamps are cast to
  float32, as torch_brain computes its angles in float32):
  ``out[2i] = x[2i] cos - x[2i+1] sin``, ``out[2i+1] = x[2i+1] cos + x[2i] sin``.
- Queries are rotated by their time ``q_t``, keys by ``k_t``; with
  ``rotate_value=True`` values are rotated by ``k_t`` and the attention output
  is rotated back by ``-q_t`` (POYO / torch_brain ``rotate_value=True``).
- ``softmax_scale`` defaults to ``1 / sqrt(Dh)``. ``key_mask`` is True where a
  key takes part (torch_brain's ``context_mask`` convention).
- A query with no key to attend to (an empty context, or every key masked)
  gets an output of zeros, never NaN. (PyTorch's SDPA returns NaN there.)
- ``causal=True`` (self-attention use, :func:`rotary_self_attention`): query i
  sees the keys whose position within its row is <= i (top-left aligned, as
  the model's ``nh_serve.core.rotary.rotary_attention``).
- bf16 / fp16 inputs are rotated in float32 and rounded once for the dots;
  torch_brain rotates in the input dtype, so the two agree to bf16 rounding.

Layouts (B batch, Nq queries, H heads, Dh head dim; any strides with a
contiguous last dimension, so views such as ``to_kv(x).chunk(2, -1)`` reshaped
to heads need no copy):

- ``q``: (B, Nq, H, Dh) padded (the latents are a fixed count);
  ``q_t``: (B, Nq) or (Nq,) shared by the batch, seconds.
- keys, packed (variable length, no work on padding):
  ``k``, ``v``: (total_k, H, Dh); ``k_t``: (total_k,);
  ``cu_seqlens_k``: (B + 1,) int, ``cu_seqlens_k[b]:cu_seqlens_k[b + 1]`` are
  batch element b's keys; optional ``key_mask`` (total_k,) bool.
- keys, padded: ``k``, ``v``: (B, Nk, H, Dh); ``k_t``: (B, Nk); optional
  ``key_mask`` (B, Nk) bool. The kernel skips each row's trailing padding
  (after its last True) and masks holes in-kernel, so right-padded batches do
  no work on padding and give bit-identical results to the packed form.
- keys gathered from a table (``kv_index``, shaped like ``k_t``): key n reads
  row ``kv_index[n]`` of ``k`` / ``v``, which are then tables (M, H, Dh)
  packed or (B, M, H, Dh) padded. The model's spike tokens take their content
  from a few (unit, token type) rows, so the (tokens, H, Dh) keys and values
  never need to be gathered in memory.
- output: (B, Nq, H, Dh) in q's dtype (``out=`` may supply the buffer). The
  model's head-major (B, H, N, Dh) tensors are valid inputs as
  ``x.transpose(1, 2)`` views.

Kernel: one program per (block of BLOCK_M queries, batch x head, key split).
Each program rotates its query tile once, then streams key/value blocks,
rotating them in registers from ``k_t`` and ``freqs`` (no cos/sin tables, no
rotated copies of q, k or v in memory) with an online softmax (the attention
matrix never exists). When there are too few (query block, batch, head)
programs to fill the GPU (serving: batch 1, 128 latents, thousands of spike
tokens) the keys of each row are split across programs (flash-decoding) and a
second small kernel merges the partial results. Float32 inputs use IEEE fp32
dots (``allow_tf32=True`` trades accuracy for speed); bf16 / fp16 inputs use
tensor-core dots on the rotated tiles; softmax statistics and accumulators are
float32 in every case.
"""

from __future__ import annotations

import math

import torch

from kernels.jit import check_launchable, lazy_jit, materialize_jit
from nh_serve.core.rotary import rotary_freqs as rotary_frequencies  # the model's function (one copy)
from nh_serve.errors import InputError

__all__ = [
    "pack_keys",
    "rotary_cross_attention",
    "rotary_cross_attention_reference",
    "rotary_frequencies",
    "rotary_self_attention",
]

tl = None  # triton.language, bound by materialize_jit() at first launch
triton = None  # the triton module, bound by materialize_jit()

_LOG2E = 1.4426950408889634
_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


# ---------------------------------------------------------------------------
# Frequencies (torch_brain's formula)
# ---------------------------------------------------------------------------


def pack_keys(key_mask: torch.Tensor, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Padded (B, Nk, ...) tensors + (B, Nk) bool mask -> (cu_seqlens_k, packed tensors...).

    Keeps the True positions of every row in order: each packed tensor is
    (total_k, ...) and ``cu_seqlens_k`` (B + 1,) int32. Synchronises with the
    device (the total is data dependent); the kernel itself does not need this
    since it accepts padded keys with a mask directly.
    """
    if key_mask.dtype != torch.bool or key_mask.ndim != 2:
        raise InputError(
            f"key_mask must be a (B, Nk) bool tensor, got {tuple(key_mask.shape)} {key_mask.dtype}"
        )
    lengths = key_mask.sum(dim=1)  # (B,)
    cu = torch.zeros(key_mask.shape[0] + 1, dtype=torch.int32, device=key_mask.device)
    cu[1:] = torch.cumsum(lengths, 0)
    packed = []
    for t in tensors:
        if tuple(t.shape[:2]) != tuple(key_mask.shape):
            raise InputError(
                f"tensor of shape {tuple(t.shape)} does not match key_mask {tuple(key_mask.shape)}"
            )
        packed.append(t[key_mask])
    return (cu, *packed)


# ---------------------------------------------------------------------------
# Triton kernels
# ---------------------------------------------------------------------------


@lazy_jit
def _rotate_pairs(x, cos, sin, ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
    """Rotate the interleaved pairs of a (ROWS, BLOCK_D) tile; cos, sin: (ROWS, BLOCK_D // 2).

    torch_brain's ``x * cos + rotate_half(x) * sin`` with angles repeated per pair.
    """
    x_even, x_odd = tl.split(tl.reshape(x, (ROWS, BLOCK_D // 2, 2)))
    out_even = x_even * cos - x_odd * sin
    out_odd = x_odd * cos + x_even * sin
    return tl.reshape(tl.join(out_even, out_odd), (ROWS, BLOCK_D))


@lazy_jit
def _store_attention_rows(
    acc,
    l_i,
    omega,
    QT,
    OUT,
    b,
    h,
    offs_m,
    offs_d,
    n_q,
    head_dim,
    stride_qtb,
    stride_qtm,
    stride_ob,
    stride_om,
    stride_oh,
    ROTATE_VALUE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Normalise (rows without keys -> 0), de-rotate by -q_t if asked, store in OUT's dtype."""
    has_keys = l_i > 0.0
    o = tl.where(has_keys[:, None], acc / tl.where(has_keys, l_i, 1.0)[:, None], 0.0)
    m_ok = offs_m < n_q
    if ROTATE_VALUE:
        qt = tl.load(QT + b * stride_qtb + offs_m * stride_qtm, mask=m_ok, other=0.0).to(tl.float32)
        angle = qt[:, None] * omega[None, :]  # (BLOCK_M, BLOCK_D // 2) rad
        o = _rotate_pairs(o, tl.cos(angle), -tl.sin(angle), BLOCK_M, BLOCK_D)
    o_ptrs = OUT + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :]
    tl.store(o_ptrs, o.to(OUT.dtype.element_ty), mask=m_ok[:, None] & (offs_d[None, :] < head_dim))


@lazy_jit
def _rotary_cross_attention_fwd_kernel(
    Q,
    K,
    V,
    QT,
    KT,
    FREQS,
    KMASK,
    KV_INDEX,
    SEQ_START,
    SEQ_END,
    OUT,
    WS_ACC,
    WS_M,
    WS_L,
    n_batch,
    n_q,
    n_heads,
    head_dim,
    num_splits,
    qk_scale,
    stride_qb,
    stride_qm,
    stride_qh,
    stride_qtb,
    stride_qtm,
    stride_kb,
    stride_kn,
    stride_kh,
    stride_vb,
    stride_vn,
    stride_vh,
    stride_ktb,
    stride_ktn,
    stride_mb,
    stride_mn,
    stride_ib,
    stride_in,
    stride_ob,
    stride_om,
    stride_oh,
    HAS_MASK: tl.constexpr,
    HAS_INDEX: tl.constexpr,
    ROTATE_VALUE: tl.constexpr,
    CAUSAL: tl.constexpr,
    SPLIT: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    DOT_F32: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """One (query block, batch x head, key split): rotary attention with online softmax.

    Keys of batch element b are the tokens SEQ_START[b] <= n < SEQ_END[b]: time
    KT[b * stride_ktb + n * stride_ktn] (likewise KMASK, KV_INDEX), key / value
    row ``r = n`` (or ``r = KV_INDEX[..n..]`` with HAS_INDEX) of K / V at
    ``b * stride_kb + r * stride_kn`` (packed: all batch strides 0; padded: start 0).
    SPLIT: write unnormalised partial results (acc, running max m, sum l; m in
    log2 units) to the workspace instead of the output. DOT_F32: run the dots in
    float32 on operands already rounded to the input dtype (Triton's CPU
    interpreter computes bf16 / fp16 dots wrongly).
    """
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    pid_s = tl.program_id(2)
    b = pid_bh // n_heads
    h = pid_bh % n_heads

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_p = tl.arange(0, BLOCK_D // 2)
    m_ok = offs_m < n_q
    d_ok = offs_d < head_dim
    omega = tl.load(FREQS + offs_p, mask=offs_p < head_dim // 2, other=0.0)  # (BLOCK_D // 2,) rad/s

    # query tile, rotated by q_t and pre-scaled so that exp2 gives the softmax
    q = tl.load(
        Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :],
        mask=m_ok[:, None] & d_ok[None, :],
        other=0.0,
    ).to(tl.float32)
    qt = tl.load(QT + b * stride_qtb + offs_m * stride_qtm, mask=m_ok, other=0.0).to(tl.float32)
    q_angle = qt[:, None] * omega[None, :]  # (BLOCK_M, BLOCK_D // 2)
    q = _rotate_pairs(q, tl.cos(q_angle), tl.sin(q_angle), BLOCK_M, BLOCK_D) * qk_scale
    q = q.to(Q.dtype.element_ty)
    if DOT_F32:
        q = q.to(tl.float32)

    # this program's share of the row's keys
    start = tl.load(SEQ_START + b).to(tl.int64)
    end = tl.load(SEQ_END + b).to(tl.int64)
    per_split = (end - start + num_splits - 1) // num_splits
    chunk = (per_split + BLOCK_N - 1) // BLOCK_N * BLOCK_N  # whole key blocks per split
    lo = start + pid_s * chunk
    hi = tl.minimum(lo + chunk, end)
    if CAUSAL:
        hi = tl.minimum(hi, start + (pid_m + 1) * BLOCK_M)

    k_base = K + b.to(tl.int64) * stride_kb + h * stride_kh
    v_base = V + b.to(tl.int64) * stride_vb + h * stride_vh
    kt_base = KT + b.to(tl.int64) * stride_ktb
    mask_base = KMASK + b.to(tl.int64) * stride_mb
    index_base = KV_INDEX + b.to(tl.int64) * stride_ib

    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.full((BLOCK_M,), 0.0, tl.float32)
    acc = tl.full((BLOCK_M, BLOCK_D), 0.0, tl.float32)
    for n0 in range(lo, hi, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_ok = offs_n < hi
        kv_mask = n_ok[:, None] & d_ok[None, :]
        kt = tl.load(kt_base + offs_n * stride_ktn, mask=n_ok, other=0.0).to(tl.float32)
        k_angle = kt[:, None] * omega[None, :]  # (BLOCK_N, BLOCK_D // 2)
        k_cos = tl.cos(k_angle)
        k_sin = tl.sin(k_angle)
        if HAS_INDEX:  # gather key / value rows from a table
            kv_row = tl.load(index_base + offs_n * stride_in, mask=n_ok, other=0).to(tl.int64)
        else:
            kv_row = offs_n
        k = tl.load(k_base + kv_row[:, None] * stride_kn + offs_d[None, :], mask=kv_mask, other=0.0)
        k = _rotate_pairs(k.to(tl.float32), k_cos, k_sin, BLOCK_N, BLOCK_D).to(K.dtype.element_ty)
        if DOT_F32:
            k = k.to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision=INPUT_PRECISION)  # (BLOCK_M, BLOCK_N), log2 units

        keep = n_ok
        if HAS_MASK:
            key_on = tl.load(mask_base + offs_n * stride_mn, mask=n_ok, other=0)
            keep = keep & (key_on != 0)
        keep2 = keep[None, :] & (offs_m[:, None] >= 0)
        if CAUSAL:
            keep2 = keep2 & ((offs_n - start)[None, :] <= offs_m[:, None])
        s = tl.where(keep2, s, float("-inf"))

        m_new = tl.maximum(m_i, tl.reduce(s, 1, tl.standard._elementwise_max))
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing yet stay 0
        alpha = tl.exp2(m_i - m_ref)
        p = tl.exp2(s - m_ref[:, None])
        l_i = l_i * alpha + tl.reduce(p, 1, tl.standard._sum_combine)

        v = tl.load(v_base + kv_row[:, None] * stride_vn + offs_d[None, :], mask=kv_mask, other=0.0)
        if ROTATE_VALUE:
            v = _rotate_pairs(v.to(tl.float32), k_cos, k_sin, BLOCK_N, BLOCK_D)
        p = p.to(V.dtype.element_ty)
        v = v.to(V.dtype.element_ty)
        if DOT_F32:
            p = p.to(tl.float32)
            v = v.to(tl.float32)
        acc = acc * alpha[:, None] + tl.dot(p, v, input_precision=INPUT_PRECISION)
        m_i = m_new

    if SPLIT:
        row = ((pid_s * n_batch + b) * n_q + offs_m).to(tl.int64) * n_heads + h  # (BLOCK_M,)
        tl.store(WS_M + row, m_i, mask=m_ok)
        tl.store(WS_L + row, l_i, mask=m_ok)
        tl.store(
            WS_ACC + row[:, None] * BLOCK_D + offs_d[None, :],
            acc,
            mask=m_ok[:, None] & (offs_d[None, :] < BLOCK_D),
        )
    else:
        _store_attention_rows(
            acc, l_i, omega, QT, OUT, b, h, offs_m, offs_d, n_q, head_dim,
            stride_qtb, stride_qtm, stride_ob, stride_om, stride_oh,
            ROTATE_VALUE, BLOCK_M, BLOCK_D,
        )  # fmt: skip


@lazy_jit
def _rotary_attention_combine_kernel(
    WS_ACC,
    WS_M,
    WS_L,
    QT,
    FREQS,
    OUT,
    n_batch,
    n_q,
    n_heads,
    head_dim,
    num_splits,
    stride_qtb,
    stride_qtm,
    stride_ob,
    stride_om,
    stride_oh,
    ROTATE_VALUE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Merge the key splits' partial softmax results of one (query block, batch x head)."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // n_heads
    h = pid_bh % n_heads
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_p = tl.arange(0, BLOCK_D // 2)
    m_ok = offs_m < n_q
    omega = tl.load(FREQS + offs_p, mask=offs_p < head_dim // 2, other=0.0)

    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.full((BLOCK_M,), 0.0, tl.float32)
    acc = tl.full((BLOCK_M, BLOCK_D), 0.0, tl.float32)
    for s in range(0, num_splits):
        row = ((s * n_batch + b) * n_q + offs_m).to(tl.int64) * n_heads + h
        m_s = tl.load(WS_M + row, mask=m_ok, other=float("-inf"))
        l_s = tl.load(WS_L + row, mask=m_ok, other=0.0)
        acc_s = tl.load(WS_ACC + row[:, None] * BLOCK_D + offs_d[None, :], mask=m_ok[:, None], other=0.0)
        m_new = tl.maximum(m_i, m_s)
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_ref)
        beta = tl.exp2(m_s - m_ref)
        l_i = l_i * alpha + l_s * beta
        acc = acc * alpha[:, None] + acc_s * beta[:, None]
        m_i = m_new

    _store_attention_rows(
        acc, l_i, omega, QT, OUT, b, h, offs_m, offs_d, n_q, head_dim,
        stride_qtb, stride_qtm, stride_ob, stride_om, stride_oh,
        ROTATE_VALUE, BLOCK_M, BLOCK_D,
    )  # fmt: skip


# ---------------------------------------------------------------------------
# Host function
# ---------------------------------------------------------------------------


def _next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def _need(cond: bool, message: str) -> None:
    if not cond:
        raise InputError(message)


def _auto_num_splits(*, n_programs: int, keys_per_row: float, block_n: int, device: torch.device) -> int:
    """Key splits so that about two waves of programs fill the GPU (1 on the CPU interpreter)."""
    if device.type != "cuda":
        return 1
    n_sm = torch.cuda.get_device_properties(device).multi_processor_count
    if n_programs >= n_sm:
        return 1
    by_work = max(1, int(keys_per_row) // (2 * block_n))  # at least ~2 key blocks per split
    return int(max(1, min(math.ceil(2 * n_sm / n_programs), by_work, 64)))


def _check_attention_inputs(q, k, v, q_t, k_t, freqs, cu_seqlens_k, key_mask, kv_index, out) -> int:
    """Validate shapes / dtypes (InputError on mismatch); return the mean number of keys per row."""
    _need(q.ndim == 4, f"q must be (B, Nq, H, Dh), got shape {tuple(q.shape)}")
    B, n_q, n_heads, head_dim = q.shape
    _need(q.dtype in _FLOAT_DTYPES, f"q must be float32, bfloat16 or float16, got {q.dtype}")
    _need(k.dtype == q.dtype == v.dtype, f"q, k, v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}")
    _need(head_dim % 2 == 0 and head_dim <= 256, f"head dim must be even and <= 256, got {head_dim}")
    _need(tuple(k.shape) == tuple(v.shape), f"k and v shapes differ: {tuple(k.shape)} vs {tuple(v.shape)}")
    _need(
        tuple(freqs.shape) == (head_dim // 2,),
        f"freqs must be (Dh // 2,) = ({head_dim // 2},), got {tuple(freqs.shape)}; use rotary_frequencies()",
    )
    _need(
        tuple(q_t.shape) in ((B, n_q), (n_q,)),
        f"q_t must be (B, Nq) = ({B}, {n_q}) or (Nq,), got {tuple(q_t.shape)}",
    )
    packed = cu_seqlens_k is not None
    # the key token stream: k_t, key_mask, kv_index share its shape
    if packed:
        _need(k_t.ndim == 1, f"packed k_t must be (total_k,), got {tuple(k_t.shape)}")
        _need(
            cu_seqlens_k.ndim == 1
            and cu_seqlens_k.shape[0] == B + 1
            and not cu_seqlens_k.is_floating_point(),
            f"cu_seqlens_k must be an integer (B + 1,) = ({B + 1},) tensor, "
            f"got {tuple(cu_seqlens_k.shape)} {cu_seqlens_k.dtype}",
        )
        total_k = k_t.shape[0]
        if cu_seqlens_k.device.type == "cpu":
            cu = cu_seqlens_k.tolist()
            _need(
                cu[0] == 0 and cu[-1] == total_k and all(a <= b for a, b in zip(cu, cu[1:])),
                f"cu_seqlens_k must start at 0, be non-decreasing and end at total_k={total_k}; got {cu[:8]}",
            )
        kv_shape = (k.shape[0] if kv_index is not None else total_k, n_heads, head_dim)
        keys_per_row = total_k / max(B, 1)
    else:
        _need(
            k_t.ndim == 2 and k_t.shape[0] == B,
            f"padded k_t must be (B, Nk) with B={B}, got {tuple(k_t.shape)}",
        )
        n_k = k_t.shape[1]
        kv_shape = (B, k.shape[1] if kv_index is not None and k.ndim == 4 else n_k, n_heads, head_dim)
        keys_per_row = n_k
    _need(
        tuple(k.shape) == kv_shape,
        f"k, v must be {kv_shape} to match q and k_t {tuple(k_t.shape)} ({'packed' if packed else 'padded'} "
        f"keys{', a table gathered by kv_index' if kv_index is not None else ''}), got {tuple(k.shape)}",
    )
    if key_mask is not None:
        _need(
            key_mask.dtype == torch.bool and key_mask.shape == k_t.shape,
            f"key_mask must be a bool tensor shaped like k_t {tuple(k_t.shape)} (True = attend), "
            f"got {tuple(key_mask.shape)} {key_mask.dtype}",
        )
    if kv_index is not None:
        _need(
            kv_index.shape == k_t.shape and kv_index.dtype in (torch.int32, torch.int64),
            f"kv_index must be an int32/int64 tensor shaped like k_t {tuple(k_t.shape)}, "
            f"got {tuple(kv_index.shape)} {kv_index.dtype}",
        )
        if kv_index.device.type == "cpu" and kv_index.numel():
            rows = k.shape[0] if packed else k.shape[1]
            _need(
                0 <= int(kv_index.min()) and int(kv_index.max()) < rows,
                f"kv_index values must lie in [0, {rows}) (rows of the k / v table)",
            )
    if out is not None:
        _need(
            tuple(out.shape) == tuple(q.shape) and out.dtype == q.dtype and out.stride(-1) == 1,
            f"out must be a {tuple(q.shape)} {q.dtype} tensor with a contiguous last dim, "
            f"got {tuple(out.shape)} {out.dtype}",
        )
    return keys_per_row


def rotary_cross_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_t: torch.Tensor,
    k_t: torch.Tensor,
    freqs: torch.Tensor,
    *,
    cu_seqlens_k: torch.Tensor | None = None,
    key_mask: torch.Tensor | None = None,
    kv_index: torch.Tensor | None = None,
    rotate_value: bool = False,
    causal: bool = False,
    softmax_scale: float | None = None,
    num_splits: int | None = None,
    allow_tf32: bool = False,
    out: torch.Tensor | None = None,
    block_m: int | None = None,
    block_n: int | None = None,
) -> torch.Tensor:
    """Fused rotary-time attention (Triton). Layouts and convention: see the module docstring.

    Args:
        q: (B, Nq, H, Dh) queries after projection, before rotation.
        k, v: packed (total_k, H, Dh) with ``cu_seqlens_k``, or padded (B, Nk, H, Dh).
            With ``kv_index``: tables, (M, H, Dh) packed or (B, M, H, Dh) padded.
        q_t: (B, Nq) or (Nq,) query times, seconds.
        k_t: (total_k,) packed or (B, Nk) padded key times, seconds.
        freqs: (Dh // 2,) angular frequency per interleaved pair (:func:`rotary_frequencies`).
        cu_seqlens_k: (B + 1,) int32/int64 offsets into the packed keys; None = padded keys.
        key_mask: bool shaped like k_t, True = attend.
        kv_index: int shaped like k_t: key n uses row ``kv_index[n]`` of the k / v table
            (padded: of its own batch element's table), e.g. the model's spike tokens whose
            content is one of a few (unit, token type) rows. Values must be in range
            (checked for CPU tensors only).
        rotate_value: rotate v by k_t and the output back by -q_t.
        causal: self-attention use: query i sees keys whose index within its row is <= i.
        softmax_scale: default 1 / sqrt(Dh).
        num_splits: key splits per row (None: enough to fill the GPU).
        allow_tf32: float32 inputs may use TF32 tensor-core dots (about 1e-3 relative error).
        out: optional (B, Nq, H, Dh) output buffer in q's dtype (contiguous last dim).
        block_m, block_n: tile sizes (powers of two >= 16; defaults tuned for the GPU).

    Returns:
        (B, Nq, H, Dh) attention output in q's dtype, before the output projection.
        The model's (B, H, N, Dh) head-major tensors can be passed as
        ``x.transpose(1, 2)`` views (no copy) and the result transposed back.
    """
    keys_per_row = _check_attention_inputs(q, k, v, q_t, k_t, freqs, cu_seqlens_k, key_mask, kv_index, out)
    B, n_q, n_heads, head_dim = q.shape
    if out is None:
        out = torch.empty((B, n_q, n_heads, head_dim), dtype=q.dtype, device=q.device)
    extra = [t for t in (cu_seqlens_k, key_mask, kv_index, out) if t is not None]
    check_launchable(q, k, v, q_t, k_t, freqs, *extra)
    if B == 0 or n_q == 0 or n_heads == 0:
        return out

    device = q.device
    q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
    q_t = q_t.to(torch.float32)
    k_t = k_t.to(torch.float32)
    freqs = freqs.to(torch.float32).contiguous()
    dummy = torch.zeros(1, dtype=torch.int32, device=device)
    mask_arg = key_mask.view(torch.uint8) if key_mask is not None else dummy
    index_arg = kv_index if kv_index is not None else dummy
    qt_strides = (q_t.stride(0), q_t.stride(1)) if q_t.ndim == 2 else (0, q_t.stride(0))

    def stream_strides(x: torch.Tensor | None) -> tuple[int, int]:
        """(batch, token) strides of a key-stream tensor (k_t, key_mask, kv_index)."""
        if x is None:
            return (0, 0)
        return (0, x.stride(0)) if x.ndim == 1 else (x.stride(0), x.stride(1))

    if cu_seqlens_k is not None:
        cu = cu_seqlens_k.to(device=device, dtype=torch.int64)
        seq_start, seq_end = cu[:-1].contiguous(), cu[1:].contiguous()
        k_strides = (0, k.stride(0), k.stride(1))
        v_strides = (0, v.stride(0), v.stride(1))
    else:
        n_k = k_t.shape[1]
        seq_start = torch.zeros(B, dtype=torch.int64, device=device)
        if key_mask is not None and n_k > 0:
            # skip each row's trailing padding: end = index of its last True + 1
            position = torch.arange(1, n_k + 1, dtype=torch.int64, device=device)
            seq_end = (key_mask.to(torch.int64) * position).amax(dim=1)
        else:
            seq_end = torch.full((B,), n_k, dtype=torch.int64, device=device)
        k_strides = (k.stride(0), k.stride(1), k.stride(2))
        v_strides = (v.stride(0), v.stride(1), v.stride(2))

    on_gpu = device.type == "cuda"
    block_d = max(16, _next_pow2(head_dim))
    if block_m is None:
        block_m = 64 if n_q > 32 else max(16, _next_pow2(n_q))
    if block_n is None:
        block_n = (64 if block_d <= 64 else 32) if on_gpu else 32
    for name, blk in (("block_m", block_m), ("block_n", block_n)):
        _need(blk >= 16 and blk == _next_pow2(blk), f"{name} must be a power of two >= 16, got {blk}")
    n_m_blocks = -(-n_q // block_m)
    if num_splits is None:
        num_splits = _auto_num_splits(
            n_programs=n_m_blocks * B * n_heads, keys_per_row=keys_per_row, block_n=block_n, device=device
        )
    _need(int(num_splits) >= 1, f"num_splits must be >= 1, got {num_splits}")
    num_splits = int(num_splits)
    split = num_splits > 1
    if split:  # partial results of each key split, merged by the combine kernel
        ws_acc = torch.empty((num_splits, B, n_q, n_heads, block_d), dtype=torch.float32, device=device)
        ws_m = torch.empty((num_splits, B, n_q, n_heads), dtype=torch.float32, device=device)
        ws_l = torch.empty_like(ws_m)
    else:
        ws_acc = ws_m = ws_l = out  # unused

    materialize_jit(globals())
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(head_dim)
    launch = {"num_warps": 4 if block_d <= 64 else 8, "num_stages": 2} if on_gpu else {}
    _rotary_cross_attention_fwd_kernel[(n_m_blocks, B * n_heads, num_splits)](
        q, k, v, q_t, k_t, freqs, mask_arg, index_arg, seq_start, seq_end, out, ws_acc, ws_m, ws_l,
        B, n_q, n_heads, head_dim, num_splits, float(scale) * _LOG2E,
        q.stride(0), q.stride(1), q.stride(2),
        *qt_strides,
        *k_strides,
        *v_strides,
        *stream_strides(k_t),
        *stream_strides(key_mask),
        *stream_strides(kv_index),
        out.stride(0), out.stride(1), out.stride(2),
        HAS_MASK=key_mask is not None,
        HAS_INDEX=kv_index is not None,
        ROTATE_VALUE=bool(rotate_value),
        CAUSAL=bool(causal),
        SPLIT=split,
        INPUT_PRECISION="tf32" if allow_tf32 else "ieee",
        DOT_F32=not on_gpu and q.dtype != torch.float32,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_D=block_d,
        **launch,
    )  # fmt: skip
    if split:
        _rotary_attention_combine_kernel[(n_m_blocks, B * n_heads)](
            ws_acc, ws_m, ws_l, q_t, freqs, out,
            B, n_q, n_heads, head_dim, num_splits,
            *qt_strides,
            out.stride(0), out.stride(1), out.stride(2),
            ROTATE_VALUE=bool(rotate_value),
            BLOCK_M=block_m,
            BLOCK_D=block_d,
            **({"num_warps": 4} if on_gpu else {}),
        )  # fmt: skip
    return out


def rotary_self_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    t: torch.Tensor,
    freqs: torch.Tensor,
    *,
    key_mask: torch.Tensor | None = None,
    causal: bool = False,
    rotate_value: bool = False,
    **kwargs,
) -> torch.Tensor:
    """Rotary self-attention over padded (B, N, H, Dh) q, k, v with shared times t (B, N) or (N,).

    ``key_mask`` (B, N) bool, True = real token. ``causal``: token i attends to
    tokens 0..i of its row. Other keyword arguments go to :func:`rotary_cross_attention`.
    """
    if t.ndim == 1:
        t = t.expand(q.shape[0], -1)
    return rotary_cross_attention(
        q, k, v, t, t, freqs, key_mask=key_mask, causal=causal, rotate_value=rotate_value, **kwargs
    )


# ---------------------------------------------------------------------------
# PyTorch reference
# ---------------------------------------------------------------------------


def _rotate_reference(x: torch.Tensor, t: torch.Tensor, freqs: torch.Tensor, sign: float) -> torch.Tensor:
    """Rotate (B, N, H, Dh) by angle sign * t * freqs.

    The angle is a float32 product (as torch_brain computes it); cos / sin are
    evaluated in float64 for float64 x, else in float32 and cast to x's dtype
    (torch_brain's ``rotary_emb.to(x.dtype)``).
    """
    trig_dtype = torch.promote_types(x.dtype, torch.float32)
    angle = (t.to(torch.float32)[..., None] * freqs.to(torch.float32)).to(trig_dtype)  # (B, N, Dh // 2)
    cos = angle.cos().to(x.dtype)[:, :, None, :]  # (B, N, 1, Dh // 2)
    sin = (sign * angle.sin()).to(x.dtype)[:, :, None, :]
    x_even, x_odd = x[..., 0::2], x[..., 1::2]
    return torch.stack((x_even * cos - x_odd * sin, x_odd * cos + x_even * sin), dim=-1).flatten(-2)


def rotary_cross_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_t: torch.Tensor,
    k_t: torch.Tensor,
    freqs: torch.Tensor,
    *,
    key_mask: torch.Tensor | None = None,
    kv_index: torch.Tensor | None = None,
    rotate_value: bool = False,
    causal: bool = False,
    softmax_scale: float | None = None,
) -> torch.Tensor:
    """Explicit PyTorch rotary attention, padded form; computes in q's dtype (float64 for an oracle).

    q (B, Nq, H, Dh); k, v (B, Nk, H, Dh), or (B, M, H, Dh) tables with
    kv_index (B, Nk); q_t (B, Nq) or (Nq,); k_t (B, Nk) seconds; key_mask
    (B, Nk) bool (True = attend). Materialises the (B, H, Nq, Nk) scores.
    Queries with no key get zeros. Returns (B, Nq, H, Dh).
    """
    B, n_q, _, head_dim = q.shape
    if kv_index is not None:
        batch = torch.arange(B, device=k.device)[:, None]
        k, v = k[batch, kv_index], v[batch, kv_index]  # (B, Nk, H, Dh)
    n_k = k.shape[1]
    if q_t.ndim == 1:
        q_t = q_t.expand(B, n_q)
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(head_dim)
    q_rot = _rotate_reference(q, q_t, freqs, 1.0)
    k_rot = _rotate_reference(k, k_t, freqs, 1.0)
    v_in = _rotate_reference(v, k_t, freqs, 1.0) if rotate_value else v
    scores = torch.einsum("bqhd,bkhd->bhqk", q_rot, k_rot) * scale  # (B, H, Nq, Nk)
    keep = torch.ones((B, 1, n_q, n_k), dtype=torch.bool, device=q.device)
    if key_mask is not None:
        keep = keep & key_mask[:, None, None, :]
    if causal:
        keep = keep & torch.ones((n_q, n_k), dtype=torch.bool, device=q.device).tril()
    scores = scores.masked_fill(~keep, float("-inf"))
    row_max = scores.amax(dim=-1, keepdim=True)
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    p = torch.exp(scores - row_max) * keep
    denom = p.sum(dim=-1, keepdim=True)
    weights = p / torch.where(denom > 0, denom, torch.ones_like(denom))
    o = torch.einsum("bhqk,bkhd->bqhd", weights, v_in)  # (B, Nq, H, Dh)
    if rotate_value:
        o = _rotate_reference(o, q_t, freqs, -1.0)
    return o

"""Rotary time embeddings and rotary attention (continuous time, seconds).

Same math as torch_brain's ``RotaryTimeEmbedding`` / ``RotaryCrossAttention`` /
``RotarySelfAttention`` (POYO):

* A head of width ``Dh`` is seen as ``Dh / 2`` interleaved pairs
  ``(x[2i], x[2i+1])``. Pair ``i`` is rotated by the angle ``t * freqs[i]``
  where ``t`` is the token's time in seconds and ``freqs`` (:func:`rotary_freqs`)
  holds ``2 pi / period_i`` for ``rotate_dim / 2`` periods log-spaced between
  ``t_min`` and ``t_max`` (both inclusive), then zeros: only the first
  ``rotate_dim`` (= ``Dh / 2`` by default) dims rotate.
* Rotating queries and keys makes attention scores depend on relative time
  only. With ``rotate_value=True`` values are rotated by their key's time and the
  attention output is rotated back by the query's time, so that the output
  carries the (relative) time of what it attended to.

:func:`rotary_attention` is the pure function that does rotation + attention;
the attention modules only normalise, project and reshape around it, so a fused
kernel can replace exactly that function. Everything here is written to be
TorchScript- and ONNX-exportable: no tuple-unpacking of tensors, no Python
branching on tensor values.

Fused replacement: each attention module has a ``fused_attention`` attribute,
None by default, which selects the reference path above (the only one TorchScript
and ONNX ever see: TorchScript drops the branch of a None attribute). An
inference backend may set it, on a copy of the model that shares its weights
(``kernels.backend``), to a :class:`FusedAttention` callable, which then replaces
the head split, :func:`rotary_attention` and the head merge; the module's norms,
projections and masking stay as they are.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from nh_serve.errors import InputError


def rotary_freqs(*, head_dim: int, t_min: float, t_max: float, rotate_dim: int | None = None) -> Tensor:
    """Angular frequencies (rad/s) of the rotary time embedding, shape ``(head_dim // 2,)`` float32.

    ``freqs[i]`` rotates the pair ``(2i, 2i+1)``; the first ``rotate_dim // 2``
    entries are ``2 pi / period`` with periods log-spaced from ``t_min`` to
    ``t_max`` seconds (inclusive), the rest are 0 (not rotated). ``rotate_dim``
    defaults to ``head_dim // 2``. Equal to torch_brain ``RotaryTimeEmbedding.omega``.
    Bad sizes or periods raise :class:`~nh_serve.errors.InputError` (a ``ValueError``).
    The Triton kernels (``kernels.rotary_frequencies``) use this same function.
    """
    if rotate_dim is None:
        rotate_dim = head_dim // 2
    if head_dim % 2 or rotate_dim % 2 or not 0 < rotate_dim <= head_dim:
        raise InputError(
            f"head_dim ({head_dim}) and rotate_dim ({rotate_dim}) must be even with "
            "0 < rotate_dim <= head_dim; pick an even head size"
        )
    if not 0 < t_min < t_max:
        raise InputError(
            f"rotary periods need 0 < t_min < t_max seconds, got t_min={t_min}, t_max={t_max}; "
            "pick a shortest period below the longest"
        )
    n_rot = rotate_dim // 2
    # log-spaced periods, computed in float32 exactly as torch_brain does
    frac = torch.linspace(0.0, 1.0, n_rot, dtype=torch.float32)
    log_min = torch.tensor(t_min, dtype=torch.float32).log()
    log_max = torch.tensor(t_max, dtype=torch.float32).log()
    periods = torch.exp(torch.lerp(log_min, log_max, frac))  # (n_rot,) seconds
    freqs = torch.zeros(head_dim // 2, dtype=torch.float32)
    freqs[:n_rot] = 2 * torch.pi / periods
    return freqs  # (Dh/2,) rad/s


def apply_rotary(x: Tensor, t: Tensor, freqs: Tensor) -> Tensor:
    """Rotate interleaved pairs of ``x`` by the angles ``t * freqs``.

    Args:
        x: ``(..., Dh)`` features (e.g. ``(B, H, N, Dh)``).
        t: times in seconds, broadcastable to ``x.shape[:-1]`` (e.g. ``(B, 1, N)``).
            Pass ``-t`` to undo a rotation.
        freqs: ``(Dh // 2,)`` angular frequencies from :func:`rotary_freqs`.

    Returns:
        ``(..., Dh)``: ``out[2i] = x[2i] cos - x[2i+1] sin``,
        ``out[2i+1] = x[2i+1] cos + x[2i] sin`` with angle ``t * freqs[i]``.
    """
    angles = t.to(freqs.dtype).unsqueeze(-1) * freqs  # (..., Dh/2)
    return rotate_pairs(x, torch.cos(angles), torch.sin(angles))


def rotate_pairs(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate interleaved pairs of ``x (..., Dh)`` given ``cos``, ``sin`` ``(..., Dh/2)`` (broadcastable).

    In eager mode (float32 / float64) the pairs are multiplied as complex numbers, one kernel
    instead of six, the same products and sums (about 4x faster on a CPU); TorchScript, ONNX
    export and ``torch.compile`` trace the real-valued form below, which they all support.
    """
    cos = cos.to(x.dtype)
    sin = sin.to(x.dtype)
    if not torch.jit.is_scripting():
        if x.dtype in (torch.float32, torch.float64) and not torch.compiler.is_compiling() and not torch.onnx.is_in_onnx_export():
            return _rotate_pairs_complex(x, cos, sin)
    x_even = x[..., 0::2]  # (..., Dh/2)
    x_odd = x[..., 1::2]  # (..., Dh/2)
    out = torch.stack((x_even * cos - x_odd * sin, x_odd * cos + x_even * sin), dim=-1)  # (..., Dh/2, 2)
    return out.flatten(-2)  # (..., Dh)



@torch.jit.unused
def _rotate_pairs_complex(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """:func:`rotate_pairs` as a complex product: ``(x_even + i x_odd) * (cos + i sin)``. ``x`` is read
    in place where its strides allow (a head's slice of a projection usually does), else copied once."""
    xp = x.unflatten(-1, (-1, 2))  # (..., Dh/2, 2)
    if xp.stride(-1) != 1 or xp.storage_offset() % 2 or any(st % 2 for st in xp.stride()[:-1]):
        xp = xp.contiguous()
    return torch.view_as_real(torch.view_as_complex(xp) * torch.complex(cos, sin)).flatten(-2)  # (..., Dh)

def rotary_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    q_t: Tensor,
    k_t: Tensor,
    freqs: Tensor,
    *,
    key_mask: Tensor | None,
    rotate_value: bool,
    causal: bool,
) -> Tensor:
    """Rotary-time multi-head attention (softmax scale ``1 / sqrt(Dh)``).

    Args:
        q: ``(B, H, Nq, Dh)`` queries (any strides).
        k: ``(B, H, Nk, Dh)`` keys.
        v: ``(B, H, Nk, Dh)`` values.
        q_t: ``(B, Nq)`` query times, seconds (float32).
        k_t: ``(B, Nk)`` key times, seconds (float32).
        freqs: ``(Dh // 2,)`` rotary angular frequencies (:func:`rotary_freqs`).
        key_mask: ``(B, Nk)`` bool, True where a key takes part, or None (all do).
        rotate_value: rotate values by their key time and the output back by the
            query time (encoder / multimodal cross-attention).
        causal: query ``i`` sees keys ``j <= i`` only (top-left aligned).

    Returns:
        ``(B, H, Nq, Dh)``. A query row with no visible key (all its keys masked)
        returns exactly zeros, never NaN.
    """
    # Angles once per token (shared by all heads, and by keys and values).
    q_angles = q_t.to(freqs.dtype)[:, None, :, None] * freqs  # (B, 1, Nq, Dh/2)
    k_angles = k_t.to(freqs.dtype)[:, None, :, None] * freqs  # (B, 1, Nk, Dh/2)
    q_cos = torch.cos(q_angles)
    q_sin = torch.sin(q_angles)
    k_cos = torch.cos(k_angles)
    k_sin = torch.sin(k_angles)
    q = rotate_pairs(q, q_cos, q_sin)
    k = rotate_pairs(k, k_cos, k_sin)
    if rotate_value:
        v = rotate_pairs(v, k_cos, k_sin)

    mask: Tensor | None = None
    if key_mask is not None:
        mask = key_mask[:, None, None, :]  # (B, 1, 1, Nk)
    if causal:
        tri = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool, device=q.device).tril()  # (Nq, Nk)
        mask = tri if mask is None else mask & tri  # (B|1, 1|.., Nq, Nk)

    if mask is None:
        out = F.scaled_dot_product_attention(q, k, v)  # (B, H, Nq, Dh)
    else:
        # Rows with no visible key would softmax over all -inf (NaN): let them see every
        # key instead, then zero their output.
        has_key = mask.any(dim=-1, keepdim=True)  # (B|1, 1, Nq|1, 1)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask | ~has_key)  # (B, H, Nq, Dh)
        out = out * has_key.to(out.dtype)

    if rotate_value:
        out = rotate_pairs(out, q_cos, -q_sin)  # rotate back by the query time
    return out  # (B, H, Nq, Dh)


class FusedAttention(Protocol):
    """What a module's ``fused_attention`` must be: a drop-in for its attention core."""

    def __call__(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        q_t: Tensor,
        k_t: Tensor,
        freqs: Tensor,
        *,
        key_mask: Tensor | None,
        kv_index: Tensor | None,
        heads: int,
        rotate_value: bool,
        causal: bool,
    ) -> Tensor:
        """``q`` ``(B, Nq, H * Dh)`` projected queries; ``k``, ``v`` ``(B, Nk, H * Dh)`` projected
        keys / values, or, with ``kv_index`` ``(B, Nk)`` int64, ``(B, M, H * Dh)`` tables whose row
        ``kv_index[b, n]`` is key ``n`` of batch element ``b``; times, ``freqs``, ``key_mask``,
        ``rotate_value`` and ``causal`` as in :func:`rotary_attention`. Returns ``(B, Nq, H * Dh)``,
        equal to ``merge_heads(rotary_attention(split_heads(q, heads), ...))`` on the gathered keys.
        """
        ...


def gather_rows(table: Tensor, index: Tensor) -> Tensor:
    """``out[b, n] = table[b, index[b, n]]``: ``(B, M, C)`` table, ``(B, N)`` int64 index -> ``(B, N, C)``."""
    B = table.shape[0]
    M = table.shape[1]
    offsets = torch.arange(B, device=index.device).unsqueeze(1) * M  # (B, 1)
    rows = (index + offsets).reshape(-1)  # (B * N,)
    return table.reshape(B * M, -1).index_select(0, rows).reshape(B, index.shape[1], -1)


def split_heads(x: Tensor, heads: int) -> Tensor:
    """``(B, N, H * Dh)`` -> ``(B, H, N, Dh)`` (a view)."""
    return x.reshape(x.shape[0], x.shape[1], heads, -1).transpose(1, 2)


def merge_heads(x: Tensor) -> Tensor:
    """``(B, H, N, Dh)`` -> ``(B, N, H * Dh)``."""
    return x.transpose(1, 2).flatten(2)


class RotaryCrossAttention(nn.Module):
    """Pre-LN multi-head cross-attention from queries to a context, with rotary times.

    Parameter names and layout match torch_brain ``RotaryCrossAttention``
    (``norm``, ``norm_context``, ``to_q``, ``to_kv``, ``to_out``), so its
    state dict loads directly.

    If a batch element's context is entirely masked, its output is exactly zero
    (the residual update is skipped), e.g. a multimodal request without behaviour.
    """

    def __init__(
        self,
        *,
        dim: int,
        context_dim: int | None = None,
        heads: int = 1,
        dim_head: int = 64,
        rotate_value: bool = False,
    ):
        super().__init__()
        context_dim = context_dim or dim
        inner = heads * dim_head
        self.heads = heads
        self.inner = inner
        self.rotate_value = rotate_value
        self.norm = nn.LayerNorm(dim)
        self.norm_context = nn.LayerNorm(context_dim)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(context_dim, 2 * inner, bias=False)
        self.to_out = nn.Linear(inner, dim)
        self.fused_attention = None  # optional kernel replacing the attention core (module docstring)

    def forward(
        self,
        x: Tensor,
        context: Tensor,
        x_times: Tensor,
        context_times: Tensor,
        freqs: Tensor,
        context_mask: Tensor | None = None,
    ) -> Tensor:
        """Attend from ``x`` to ``context``.

        Args:
            x: ``(B, Nq, dim)`` queries; ``x_times`` ``(B, Nq)`` seconds.
            context: ``(B, Nk, context_dim)``; ``context_times`` ``(B, Nk)`` seconds.
            freqs: ``(dim_head // 2,)`` rotary frequencies.
            context_mask: ``(B, Nk)`` bool, True = real token; None = all real.

        Returns:
            ``(B, Nq, dim)`` update (add it to ``x`` as a residual).
        """
        kv = self.to_kv(self.norm_context(context))  # (B, Nk, 2*H*Dh)
        return self._attend(x, kv, x_times, context_times, freqs, context_mask)

    def forward_indexed(
        self,
        x: Tensor,
        context_table: Tensor,
        context_index: Tensor,
        x_times: Tensor,
        context_times: Tensor,
        freqs: Tensor,
        context_mask: Tensor | None = None,
    ) -> Tensor:
        """:meth:`forward` for a context whose tokens are rows of a smaller table.

        Same result as ``forward(x, context, ...)`` with
        ``context[b, n] = context_table[b, context_index[b, n]]``, but LayerNorm and the
        key/value projection run once per table row (``M`` rows) instead of once per
        token (``Nk`` tokens); keys and values are then gathered. Token times still
        enter per token through the rotation.

        Args:
            context_table: ``(B, M, context_dim)`` distinct token contents.
            context_index: ``(B, Nk)`` int64 row of each token in ``context_table``.
            (other arguments as in :meth:`forward`)
        """
        kv_table = self.to_kv(self.norm_context(context_table))  # (B, M, 2*H*Dh)
        return self._attend(x, kv_table, x_times, context_times, freqs, context_mask, context_index)

    def _attend(
        self,
        x: Tensor,
        kv: Tensor,
        x_times: Tensor,
        context_times: Tensor,
        freqs: Tensor,
        context_mask: Tensor | None,
        kv_index: Tensor | None = None,
    ) -> Tensor:
        """Queries from ``x (B, Nq, dim)``, projected keys/values ``kv (B, Nk, 2*H*Dh)`` -> ``(B, Nq, dim)``.

        With ``kv_index`` ``(B, Nk)``, ``kv`` is a ``(B, M, 2*H*Dh)`` table and key ``n`` is its row
        ``kv_index[:, n]`` (gathered here, or read in place by a fused kernel).
        """
        q = self.to_q(self.norm(x))  # (B, Nq, H*Dh)
        if self.fused_attention is not None:
            out = self.fused_attention(
                q,
                kv[..., : self.inner],
                kv[..., self.inner :],
                x_times,
                context_times,
                freqs,
                key_mask=context_mask,
                kv_index=kv_index,
                heads=self.heads,
                rotate_value=self.rotate_value,
                causal=False,
            )  # (B, Nq, H*Dh)
        else:
            if kv_index is not None:
                kv = gather_rows(kv, kv_index)  # (B, Nk, 2*H*Dh)
            k = kv[..., : self.inner]  # (B, Nk, H*Dh)
            v = kv[..., self.inner :]  # (B, Nk, H*Dh)
            out = merge_heads(
                rotary_attention(
                    split_heads(q, self.heads),
                    split_heads(k, self.heads),
                    split_heads(v, self.heads),
                    x_times,
                    context_times,
                    freqs,
                    key_mask=context_mask,
                    rotate_value=self.rotate_value,
                    causal=False,
                )
            )  # (B, Nq, H*Dh)
        out = self.to_out(out)  # (B, Nq, dim)
        if context_mask is not None:
            has_context = context_mask.any(dim=-1).to(out.dtype)  # (B,)
            out = out * has_context[:, None, None]
        return out


class RotarySelfAttention(nn.Module):
    """Pre-LN multi-head self-attention with rotary times (optionally causal).

    Parameter names match torch_brain ``RotarySelfAttention`` (``norm``,
    ``to_qkv``, ``to_out``).
    """

    def __init__(
        self,
        *,
        dim: int,
        heads: int = 8,
        dim_head: int = 64,
        rotate_value: bool = False,
        causal: bool = False,
    ):
        super().__init__()
        inner = heads * dim_head
        self.heads = heads
        self.inner = inner
        self.rotate_value = rotate_value
        self.causal = causal
        self.norm = nn.LayerNorm(dim)
        self.to_qkv = nn.Linear(dim, 3 * inner, bias=False)
        self.to_out = nn.Linear(inner, dim)
        self.fused_attention = None  # optional kernel replacing the attention core (module docstring)

    def forward(self, x: Tensor, times: Tensor, freqs: Tensor, mask: Tensor | None = None) -> Tensor:
        """Self-attention over ``x`` ``(B, N, dim)`` at ``times`` ``(B, N)`` seconds.

        ``mask`` ``(B, N)`` bool (True = real token) masks keys. Returns ``(B, N, dim)``.
        """
        qkv = self.to_qkv(self.norm(x))  # (B, N, 3*H*Dh)
        q = qkv[..., : self.inner]
        k = qkv[..., self.inner : 2 * self.inner]
        v = qkv[..., 2 * self.inner :]
        if self.fused_attention is not None:
            out = self.fused_attention(
                q,
                k,
                v,
                times,
                times,
                freqs,
                key_mask=mask,
                kv_index=None,
                heads=self.heads,
                rotate_value=self.rotate_value,
                causal=self.causal,
            )  # (B, N, H*Dh)
        else:
            out = merge_heads(
                rotary_attention(
                    split_heads(q, self.heads),
                    split_heads(k, self.heads),
                    split_heads(v, self.heads),
                    times,
                    times,
                    freqs,
                    key_mask=mask,
                    rotate_value=self.rotate_value,
                    causal=self.causal,
                )
            )  # (B, N, H*Dh)
        return self.to_out(out)  # (B, N, dim)

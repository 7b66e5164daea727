"""Building blocks of NeuroHorizon (:mod:`nh_serve.core.model`): GEGLU feed-forward, the unit
IDEncoder, the per-neuron head and a processor block. Plain PyTorch, TorchScript- and ONNX-exportable."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from nh_serve.core.config import ModelConfig
from nh_serve.core.rotary import RotaryCrossAttention, RotarySelfAttention


class FeedForward(nn.Module):
    """Pre-LN GEGLU feed-forward: ``LN -> Linear(D, 2 m D) -> x * gelu(gate) -> Linear(m D, D)``."""

    def __init__(self, *, dim: int, mult: int, dropout: float = 0.0):
        super().__init__()
        self.hidden = dim * mult
        self.norm = nn.LayerNorm(dim)
        self.proj_in = nn.Linear(dim, 2 * self.hidden)
        self.drop = nn.Dropout(dropout)
        self.proj_out = nn.Linear(self.hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        h = self.proj_in(self.norm(x))  # (..., 2 * hidden)
        h = h[..., : self.hidden] * F.gelu(h[..., self.hidden :])  # (..., hidden)
        return self.proj_out(self.drop(h))  # (..., D)


class IDEncoder(nn.Module):
    """Per-unit reference features ``(B, U, n_features)`` (z-scored) -> unit embeddings ``(B, U, D)``.

    Modes:
        ``idencoder``: MLP ``F -> D -> D -> D`` with GELU, then LayerNorm (default).
        ``random``: a fixed random projection ``F -> D`` (a buffer, not trainable)
            followed by a LayerNorm without parameters: an ablation with no learned
            unit identity.
        ``mean``: a single linear layer ``F -> D``.
    """

    def __init__(self, *, n_features: int, dim: int, mode: str = "idencoder"):
        super().__init__()
        self.mode = mode
        self.dim = dim
        self.mlp = nn.Identity()
        if mode == "idencoder":
            self.mlp = nn.Sequential(
                nn.Linear(n_features, dim),
                nn.GELU(),
                nn.Linear(dim, dim),
                nn.GELU(),
                nn.Linear(dim, dim),
                nn.LayerNorm(dim),
            )
        elif mode == "mean":
            self.mlp = nn.Linear(n_features, dim)
        elif mode != "random":
            raise ValueError(f"unknown unit embedding mode {mode!r}; use idencoder, random or mean")
        # Only used in "random" mode; an empty buffer otherwise keeps one code path for export.
        proj = torch.randn(n_features, dim) / math.sqrt(n_features) if mode == "random" else torch.zeros(0, 0)
        self.register_buffer("projection", proj)  # (F, D) in random mode
        self.use_projection = mode == "random"

    def forward(self, features: Tensor) -> Tensor:
        if self.use_projection:
            return F.layer_norm(features @ self.projection, [self.dim])  # (B, U, D)
        return self.mlp(features)  # (B, U, D)


#: Activations per block of :meth:`PerNeuronHead._combine_blocked` (512 KiB of float32: an L2 cache's share).
COMBINE_BLOCK_ELEMENTS = 128 * 1024


def _eager_inference(x: Tensor) -> bool:
    """Whether this runs in plain eager PyTorch without gradients, on the CPU (the registration fit's
    and eager prediction's case), where the blocked head pays; compilers and exporters see the reference."""
    return x.device.type == "cpu" and not torch.is_grad_enabled() and not torch.compiler.is_compiling()


class PerNeuronHead(nn.Module):
    """Per-neuron readout shared by all units: ``log_rate[u, k] = MLP(concat(bin_k, unit_vec_u))``.

    The first layer ``W @ concat(bin, unit) + b`` is split into a bin part
    ``W_b @ bin_k + b`` ``(T, H)`` and a unit part ``W_u @ unit_vec_u`` ``(U, H)``,
    which is the same MLP computed for ``U + T`` rows instead of ``U x T``. The
    remaining layers run on every ``(u, k)`` pair in :meth:`combine`, the
    function a fused kernel replaces::

        h = gelu(unit_part[:, :, None, :] + bin_part[:, None, :, :])   # (B, U, T, H)
        h = gelu(h @ W_i.T + b_i)     for each hidden layer i
        log_rate = h @ w_out + b_out + unit_offset[:, :, None]         # (B, U, T)

    GELU is the exact (erf) GELU. Without gradients on the CPU, eager PyTorch computes the same
    numbers a block of units at a time (:meth:`_combine_blocked`).

    ``fused_combine`` is None (the reference :meth:`combine`, the only path TorchScript and
    ONNX see) unless an inference backend sets it, on a copy of the model sharing its
    weights (``kernels.backend``), to a callable with :meth:`combine`'s signature that
    reads this module's weights (e.g. the fused Triton head).
    """

    def __init__(self, *, bin_dim: int, unit_dim: int, hidden: int, n_layers: int):
        super().__init__()
        self.bin_proj = nn.Linear(bin_dim, hidden)  # W_b, b
        self.unit_proj = nn.Linear(unit_dim, hidden, bias=False)  # W_u
        self.hidden_layers = nn.ModuleList([nn.Linear(hidden, hidden) for _ in range(n_layers - 2)])
        self.out = nn.Linear(hidden, 1)
        self.fused_combine = None  # optional kernel replacing combine() (see the class docstring)

    def unit_part(self, unit_vec: Tensor) -> Tensor:
        """``(B, U, unit_dim)`` -> ``(B, U, H)``: ``W_u @ unit_vec`` (no bias)."""
        return self.unit_proj(unit_vec)

    def bin_part(self, bins: Tensor) -> Tensor:
        """``(B, T, bin_dim)`` -> ``(B, T, H)``: ``W_b @ bin + b``."""
        return self.bin_proj(bins)

    def combine(self, unit_part: Tensor, bin_part: Tensor, unit_offset: Tensor | None = None) -> Tensor:
        """``unit_part (B, U, H)``, ``bin_part (B, T, H)`` -> log-rate ``(B, U, T)`` (log Hz, unclamped).

        ``unit_offset`` ``(B, U)``, if given, is added to every bin of its unit (the model
        passes the log persistence baseline here).
        """
        if self.fused_combine is not None:
            return self.fused_combine(unit_part, bin_part, unit_offset)
        if not torch.jit.is_scripting() and not torch.jit.is_tracing() and _eager_inference(unit_part):
            return self._combine_blocked(unit_part, bin_part, unit_offset)
        h = F.gelu(unit_part.unsqueeze(2) + bin_part.unsqueeze(1))  # (B, U, T, H)
        for layer in self.hidden_layers:
            h = F.gelu(layer(h))  # (B, U, T, H)
        out = self.out(h).squeeze(-1)  # (B, U, T)
        if unit_offset is not None:
            out = out + unit_offset.unsqueeze(-1)
        return out

    @torch.jit.unused
    def _combine_blocked(self, unit_part: Tensor, bin_part: Tensor, unit_offset: Tensor | None) -> Tensor:
        """:meth:`combine` without gradients, a few units at a time: each block's ``(units, T, H)``
        activations stay in the CPU's cache and are changed in place, instead of three passes over
        a ``(B, U, T, H)`` tensor in memory (the same numbers)."""
        B, U, H = unit_part.shape
        T = bin_part.shape[1]
        rows = max(1, COMBINE_BLOCK_ELEMENTS // max(1, T * H))  # units per block
        out = torch.empty(B, U, T, dtype=unit_part.dtype)
        w = self.out.weight[0]  # (H,)
        for b in range(B):
            for u0 in range(0, U, rows):
                h = unit_part[b, u0 : u0 + rows].unsqueeze(1) + bin_part[b].unsqueeze(0)  # (rows, T, H)
                h = torch.ops.aten.gelu_(h)
                for layer in self.hidden_layers:
                    h = torch.ops.aten.gelu_(layer(h))
                torch.mv(h.reshape(-1, H), w, out=out[b, u0 : u0 + rows].reshape(-1))  # (rows * T,)
        out += self.out.bias
        if unit_offset is not None:
            out += unit_offset.unsqueeze(-1)
        return out

    def forward(self, bins: Tensor, unit_vec: Tensor, unit_offset: Tensor | None = None) -> Tensor:
        """``bins (B, T, bin_dim)``, ``unit_vec (B, U, unit_dim)`` -> ``(B, U, T)``."""
        return self.combine(self.unit_part(unit_vec), self.bin_part(bins), unit_offset)


class ProcessorBlock(nn.Module):
    """Optional multimodal cross-attention, then rotary self-attention and GEGLU (pre-LN, residual)."""

    def __init__(self, *, cfg: ModelConfig, multimodal: bool):
        super().__init__()
        self.mm_attn = (
            RotaryCrossAttention(dim=cfg.dim, heads=cfg.cross_heads, dim_head=cfg.dim_head, rotate_value=True)
            if multimodal
            else None
        )
        self.attn = RotarySelfAttention(
            dim=cfg.dim, heads=cfg.heads, dim_head=cfg.dim_head, rotate_value=True
        )
        self.ffn = FeedForward(dim=cfg.dim, mult=cfg.ffn_mult, dropout=cfg.dropout)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(
        self,
        latents: Tensor,
        latent_times: Tensor,
        freqs: Tensor,
        mm_tokens: Tensor | None,
        mm_times: Tensor | None,
        mm_mask: Tensor | None,
    ) -> Tensor:
        """``latents (B, L, D)`` at ``latent_times (B, L)`` -> ``(B, L, D)``."""
        if self.mm_attn is not None and mm_tokens is not None and mm_times is not None:
            latents = latents + self.mm_attn(latents, mm_tokens, latent_times, mm_times, freqs, mm_mask)
        latents = latents + self.drop(self.attn(latents, latent_times, freqs))
        latents = latents + self.drop(self.ffn(latents))
        return latents

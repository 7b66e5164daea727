"""NeuroHorizon: predict every unit's firing rate over the next second from 1 s of spikes.

Reference implementation in plain PyTorch. Kernels, exported graphs, the
service and batch scoring are all checked against it.

Pipeline for one window (``B`` windows are batched with padding masks):

1. **Unit embeddings.** An :class:`IDEncoder` turns each unit's z-scored
   reference features ``(U, 33)`` into an embedding ``(U, D)``. Recordings the
   model never saw get embeddings from their own statistics (zero-shot).
2. **Spike tokens.** Every spike in the context is a token = its unit's
   embedding + a token-type embedding (spike / unit start / unit end). Like
   POYO, every unit also gets a start token at time 0 and an end token at time
   ``context_s``, so silent units are still seen. Token times (seconds from the
   context start) enter only through rotary attention.
3. **Encoder.** Learned latents (``n_latents_per_step`` of them, repeated at the
   centre of each ``latent_step`` of the context) cross-attend to the spike
   tokens (rotary, values rotated and the output de-rotated), then a GEGLU
   feed-forward.
4. **Processor.** ``depth`` pre-LN rotary self-attention + GEGLU blocks over the
   latents. A multimodal model (``behavior_dim`` / ``image_dim`` > 0) inserts a
   rotary cross-attention to behaviour / image-embedding tokens before every
   ``multimodal_every``-th block; a behaviour-only model with no samples gets an
   update of exactly zero (an image model always has the schedule marker, below).
   Behaviour samples lie inside the context; image events may also lie inside
   the forecast window (a planned stimulus schedule: what will be shown when).
   Image tokens carry one extra input column, 0 for a presentation and 1 for
   the *schedule marker*: one token at the time up to which the list of images
   is complete (the context end when only shown images are known, up to the
   forecast end when the coming stimuli are known). Without it "no image comes"
   and "nobody said" would look the same.
5. **Decoder.** One query per future bin (learned bin embedding, rotary time at
   the bin centre ``context_s + (k + 0.5) bin_size_s``) cross-attends to the
   latents and, in a multimodal model, to the behaviour / image tokens (so a bin
   sees how long ago, or how soon, each image is shown), then causal
   self-attention among bins + feed-forward, then a final LayerNorm:
   ``bins (B, T, D)``. All bins come out of one pass (no rollout).
6. **Per-neuron head** (:class:`PerNeuronHead`, shared by all units):
   ``log_rate[u, k] = MLP(concat(bins[k], unit_vec[u]))`` with
   ``unit_vec[u] = concat(unit_embedding[u], activity[u])``. ``activity`` is
   ``log1p`` of the unit's rate (Hz) in the last ``s`` seconds of the context
   for each ``s`` in ``activity_scales``, of its slow history rate and of its
   reference rate. With ``baseline_offset`` (default) the log of a shrunk
   recent-rate estimate (:func:`baseline_rate_hz`) is added, so the network
   learns a residual around a persistence baseline and starts close to it.

Output convention: :meth:`NeuroHorizon.forward` returns the **log firing rate in
Hz**, shape ``(B, U, n_bins)``, clamped to ``[LOG_RATE_MIN, LOG_RATE_MAX]``
(rates between 1e-4 Hz and 1000 Hz). The expected spike count of bin ``k`` is
``exp(log_rate) * bin_size_s``. Padded units get ``LOG_RATE_MIN``.

Inputs: :func:`tokenize` (CPU, numpy) turns one window's data into a dict of
tensors, :func:`collate` pads a list of them into a batch whose keys are exactly
the keyword arguments of :meth:`NeuroHorizon.forward`::

    model = NeuroHorizon(get_config("nh-small"))
    item = model.tokenize(unit_features=f, spike_times=t, spike_unit_index=u,
                          ctx_start=10.0, ref_rate_hz=r)
    log_rate_hz = model(**model.collate([item]))  # (1, U, 50)
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from nh_serve.core.config import ModelConfig
from nh_serve.core.rotary import RotaryCrossAttention, RotarySelfAttention, rotary_freqs
from nh_serve.data.spikes import check_spikes
from nh_serve.errors import InputError

# Output clamp of the log-rate (Hz) before anyone exponentiates it: 1e-4 Hz .. 1000 Hz.
LOG_RATE_MIN = math.log(1e-4)
LOG_RATE_MAX = math.log(1e3)
# Largest history rate (Hz) tokenize accepts: far above any neuron, below float overflow.
MAX_HISTORY_RATE_HZ = 1e4
# Floor of the persistence baseline (Hz), so silent units get a finite log.
BASELINE_FLOOR_HZ = 1e-2

# Image-token input column that marks the end of the known image schedule (1) vs a presentation (0).
IMAGE_MARKER_COLUMN = -1

# Token types of the spike sequence.
TOKEN_SPIKE, TOKEN_UNIT_START, TOKEN_UNIT_END = 0, 1, 2

# Keys produced by tokenize / collate, grouped by the axis they are padded along.
UNIT_KEYS = ("unit_features", "unit_mask", "unit_counts", "history_rate_hz", "ref_rate_hz")
SPIKE_KEYS = ("spike_unit_index", "spike_times", "spike_type", "spike_mask")
BEHAVIOR_KEYS = ("behavior_times", "behavior_values", "behavior_mask")
IMAGE_KEYS = ("image_times", "image_values", "image_mask")


# ================================================================================================
# Building blocks
# ================================================================================================


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

    GELU is the exact (erf) GELU.

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
        h = F.gelu(unit_part.unsqueeze(2) + bin_part.unsqueeze(1))  # (B, U, T, H)
        for layer in self.hidden_layers:
            h = F.gelu(layer(h))  # (B, U, T, H)
        out = self.out(h).squeeze(-1)  # (B, U, T)
        if unit_offset is not None:
            out = out + unit_offset.unsqueeze(-1)
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


def baseline_rate_hz(
    unit_counts: Tensor, history_rate_hz: Tensor, *, window_s: float, prior_s: float, floor_hz: float
) -> Tensor:
    """Persistence baseline (Hz): the recent rate shrunk toward the slow history rate.

    ``(n_recent + prior_s * history_rate_hz) / (window_s + prior_s)`` where
    ``n_recent = unit_counts[..., -1]`` is the count in the longest activity
    window (``window_s`` seconds, normally the whole context): a Poisson-Gamma
    posterior mean with ``prior_s`` seconds of pseudo-observation at the slow
    rate. Floored at ``floor_hz`` (the model uses :data:`BASELINE_FLOOR_HZ`). Shape ``(B, U)``.
    """
    n_recent = unit_counts[..., -1]  # (B, U) spikes
    rate = (n_recent + prior_s * history_rate_hz) / (window_s + prior_s)  # (B, U) Hz
    return rate.clamp_min(floor_hz)


# ================================================================================================
# Model
# ================================================================================================


class NeuroHorizon(nn.Module):
    """NeuroHorizon spike-prediction transformer (see the module docstring).

    ``forward`` takes only tensors (the :func:`collate` output) and returns the
    log firing rate in Hz, ``(B, U, n_bins)``.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        D = cfg.dim
        self.n_bins = cfg.n_bins
        self.baseline_offset = cfg.baseline_offset
        self.head_activity = cfg.head_activity
        self.baseline_window_s = float(cfg.activity_scales[-1])
        self.baseline_prior_s = float(cfg.baseline_prior_s)
        self.baseline_floor_hz = BASELINE_FLOOR_HZ
        self.log_rate_min = LOG_RATE_MIN
        self.log_rate_max = LOG_RATE_MAX
        self.has_behavior = cfg.behavior_dim > 0
        self.has_images = cfg.image_dim > 0

        # Rotary frequencies shared by every attention layer (all have width dim_head).
        self.register_buffer("freqs", rotary_freqs(head_dim=cfg.dim_head, t_min=cfg.t_min, t_max=cfg.t_max))
        # Activity window lengths (S,) seconds.
        self.register_buffer("activity_scales", torch.tensor(cfg.activity_scales, dtype=torch.float32))

        # Units and spike tokens.
        self.unit_encoder = IDEncoder(n_features=cfg.n_features, dim=D, mode=cfg.unit_embedding_mode)
        self.token_type_emb = nn.Embedding(3, D)

        # Latents: n_latents_per_step embeddings repeated at each latent step centre.
        self.latent_emb = nn.Embedding(cfg.n_latents_per_step, D)
        steps = (torch.arange(cfg.n_latent_steps, dtype=torch.float64) + 0.5) * cfg.latent_step  # (S_lat,)
        self.register_buffer(
            "latent_index", torch.arange(cfg.n_latents_per_step).repeat(cfg.n_latent_steps)
        )  # (L,) = [0, 1, .., n-1, 0, 1, ..]
        self.register_buffer(
            "latent_times", steps.repeat_interleave(cfg.n_latents_per_step).to(torch.float32)
        )  # (L,) seconds

        # Encoder.
        self.enc_attn = RotaryCrossAttention(
            dim=D, heads=cfg.cross_heads, dim_head=cfg.dim_head, rotate_value=True
        )
        self.enc_ffn = FeedForward(dim=D, mult=cfg.ffn_mult, dropout=cfg.dropout)

        # Multimodal tokens (behaviour samples, image-embedding events).
        self.behavior_proj = nn.Linear(cfg.behavior_dim, D) if self.has_behavior else None
        # image embedding + the schedule-marker column (see the module docstring)
        self.image_proj = nn.Linear(cfg.image_dim + 1, D) if self.has_images else None
        self.modality_emb = nn.Embedding(2, D) if cfg.is_multimodal else None

        # Processor.
        self.blocks = nn.ModuleList(
            [
                ProcessorBlock(cfg=cfg, multimodal=cfg.is_multimodal and i % cfg.multimodal_every == 0)
                for i in range(cfg.depth)
            ]
        )

        # Decoder over future bins.
        self.bin_emb = nn.Embedding(cfg.n_bins, D)
        self.register_buffer("bin_index", torch.arange(cfg.n_bins))  # (T,)
        self.register_buffer(
            "bin_times",
            (cfg.context_s + (torch.arange(cfg.n_bins, dtype=torch.float64) + 0.5) * cfg.bin_size_s).to(
                torch.float32
            ),
        )  # (T,) seconds: bin centres
        self.dec_attn = RotaryCrossAttention(
            dim=D, heads=cfg.cross_heads, dim_head=cfg.dim_head, rotate_value=False
        )
        self.dec_mm_attn = (
            RotaryCrossAttention(dim=D, heads=cfg.cross_heads, dim_head=cfg.dim_head, rotate_value=False)
            if cfg.is_multimodal
            else None
        )
        self.dec_ffn = FeedForward(dim=D, mult=cfg.ffn_mult, dropout=cfg.dropout)
        self.dec_self_attn = RotarySelfAttention(
            dim=D, heads=cfg.heads, dim_head=cfg.dim_head, rotate_value=False, causal=True
        )
        self.dec_self_ffn = FeedForward(dim=D, mult=cfg.ffn_mult, dropout=cfg.dropout)
        self.dec_norm = nn.LayerNorm(D)

        # Per-neuron head.
        self.head = PerNeuronHead(
            bin_dim=D, unit_dim=D + cfg.n_activity, hidden=cfg.head_hidden, n_layers=cfg.head_layers
        )
        self._init_weights()

    def _init_weights(self) -> None:
        for emb in (self.token_type_emb, self.latent_emb, self.bin_emb, self.modality_emb):
            if emb is not None:
                nn.init.normal_(emb.weight, std=0.02)
        # Start near the baseline: a small output layer (the residual around the persistence
        # baseline), or a bias at ~5 Hz without a baseline.
        with torch.no_grad():
            self.head.out.weight.mul_(0.1)
            self.head.out.bias.fill_(0.0 if self.cfg.baseline_offset else math.log(5.0))

    # ---- CPU-side input preparation ------------------------------------------------------------
    def tokenize(self, **kwargs: Any) -> dict[str, Tensor]:
        """:func:`tokenize` with this model's config."""
        return tokenize(self.cfg, **kwargs)

    @staticmethod
    def collate(items: list[dict[str, Tensor]]) -> dict[str, Tensor]:
        """:func:`collate`."""
        return collate(items)

    # ---- forward pieces --------------------------------------------------------------------------
    @torch.jit.export
    def embed_units(self, unit_features: Tensor) -> Tensor:
        """Unit embeddings ``(B, U, D)`` from z-scored reference features ``(B, U, n_features)``.

        Cache them (or adapt them) and pass them to :meth:`forward_with_embeddings`.
        """
        return self.unit_encoder(unit_features)

    @torch.jit.export
    def unit_vectors(
        self, unit_embeddings: Tensor, unit_counts: Tensor, history_rate_hz: Tensor, ref_rate_hz: Tensor
    ) -> Tensor:
        """Head input per unit: ``concat(embedding, activity)``, ``(B, U, D + S + 2)``.

        ``activity = log1p([counts_s / s for s in activity_scales], history_rate_hz, ref_rate_hz)``
        (rates in Hz; negative inputs are treated as 0).
        """
        rates = unit_counts / self.activity_scales  # (B, U, S) Hz
        activity = torch.cat(
            (rates, history_rate_hz.unsqueeze(-1), ref_rate_hz.unsqueeze(-1)), dim=-1
        )  # (B, U, S + 2) Hz
        activity = torch.log1p(activity.clamp_min(0.0))
        if not self.head_activity:  # ablation: the head sees the unit embedding only
            activity = torch.zeros_like(activity)
        return torch.cat((unit_embeddings, activity), dim=-1)  # (B, U, D + S + 2)

    @torch.jit.export
    def bin_states(
        self,
        unit_embeddings: Tensor,
        spike_unit_index: Tensor,
        spike_times: Tensor,
        spike_type: Tensor,
        spike_mask: Tensor,
        behavior_times: Tensor | None = None,
        behavior_values: Tensor | None = None,
        behavior_mask: Tensor | None = None,
        image_times: Tensor | None = None,
        image_values: Tensor | None = None,
        image_mask: Tensor | None = None,
    ) -> Tensor:
        """Encoder + processor + decoder: the decoded future bins ``(B, T, D)`` (input of the head)."""
        B = spike_times.shape[0]
        U = unit_embeddings.shape[1]
        D = unit_embeddings.shape[2]

        # Spike tokens: unit embedding + token type. A token's content depends only on its
        # (unit, type) pair, so the encoder normalises and projects the (B, U * 3, D) table of
        # those pairs once and gathers keys/values per token (times enter through the rotation).
        n_types = self.token_type_emb.weight.shape[0]
        token_table = (unit_embeddings.unsqueeze(2) + self.token_type_emb.weight).reshape(B, U * n_types, D)
        token_row = spike_unit_index * n_types + spike_type  # (B, N) row into token_table

        # Latents.
        latents = self.latent_emb(self.latent_index).unsqueeze(0).expand(B, -1, -1)  # (B, L, D)
        latent_times = self.latent_times.unsqueeze(0).expand(B, -1)  # (B, L)

        # Encode.
        latents = latents + self.enc_attn.forward_indexed(
            latents, token_table, token_row, latent_times, spike_times, self.freqs, spike_mask
        )
        latents = latents + self.enc_ffn(latents)

        # Multimodal tokens (behaviour, images), concatenated along the token axis.
        mm_tokens: Tensor | None = None
        mm_times: Tensor | None = None
        mm_mask: Tensor | None = None
        mm_parts: list[Tensor] = []
        mm_time_parts: list[Tensor] = []
        mm_mask_parts: list[Tensor] = []
        modality = self.modality_emb
        behavior_proj = self.behavior_proj
        image_proj = self.image_proj
        if modality is not None:
            if behavior_proj is not None and behavior_values is not None and behavior_times is not None:
                mm_parts.append(behavior_proj(behavior_values) + modality.weight[0])  # (B, Nb, D)
                mm_time_parts.append(behavior_times)
                mm_mask_parts.append(
                    behavior_mask
                    if behavior_mask is not None
                    else torch.ones_like(behavior_times, dtype=torch.bool)
                )
            if image_proj is not None and image_values is not None and image_times is not None:
                mm_parts.append(image_proj(image_values) + modality.weight[1])  # (B, Ni, D)
                mm_time_parts.append(image_times)
                mm_mask_parts.append(
                    image_mask if image_mask is not None else torch.ones_like(image_times, dtype=torch.bool)
                )
        if len(mm_parts) > 0:
            mm_tokens = torch.cat(mm_parts, dim=1)  # (B, Nm, D)
            mm_times = torch.cat(mm_time_parts, dim=1)  # (B, Nm)
            mm_mask = torch.cat(mm_mask_parts, dim=1)  # (B, Nm)

        # Process.
        for block in self.blocks:
            latents = block(latents, latent_times, self.freqs, mm_tokens, mm_times, mm_mask)  # (B, L, D)

        # Decode all future bins at once.
        bins = self.bin_emb(self.bin_index).unsqueeze(0).expand(B, -1, -1)  # (B, T, D)
        bin_times = self.bin_times.unsqueeze(0).expand(B, -1)  # (B, T)
        bins = bins + self.dec_attn(bins, latents, bin_times, latent_times, self.freqs)
        dec_mm_attn = self.dec_mm_attn
        if dec_mm_attn is not None and mm_tokens is not None and mm_times is not None:
            # bins see each behaviour sample / image event at its time relative to the bin
            bins = bins + dec_mm_attn(bins, mm_tokens, bin_times, mm_times, self.freqs, mm_mask)
        bins = bins + self.dec_ffn(bins)
        bins = bins + self.dec_self_attn(bins, bin_times, self.freqs)
        bins = bins + self.dec_self_ffn(bins)
        return self.dec_norm(bins)  # (B, T, D)

    @torch.jit.export
    def log_baseline(self, unit_counts: Tensor, history_rate_hz: Tensor) -> Tensor:
        """Log of the persistence baseline (:func:`baseline_rate_hz`, Hz), ``(B, U)``.

        Added to the head output when ``cfg.baseline_offset`` is set.
        """
        base = baseline_rate_hz(
            unit_counts,
            history_rate_hz,
            window_s=self.baseline_window_s,
            prior_s=self.baseline_prior_s,
            floor_hz=self.baseline_floor_hz,
        )  # (B, U) Hz
        return torch.log(base)

    @torch.jit.export
    def forward_with_embeddings(
        self,
        unit_embeddings: Tensor,
        unit_mask: Tensor,
        unit_counts: Tensor,
        history_rate_hz: Tensor,
        ref_rate_hz: Tensor,
        spike_unit_index: Tensor,
        spike_times: Tensor,
        spike_type: Tensor,
        spike_mask: Tensor,
        behavior_times: Tensor | None = None,
        behavior_values: Tensor | None = None,
        behavior_mask: Tensor | None = None,
        image_times: Tensor | None = None,
        image_values: Tensor | None = None,
        image_mask: Tensor | None = None,
    ) -> Tensor:
        """:meth:`forward` with precomputed unit embeddings ``(B, U, D)`` instead of features."""
        bins = self.bin_states(
            unit_embeddings,
            spike_unit_index,
            spike_times,
            spike_type,
            spike_mask,
            behavior_times,
            behavior_values,
            behavior_mask,
            image_times,
            image_values,
            image_mask,
        )  # (B, T, D)
        unit_vec = self.unit_vectors(
            unit_embeddings, unit_counts, history_rate_hz, ref_rate_hz
        )  # (B, U, D+A)
        offset = self.log_baseline(unit_counts, history_rate_hz) if self.baseline_offset else None  # (B, U)
        head = self.head
        log_rate = head.combine(head.unit_part(unit_vec), head.bin_part(bins), offset)  # (B, U, T)
        log_rate = log_rate.clamp(self.log_rate_min, self.log_rate_max)
        return log_rate.masked_fill(~unit_mask.unsqueeze(-1), self.log_rate_min)  # (B, U, T) log Hz

    def forward(
        self,
        unit_features: Tensor,
        unit_mask: Tensor,
        unit_counts: Tensor,
        history_rate_hz: Tensor,
        ref_rate_hz: Tensor,
        spike_unit_index: Tensor,
        spike_times: Tensor,
        spike_type: Tensor,
        spike_mask: Tensor,
        behavior_times: Tensor | None = None,
        behavior_values: Tensor | None = None,
        behavior_mask: Tensor | None = None,
        image_times: Tensor | None = None,
        image_values: Tensor | None = None,
        image_mask: Tensor | None = None,
    ) -> Tensor:
        """Log firing rate (Hz) of every unit in every future bin, ``(B, U, n_bins)``.

        Args (all from :func:`collate`; ``B`` windows, ``U`` units, ``N`` tokens):
            unit_features: ``(B, U, n_features)`` float32 z-scored reference features.
            unit_mask: ``(B, U)`` bool, True for real units.
            unit_counts: ``(B, U, S)`` float32 spike counts in the last ``activity_scales[s]``
                seconds of the context.
            history_rate_hz: ``(B, U)`` float32 rate over ``history_s`` before the context, Hz.
            ref_rate_hz: ``(B, U)`` float32 rate in the reference window, Hz.
            spike_unit_index: ``(B, N)`` int64 row into the unit axis.
            spike_times: ``(B, N)`` float32 seconds from the context start.
            spike_type: ``(B, N)`` int64 token type (0 spike, 1 unit start, 2 unit end).
            spike_mask: ``(B, N)`` bool, True for real tokens.
            behavior_*: ``(B, Nb)`` times (s from context start), ``(B, Nb, behavior_dim)`` values,
                ``(B, Nb)`` mask; only for models with ``behavior_dim > 0``.
            image_*: ``(B, Ni)`` times, ``(B, Ni, image_dim + 1)`` embeddings with the schedule-marker
                column, ``(B, Ni)`` mask; only for models with ``image_dim > 0``.

        Returns:
            ``(B, U, n_bins)`` float32 log-rate in Hz, in ``[LOG_RATE_MIN, LOG_RATE_MAX]``; padded units
            hold ``LOG_RATE_MIN``. Expected counts per bin: ``exp(log_rate) * bin_size_s``.
        """
        return self.forward_with_embeddings(
            self.embed_units(unit_features),
            unit_mask,
            unit_counts,
            history_rate_hz,
            ref_rate_hz,
            spike_unit_index,
            spike_times,
            spike_type,
            spike_mask,
            behavior_times,
            behavior_values,
            behavior_mask,
            image_times,
            image_values,
            image_mask,
        )


def poisson_loss(
    log_rate_hz: Tensor, counts: Tensor, *, bin_size_s: float, unit_mask: Tensor | None = None
) -> Tensor:
    """Mean Poisson negative log-likelihood per (unit, bin), without the ``log(y!)`` constant.

    ``log_rate_hz`` ``(B, U, T)`` from :meth:`NeuroHorizon.forward`, ``counts`` ``(B, U, T)`` spikes per
    bin, ``unit_mask`` ``(B, U)`` (padded units are ignored). ``mu = exp(log_rate) * bin_size_s``,
    ``nll = mu - counts * log(mu)``.
    """
    log_mu = log_rate_hz + math.log(bin_size_s)  # (B, U, T) log expected counts
    nll = torch.exp(log_mu) - counts * log_mu  # (B, U, T)
    if unit_mask is None:
        return nll.mean()
    w = unit_mask.unsqueeze(-1).to(nll.dtype).expand_as(nll)
    return (nll * w).sum() / w.sum().clamp_min(1.0)


# ================================================================================================
# Tokenizer and collate (CPU, numpy)
# ================================================================================================


def _float_array(x: Any, *, name: str, shape: tuple[int | None, ...], fix: str) -> np.ndarray:
    """``x`` as a finite float array of ``shape`` (None = any length), else :class:`InputError`."""
    if isinstance(x, Tensor):
        x = x.detach().cpu().numpy()
    a = np.asarray(x)
    if not (np.issubdtype(a.dtype, np.floating) or np.issubdtype(a.dtype, np.integer)) or a.dtype == np.bool_:
        raise InputError(f"{name}: must be numbers, got dtype {a.dtype}; {fix}")
    if a.ndim != len(shape) or any(s is not None and s != n for s, n in zip(shape, a.shape)):
        want = "(" + ", ".join("N" if s is None else str(s) for s in shape) + ")"
        raise InputError(f"{name}: expected shape {want}, got {a.shape}; {fix}")
    if a.size and not np.all(np.isfinite(a)):
        raise InputError(f"{name}: contains NaN or infinite values; {fix}")
    return a


def _events(
    events: Any, *, name: str, width: int, start: float, end: float, where: str = "context window"
) -> tuple[np.ndarray, np.ndarray]:
    """Validate ``(times (N,), values (N, width))`` events inside ``[start, end)`` (``where`` names it)."""
    if not isinstance(events, (tuple, list)) or len(events) != 2:
        raise InputError(
            f"{name}: pass a pair (times (N,), values (N, {width})), got {type(events).__name__}"
        )
    times = _float_array(events[0], name=f"{name} times", shape=(None,), fix="pass times in seconds")
    values = _float_array(
        events[1], name=f"{name} values", shape=(None, None), fix=f"pass a (N, {width}) float array"
    )
    if values.shape[1] != width:
        raise InputError(
            f"{name}: values have width {values.shape[1]} but this model takes {width}; "
            "pass the features the model was trained with"
        )
    if values.shape[0] != times.shape[0]:
        raise InputError(
            f"{name}: {times.shape[0]} times but {values.shape[0]} value rows; pass one row per time"
        )
    if times.size and (times.min() < start or times.max() >= end):
        off = times.min() if times.min() < start else times.max()
        raise InputError(
            f"{name}: time {off:.6g} s is outside the {where} [{start:.6g}, {end:.6g}) s; "
            f"send only {name} inside the {where}"
        )
    return times.astype(np.float64), values.astype(np.float32)


def tokenize(
    cfg: ModelConfig,
    *,
    unit_features: Any,
    spike_times: Any,
    spike_unit_index: Any,
    ctx_start: float,
    ref_rate_hz: Any,
    history_counts: Any = None,
    history_duration_s: float | None = None,
    behavior: tuple[Any, Any] | None = None,
    images: tuple[Any, Any] | None = None,
    image_schedule_s: float | None = None,
) -> dict[str, Tensor]:
    """Turn ONE window's data into model inputs (CPU tensors, no batch axis).

    Args:
        cfg: The model config.
        unit_features: ``(U, n_features)`` float z-scored reference features (FeatureNorm applied).
        spike_times: ``(n,)`` spike times in absolute seconds, sorted, all inside the context
            ``[ctx_start, ctx_start + context_s)``.
        spike_unit_index: ``(n,)`` int row of each spike's unit in ``unit_features``.
        ctx_start: context start, absolute seconds.
        ref_rate_hz: ``(U,)`` firing rate in the reference window, Hz.
        history_counts: ``(U,)`` spike counts in ``[ctx_start - history_s, ctx_start)``; None falls
            back to ``ref_rate_hz * history_s`` (i.e. the history rate is the reference rate).
        history_duration_s: seconds actually covered by ``history_counts`` (default ``history_s``;
            pass less near the recording start).
        behavior: ``(times (Nb,), values (Nb, behavior_dim))`` samples inside the context, absolute
            seconds; only for models with ``behavior_dim > 0``.
        images: ``(times (Ni,), embeddings (Ni, image_dim))`` image-presentation onsets inside the
            context or the forecast window, ``[ctx_start, ctx_start + context_s + horizon_s)`` (images
            already shown and those scheduled next); only for models with ``image_dim > 0``.
        image_schedule_s: how many seconds after the context end ``images`` is complete, in
            ``[0, horizon_s]``: 0 = only the images shown so far are known, ``horizon_s`` = the whole
            coming stimulus sequence is known (pass it with an empty list for "no image will be
            shown"). Default: ``horizon_s`` when an image lies after the context end, else 0.

    Returns:
        Dict with the keys of :meth:`NeuroHorizon.forward` (unbatched): unit-level
        ``unit_features (U, F)``, ``unit_mask (U,)``, ``unit_counts (U, S)``,
        ``history_rate_hz (U,)``, ``ref_rate_hz (U,)``; token-level ``spike_unit_index``,
        ``spike_times`` (float32 seconds from ``ctx_start``), ``spike_type``, ``spike_mask`` of
        length ``2 U + n`` (each unit's start and end tokens first, then the spikes); and for
        multimodal models ``behavior_*`` / ``image_*``.

    Raises:
        InputError: for any malformed input (the message says how to fix it).
    """
    feats = _float_array(
        unit_features,
        name="unit_features",
        shape=(None, cfg.n_features),
        fix=f"pass one row of {cfg.n_features} normalised reference features per unit",
    )
    if not np.issubdtype(feats.dtype, np.floating):
        raise InputError(f"unit_features: must be float (z-scored features), got dtype {feats.dtype}")
    n_units = feats.shape[0]
    if n_units == 0:
        raise InputError("unit_features: there are zero units; pass at least one unit")
    try:
        ctx_start = float(ctx_start)
    except (TypeError, ValueError):
        raise InputError(f"ctx_start: must be a number of seconds, got {ctx_start!r}") from None
    if not (math.isfinite(ctx_start) and ctx_start >= 0):
        raise InputError(f"ctx_start: must be a finite time >= 0 seconds, got {ctx_start}")
    ctx_end = ctx_start + cfg.context_s
    times, units = check_spikes(
        spike_times, spike_unit_index, n_units=n_units, name="context spikes", window=(ctx_start, ctx_end)
    )
    ref = _float_array(ref_rate_hz, name="ref_rate_hz", shape=(n_units,), fix="pass one rate (Hz) per unit")
    if np.any(ref < 0):
        raise InputError("ref_rate_hz: rates must be >= 0 Hz")
    hist_s = cfg.history_s if history_duration_s is None else float(history_duration_s)
    if not (math.isfinite(hist_s) and hist_s > 0):
        raise InputError(f"history_duration_s: must be > 0 seconds, got {history_duration_s}")
    if history_counts is None:
        hist_rate = ref.astype(np.float64)
    else:
        hist = _float_array(
            history_counts, name="history_counts", shape=(n_units,), fix="pass one spike count per unit"
        )
        if np.any(hist < 0):
            raise InputError("history_counts: counts must be >= 0")
        with np.errstate(over="ignore"):
            hist_rate = hist / hist_s  # (U,) Hz; overflow is rejected just below
        if not np.all(hist_rate <= MAX_HISTORY_RATE_HZ):
            raise InputError(
                f"history_counts / history_duration_s: gives a rate above {MAX_HISTORY_RATE_HZ:g} Hz; "
                "pass spike counts over the history window and its length in seconds"
            )

    # Per-unit counts in the last s seconds of the context, for each activity scale.
    rel = times - ctx_start  # (n,) seconds from the context start, float64
    counts = np.stack(
        [np.bincount(units[rel >= cfg.context_s - s], minlength=n_units) for s in cfg.activity_scales], axis=1
    ).astype(np.float32)  # (U, S)

    # Token sequence: per-unit start / end tokens, then the spikes.
    se_units = np.repeat(np.arange(n_units, dtype=np.int64), 2)  # (2U,) [0, 0, 1, 1, ..]
    se_types = np.tile(np.array([TOKEN_UNIT_START, TOKEN_UNIT_END], dtype=np.int64), n_units)  # (2U,)
    se_times = np.tile(np.array([0.0, cfg.context_s]), n_units)  # (2U,)
    tok_units = np.concatenate([se_units, units])
    tok_types = np.concatenate([se_types, np.full(units.shape[0], TOKEN_SPIKE, dtype=np.int64)])
    tok_times = np.concatenate([se_times, rel]).astype(np.float32)

    out = {
        "unit_features": torch.from_numpy(np.ascontiguousarray(feats, dtype=np.float32)),
        "unit_mask": torch.ones(n_units, dtype=torch.bool),
        "unit_counts": torch.from_numpy(counts),
        "history_rate_hz": torch.from_numpy(np.asarray(hist_rate, dtype=np.float32)),
        "ref_rate_hz": torch.from_numpy(np.asarray(ref, dtype=np.float32)),
        "spike_unit_index": torch.from_numpy(tok_units),
        "spike_times": torch.from_numpy(tok_times),
        "spike_type": torch.from_numpy(tok_types),
        "spike_mask": torch.ones(tok_units.shape[0], dtype=torch.bool),
    }
    if cfg.image_dim == 0 and image_schedule_s is not None:
        raise InputError("image_schedule_s: this model takes no images; pass image_schedule_s=None")
    img_end = ctx_end + cfg.horizon_s
    for kind, events, width, keys, end, where in (
        ("behavior", behavior, cfg.behavior_dim, BEHAVIOR_KEYS, ctx_end, "context window"),
        ("images", images, cfg.image_dim, IMAGE_KEYS, img_end, "context and forecast window"),
    ):
        if width == 0:
            if events is not None:
                raise InputError(
                    f"{kind}: this model takes no {kind} input ({kind} width 0); pass {kind}=None"
                )
            continue
        if events is None:
            ev_t, ev_v = np.zeros(0), np.zeros((0, width), dtype=np.float32)
        else:
            ev_t, ev_v = _events(events, name=kind, width=width, start=ctx_start, end=end, where=where)
        if kind == "images":
            ev_t, ev_v = _with_schedule_marker(ev_t, ev_v, image_schedule_s, ctx_end=ctx_end, cfg=cfg)
        out[keys[0]] = torch.from_numpy((ev_t - ctx_start).astype(np.float32))  # (Ne,) s from ctx start
        out[keys[1]] = torch.from_numpy(np.ascontiguousarray(ev_v, dtype=np.float32))  # (Ne, width)
        out[keys[2]] = torch.ones(ev_t.shape[0], dtype=torch.bool)  # (Ne,)
    return out


def _with_schedule_marker(
    times: np.ndarray, emb: np.ndarray, schedule_s: float | None, *, ctx_end: float, cfg: ModelConfig
) -> tuple[np.ndarray, np.ndarray]:
    """Image events ``(Ni,)``, ``(Ni, image_dim)`` -> ``(Ni + 1,)``, ``(Ni + 1, image_dim + 1)``: a
    zero marker column, then one marker token at ``ctx_end + schedule_s`` (see the module docstring)."""
    if schedule_s is None:
        schedule_s = cfg.horizon_s if times.size and times.max() >= ctx_end else 0.0
    try:
        schedule_s = float(schedule_s)
    except (TypeError, ValueError):
        raise InputError(f"image_schedule_s: must be a number of seconds, got {schedule_s!r}") from None
    if not (math.isfinite(schedule_s) and 0.0 <= schedule_s <= cfg.horizon_s + 1e-9):
        raise InputError(
            f"image_schedule_s: must be between 0 and {cfg.horizon_s:g} s (the forecast window), got {schedule_s}"
        )
    known_until = ctx_end + schedule_s
    if times.size and times.max() >= known_until:
        raise InputError(
            f"images: an image at {times.max():.6g} s lies after the known schedule, which ends at "
            f"{known_until:.6g} s (image_schedule_s={schedule_s:g}); pass image_schedule_s up to "
            f"{cfg.horizon_s:g} s to say the coming images are known, or drop the later images"
        )
    marked = np.zeros((emb.shape[0] + 1, emb.shape[1] + 1), dtype=np.float32)
    marked[:-1, :-1] = emb
    marked[-1, IMAGE_MARKER_COLUMN] = 1.0
    return np.append(times, min(known_until, ctx_end + cfg.horizon_s)), marked


def _pad_stack(tensors: list[Tensor], *, min_len: int = 0) -> Tensor:
    """Stack ``(n_i, ...)`` tensors into ``(B, max(n_i, min_len), ...)``, zero-padded at the end."""
    rest = tensors[0].shape[1:]
    length = max(max(t.shape[0] for t in tensors), min_len)
    out = torch.zeros((len(tensors), length, *rest), dtype=tensors[0].dtype)
    for i, t in enumerate(tensors):
        out[i, : t.shape[0]] = t
    return out


def collate(items: list[dict[str, Tensor]]) -> dict[str, Tensor]:
    """Pad a list of :func:`tokenize` outputs into a batch (keys = :meth:`NeuroHorizon.forward` kwargs).

    Units are padded to the largest unit count, tokens to the largest token count
    (masks False, zeros elsewhere). Behaviour / image axes are padded to at least 1
    so that a batch without any such event still has a (fully masked) token.
    """
    if not isinstance(items, (list, tuple)) or len(items) == 0:
        raise InputError("collate: pass a non-empty list of tokenized windows")
    keys = list(items[0].keys())
    for i, it in enumerate(items):
        if list(it.keys()) != keys:
            raise InputError(
                f"collate: window #{i} has keys {sorted(it)} but window #0 has {sorted(keys)}; "
                "tokenize every window with the same model"
            )
    batch: dict[str, Tensor] = {}
    for key in keys:
        tensors = [it[key] for it in items]
        shapes = {tuple(t.shape[1:]) for t in tensors}
        if len(shapes) != 1:
            raise InputError(f"collate: {key} has different trailing shapes {sorted(shapes)} across windows")
        min_len = 1 if key in BEHAVIOR_KEYS or key in IMAGE_KEYS else 0
        batch[key] = _pad_stack(tensors, min_len=min_len)
    return batch


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)

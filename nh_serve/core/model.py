# Over 500 lines: one nn.Module whose methods TorchScript, the ONNX export and the Triton backend all see.
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

Inputs come from the window pipeline, :mod:`nh_serve.data.windows`: ``tokenize``
(CPU, numpy) turns one window's data into a dict of tensors, ``collate`` pads a
list of them into a batch whose keys are exactly the keyword arguments of
:meth:`NeuroHorizon.forward`. The model's own ``tokenize`` / ``collate`` call them
with its config::

    model = NeuroHorizon(get_config("nh-small"))
    item = model.tokenize(unit_features=f, spike_times=t, spike_unit_index=u,
                          ctx_start=10.0, ref_rate_hz=r)
    log_rate_hz = model(**model.collate([item]))  # (1, U, 50)
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from nh_serve.core.blocks import FeedForward, IDEncoder, PerNeuronHead, ProcessorBlock
from nh_serve.core.config import ModelConfig
from nh_serve.core.rotary import RotaryCrossAttention, RotarySelfAttention, rotary_freqs
from nh_serve.core.unit_paths import PopulationReadout, PopulationTokens, UnivariateTerm
from nh_serve.data import windows
from nh_serve.data.history import LOG_FLOOR_HZ, SLOW_TAU

__all__ = [
    "BASELINE_FLOOR_HZ",
    "LOG_RATE_MAX",
    "LOG_RATE_MIN",
    "FeedForward",
    "IDEncoder",
    "NeuroHorizon",
    "PerNeuronHead",
    "ProcessorBlock",
    "baseline_rate_hz",
    "count_parameters",
    "poisson_loss",
]

# Output clamp of the log-rate (Hz) before anyone exponentiates it: 1e-4 Hz .. 1000 Hz.
LOG_RATE_MIN = math.log(1e-4)
LOG_RATE_MAX = math.log(1e3)
# Floor of the persistence baseline (Hz), so silent units get a finite log.
BASELINE_FLOOR_HZ = 1e-2


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

        # History models: the per-unit forecaster and the population read-out (nh_serve.core.unit_paths).
        K = len(cfg.history_taus)
        self.n_history = K
        self.log_floor_hz = LOG_FLOOR_HZ
        self.has_history = K > 0
        self.uni_path = cfg.uni_path
        self.pop_path = cfg.pop_path
        self.slow_index = list(cfg.history_taus).index(SLOW_TAU) if K else 0
        self.register_buffer(
            "rel_index", torch.tensor([i for i in range(K) if i != self.slow_index], dtype=torch.long), persistent=False
        )  # (K - 1,) the time constants measured against the slow one (derived from the config: not saved)
        self.univariate = UnivariateTerm(n_features=K - 1, n_bins=cfg.n_bins) if K and cfg.uni_path else None
        n_tok = (K - 1 + cfg.pop_context_bins) if K and cfg.pop_tokens and cfg.pop_path else 0
        self.n_context_bins = cfg.pop_context_bins
        self.context_bin_s = cfg.context_s / max(cfg.pop_context_bins, 1)
        self.pop_tok = PopulationTokens(dim=D, n_scales=n_tok) if n_tok else None
        self.readout = (
            PopulationReadout(dim=D, width=cfg.readout_dim, n_bins=cfg.n_bins, n_tokens=n_tok if cfg.pop_context_bins else 0)
            if cfg.readout_dim and cfg.pop_path
            else None
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

    def init_univariate(self, band_weights, bin_band) -> None:
        """Start the GLM term at a fitted ``univariate_glm``: ``band_weights`` ``(n_bands, K)``
        (:class:`~nh_serve.core.univariate_glm.UnivariateGLM` weights, same time constants),
        ``bin_band`` ``(n_bins,)`` the band of each bin."""
        if self.univariate is None:
            raise ValueError("init_univariate: this model has no univariate term (history_taus empty or uni_path off)")
        w = torch.as_tensor(band_weights, dtype=torch.float32)[torch.as_tensor(bin_band, dtype=torch.long)]
        if tuple(w.shape) != tuple(self.univariate.weight.shape):
            raise ValueError(f"init_univariate: weights give {tuple(w.shape)}, the term holds {tuple(self.univariate.weight.shape)}")
        with torch.no_grad():
            self.univariate.weight.copy_(w)

    # ---- CPU-side input preparation (the window pipeline, nh_serve.data.windows) ---------------
    def tokenize(self, **kwargs: Any) -> dict[str, Tensor]:
        """:func:`nh_serve.data.windows.tokenize` with this model's config."""
        return windows.tokenize(self.cfg, **kwargs)

    @staticmethod
    def collate(items: list[dict[str, Tensor]]) -> dict[str, Tensor]:
        """:func:`nh_serve.data.windows.collate`."""
        return windows.collate(items)

    # ---- forward pieces --------------------------------------------------------------------------
    @torch.jit.export
    def embed_units(self, unit_features: Tensor) -> Tensor:
        """Unit embeddings ``(B, U, D)`` from z-scored reference features ``(B, U, n_features)``.

        Cache them (or adapt them) and pass them to :meth:`forward_with_embeddings`.
        """
        return self.unit_encoder(unit_features)

    @torch.jit.export
    def history_features(self, history_rates: Tensor) -> tuple[Tensor, Tensor]:
        """Smoothed rates ``(B, U, K)`` (Hz, at ``cfg.history_taus``) -> relative log rates
        ``(B, U, K - 1)`` and the slow log rate ``(B, U)`` (``log(r_30s + 0.1 Hz)``), as
        :func:`nh_serve.data.history.log_history` computes them."""
        logs = torch.log(history_rates.clamp_min(0.0) + self.log_floor_hz)
        slow = logs[:, :, self.slow_index]
        return logs.index_select(2, self.rel_index) - slow.unsqueeze(-1), slow

    @torch.jit.export
    def unit_vectors(
        self,
        unit_embeddings: Tensor,
        unit_counts: Tensor,
        history_rate_hz: Tensor,
        ref_rate_hz: Tensor,
        history_rates: Tensor | None = None,
    ) -> Tensor:
        """Head input per unit: ``concat(embedding, activity)``, ``(B, U, D + n_activity)``.

        ``activity = log1p([counts_s / s for s in activity_scales], history_rate_hz, ref_rate_hz)``
        (rates in Hz; negative inputs are treated as 0). History models replace ``history_rate_hz``
        by the relative and slow log rates of ``history_rates`` (zeros without the per-unit path).
        """
        rates = unit_counts / self.activity_scales  # (B, U, S) Hz
        if self.has_history and history_rates is not None:
            recent = torch.log1p(torch.cat((rates, ref_rate_hz.unsqueeze(-1)), dim=-1).clamp_min(0.0))
            rel, slow = self.history_features(history_rates)
            hist = torch.cat((rel, slow.unsqueeze(-1)), dim=-1)  # (B, U, K)
            if not self.uni_path:  # ablation: no per-unit history in the head
                hist = torch.zeros_like(hist)
            activity = torch.cat((recent, hist), dim=-1)  # (B, U, S + 1 + K)
        else:
            activity = torch.cat(
                (rates, history_rate_hz.unsqueeze(-1), ref_rate_hz.unsqueeze(-1)), dim=-1
            )  # (B, U, S + 2) Hz
            activity = torch.log1p(activity.clamp_min(0.0))
        if not self.head_activity:  # ablation: the head sees the unit embedding only
            activity = torch.zeros_like(activity)
        return torch.cat((unit_embeddings, activity), dim=-1)  # (B, U, D + n_activity)

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
        extra_tokens: Tensor | None = None,
    ) -> Tensor:
        """Encoder + processor + decoder: the decoded future bins ``(B, T, D)`` (input of the head).

        ``extra_tokens`` ``(B, P, D)`` (the population history tokens) join the latents in the
        processor and the decoder's cross-attention, at time 0 (rotary: the context start).
        """
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

        if extra_tokens is not None:
            latents = torch.cat((latents, extra_tokens), dim=1)  # (B, L + P, D)
            latent_times = torch.cat((latent_times, torch.zeros_like(extra_tokens[:, :, 0])), dim=1)

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
    def log_rate_parts(
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
        history_rates: Tensor | None = None,
        head_units: Tensor | None = None,
        unit_bins: Tensor | None = None,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """The unclamped log rate without any ``unit_readout`` ``(B, U, T)``, the read-out design
        ``(B, T, K + 1)`` (empty ``K + 1 = 0`` without a read-out) and the decoded bins ``(B, T, D)``.

        ``log_rate = parts + unit_readout . design`` (then clamped and masked) is
        :meth:`forward_with_embeddings`; the registration fit solves for ``unit_readout``.
        ``head_units`` ``(B, Uh)``: rows of the units to forecast (training forecasts a few units
        per window while the encoder reads every unit's spikes); the log rate is then ``(B, Uh, T)``.
        """
        B = spike_times.shape[0]
        hist = history_rates
        if self.has_history and hist is None:  # no history known: the reference rate stands in
            hist = ref_rate_hz.unsqueeze(-1).expand(-1, -1, self.n_history)
        extra: Tensor | None = None
        pop_tok = self.pop_tok
        if pop_tok is not None and hist is not None:
            rel_h, slow_h = self.history_features(hist)
            if self.n_context_bins > 0:  # the last second, bin by bin, against the slow rate (0 when not given)
                if unit_bins is not None:
                    recent = torch.log(unit_bins / self.context_bin_s + self.log_floor_hz) - slow_h.unsqueeze(-1)
                else:
                    recent = torch.zeros(rel_h.shape[0], rel_h.shape[1], self.n_context_bins, dtype=rel_h.dtype)
                rel_h = torch.cat((rel_h, recent), dim=-1)  # (B, U, K - 1 + nb)
            extra = pop_tok(unit_embeddings, unit_mask, rel_h)  # (B, K - 1 + nb, D)
        if self.pop_path:
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
                extra,
            )  # (B, T, D)
        else:  # ablation: no population path, every unit from its own history
            bins = torch.zeros(B, self.n_bins, unit_embeddings.shape[2], dtype=unit_embeddings.dtype, device=unit_embeddings.device)
        if head_units is not None:  # forecast only these units: gather their unit-level inputs
            idx = head_units.unsqueeze(-1)
            unit_embeddings = unit_embeddings.gather(1, idx.expand(-1, -1, unit_embeddings.shape[2]))
            unit_counts = unit_counts.gather(1, idx.expand(-1, -1, unit_counts.shape[2]))
            history_rate_hz = history_rate_hz.gather(1, head_units)
            ref_rate_hz = ref_rate_hz.gather(1, head_units)
            if hist is not None:
                hist = hist.gather(1, idx.expand(-1, -1, hist.shape[2]))
        unit_vec = self.unit_vectors(unit_embeddings, unit_counts, history_rate_hz, ref_rate_hz, hist)  # (B, U, D+A)
        offset: Tensor | None = None
        if self.baseline_offset:
            if self.has_history and hist is not None:
                offset = self.history_features(hist)[1]  # (B, U) log(r_30s + 0.1)
            else:
                offset = self.log_baseline(unit_counts, history_rate_hz)  # (B, U)
        head = self.head
        bin_part = head.bin_part(bins) if self.pop_path else torch.zeros_like(head.bin_part(bins))
        log_rate = head.combine(head.unit_part(unit_vec), bin_part, offset)  # (B, U, T)
        univariate = self.univariate
        if univariate is not None and hist is not None:
            log_rate = log_rate + univariate(self.history_features(hist)[0])
        readout = self.readout
        design = torch.zeros(B, self.n_bins, 0, dtype=log_rate.dtype, device=log_rate.device)
        if readout is not None:
            log_rate = log_rate + readout(bins, unit_embeddings, None, extra)
            design = readout.design(bins, extra)
        return log_rate, design, bins

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
        history_rates: Tensor | None = None,
        unit_readout: Tensor | None = None,
        unit_bins: Tensor | None = None,
    ) -> Tensor:
        """:meth:`forward` with precomputed unit embeddings ``(B, U, D)`` instead of features."""
        log_rate, design, _ = self.log_rate_parts(
            unit_embeddings,
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
            history_rates,
            None,
            unit_bins,
        )
        if unit_readout is not None and design.shape[2] > 0:
            log_rate = log_rate + torch.matmul(unit_readout, design.transpose(1, 2))  # (B, U, T)
        return self.finish_log_rate(log_rate, unit_mask)

    @torch.jit.export
    def finish_log_rate(self, log_rate: Tensor, unit_mask: Tensor) -> Tensor:
        """Clamp to ``[LOG_RATE_MIN, LOG_RATE_MAX]``; padded units get ``LOG_RATE_MIN``. ``(B, U, T)``."""
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
        history_rates: Tensor | None = None,
        unit_readout: Tensor | None = None,
        unit_bins: Tensor | None = None,
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
            history_rates: ``(B, U, K)`` float32 smoothed rates (Hz) at ``cfg.history_taus`` at the
                context end (:mod:`nh_serve.data.history`); history models only (None: the reference
                rate stands in for every time constant).
            unit_readout: ``(B, U, readout_dim + 1)`` per-unit read-out correction (zeros or None:
                zero-shot); models with ``readout_dim > 0`` only.
            unit_bins: ``(B, U, pop_context_bins)`` each unit's spike count in equal bins of the
                context; models with ``pop_context_bins > 0`` only.

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
            history_rates,
            unit_readout,
            unit_bins,
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


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)

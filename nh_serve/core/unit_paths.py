"""The per-unit forecaster and the population read-out of history models (``cfg.history_taus``).

Three small modules that :class:`nh_serve.core.model.NeuroHorizon` wires around its
transformer:

:class:`UnivariateTerm`
    ``g[u, k] = A_k . [rel_u, 1]``: a Poisson-GLM term per future bin on the unit's own
    relative log rates ``rel_u`` (``log(r_tau + 0.1) - log(r_30s + 0.1)`` for every other
    time constant). With the offset ``log(r_30s + 0.1)`` this *is* the ``univariate_glm``
    baseline (:mod:`nh_serve.core.glm`, whose band weights initialise
    ``A``), so the model starts from it and can only learn on top of it.
:class:`PopulationTokens`
    One token per history time scale, ``sum_u rel_uj W e_u / sqrt(U)`` plus a learned
    scale embedding: the population's recent activity at that scale, each unit weighted
    by a vector of its embedding. The processor attends to them beside the latents, so
    the state read from the last second of spikes also knows the last minutes.
:class:`PopulationReadout`
    ``h[u, k] = (B e_u + r_u) . P_k + r_u0`` with ``P = Linear(bins)`` ``(T, K)``: the unit
    reads the decoded population forecast through a vector that its embedding predicts
    (zero-shot) plus a correction ``r_u`` (``unit_readout``: learned per unit in training,
    fitted on the reference window at registration). ``P`` with a column of ones is the
    design of that fit (:meth:`PopulationReadout.design`).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


class UnivariateTerm(nn.Module):
    """``(B, U, F)`` relative log rates -> ``(B, U, T)`` GLM term ``A_k . [rel, 1]``."""

    def __init__(self, *, n_features: int, n_bins: int):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(n_bins, n_features + 1))  # (T, F + 1), last column: intercept

    def forward(self, rel: Tensor) -> Tensor:
        w = self.weight
        return torch.matmul(rel, w[:, :-1].t()) + w[:, -1]  # (B, U, T)


class PopulationTokens(nn.Module):
    """Unit embeddings ``(B, U, D)``, mask ``(B, U)``, per-scale values ``(B, U, S)`` -> ``(B, S, D)``."""

    def __init__(self, *, dim: int, n_scales: int):
        super().__init__()
        self.write = nn.Linear(dim, dim, bias=False)
        self.scale_emb = nn.Parameter(torch.randn(n_scales, dim) * 0.02)

    def forward(self, unit_embeddings: Tensor, unit_mask: Tensor, values: Tensor) -> Tensor:
        m = unit_mask.to(values.dtype)  # (B, U)
        n = m.sum(1).clamp_min(1.0).sqrt()  # (B,)
        w = self.write(unit_embeddings)  # (B, U, D)
        tok = torch.matmul((values * m.unsqueeze(-1)).transpose(1, 2), w)  # (B, S, D)
        return tok / n.view(-1, 1, 1) + self.scale_emb


class PopulationReadout(nn.Module):
    """Decoded bins ``(B, T, D)`` and unit embeddings ``(B, U, D)`` -> read-out term ``(B, U, T)``.

    With ``n_tokens`` the forecast also has a direct path from the population tokens ``(B, n, D)``:
    ``P = Linear(bins) + MLP(flatten(tokens))``, a population state the read-out can use from the
    first training step while the transformer learns what the last second of spikes adds.
    """

    def __init__(self, *, dim: int, width: int, n_bins: int, n_tokens: int = 0, hidden: int = 256):
        super().__init__()
        self.width = width
        self.n_bins = n_bins
        self.forecast = nn.Linear(dim, width)  # P: O(1) values from the start, so read-outs learn at once
        self.zero_shot = nn.Linear(dim, width, bias=False)  # B: small, the term starts near 0
        nn.init.normal_(self.zero_shot.weight, std=0.02 / math.sqrt(dim))
        self.direct = (
            nn.Sequential(nn.LayerNorm(n_tokens * dim), nn.Linear(n_tokens * dim, hidden), nn.GELU(), nn.Linear(hidden, n_bins * width))
            if n_tokens
            else None
        )

    def design(self, bins: Tensor, tokens: Tensor | None = None) -> Tensor:
        """``(B, T, K + 1)``: the population forecast ``P`` with a column of ones (the per-unit fit's design)."""
        P = self.forecast(bins)  # (B, T, K)
        direct = self.direct
        if direct is not None and tokens is not None:
            P = P + direct(tokens.flatten(1)).view(-1, self.n_bins, self.width)
        return torch.cat((P, torch.ones_like(P[..., :1])), dim=-1)

    def forward(
        self, bins: Tensor, unit_embeddings: Tensor, unit_readout: Tensor | None, tokens: Tensor | None = None
    ) -> Tensor:
        X = self.design(bins, tokens)  # (B, T, K + 1)
        beta = self.zero_shot(unit_embeddings)  # (B, U, K)
        beta = torch.cat((beta, torch.zeros_like(beta[..., :1])), dim=-1)  # no zero-shot bias
        if unit_readout is not None:
            beta = beta + unit_readout  # (B, U, K + 1)
        return torch.matmul(beta, X.transpose(1, 2))  # (B, U, T)

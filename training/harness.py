"""What a history model's training adds around the network (:mod:`nh_serve.core.unit_paths`).

- :class:`Harness`: the model plus one read-out table per training recording (``(U, K + 1)``,
  zeros at the start): each training unit learns its population read-out, as the
  registration fit (:mod:`nh_serve.inference.reference_fit`) later estimates it for a new unit
  from its reference window. One backbone pass gives both the fitted prediction (with the
  unit's table) and the zero-shot one (without), and the loss trains both:
  ``L = L_fitted + zero_shot_weight * L_zero_shot + readout_l2 * mean(table^2)``.
- :func:`fit_univariate_start`: the ``univariate_glm`` baseline fitted on the training
  recordings; the model's GLM term starts from its weights (so the untrained model *is*
  that baseline) and the checkpoint carries it (``training["baselines"]``), so eval and
  score compare the model with the GLM fitted on the same recordings.
- :func:`validate_registered`: bits/spike on held-out recordings through the Predictor,
  registered zero-shot and with the reference fit, as evaluation will score them.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from nh_serve.core.glm import band_index
from nh_serve.core.model import poisson_loss
from nh_serve.core.univariate_glm import GLMRecording, UnivariateGLM
from nh_serve.data.history import HISTORY_TAUS
from nh_serve.data.windows import cut_windows, target_counts
from nh_serve.evaluation.metrics import bits_per_spike
from nh_serve.inference.predictor import Predictor
from training.data import TrainSession, history_at


class Harness(nn.Module):
    """The model and the read-out tables of the training recordings.

    ``head_units``: units forecast per window (a random subset when a window has more; the
    encoder still reads every unit's spikes): the per-neuron head costs windows x units x bins,
    so this bounds a step's cost on recordings with hundreds of units. 0 = every unit.
    """

    def __init__(self, model: nn.Module, unit_counts: list[int], head_units: int = 0):
        super().__init__()
        self.model = model
        self.head_units = int(head_units)
        k1 = model.cfg.readout_dim + 1
        self.uses_tables = model.readout is not None
        self.tables = nn.ParameterList(
            [nn.Parameter(torch.zeros(n, k1)) for n in unit_counts] if self.uses_tables else []
        )

    def pick_units(self, unit_mask: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor | None:
        """``(B, Uh)`` rows of the units to forecast: all (None) or a random subset of the real ones per window."""
        B, U = unit_mask.shape
        if not self.head_units or U <= self.head_units:
            return None
        score = torch.rand(B, U, generator=generator) + unit_mask.float()  # real units first, in random order
        return score.topk(self.head_units, dim=1).indices

    def forward(
        self, batch: dict[str, torch.Tensor], sessions: list[int], head_units: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(log_rate with the units' tables, zero-shot log_rate, L2 penalty of the tables used)``, the
        first two ``(B, U, T)`` (``(B, Uh, T)`` for the rows ``head_units``). The penalty is computed here,
        inside the forward pass, so DistributedDataParallel sees every table's use once."""
        batch = dict(batch)
        model = self.model
        emb = model.embed_units(batch.pop("unit_features"))
        eta, design, _ = model.log_rate_parts(emb, **batch, head_units=head_units)
        mask = batch["unit_mask"] if head_units is None else batch["unit_mask"].gather(1, head_units)
        zero_shot = model.finish_log_rate(eta, mask)
        if not self.uses_tables:
            return zero_shot, zero_shot, torch.zeros(())
        U = batch["unit_mask"].shape[1]
        rows = []
        for i in sessions:
            t = self.tables[i]
            rows.append(torch.nn.functional.pad(t, (0, 0, 0, U - t.shape[0])))
        readout = torch.stack(rows)  # (B, U, K + 1)
        if head_units is not None:
            readout = readout.gather(1, head_units.unsqueeze(-1).expand(-1, -1, readout.shape[2]))
        fitted = model.finish_log_rate(eta + torch.matmul(readout, design.transpose(1, 2)), mask)
        used = sorted(set(sessions))
        penalty = torch.stack([(self.tables[i] * self.tables[i]).mean() for i in used]).mean()
        return fitted, zero_shot, penalty


def loss(harness, batch, sessions, y, *, bin_size_s: float, zero_shot_weight: float, readout_l2: float, generator=None):
    """The training loss of one batch (``harness`` may be wrapped in DistributedDataParallel)."""
    inner = harness.module if hasattr(harness, "module") else harness
    head_units = inner.pick_units(batch["unit_mask"], generator)
    fitted, zero_shot, penalty = harness(batch, sessions, head_units)
    mask = batch["unit_mask"]
    if head_units is not None:
        mask = mask.gather(1, head_units)
        y = y.gather(1, head_units.unsqueeze(-1).expand(-1, -1, y.shape[2]))
    out = poisson_loss(fitted.float(), y, bin_size_s=bin_size_s, unit_mask=mask)
    if inner.uses_tables:
        out = out + zero_shot_weight * poisson_loss(zero_shot.float(), y, bin_size_s=bin_size_s, unit_mask=mask)
        out = out + readout_l2 * penalty
    return out


def fit_univariate_start(sessions: list[TrainSession], weights: np.ndarray, *, n_bins: int, bin_size: float,
                         taus=HISTORY_TAUS) -> UnivariateGLM:
    """The univariate GLM on the training recordings (each weighted by its sampling weight)."""
    recs = [
        GLMRecording(name=s.name, times=s.times, units=s.units, n_units=s.n_units, start=s.start, end=s.end,
                     reference=s.reference, ref_rate_hz=s.ref_rate_hz.astype(np.float64), weight=float(w) * len(sessions))
        for s, w in zip(sessions, weights)
    ]
    return UnivariateGLM.fit(recs, n_bins=n_bins, bin_size=bin_size, taus=taus)


def init_model_univariate(model, glm: UnivariateGLM) -> None:
    if model.univariate is not None:
        model.init_univariate(glm.weights, band_index(model.cfg.n_bins, model.cfg.bin_size_s, glm.bands_ms))


@torch.no_grad()
def validate_registered(model, norm, sessions: list[TrainSession], starts: dict[int, list[float]]) -> dict | None:
    """Bits/spike (per recording, then averaged) of held-out recordings registered on their reference
    window, zero-shot (``fit="none"``) and with the reference fit (``fit="reference"``)."""
    if not starts or not model.cfg.has_history:
        return None
    was_training = model.training
    cfg = model.cfg
    p = Predictor(model=model, feature_norm=norm, backend="torch")
    out = {"none": [], "reference": []}
    for i, cs in starts.items():
        s = sessions[i]
        r0, r1 = s.reference
        a, b = np.searchsorted(s.times, [r0, r1])
        ctx = np.asarray(cs)
        hist = np.stack([history_at(s, c + cfg.context_s, cfg.history_taus) for c in ctx])
        wins = cut_windows(s.times, s.units, ctx, n_units=s.n_units, cfg=cfg, history_start=s.start, history_rates=hist)
        y = target_counts(s.times, s.units, ctx + cfg.context_s, n_units=s.n_units, bin_size=cfg.bin_size_s, n_bins=cfg.n_bins)
        for mode in out:
            tok = p.register(s.times[a:b], s.unit_ids[s.units[a:b]], reference_window=(r0, r1), units=s.unit_ids, fit=mode)
            pred = np.stack([q.expected_counts for q in p.predict_windows(tok, wins)])
            out[mode].append(bits_per_spike(pred, y))
            p.sessions.discard(tok)
    model.train(was_training)
    return {f"bits_per_spike_{k}": float(np.mean(v)) for k, v in out.items()} | {"sessions": len(starts)}

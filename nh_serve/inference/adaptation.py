"""Test-time adaptation: refine a registered session's unit embeddings on its own reference window.

``register(..., adapt_steps=N)``: a few Adam steps on the embeddings of next-second Poisson
loss in windows every 0.5 s of the reference (the network frozen), until a deadline; the
result is kept only when it fits the whole reference better than the embeddings it started
from. (History models fit each unit's read-out instead, in closed form:
:mod:`nh_serve.inference.reference_fit`.)
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np
import torch

from nh_serve.core.model import poisson_loss
from nh_serve.data.windows import collate, cut_windows, target_counts
from nh_serve.errors import InputError
from nh_serve.inference.limits import ADAPT_STRIDE_S
from nh_serve.inference.sessions import RegisteredSession


def adapt_embeddings(
    predictor, s: RegisteredSession, times: np.ndarray, uidx: np.ndarray, *, steps: int, deadline: float, seed: int,
    stop: Callable[[], None] = lambda: None,
):
    """Refine the unit embeddings on next-second Poisson loss inside the reference window, stepping
    until ``deadline`` (``time.monotonic()``); ``stop()`` raises when the result is no longer wanted."""
    cfg = predictor.cfg
    r0, r1 = s.reference
    span = cfg.context_s + cfg.n_bins * cfg.bin_size_s
    starts = np.arange(r0, r1 - span + 1e-9, ADAPT_STRIDE_S)
    if starts.size == 0:
        raise InputError(
            f"adapt_steps: the reference window ({r1 - r0:g} s) is shorter than one context + horizon ({span:g} s)"
        )
    order = np.argsort(times, kind="stable")
    t, u = np.asarray(times, np.float64)[order], uidx[order]
    # The history before each window, as training and predict() see it (a full history_s seconds),
    # where the reference holds that much before the window; else the reference rate stands in: a
    # shorter history gives noisier rates than training ever gave the model.
    windows = cut_windows(
        t, u, starts, n_units=s.n_units, cfg=cfg, history_start=r0, full_history=True, ref_rate_hz=s.ref_rate_hz
    )
    batch = collate([predictor.tokenize(s, w) for w in windows])
    batch.pop("unit_features")
    if s.readout is not None:
        batch["unit_readout"] = s.readout.unsqueeze(0).expand(len(windows), -1, -1)
    counts = torch.from_numpy(
        target_counts(t, u, starts + cfg.context_s, n_units=s.n_units, bin_size=cfg.bin_size_s, n_bins=cfg.n_bins)
    )  # (W, U, T)
    gen = torch.Generator().manual_seed(seed)
    emb0 = s.embeddings.detach().clone()
    emb = emb0.clone().requires_grad_(True)
    opt = torch.optim.Adam([emb], lr=1e-2)
    W = counts.shape[0]
    mb = min(16, W)
    def full_loss(e: torch.Tensor) -> float:
        with torch.no_grad():
            lr = predictor.model.forward_with_embeddings(e.unsqueeze(0).expand(W, -1, -1), **batch)
            return float(poisson_loss(lr, counts, bin_size_s=cfg.bin_size_s, unit_mask=batch["unit_mask"]))

    t_start = time.monotonic()
    stop()
    loss_before, done = full_loss(emb0), 0
    for p in predictor.model.parameters():
        p.requires_grad_(False)
    try:
        for _ in range(steps):
            stop()
            if time.monotonic() > deadline:
                break
            idx = torch.randperm(W, generator=gen)[:mb]
            sub = {k: v[idx] for k, v in batch.items()}
            log_rate = predictor.model.forward_with_embeddings(emb.unsqueeze(0).expand(mb, -1, -1), **sub)
            loss = poisson_loss(log_rate, counts[idx], bin_size_s=cfg.bin_size_s, unit_mask=sub["unit_mask"])
            opt.zero_grad()
            loss.backward()
            opt.step()
            done += 1
    finally:
        for p in predictor.model.parameters():
            p.requires_grad_(True)
    loss_after = full_loss(emb.detach())
    if not loss_after <= loss_before:  # never hand back embeddings that fit the reference worse
        emb = emb0.clone()
    info = {
        "steps": done,
        "seconds": round(time.monotonic() - t_start, 4),
        "loss_before": loss_before,  # mean Poisson NLL over all reference windows
        "loss_after": min(loss_after, loss_before),
        "windows": int(W),
    }
    return emb.detach(), info

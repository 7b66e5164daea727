"""Batched Poisson regression: many independent GLMs solved together by Newton's method.

Used by the population baselines (one GLM per unit and horizon band) and by the
model's reference fit at registration (one read-out per unit). For group ``g``::

    minimise  sum_p [ e_gp exp(o_gp + x_gp . w_g) - y_gp (o_gp + x_gp . w_g) ]
              + 0.5 * sum_f l2_gf (w_gf - prior_gf)^2

with counts ``y``, exposures ``e`` (how many bins a row stands for), offsets
``o`` (the log expected count per bin from something else), an L2 penalty per
weight (0 leaves a weight free) pulling toward ``prior`` (default 0). Each
Newton step solves every group's ``(F, F)`` system at once and halves a
group's step until its objective does not rise, so no objective ever
increases; a group stops when its decrease falls below ``tol`` and is not
computed again (a halving re-evaluates only the groups that rose). With ``e = 1``,
``o = 0`` and ``l2 = n * alpha`` on the coefficients (0 on the intercept) the
minimiser is scikit-learn's ``PoissonRegressor(alpha=alpha)`` (tested).
"""

from __future__ import annotations

import copy

import numpy as np
import torch

#: |linear predictor| cap inside the solver: exp(30) counts per bin is far beyond any neuron.
ETA_CLAMP = 30.0


def poisson_objective(w, X, y, *, exposure=None, offset=None, l2=0.0, prior=None) -> np.ndarray:
    """``(G,)`` penalised negative log-likelihood (without ``log y!``) of weights ``w`` ``(G, F)``."""
    p = _Problem(X, y, exposure, offset, l2, prior, None)
    return p.objective(torch.as_tensor(np.asarray(w), dtype=torch.float64)).numpy()


def fit_poisson(
    X, y, *, exposure=None, offset=None, l2=0.0, prior=None, w0=None, max_iter: int = 30, tol: float = 1e-9, shared=None
) -> np.ndarray:
    """Weights ``(G, F)`` of ``G`` independent Poisson GLMs (float64).

    Args:
        X: ``(G, P, F)`` features, or ``(P, F)`` for one design shared by every group.
        y: ``(G, P)`` counts (>= 0).
        exposure: ``(G, P)`` (or broadcastable) bins each row stands for; default 1.
        offset: ``(G, P)`` (or broadcastable) log expected count per bin added to ``X w``; default 0.
        l2: scalar, ``(F,)`` or ``(G, F)`` L2 penalty of each weight (0 leaves it free).
        prior: ``(F,)`` or ``(G, F)`` weights the penalty pulls toward (default 0).
        w0: ``(G, F)`` start (default ``prior``, else zeros).
        shared: ``(P, F_s)`` more columns, the same for every group, after ``X``'s ``(G, P, F_x)``
            (``F = F_x + F_s``): the same solution as with them copied into ``X``, for less work,
            as their products with the weights are computed once for all groups.
    """
    p = _Problem(X, y, exposure, offset, l2, prior, shared)
    w = p.prior.clone() if w0 is None else torch.as_tensor(np.asarray(w0), dtype=torch.float64).clone()
    cur, mu = p.evaluate(w)  # (G,) objective, (G, P) expected counts at w
    eye = torch.eye(p.F, dtype=torch.float64)
    act = torch.arange(p.G)  # groups still moving; ``q`` is the problem restricted to them
    q = p
    for _ in range(int(max_iter)):
        wa, ca = w[act], cur[act]
        grad = q.xt_dot(mu - q.y) + q.l2 * (wa - q.prior)  # (A, F)
        H = q.xt_w_x(mu) + torch.diag_embed(q.l2) + 1e-10 * eye  # (A, F, F)
        step = torch.linalg.solve(H, grad.unsqueeze(-1)).squeeze(-1)
        t = torch.ones(act.numel(), dtype=torch.float64)
        new, new_mu = q.evaluate(wa - step)
        worse = torch.nonzero(new > ca).squeeze(1)
        for _ in range(30):  # halve the step of every group whose objective rose (only those are evaluated again)
            if worse.numel() == 0:
                break
            t[worse] *= 0.5
            nw, mw = q.subset(worse).evaluate(wa[worse] - t[worse, None] * step[worse])
            new[worse], new_mu[worse] = nw, mw
            worse = worse[nw > ca[worse]]
        failed = new > ca  # no decrease found: that group stays where it was
        t[failed], new[failed], new_mu[failed] = 0.0, ca[failed], mu[failed]
        w[act] = wa - t[:, None] * step
        cur[act] = new
        moving = (ca - new) > tol * (1.0 + new.abs())
        if not moving.all():
            keep = torch.nonzero(moving).squeeze(1)
            if keep.numel() == 0:
                break
            act, q, new_mu = act[keep], q.subset(keep), new_mu[keep]
        mu = new_mu
    return w.numpy()


def _tensor(a) -> torch.Tensor:
    """float64 tensor of ``a`` (a copy only where numpy's array is read-only or of another type)."""
    a = np.asarray(a, dtype=np.float64)
    return torch.from_numpy(a if a.flags.writeable and a.flags.c_contiguous else np.array(a))


class _Problem:
    """Tensors of one batched problem and the products Newton's method needs."""

    def __init__(self, X, y, exposure, offset, l2, prior, shared=None):
        f64 = torch.float64
        self.y = _tensor(y)
        if self.y.ndim != 2:
            raise ValueError(f"y must be (groups, rows), got shape {tuple(self.y.shape)}")
        self.G, P = self.y.shape
        self.X = _tensor(X)
        self.shared = self.X.ndim == 2
        if self.X.shape[-2] != P or (not self.shared and self.X.shape[0] != self.G):
            raise ValueError(f"X has shape {tuple(self.X.shape)} but y has shape {tuple(self.y.shape)}")
        self.F = self.X.shape[-1]
        # shared design: X_f X_h of every row once, so the Hessians of all groups are one matrix product
        self.XX = (self.X.unsqueeze(2) * self.X.unsqueeze(1)).reshape(P, -1) if self.shared else None
        self.S = None
        if shared is not None:  # per-group columns X, then columns S shared by every group
            if self.shared:
                raise ValueError("shared columns need a per-group X of shape (groups, rows, features)")
            self.S = _tensor(shared)
            if self.S.ndim != 2 or self.S.shape[0] != P:
                raise ValueError(f"shared has shape {tuple(self.S.shape)} but y has {P} rows")
            self.Fx, self.Fs = self.X.shape[-1], self.S.shape[1]
            self.SS = (self.S.unsqueeze(2) * self.S.unsqueeze(1)).reshape(P, -1)
            self.F = self.Fx + self.Fs
        one = torch.ones(self.G, P, dtype=f64)
        self.exposure = one if exposure is None else _tensor(exposure).expand(self.G, P)
        self.offset = 0 * one if offset is None else _tensor(offset).expand(self.G, P)
        self.l2 = _tensor(l2).expand(self.G, self.F).clone()
        zero = torch.zeros(self.G, self.F, dtype=f64)
        self.prior = zero if prior is None else _tensor(prior).expand(self.G, self.F).clone()

    def lin(self, w):  # (G, F) -> (G, P)
        if self.shared:
            return w @ self.X.T
        if self.S is not None:
            return torch.bmm(self.X, w[:, : self.Fx].unsqueeze(-1)).squeeze(-1) + w[:, self.Fx :] @ self.S.T
        return torch.bmm(self.X, w.unsqueeze(-1)).squeeze(-1)

    def xt_dot(self, r):  # (G, P) -> (G, F)
        if self.shared:
            return r @ self.X
        if self.S is not None:
            return torch.cat([torch.bmm(r.unsqueeze(1), self.X).squeeze(1), r @ self.S], 1)
        return torch.bmm(r.unsqueeze(1), self.X).squeeze(1)

    def xt_w_x(self, mu):  # (G, P) -> (G, F, F)
        if self.shared:
            return (mu @ self.XX).reshape(self.G, self.F, self.F)
        xm = (self.X * mu.unsqueeze(-1)).transpose(1, 2)  # (G, F_x, P)
        if self.S is not None:
            xx, xs = torch.bmm(xm, self.X), xm @ self.S  # (G, F_x, F_x), (G, F_x, F_s)
            ss = (mu @ self.SS).reshape(self.G, self.Fs, self.Fs)
            return torch.cat([torch.cat([xx, xs], 2), torch.cat([xs.transpose(1, 2), ss], 2)], 1)
        return torch.bmm(xm, self.X)

    def evaluate(self, w):  # (G, F) -> objective (G,), expected counts (G, P)
        eta = (self.offset + self.lin(w)).clamp(-ETA_CLAMP, ETA_CLAMP)
        mu = self.exposure * torch.exp(eta)
        d = w - self.prior
        return (mu - self.y * eta).sum(1) + 0.5 * (self.l2 * d * d).sum(1), mu

    def objective(self, w):  # (G,)
        return self.evaluate(w)[0]

    def subset(self, idx: torch.Tensor) -> _Problem:
        """The same problem for the groups ``idx`` only (shared columns and designs are not copied)."""
        q = copy.copy(self)
        q.G = int(idx.numel())
        for name in ("y", "exposure", "offset", "l2", "prior"):
            setattr(q, name, getattr(self, name)[idx])
        if not self.shared:
            q.X = self.X[idx]
        return q

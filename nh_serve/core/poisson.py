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
moved again (it leaves the batch once fewer than :data:`SUBSET_BELOW` of the
groups still move; a halving re-evaluates only the groups that rose). With ``e = 1``,
``o = 0`` and ``l2 = n * alpha`` on the coefficients (0 on the intercept) the
minimiser is scikit-learn's ``PoissonRegressor(alpha=alpha)`` (tested).
"""

from __future__ import annotations

import copy

import numpy as np
import torch

#: |linear predictor| cap inside the solver: exp(30) counts per bin is far beyond any neuron.
ETA_CLAMP = 30.0
#: Groups that stopped moving stay in the batch (computed, not updated) until fewer than this share still move.
SUBSET_BELOW = 0.8


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
    act = torch.arange(p.G)  # groups of ``q``, the problem restricted to the groups still moving
    q = p
    live = torch.ones(p.G, dtype=torch.bool)  # which of q's groups still move (the others stay where they are)
    for _ in range(int(max_iter)):
        wa, ca = w[act], cur[act]
        grad = q.xt_dot(mu - q.y) + q.l2 * (wa - q.prior)  # (A, F)
        H = q.xt_w_x(mu)  # (A, F, F), a new tensor: the penalty joins its diagonal in place
        diag = H.diagonal(dim1=-2, dim2=-1)
        diag += q.l2
        diag += 1e-10
        step = _spd_solve(H, grad.unsqueeze(-1)).squeeze(-1)
        t = live.to(torch.float64)
        new, new_mu = q.evaluate(wa - step)
        worse = torch.nonzero((new > ca) & live).squeeze(1)
        for _ in range(30):  # halve the step of every group whose objective rose (only those are evaluated again)
            if worse.numel() == 0:
                break
            t[worse] *= 0.5
            nw, mw = q.subset(worse).evaluate(wa[worse] - t[worse, None] * step[worse])
            new[worse], new_mu[worse] = nw, mw
            worse = worse[nw > ca[worse]]
        failed = (new > ca) | ~live  # no decrease found (or done already): that group stays where it was
        t[failed], new[failed], new_mu[failed] = 0.0, ca[failed], mu[failed]
        w[act] = torch.where(t[:, None] > 0, wa - t[:, None] * step, wa)  # t = 0: unmoved, whatever the step
        cur[act] = new
        live = (ca - new) > tol * (1.0 + new.abs())
        n_live = int(live.sum())
        if n_live == 0:
            break
        if n_live < SUBSET_BELOW * live.numel():  # copying the moving groups out pays once enough have stopped
            keep = torch.nonzero(live).squeeze(1)
            act, q, new_mu, live = act[keep], q.subset(keep), new_mu[keep], live[keep]
        mu = new_mu
    return w.numpy()


def _spd_solve(H: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``H^-1 b`` for a batch of symmetric positive definite ``H`` ``(G, F, F)`` by Cholesky (cheaper than a
    general LU solve); a system whose factorisation fails (not numerically positive definite) is solved by LU
    instead."""
    L, info = torch.linalg.cholesky_ex(H)
    x = torch.cholesky_solve(b, L)
    bad = torch.nonzero(info).squeeze(1)
    if bad.numel():
        x[bad] = torch.linalg.solve(H[bad], b[bad])
    return x


def _tensor(a) -> torch.Tensor:
    """float64 tensor of ``a`` (a copy only where numpy's array is read-only or of another type)."""
    a = np.asarray(a, dtype=np.float64)
    return torch.from_numpy(a if a.flags.writeable and a.flags.c_contiguous else np.array(a))


class _Problem:
    """Tensors of one batched problem and the products Newton's method needs.

    Per-group columns are kept transposed, ``Xt`` ``(G, F_x, P)``, so that every product with them
    is a row of weights against contiguous rows; products of shared columns with themselves are kept
    for the upper triangle only (the Hessian is symmetric)."""

    def __init__(self, X, y, exposure, offset, l2, prior, shared=None):
        f64 = torch.float64
        self.y = _tensor(y)
        if self.y.ndim != 2:
            raise ValueError(f"y must be (groups, rows), got shape {tuple(self.y.shape)}")
        self.G, P = self.y.shape
        X = _tensor(X)
        one_design = X.ndim == 2
        if X.shape[-2] != P or (not one_design and X.shape[0] != self.G):
            raise ValueError(f"X has shape {tuple(X.shape)} but y has shape {tuple(self.y.shape)}")
        self.F = X.shape[-1]
        if shared is not None and one_design:
            raise ValueError("shared columns need a per-group X of shape (groups, rows, features)")
        self.S = None
        if one_design:  # one design for every group: its pair products once, the Hessians one matrix product
            self.S, self.Fx, self.Fs = X, 0, self.F
            self.Xt = None
        else:
            self.Xt = X.transpose(1, 2).contiguous()  # (G, F_x, P)
            self.Fx, self.Fs = self.F, 0
            if shared is not None:  # per-group columns X, then columns S shared by every group
                self.S = _tensor(shared)
                if self.S.ndim != 2 or self.S.shape[0] != P:
                    raise ValueError(f"shared has shape {tuple(self.S.shape)} but y has {P} rows")
                self.Fs = self.S.shape[1]
                self.F = self.Fx + self.Fs
        if self.S is not None:
            iu = torch.triu_indices(self.Fs, self.Fs)
            r, c = iu[0] + self.Fx, iu[1] + self.Fx  # the shared block's place in the (F, F) Hessian
            self.tri = (r * self.F + c, c * self.F + r)  # flat upper / mirrored positions
            self.SS = (self.S[:, iu[0]] * self.S[:, iu[1]]).contiguous()  # (P, F_s (F_s + 1) / 2)
        one = torch.ones(self.G, P, dtype=f64)
        self.exposure = None if exposure is None else _tensor(exposure).expand(self.G, P)
        if self.exposure is not None and bool((self.exposure == 1.0).all()):
            self.exposure = None  # exposure 1 everywhere: nothing to multiply
        self.offset = 0 * one if offset is None else _tensor(offset).expand(self.G, P)
        self.l2 = _tensor(l2).expand(self.G, self.F).clone()
        zero = torch.zeros(self.G, self.F, dtype=f64)
        self.prior = zero if prior is None else _tensor(prior).expand(self.G, self.F).clone()

    def lin(self, w):  # (G, F) -> (G, P)
        out = None
        if self.Xt is not None:
            out = torch.bmm(w[:, None, : self.Fx], self.Xt).squeeze(1)
        if self.S is not None:
            s = w[:, self.Fx :] @ self.S.T
            out = s if out is None else out + s
        return out

    def xt_dot(self, r):  # (G, P) -> (G, F)
        parts = []
        if self.Xt is not None:
            parts.append(torch.bmm(self.Xt, r.unsqueeze(-1)).squeeze(-1))
        if self.S is not None:
            parts.append(r @ self.S)
        return parts[0] if len(parts) == 1 else torch.cat(parts, 1)

    def xt_w_x(self, mu):  # (G, P) -> (G, F, F), a new tensor
        H = torch.empty(self.G, self.F, self.F, dtype=torch.float64)
        fx = self.Fx
        if self.S is not None:  # the shared block from its upper triangle, written into H and mirrored
            tri = mu @ self.SS  # (G, F_s (F_s + 1) / 2)
            flat = H.view(self.G, self.F * self.F)
            flat.index_copy_(1, self.tri[0], tri)
            flat.index_copy_(1, self.tri[1], tri)
        if self.Xt is not None:
            xm = self.Xt * mu.unsqueeze(1)  # (G, F_x, P)
            H[:, :fx, :fx] = torch.bmm(xm, self.Xt.transpose(1, 2))
            if self.S is not None:
                xs = (xm.reshape(-1, xm.shape[-1]) @ self.S).view(self.G, fx, self.Fs)  # (G, F_x, F_s)
                H[:, :fx, fx:] = xs
                H[:, fx:, :fx] = xs.transpose(1, 2)
        return H

    def evaluate(self, w):  # (G, F) -> objective (G,), expected counts (G, P)
        eta = (self.offset + self.lin(w)).clamp_(-ETA_CLAMP, ETA_CLAMP)
        mu = torch.exp(eta)
        if self.exposure is not None:
            mu *= self.exposure
        d = w - self.prior
        return (mu - self.y * eta).sum(1) + 0.5 * (self.l2 * d * d).sum(1), mu

    def objective(self, w):  # (G,)
        return self.evaluate(w)[0]

    def subset(self, idx: torch.Tensor) -> _Problem:
        """The same problem for the groups ``idx`` only (shared columns and designs are not copied)."""
        q = copy.copy(self)
        q.G = int(idx.numel())
        for name in ("y", "offset", "l2", "prior"):
            setattr(q, name, getattr(self, name)[idx])
        if self.exposure is not None:
            q.exposure = self.exposure[idx]
        if self.Xt is not None:
            q.Xt = self.Xt[idx]
        return q

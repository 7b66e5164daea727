"""The Predictor: load a checkpoint, register a recording's units, predict the next second.

This is the API everything user-facing builds on (the service, the client,
batch scoring, the examples)::

    from nh_serve import Predictor
    p = Predictor.load()                                  # the built-in default checkpoint
    token = p.register(ref_times, ref_unit_ids, reference_window=(0.0, 60.0))
    pred = p.predict(token, ctx_times, ctx_unit_ids, context_start=120.0)
    pred.rates_hz      # (U, 50) Hz, units in the registered order (pred.unit_ids)
    pred.bin_edges     # (51,) absolute seconds

``register`` computes the 33 reference features of every unit once
(:mod:`nh_serve.data.features`), z-scores them with the statistics stored in the
checkpoint and runs the IDEncoder; the unit embeddings are cached under a
session token (bounded LRU with a time limit), so a closed-loop tool sends
its reference once and then only one context window per prediction.
``register(..., adapt_steps=N)`` refines the cached embeddings by a few
gradient steps of next-second Poisson loss on the reference window itself
(model weights frozen), within a time budget.
"""

from __future__ import annotations

import math
import operator
import secrets
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from nh_serve.core.model import poisson_loss
from nh_serve.data.features import MIN_REFERENCE_S, FeatureNorm, reference_features, reference_rate_hz
from nh_serve.data.spikes import check_spikes
from nh_serve.data.windows import (
    WINDOW_INPUTS,
    Window,
    collate,
    cut_windows,
    target_counts,
    tokenize_window,
)
from nh_serve.errors import InputError
from nh_serve.inference.backends import Backend, make_backend, open_artifact_model
from nh_serve.inference.limits import ADAPT_STRIDE_S, Limits, n_adapt_windows, stopper
from nh_serve.inference.model_io import load_model
from nh_serve.inference.sessions import RegisteredSession, SessionCache
from nh_serve.inference.unit_ids import as_unit_ids, n_ids, unit_order, unit_rows
from nh_serve.prediction import Prediction

#: Most windows x units that predict_batch runs at once (memory: ~50 bins x head width floats each).
MAX_UNIT_WINDOWS = 16_384


class Predictor:
    """Predict every unit's firing rate over the next second from its last second of spikes."""

    def __init__(
        self,
        *,
        model,
        feature_norm: FeatureNorm,
        checkpoint=None,
        backend: str | Backend = "torch",
        max_sessions: int = 64,
        session_ttl_s: float = 3600.0,
        threads: int | None = None,
        cache_dir=None,
        limits: Limits | None = None,
        max_sessions_per_owner: int | None = None,
    ):
        """``backend``: a name of :data:`nh_serve.inference.backends.BACKENDS`, ``"auto"`` or a built
        :class:`~nh_serve.inference.backends.Backend`; ``threads``: intra-op threads (onnxruntime sessions;
        for torch backends ``torch.set_num_threads``, process-wide, only when given); ``cache_dir``:
        where on-the-fly exports are cached (see :func:`nh_serve.inference.backends.cache_dir`);
        ``limits``: what one call may ask (:class:`~nh_serve.inference.limits.Limits`; None: sizes
        unbounded); ``max_sessions_per_owner``: sessions one ``owner`` keeps (see ``register``)."""
        self.model = model.eval()
        self.cfg = model.cfg
        self.feature_norm = feature_norm
        self.checkpoint = checkpoint
        self.model_hash = checkpoint.short_hash if checkpoint is not None else "unsaved"
        self.limits = limits
        self.sessions = SessionCache(
            max_sessions=max_sessions, ttl_s=session_ttl_s, max_per_owner=max_sessions_per_owner
        )
        self._backend = make_backend(
            backend, model=model, checkpoint=checkpoint, feature_norm=feature_norm, threads=threads, cache_dir=cache_dir
        )
        self.backend_name = self._backend.name

    @classmethod
    def load(cls, checkpoint=None, *, backend: str = "auto", threads: int | None = None, **kwargs) -> Predictor:
        """Load a checkpoint file (``None`` or ``"default"``: the built-in one) or an exported artifact.

        An artifact (``.onnx``, or a TorchScript ``.pt`` / ``.ts`` from ``nh-serve export``) carries
        its config and feature normalisation; it runs on its own backend (``onnxruntime`` /
        ``torchscript``; ``"auto"`` picks it) and reports its source checkpoint's hash.
        """
        art_model = open_artifact_model(checkpoint, threads=threads)
        if art_model is not None:
            return cls(
                model=art_model,
                feature_norm=art_model.artifact.feature_norm,
                checkpoint=art_model.artifact,
                backend=backend,
                threads=threads,
                **kwargs,
            )
        model, norm, ckpt = load_model(checkpoint)
        return cls(model=model, feature_norm=norm, checkpoint=ckpt, backend=backend, threads=threads, **kwargs)

    # ------------------------------------------------------------------ registration
    def register(
        self,
        spike_times,
        unit_ids,
        *,
        reference_window: tuple[float, float] | None = None,
        units: Sequence | None = None,
        adapt_steps: int = 0,
        adapt_time_budget_s: float = 10.0,
        seed: int = 0,
        owner: str | None = None,
        should_stop: Callable[[], bool] | None = None,
    ) -> str:
        """Register a recording's units from its reference spikes; returns a session token.

        Args:
            spike_times: ``(N,)`` sorted spike times in seconds over the reference window.
            unit_ids: ``(N,)`` unit id (int or str) of each spike, or an
                :class:`~nh_serve.prediction.IndexedIds` (a table of ids and each spike's row in it).
            reference_window: ``(start, end)`` seconds; default ``(first spike, last spike)``.
                At least ``MIN_REFERENCE_S`` (10 s) long.
            units: the unit ids in the order predictions should use, which may include
                units that were silent in the reference; default: the distinct ids of the spikes,
                sorted (integer ids numerically, string ids as text). Ids keep their type:
                integers stay integers in ``Prediction.unit_ids``.
            adapt_steps: gradient steps of test-time unit adaptation (0 = zero-shot embeddings).
            adapt_time_budget_s: wall-clock budget of the whole registration, counted from this
                call's start; adaptation stops stepping when it is spent.
            owner: who registers (e.g. a client of the service): an owner keeps at most
                ``max_sessions_per_owner`` sessions, its least recently used one goes first.
            should_stop: called between the steps; when it returns True the registration stops
                with :class:`~nh_serve.inference.limits.Cancelled` and keeps nothing.
        """
        t_start = time.monotonic()
        stop = stopper(should_stop)
        lim = self.limits
        ids = as_unit_ids(unit_ids, "reference unit_ids", lim)
        t = np.asarray(spike_times)
        if t.ndim != 1 or t.shape[0] != n_ids(ids):
            raise InputError(
                f"reference spikes: {t.shape} spike times but {n_ids(ids)} unit ids; pass one unit id per spike"
            )
        if t.size == 0:
            raise InputError("reference spikes: no spikes; send the spikes of the reference window")
        if lim is not None:
            lim.check_count(t.size, "max_spikes", "spikes", "reference spikes")
        order = unit_order(ids, units, lim)
        uidx = unit_rows(ids, order, "reference unit_ids")
        if reference_window is None:
            tf = t.astype(np.float64)
            if not np.all(np.isfinite(tf)):
                check_spikes(tf, uidx, n_units=order.size, name="reference spikes")
            reference_window = (float(tf.min()), float(np.nextafter(tf.max(), np.inf)))
        r0, r1 = (float(x) for x in reference_window)
        if not (math.isfinite(r0) and math.isfinite(r1)):
            raise InputError(f"reference_window: must be finite seconds, got ({r0}, {r1})")
        if r1 - r0 < MIN_REFERENCE_S:
            raise InputError(
                f"reference_window: [{r0:g}, {r1:g}) s is {r1 - r0:.3g} s long; send at least "
                f"{MIN_REFERENCE_S:g} s of reference spikes (60 s recommended)"
            )
        if lim is not None:
            lim.check_reference(r0, r1)
            lim.check_spike_times(t, "reference spikes")
            lim.check_close_pairs(t, uidx, "reference spikes")
            span = self.cfg.context_s + self.cfg.horizon_s
            lim.check_adaptation(int(adapt_steps), n_windows=n_adapt_windows(self.cfg, r0, r1), n_units=order.size, span_s=span)
        feats = reference_features(t, uidx, n_units=order.size, start=r0, end=r1)  # (U, 33)
        ref_rate = reference_rate_hz(t, uidx, n_units=order.size, start=r0, end=r1)  # (U,)
        stop()
        with torch.inference_mode():
            x = torch.from_numpy(self.feature_norm.apply(feats)).unsqueeze(0)  # (1, U, 33)
            emb = self.model.embed_units(x)[0].clone()  # (U, D)
        stop()
        session = RegisteredSession(
            token=secrets.token_urlsafe(12),
            unit_ids=order,
            reference=(r0, r1),
            features=feats,
            ref_rate_hz=ref_rate.astype(np.float32),
            embeddings=emb,
            owner=owner,
        )
        if adapt_steps > 0:
            session.embeddings, session.adaptation = self._adapt(
                session, t, uidx, steps=int(adapt_steps), deadline=t_start + float(adapt_time_budget_s),
                seed=seed, stop=stop,
            )
        stop()
        self.sessions.put(session)
        return session.token

    def session(self, session) -> RegisteredSession:
        """The :class:`RegisteredSession` of a token (or the object itself)."""
        if isinstance(session, RegisteredSession):
            return session
        if not isinstance(session, str):
            raise InputError(f"session: pass the token returned by register(), got {type(session).__name__}")
        return self.sessions.get(session)

    # ------------------------------------------------------------------ prediction
    def tokenize_window(
        self,
        s: RegisteredSession,
        spike_times,
        unit_ids,
        *,
        context_start: float,
        behavior=None,
        images=None,
        image_schedule_s: float | None = None,
        history_counts=None,
        history_duration_s: float | None = None,
    ) -> dict[str, torch.Tensor]:
        """One window -> the model's tokenized inputs (no batch axis)."""
        window = self._window(
            s,
            spike_times,
            unit_ids,
            context_start=context_start,
            behavior=behavior,
            images=images,
            image_schedule_s=image_schedule_s,
            history_counts=history_counts,
            history_duration_s=history_duration_s,
        )
        return self.tokenize(s, window)

    def tokenize(self, session, window: Window) -> dict[str, torch.Tensor]:
        """A :class:`~nh_serve.data.windows.Window` (unit rows in the registered order) -> model inputs."""
        s = self.session(session)
        # unit_features are replaced by the cached embeddings in _run; passing them keeps tokenize's checks
        return tokenize_window(self.cfg, window, unit_features=s.features, ref_rate_hz=s.ref_rate_hz)

    def _window(self, s: RegisteredSession, spike_times, unit_ids, *, context_start, **inputs) -> Window:
        """A caller's window (unit ids) -> a :class:`Window` with rows of the registered unit order."""
        ids = as_unit_ids(unit_ids, "context unit_ids", self.limits)
        t = np.asarray(spike_times)
        if t.ndim != 1 or t.shape[0] != n_ids(ids):
            raise InputError(
                f"context spikes: {t.shape} spike times but {n_ids(ids)} unit ids; pass one unit id per spike"
            )
        if self.limits is not None:
            self.limits.check_count(t.size, "max_context_spikes", "spikes", "context spikes")
            self.limits.check_time(context_start, "ctx_start")
        uidx = unit_rows(ids, s.unit_ids, "context unit_ids")
        return Window(context_start=context_start, spike_times=t, spike_unit_index=uidx, **inputs)

    def _run(self, s: RegisteredSession, items: list[dict[str, torch.Tensor]]) -> np.ndarray:
        batch = collate(items)
        batch.pop("unit_features")
        emb = s.embeddings.unsqueeze(0).expand(len(items), -1, -1)  # (B, U, D)
        with torch.inference_mode():
            log_rate = self._backend(batch, emb)  # (B, U, T)
        return torch.exp(log_rate).float().numpy()

    def _horizon_bins(self, horizon_s: float | None) -> int:
        T = self.cfg.n_bins
        if horizon_s is None:
            return T
        try:
            h = float(horizon_s)
        except (TypeError, ValueError):
            raise InputError(f"horizon_s: must be a number of seconds, got {horizon_s!r}") from None
        max_h = T * self.cfg.bin_size_s
        if isinstance(horizon_s, (bool, np.bool_)) or not math.isfinite(h) or h <= 0 or h > max_h + 1e-9:
            raise InputError(f"horizon_s: must be in (0, {max_h:g}] s (this model's horizon), got {horizon_s}")
        n = int(round(h / self.cfg.bin_size_s))
        if abs(n * self.cfg.bin_size_s - h) > 1e-6:
            raise InputError(f"horizon_s: must be a multiple of the {self.cfg.bin_size_s * 1000:g} ms bin, got {h:g} s")
        return n

    def _prediction(self, s: RegisteredSession, rates: np.ndarray, context_start: float, n_bins: int) -> Prediction:
        t0 = float(context_start) + self.cfg.context_s
        edges = t0 + self.cfg.bin_size_s * np.arange(n_bins + 1, dtype=np.float64)
        return Prediction(
            rates_hz=np.ascontiguousarray(rates[:, :n_bins], dtype=np.float32),
            bin_edges=edges,
            unit_ids=s.unit_ids,
            model=self.cfg.name,
            model_hash=self.model_hash,
        )

    def predict(
        self,
        session,
        spike_times,
        unit_ids,
        *,
        context_start: float,
        behavior=None,
        images=None,
        image_schedule_s: float | None = None,
        history_counts=None,
        history_duration_s: float | None = None,
        horizon_s: float | None = None,
    ) -> Prediction:
        """Predict the rates of every registered unit over the bins after the context.

        Args:
            session: token from :meth:`register`.
            spike_times: ``(n,)`` sorted spike times (seconds) inside the context
                ``[context_start, context_start + 1 s)``.
            unit_ids: ``(n,)`` registered unit id of each spike.
            context_start: start of the context window, seconds.
            behavior: optional ``(times (Nb,), values (Nb, behavior_dim))`` inside the context.
            images: optional ``(times (Ni,), embeddings (Ni, image_dim))`` presentation onsets inside
                the context or the forecast window ``[context_start, context_start + context_s +
                horizon_s)`` (2 s for the shipped configs): images
                shown and images scheduled to be shown (a planned stimulus sequence).
            image_schedule_s: seconds after the context end up to which ``images`` is complete
                (0 .. the horizon); default: the whole forecast window if an image lies in it, else 0
                (only shown images known). Pass the horizon with no later image for "none coming".
            history_counts: optional ``(U,)`` spike counts over the ``history_s`` seconds before the
                context (registered unit order); default: the reference rate stands in.
            horizon_s: predict only the first ``horizon_s`` seconds (a multiple of the bin size).
        """
        s = self.session(session)
        n = self._horizon_bins(horizon_s)
        item = self.tokenize_window(
            s, spike_times, unit_ids, context_start=context_start, behavior=behavior, images=images,
            image_schedule_s=image_schedule_s,
            history_counts=history_counts, history_duration_s=history_duration_s,
        )
        rates = self._run(s, [item])[0]
        return self._prediction(s, rates, context_start, n)

    def predict_batch(
        self, session, windows: Sequence[dict], *, horizon_s: float | None = None, batch_size: int = 64
    ) -> list[Prediction]:
        """Predict many windows of one registered session at once.

        ``windows`` is a sequence of dicts with the keyword arguments of
        :meth:`predict` (``spike_times``, ``unit_ids``, ``context_start`` and
        optional ``behavior``, ``images``, ``image_schedule_s``, ``history_counts``, ``history_duration_s``).
        They run ``batch_size`` at a time, fewer for large sessions so that a chunk holds at most
        :data:`MAX_UNIT_WINDOWS` unit-windows (the head's activations grow with windows x units).
        """
        size = _batch_size(batch_size)
        s = self.session(session)
        if self.limits is not None:
            self.limits.check_count(len(windows), "max_windows", "windows", "windows")
        allowed = {"spike_times", "unit_ids", "context_start", *WINDOW_INPUTS}
        cut = []
        for i, w in enumerate(windows):
            extra = set(w) - allowed
            if extra:
                raise InputError(f"windows[{i}]: unknown field(s) {', '.join(sorted(extra))}")
            try:
                rest = {k: v for k, v in w.items() if k not in ("spike_times", "unit_ids")}
                cut.append(self._window(s, w["spike_times"], w["unit_ids"], **rest))
            except KeyError as e:
                raise InputError(f"windows[{i}]: missing field {e.args[0]!r}") from None
            except InputError as e:
                raise InputError(f"windows[{i}]: {e}") from None
        return self.predict_windows(s, cut, horizon_s=horizon_s, batch_size=size)

    def predict_windows(
        self, session, windows: Sequence[Window], *, horizon_s: float | None = None, batch_size: int = 64
    ) -> list[Prediction]:
        """:meth:`predict_batch` of :class:`~nh_serve.data.windows.Window` s whose unit rows follow the
        registered unit order (as :func:`~nh_serve.data.windows.cut_windows` cuts them from a recording)."""
        size = _batch_size(batch_size)
        s = self.session(session)
        n = self._horizon_bins(horizon_s)
        size = max(1, min(size, MAX_UNIT_WINDOWS // max(1, s.n_units)))
        out: list[Prediction] = []
        for i in range(0, len(windows), size):
            chunk = windows[i : i + size]
            items = []
            for j, w in enumerate(chunk):
                try:
                    items.append(self.tokenize(s, w))
                except InputError as e:
                    raise InputError(f"windows[{i + j}]: {e}") from None
            rates = self._run(s, items)
            out.extend(self._prediction(s, r, w.context_start, n) for r, w in zip(rates, chunk))
        return out

    # ------------------------------------------------------------------ adaptation
    def _adapt(
        self, s: RegisteredSession, times: np.ndarray, uidx: np.ndarray, *, steps: int, deadline: float, seed: int,
        stop: Callable[[], None] = lambda: None,
    ):
        """Refine the unit embeddings on next-second Poisson loss inside the reference window, stepping
        until ``deadline`` (``time.monotonic()``); ``stop()`` raises when the result is no longer wanted."""
        cfg = self.cfg
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
        windows = cut_windows(t, u, starts, n_units=s.n_units, cfg=cfg, history_start=r0, full_history=True)
        batch = collate([self.tokenize(s, w) for w in windows])
        batch.pop("unit_features")
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
                lr = self.model.forward_with_embeddings(e.unsqueeze(0).expand(W, -1, -1), **batch)
                return float(poisson_loss(lr, counts, bin_size_s=cfg.bin_size_s, unit_mask=batch["unit_mask"]))

        t_start = time.monotonic()
        stop()
        loss_before, done = full_loss(emb0), 0
        for p in self.model.parameters():
            p.requires_grad_(False)
        try:
            for _ in range(steps):
                stop()
                if time.monotonic() > deadline:
                    break
                idx = torch.randperm(W, generator=gen)[:mb]
                sub = {k: v[idx] for k, v in batch.items()}
                log_rate = self.model.forward_with_embeddings(emb.unsqueeze(0).expand(mb, -1, -1), **sub)
                loss = poisson_loss(log_rate, counts[idx], bin_size_s=cfg.bin_size_s, unit_mask=sub["unit_mask"])
                opt.zero_grad()
                loss.backward()
                opt.step()
                done += 1
        finally:
            for p in self.model.parameters():
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

    # ------------------------------------------------------------------ introspection
    def info(self) -> dict:
        """The model's name, hash, config and the checkpoint's training summary and metrics."""
        ck = self.checkpoint
        return {
            "name": self.cfg.name,
            "hash": self.model_hash,
            "backend": self.backend_name,
            "backend_details": self._backend.describe(),
            "config": self.cfg.to_dict(),
            "training": ck.training if ck is not None else {},
            "metrics": ck.metrics if ck is not None else {},
            "provenance": ck.provenance if ck is not None else {},
        }


def _batch_size(batch_size: Any) -> int:
    """``batch_size`` as a positive int (ints and numpy integers, not floats or bools), else InputError."""
    try:
        size = None if isinstance(batch_size, (bool, np.bool_)) else operator.index(batch_size)
    except TypeError:
        size = None
    if size is None or size < 1:
        raise InputError(f"batch_size: must be a positive integer, got {batch_size!r}")
    return size

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

History models (the shipped ones: ``cfg.history_taus``) also describe each unit by
how it moves with the population in the reference window
(:mod:`nh_serve.data.coupling`), fit each unit's population read-out on the
reference window at registration (``fit="reference"``, the default; ``fit="none"``
is pure zero-shot; :mod:`nh_serve.inference.reference_fit`), and keep each unit's
smoothed-rate history per session (:class:`nh_serve.data.history.EmaState`): it
starts at the reference rates at the reference start, takes in the reference
spikes and then every context a ``predict`` call sends, so a tool that streams
consecutive windows needs to send nothing else. A stretch no call covered counts
as firing at the reference rate (a warning says so once per session); pass
``history_rates`` per window to give the history yourself.
"""

from __future__ import annotations

import dataclasses
import math
import operator
import secrets
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from nh_serve.data.coupling import unit_descriptors
from nh_serve.data.features import MIN_REFERENCE_S, FeatureNorm, reference_rate_hz
from nh_serve.data.spikes import check_spikes
from nh_serve.data.windows import WINDOW_INPUTS, Window, collate, tokenize_window
from nh_serve.errors import InputError
from nh_serve.inference.adaptation import adapt_embeddings
from nh_serve.inference.backends import Backend, make_backend, open_artifact_model
from nh_serve.inference.limits import Limits, n_adapt_windows, stopper
from nh_serve.inference.model_io import load_model
from nh_serve.inference.sessions import RegisteredSession, SessionCache
from nh_serve.inference.streaming import refit_session, start_stream, stream_history
from nh_serve.inference.unit_ids import as_unit_ids, n_ids, unit_order, unit_rows
from nh_serve.prediction import Prediction

#: Most windows x units that predict_batch runs at once (memory: ~50 bins x head width floats each).
MAX_UNIT_WINDOWS = 16_384
#: How a registration fits the units' read-outs: on the reference window (windows every 0.1 s, or every
#: 0.05 s: twice the time), or not at all (zero-shot). :data:`nh_serve.inference.reference_fit.FIT_STEPS_S`.
FIT_MODES = ("reference", "reference-dense", "none")


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
        fit: str | None = None,
        refit_every_s: float | None = None,
        refit_window_s: float | None = None,
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
            fit: ``"reference"`` fits each unit's population read-out on the reference window
                and a population GLM correction and the recording's calibration on top (deterministic, seconds),
                each kept only where it predicts a later part of the reference better than without
                (:mod:`nh_serve.inference.reference_fit`); ``"reference-dense"``: the same on windows
                twice as dense (about twice the time; fits that carry over better, docs/results.md);
                ``"none"``: zero-shot. Default: ``"reference"``,
                or ``"none"`` for an exported artifact, which cannot fit.
            refit_every_s: off by default. While the session streams consecutive contexts, fit the
                read-outs again every this many seconds of stream time on the last ``refit_window_s``
                seconds it saw (default: the reference length, at least 180 s), so a drifting recording keeps read-outs
                of its present; the fit runs inside the ``predict`` call that reaches that time (a second
                or two per 100 units). Models with a read-out only.
            owner: who registers (e.g. a client of the service): an owner keeps at most
                ``max_sessions_per_owner`` sessions, its least recently used one goes first.
            should_stop: called between the steps; when it returns True the registration stops
                with :class:`~nh_serve.inference.limits.Cancelled` and keeps nothing.
        """
        if fit is None:
            fit = "reference" if self.can_fit else "none"
        if fit not in FIT_MODES:
            raise InputError(f"fit: must be one of {', '.join(FIT_MODES)}, got {fit!r}")
        if refit_every_s is not None:
            if not self.cfg.readout_dim:
                raise InputError("refit_every_s: this model has no read-out to refit; leave refit_every_s unset")
            if not (isinstance(refit_every_s, (int, float)) and math.isfinite(refit_every_s) and refit_every_s >= 1.0):
                raise InputError(f"refit_every_s: must be at least 1 second, got {refit_every_s!r}")
        elif refit_window_s is not None:
            raise InputError("refit_window_s: set refit_every_s too (the window is that of the refits)")
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
        ref_rate = reference_rate_hz(t, uidx, n_units=order.size, start=r0, end=r1)  # (U,)
        feats = unit_descriptors(
            t, uidx, n_units=order.size, start=r0, end=r1, ref_rate_hz=ref_rate,
            components=self.cfg.coupling_components,
        )  # (U, n_features): 33 statistics (+ population coupling)
        stop()
        with torch.inference_mode():
            x = torch.from_numpy(self.feature_norm.apply(feats)).unsqueeze(0)  # (1, U, F)
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
        if self.cfg.has_history:
            start_stream(
                session, self.cfg, t, uidx, fit=fit, model=self._fit_model if fit != "none" else None,
                refit_every_s=refit_every_s, refit_window_s=refit_window_s, stop=stop,
            )
        session.last_used = time.monotonic()  # its time limit starts now, not when the work began
        self.sessions.put(session)
        return session.token

    @property
    def can_fit(self) -> bool:  # register(fit="reference") needs the eager network, not only an artifact
        return getattr(self.model, "log_rate_parts", None) is not None

    def _fit_model(self):  # the model the reference fit runs (the eager module; exported artifacts have none)
        model = getattr(self.model, "log_rate_parts", None)
        if model is None:
            raise InputError(
                "fit: this predictor runs an exported artifact, which cannot fit read-outs; load the checkpoint, "
                "or register with fit='none'"
            )
        return self.model

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
        history_rates=None,
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
            history_rates=history_rates,
        )
        return self.tokenize(s, window)

    def tokenize(self, session, window: Window) -> dict[str, torch.Tensor]:
        """A :class:`~nh_serve.data.windows.Window` (unit rows in the registered order) -> model inputs.

        A history model's window without ``history_rates`` takes them from the session's stream
        (:meth:`_stream_history`), which it moves forward to the window's context end.
        """
        s = self.session(session)
        if self.cfg.has_history and window.history_rates is None and s.history is not None:
            window = dataclasses.replace(window, history_rates=stream_history(s, window, context_s=self.cfg.context_s))
            if s.refit is not None and s.refit.due(s.history.t):
                refit_session(self._fit_model(), s)
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
        if s.readout is not None:
            batch["unit_readout"] = s.readout.unsqueeze(0).expand(len(items), -1, -1)  # (B, U, K + 1)
        emb = s.embeddings.unsqueeze(0).expand(len(items), -1, -1)  # (B, U, D)
        with torch.inference_mode():
            log_rate = self._backend(batch, emb)  # (B, U, T)
        rates = torch.exp(log_rate).float().numpy()
        if (corr := s.correction) is not None:  # the fit's rate correction, for every backend alike (read once:
            bins = batch["unit_bins"].numpy() if "unit_bins" in batch else None  # a refit may replace it meanwhile)
            rates = corr.apply(rates, batch["history_rates"].double().numpy(), bins)
        return rates

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
        history_rates=None,
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
            history_counts: models without ``history_taus`` only: optional ``(U,)`` spike counts over
                the ``history_s`` seconds before the context (registered unit order); default: the
                reference rate stands in.
            history_rates: history models only: optional ``(U, K)`` smoothed rates (Hz) of the
                registered units at the context end (:func:`nh_serve.data.history.ema_rates`);
                default: the session's own stream of the reference and every context sent.
            horizon_s: predict only the first ``horizon_s`` seconds (a multiple of the bin size).
        """
        s = self.session(session)
        n = self._horizon_bins(horizon_s)
        item = self.tokenize_window(
            s, spike_times, unit_ids, context_start=context_start, behavior=behavior, images=images,
            image_schedule_s=image_schedule_s,
            history_counts=history_counts, history_duration_s=history_duration_s, history_rates=history_rates,
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
    def _adapt(self, s: RegisteredSession, times, uidx, *, steps: int, deadline: float, seed: int, stop=lambda: None):
        """:func:`nh_serve.inference.adaptation.adapt_embeddings` of this predictor's model."""
        return adapt_embeddings(self, s, times, uidx, steps=steps, deadline=deadline, seed=seed, stop=stop)

    # ------------------------------------------------------------------ introspection
    def info(self) -> dict:
        """The model's name, hash, config and the checkpoint's training summary and metrics."""
        ck = self.checkpoint
        return {
            "name": self.cfg.name, "hash": self.model_hash, "backend": self.backend_name,
            "backend_details": self._backend.describe(), "config": self.cfg.to_dict(),
            **{k: getattr(ck, k) if ck is not None else {} for k in ("training", "metrics", "provenance")},
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

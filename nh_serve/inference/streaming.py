"""Each registered session's history stream: the units' smoothed rates, carried from call to call.

A history model needs every unit's smoothed rates (:mod:`nh_serve.data.history`) at each context
end. A session starts them at its reference rates at the reference start and takes in the
reference spikes at registration; :func:`stream_history` then moves them forward with every
context a ``predict`` call sends, so a tool that streams consecutive windows sends nothing else.
"""

from __future__ import annotations

import collections
import math
import warnings

import numpy as np
import torch

from nh_serve.data.history import EmaState
from nh_serve.data.spikes import check_spikes
from nh_serve.data.windows import Window
from nh_serve.errors import InputError
from nh_serve.inference.reference_fit import FIT_STEPS_S, MIN_FIT_REFERENCE_S, fit_readout
from nh_serve.inference.sessions import RegisteredSession

#: A gap between the data a session has seen and a new context longer than this is "history incomplete".
HISTORY_GAP_S = 0.5
#: States a session keeps of its history stream (one per context end), for windows asked again.
HISTORY_STATES = 256
#: The shortest default refit window (seconds): on the held-out real recordings of docs/model-card.md refits on
#: the last 3 minutes carried over better than on the last minute on every recording long enough for both;
#: the last 5 minutes did better on one recording and worse on two.
DEFAULT_REFIT_WINDOW_S = 180.0


def default_refit_window(reference: tuple[float, float]) -> float:
    """The refit window when none is given: the reference length, at least :data:`DEFAULT_REFIT_WINDOW_S`."""
    r0, r1 = (float(x) for x in reference)
    return max(r1 - r0, DEFAULT_REFIT_WINDOW_S)


def stream_history(s: RegisteredSession, window: Window, *, context_s: float) -> np.ndarray:
    """The session's smoothed rates at the context end of ``window``, moving the stream forward.

    The stream keeps its state at the end of each recent context (:data:`HISTORY_STATES` of
    them), so a window asked again, or one overlapping a recent one, gets the same history.
    Spikes between the data the session saw and a later context are unknown (the rates relax
    toward the reference rate there); a context older than the kept states gets the reference
    rates. Both warn once per session.
    """
    t0 = float(window.context_start)
    t1 = t0 + context_s
    times, units = check_spikes(
        window.spike_times, window.spike_unit_index, n_units=s.n_units, name="context spikes", window=(t0, t1)
    )
    with s.lock:
        h = s.history
        if t1 < h.t - 1e-9:  # an older window: continue from a kept state inside or at its context
            past = [(ts, st) for ts, st in s.history_states if t0 - 1e-9 <= ts <= t1 + 1e-9]
            if not past:
                _warn(s, f"a context ending at {t1:g} s lies before the data this session has "
                                      f"kept (from {s.history_states[0][0] if s.history_states else h.t:g} s); "
                                      "its history is taken as the reference rates")
                return np.repeat(h.ref[:, None], h.taus.size, axis=1).astype(np.float32)
            ts, st = past[-1]
            old = h.copy()
            old.rates, old.t = st.copy(), ts
            old.update(times, units, until=t1)
            return old.rates.astype(np.float32)
        gap = t0 > h.t + HISTORY_GAP_S
        if gap:
            _warn(s, f"nothing was sent between {h.t:g} s and the context at {t0:g} s; that "
                                  "stretch counts as firing at the reference rate (send consecutive contexts, "
                                  "or pass history_rates)")
        if t0 > h.t:
            h.skip_to(t0)
        if s.refit is not None:
            s.refit.observe(h.t, t1, times, units, h.rates, gap=gap)
        h.update(times, units, until=t1)
        if not s.history_states or s.history_states[-1][0] < h.t:
            s.history_states.append((h.t, h.rates.copy()))
        return h.rates.astype(np.float32)

def _warn(s: RegisteredSession, message: str) -> None:
    """Warn once per session that its history is incomplete."""
    info = s.fit if s.fit is not None else {}
    if not info.get("history_warned"):
        warnings.warn(f"session {s.token[:6]}...: history incomplete: {message}", stacklevel=5)
        info["history_warned"] = True
        s.fit = info


class Refitter:
    """What a streaming session keeps to refit its read-outs: its most recent contiguous data.

    ``register(..., refit_every_s=E)``: every ``E`` seconds of stream time, once the session has
    seen ``window_s`` seconds in a row, the read-outs are fitted again on those last ``window_s``
    seconds (:func:`nh_serve.inference.reference_fit.fit_readout`, with the smoothed rates the
    stream had at their start), so a drifting recording keeps read-outs of its present. A gap
    in the stream starts the collection again.
    """

    def __init__(self, *, every_s: float, window_s: float, t: float):
        self.every_s, self.window_s = float(every_s), float(window_s)
        self.chunks: list[tuple[float, float, np.ndarray, np.ndarray, np.ndarray]] = []
        self.last_fit = float(t)
        self.refits = 0

    def observe(self, t_from: float, t_to: float, times, units, rates, *, gap: bool) -> None:
        """The spikes of ``[t_from, t_to)`` (``rates``: the smoothed rates at ``t_from``) join the data."""
        if gap:
            self.chunks = []
        if t_to <= t_from:
            return
        keep = (np.asarray(times) >= t_from) & (np.asarray(times) < t_to)
        state = np.array(rates, dtype=np.float64)
        self.chunks.append((float(t_from), float(t_to), np.asarray(times)[keep], np.asarray(units)[keep], state))
        while len(self.chunks) > 1 and self.chunks[1][0] <= t_to - self.window_s:
            self.chunks.pop(0)

    def due(self, now: float) -> bool:
        """Whether a refit is due at stream time ``now`` (and there is a whole window with a known start state)."""
        if now - self.last_fit < self.every_s or not self.chunks:
            return False
        return self.chunks[0][0] <= now - self.window_s + 1e-9

    def data(self, now: float):
        """``(start, times, units, rates at start)`` of the latest whole window before ``now``."""
        start_i = max(i for i, c in enumerate(self.chunks) if c[0] <= now - self.window_s + 1e-9)
        chunks = self.chunks[start_i:]
        t = np.concatenate([c[2] for c in chunks])
        u = np.concatenate([c[3] for c in chunks])
        return chunks[0][0], t, u, chunks[0][4]


def start_stream(
    s: RegisteredSession, cfg, times, uidx, *, fit: str, model, refit_every_s, refit_window_s, stop=lambda: None
) -> None:
    """A history model's registration after the embeddings: the stream starts at the reference rates at the
    reference start and takes in the reference spikes; the read-outs are fitted there (``fit`` a mode of
    :data:`~nh_serve.inference.reference_fit.FIT_STEPS_S`; ``model()`` returns the model to fit with) and, with
    ``refit_every_s``, refitted as the session streams (with the same window spacing)."""
    r0, r1 = s.reference
    t = np.asarray(times, dtype=np.float64)
    o = np.argsort(t, kind="stable")
    ts, us = t[o], np.asarray(uidx)[o]
    s.history = EmaState(ref_rate_hz=s.ref_rate_hz, taus=cfg.history_taus, start=r0)
    s.history.update(ts, us, until=r1)
    s.history_states = collections.deque([(r1, s.history.rates.copy())], maxlen=HISTORY_STATES)
    if cfg.readout_dim:
        s.readout = torch.zeros(s.n_units, cfg.readout_dim + 1)
        if fit in FIT_STEPS_S:
            s.readout, s.correction, s.fit = fit_readout(
                model(), times=ts, units=us, reference=(r0, r1), unit_features=s.features,
                ref_rate_hz=s.ref_rate_hz, embeddings=s.embeddings, should_stop=stop, step_s=FIT_STEPS_S[fit],
            )
    s.fit = {"mode": fit, **(s.fit or {})}
    if refit_every_s is not None:
        window = float(refit_window_s) if refit_window_s is not None else default_refit_window((r0, r1))
        if not (math.isfinite(window) and window >= MIN_FIT_REFERENCE_S):
            raise InputError(f"refit_window_s: must be at least {MIN_FIT_REFERENCE_S:g} s, got {refit_window_s!r}")
        s.refit = Refitter(every_s=float(refit_every_s), window_s=window, t=r1)


def refit_session(model, s: RegisteredSession) -> None:
    """Fit the session's read-outs again on the last window of its stream (``refit_every_s``)."""
    with s.lock:
        now = s.history.t
        start, times, units, init = s.refit.data(now)
        s.refit.last_fit = now
    refit_on(model, s, times=times, units=units, window=(start, now), history_init=init)
    with s.lock:
        s.refit.refits += 1
        s.fit = {**(s.fit or {}), "refits": s.refit.refits}


def refit_on(model, s: RegisteredSession, *, times, units, window: tuple[float, float], history_init) -> dict:
    """Replace the session's read-outs by ones fitted on the spikes ``times`` / ``units`` (unit rows, sorted)
    of ``window`` (``history_init``: the units' smoothed rates at its start), with the spacing of the session's
    fit mode; the fit's record goes to ``s.fit["last_refit"]`` and is returned. What a streaming refit does,
    and what ``nh-serve eval --refit-every`` replays on a recording."""
    start, now = (float(x) for x in window)
    readout, correction, info = fit_readout(
        model, times=times, units=units, reference=(start, now), unit_features=s.features,
        ref_rate_hz=s.ref_rate_hz, embeddings=s.embeddings, history_init=history_init,
        step_s=FIT_STEPS_S.get((s.fit or {}).get("mode"), FIT_STEPS_S["reference"]),
    )
    record = {"window": [start, now], **info}
    with s.lock:
        s.readout, s.correction = readout, correction
        s.fit = {**(s.fit or {}), "last_refit": record}
    return record


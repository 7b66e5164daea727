"""Each registered session's history stream: the units' smoothed rates, carried from call to call.

A history model needs every unit's smoothed rates (:mod:`nh_serve.data.history`) at each context
end. A session starts them at its reference rates at the reference start and takes in the
reference spikes at registration; :func:`stream_history` then moves them forward with every
context a ``predict`` call sends, so a tool that streams consecutive windows sends nothing else.
"""

from __future__ import annotations

import warnings

import numpy as np

from nh_serve.data.spikes import check_spikes
from nh_serve.data.windows import Window
from nh_serve.inference.sessions import RegisteredSession

#: A gap between the data a session has seen and a new context longer than this is "history incomplete".
HISTORY_GAP_S = 0.5
#: States a session keeps of its history stream (one per context end), for windows asked again.
HISTORY_STATES = 256


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
        if t0 > h.t + HISTORY_GAP_S:
            _warn(s, f"nothing was sent between {h.t:g} s and the context at {t0:g} s; that "
                                  "stretch counts as firing at the reference rate (send consecutive contexts, "
                                  "or pass history_rates)")
        if t0 > h.t:
            h.skip_to(t0)
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

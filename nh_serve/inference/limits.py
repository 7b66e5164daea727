"""Limits on what one call may ask of a :class:`~nh_serve.inference.predictor.Predictor`.

A Predictor built with ``limits=Limits()`` refuses, before doing the work, any call whose cost
is not bounded by what it carries: the service builds its Predictor that way (the values come
from ``NH_SERVE_*`` variables, see :mod:`service.settings`, and ``GET /model`` reports them). A
Predictor built without limits (``limits=None``, the default for library use) still checks that
every value is valid (finite times, a horizon the model has), only not how large the work is.

=============================  ==========  ====================================================
limit                          default     what it bounds
=============================  ==========  ====================================================
``max_units``                  1024        units of a session (distinct ids, ``units=``)
``max_spikes``                 2,000,000   spikes of a reference
``max_context_spikes``         100,000     spikes (and behaviour or image events) of one context
                                           window; each is a token of the model (~2 kB each)
``max_close_pairs``            1e8         pairs of one unit's reference spikes less than 100 ms
                                           apart: the autocorrelogram's work (~25 ns a pair)
``max_unit_id_chars``          128         characters of one string unit id
``max_reference_s``            3600        length of the reference window, seconds
``max_time_s``                 1e10        any time (spike, window start or end), seconds;
                                           1e10 s leaves room for Unix timestamps
``max_windows``                256         context windows of one ``predict_batch``
``max_adapt_steps``            200         ``adapt_steps`` of one registration
``max_adapt_unit_windows``     16,384      windows x units that test-time adaptation trains on
                                           (one window every 0.5 s of the reference)
``adapt_budget_s``             5           wall-clock seconds of a registration with
                                           adaptation, counted from its start (features and
                                           embeddings included); adaptation stops stepping then
=============================  ==========  ====================================================

Going over a size (spikes, units, windows) raises :class:`LimitExceeded` (the service answers
413); a value out of range (window length, times, steps) raises
:class:`~nh_serve.errors.InputError` (400). Every message names the field and the limit.

:class:`Cancelled` is what a registration raises when its ``should_stop`` callable says the
answer is no longer wanted (a timeout, a client that went away): nothing is kept.
"""

from __future__ import annotations

import math

import numpy as np

from nh_serve.data.features import ACORR_EDGES_S
from nh_serve.errors import InputError
from nh_serve.settings import Settings, settings

#: Seconds between the starts of two adaptation windows in the reference (Predictor._adapt).
ADAPT_STRIDE_S = 0.5


class LimitExceeded(InputError):
    """A call carries more than a limit allows (more spikes, units or windows)."""


class Cancelled(Exception):
    """The work was stopped because its result is no longer wanted; nothing was kept."""


@settings(where="limits", error=InputError)
class Limits(Settings):
    """The limits of one Predictor (see the module docstring for what each bounds)."""

    max_units: int = 1024
    max_spikes: int = 2_000_000
    max_context_spikes: int = 100_000
    max_close_pairs: int = 100_000_000
    max_unit_id_chars: int = 128
    max_reference_s: float = 3600.0
    max_time_s: float = 1e10
    max_windows: int = 256
    max_adapt_steps: int = 200
    max_adapt_unit_windows: int = 16_384
    adapt_budget_s: float = 5.0

    def __post_init__(self) -> None:
        for key in (
            "max_units",
            "max_spikes",
            "max_context_spikes",
            "max_close_pairs",
            "max_unit_id_chars",
            "max_windows",
            "max_adapt_unit_windows",
        ):
            if getattr(self, key) < 1:
                self.fail(key, f"must be >= 1, got {getattr(self, key)}")
        if self.max_adapt_steps < 0:
            self.fail("max_adapt_steps", f"must be >= 0, got {self.max_adapt_steps}")
        for key in ("max_reference_s", "max_time_s"):
            if not getattr(self, key) > 0:
                self.fail(key, f"must be > 0 seconds, got {getattr(self, key)}")
        if not self.adapt_budget_s >= 0:
            self.fail("adapt_budget_s", f"must be >= 0 seconds, got {self.adapt_budget_s}")

    # ------------------------------------------------------------------ checks
    def check_count(self, n: int, limit_name: str, what: str, name: str) -> None:
        """LimitExceeded if ``n`` ``what`` (e.g. "spikes") is more than the limit ``limit_name``."""
        limit = getattr(self, limit_name)
        if n > limit:
            raise LimitExceeded(f"{name}: {n} {what} is more than the limit of {limit} ({limit_name})")

    def check_time(self, value: float, name: str) -> None:
        """InputError unless ``value`` is a finite number of seconds of at most ``max_time_s``."""
        v = float(value)
        if not (math.isfinite(v) and abs(v) <= self.max_time_s):
            raise InputError(
                f"{name}: {v:g} s is not a finite time within the limit of {self.max_time_s:g} s "
                "(max_time_s); send seconds on the recording's clock"
            )

    def check_spike_times(self, times, name: str) -> None:
        """The largest finite spike time within ``max_time_s`` (non-finite ones are check_spikes' to report)."""
        t = np.asarray(times, dtype=np.float64)
        finite = t[np.isfinite(t)]
        if finite.size:
            self.check_time(float(np.abs(finite).max()), name)

    def check_close_pairs(self, times, unit_index, name: str) -> None:
        """LimitExceeded when the reference's autocorrelogram would count more than ``max_close_pairs``
        pairs (spikes of one unit closer than its largest lag): a few units firing at kHz cost
        seconds per million spikes in the features, however few units there are."""
        t = np.asarray(times, dtype=np.float64)
        u = np.asarray(unit_index, dtype=np.int64)
        if t.size * (t.size - 1) // 2 <= self.max_close_pairs or not np.all(np.isfinite(t)):
            return  # few spikes (or bad times, which check_spikes reports)
        lo, span = float(t.min()), float(t.max() - t.min()) + 1.0
        order = np.argsort(u, kind="stable")
        key = t[order]  # (N,) one unit after another, in time order: unit * span + (t - lo)
        key -= lo
        key += u[order] * span
        del order
        n = t.size
        # pairs (i, j > i) of one unit closer than the largest lag: sum over i of (first j at t_i + lag) - i - 1
        pairs = int(np.searchsorted(key, key + ACORR_EDGES_S[-1], side="left").sum()) - n * (n - 1) // 2 - n
        if pairs > self.max_close_pairs:
            raise LimitExceeded(
                f"{name}: {pairs} pairs of one unit's spikes lie within {ACORR_EDGES_S[-1] * 1000:g} ms of each "
                f"other, more than the limit of {self.max_close_pairs} (max_close_pairs); check that the times "
                "are in seconds and each unit is one neuron, or send a shorter reference"
            )

    def check_reference(self, start: float, end: float) -> None:
        """Times of the reference window and its length."""
        self.check_time(start, "reference_window")
        self.check_time(end, "reference_window")
        if end - start > self.max_reference_s:
            raise InputError(
                f"reference_window: [{start:g}, {end:g}) s is {end - start:g} s long, more than the limit "
                f"of {self.max_reference_s:g} s (max_reference_s); send a shorter reference (60 s is recommended)"
            )

    def check_adaptation(self, steps: int, *, n_windows: int, n_units: int, span_s: float) -> None:
        """``adapt_steps`` and the windows x units that adaptation would train on (``span_s``: a
        window's context + horizon, seconds)."""
        if steps > self.max_adapt_steps:
            raise InputError(
                f"adapt_steps: {steps} is more than this server's limit of {self.max_adapt_steps} (max_adapt_steps)"
            )
        if steps > 0 and n_windows * n_units > self.max_adapt_unit_windows:
            fit = self.max_adapt_unit_windows // max(1, n_units)  # windows that fit the limit
            hint = (
                f"send a reference of at most {(fit - 1) * ADAPT_STRIDE_S + span_s:g} s for adaptation"
                if fit >= 1
                else "register fewer units"
            )
            raise InputError(
                f"adapt_steps: adapting {n_units} units on {n_windows} reference windows "
                f"({n_windows * n_units} unit-windows) is more than the limit of {self.max_adapt_unit_windows} "
                f"(max_adapt_unit_windows); {hint}, or send adapt_steps 0"
            )


def n_adapt_windows(cfg, r0: float, r1: float) -> int:
    """Adaptation windows in the reference ``[r0, r1)`` for a model config: one every ADAPT_STRIDE_S
    whose context and horizon fit (as ``Predictor._adapt`` cuts them)."""
    span = cfg.context_s + cfg.n_bins * cfg.bin_size_s
    return int(math.floor((r1 - r0 - span + 1e-9) / ADAPT_STRIDE_S)) + 1 if r1 - r0 >= span else 0


def stopper(should_stop):
    """A function that raises :class:`Cancelled` when ``should_stop()`` is true (never, for None)."""

    def stop() -> None:
        if should_stop is not None and should_stop():
            raise Cancelled("stopped: the result is no longer wanted")

    return stop

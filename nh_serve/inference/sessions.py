"""Registered recordings: what the Predictor keeps about a recording's units, and the cache that holds them."""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np
import torch

from nh_serve.errors import InputError


@dataclass
class RegisteredSession:
    """Everything the model needs about a recording's units, computed once at registration."""

    token: str
    unit_ids: np.ndarray  # (U,) int64 or str, the caller's ids in row order
    reference: tuple[float, float]  # [start, end) seconds
    features: np.ndarray  # (U, 33) raw reference features
    ref_rate_hz: np.ndarray  # (U,) Hz
    embeddings: torch.Tensor  # (U, D) unit embeddings used for prediction
    adaptation: dict | None = None  # what test-time adaptation did, if it ran
    owner: str | None = None  # who registered it (a client of the service), for per-owner quotas
    last_used: float = field(default_factory=time.monotonic)
    history: object | None = None  # nh_serve.data.history.EmaState of history models: each unit's smoothed rates
    history_states: object | None = None  # deque of (time, (U, K) rates) at recent context ends
    readout: torch.Tensor | None = None  # (U, readout_dim + 1) per-unit read-out fitted on the reference
    correction: object | None = None  # nh_serve.inference.reference_fit.RateCorrection fitted with the read-out
    fit: dict | None = None  # what the reference fit did
    refit: object | None = None  # nh_serve.inference.reference_fit.Refitter when refit_every_s is set
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)  # guards history and readout

    def take_fit(self, other: RegisteredSession) -> None:
        """Use ``other``'s fitted read-outs and rate correction (an exported artifact cannot fit, so
        parity checks run it with the eager registration's fit)."""
        self.readout, self.correction = other.readout, other.correction

    @property
    def n_units(self) -> int:
        return int(self.unit_ids.shape[0])


class SessionCache:
    """Thread-safe LRU of registered sessions with a time-to-live (seconds since last use).

    With ``max_per_owner``, an owner (``RegisteredSession.owner``) that registers more sessions
    than that loses its own least recently used one, so one busy client cannot evict everyone
    else's sessions; sessions without an owner share the global LRU only.
    """

    def __init__(self, *, max_sessions: int = 64, ttl_s: float = 3600.0, max_per_owner: int | None = None):
        if int(max_sessions) < 1:
            raise ValueError(f"max_sessions must be >= 1, got {max_sessions}")
        if not ttl_s > 0:
            raise ValueError(f"ttl_s must be > 0 seconds, got {ttl_s}")
        if max_per_owner is not None and int(max_per_owner) < 1:
            raise ValueError(f"max_per_owner must be >= 1, got {max_per_owner}")
        self.max_sessions = int(max_sessions)
        self.ttl_s = float(ttl_s)
        self.max_per_owner = None if max_per_owner is None else int(max_per_owner)
        self._items: OrderedDict[str, RegisteredSession] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0
        self.evictions = 0

    def put(self, s: RegisteredSession) -> None:
        with self._lock:
            self._expire(time.monotonic())
            self._items[s.token] = s
            self._items.move_to_end(s.token)
            if s.owner is not None and self.max_per_owner is not None:
                own = [k for k, x in self._items.items() if x.owner == s.owner]  # oldest first
                for k in own[: max(0, len(own) - self.max_per_owner)]:
                    del self._items[k]
                    self.evictions += 1
            while len(self._items) > self.max_sessions:
                self._items.popitem(last=False)
                self.evictions += 1

    def get(self, token: str) -> RegisteredSession:
        now = time.monotonic()
        with self._lock:
            self._expire(now)
            s = self._items.get(token)
            if s is None:
                self.misses += 1
                raise InputError(
                    f"session token {token!r} is unknown or expired (sessions expire {self.ttl_s:g} s after "
                    f"their last use, and at most {self.max_sessions} are kept); register the reference again"
                )
            self.hits += 1
            s.last_used = now
            self._items.move_to_end(token)
            return s

    def discard(self, token: str) -> None:
        """Forget a session (no error if it is not there)."""
        with self._lock:
            self._items.pop(token, None)

    def __len__(self) -> int:
        with self._lock:
            return len(self._items)

    def _expire(self, now: float) -> None:
        dead = [k for k, s in self._items.items() if now - s.last_used > self.ttl_s]
        for k in dead:
            del self._items[k]
            self.evictions += 1

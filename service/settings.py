"""Service options and limits, read from ``NH_SERVE_*`` environment variables.

=============================  =========  ==========================================================
variable                       default    meaning
=============================  =========  ==========================================================
``NH_SERVE_CHECKPOINT``        default    checkpoint (or exported artifact) path; ``default`` is the
                                          built-in ``nh_serve/models/nh-small.safetensors``
``NH_SERVE_BACKEND``           auto       inference backend (:data:`nh_serve.inference.backends.BACKENDS`)
``NH_SERVE_MAX_SESSIONS``      64         registered sessions kept (least recently used evicted)
``NH_SERVE_SESSION_TTL_S``     3600       a session expires this many seconds after its last use
``NH_SERVE_MAX_UNITS``         1024       units per session
``NH_SERVE_MAX_SPIKES``        2000000    spikes per spike train in one request
``NH_SERVE_MAX_BODY_MB``       32         request body size, MiB (larger bodies get 413)
``NH_SERVE_MAX_WINDOWS``       256        context windows per ``/predict_batch`` request
``NH_SERVE_MAX_ADAPT_STEPS``   200        ``adapt_steps`` of one registration
``NH_SERVE_ADAPT_BUDGET_S``    5          wall-clock budget of test-time adaptation, seconds
``NH_SERVE_THREADS``           cores      requests computed at once (BentoML ``threads``)
``NH_SERVE_TORCH_THREADS``     1          torch intra-op threads per request
``NH_SERVE_ACCESS_LOG``        0          1: log every request (BentoML access log; costs latency)
=============================  =========  ==========================================================

The service runs ONE worker process: sessions live in that process's memory,
so a second worker would not know the first one's tokens. Concurrency comes
from threads instead: torch releases the GIL, so ``NH_SERVE_THREADS`` requests
(default: one per CPU core) compute at once, each with
``NH_SERVE_TORCH_THREADS`` intra-op threads. On 2 cores, 32 clients got about
1.5x the throughput of one request at a time with 2 threads x 1 torch thread,
and less with 1 thread x 2 torch threads (see docs/benchmarks.md, ``service``).
"""

from __future__ import annotations

import math
import os
from dataclasses import field

from nh_serve.errors import InputError
from nh_serve.settings import Settings as BaseSettings
from nh_serve.settings import settings


def _env_number(name: str, default: float, *, integer: bool, minimum: float) -> float:
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = int(raw) if integer else float(raw)
    except ValueError:
        kind = "an integer" if integer else "a number"
        raise InputError(f"environment variable {name}={raw!r} must be {kind}") from None
    if not (math.isfinite(value) and value >= minimum):
        raise InputError(f"environment variable {name}={raw!r} must be >= {minimum:g}")
    return value


def _env_flag(name: str, default: bool) -> bool:
    raw = os.environ.get(name, "").strip().lower()
    if raw == "":
        return default
    if raw in ("1", "true", "yes", "on"):
        return True
    if raw in ("0", "false", "no", "off"):
        return False
    raise InputError(f"environment variable {name}={raw!r} must be 1 or 0")


@settings(
    where="service settings",
    error=InputError,
    names={
        "checkpoint": "NH_SERVE_CHECKPOINT",
        "backend": "NH_SERVE_BACKEND",
        "max_sessions": "NH_SERVE_MAX_SESSIONS",
        "session_ttl_s": "NH_SERVE_SESSION_TTL_S",
        "max_units": "NH_SERVE_MAX_UNITS",
        "max_spikes": "NH_SERVE_MAX_SPIKES",
        "max_body_bytes": "NH_SERVE_MAX_BODY_MB (in bytes)",
        "max_windows": "NH_SERVE_MAX_WINDOWS",
        "max_adapt_steps": "NH_SERVE_MAX_ADAPT_STEPS",
        "adapt_budget_s": "NH_SERVE_ADAPT_BUDGET_S",
        "threads": "NH_SERVE_THREADS",
        "torch_threads": "NH_SERVE_TORCH_THREADS",
    },
)
class Settings(BaseSettings):
    """Limits and options of one service process (see the module docstring)."""

    checkpoint: str = "default"
    backend: str = "auto"
    max_sessions: int = 64
    session_ttl_s: float = 3600.0
    max_units: int = 1024
    max_spikes: int = 2_000_000
    max_body_bytes: int = 32 << 20
    max_windows: int = 256
    max_adapt_steps: int = 200
    adapt_budget_s: float = 5.0
    threads: int = field(default_factory=lambda: max(1, os.cpu_count() or 1))
    torch_threads: int = 1
    access_log: bool = False

    def __post_init__(self) -> None:
        for key, minimum in (
            ("max_sessions", 1),
            ("max_units", 1),
            ("max_spikes", 1),
            ("max_body_bytes", 1),
            ("max_windows", 1),
            ("max_adapt_steps", 0),
            ("adapt_budget_s", 0.0),
            ("threads", 1),
            ("torch_threads", 1),
        ):
            if getattr(self, key) < minimum:
                self.fail(key, f"must be >= {minimum:g}, got {getattr(self, key)}")
        if not self.session_ttl_s > 0:
            self.fail("session_ttl_s", f"must be > 0 seconds, got {self.session_ttl_s}")

    @classmethod
    def from_env(cls) -> Settings:
        """Read the ``NH_SERVE_*`` variables; a malformed value raises InputError naming it."""
        d = cls()
        return cls(
            checkpoint=os.environ.get("NH_SERVE_CHECKPOINT", "").strip() or d.checkpoint,
            backend=os.environ.get("NH_SERVE_BACKEND", "").strip() or d.backend,
            max_sessions=int(_env_number("NH_SERVE_MAX_SESSIONS", d.max_sessions, integer=True, minimum=1)),
            session_ttl_s=_env_number("NH_SERVE_SESSION_TTL_S", d.session_ttl_s, integer=False, minimum=1e-3),
            max_units=int(_env_number("NH_SERVE_MAX_UNITS", d.max_units, integer=True, minimum=1)),
            max_spikes=int(_env_number("NH_SERVE_MAX_SPIKES", d.max_spikes, integer=True, minimum=1)),
            max_body_bytes=int(
                _env_number("NH_SERVE_MAX_BODY_MB", d.max_body_bytes / 2**20, integer=False, minimum=1e-3)
                * 2**20
            ),
            max_windows=int(_env_number("NH_SERVE_MAX_WINDOWS", d.max_windows, integer=True, minimum=1)),
            max_adapt_steps=int(
                _env_number("NH_SERVE_MAX_ADAPT_STEPS", d.max_adapt_steps, integer=True, minimum=0)
            ),
            adapt_budget_s=_env_number(
                "NH_SERVE_ADAPT_BUDGET_S", d.adapt_budget_s, integer=False, minimum=0.0
            ),
            threads=int(_env_number("NH_SERVE_THREADS", d.threads, integer=True, minimum=1)),
            torch_threads=int(
                _env_number("NH_SERVE_TORCH_THREADS", d.torch_threads, integer=True, minimum=1)
            ),
        )

    def public(self) -> dict:
        """The limits a client may want to know (shown by ``GET /model``)."""
        return {
            "max_sessions": self.max_sessions,
            "session_ttl_s": self.session_ttl_s,
            "max_units": self.max_units,
            "max_spikes": self.max_spikes,
            "max_body_bytes": self.max_body_bytes,
            "max_windows": self.max_windows,
            "max_adapt_steps": self.max_adapt_steps,
            "adapt_budget_s": self.adapt_budget_s,
            "threads": self.threads,
            "torch_threads": self.torch_threads,
        }

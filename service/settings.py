"""Service options and limits, read from ``NH_SERVE_*`` environment variables.

docs/service.md explains each of them with the security stance; ``GET /model`` reports them
under ``limits`` (never the API key). What one request may ask (a size over its limit gets 413,
a value out of range 400, each naming the field and the limit):

- ``NH_SERVE_MAX_BODY_MB`` (32): request body size, MiB;
- ``NH_SERVE_MAX_SPIKES`` (2000000): spikes of a reference;
- ``NH_SERVE_MAX_CONTEXT_SPIKES`` (100000): spikes (and behaviour or image events) of one context window;
- ``NH_SERVE_MAX_UNITS`` (1024): units of a session (distinct ids, ``units``, ``unit_table``);
- ``NH_SERVE_MAX_UNIT_ID_CHARS`` (128): characters of one unit id;
- ``NH_SERVE_MAX_CLOSE_PAIRS`` (100000000): pairs of one unit's reference spikes less than 100 ms apart;
- ``NH_SERVE_MAX_REFERENCE_S`` (3600): length of a reference window, seconds;
- ``NH_SERVE_MAX_TIME_S`` (1e10): largest time (spike, window start or end), seconds;
- ``NH_SERVE_MAX_WINDOWS`` (256): context windows of one ``/predict_batch``;
- ``NH_SERVE_MAX_ADAPT_STEPS`` (200): ``adapt_steps`` of one registration;
- ``NH_SERVE_MAX_ADAPT_UNIT_WINDOWS`` (16384): reference windows x units that adaptation trains on;
- ``NH_SERVE_ADAPT_BUDGET_S`` (5): wall-clock seconds of a registration with adaptation, from its start.

How the server shares itself out:

- ``NH_SERVE_MAX_SESSIONS`` (64): registered sessions kept (least recently used evicted);
- ``NH_SERVE_MAX_SESSIONS_PER_CLIENT`` (16, at most a quarter of the sessions): sessions one client
  keeps, its own oldest going first; a client is its address plus its ``X-Client-Id`` header;
- ``NH_SERVE_SESSION_TTL_S`` (3600): a session expires this many seconds after its last use;
- ``NH_SERVE_REQUEST_TIMEOUT_S`` (30): a request's work is stopped after this long (503);
- ``NH_SERVE_BODY_TIMEOUT_S`` (15): the whole body must arrive within this long (408);
- ``NH_SERVE_MAX_CONCURRENCY`` (64): API requests in progress at once (more get 429);
- ``NH_SERVE_THREADS`` (one per core): threads computing predictions and registrations;
- ``NH_SERVE_FIT_THREADS`` (1): threads for registrations with adaptation, apart from the others;
- ``NH_SERVE_MAX_QUEUED_FITS`` (4): registrations with adaptation waiting for a fit thread (more get 429);
- ``NH_SERVE_TORCH_THREADS`` (1): torch intra-op threads per computation.

Who may talk to it:

- ``NH_SERVE_API_KEY`` (unset): when set, every request but ``/livez``, ``/readyz`` and the OpenAPI
  page needs ``Authorization: Bearer <key>`` (or ``X-API-Key``); 401 without it;
- ``NH_SERVE_ALLOWED_HOSTS`` (``127.0.0.1,localhost,::1``): ``Host`` names answered (``*``: any); 403 otherwise;
- ``NH_SERVE_ALLOWED_ORIGINS`` (unset): browser origins allowed besides the server's own; 403 otherwise.

Others: ``NH_SERVE_CHECKPOINT`` (``default``: the built-in checkpoint; or a checkpoint or exported
artifact path), ``NH_SERVE_BACKEND`` (``auto``), ``NH_SERVE_ACCESS_LOG`` (0; 1 logs every request).

The service runs ONE worker process: sessions live in that process's memory, so a second worker
would not know the first one's tokens. Concurrency comes from threads instead: torch releases
the GIL, so ``NH_SERVE_THREADS`` computations (default: one per CPU core) run at once, each with
``NH_SERVE_TORCH_THREADS`` intra-op threads. On 2 cores, 32 clients got about 1.5x the
throughput of one request at a time with 2 threads x 1 torch thread, and less with 1 thread x 2
torch threads (see docs/benchmarks.md, ``service``).
"""

from __future__ import annotations

import math
import os
from dataclasses import field

from nh_serve.errors import InputError
from nh_serve.inference.limits import Limits
from nh_serve.settings import Settings as BaseSettings
from nh_serve.settings import settings

#: Limits field -> its environment variable (integer, minimum).
LIMIT_VARIABLES = {
    "max_units": ("NH_SERVE_MAX_UNITS", True, 1),
    "max_spikes": ("NH_SERVE_MAX_SPIKES", True, 1),
    "max_context_spikes": ("NH_SERVE_MAX_CONTEXT_SPIKES", True, 1),
    "max_close_pairs": ("NH_SERVE_MAX_CLOSE_PAIRS", True, 1),
    "max_unit_id_chars": ("NH_SERVE_MAX_UNIT_ID_CHARS", True, 1),
    "max_reference_s": ("NH_SERVE_MAX_REFERENCE_S", False, 1e-3),
    "max_time_s": ("NH_SERVE_MAX_TIME_S", False, 1e-3),
    "max_windows": ("NH_SERVE_MAX_WINDOWS", True, 1),
    "max_adapt_steps": ("NH_SERVE_MAX_ADAPT_STEPS", True, 0),
    "max_adapt_unit_windows": ("NH_SERVE_MAX_ADAPT_UNIT_WINDOWS", True, 1),
    "adapt_budget_s": ("NH_SERVE_ADAPT_BUDGET_S", False, 0.0),
}

DEFAULT_ALLOWED_HOSTS = ("127.0.0.1", "localhost", "::1")


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


def _env_list(name: str, default: tuple[str, ...]) -> tuple[str, ...]:
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return default
    return tuple(x.strip().lower() for x in raw.split(",") if x.strip())


@settings(
    where="service settings",
    error=InputError,
    names={
        "checkpoint": "NH_SERVE_CHECKPOINT",
        "backend": "NH_SERVE_BACKEND",
        "max_sessions": "NH_SERVE_MAX_SESSIONS",
        "max_sessions_per_client": "NH_SERVE_MAX_SESSIONS_PER_CLIENT",
        "session_ttl_s": "NH_SERVE_SESSION_TTL_S",
        "max_body_bytes": "NH_SERVE_MAX_BODY_MB (in bytes)",
        "request_timeout_s": "NH_SERVE_REQUEST_TIMEOUT_S",
        "body_timeout_s": "NH_SERVE_BODY_TIMEOUT_S",
        "max_concurrency": "NH_SERVE_MAX_CONCURRENCY",
        "threads": "NH_SERVE_THREADS",
        "fit_threads": "NH_SERVE_FIT_THREADS",
        "max_queued_fits": "NH_SERVE_MAX_QUEUED_FITS",
        "torch_threads": "NH_SERVE_TORCH_THREADS",
        "allowed_hosts": "NH_SERVE_ALLOWED_HOSTS",
        "allowed_origins": "NH_SERVE_ALLOWED_ORIGINS",
    },
)
class Settings(BaseSettings):
    """Limits and options of one service process (see the module docstring)."""

    checkpoint: str = "default"
    backend: str = "auto"
    limits: Limits = field(default_factory=Limits)
    max_sessions: int = 64
    max_sessions_per_client: int = 16
    session_ttl_s: float = 3600.0
    max_body_bytes: int = 32 << 20
    request_timeout_s: float = 30.0
    body_timeout_s: float = 15.0
    max_concurrency: int = 64
    threads: int = field(default_factory=lambda: max(1, os.cpu_count() or 1))
    fit_threads: int = 1
    max_queued_fits: int = 4
    torch_threads: int = 1
    access_log: bool = False
    api_key: str = field(default="", repr=False)
    allowed_hosts: tuple[str, ...] = DEFAULT_ALLOWED_HOSTS
    allowed_origins: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for key, minimum in (
            ("max_sessions", 1),
            ("max_sessions_per_client", 1),
            ("max_body_bytes", 1),
            ("max_concurrency", 1),
            ("threads", 1),
            ("fit_threads", 1),
            ("max_queued_fits", 0),
            ("torch_threads", 1),
        ):
            if getattr(self, key) < minimum:
                self.fail(key, f"must be >= {minimum:g}, got {getattr(self, key)}")
        for key in ("session_ttl_s", "request_timeout_s", "body_timeout_s"):
            if not getattr(self, key) > 0:
                self.fail(key, f"must be > 0 seconds, got {getattr(self, key)}")
        if not self.allowed_hosts:
            self.fail("allowed_hosts", "must name at least one host (or * for any)")

    @classmethod
    def from_env(cls) -> Settings:
        """Read the ``NH_SERVE_*`` variables; a malformed value raises InputError naming it."""
        d = cls()
        limits = Limits(
            **{
                key: (int if integer else float)(
                    _env_number(var, getattr(d.limits, key), integer=integer, minimum=minimum)
                )
                for key, (var, integer, minimum) in LIMIT_VARIABLES.items()
            }
        )
        max_sessions = int(_env_number("NH_SERVE_MAX_SESSIONS", d.max_sessions, integer=True, minimum=1))
        return cls(
            checkpoint=os.environ.get("NH_SERVE_CHECKPOINT", "").strip() or d.checkpoint,
            backend=os.environ.get("NH_SERVE_BACKEND", "").strip() or d.backend,
            limits=limits,
            max_sessions=max_sessions,
            max_sessions_per_client=int(
                _env_number(
                    "NH_SERVE_MAX_SESSIONS_PER_CLIENT",
                    min(d.max_sessions_per_client, max(1, max_sessions // 4)),
                    integer=True,
                    minimum=1,
                )
            ),
            session_ttl_s=_env_number("NH_SERVE_SESSION_TTL_S", d.session_ttl_s, integer=False, minimum=1e-3),
            max_body_bytes=int(
                _env_number("NH_SERVE_MAX_BODY_MB", d.max_body_bytes / 2**20, integer=False, minimum=1e-3)
                * 2**20
            ),
            request_timeout_s=_env_number(
                "NH_SERVE_REQUEST_TIMEOUT_S", d.request_timeout_s, integer=False, minimum=1e-3
            ),
            body_timeout_s=_env_number("NH_SERVE_BODY_TIMEOUT_S", d.body_timeout_s, integer=False, minimum=1e-3),
            max_concurrency=int(
                _env_number("NH_SERVE_MAX_CONCURRENCY", d.max_concurrency, integer=True, minimum=1)
            ),
            threads=int(_env_number("NH_SERVE_THREADS", d.threads, integer=True, minimum=1)),
            fit_threads=int(_env_number("NH_SERVE_FIT_THREADS", d.fit_threads, integer=True, minimum=1)),
            max_queued_fits=int(
                _env_number("NH_SERVE_MAX_QUEUED_FITS", d.max_queued_fits, integer=True, minimum=0)
            ),
            torch_threads=int(
                _env_number("NH_SERVE_TORCH_THREADS", d.torch_threads, integer=True, minimum=1)
            ),
            access_log=_env_flag("NH_SERVE_ACCESS_LOG", d.access_log),
            api_key=os.environ.get("NH_SERVE_API_KEY", "").strip(),
            allowed_hosts=_env_list("NH_SERVE_ALLOWED_HOSTS", d.allowed_hosts),
            allowed_origins=_env_list("NH_SERVE_ALLOWED_ORIGINS", d.allowed_origins),
        )

    def public(self) -> dict:
        """The limits a client may want to know (shown by ``GET /model``; never the API key)."""
        return {
            **self.limits.to_dict(),
            "max_body_bytes": self.max_body_bytes,
            "max_sessions": self.max_sessions,
            "max_sessions_per_client": self.max_sessions_per_client,
            "session_ttl_s": self.session_ttl_s,
            "request_timeout_s": self.request_timeout_s,
            "body_timeout_s": self.body_timeout_s,
            "max_concurrency": self.max_concurrency,
            "threads": self.threads,
            "fit_threads": self.fit_threads,
            "max_queued_fits": self.max_queued_fits,
            "torch_threads": self.torch_threads,
            "api_key_required": bool(self.api_key),
        }

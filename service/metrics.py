"""Prometheus metrics of the service, added to BentoML's ``/metrics``.

BentoML 1.4 already exports request counts and latencies per endpoint
(``bentoml_service_request_total``, ``bentoml_service_request_duration_seconds``).
These add what it cannot see: session-cache hits, misses, evictions and size,
model time per prediction and registration, windows predicted, and rejected
requests by status.

BentoML runs ``prometheus_client`` in multiprocess mode and sets
``PROMETHEUS_MULTIPROC_DIR`` in the worker only after the service module is
imported, so the metrics must be created in the worker (``ServiceMetrics.get()``
from the service's ``__init__`` or a middleware), never at import time
(``bentoml.metrics`` is deprecated in favour of ``prometheus_client``).
"""

from __future__ import annotations

import threading

_LATENCY_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.015, 0.02, 0.03, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class ServiceMetrics:
    """The service's counters, gauges and histograms (one set per process)."""

    _instance: ServiceMetrics | None = None
    _lock = threading.Lock()

    def __init__(self):
        import prometheus_client as pc

        self.cache_hits = pc.Counter("nh_serve_session_cache_hits", "Session tokens found in the cache")
        self.cache_misses = pc.Counter(
            "nh_serve_session_cache_misses", "Session tokens not found (unknown or expired): 404 answers"
        )
        self.cache_evictions = pc.Counter(
            "nh_serve_session_cache_evictions", "Sessions dropped by the LRU limit or their time limit"
        )
        self.sessions = pc.Gauge(
            "nh_serve_sessions", "Registered sessions held in memory", multiprocess_mode="livesum"
        )
        self.prediction_seconds = pc.Histogram(
            "nh_serve_prediction_seconds",
            "Model time of one predict or predict_batch request, seconds (excludes HTTP and JSON)",
            ["endpoint"],
            buckets=_LATENCY_BUCKETS,
        )
        self.registration_seconds = pc.Histogram(
            "nh_serve_registration_seconds",
            "Time to register a session (features, embeddings, adaptation), seconds",
            buckets=_LATENCY_BUCKETS,
        )
        self.windows = pc.Counter("nh_serve_windows_predicted", "Context windows predicted")
        self.rejected = pc.Counter(
            "nh_serve_rejected_requests",
            "Requests refused for bad input, by endpoint and status",
            ["endpoint", "status"],
        )

    @classmethod
    def get(cls) -> ServiceMetrics:
        """The process's metrics, created on first use."""
        with cls._lock:
            if cls._instance is None:
                cls._instance = cls()
            return cls._instance

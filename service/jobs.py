"""Where the API's work runs: thread pools, a time limit, and a stop flag for abandoned work.

Predictions and plain registrations run in one pool of ``NH_SERVE_THREADS`` threads;
registrations with test-time adaptation (fits) in their own pool of ``NH_SERVE_FIT_THREADS``,
so a prediction never waits behind a fit (the model is only read by predictions; adaptation
changes the session's own embeddings). At most ``NH_SERVE_MAX_QUEUED_FITS`` fits wait for a fit
thread; more get 429.

Every job gets a ``should_stop`` callable. When the request's time limit
(``NH_SERVE_REQUEST_TIMEOUT_S``) passes, or the client disconnects, the answer is abandoned:
the job is told to stop (a registration stops between its steps and keeps nothing, see
``Predictor.register``) and the client gets 503 with ``Retry-After``.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from service.handlers import ApiError

#: Seconds between two looks at whether the client is still connected.
POLL_S = 0.25


class Jobs:
    """The two pools and the time limit of one service process."""

    def __init__(self, *, threads: int, fit_threads: int, max_queued_fits: int, timeout_s: float):
        self.requests = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="nh-request")
        self.fits = ThreadPoolExecutor(max_workers=fit_threads, thread_name_prefix="nh-fit")
        self.fit_threads = fit_threads
        self.max_queued_fits = max_queued_fits
        self.timeout_s = float(timeout_s)
        self._fits = 0  # fits running or waiting
        self._lock = threading.Lock()
        self.stopped = 0  # jobs told to stop (timeouts and disconnects)

    async def run(
        self,
        job: Callable[[Callable[[], bool]], Any],
        *,
        fit: bool = False,
        disconnected: Callable[[], Awaitable[bool]] | None = None,
    ) -> Any:
        """``job(should_stop)`` in its pool; its result, or ApiError 503 when abandoned (429: fit queue full)."""
        if fit:
            with self._lock:
                if self._fits >= self.fit_threads + self.max_queued_fits:
                    raise ApiError(
                        429,
                        f"busy: {self._fits} registrations with adapt_steps are running or waiting, this "
                        "server's limit (NH_SERVE_FIT_THREADS + NH_SERVE_MAX_QUEUED_FITS); retry in a moment",
                        retry_after=2,
                    )
                self._fits += 1
        stop = threading.Event()
        loop = asyncio.get_running_loop()
        future = loop.run_in_executor(self.fits if fit else self.requests, job, stop.is_set)
        try:
            deadline = loop.time() + self.timeout_s
            while True:
                left = deadline - loop.time()
                if left <= 0:
                    raise ApiError(
                        503,
                        f"timeout: the request did not finish within this server's limit of {self.timeout_s:g} s "
                        "(NH_SERVE_REQUEST_TIMEOUT_S); it was stopped and nothing was kept; retry later, or "
                        "send less work (fewer spikes, windows or adapt_steps)",
                        retry_after=1,
                    )
                done, _ = await asyncio.wait({future}, timeout=min(POLL_S, left))
                if done:
                    return future.result()
                if disconnected is not None and await disconnected():
                    raise ApiError(499, "client: the client went away; the work was stopped")
        except BaseException:
            if not future.done():
                stop.set()
                self.stopped += 1
                future.add_done_callback(lambda f: f.cancelled() or f.exception())  # retrieved: expected, not logged
            raise
        finally:
            if fit:
                future.add_done_callback(self._fit_done)

    def _fit_done(self, _future) -> None:
        with self._lock:
            self._fits -= 1

    def shutdown(self) -> None:
        self.requests.shutdown(wait=False, cancel_futures=True)
        self.fits.shutdown(wait=False, cancel_futures=True)

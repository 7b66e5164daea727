"""Tie the service's worker process to the ``bentoml serve`` process that started it.

BentoML runs the worker in a session of its own and hands it the listening socket. If the
``bentoml serve`` process is killed (``kill -9``), nothing stops the worker: it would keep
serving on the port, and a new server could not bind it ("Address already in use").
:func:`tie_to_parent` makes the worker end with its parent: on Linux the kernel sends it
SIGKILL when the parent dies (``prctl(PR_SET_PDEATHSIG)``), and on every platform a watchdog
thread checks the parent's pid every half second and ends the worker when it has changed.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import sys
import threading
import time

log = logging.getLogger("bentoml.nh_serve")

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def tie_to_parent(*, poll_s: float = 0.5) -> None:
    """End this process (SIGKILL) as soon as its parent process is gone."""
    parent = os.getppid()
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        except (OSError, AttributeError):  # no prctl: the watchdog below still works
            pass
    if parent == 1 or os.getppid() != parent:  # the parent died before we got here
        _end(parent)

    def watch() -> None:
        while True:
            time.sleep(poll_s)
            if os.getppid() != parent:
                _end(parent)

    threading.Thread(target=watch, name="nh-parent-watchdog", daemon=True).start()


def _end(parent: int) -> None:
    msg = f"nh-serve worker {os.getpid()}: its bentoml serve process {parent} is gone; stopping"
    log.critical(msg)
    print(msg, file=sys.stderr, flush=True)
    os.kill(os.getpid(), signal.SIGKILL)

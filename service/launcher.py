"""Start and stop ``bentoml serve`` of the service from Python (tests, benchmarks).

:class:`ServeProcess` runs ``bentoml serve <target> --host 127.0.0.1 --port <free port>``
in its own process group with usage tracking off and ``BENTOML_HOME`` where
you say, waits for ``/readyz`` (failing with the server's log) and stops it:
TERM to the process group (the server stops its workers, which BentoML runs
in sessions of their own), then KILL for anything left.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def bentoml_env(home, **extra: str) -> dict[str, str]:
    """This process's environment plus BENTOML_DO_NOT_TRACK, BENTOML_HOME=``home`` and the venv's bin on PATH."""
    env = dict(os.environ)
    env.update(
        BENTOML_DO_NOT_TRACK="true",
        BENTOML_HOME=str(home),
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
        PYTHONUNBUFFERED="1",
    )
    env.update({k: str(v) for k, v in extra.items()})
    return env


class ServeProcess:
    """``bentoml serve`` on 127.0.0.1 in its own process group; :meth:`stop` always cleans up."""

    def __init__(
        self,
        *,
        env: dict[str, str],
        log_path,
        target: str = "service.service:NHServe",
        cwd=REPO,
        port: int | None = None,
        host: str | None = "127.0.0.1",
    ):
        """``host=None`` leaves ``--host`` out (the service's own default, 127.0.0.1, applies)."""
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = Path(log_path)
        self._log = open(self.log_path, "ab")
        self._stopped = False
        bentoml = Path(sys.executable).parent / "bentoml"
        self.proc = subprocess.Popen(
            [str(bentoml), "serve", target, *(["--host", host] if host else []), "--port", str(self.port)],
            cwd=str(cwd),
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.pid = self.proc.pid

    def log(self, tail: int = 6000) -> str:
        """The last ``tail`` characters of the server's output."""
        try:
            return self.log_path.read_text(errors="replace")[-tail:]
        except OSError:
            return "(no log)"

    def wait_ready(self, timeout_s: float = 60.0) -> None:
        """Poll ``/readyz`` until 200; on a timeout or an early exit stop the server and raise with its log."""
        import httpx

        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                log = self.log()
                self.stop()
                raise RuntimeError(f"bentoml serve exited with code {self.proc.returncode}; its log:\n{log}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.url}/readyz", timeout=2.0).status_code == 200:
                    return
            time.sleep(0.25)
        log = self.log()
        self.stop()
        raise RuntimeError(f"bentoml serve was not ready after {timeout_s:g} s; its log:\n{log}")

    def processes(self) -> list:
        """``psutil.Process`` of the server and its workers (empty once it has stopped)."""
        import psutil

        with contextlib.suppress(psutil.Error):
            main = psutil.Process(self.pid)
            return [main, *main.children(recursive=True)]
        return []

    def worker_rss_bytes(self) -> int:
        """Resident memory of the worker process(es) alone, bytes (0 while none is running)."""
        import psutil

        total = 0
        for p in self.processes()[1:]:
            with contextlib.suppress(psutil.Error):
                total += p.memory_info().rss
        return total

    def rss_bytes(self) -> int:
        """Resident memory of the server and its workers together, bytes."""
        import psutil

        total = 0
        for p in self.processes():
            with contextlib.suppress(psutil.Error):
                total += p.memory_info().rss
        return total

    def stop(self, timeout_s: float = 20.0) -> None:
        """TERM the process group (the server stops its workers), then KILL whatever is left."""
        if self._stopped:
            return
        self._stopped = True
        children = self.processes()[1:]
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)
        import psutil

        for p in (
            children
        ):  # workers left behind by a server that was killed (is_running checks the PID's identity)
            with contextlib.suppress(psutil.Error):
                if p.is_running():
                    p.kill()
        self._log.close()

    def __enter__(self) -> ServeProcess:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

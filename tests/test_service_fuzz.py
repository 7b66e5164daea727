"""Fuzz the HTTP API from its own OpenAPI document (schemathesis) and require that no request gets a 5xx.

Every POST endpoint gets schema-conforming bodies (positive) and schema-breaking
ones (negative), a bounded number of examples each with a time cap per
endpoint; every answer must be < 500, and the server must still be ready at
the end. The counts are printed (run with ``-s`` to see them).
"""

from __future__ import annotations

import time

import httpx
import numpy as np
import pytest
from service_server import shared_server, stop_shared_server

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, Phase, given, settings  # noqa: E402

EXAMPLES = 120  # per endpoint and generation mode
TIME_CAP_S = 12.0  # per endpoint and generation mode
ENDPOINTS = ("/register", "/predict", "/predict_batch")


@pytest.fixture(scope="session")
def server():
    yield shared_server()
    stop_shared_server()  # session fixtures end after the last test of every module


def _fuzz(op, mode, *, url: str, session, failures: list[str]) -> dict[int, int]:
    """Send up to EXAMPLES generated requests to one operation (at most TIME_CAP_S); status -> count."""
    counts: dict[int, int] = {}
    deadline = time.monotonic() + TIME_CAP_S

    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        database=None,
        derandomize=True,
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(case=op.as_strategy(generation_mode=mode))
    def run(case):
        if time.monotonic() > deadline:
            return
        resp = case.call(base_url=url, session=session, timeout=30)
        counts[resp.status_code] = counts.get(resp.status_code, 0) + 1
        bad = resp.status_code >= 500
        if resp.status_code == 200 and isinstance(
            resp.json().get("rates_hz"), list
        ):  # never NaN/inf (null in JSON)
            rates = np.asarray(resp.json()["rates_hz"], dtype=float)
            bad = bad or not np.all(np.isfinite(rates))
        if bad and len(failures) < 5:
            failures.append(
                f"{case.method} {case.path} -> {resp.status_code}: {resp.text[:300]}\n"
                + case.as_curl_command(base_url=url)[:1500]
            )

    run()
    return counts


@pytest.mark.service
@pytest.mark.slow
def test_fuzz_api_never_answers_5xx(server):
    import requests

    schema = schemathesis.openapi.from_url(f"{server.url}/docs.json")
    summary: dict[str, dict[int, int]] = {}
    failures: list[str] = []
    with requests.Session() as session:
        for path in ENDPOINTS:
            op = schema[path]["POST"]
            for mode in (schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE):
                summary[f"POST {path} {mode.value}"] = _fuzz(
                    op, mode, url=server.url, session=session, failures=failures
                )
    total = sum(sum(c.values()) for c in summary.values())
    five_xx = sum(n for c in summary.values() for code, n in c.items() if code >= 500)
    lines = [
        f"  {k}: {sum(c.values())} cases, status counts {dict(sorted(c.items()))}" for k, c in summary.items()
    ]
    print(f"\nfuzz: {total} cases, {five_xx} answered 5xx\n" + "\n".join(lines))
    assert not failures, "\n\n".join(failures)  # 5xx, or rates that are not finite
    assert five_xx == 0
    assert all(sum(c.values()) > 0 for c in summary.values()), summary  # every endpoint and mode really ran
    assert httpx.get(f"{server.url}/readyz", timeout=10).status_code == 200

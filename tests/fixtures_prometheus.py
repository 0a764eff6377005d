"""A real Prometheus (the Debian package's binary) for the tests, and a tiny model-server stand-in
that serves vLLM-named latency histograms with known contents.

Fixtures:
- `prometheus` (function): a started `PrometheusProcess`; `add_target(host_port, labels)`
  makes it scrape an endpoint every second (file service discovery, picked up at once).
- `histogram_server` (function): a started `HistogramServer`.
"""

from __future__ import annotations

import math
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from spillway.testing.prometheus import PrometheusProcess

__all__ = ["HistogramServer", "PrometheusProcess", "expected_quantile"]


class HistogramServer:
    """Serves `/metrics` with Prometheus histograms whose counts grow at a fixed rate with a fixed
    distribution: `set_histogram(name, {upper_bound_s: share}, per_second)`, the shares of
    requests per bucket (non-cumulative; the rest lands in +Inf). Each scrape reports the counts
    accumulated since start, so `rate(...)` over any window gives exactly the distribution."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._hists: dict[str, tuple[dict[float, float], float, float]] = {}
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self.port = 0

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def set_histogram(self, name: str, shares: Mapping[float, float], per_second: float = 100.0) -> None:
        with self._lock:
            self._hists[name] = (dict(shares), per_second, time.monotonic())

    def render(self) -> str:
        lines: list[str] = []
        now = time.monotonic()
        with self._lock:
            hists = dict(self._hists)
        for name, (shares, per_second, since) in sorted(hists.items()):
            total = per_second * (now - since + 1.0)
            lines.append(f"# HELP {name} test histogram")
            lines.append(f"# TYPE {name} histogram")
            cumulative = 0.0
            for le in sorted(shares):
                cumulative += shares[le]
                lines.append(f'{name}_bucket{{le="{le}"}} {total * min(cumulative, 1.0):.6f}')
            lines.append(f'{name}_bucket{{le="+Inf"}} {total:.6f}')
            lines.append(f"{name}_count {total:.6f}")
            mid = sum(le * s for le, s in shares.items())
            lines.append(f"{name}_sum {total * mid:.6f}")
        return "\n".join(lines) + "\n"

    def start(self) -> None:
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                body = outer.render().encode()
                self.send_response(200)
                self.send_header("Content-Type", "text/plain; version=0.0.4")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = int(self._server.server_address[1])
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


def expected_quantile(q: float, shares: Mapping[float, float]) -> float:
    """What histogram_quantile reports for a HistogramServer distribution (linear in-bucket)."""
    bounds = sorted(shares)
    cumulative, prev_le, prev_c = 0.0, 0.0, 0.0
    for le in bounds:
        cumulative += shares[le]
        if cumulative >= q - 1e-12:
            return prev_le + (le - prev_le) * (q - prev_c) / (cumulative - prev_c)
        prev_le, prev_c = le, cumulative
    return bounds[-1] if bounds else math.nan


@pytest.fixture
def prometheus() -> Iterator[PrometheusProcess]:
    workdir = Path(tempfile.mkdtemp(prefix="spillway-prom-"))
    proc = PrometheusProcess(workdir)
    proc.start()
    try:
        yield proc
    finally:
        proc.stop()
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture
def histogram_server() -> Iterator[HistogramServer]:
    server = HistogramServer()
    server.start()
    try:
        yield server
    finally:
        server.stop()

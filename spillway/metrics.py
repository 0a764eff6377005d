"""Shared Prometheus plumbing. Each component owns its metrics in its own registry
(no global state); this module only serves a registry and holds the common buckets.
Metric names are listed in docs/metrics.md, which is the contract dashboards and alerts use."""

from __future__ import annotations

import threading
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, start_http_server

# Seconds. Fine at the low end: agent calls take tens of microseconds to a few milliseconds.
FAST_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
# Seconds, for reconciles and other control-plane work.
SLOW_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


def serve(registry: CollectorRegistry, port: int, host: str = "0.0.0.0") -> tuple[WSGIServer, threading.Thread]:
    """Serve `registry` on http://host:port/metrics in a daemon thread; port 0 picks a free one
    (read it back from `server.server_port`)."""
    return start_http_server(port, addr=host, registry=registry)

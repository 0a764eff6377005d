"""Shared HTTP plumbing for metrics and health. Each component owns its metrics in its own
registry (no global state); this module serves a registry with health endpoints beside it and
holds the common histogram buckets. Metric names are listed in docs/metrics.md: the contract
the dashboards and alert rules use."""

from __future__ import annotations

import argparse
from collections.abc import Callable

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

# Seconds. Fine at the low end: agent calls take tens of microseconds to a few milliseconds.
FAST_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
# Seconds, for reconciles and other control-plane work.
SLOW_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


def add_address_argument(parser: argparse.ArgumentParser) -> None:
    """`--metrics-address`, the same for every component: loopback unless told otherwise (the
    chart passes the pod IP, where the kubelet's probes and Prometheus reach it)."""
    parser.add_argument("--metrics-address", default="127.0.0.1",
                        help="address /metrics, /healthz and /readyz listen on (default 127.0.0.1; the chart "
                             "gives the pod IP; 0.0.0.0 for every interface)")


class HttpEndpoint:
    """`/metrics` (Prometheus text format), `/healthz` (the process is alive and its loop turns)
    and `/readyz` (the component can do its job: `ready()` returns an empty string when ready,
    else the reason it is not)."""

    def __init__(self, registry: CollectorRegistry, ready: Callable[[], str] | None = None) -> None:
        self.registry = registry
        self.ready = ready or (lambda: "")
        self._runner: web.AppRunner | None = None
        self.port = 0

    async def _metrics(self, _: web.Request) -> web.Response:
        body = generate_latest(self.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def _healthz(self, _: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def _readyz(self, _: web.Request) -> web.Response:
        reason = self.ready()
        if reason:
            return web.Response(status=503, text=f"not ready: {reason}\n")
        return web.Response(text="ok\n")

    async def start(self, port: int, host: str = "0.0.0.0") -> int:
        """Listen on host:port (0 picks a free port) and return the port."""
        app = web.Application()
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/readyz", self._readyz)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port)
        await site.start()
        server = site._server
        sockets = getattr(server, "sockets", None) or []
        self.port = sockets[0].getsockname()[1] if sockets else port
        return self.port

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

"""The device plugin's metrics (names and labels: docs/metrics.md, device plugin section)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from spillway.metrics import SLOW_BUCKETS


class Metrics:
    def __init__(self, node: str, registry: CollectorRegistry | None = None) -> None:
        self.node = node
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.units = Gauge("spillway_deviceplugin_units", "spillway.dev/peer-hbm units advertised to the kubelet",
                           ["node", "health"], registry=r)
        self.allocations = Counter("spillway_deviceplugin_allocations", "Allocate calls by result",
                                   ["node", "result"], registry=r)
        self.allocate_duration = Histogram("spillway_deviceplugin_allocate_duration_seconds", "Allocate latency",
                                           ["node"], buckets=SLOW_BUCKETS, registry=r)
        self.registrations = Counter("spillway_deviceplugin_registrations", "registrations with the kubelet",
                                     ["node", "result"], registry=r)
        self.agent_up = Gauge("spillway_deviceplugin_agent_up", "1 while the agent answers", ["node"], registry=r)
        for health in ("Healthy", "Unhealthy"):
            self.units.labels(node, health).set(0)
        for result in ("reservation", "on_the_spot", "error"):
            self.allocations.labels(node, result)
        for result in ("ok", "error"):
            self.registrations.labels(node, result)
        self.agent_up.labels(node).set(0)

    def set_units(self, healthy: int, unhealthy: int) -> None:
        self.units.labels(self.node, "Healthy").set(healthy)
        self.units.labels(self.node, "Unhealthy").set(unhealthy)

    def allocation(self, result: str, seconds: float) -> None:
        self.allocations.labels(self.node, result).inc()
        self.allocate_duration.labels(self.node).observe(seconds)

    def registration(self, ok: bool) -> None:
        self.registrations.labels(self.node, "ok" if ok else "error").inc()

    def set_agent_up(self, up: bool) -> None:
        self.agent_up.labels(self.node).set(1 if up else 0)

"""The DRA driver's metrics (names and labels: docs/metrics.md, DRA driver section)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from spillway.metrics import SLOW_BUCKETS


class Metrics:
    def __init__(self, node: str, registry: CollectorRegistry | None = None) -> None:
        self.node = node
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.agent_up = Gauge("spillway_dra_agent_up", "1 while the agent answers", ["node"], registry=r)
        self.devices = Gauge("spillway_dra_devices", "devices (lending GPUs) in the node's ResourceSlice",
                             ["node"], registry=r)
        self.capacity = Gauge("spillway_dra_capacity_bytes", "memory capacity published per device",
                              ["node", "device"], registry=r)
        self.slice_writes = Counter("spillway_dra_slice_writes", "ResourceSlice writes by result",
                                    ["node", "result"], registry=r)
        self.prepares = Counter("spillway_dra_prepares", "claims prepared (NodePrepareResources) by result",
                                ["node", "result"], registry=r)
        self.unprepares = Counter("spillway_dra_unprepares", "claims unprepared (NodeUnprepareResources) by result",
                                  ["node", "result"], registry=r)
        self.prepare_duration = Histogram("spillway_dra_prepare_duration_seconds", "NodePrepareResources latency "
                                          "per claim", ["node"], buckets=SLOW_BUCKETS, registry=r)
        self.agent_up.labels(node).set(0)
        self.devices.labels(node).set(0)
        for result in ("ok", "error"):
            self.slice_writes.labels(node, result)
            self.prepares.labels(node, result)
            self.unprepares.labels(node, result)

    # The resource manager's reports (spillway.deviceplugin.resources.AgentMetrics).
    def set_units(self, healthy: int, unhealthy: int) -> None:
        """Units are the device plugin's; the driver publishes devices (`published`)."""

    def set_agent_up(self, up: bool) -> None:
        self.agent_up.labels(self.node).set(1 if up else 0)

    def published(self, capacity: dict[str, int]) -> None:
        self.slice_writes.labels(self.node, "ok").inc()
        self.devices.labels(self.node).set(len(capacity))
        self.capacity.clear()
        for device, value in capacity.items():
            self.capacity.labels(self.node, device).set(value)

    def write_failed(self) -> None:
        self.slice_writes.labels(self.node, "error").inc()

    def prepared(self, ok: bool, seconds: float) -> None:
        self.prepares.labels(self.node, "ok" if ok else "error").inc()
        self.prepare_duration.labels(self.node).observe(seconds)

    def unprepared(self, ok: bool) -> None:
        self.unprepares.labels(self.node, "ok" if ok else "error").inc()

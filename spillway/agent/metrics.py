"""The agent's Prometheus metrics (names and labels exactly as docs/metrics.md lists them).

Gauges that describe the pool are computed at scrape time from the pool itself (a custom
collector), so they can never drift from what the API reports.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from spillway import __version__
from spillway.metrics import FAST_BUCKETS

if TYPE_CHECKING:
    from prometheus_client.metrics_core import Metric

    from spillway.agent.pool import Pool

# Buckets for the reclaim-to-notification time: sub-millisecond up to the research
# prototype's 4 s polling period.
NOTIFY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 4.0)


class AgentMetrics:
    def __init__(self, node: str, backend: str, simulated: bool) -> None:
        self.node = node
        self.backend = backend
        self.simulated = "true" if simulated else "false"
        self.registry = CollectorRegistry(auto_describe=True)
        self.operations = Counter("spillway_lease_operations", "gRPC calls by method and status code",
                                  ["node", "method", "code"], registry=self.registry)
        self.duration = Histogram("spillway_lease_operation_duration_seconds", "server-side gRPC call latency",
                                  ["node", "method"], buckets=FAST_BUCKETS, registry=self.registry)
        self.watch_cutoffs = Counter("spillway_watch_cutoffs", "Watch streams cut off for falling behind",
                                     ["node"], registry=self.registry)
        self.reclaims = Counter("spillway_reclaims", "reclaim rounds", ["node", "trigger"], registry=self.registry)
        self.revocations = Counter("spillway_revocations", "leases that went REVOKING and how they ended",
                                   ["node", "outcome"], registry=self.registry)
        self.expiries = Counter("spillway_lease_expiries", "leases whose TTL ran out", ["node"],
                                registry=self.registry)
        self.overdue = Counter("spillway_borrower_overdue",
                               "ended leases whose borrower process still held the lender's memory past the "
                               "settle timeout (the log names the process)", ["node", "gpu"], registry=self.registry)
        self.notify = Histogram("spillway_reclaim_notify_seconds",
                                "time from a reclaim decision to the REVOKING event reaching the holder's Watch stream",
                                ["node"], buckets=NOTIFY_BUCKETS, registry=self.registry)
        self.heartbeat = time.time()
        self._pool: Callable[[], Pool | None] = lambda: None
        # label children by (method, code): .labels() costs more than the observation itself
        self._calls: dict[tuple[str, str], tuple[Counter, Histogram]] = {}
        self.registry.register(_PoolCollector(self))

    def bind(self, pool: Callable[[], Pool | None]) -> None:
        self._pool = pool

    def observe_call(self, method: str, code: str, seconds: float) -> None:
        children = self._calls.get((method, code))
        if children is None:
            children = (self.operations.labels(self.node, method, code), self.duration.labels(self.node, method))
            self._calls[(method, code)] = children
        children[0].inc()
        children[1].observe(seconds)


class _PoolCollector(Collector):
    def __init__(self, m: AgentMetrics) -> None:
        self.m = m

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        m = self.m
        info = GaugeMetricFamily("spillway_agent_info", "which agent runs where",
                                 labels=["node", "backend", "simulated", "version"])
        info.add_metric([m.node, m.backend, m.simulated, __version__], 1)
        yield info
        hb = GaugeMetricFamily("spillway_agent_heartbeat_timestamp_seconds",
                               "last time the agent refreshed its inventory", labels=["node"])
        hb.add_metric([m.node], m.heartbeat)
        yield hb
        pool = m._pool()
        if pool is None:
            return
        # dcgm-exporter's conventions, so the two join: `gpu` is the index, `UUID` the UUID.
        labels = ["node", "gpu", "UUID", "simulated"]
        fams = {
            "total": GaugeMetricFamily("spillway_gpu_memory_total_bytes", "GPU memory size", labels=labels),
            "local_used": GaugeMetricFamily("spillway_gpu_memory_local_used_bytes",
                                            "used by the GPU's own tenants (borrowers excluded)", labels=labels),
            "reserved": GaugeMetricFamily("spillway_gpu_memory_local_reserved_bytes",
                                          "kept for the GPU's own tenant", labels=labels),
            "headroom": GaugeMetricFamily("spillway_gpu_memory_headroom_bytes", "never lent", labels=labels),
            "lendable": GaugeMetricFamily("spillway_gpu_memory_lendable_bytes", "free to lend now", labels=labels),
            "leased": GaugeMetricFamily("spillway_gpu_memory_leased_bytes", "lent out in live leases",
                                        labels=labels),
            "settling": GaugeMetricFamily("spillway_gpu_memory_settling_bytes",
                                          "of ended leases, not lendable until NVML shows the borrower let go "
                                          "(part of headroom)", labels=labels),
        }
        for v in pool.views():
            lv = [m.node, str(v.index), v.uuid, m.simulated]
            for name, fam in fams.items():
                fam.add_metric(lv, getattr(v, name))
        yield from fams.values()
        leases = GaugeMetricFamily("spillway_leases", "live leases by state and kind", labels=["node", "state", "kind"])
        from spillway.agent.pool import LIVE, Kind, State

        counts = {(s, k): 0 for s in LIVE for k in Kind}
        for x in pool.live.values():
            counts[(x.state, x.kind)] += 1
        for (s, k), n in sorted(counts.items()):
            leases.add_metric([m.node, State(s).name, Kind(k).name], n)
        yield leases

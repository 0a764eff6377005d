"""The operator's Prometheus metrics (names and labels as in docs/metrics.md), in its own registry."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from spillway.metrics import SLOW_BUCKETS
from spillway.operator.reconcile import PHASES


class OperatorMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.reconciles = Counter(
            "spillway_operator_reconciles", "InferenceTenant reconciles", ["result"], registry=r
        )
        self.reconcile_duration = Histogram(
            "spillway_operator_reconcile_duration_seconds", "Reconcile latency", buckets=SLOW_BUCKETS, registry=r
        )
        self.placements = Counter(
            "spillway_operator_placements", "Placement decisions per replica", ["outcome"], registry=r
        )
        self.tenants = Gauge("spillway_operator_tenants", "Tenants by phase", ["phase"], registry=r)
        self.slo_target = Gauge(
            "spillway_tenant_slo_target_seconds", "SLO target", ["namespace", "tenant", "slo"], registry=r
        )
        self.slo_observed = Gauge(
            "spillway_tenant_slo_observed_seconds", "Observed percentile", ["namespace", "tenant", "slo"], registry=r
        )
        self.slo_attainment = Gauge(
            "spillway_tenant_slo_attainment_ratio", "Share of requests under target", ["namespace", "tenant", "slo"],
            registry=r,
        )
        self.peer_memory = Gauge(
            "spillway_tenant_peer_memory_bytes", "Peer memory held", ["namespace", "tenant", "kind"], registry=r
        )
        self.allocation = Gauge(
            "spillway_operator_allocation", "1 for the allocation mode the operator runs with (dra or deviceplugin)",
            ["mode"], registry=r,
        )
        for phase in PHASES:
            self.tenants.labels(phase=phase).set(0)
        for outcome in ("placed", "fallback", "pending"):
            self.placements.labels(outcome=outcome)
        for result in ("ok", "error", "retry"):
            self.reconciles.labels(result=result)

    def set_phases(self, phases: dict[str, str]) -> None:
        """Tenants by phase from a map tenant key -> phase."""
        counts = dict.fromkeys(PHASES, 0)
        for phase in phases.values():
            counts[phase] = counts.get(phase, 0) + 1
        for phase, n in counts.items():
            self.tenants.labels(phase=phase).set(n)

    def forget_tenant(self, namespace: str, tenant: str) -> None:
        for gauge, values in (
            (self.slo_target, ("ttft", "tbt")), (self.slo_observed, ("ttft", "tbt")),
            (self.slo_attainment, ("ttft", "tbt")), (self.peer_memory, ("RESERVATION", "ELASTIC")),
        ):
            for v in values:
                try:
                    gauge.remove(namespace, tenant, v)
                except KeyError:
                    pass

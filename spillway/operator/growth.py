"""SLO-driven growth: evaluate a tenant's SLO from Prometheus (at most once per window), and grow
its replicas' ELASTIC leases while it misses the SLO or shrink them when it meets it with slack
and the pool is wanted elsewhere. The math and the status it writes are in `slo` (pure)."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from spillway.api.v1 import agent_pb2
from spillway.contract import now_rfc3339
from spillway.operator import reconcile as rc
from spillway.operator import slo as slomod
from spillway.operator.agents import AgentError, Agents
from spillway.operator.cluster import ClusterView
from spillway.operator.context import TenantContext
from spillway.operator.leases import ReplicaLeases
from spillway.operator.metrics import OperatorMetrics
from spillway.operator.model import object_key
from spillway.operator.pods import LeaseRef, ObservedPod, holder_name
from spillway.units import format_bytes


@dataclass
class SloState:
    """What the last evaluation of one tenant's SLO found."""

    last_eval: float = 0.0  # monotonic
    report: slomod.SloReport | None = None
    missed: bool = False  # by the last evaluation that could judge (an Unknown one leaves it)


@dataclass
class SloGrowth:
    agents: Agents
    cluster: ClusterView
    leases: ReplicaLeases
    metrics: OperatorMetrics
    phases: Mapping[str, str]  # tenant key -> phase (the engine's): who else wants the pool
    prometheus: slomod.PrometheusClient | None = None
    selector: str = slomod.DEFAULT_SELECTOR
    step_bytes: int = slomod.GIB
    state: dict[str, SloState] = field(default_factory=dict)

    def of(self, key: str) -> SloState:
        return self.state.setdefault(key, SloState())

    def forget(self, key: str) -> None:
        self.state.pop(key, None)

    def pool_wanted(self, except_key: str) -> bool:
        """Whether other tenants want peer memory: some are not fully placed or miss their SLO."""
        for key, phase in self.phases.items():
            if key == except_key:
                continue
            if phase in (rc.PHASE_PENDING, rc.PHASE_DEGRADED) or self.of(key).missed:
                return True
        return False

    async def evaluate(self, ctx: TenantContext, pods: Sequence[ObservedPod]) -> list[ObservedPod]:
        """Evaluate the SLO (at most once per window) and resize ELASTIC leases; returns the pods
        whose ELASTIC leases changed, as they are now."""
        spec = ctx.spec
        state = self.of(ctx.key)
        if time.monotonic() - state.last_eval < spec.window_s:
            return []
        state.last_eval = time.monotonic()
        targets = slomod.targets_of(spec)
        if not targets:
            state.report = slomod.unknown("NoSLO", "the tenant sets no latency targets", "no targets in spec.slo",
                                          now_rfc3339())
            return []
        if self.prometheus is None:
            why = "the operator runs without --prometheus-url"
            state.report = slomod.unknown("NoPrometheus", why, why, now_rfc3339())
            return []
        selector = slomod.selector_for(self.selector, spec.namespace, spec.name)
        try:
            observations = [
                await slomod.observe(self.prometheus, t, selector=selector, percentile=spec.percentile,
                                     window_s=spec.window_s)
                for t in targets
            ]
        except slomod.PrometheusError as exc:
            state.report = slomod.unknown("PrometheusUnavailable", str(exc), str(exc), now_rfc3339())
            ctx.warning("SLOUnknown", str(exc))
            return []
        verdict = slomod.evaluate(observations, spec.percentile, spec.attainment)
        for o in observations:
            self.metrics.slo_target.labels(spec.namespace, spec.name, o.name).set(o.target_s)
            if o.observed_s is not None:
                self.metrics.slo_observed.labels(spec.namespace, spec.name, o.name).set(o.observed_s)
            if o.attainment is not None:
                self.metrics.slo_attainment.labels(spec.namespace, spec.name, o.name).set(o.attainment)
        state.report = slomod.report(observations, verdict, now_rfc3339())
        state.missed = state.report.missed
        return await self.resize(ctx, pods, verdict)

    async def resize(
        self, ctx: TenantContext, pods: Sequence[ObservedPod], verdict: slomod.SloVerdict
    ) -> list[ObservedPod]:
        """One step of ELASTIC growth or shrink per replica (`slo.peer_memory_step`)."""
        spec = ctx.spec
        wanted = self.pool_wanted(ctx.key)
        total_elastic = 0
        changed: list[ObservedPod] = []
        for pod in pods:
            step = slomod.peer_memory_step(
                held_bytes=self.leases.held_bytes(pod), elastic_bytes=sum(x.bytes for x in pod.elastic),
                limit_bytes=spec.peer_limit, verdict=verdict, pool_wanted=wanted, step_bytes=self.step_bytes)
            if step > 0:
                elastic_leases = await self._grow(ctx, pod, step, verdict)
            elif step < 0 and pod.elastic:
                elastic_leases = await self._shrink(ctx, pod)
            else:
                elastic_leases = list(pod.elastic)
            total_elastic += sum(x.bytes for x in elastic_leases)
            if tuple(elastic_leases) != pod.elastic:
                changed.append(dataclasses.replace(pod, elastic=tuple(elastic_leases)))
        self.metrics.peer_memory.labels(spec.namespace, spec.name, "ELASTIC").set(total_elastic)
        return changed

    async def _grow(
        self, ctx: TenantContext, pod: ObservedPod, step: int, verdict: slomod.SloVerdict
    ) -> list[LeaseRef]:
        spec = ctx.spec
        view = self.cluster.pools.get(pod.node)
        lender = rc.choose_lender(view, pod.gpu_uuid, step) if view else None
        if lender is None:
            ctx.warning("ElasticGrowFailed", f"replica {pod.replica} misses its SLO but no lender on {pod.node} has "
                        f"{format_bytes(step)} to spare")
            return list(pod.elastic)
        try:
            got = await self.agents.acquire(
                self.cluster.endpoint(pod.node), holder=holder_name(spec.namespace, spec.name, pod.replica),
                tenant_uid=spec.uid, replica=pod.replica, gpu_uuid=lender, size=step, priority=spec.priority,
                kind=agent_pb2.ELASTIC, pod=object_key(spec.namespace, pod.name),
                key_prefix=f"elastic{len(pod.elastic) + 1}:",
            )
        except AgentError as exc:
            ctx.warning("ElasticGrowFailed", f"replica {pod.replica}: {exc}")
            return list(pod.elastic)
        self.cluster.debit(pod.node, lender, got.bytes)
        elastic_leases = [*pod.elastic, got]
        await self.leases.patch_elastic(spec.namespace, pod.name, elastic_leases)
        ctx.normal("PeerMemoryGrown", f"replica {pod.replica} misses its SLO ({verdict.message}): ELASTIC lease "
                   f"{got.id} of {format_bytes(got.bytes)} on {lender}, now "
                   f"{format_bytes(self.leases.held_bytes(pod) + got.bytes)} of {format_bytes(spec.peer_limit)}")
        return elastic_leases

    async def _shrink(self, ctx: TenantContext, pod: ObservedPod) -> list[LeaseRef]:
        victim = pod.elastic[-1]
        await self.leases.release_all(pod.node, [victim])
        elastic_leases = list(pod.elastic[:-1])
        await self.leases.patch_elastic(ctx.spec.namespace, pod.name, elastic_leases)
        ctx.normal("PeerMemoryShrunk", f"replica {pod.replica} meets its SLO with slack and others want the pool: "
                   f"released ELASTIC lease {victim.id} ({format_bytes(victim.bytes)})")
        return elastic_leases

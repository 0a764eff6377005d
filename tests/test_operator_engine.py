"""The operator's coordinator (`Engine`) against in-memory fakes of the Kubernetes client and the
agent client, so its branches are reached without a control plane: a placement whose
reservation fails (the agent is down; no room with and without a fallback), a lost node's
replicas re-placed, a lost lease moved or given up for host memory, SLO growth and shrink, a
stale pool. The cluster tests (test_operator_cluster.py) run the same code against real parts.

The fakes keep what a real API server and agent would: pods by name (a second create of a name
is a 409), merge patches of annotations, leases by id with their bytes."""

from __future__ import annotations

import asyncio
import copy
import itertools
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import pytest

from spillway.api.v1 import agent_pb2
from spillway.contract import (
    ANN_ELASTIC,
    ANN_FALLBACK,
    ANN_RESERVATION,
    TIME_FORMAT,
    holder_name,
)
from spillway.operator import reconcile as rc
from spillway.operator import slo
from spillway.operator.agents import AgentError
from spillway.operator.apiserver import KubeError
from spillway.operator.context import TenantContext
from spillway.operator.engine import Engine, EngineConfig
from spillway.operator.metrics import OperatorMetrics
from spillway.operator.model import TenantSpec
from spillway.operator.pods import LeaseRef, ObservedPod, observe_pod

GIB = 1 << 30


# -- fakes --------------------------------------------------------------------------------------


def _merge(into: dict[str, Any], patch: Mapping[str, Any]) -> None:
    for k, v in patch.items():
        if v is None:
            into.pop(k, None)
        elif isinstance(v, Mapping) and isinstance(into.get(k), dict):
            _merge(into[k], v)
        else:
            into[k] = copy.deepcopy(v)


class FakeKube:
    """The few API calls the engine makes, on dicts."""

    def __init__(self) -> None:
        self.pods: dict[tuple[str, str], dict[str, Any]] = {}
        self.custom: dict[tuple[str, str, str], dict[str, Any]] = {}  # (plural, ns, name) -> object
        self.status: dict[tuple[str, str], dict[str, Any]] = {}  # (ns, name) -> last status written
        self.deleted: list[str] = []
        self._uid = itertools.count(1)

    async def list_pods(self, namespace: str, label_selector: str) -> list[dict[str, Any]]:
        label, _, value = label_selector.partition("=")
        return [copy.deepcopy(p) for (ns, _), p in sorted(self.pods.items())
                if (not namespace or ns == namespace) and label in p["metadata"]["labels"]
                and (not value or p["metadata"]["labels"][label] == value)]

    async def create_pod(self, pod: Mapping[str, Any]) -> dict[str, Any]:
        key = (pod["metadata"]["namespace"], pod["metadata"]["name"])
        if key in self.pods:
            raise KubeError(409, f"pods {key[1]} already exists")
        obj = copy.deepcopy(dict(pod))
        obj["metadata"]["uid"] = f"pod-uid-{next(self._uid)}"
        obj["status"] = {"phase": "Running", "conditions": [{"type": "Ready", "status": "True"}]}
        self.pods[key] = obj
        return copy.deepcopy(obj)

    async def get_pod(self, namespace: str, name: str) -> dict[str, Any] | None:
        pod = self.pods.get((namespace, name))
        return copy.deepcopy(pod) if pod else None

    async def patch_pod(self, namespace: str, name: str, patch: Mapping[str, Any]) -> None:
        _merge(self.pods[(namespace, name)], patch)

    async def delete_pod(self, namespace: str, name: str, uid: str = "", grace_s: int | None = None) -> bool:
        self.deleted.append(name)
        return self.pods.pop((namespace, name), None) is not None

    async def get_custom(self, group: str, version: str, plural: str, name: str, namespace: str = "") -> Any:
        obj = self.custom.get((plural, namespace, name))
        return copy.deepcopy(obj) if obj else None

    async def list_custom(self, group: str, version: str, plural: str, namespace: str = "") -> list[dict[str, Any]]:
        return [copy.deepcopy(o) for (p, ns, _), o in self.custom.items() if p == plural and (not namespace
                                                                                               or ns == namespace)]

    async def patch_custom(self, group: str, version: str, plural: str, name: str, patch: Mapping[str, Any],
                           namespace: str = "", subresource: str = "") -> None:
        if subresource == "status":
            self.status[(namespace, name)] = copy.deepcopy(dict(patch["status"]))
        obj = self.custom.get((plural, namespace, name))
        if obj is None:
            raise KubeError(404, f"{plural} {name} not found")
        _merge(obj, patch)

    async def list_nodes(self) -> tuple[list[dict[str, Any]], str]:
        raise KubeError(403, "nodes is forbidden")

    async def watch_nodes(self, resource_version: str, timeout_s: int = 300) -> AsyncIterator[dict[str, Any]]:
        if False:  # pragma: no cover - an empty stream
            yield {}

    async def close(self) -> None:
        pass


@dataclass
class FakeLease:
    ref: LeaseRef
    holder: str
    state: int = agent_pb2.RESERVED


@dataclass
class FakeAgents:
    """The operator's agent client, as an in-memory agent per endpoint: `refuse` makes every
    Acquire fail with that gRPC code; `room` bounds the bytes each GPU lends."""

    refuse: str = ""
    room: dict[str, int] = field(default_factory=dict)  # gpu -> bytes still lendable (absent: unbounded)
    leases: dict[str, FakeLease] = field(default_factory=dict)
    released: list[str] = field(default_factory=list)
    local: dict[tuple[str, str], int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._ids = itertools.count(1)
        self.pool = self

    async def acquire(self, endpoint: str, *, holder: str, tenant_uid: str, replica: int, gpu_uuid: str, size: int,
                      priority: int = 0, kind: int = agent_pb2.RESERVATION, pod: str = "",
                      key_prefix: str = "") -> LeaseRef:
        if self.refuse:
            raise AgentError(f"acquire at agent {endpoint}: {self.refuse}", self.refuse)
        if gpu_uuid in self.room:
            if self.room[gpu_uuid] < size:
                raise AgentError(f"{gpu_uuid} has no room", "RESOURCE_EXHAUSTED", self.room[gpu_uuid])
            self.room[gpu_uuid] -= size
        ref = LeaseRef(f"l-{next(self._ids)}", "tok", gpu_uuid, size, agent_pb2.LeaseKind.Name(kind),
                       f"{tenant_uid}/{replica}/{key_prefix}{gpu_uuid}")
        self.leases[ref.id] = FakeLease(ref, holder)
        return ref

    async def renew(self, endpoint: str, lease: LeaseRef) -> tuple[agent_pb2.Lease | None, str]:
        held = self.leases.get(lease.id)
        if held is None or held.state != agent_pb2.RESERVED:
            return None, f"lease {lease.id} is REVOKING"
        return agent_pb2.Lease(id=lease.id, state=agent_pb2.ACTIVE, expires_at_ms=int(time.time() * 1000) + 60_000), ""

    async def release(self, endpoint: str, lease: LeaseRef) -> None:
        if self.leases.pop(lease.id, None) is not None:
            self.released.append(lease.id)

    async def held(self, endpoint: str, holder_prefix: str = "tenant:") -> list[agent_pb2.Lease]:
        return [agent_pb2.Lease(id=x.ref.id, holder=x.holder, idempotency_key=x.ref.idempotency_key,
                                gpu_uuid=x.ref.gpu_uuid, bytes=x.ref.bytes)
                for x in self.leases.values() if x.holder.startswith(holder_prefix)]

    async def release_listed(self, endpoint: str, lease: agent_pb2.Lease) -> bool:
        await self.release(endpoint, self.leases[lease.id].ref)
        return True

    async def set_local(self, endpoint: str, gpu_uuid: str, reserved: int) -> agent_pb2.Gpu:
        self.local[(endpoint, gpu_uuid)] = reserved
        return agent_pb2.Gpu(uuid=gpu_uuid)

    async def close(self) -> None:
        pass


def memorypool(name: str, *, age_s: float = 0.0, gpus: int = 2, lendable: int = 70 * GIB) -> dict[str, Any]:
    return {
        "apiVersion": "spillway.dev/v1alpha1", "kind": "MemoryPool", "metadata": {"name": name, "uid": f"uid-{name}"},
        "status": {
            "node": name, "agentEndpoint": f"{name}:7443", "simulated": True,
            "heartbeat": time.strftime(TIME_FORMAT, time.gmtime(time.time() - age_s)),
            "gpus": [{"uuid": f"{name}-g{i}", "index": i, "totalBytes": 80 * GIB, "lendableBytes": lendable}
                     for i in range(gpus)],
            "links": [{"a": f"{name}-g{i}", "b": f"{name}-g{j}", "nvlink": True}
                      for i in range(gpus) for j in range(gpus) if i < j],
        },
    }


def tenant(name: str = "llm", *, replicas: int = 1, request: str = "8Gi", limit: str = "", fallback: str = "HostMemory",
           ns: str = "team") -> dict[str, Any]:
    return {
        "apiVersion": "spillway.dev/v1alpha1", "kind": "InferenceTenant",
        "metadata": {"name": name, "namespace": ns, "uid": f"uid-{name}", "generation": 1},
        "spec": {"replicas": replicas, "model": {"image": "toy", "memory": "40Gi"},
                 "peerMemory": {"request": request, "limit": limit or request, "fallback": fallback}},
    }


@dataclass
class Rig:
    engine: Engine
    kube: FakeKube
    agents: FakeAgents
    events: list[tuple[str, str, str]]  # (object name, reason, message)

    def reasons(self) -> list[str]:
        return [reason for _, reason, _ in self.events]

    def add_tenant(self, body: dict[str, Any]) -> dict[str, Any]:
        m = body["metadata"]
        self.kube.custom[("inferencetenants", m["namespace"], m["name"])] = body
        return body

    def pods(self) -> list[ObservedPod]:
        return [p for p in (observe_pod(x) for x in self.kube.pods.values()) if p is not None]


def rig(*pools: dict[str, Any], agents: FakeAgents | None = None, stale_s: float = 60.0) -> Rig:
    kube, fake = FakeKube(), agents or FakeAgents()
    events: list[tuple[str, str, str]] = []

    def event(body: Mapping[str, Any], type_: str, reason: str, message: str) -> None:
        events.append((str((body.get("metadata") or {}).get("name")), reason, message))

    engine = Engine(kube=kube, agents=fake, metrics=OperatorMetrics(),  # type: ignore[arg-type]
                    config=EngineConfig(pool_stale_s=stale_s), event=event)
    for pool in pools:
        kube.custom[("memorypools", "", pool["metadata"]["name"])] = pool
        engine.pool_changed(pool)
    return Rig(engine, kube, fake, events)


# -- placement and its reservations -------------------------------------------------------------


def test_a_placement_reserves_then_creates_the_pod() -> None:
    r = rig(memorypool("a"))
    body = r.add_tenant(tenant())
    assert asyncio.run(r.engine.reconcile(body)) == rc.PHASE_RUNNING
    [pod] = r.pods()
    assert pod.node == "a" and [x.bytes for x in pod.leases] == [8 * GIB]
    assert set(r.agents.leases) == {pod.leases[0].id}
    assert r.agents.leases[pod.leases[0].id].holder == holder_name("team", "llm", 0)
    assert "Placed" in r.reasons()
    assert r.kube.status[("team", "llm")]["phase"] == rc.PHASE_RUNNING
    assert r.agents.local == {("a:7443", pod.gpu_uuid): 40 * GIB}  # the model's own GPU keeps its memory


def test_a_placement_whose_agent_is_down_stays_pending_and_creates_nothing() -> None:
    r = rig(memorypool("a"), agents=FakeAgents(refuse="UNAVAILABLE"))
    body = r.add_tenant(tenant())
    assert asyncio.run(r.engine.reconcile(body)) == rc.PHASE_PENDING
    assert r.kube.pods == {} and r.engine.assignments == {}
    [message] = [m for _, reason, m in r.events if reason == "ReservationFailed"]
    assert "cannot reserve at the agent of a" in message
    placed = next(c for c in r.kube.status[("team", "llm")]["conditions"] if c["type"] == "Placed")
    assert placed["status"] == "False" and "UNAVAILABLE" in placed["message"]


def test_no_room_falls_back_to_host_memory_or_stays_pending_by_the_spec() -> None:
    r = rig(memorypool("a"), agents=FakeAgents(refuse="RESOURCE_EXHAUSTED"))
    body = r.add_tenant(tenant())
    assert asyncio.run(r.engine.reconcile(body)) == rc.PHASE_DEGRADED
    [pod] = r.pods()
    assert pod.fallback and pod.leases == ()
    assert r.kube.pods[("team", "llm-0")]["metadata"]["annotations"][ANN_FALLBACK] == "HostMemory"
    assert "FellBackToHostMemory" in r.reasons()

    strict = rig(memorypool("a"), agents=FakeAgents(refuse="RESOURCE_EXHAUSTED"))
    body = strict.add_tenant(tenant(fallback="None"))
    assert asyncio.run(strict.engine.reconcile(body)) == rc.PHASE_PENDING
    assert strict.kube.pods == {}
    assert any("stays Pending" in m for _, reason, m in strict.events if reason == "ReservationFailed")


def test_a_partial_reservation_is_released_when_a_later_lender_refuses() -> None:
    agents = FakeAgents(room={"a-g2": 0})  # the second lender's agent has no room after all
    r = rig(memorypool("a", gpus=3, lendable=70 * GIB), agents=agents)
    body = r.add_tenant(tenant(request="100Gi"))  # more than one lender has: two leases
    assert asyncio.run(r.engine.reconcile(body)) == rc.PHASE_DEGRADED
    assert agents.released == ["l-1"] and agents.leases == {}  # the first lease went back
    [pod] = r.pods()
    assert pod.fallback and pod.leases == ()
    assert any("a-g2 has no room" in m for _, reason, m in r.events if reason == "FellBackToHostMemory")


# -- lost nodes and stale pools -----------------------------------------------------------------


def test_a_stale_pool_is_lost_once_and_said_once() -> None:
    r = rig(memorypool("a"), memorypool("b", age_s=600))
    live, lost = r.engine.live_and_lost()
    assert set(live) == {"a"} and "has not published for more than 60s" in lost["b"]
    assert set(r.engine.placeable_pools()) == {"a"}
    r.engine.live_and_lost()
    assert r.reasons() == ["NodeLost"]  # a verdict is said when it changes, not on every look
    assert r.engine.cluster.verdicts() == {"b": (lost["b"], "")}  # asking posts nothing
    assert r.reasons() == ["NodeLost"]
    r.engine.pool_changed(memorypool("b"))  # its agent publishes again
    assert set(r.engine.live_pools()) == {"a", "b"}
    assert r.reasons() == ["NodeLost", "NodePlaceable"]


def test_a_lost_nodes_replica_is_deleted_released_and_placed_elsewhere() -> None:
    r = rig(memorypool("a"))
    body = r.add_tenant(tenant())
    asyncio.run(r.engine.reconcile(body))
    [old] = r.pods()
    assert old.node == "a"
    r.engine.pool_changed(memorypool("a", age_s=600))  # node a's agent stopped publishing
    r.engine.pool_changed(memorypool("b"))
    r.kube.custom[("memorypools", "", "b")] = memorypool("b")
    assert asyncio.run(r.engine.reconcile(body)) == rc.PHASE_PENDING  # removed; its pod's deletion pokes again
    assert r.pods() == []
    assert asyncio.run(r.engine.reconcile(body)) == rc.PHASE_RUNNING
    [new] = r.pods()
    assert new.node == "b"
    assert old.leases[0].id in r.agents.released
    assert "NodeLost" in r.reasons() and r.reasons().count("Placed") == 2


# -- lost leases ----------------------------------------------------------------------------------


def _revoke_all(agents: FakeAgents) -> None:
    for lease in agents.leases.values():
        lease.state = agent_pb2.REVOKING


def test_a_lost_lease_moves_to_another_lender_of_the_node() -> None:
    r = rig(memorypool("a", gpus=3))
    body = r.add_tenant(tenant())
    asyncio.run(r.engine.reconcile(body))
    [before] = r.pods()
    _revoke_all(r.agents)
    asyncio.run(r.engine.reconcile(body, renew=True))
    [after] = r.pods()
    assert after.leases and after.leases[0].gpu_uuid not in (before.leases[0].gpu_uuid, after.gpu_uuid)
    assert before.leases[0].id in r.agents.released
    assert r.reasons().count("LeaseRevoking") == 1 and "PeerMemoryMoved" in r.reasons()


def test_a_lost_lease_without_another_lender_spills_or_replaces_by_the_spec() -> None:
    for fallback, reason, pods_left in (("HostMemory", "FellBackToHostMemory", 1), ("None", "Replacing", 0)):
        r = rig(memorypool("a", gpus=2))
        body = r.add_tenant(tenant(fallback=fallback))
        asyncio.run(r.engine.reconcile(body))
        _revoke_all(r.agents)
        r.agents.refuse = "RESOURCE_EXHAUSTED"  # and no other lender has room (nor does a new placement)
        asyncio.run(r.engine.reconcile(body, renew=True))
        assert reason in r.reasons(), (fallback, r.reasons())
        if pods_left:
            [pod] = r.pods()
            assert pod.fallback and pod.leases == ()
            assert r.kube.pods[("team", "llm-0")]["metadata"]["annotations"][ANN_RESERVATION] == ""
        else:
            assert "llm-0" in r.kube.deleted and r.engine.assignments == {}


# -- SLO growth and shrink ------------------------------------------------------------------------


def _context(r: Rig, body: dict[str, Any]) -> TenantContext:
    return TenantContext(body, TenantSpec.from_resource(body), r.engine.event)


def test_slo_misses_grow_elastic_leases_up_to_the_limit_and_slack_shrinks_them() -> None:
    r = rig(memorypool("a", gpus=3))
    body = r.add_tenant(tenant(request="8Gi", limit="10Gi"))
    asyncio.run(r.engine.reconcile(body))
    ctx = _context(r, body)
    missed = slo.SloVerdict(False, "SLOMissed", "ttft p99 2s > 1s", False)

    async def step(verdict: slo.SloVerdict) -> list[ObservedPod]:
        return await r.engine.growth.resize(ctx, r.pods(), verdict)

    [grown] = asyncio.run(step(missed))
    assert [x.bytes for x in grown.elastic] == [1 << 30] and grown.elastic[0].kind == "ELASTIC"
    assert "elastic-leases" in ANN_ELASTIC and r.pods()[0].elastic == grown.elastic
    asyncio.run(step(missed))
    assert sum(x.bytes for x in r.pods()[0].elastic) == 2 * GIB
    assert asyncio.run(step(missed)) == []  # at the limit (8 + 2 GiB): no more
    assert r.reasons().count("PeerMemoryGrown") == 2

    slack = slo.SloVerdict(True, "SLOMet", "ttft p99 0.1s <= 1s", True)
    assert asyncio.run(step(slack)) == []  # nobody else wants the pool: it keeps what it has
    r.engine.phases["team/other"] = rc.PHASE_PENDING
    [shrunk] = asyncio.run(step(slack))
    assert len(shrunk.elastic) == 1 and "PeerMemoryShrunk" in r.reasons()
    assert grown.elastic[0].id in {x.id for x in shrunk.elastic}  # the newest goes first


def test_an_slo_without_prometheus_is_unknown_in_status() -> None:
    r = rig(memorypool("a"))
    body = tenant()
    body["spec"]["slo"] = {"ttft": "1s"}
    r.add_tenant(body)
    asyncio.run(r.engine.reconcile(body, slo=True))
    status = r.kube.status[("team", "llm")]
    assert status["slo"]["state"] == "Unknown"
    slo_met = next(c for c in status["conditions"] if c["type"] == "SLOMet")
    assert (slo_met["status"], slo_met["reason"]) == ("Unknown", "NoPrometheus")


# -- startup and delete ----------------------------------------------------------------------------


def test_startup_sweep_releases_only_leases_no_replica_names() -> None:
    r = rig(memorypool("a"), stale_s=0)
    body = r.add_tenant(tenant())
    asyncio.run(r.engine.reconcile(body))
    [pod] = r.pods()
    orphan = asyncio.run(r.agents.acquire("a:7443", holder=holder_name("team", "gone", 0), tenant_uid="uid-gone",
                                          replica=0, gpu_uuid="a-g1", size=GIB))
    engine = Engine(kube=r.kube, agents=r.agents, metrics=OperatorMetrics(),  # type: ignore[arg-type]
                    config=EngineConfig(lease_ttl_s=0))
    assert asyncio.run(engine.startup_sync()) == 1
    assert orphan.id in r.agents.released and pod.leases[0].id in r.agents.leases
    assert engine.synced and engine.assignments.keys() == r.engine.assignments.keys()


def test_finalize_deletes_pods_and_releases_every_lease() -> None:
    r = rig(memorypool("a"))
    body = r.add_tenant(tenant(replicas=2))
    asyncio.run(r.engine.reconcile(body))
    assert len(r.pods()) == 2
    asyncio.run(r.engine.finalize(body))
    assert r.kube.pods == {} and r.agents.leases == {} and r.engine.assignments == {}
    assert r.reasons()[-1] == "Released"


# -- the pure decisions the coordinator applies -----------------------------------------------------


@pytest.mark.parametrize(("code", "fallback", "want"), [
    ("UNAVAILABLE", "HostMemory", rc.OnReserveError.RETRY),
    ("PERMISSION_DENIED", "None", rc.OnReserveError.RETRY),
    ("RESOURCE_EXHAUSTED", "HostMemory", rc.OnReserveError.HOST_MEMORY),
    ("FAILED_PRECONDITION", "None", rc.OnReserveError.PENDING),
])
def test_on_reserve_error(code: str, fallback: str, want: rc.OnReserveError) -> None:
    assert rc.on_reserve_error(code, fallback) is want


def test_after_lost() -> None:
    assert rc.after_lost(GIB, True, "None") is rc.AfterLost.MOVED
    assert rc.after_lost(0, False, "None") is rc.AfterLost.GIVEN_BACK
    assert rc.after_lost(GIB, False, "HostMemory") is rc.AfterLost.HOST_MEMORY
    assert rc.after_lost(GIB, False, "None") is rc.AfterLost.REPLACE


def test_is_orphan() -> None:
    tenants = {("ns", "t"): rc.TenantFacts("uid-1", 2)}
    named = {("ns", "t", 0): {"l-1"}}

    def orphan(holder: tuple[str, str, int] | None, key: str = "uid-1/0/g", lease: str = "l-1",
               age_ms: float | None = 1e9, namespaces: tuple[str, ...] = ()) -> bool:
        return rc.is_orphan(holder, key, lease, age_ms, young_ms=60_000, namespaces=namespaces, tenants=tenants,
                            named_by_pods=named)

    assert not orphan(("ns", "t", 0))  # named by its pod
    assert orphan(("ns", "t", 0), lease="l-2")  # no pod names it
    assert orphan(("ns", "gone", 0))  # its tenant is gone
    assert orphan(("ns", "t", 0), key="uid-0/0/g")  # an earlier tenant of the same name
    assert orphan(("ns", "t", 2), lease="l-9")  # beyond spec.replicas
    assert not orphan(("ns", "t", 0), lease="l-2", age_ms=10)  # young: maybe being created right now
    assert not orphan(None)  # not a tenant replica's lease
    assert not orphan(("other", "t", 0), namespaces=("ns",))  # not a watched namespace


def test_slo_report_says_met_missed_and_unknown() -> None:
    obs = [slo.SloObservation("ttft", 1.0, 2.0, 0.5, 1.0, 10.0)]
    verdict = slo.evaluate(obs, 99.0, 0.99)
    report = slo.report(obs, verdict, "2026-01-01T00:00:00Z")
    assert report.missed and report.condition[:2] == ("False", "SLOMissed")
    assert report.status["state"] == "Missed" and report.status["ttftSeconds"] == 2.0
    assert "le=1 bucket" in report.status["message"]
    quiet = slo.report([slo.SloObservation("ttft", 1.0, None, None, None, 0.0)],
                       slo.SloVerdict(None, "NoTraffic", "no requests", False), "t")
    assert quiet.status["state"] == "Unknown" and not quiet.missed

"""The operator's view of the cluster: pure, frozen dataclasses parsed from Kubernetes objects.

`NodeView` is one `MemoryPool` (a GPU node as its agent publishes it); `TenantSpec` is one
`InferenceTenant` spec, validated and with sizes and durations already parsed. Placement
(`spillway.operator.placement`) works only on these types, so it can be tested without a cluster.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

from spillway.units import DurationError, QuantityError, parse_duration, parse_quantity

DEFAULT_PERCENTILE = 99.0
DEFAULT_ATTAINMENT = 0.99
DEFAULT_WINDOW_S = 300.0
DEFAULT_TTFT_METRIC = "vllm:time_to_first_token_seconds"
DEFAULT_TBT_METRIC = "vllm:inter_token_latency_seconds"
DEFAULT_PORT = 8000
# The largest GPU Spillway supports (H200, 141 GB): the CRD's CEL rule uses the same bound.
MAX_GPU_MEMORY = 141 * (1 << 30)

Fallback = Literal["HostMemory", "None"]


@dataclass(frozen=True)
class GpuView:
    """One GPU of a node as its MemoryPool shows it (all sizes in bytes)."""

    uuid: str
    index: int
    name: str
    total: int
    local_used: int
    local_reserved: int
    headroom: int
    leased: int
    lendable: int


@dataclass(frozen=True)
class NodeView:
    """One GPU node: its GPUs and which pairs are joined by NVLink."""

    name: str
    endpoint: str
    simulated: bool
    gpus: tuple[GpuView, ...]
    nvlink: frozenset[frozenset[str]] = frozenset()
    heartbeat: float = 0.0
    granularity: int = 0  # the agent's lease granule in bytes (0: not published)

    def nvlinked(self, a: str, b: str) -> bool:
        """True when GPUs `a` and `b` (UUIDs) are distinct and joined by NVLink."""
        return a != b and frozenset((a, b)) in self.nvlink

    def gpu(self, uuid: str) -> GpuView | None:
        for g in self.gpus:
            if g.uuid == uuid:
                return g
        return None

    @classmethod
    def from_memorypool(cls, obj: Mapping[str, Any]) -> NodeView:
        """Parse a MemoryPool object as the API server returns it (a dict).

        Raises ValueError naming the object when its status is missing or malformed.
        """
        meta = obj.get("metadata") or {}
        name = str(meta.get("name") or "")
        status = obj.get("status") or {}
        if not name:
            raise ValueError("MemoryPool has no metadata.name")
        try:
            gpus = tuple(
                GpuView(
                    uuid=str(g["uuid"]),
                    index=int(g.get("index", i)),
                    name=str(g.get("name", "")),
                    total=int(g.get("totalBytes", 0)),
                    local_used=int(g.get("localUsedBytes", 0)),
                    local_reserved=int(g.get("localReservedBytes", 0)),
                    headroom=int(g.get("headroomBytes", 0)),
                    leased=int(g.get("leasedBytes", 0)),
                    lendable=int(g.get("lendableBytes", 0)),
                )
                for i, g in enumerate(status.get("gpus") or [])
            )
            nvlink = frozenset(
                frozenset((str(link["a"]), str(link["b"])))
                for link in status.get("links") or []
                if link.get("nvlink") and link.get("a") != link.get("b")
            )
        except (KeyError, TypeError, ValueError) as exc:
            msg = f"MemoryPool {name}: malformed status ({exc!r}); is the agent's publisher current?"
            raise ValueError(msg) from exc
        return cls(
            name=str(status.get("node") or name),
            endpoint=str(status.get("agentEndpoint") or ""),
            simulated=bool(status.get("simulated", False)),
            gpus=gpus,
            nvlink=nvlink,
            heartbeat=_parse_time(status.get("heartbeat")),
            granularity=_int_or_zero(status.get("granularityBytes")),
        )


def _int_or_zero(value: Any) -> int:
    try:
        return max(0, int(value or 0))
    except (TypeError, ValueError):
        return 0


@dataclass(frozen=True)
class NodeHealth:
    """What the operator needs from a Kubernetes Node: is it Ready (since when), is it cordoned."""

    name: str
    ready: bool
    since: float  # Unix time of the Ready condition's last transition (0 when unknown)
    unschedulable: bool = False

    @classmethod
    def from_node(cls, obj: Mapping[str, Any]) -> NodeHealth:
        meta = obj.get("metadata") or {}
        ready = next((c for c in (obj.get("status") or {}).get("conditions") or []
                      if isinstance(c, Mapping) and c.get("type") == "Ready"), None)
        return cls(
            name=str(meta.get("name") or ""),
            ready=bool(ready and ready.get("status") == "True"),
            since=_parse_time((ready or {}).get("lastTransitionTime")),
            unschedulable=bool((obj.get("spec") or {}).get("unschedulable")),
        )


def node_verdict(health: NodeHealth | None, now: float, grace_s: float) -> tuple[str, str]:
    """(lost, unplaceable) for a MemoryPool's node, each a reason in words or "".

    - lost (its replicas are re-placed elsewhere): the Node object is gone, or it has been NotReady
      for longer than `grace_s` (the same grace as a stale MemoryPool heartbeat; 0: at once; a node
      with no Ready condition yet is only unplaceable);
    - unplaceable (no new replica goes there, running ones stay): NotReady within the grace, or
      cordoned (`spec.unschedulable`; `kubectl drain` evicts the pods, and they are re-placed).
    """
    if health is None:
        return "has no Node object (the node was deleted while its agent still publishes)", ""
    if not health.ready:
        if grace_s <= 0 or (health.since and now - health.since > grace_s):
            return f"is NotReady (for more than {grace_s:g}s)", ""
        return "", "is NotReady"
    if health.unschedulable:
        return "", "is cordoned (unschedulable)"
    return "", ""


def object_key(namespace: str, name: str) -> str:
    """`<namespace>/<name>`: how the operator keys a namespaced object (a tenant, a pod) in its
    maps, logs and lease records."""
    return f"{namespace}/{name}"


def key_of(body: Mapping[str, Any]) -> str:
    """`object_key` of an object as the API server returns it."""
    meta = body.get("metadata") or {}
    return object_key(str(meta.get("namespace")), str(meta.get("name")))


Verdict = tuple[str, str]  # (lost, unplaceable): a reason in words each, or ""
PLACEABLE: Verdict = ("", "")


def pool_verdicts(
    pools: Mapping[str, NodeView], nodes: Mapping[str, NodeHealth] | None, now: float, stale_s: float
) -> dict[str, Verdict]:
    """The verdict of every pool that is not fully usable: a pool whose heartbeat is older than
    `stale_s` (0: never stale) is lost; else its Node decides (`node_verdict`); without Node
    facts (`nodes` None: the operator may not list Nodes) a fresh pool is placeable."""
    out: dict[str, Verdict] = {}
    for name, view in pools.items():
        if stale_s > 0 and view.heartbeat and now - view.heartbeat > stale_s:
            verdict = (f"has no live MemoryPool (its agent has not published for more than {stale_s:g}s)", "")
        elif nodes is not None:
            verdict = node_verdict(nodes.get(name), now, stale_s)
        else:
            verdict = PLACEABLE
        if verdict != PLACEABLE:
            out[name] = verdict
    return out


def _parse_time(value: Any) -> float:
    """RFC 3339 (as Kubernetes writes times) or a number of seconds -> Unix seconds; 0 if absent."""
    if value is None or value == "":
        return 0.0
    if isinstance(value, int | float):
        return float(value)
    text = str(value)
    if text.endswith("Z"):
        text = text[:-1] + "+00:00"
    try:
        return datetime.fromisoformat(text).timestamp()
    except ValueError:
        return 0.0


@dataclass(frozen=True)
class TenantSpec:
    """One InferenceTenant, validated. Sizes are bytes, durations seconds."""

    namespace: str
    name: str
    uid: str
    replicas: int
    memory: int
    peer_request: int = 0
    peer_limit: int = 0
    fallback: Fallback = "HostMemory"
    priority: int = 0
    ttft_s: float | None = None
    tbt_s: float | None = None
    percentile: float = DEFAULT_PERCENTILE
    attainment: float = DEFAULT_ATTAINMENT
    window_s: float = DEFAULT_WINDOW_S
    lending: bool = True
    image: str = ""
    model_name: str = ""
    args: tuple[str, ...] = ()
    env: tuple[Mapping[str, Any], ...] = field(default=(), compare=False, hash=False)
    port: int = DEFAULT_PORT
    resources: Mapping[str, Any] = field(default_factory=dict, compare=False, hash=False)
    ttft_metric: str = DEFAULT_TTFT_METRIC
    tbt_metric: str = DEFAULT_TBT_METRIC
    generation: int = 0

    @property
    def key(self) -> str:
        return object_key(self.namespace, self.name)

    @property
    def borrower(self) -> bool:
        """Asks for peer memory."""
        return self.peer_request > 0

    @classmethod
    def from_resource(cls, body: Mapping[str, Any]) -> TenantSpec:
        """Parse an InferenceTenant object (metadata + spec) as the API server returns it.

        The API server's schema and CEL rules already refuse bad specs; this checks again so a
        spec from anywhere else fails with a message that says which field to fix.
        """
        meta = body.get("metadata") or {}
        spec = body.get("spec") or {}
        where = f"InferenceTenant {meta.get('namespace', '')}/{meta.get('name', '')}"

        def fail(msg: str) -> ValueError:
            return ValueError(f"{where}: {msg}")

        if not meta.get("name"):
            raise fail("metadata.name is missing")
        model = spec.get("model") or {}
        if not model.get("image"):
            raise fail("spec.model.image is required (the model server's container image)")
        if "memory" not in model:
            raise fail("spec.model.memory is required (HBM the model keeps on its own GPU, e.g. 60Gi)")
        try:
            memory = parse_quantity(model["memory"])
        except QuantityError as exc:
            raise fail(f"spec.model.memory: {exc}") from exc
        if memory > MAX_GPU_MEMORY:
            raise fail(f"spec.model.memory {model['memory']} is larger than any supported GPU (141Gi, H200)")
        replicas = spec.get("replicas", 1)
        if isinstance(replicas, bool) or not isinstance(replicas, int) or replicas < 0:
            raise fail(f"spec.replicas must be an integer >= 0, not {replicas!r}")

        peer = spec.get("peerMemory") or {}
        try:
            request = parse_quantity(peer["request"], allow_zero=True) if peer.get("request") is not None else 0
            limit = parse_quantity(peer["limit"], allow_zero=True) if peer.get("limit") is not None else request
        except QuantityError as exc:
            raise fail(f"spec.peerMemory: {exc}") from exc
        if limit < request:
            raise fail(f"spec.peerMemory.limit ({peer.get('limit')}) must be >= request ({peer.get('request')})")
        fallback = peer.get("fallback", "HostMemory")
        if fallback not in ("HostMemory", "None"):
            raise fail(f"spec.peerMemory.fallback must be HostMemory or None, not {fallback!r}")

        slo = spec.get("slo") or {}
        try:
            ttft = parse_duration(slo["ttft"]) if slo.get("ttft") else None
            tbt = parse_duration(slo["tbt"]) if slo.get("tbt") else None
            window = parse_duration(slo["window"]) if slo.get("window") else DEFAULT_WINDOW_S
        except DurationError as exc:
            raise fail(f"spec.slo: {exc}") from exc
        percentile = float(slo.get("percentile", DEFAULT_PERCENTILE))
        if not 0 < percentile < 100:
            raise fail(f"spec.slo.percentile must be in (0, 100), not {percentile}")
        attainment = float(slo.get("attainment", DEFAULT_ATTAINMENT))
        if not 0 < attainment <= 1:
            raise fail(f"spec.slo.attainment must be in (0, 1], not {attainment}")

        priority = spec.get("priority", 0)
        if isinstance(priority, bool) or not isinstance(priority, int):
            raise fail(f"spec.priority must be an integer, not {priority!r}")
        port = model.get("port", DEFAULT_PORT)
        if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
            raise fail(f"spec.model.port must be a TCP port (1-65535), not {port!r}")
        metrics = spec.get("metrics") or {}
        args: Sequence[Any] = model.get("args") or ()
        env: Sequence[Any] = model.get("env") or ()
        return cls(
            namespace=str(meta.get("namespace") or "default"),
            name=str(meta["name"]),
            uid=str(meta.get("uid") or ""),
            replicas=replicas,
            memory=memory,
            peer_request=request,
            peer_limit=limit,
            fallback=fallback,
            priority=priority,
            ttft_s=ttft,
            tbt_s=tbt,
            percentile=percentile,
            attainment=attainment,
            window_s=window,
            lending=bool(spec.get("lending", True)),
            image=str(model["image"]),
            model_name=str(model.get("name") or meta["name"]),
            args=tuple(str(a) for a in args),
            env=tuple(dict(e) for e in env),
            port=port,
            resources=dict(model.get("resources") or {}),
            ttft_metric=str(metrics.get("ttft") or DEFAULT_TTFT_METRIC),
            tbt_metric=str(metrics.get("tbt") or DEFAULT_TBT_METRIC),
            generation=int(meta.get("generation") or 0),
        )


@dataclass(frozen=True, order=True)
class ReplicaKey:
    """One replica of one tenant."""

    namespace: str
    name: str
    replica: int

    @property
    def tenant_key(self) -> str:
        return object_key(self.namespace, self.name)

    def __str__(self) -> str:
        return f"{self.namespace}/{self.name}#{self.replica}"


@dataclass(frozen=True)
class Assignment:
    """Where one replica runs: its node and GPU, and the lender GPUs with bytes from each."""

    key: ReplicaKey
    node: str
    gpu_uuid: str
    lenders: tuple[tuple[str, int], ...] = ()
    host_fallback: bool = False
    # What its own GPU keeps for it (`pods.local_bytes`: the model's memory, or the whole GPU when
    # the tenant does not lend); 0 when unknown (a pod made before the annotation). The planner
    # counts it for replicas of other tenants, whose local use the agent may not show yet.
    keeps: int = 0
    # Allocation dra: the part of `lenders` a ResourceClaim holds (the rest are ELASTIC leases).
    claim_lenders: tuple[tuple[str, int], ...] = ()

    @property
    def peer_bytes(self) -> int:
        return sum(b for _, b in self.lenders)


@dataclass(frozen=True)
class Plan:
    """The planner's answer: assignments, and the replicas left pending with a reason a person can act on."""

    assignments: dict[ReplicaKey, Assignment] = field(default_factory=dict)
    pending: dict[ReplicaKey, str] = field(default_factory=dict)

"""Peer memory held by ResourceClaims (`spillway operator --allocation dra`, docs/dra.md).

In this mode a replica that borrows gets one ResourceClaim of device class
`peer-hbm.spillway.dev` instead of RESERVATION leases and `spillway.dev/peer-hbm` units: one
request per lender the planner chose, `capacity.requests.memory` its bytes rounded up to the
agents' granule, and CEL selectors for that lender's UUID and, when it is an NVLink peer of the
replica's GPU (always, unless no peer had room), the replica GPU's `nvlinkDomain`. kube-scheduler
allocates it when it schedules the pod (pinned to the planned node), and the node's driver turns
it into a lease when the pod starts. The claim is named from tenant and replica
(`contract.claim_name`), labelled like the pod and owned by the tenant, so a retried or restarted
reconcile finds it again and never makes a second one.

`ReplicaClaims` is `ReplicaLeases` with the claim as the replica's reservation: ELASTIC growth,
renewal and the sweep of leases stay as they are (a claim cannot grow; see docs/dra.md). The
rules (what a claim says, what an existing one is worth, which lender it got) are the pure
functions here.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from spillway.contract import (
    ALLOCATION_AUTO,
    ALLOCATION_DEVICEPLUGIN,
    ALLOCATION_DRA,
    ANN_GPU,
    ANN_LENDERS,
    ANN_NODE,
    ANN_PEER_BYTES,
    ANN_TENANT_UID,
    LABEL_MANAGED_BY,
    LABEL_REPLICA,
    LABEL_TENANT,
    MANAGED_BY,
    claim_name,
    join_list,
    split_list,
)
from spillway.dra import CAPACITY, DEVICE_CLASS, DRIVER
from spillway.dra.claims import REQUEST, borrower_claim, claim_request
from spillway.dra.slices import device_name, domains_of
from spillway.operator import reconcile as rc
from spillway.operator.apiserver import ApiServer, KubeError
from spillway.operator.context import TenantContext
from spillway.operator.leases import ReplicaLeases
from spillway.operator.model import Assignment, NodeView, ReplicaKey
from spillway.operator.pods import ObservedPod, TenantRef, owner_reference
from spillway.units import format_bytes, parse_quantity, plain_int

log = logging.getLogger(__name__)

RESOURCE_GROUP = "resource.k8s.io"
RESOURCE_VERSION = "v1"
CLAIMS = "resourceclaims"
DEVICE_CLASSES = "deviceclasses"
STATE_ALLOCATED = "ALLOCATED"  # a claim's entry in status.placements[].leases


class ClaimError(RuntimeError):
    """A replica's claim cannot be made now; the message says why (the replica stays Pending)."""


async def choose_allocation(kube: ApiServer, wanted: str) -> tuple[str, str]:
    """The allocation mode to run with, and why. `auto` is dra when the API server serves
    resource.k8s.io/v1 and the DeviceClass exists (the chart's dra.enabled installs it)."""
    if wanted != ALLOCATION_AUTO:
        return wanted, f"--allocation {wanted}"
    if not await kube.serves(RESOURCE_GROUP, RESOURCE_VERSION):
        return ALLOCATION_DEVICEPLUGIN, f"the API server does not serve {RESOURCE_GROUP}/{RESOURCE_VERSION}"
    try:
        found = await kube.get_custom(RESOURCE_GROUP, RESOURCE_VERSION, DEVICE_CLASSES, DEVICE_CLASS)
    except KubeError as exc:
        return ALLOCATION_DEVICEPLUGIN, f"cannot read DeviceClass {DEVICE_CLASS}: {exc}"
    if found is None:
        return ALLOCATION_DEVICEPLUGIN, (f"DeviceClass {DEVICE_CLASS} does not exist (the chart installs it with "
                                         "dra.enabled=true)")
    return ALLOCATION_DRA, f"{RESOURCE_GROUP}/{RESOURCE_VERSION} is served and DeviceClass {DEVICE_CLASS} exists"


# -- what a claim says (pure) -------------------------------------------------------------------


def round_up(nbytes: int, granule: int) -> int:
    return -(-nbytes // granule) * granule if granule > 0 else nbytes


def claim_requests(node: NodeView, own_gpu: str, lenders: Sequence[tuple[str, int]]) -> list[dict[str, Any]]:
    """One request per planned lender, its bytes rounded up to the node's granule, selecting that
    lender by UUID and, when it is an NVLink peer of `own_gpu`, the NVLink domain of `own_gpu` too.
    Only the UUID pins it: kube-scheduler does not know which GPUs the planner is about to give
    to models (or to tenants that do not lend), so a claim free to take any device of the domain
    could land on one that is taken a moment later."""
    pairs = [(x[0], x[1]) for x in (sorted(p) for p in node.nvlink)]
    domains = domains_of((g.uuid for g in node.gpus), pairs)
    out = []
    for i, (lender, nbytes) in enumerate(lenders):
        name = REQUEST if i == 0 else f"{REQUEST}-{i}"
        size = round_up(nbytes, node.granularity)
        domain = domains.get(own_gpu, "") if own_gpu and node.nvlinked(own_gpu, lender) else ""
        out.append(claim_request(size, name=name, nvlink_domain=domain, lender_uuid=lender))
    return out


def build_claim(tenant: TenantRef, node: NodeView, a: Assignment) -> dict[str, Any]:
    """The ResourceClaim of replica `a.key.replica` placed by `a` on `node`."""
    r = a.key.replica
    claim = borrower_claim(
        tenant.namespace, claim_name(tenant.name, r),
        labels={LABEL_TENANT: tenant.name, LABEL_REPLICA: str(r), LABEL_MANAGED_BY: MANAGED_BY},
        requests=claim_requests(node, a.gpu_uuid, a.lenders),
    )
    claim["metadata"]["annotations"] = {
        ANN_TENANT_UID: tenant.uid, ANN_GPU: a.gpu_uuid, ANN_NODE: a.node,
        # The plan, for an operator that restarts before the claim is allocated.
        ANN_LENDERS: join_list(g for g, _ in a.lenders), ANN_PEER_BYTES: join_list(b for _, b in a.lenders),
    }
    claim["metadata"]["ownerReferences"] = [owner_reference(tenant)]
    return claim


@dataclass(frozen=True)
class ObservedClaim:
    """A replica's ResourceClaim as the API server shows it."""

    name: str
    namespace: str
    uid: str
    tenant: str
    replica: int | None
    tenant_uid: str
    node: str  # planned (annotation)
    gpu_uuid: str  # the replica's own GPU (annotation)
    requested: int  # bytes, all requests together
    allocated: tuple[tuple[str, str, int], ...] = ()  # (pool, device, consumed bytes) per result
    planned: tuple[tuple[str, int], ...] = ()  # (lender GPU, bytes) as the operator planned them
    reserved: bool = False  # some pod is reserved for it
    terminating: bool = False

    @property
    def allocated_bytes(self) -> int:
        return sum(b for _, _, b in self.allocated)


def _bytes(value: Any) -> int:
    try:
        return parse_quantity(str(value))
    except ValueError:
        return 0


def observe_claim(obj: Mapping[str, Any]) -> ObservedClaim:
    meta = obj.get("metadata") or {}
    labels = meta.get("labels") or {}
    ann = meta.get("annotations") or {}
    requested = 0
    for req in ((obj.get("spec") or {}).get("devices") or {}).get("requests") or []:
        requested += _bytes((((req.get("exactly") or {}).get("capacity") or {}).get("requests") or {}).get(CAPACITY))
    gpus = split_list(ann.get(ANN_LENDERS))
    sizes = [plain_int(x, max_digits=24) for x in split_list(ann.get(ANN_PEER_BYTES))]
    planned = tuple((g, n or 0) for g, n in zip(gpus, sizes, strict=False)) if len(gpus) == len(sizes) else ()
    status = obj.get("status") or {}
    results = (((status.get("allocation") or {}).get("devices") or {}).get("results")) or []
    allocated = tuple(
        (str(x.get("pool") or ""), str(x.get("device") or ""), _bytes((x.get("consumedCapacity") or {}).get(CAPACITY)))
        for x in results if x.get("driver") == DRIVER
    )
    return ObservedClaim(
        name=str(meta.get("name") or ""), namespace=str(meta.get("namespace") or ""), uid=str(meta.get("uid") or ""),
        tenant=str(labels.get(LABEL_TENANT) or ""), replica=plain_int(labels.get(LABEL_REPLICA)),
        tenant_uid=str(ann.get(ANN_TENANT_UID) or ""), node=str(ann.get(ANN_NODE) or ""),
        gpu_uuid=str(ann.get(ANN_GPU) or ""), requested=requested, allocated=allocated, planned=planned,
        reserved=bool(status.get("reservedFor")), terminating=bool(meta.get("deletionTimestamp")),
    )


def fits(found: ObservedClaim, wanted: ObservedClaim) -> bool:
    """Whether an existing claim serves the replica as planned now (same tenant incarnation,
    node, GPU, lenders and size, not going, not allocated elsewhere)."""
    return (not found.terminating and found.tenant_uid == wanted.tenant_uid and found.node == wanted.node
            and found.gpu_uuid == wanted.gpu_uuid and found.requested == wanted.requested
            and found.planned == wanted.planned
            and all(pool == wanted.node for pool, _, _ in found.allocated))


def lenders_of(claim: ObservedClaim, pools: Mapping[str, NodeView]) -> tuple[tuple[str, int], ...]:
    """The lender GPUs (UUIDs where the pool is known) and consumed bytes of an allocated claim;
    of one not allocated yet, the planned ones."""
    if not claim.allocated:
        return claim.planned
    out = []
    for pool, device, nbytes in claim.allocated:
        view = pools.get(pool)
        uuid = next((g.uuid for g in view.gpus if device_name(g.uuid) == device), device) if view else device
        out.append((uuid, nbytes))
    return tuple(out)


def is_orphan_claim(claim: ObservedClaim, tenants: Mapping[tuple[str, str], rc.TenantFacts]) -> bool:
    """A claim of ours whose tenant is gone (or was recreated) or whose replica is beyond spec.replicas."""
    t = tenants.get((claim.namespace, claim.tenant))
    if t is None:
        return True
    if t.uid and claim.tenant_uid and claim.tenant_uid != t.uid:
        return True
    return claim.replica is None or (t.replicas is not None and claim.replica >= t.replicas)


# -- the concern ---------------------------------------------------------------------------------


@dataclass
class ReplicaClaims(ReplicaLeases):
    dra: ClassVar[bool] = True

    def __post_init__(self) -> None:
        super().__post_init__()
        self.found: dict[tuple[str, str], ObservedClaim] = {}  # (namespace, claim name) -> last seen

    async def _list(self, namespace: str, selector: str) -> list[ObservedClaim]:
        items = await self.kube.list_custom(RESOURCE_GROUP, RESOURCE_VERSION, CLAIMS, namespace,
                                            label_selector=selector)
        return [observe_claim(x) for x in items]

    def _note(self, claims: Iterable[ObservedClaim]) -> None:
        """Remember the claims, and give the replicas' assignments their claims' lenders (allocated,
        else planned), so the planner counts them while no lease at the agent shows them yet."""
        for c in claims:
            self.found[(c.namespace, c.name)] = c
            if c.replica is None:
                continue
            key = ReplicaKey(c.namespace, c.tenant, c.replica)
            a = self.assignments.get(key)
            if a is None or a.node != c.node or a.gpu_uuid != c.gpu_uuid or c.terminating:
                continue
            got = lenders_of(c, self.cluster.pools)
            elastic = a.lenders[len(a.claim_lenders):]
            self.assignments[key] = dataclasses.replace(a, lenders=got + elastic, claim_lenders=got)

    async def load(self, namespace: str, tenant: str) -> None:
        claims = await self._list(namespace, f"{LABEL_TENANT}={tenant}")
        for k in [k for k, c in self.found.items() if k[0] == namespace and c.tenant == tenant]:
            del self.found[k]
        self._note(claims)

    def replica_status(self, pod: ObservedPod) -> rc.ReplicaStatus:
        st = super().replica_status(pod)
        if not pod.claim:
            return st
        st.claim = pod.claim
        c = self.found.get((pod.namespace, pod.claim))
        if c is not None and c.allocated:
            held = [{"id": pod.claim, "gpu": uuid, "bytes": nbytes, "kind": "RESERVATION", "state": STATE_ALLOCATED}
                    for uuid, nbytes in lenders_of(c, self.cluster.pools)]
            st.leases = held + st.leases
        else:
            st.reason = (f"ResourceClaim {pod.claim} is not allocated yet: kube-scheduler allocates it when it "
                         f"schedules pod {pod.name} (its events say why not)")
        return st

    def held_bytes(self, pod: ObservedPod) -> int:
        c = self.found.get((pod.namespace, pod.claim)) if pod.claim else None
        claimed = (c.allocated_bytes or c.requested) if c is not None else 0
        return claimed + super().held_bytes(pod)

    async def ensure_claim(self, ctx: TenantContext, a: Assignment) -> str:
        """The replica's claim as `a` plans it: created, or the existing one when it fits; an
        existing one that does not fit is deleted and made again. ClaimError when that cannot be
        done now (the previous claim is still being deleted, or the API server refused)."""
        view = self.cluster.pools.get(a.node)
        if view is None:
            raise ClaimError(f"node {a.node} has no MemoryPool")
        body = build_claim(ctx.ref, view, a)
        wanted = observe_claim(body)
        for attempt in (1, 2):
            try:
                created = observe_claim(await self.kube.create_custom(RESOURCE_GROUP, RESOURCE_VERSION, CLAIMS, body,
                                                                      wanted.namespace))
                self.found[(created.namespace, created.name)] = created
                return created.name
            except KubeError as exc:
                if exc.status != 409:
                    raise ClaimError(f"cannot create ResourceClaim {wanted.name}: {exc}") from exc
            raw = await self.kube.get_custom(RESOURCE_GROUP, RESOURCE_VERSION, CLAIMS, wanted.name, wanted.namespace)
            if raw is None:
                continue  # gone in between: create it
            found = observe_claim(raw)
            if fits(found, wanted):
                self.found[(found.namespace, found.name)] = found
                return found.name
            if found.terminating or attempt == 2:
                break
            await self.kube.delete_custom(RESOURCE_GROUP, RESOURCE_VERSION, CLAIMS, found.name, found.namespace,
                                          uid=found.uid)
            ctx.normal("ClaimReplaced", f"replica {a.key.replica}: ResourceClaim {found.name} was made for another "
                       f"placement ({found.node} GPU {found.gpu_uuid}, {format_bytes(found.requested)}); deleted it "
                       "to make it again")
        raise ClaimError(f"the previous ResourceClaim {wanted.name} is still being deleted (its pod is going); "
                         "tries again at the next resync")

    async def delete_claim(self, namespace: str, name: str) -> bool:
        self.found.pop((namespace, name), None)
        return await self.kube.delete_custom(RESOURCE_GROUP, RESOURCE_VERSION, CLAIMS, name, namespace)

    async def release_replica(self, pod: ObservedPod) -> int:
        n = await super().release_replica(pod)
        if pod.claim and await self.delete_claim(pod.namespace, pod.claim):
            n += 1
        return n

    async def forget_tenant(self, namespace: str, tenant: str) -> int:
        n = 0
        for c in await self._list(namespace, f"{LABEL_TENANT}={tenant}"):
            n += await self.delete_claim(namespace, c.name)
        return n

    async def startup_sweep(self, namespaces: Sequence[str], tenants: Mapping[tuple[str, str], rc.TenantFacts]) -> int:
        """Delete the claims no replica can want (`is_orphan_claim`); remember the others and their
        lenders. A claim whose pod was never created is kept: the replica's placement finds it."""
        n = 0
        for ns in namespaces or [""]:
            for c in await self._list(ns, LABEL_TENANT):
                if is_orphan_claim(c, tenants):
                    n += await self.delete_claim(c.namespace, c.name)
                else:
                    self._note([c])
        if n:
            log.info("startup sweep deleted orphaned ResourceClaims", extra={"deleted": n})
        return n

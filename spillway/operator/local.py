"""The operator's *local reservations*: the memory a GPU keeps for the models placed on it, which
its agent never lends (the agent's SetGpuLocal `reserved`). Not to be confused with a
RESERVATION lease, which is memory lent to a borrower on another GPU (`leases.py`).

The local reservation of a GPU is recomputed from the pods that exist (each pod's ANN_LOCAL,
summed per GPU), never counted up or down, so a crash leaves nothing stale. On each MemoryPool,
ANN_POOL_LOCAL records the GPUs whose local reservations this operator set: written before one is
set and narrowed after one is cleared, so a restarted operator knows which are its own.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from spillway.contract import ANN_POOL_LOCAL, GROUP, POOL_PLURAL, VERSION
from spillway.operator.agents import AgentError, Agents
from spillway.operator.apiserver import ApiServer, KubeError
from spillway.operator.cluster import ClusterView
from spillway.operator.model import ReplicaKey, TenantSpec
from spillway.operator.pods import ObservedPod, local_bytes, local_patch
from spillway.units import format_bytes

log = logging.getLogger(__name__)

LOCAL_RESEND_S = 30.0  # re-send a local reservation the published pool still does not show after this long


def parse_local_record(raw: Any) -> dict[str, int]:
    """ANN_POOL_LOCAL's value ({GPU UUID: bytes}); {} when absent or malformed."""
    try:
        value = json.loads(raw) if raw else {}
        return {str(k): int(v) for k, v in value.items()} if isinstance(value, dict) else {}
    except (ValueError, TypeError):
        return {}


def format_local_record(record: Mapping[str, int]) -> str | None:
    """ANN_POOL_LOCAL's value for a record (None removes the annotation)."""
    return json.dumps(dict(sorted(record.items())), separators=(",", ":")) if record else None


@dataclass
class LocalReservations:
    kube: ApiServer
    agents: Agents
    cluster: ClusterView

    def __post_init__(self) -> None:
        self._record: dict[str, dict[str, int]] = {}  # pool name -> ANN_POOL_LOCAL
        self._placed: dict[ReplicaKey, tuple[str, str, int]] = {}  # replica -> (node, own GPU, bytes it keeps)
        self._sent: dict[tuple[str, str], tuple[int, float]] = {}  # (node, gpu) -> (bytes, monotonic)
        self._node_locks: dict[str, asyncio.Lock] = {}

    def pool_changed(self, body: Mapping[str, Any]) -> None:
        meta = body.get("metadata") or {}
        name = str(meta.get("name") or "")
        if name:
            self._record[name] = parse_local_record((meta.get("annotations") or {}).get(ANN_POOL_LOCAL))

    def note(self, key: ReplicaKey, p: ObservedPod, deleted: bool = False) -> str | None:
        """Take what a replica's pod keeps on its own GPU; returns the node whose local
        reservations changed (to sync), else None."""
        before = self._placed.get(key)
        if deleted:
            if before is None or before[0] != p.node:
                return None
            del self._placed[key]
            return p.node
        after = (p.node, p.gpu_uuid, p.local_bytes)
        if not p.gpu_uuid or p.local_bytes <= 0:
            self._placed.pop(key, None)
            return p.node if before is not None else None
        self._placed[key] = after
        if before == after:
            return None
        if before is not None and before[0] != p.node:
            return before[0]  # rare: a new pod of the replica on another node; the old node syncs on its timer
        return p.node

    def wanted(self, node: str) -> dict[str, int]:
        """{GPU: bytes} the node's GPUs must keep for the replicas placed on them."""
        out: dict[str, int] = {}
        for n, gpu, nbytes in self._placed.values():
            if n == node:
                out[gpu] = out.get(gpu, 0) + nbytes
        return out

    def bytes_for(self, spec: TenantSpec, node: str, gpu: str) -> int:
        """What a replica of `spec` keeps on `gpu` of `node` (the whole GPU when it does not lend)."""
        view = self.cluster.pools.get(node)
        g = view.gpu(gpu) if view is not None else None
        return local_bytes(spec.memory, spec.lending, g.total if g is not None else 0)

    async def follow_spec(self, spec: TenantSpec, pod: ObservedPod) -> ObservedPod:
        """A kept pod's ANN_LOCAL follows the spec (model.memory or lending changed, or a pod made
        before the annotation existed)."""
        if not pod.gpu_uuid:
            return pod
        want = self.bytes_for(spec, pod.node, pod.gpu_uuid)
        if want == pod.local_bytes:
            return pod
        await self.kube.patch_pod(spec.namespace, pod.name, local_patch(want))
        return dataclasses.replace(pod, local_bytes=want)

    async def sync(self, node: str) -> None:
        """Make the agent's local reservations on `node` match the replicas placed there
        (SetGpuLocal reserved), on every GPU this operator manages there (ANN_POOL_LOCAL)."""
        lock = self._node_locks.setdefault(node, asyncio.Lock())
        async with lock:
            view = self.cluster.pools.get(node)
            if view is None or not view.endpoint:
                return
            gpus = {g.uuid: g for g in view.gpus}
            record = dict(self._record.get(node, {}))
            wanted = {g: b for g, b in self.wanted(node).items() if g in gpus}
            targets = {g: wanted.get(g, 0) for g in set(record) | set(wanted) if g in gpus}
            widened = {**record, **{g: b for g, b in targets.items() if b > 0}}
            if widened != record:
                await self._write_record(node, widened)
            now = time.monotonic()
            unset: set[str] = set()
            for gpu, nbytes in sorted(targets.items()):
                published = gpus[gpu].local_reserved
                sent = self._sent.get((node, gpu))
                if published == nbytes and (sent is None or sent[0] == nbytes):
                    continue
                if sent is not None and sent[0] == nbytes and now - sent[1] < LOCAL_RESEND_S:
                    continue  # sent; the agent publishes it with its next beat
                try:
                    await self.agents.set_local(view.endpoint, gpu, nbytes)
                except AgentError as exc:
                    unset.add(gpu)
                    log.warning("cannot set the local reservation", extra={"node": node, "gpu": gpu,
                                                                          "bytes": nbytes, "error": str(exc)})
                    continue
                self._sent[(node, gpu)] = (nbytes, now)
                log.info("local reservation set", extra={"node": node, "gpu": gpu, "reserved": format_bytes(nbytes)})
            # Ours from now on: what is reserved for a replica, and what could not be cleared yet.
            narrowed = {g: b for g, b in targets.items() if b > 0}
            narrowed.update({g: widened[g] for g in unset if targets[g] == 0 and g in widened})
            if narrowed != widened:
                await self._write_record(node, narrowed)

    async def _write_record(self, node: str, record: Mapping[str, int]) -> None:
        try:
            await self.kube.patch_custom(GROUP, VERSION, POOL_PLURAL, node,
                                         {"metadata": {"annotations": {ANN_POOL_LOCAL: format_local_record(record)}}})
        except KubeError as exc:
            if exc.status != 404:
                raise
        self._record[node] = dict(record)

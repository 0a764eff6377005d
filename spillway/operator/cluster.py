"""The operator's view of the GPU nodes: each node's `MemoryPool` (as its agent publishes it) and
its Kubernetes `Node` (Ready, cordoned), kept current by the watches; which pools are placeable,
which nodes are lost (`model.pool_verdicts`, pure); and an Event on a MemoryPool when its verdict
changes (`announce`, called by the engine after each look)."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from spillway.contract import GROUP_VERSION, POOL_KIND
from spillway.operator.agents import AgentError
from spillway.operator.apiserver import ApiServer, KubeError
from spillway.operator.context import EventFn, no_events
from spillway.operator.model import PLACEABLE, NodeHealth, NodeView, Verdict, pool_verdicts

log = logging.getLogger(__name__)


@dataclass
class ClusterView:
    kube: ApiServer
    stale_s: float = 60.0  # a MemoryPool whose heartbeat is older counts as a lost node (0: never)
    event: EventFn = no_events
    pools: dict[str, NodeView] = field(default_factory=dict)
    # Kubernetes Nodes by name; None until listed (or when the operator may not list them): then
    # every live MemoryPool counts as placeable.
    nodes: dict[str, NodeHealth] | None = None

    def __post_init__(self) -> None:
        self._nodes_rv = ""
        self._pool_refs: dict[str, dict[str, Any]] = {}  # pool name -> {apiVersion, kind, metadata} for events
        self._pool_said: dict[str, str] = {}  # pool name -> the last verdict posted as an event

    # -- MemoryPools ---------------------------------------------------------------------------

    def pool_changed(self, body: Mapping[str, Any]) -> NodeView | None:
        """Take a MemoryPool as the watch shows it; its view, or None when it is malformed."""
        try:
            view = NodeView.from_memorypool(body)
        except ValueError as exc:
            log.warning("ignoring MemoryPool", extra={"error": str(exc)})
            return None
        meta = body.get("metadata") or {}
        self._pool_refs[view.name] = {
            "apiVersion": GROUP_VERSION, "kind": POOL_KIND,
            "metadata": {"name": meta.get("name"), "uid": meta.get("uid")},
        }
        if view.gpus and view.endpoint:
            self.pools[view.name] = view
        return view

    def pool_deleted(self, name: str) -> None:
        self.pools.pop(name, None)
        self._pool_said.pop(name, None)

    def endpoint(self, node: str) -> str:
        """The agent endpoint of `node`; AgentError when it has no usable MemoryPool."""
        view = self.pools.get(node)
        if view is None or not view.endpoint:
            raise AgentError(f"node {node} has no MemoryPool with an agent endpoint", "UNAVAILABLE")
        return view.endpoint

    def debit(self, node: str, gpu: str, nbytes: int) -> None:
        """Count a new lease against our copy of the pool until the agent publishes again."""
        view = self.pools.get(node)
        if view is None:
            return
        gpus = tuple(
            dataclasses.replace(g, lendable=max(0, g.lendable - nbytes), leased=g.leased + nbytes)
            if g.uuid == gpu else g
            for g in view.gpus
        )
        self.pools[node] = dataclasses.replace(view, gpus=gpus)

    # -- verdicts ----------------------------------------------------------------------------

    def verdicts(self, now: float | None = None) -> dict[str, Verdict]:
        """(lost, unplaceable) reasons for every pool that is not fully usable (no I/O)."""
        return pool_verdicts(self.pools, self.nodes, time.time() if now is None else now, self.stale_s)

    def announce(self, verdicts: Mapping[str, Verdict]) -> None:
        """Post an Event on each MemoryPool whose verdict changed since the last one posted."""
        for name in self.pools:
            lost, unplaceable = verdicts.get(name, PLACEABLE)
            now_says = lost or unplaceable
            if now_says == self._pool_said.get(name, ""):
                continue
            self._pool_said[name] = now_says
            ref = self._pool_refs.get(name)
            if ref is None:
                continue
            if lost:
                self.event(ref, "Warning", "NodeLost", f"node {name} {lost}: not placeable; its replicas are "
                           "re-placed on other nodes")
            elif unplaceable:
                self.event(ref, "Warning", "NodeUnplaceable", f"node {name} {unplaceable}: no new replica is "
                           "placed there; running ones stay")
            else:
                self.event(ref, "Normal", "NodePlaceable", f"node {name} is Ready and schedulable again")

    # -- Nodes -------------------------------------------------------------------------------

    def node_gone(self, node: str) -> bool:
        """The Node object is known to be deleted (False while Nodes are not known)."""
        return self.nodes is not None and bool(node) and node not in self.nodes

    def node_changed(self, body: Mapping[str, Any], deleted: bool = False) -> None:
        health = NodeHealth.from_node(body)
        if self.nodes is None or not health.name:
            return
        if deleted:
            self.nodes.pop(health.name, None)
        else:
            self.nodes[health.name] = health

    async def list_nodes(self) -> bool:
        """(Re)load every Node; False when the operator may not list Nodes (then Node facts are
        not used: every live MemoryPool counts as placeable)."""
        try:
            items, rv = await self.kube.list_nodes()
        except KubeError as exc:
            if exc.status in (401, 403):
                if self.nodes is not None or not self._nodes_rv:
                    log.warning("cannot list Nodes: deleted, NotReady and cordoned nodes are not detected (grant "
                                "the operator get/list/watch on nodes)", extra={"error": str(exc)[:300]})
                self.nodes, self._nodes_rv = None, "forbidden"
                return False
            raise
        self.nodes = {h.name: h for h in (NodeHealth.from_node(x) for x in items) if h.name}
        self._nodes_rv = rv
        return True

    async def watch_nodes(self, retry_s: float = 2.0) -> None:
        """Keep `nodes` current (list, then watch; list again when the watch is too old). Runs
        until cancelled."""
        while True:
            try:
                if not self._nodes_rv or self._nodes_rv == "forbidden" or self.nodes is None:
                    if not await self.list_nodes():
                        await asyncio.sleep(60.0)
                        continue
                async for ev in self.kube.watch_nodes(self._nodes_rv):
                    obj = ev.get("object") or {}
                    kind = ev.get("type")
                    if kind == "ERROR":
                        self._nodes_rv = ""  # 410 Gone and friends: list again
                        break
                    rv = str((obj.get("metadata") or {}).get("resourceVersion") or "")
                    if rv:
                        self._nodes_rv = rv
                    if kind in ("ADDED", "MODIFIED", "DELETED"):
                        self.node_changed(obj, deleted=kind == "DELETED")
            except asyncio.CancelledError:
                raise
            except KubeError as exc:
                if exc.status == 410:
                    self._nodes_rv = ""
                    continue
                log.info("node watch ended; retrying", extra={"error": str(exc)[:200]})
                self._nodes_rv = "" if exc.status else self._nodes_rv
                await asyncio.sleep(retry_s)
            except Exception as exc:  # a broken stream: reconnect
                log.info("node watch ended; retrying", extra={"error": str(exc)[:200]})
                await asyncio.sleep(retry_s)

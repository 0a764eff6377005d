"""kopf handlers: thin. Every decision lives in `reconcile`/`placement`, every action in `Engine`.

- InferenceTenant create/update/resume and a resync timer: `Engine.reconcile` (level-based and
  idempotent, so any of them may run at any time, and again after a restart).
- InferenceTenant delete: `Engine.finalize` behind kopf's finalizer (ours: operator.spillway.dev).
- MemoryPool events keep the pool snapshot current; a daemon per MemoryPool watches that node's
  agent and hands lease events (REVOKING, ...) to `Engine.on_lease_event`.
- Pod events of tenant pods keep the assignment map current and poke the tenant's reconcile; a
  pod that appears or goes syncs its node's local reservations (SetGpuLocal), and a timer per
  MemoryPool resyncs them (recomputed from the pods, so a crash leaves nothing stale).
- Nodes: the engine lists and watches them itself (a node deleted, NotReady or cordoned is not
  placeable; without permission to list Nodes it warns and goes on without).
- Login: kopf uses the credentials of the engine's own client (`apiserver.ApiServer.login`).
- Startup: kopf's progress and diff-base storage go to annotations under our prefix (so `status`
  is ours alone), then the startup sweep releases orphaned leases before any reconcile.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from typing import Any

import kopf

from spillway.api.v1 import agent_pb2
from spillway.contract import (
    GROUP,
    GROUP_VERSION,
    HOLDER_PREFIX,
    LABEL_TENANT,
    MANAGED_BY,
    POOL_PLURAL,
    TENANT_KIND,
    TENANT_PLURAL,
    VERSION,
)
from spillway.operator.agents import AgentError
from spillway.operator.engine import Engine
from spillway.operator.model import key_of, object_key

log = logging.getLogger(__name__)

PREFIX = "operator.spillway.dev"


def post_event(body: Mapping[str, Any], type_: str, reason: str, message: str) -> None:
    """A Kubernetes Event on the object (kopf posts them in the background)."""
    obj = dict(body)
    obj.setdefault("apiVersion", GROUP_VERSION)
    obj.setdefault("kind", TENANT_KIND)
    try:
        kopf.event(obj, type=type_, reason=reason, message=message[:1000])  # type: ignore[arg-type]
    except Exception:  # events are best effort; never fail a reconcile for one
        log.debug("event not posted", exc_info=True)
    log.info(message, extra={"reason": reason, "tenant": key_of(body)})


def register(
    registry: kopf.OperatorRegistry,
    engine: Engine,
    *,
    resync_s: float = 30.0,
    agent_retry_s: float = 2.0,
    peering_lifetime_s: int = 15,
) -> None:
    pokes: dict[str, asyncio.Task[None]] = {}
    syncs: dict[str, asyncio.Task[None]] = {}
    background: list[asyncio.Task[None]] = []

    async def sync_later(node: str) -> None:
        await asyncio.sleep(0.2)
        syncs.pop(node, None)
        try:
            await engine.local.sync(node)
        except Exception:
            log.warning("local reservation sync failed", exc_info=True, extra={"node": node})

    async def poke_later(ns: str, name: str) -> None:
        await asyncio.sleep(0.2)
        pokes.pop(object_key(ns, name), None)
        body = await engine.kube.get_custom(GROUP, VERSION, TENANT_PLURAL, name, ns)
        if body is not None:
            try:
                await engine.reconcile(body, renew=False)
            except Exception:
                log.exception("reconcile after a pod event failed", extra={"tenant": object_key(ns, name)})

    logins = 0

    @kopf.on.login(registry=registry)
    async def login(**_: Any) -> kopf.ConnectionInfo:
        """kopf logs in as the engine's own client does (its kubeconfig, exec plugin, OIDC or
        service account); kopf asks again when the API server refuses it: then with new
        credentials."""
        nonlocal logins
        creds = await engine.kube.login(fresh=logins > 0)
        logins += 1
        return kopf.ConnectionInfo(
            server=creds.server, ca_path=creds.ca_path, insecure=creds.insecure,
            scheme="Bearer" if creds.token else None, token=creds.token,
            certificate_path=creds.certificate_path, private_key_path=creds.private_key_path,
        )

    @kopf.on.startup(registry=registry)
    async def startup(settings: kopf.OperatorSettings, **_: Any) -> None:
        settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=PREFIX)
        settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
            prefix=PREFIX, key="last-handled-configuration"
        )
        settings.persistence.finalizer = f"{PREFIX}/finalizer"
        settings.posting.level = logging.WARNING  # our own events tell the story; kopf's only on trouble
        settings.posting.reporting_component = MANAGED_BY
        settings.watching.server_timeout = 300
        settings.batching.worker_limit = 64
        settings.peering.lifetime = peering_lifetime_s  # a standby takes over this long after the active one dies
        for attempt in range(1, 61):
            try:
                released = await engine.startup_sync()
                break
            except Exception as exc:  # the API server may still be warming up (429 storage initializing)
                if attempt == 60:
                    raise
                log.warning("startup sync failed; retrying", extra={"error": str(exc)[:300], "attempt": attempt})
                await asyncio.sleep(1.0)
        log.info("operator synced", extra={"pools": len(engine.pools), "orphans_released": released})
        background.append(asyncio.get_running_loop().create_task(engine.cluster.watch_nodes()))

    @kopf.on.cleanup(registry=registry)
    async def cleanup(**_: Any) -> None:
        for task in background:
            task.cancel()
        await asyncio.gather(*background, return_exceptions=True)
        await engine.close()

    # -- MemoryPools and their agents --

    @kopf.on.event(GROUP, VERSION, POOL_PLURAL, registry=registry)
    async def pool_event(type: str, body: kopf.Body, name: str, **_: Any) -> None:
        if type == "DELETED":
            engine.pool_deleted(name)
        else:
            engine.pool_changed(body)

    @kopf.timer(GROUP, VERSION, POOL_PLURAL, interval=resync_s, registry=registry)
    async def pool_resync(name: str, **_: Any) -> None:
        """Local reservations on the node follow the replicas placed there (first run at once, so a
        restarted operator recomputes them; only the active operator of a peering runs timers)."""
        if engine.synced:
            await engine.local.sync(name)

    @kopf.daemon(GROUP, VERSION, POOL_PLURAL, registry=registry, cancellation_timeout=5.0)
    async def watch_agent(name: str, stopped: kopf.DaemonStopped, **_: Any) -> None:
        """Follow the node agent's event stream; lease changes go to the engine."""
        while not stopped:
            view = engine.pools.get(name)
            if view is None or not view.endpoint:
                await asyncio.sleep(agent_retry_s)
                continue
            endpoint = view.endpoint
            try:
                async for event in engine.agents.watch(endpoint):
                    if stopped:
                        return
                    if event.kind == agent_pb2.WatchEvent.LEASE and event.lease.holder.startswith(HOLDER_PREFIX):
                        task = asyncio.create_task(engine.on_lease_event(event.lease))
                        task.add_done_callback(_log_failure)
                    current = engine.pools.get(name)
                    if current is None or current.endpoint != endpoint:
                        break  # the agent moved: follow it
            except (AgentError, OSError, Exception) as exc:  # the stream ends when the agent restarts
                if stopped:
                    return
                log.info("agent watch ended; reconnecting", extra={"node": name, "error": str(exc)[:200]})
                await engine.agents.pool.drop(endpoint)
            await asyncio.sleep(agent_retry_s)

    # -- tenant pods --

    @kopf.on.event("", "v1", "pods", labels={LABEL_TENANT: kopf.PRESENT}, registry=registry)
    async def pod_event(
        type: str, body: kopf.Body, namespace: str | None, labels: Mapping[str, str], **_: Any
    ) -> None:
        node = engine.pod_changed(body, deleted=type == "DELETED")
        if node and engine.synced and node not in syncs:
            syncs[node] = asyncio.get_running_loop().create_task(sync_later(node))
        if type is None:  # the initial listing
            return
        tenant = labels.get(LABEL_TENANT, "")
        key = object_key(namespace or "", tenant)
        if tenant and key not in pokes and engine.synced:
            pokes[key] = asyncio.get_running_loop().create_task(poke_later(namespace or "", tenant))

    # -- tenants --

    @kopf.on.resume(GROUP, VERSION, TENANT_PLURAL, registry=registry)
    @kopf.on.create(GROUP, VERSION, TENANT_PLURAL, registry=registry)
    @kopf.on.update(GROUP, VERSION, TENANT_PLURAL, field="spec", registry=registry)
    async def tenant_changed(body: kopf.Body, **_: Any) -> None:
        await engine.reconcile(dict(body))

    @kopf.timer(GROUP, VERSION, TENANT_PLURAL, interval=resync_s, registry=registry)
    async def resync(body: kopf.Body, **_: Any) -> None:
        await engine.reconcile(dict(body), renew=True, slo=True)

    # A delete that hits a transient error (an agent that just died, an API server under load)
    # is tried again in seconds, not after kopf's default 60 s: the user is waiting on it.
    @kopf.on.delete(GROUP, VERSION, TENANT_PLURAL, registry=registry, backoff=3.0)
    async def tenant_deleted(body: kopf.Body, **_: Any) -> None:
        await engine.finalize(dict(body))


def _log_failure(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.warning("handling an agent event failed", exc_info=task.exception())

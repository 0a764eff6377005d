"""The agent's gRPC service (spillway.v1.Agent) and the runtime around the pool: inventory
refresh, persistence before every answer, the Watch fan-out, and the timer that expires
leases and enforces revoke deadlines.

Validation happens before anything changes: a rejected call leaves the pool exactly as it
was and gets a precise status code with a message a person can act on. No input crashes
the server: anything unexpected is logged and answered INTERNAL.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar, cast

import grpc

from spillway import __version__
from spillway.agent.inventory import InventoryBackend, InventoryError, InventoryFacts
from spillway.agent.metrics import AgentMetrics
from spillway.agent.pool import Event, Kind, Lease, Pool, PoolError, State
from spillway.agent.store import Store
from spillway.api.v1 import agent_pb2 as pb
from spillway.api.v1 import agent_pb2_grpc as pb_grpc
from spillway.contract import TRAILER_LARGEST_GRANTABLE
from spillway.units import QuantityError, format_bytes, parse_quantity

log = logging.getLogger("spillway.agent")

LARGEST_METADATA = TRAILER_LARGEST_GRANTABLE
WATCH_QUEUE = 10_000

T = TypeVar("T")


def now_ms() -> int:
    return int(time.time() * 1000)


# --- conversions -----------------------------------------------------------------------


def lease_pb(x: Lease) -> pb.Lease:
    return pb.Lease(id=x.id, holder=x.holder, kind=cast(Any, int(x.kind)), gpu_uuid=x.gpu_uuid, bytes=x.bytes,
                    priority=x.priority, state=cast(Any, int(x.state)), created_at_ms=x.created_at_ms,
                    expires_at_ms=x.expires_at_ms, revoke_deadline_ms=x.revoke_deadline_ms,
                    idempotency_key=x.idempotency_key, pod=x.pod, pid=x.pid, node_name=x.node_name,
                    ttl_ms=x.ttl_ms, reason=x.reason, ended_at_ms=x.ended_at_ms)


@dataclass
class _Watcher:
    queue: asyncio.Queue[tuple[pb.WatchEvent, float]]
    lease_id: str
    overflowed: bool = False


class AgentCore:
    """Pool + store + inventory + watchers. All pool changes go through `commit()`."""

    def __init__(self, backend: InventoryBackend, pool: Pool, store: Store, metrics: AgentMetrics) -> None:
        self.backend = backend
        self.pool = pool
        self.store = store
        self.metrics = metrics
        self.sequence = 0
        self.watchers: list[_Watcher] = []
        self.inventory_error = ""
        self._wake = asyncio.Event()
        self._next_due = float("inf")  # ms: when the timer wakes next on its own
        self._tasks: list[asyncio.Task[None]] = []
        metrics.bind(lambda: self.pool)

    # --- lifecycle --------------------------------------------------------------------

    def start(self, refresh_s: float) -> None:
        self.commit()  # whatever restore produced (expiries while down)
        self._tasks.append(asyncio.create_task(self._timer(), name="spillway-agent-timer"))
        self._tasks.append(asyncio.create_task(self._refresher(refresh_s), name="spillway-agent-refresh"))
        self._tasks.append(asyncio.create_task(self._checkpointer(), name="spillway-agent-checkpoint"))

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t
        self._tasks.clear()

    async def _timer(self) -> None:
        while True:
            due = self.pool.tick()
            self._next_due = float("inf") if due is None else due
            self.commit()
            self._wake.clear()
            timeout = None if due is None else max(0.0, (due - now_ms()) / 1000.0) + 0.0005
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout)

    async def _checkpointer(self, interval: float = 1.0) -> None:
        """Fold the store's WAL into its database file off the request path (its fsync took
        milliseconds inside a commit). Runs only when something was committed."""
        while True:
            await asyncio.sleep(interval)
            if self.store.commits:
                try:
                    await asyncio.to_thread(self.store.checkpoint)
                except Exception:  # the WAL keeps everything; the next round tries again
                    log.warning("store checkpoint failed", exc_info=True)

    async def _refresher(self, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            await self.refresh()

    async def refresh(self) -> None:
        try:
            if self.backend.simulated:
                facts = self.backend.read()
            else:
                facts = await asyncio.to_thread(self.backend.read)
        except InventoryError as exc:
            if not self.inventory_error:
                log.error("inventory read failed", extra={"error": str(exc)})
            self.inventory_error = str(exc)
            return
        self.inventory_error = ""
        self.apply_inventory(facts)

    def apply_inventory(self, facts: InventoryFacts) -> None:
        self.pool.update_inventory(facts)
        for rec in self.pool.overdue():
            log.warning(
                "borrower still holds an ended lease's memory on the lender; counting it as the GPU's own use",
                extra={"lease": rec.lease.id, "pid": rec.pid, "holder": rec.lease.holder, "pod": rec.lease.pod,
                       "gpu": rec.lease.gpu_uuid, "bytes": rec.lease.bytes},
            )
            self.metrics.overdue.labels(self.metrics.node, rec.lease.gpu_uuid).inc()
        self.metrics.heartbeat = time.time()
        self.commit(decided=time.perf_counter())

    def borrower_pids(self) -> dict[str, set[int]]:
        return self.pool.borrower_pids()

    # --- commit + publish -------------------------------------------------------------

    def commit(self, *, decided: float | None = None, reserved_changed: bool = False) -> list[Event]:
        """Persist the pool's pending changes, then publish them to watchers and metrics.
        Called before a call is answered."""
        events = self.pool.drain()
        reclaims = self.pool.drain_reclaims()
        if events or reserved_changed:
            reserved = {u: a.reserved for u, a in self.pool.gpus.items()} if reserved_changed else None
            self.store.apply(events, reserved)
        for trigger, _ in reclaims:
            self.metrics.reclaims.labels(self.metrics.node, trigger).inc()
        if events:
            self._maybe_wake(events)
            self._publish(events, decided)
        return events

    def _maybe_wake(self, events: list[Event]) -> None:
        """Wake the timer only when a change brings its next deadline closer (the sweep is
        O(leases); most calls do not need it)."""
        for ev in events:
            x = ev.lease
            if x is None:
                continue
            due = x.expires_at_ms if x.live else x.ended_at_ms + self.pool.retention_ms
            if x.state == State.REVOKING:
                due = min(due, x.revoke_deadline_ms)
            if due < self._next_due:
                self._next_due = due
                self._wake.set()

    def _publish(self, events: list[Event], decided: float | None) -> None:
        capacity: list[str] = []
        for ev in events:
            if ev.kind == "capacity":
                if ev.gpu_uuid not in capacity:
                    capacity.append(ev.gpu_uuid)
                continue
            if ev.kind != "lease" or ev.lease is None:
                continue
            x = ev.lease
            if x.state == State.EXPIRED:
                self.metrics.expiries.labels(self.metrics.node).inc()
            elif x.state == State.REVOKED:
                self.metrics.revocations.labels(self.metrics.node, "revoked").inc()
            elif x.state == State.RELEASED and x.revoke_deadline_ms:
                self.metrics.revocations.labels(self.metrics.node, "released").inc()
            self.sequence += 1
            if not any(not w.lease_id or w.lease_id == x.id for w in self.watchers):
                continue  # nobody watches this lease: skip building the message
            we = pb.WatchEvent(kind=pb.WatchEvent.LEASE, sequence=self.sequence, time_ms=ev.time_ms, lease=lease_pb(x))
            stamp = (decided or time.perf_counter()) if ev.reclaim_ms else 0.0
            self._send(we, x.id, stamp)
        if capacity and self.watchers:
            self.sequence += 1
            inv = self.inventory_pb(only=set(capacity))
            self._send(pb.WatchEvent(kind=pb.WatchEvent.CAPACITY, sequence=self.sequence, time_ms=now_ms(),
                                     inventory=inv), "", 0.0)

    def _send(self, ev: pb.WatchEvent, lease_id: str, stamp: float) -> None:
        for w in self.watchers:
            if w.lease_id and w.lease_id != lease_id:
                continue
            if w.queue.qsize() >= WATCH_QUEUE:
                w.overflowed = True
                continue
            w.queue.put_nowait((ev, stamp))

    # --- views ------------------------------------------------------------------------

    def inventory_pb(self, only: set[str] | None = None) -> pb.Inventory:
        facts = self.pool.inventory
        pids = self.borrower_pids()
        gpus = []
        for g in facts.gpus:
            if only is not None and g.uuid not in only:
                continue
            v = self.pool.view(g.uuid)
            gpus.append(pb.Gpu(
                uuid=g.uuid, index=g.index, name=g.name, total_bytes=g.total_bytes, used_bytes=g.used_bytes,
                free_bytes=max(0, g.total_bytes - g.used_bytes), local_used_bytes=v.local_used,
                local_reserved_bytes=v.reserved, headroom_bytes=v.headroom, leased_bytes=v.leased,
                lendable_bytes=v.lendable, utilization_gpu_percent=g.utilization_gpu_percent,
                utilization_memory_percent=g.utilization_memory_percent,
                minor_number=g.minor if g.minor >= 0 else None,
                processes=[pb.GpuProcess(pid=p.pid, used_bytes=p.used_bytes, borrower=p.pid in pids.get(g.uuid, set()))
                           for p in g.processes]))
        links = [] if only is not None else [
            pb.PeerLink(gpu_a=lk.gpu_a, gpu_b=lk.gpu_b, nvlink=lk.nvlink, nvlink_count=lk.nvlink_count,
                        p2p_read=pb.P2PStatus.Value(lk.p2p_read), p2p_write=pb.P2PStatus.Value(lk.p2p_write))
            for lk in facts.links]
        return pb.Inventory(node_name=facts.node_name, backend=facts.backend, simulated=facts.simulated, gpus=gpus,
                            links=links, granularity_bytes=self.pool.granularity, captured_at_ms=now_ms(),
                            agent_version=__version__, driver_version=facts.driver_version)


# --- the servicer ------------------------------------------------------------------------


def _rpc(method: str) -> Callable[[Callable[..., Awaitable[T]]], Callable[..., Awaitable[T]]]:
    """Time and count a unary call; turn rejections into status codes; never crash."""

    def deco(fn: Callable[..., Awaitable[T]]) -> Callable[..., Awaitable[T]]:
        @functools.wraps(fn)
        async def wrapper(self: AgentServicer, request: Any, context: grpc.aio.ServicerContext) -> T:
            t0 = time.perf_counter()
            code = "OK"
            try:
                return await fn(self, request, context)
            except PoolError as exc:
                code = exc.code
                if exc.largest is not None:
                    context.set_trailing_metadata(((LARGEST_METADATA, str(exc.largest)),))
                await context.abort(grpc.StatusCode[exc.code], exc.message)
                raise  # pragma: no cover - abort raises
            except QuantityError as exc:
                code = "INVALID_ARGUMENT"
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
                raise  # pragma: no cover
            except asyncio.CancelledError:
                code = "CANCELLED"
                raise
            except Exception as exc:
                if isinstance(exc, grpc.aio.AbortError):
                    raise
                code = "INTERNAL"
                log.exception("unexpected error", extra={"method": method})
                await context.abort(grpc.StatusCode.INTERNAL, f"internal error in {method}: {exc!r}; see the agent "
                                    "log, and report it")
                raise  # pragma: no cover
            finally:
                self.core.metrics.observe_call(method, code, time.perf_counter() - t0)

        return wrapper

    return deco


def _kind(value: int) -> Kind:
    if value == pb.LEASE_KIND_UNSPECIFIED:
        return Kind.RESERVATION
    if value in (Kind.RESERVATION, Kind.ELASTIC):
        return Kind(value)
    raise PoolError("INVALID_ARGUMENT", f"kind {value} is not a lease kind: use RESERVATION (1) or ELASTIC (2)")


def _size(text: str, what: str = "size") -> int:
    if not text:
        raise PoolError("INVALID_ARGUMENT", f"{what} is required: a Kubernetes quantity such as 4Gi, 512Mi, 80G "
                        "or 1073741824")
    return parse_quantity(text)


class AgentServicer(pb_grpc.AgentServicer):
    def __init__(self, core: AgentCore) -> None:
        self.core = core

    @property
    def pool(self) -> Pool:
        return self.core.pool

    @_rpc("GetInventory")
    async def GetInventory(self, request: pb.GetInventoryRequest, context: grpc.aio.ServicerContext) -> pb.Inventory:
        return self.core.inventory_pb()

    @_rpc("Acquire")
    async def Acquire(self, request: pb.AcquireRequest, context: grpc.aio.ServicerContext) -> pb.AcquireResponse:
        size = _size(request.size)
        lease, token = self.pool.acquire(
            size=size, holder=request.holder, kind=_kind(request.kind), gpu_uuid=request.gpu_uuid,
            near_gpu_uuid=request.near_gpu_uuid, ttl_ms=request.ttl_ms, priority=request.priority,
            idempotency_key=request.idempotency_key, pod=request.pod)
        self.core.commit()
        return pb.AcquireResponse(lease=lease_pb(lease), token=token)

    @_rpc("Renew")
    async def Renew(self, request: pb.RenewRequest, context: grpc.aio.ServicerContext) -> pb.Lease:
        lease = self.pool.renew(request.lease_id, request.token, request.ttl_ms)
        self.core.commit()
        return lease_pb(lease)

    @_rpc("Release")
    async def Release(self, request: pb.ReleaseRequest, context: grpc.aio.ServicerContext) -> pb.Lease:
        lease = self.pool.release(request.lease_id, request.token)
        self.core.commit()
        return lease_pb(lease)

    @_rpc("Claim")
    async def Claim(self, request: pb.ClaimRequest, context: grpc.aio.ServicerContext) -> pb.Lease:
        lease = self.pool.claim(request.lease_id, request.token, request.holder, request.pod)
        self.core.commit()
        return lease_pb(lease)

    @_rpc("ListLeases")
    async def ListLeases(self, request: pb.ListLeasesRequest,
                         context: grpc.aio.ServicerContext) -> pb.ListLeasesResponse:
        leases = self.pool.list_leases(request.holder, request.include_ended, request.gpu_uuid)
        return pb.ListLeasesResponse(leases=[lease_pb(x) for x in leases])

    @_rpc("Reclaim")
    async def Reclaim(self, request: pb.ReclaimRequest, context: grpc.aio.ServicerContext) -> pb.ReclaimResponse:
        decided = time.perf_counter()
        if not request.gpu_uuid:
            raise PoolError("INVALID_ARGUMENT", "gpu_uuid is required: the GPU that wants memory back")
        total = self.pool._gpu(request.gpu_uuid).facts.total_bytes
        size = _size(request.size)
        if size > total:
            raise PoolError("INVALID_ARGUMENT", f"reclaim size {format_bytes(size)} is more than the GPU's total "
                            f"{format_bytes(total)}: ask for at most {format_bytes(total)}")
        victims = self.pool.reclaim(request.gpu_uuid, size, request.reason, request.deadline_ms)
        self.core.commit(decided=decided)
        log.info("reclaim", extra={"gpu": request.gpu_uuid, "requested": format_bytes(size),
                                   "victims": ",".join(v.id for v in victims), "reason": request.reason})
        return pb.ReclaimResponse(revoking=[lease_pb(v) for v in victims], requested_bytes=size,
                                  revoking_bytes=sum(v.bytes for v in victims))

    @_rpc("SetGpuLocal")
    async def SetGpuLocal(self, request: pb.SetGpuLocalRequest, context: grpc.aio.ServicerContext) -> pb.Gpu:
        if not request.gpu_uuid:
            raise PoolError("INVALID_ARGUMENT", "gpu_uuid is required")
        acct = self.pool._gpu(request.gpu_uuid)
        total = acct.facts.total_bytes
        reserved = used = None
        if request.HasField("reserved"):
            reserved = parse_quantity(request.reserved, allow_zero=True)
            if reserved > total:
                raise PoolError("INVALID_ARGUMENT", f"reserved {format_bytes(reserved)} is more than the GPU's total "
                                f"{format_bytes(total)}")
        if request.HasField("simulated_used"):
            if not self.core.backend.simulated:
                raise PoolError("FAILED_PRECONDITION", "simulated_used applies only to the simulated backend; this "
                                "agent reads a real GPU through NVML (set `reserved` instead)")
            used = parse_quantity(request.simulated_used, allow_zero=True)
            if used > total:
                raise PoolError("INVALID_ARGUMENT", f"simulated_used {format_bytes(used)} is more than the GPU's "
                                f"total {format_bytes(total)}")
        if reserved is None and used is None:
            raise PoolError("INVALID_ARGUMENT", "set reserved and/or simulated_used (quantities such as 20Gi)")
        decided = time.perf_counter()
        if used is not None:
            self.core.backend.set_simulated_used(request.gpu_uuid, used)
            self.pool.update_inventory(self.core.backend.read())
        if reserved is not None:
            self.pool.set_reserved(request.gpu_uuid, reserved)
        self.core.commit(decided=decided, reserved_changed=reserved is not None)
        log.info("gpu local set", extra={"gpu": request.gpu_uuid, "reserved": reserved, "simulated_used": used})
        return self.core.inventory_pb(only={request.gpu_uuid}).gpus[0]

    async def Watch(self, request: pb.WatchRequest, context: grpc.aio.ServicerContext) -> None:
        t0 = time.perf_counter()
        code = "OK"
        watcher: _Watcher | None = None
        try:
            if request.lease_id:
                self.pool.get(request.lease_id, request.token)
                leases = [x for x in self.pool.list_leases(include_ended=True) if x.id == request.lease_id]
            else:
                leases = self.pool.list_leases()
            watcher = _Watcher(asyncio.Queue(), request.lease_id)
            self.core.watchers.append(watcher)
            self.core.sequence += 1
            snap = pb.WatchEvent(kind=pb.WatchEvent.SNAPSHOT, sequence=self.core.sequence, time_ms=now_ms(),
                                 inventory=self.core.inventory_pb(), leases=[lease_pb(x) for x in leases])
            self.core.metrics.observe_call("Watch", "OK", time.perf_counter() - t0)
            await context.write(snap)
            while True:
                ev, stamp = await watcher.queue.get()
                await context.write(ev)
                if stamp:
                    self.core.metrics.notify.labels(self.core.metrics.node).observe(time.perf_counter() - stamp)
                if watcher.overflowed and watcher.queue.empty():
                    await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "this watcher fell more than "
                                        f"{WATCH_QUEUE} events behind; watch again (the first event is a snapshot)")
        except PoolError as exc:
            code = exc.code
            self.core.metrics.observe_call("Watch", code, time.perf_counter() - t0)
            await context.abort(grpc.StatusCode[exc.code], exc.message)
        finally:
            if watcher is not None and watcher in self.core.watchers:
                self.core.watchers.remove(watcher)


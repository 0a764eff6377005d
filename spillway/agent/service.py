"""The agent's gRPC service (spillway.v1.Agent) and the runtime around the pool: inventory
refresh, persistence before every answer, the Watch fan-out, and the timer that expires
leases and enforces revoke deadlines.

Validation happens before anything changes: a rejected call leaves the pool exactly as it
was and gets a precise status code with a message a person can act on. Every request passes
`guard` first (role, field bounds, undecodable bytes), so bad input is INVALID_ARGUMENT (or
PERMISSION_DENIED), never INTERNAL; INTERNAL is left for bugs (logged with a traceback).

Watch is bounded and costs the same for one watcher or a thousand: every event is encoded once
into a shared log of the last WATCH_QUEUE events that each all-events watcher reads at its own
cursor (a lease's watchers have a queue of that lease's events); publishing wakes only watchers
waiting for the next event, and one that falls more than WATCH_QUEUE events behind is cut off
(RESOURCE_EXHAUSTED), its streams ended a few per loop turn; snapshots go out in
pages of SNAPSHOT_PAGE leases, built page by page from each lease's cached encoding by at
most SNAPSHOT_WRITERS streams at once, so opening many Watch streams never holds the loop for
long and a watcher that does not read holds at most one page.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar, cast

import grpc

from spillway import __version__
from spillway.agent.guard import (
    PERMISSIONS,
    Caller,
    Role,
    Undecodable,
    authorize,
    check_bounds,
    safe_decoder,
)
from spillway.agent.inventory import InventoryBackend, InventoryError, InventoryFacts
from spillway.agent.metrics import AgentMetrics
from spillway.agent.pool import Event, Kind, Lease, Pool, PoolError, State
from spillway.agent.store import Store
from spillway.api.v1 import agent_pb2 as pb
from spillway.api.v1 import agent_pb2_grpc as pb_grpc
from spillway.contract import TRAILER_LARGEST_GRANTABLE
from spillway.units import QuantityError, format_bytes, parse_quantity, plain_int

log = logging.getLogger("spillway.agent")

LARGEST_METADATA = TRAILER_LARGEST_GRANTABLE
WATCH_QUEUE = 1024  # events a watcher may fall behind before it is cut off
LOG_TRIM = 256  # the shared log is trimmed (and laggards found) every this many events
CUT_OFF_TURN = 32  # streams of cut-off watchers ended per loop turn (a thousand aborts at once held the loop)
MAX_WATCHERS = 4096  # open Watch streams, all callers together
SNAPSHOT_PAGE = 250  # leases per SNAPSHOT message
SNAPSHOT_WRITERS = 2  # snapshot pages written at once, all watchers together (the rest wait their turn)
SNAPSHOT_WRITE_S = 10.0  # a watcher that does not take a snapshot page within this is cut off
LIST_PAGE = 500  # ListLeases' default page size
LIST_PAGE_MAX = 1000

T = TypeVar("T")


def now_ms() -> int:
    return int(time.time() * 1000)


# --- conversions -----------------------------------------------------------------------


def lease_pb(x: Lease, *, keys: bool = True) -> pb.Lease:
    """The lease as the API shows it; `keys=False` (borrowers) leaves out its idempotency key."""
    return pb.Lease(id=x.id, holder=x.holder, kind=cast(Any, int(x.kind)), gpu_uuid=x.gpu_uuid, bytes=x.bytes,
                    priority=x.priority, state=cast(Any, int(x.state)), created_at_ms=x.created_at_ms,
                    expires_at_ms=x.expires_at_ms, revoke_deadline_ms=x.revoke_deadline_ms,
                    idempotency_key=x.idempotency_key if keys else "", pod=x.pod, pid=x.pid,
                    node_name=x.node_name, ttl_ms=x.ttl_ms, reason=x.reason, ended_at_ms=x.ended_at_ms)


@dataclass(eq=False)
class _Watcher:
    """One Watch stream. An all-events watcher reads the shared log at `cursor`; a lease's
    watcher has its own bounded queue of (event, reclaim stamp), shared event objects."""

    lease_id: str  # "" watches everything (admin)
    task: asyncio.Task[Any] | None
    keys: bool = True  # show idempotency keys (admin)
    queue: deque[tuple[pb.WatchEvent, float]] = field(default_factory=deque)
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    cursor: int = 0  # all-events watchers: the log position of the next event to send
    cut: str = ""  # why the agent cut this watcher off


class EventLog:
    """The all-events watchers' feed: the node's recent events, each encoded once, that every
    watcher reads at its own cursor. Appending costs the same for one watcher or a thousand
    (a per-watcher queue cost a loop over all of them per event); only watchers waiting for the
    next event are woken, not those still writing (or stuck writing) earlier ones. It keeps the
    last `keep` events; `append` trims every `trim_every` events and says so, so the caller
    can cut off the watchers whose cursor fell out of it."""

    def __init__(self, keep: int = WATCH_QUEUE, trim_every: int = LOG_TRIM) -> None:
        self.keep = keep
        self.trim_every = trim_every
        self.first = 0  # position of items[0]
        self.items: deque[tuple[bytes, float]] = deque()  # (encoded WatchEvent, reclaim stamp)
        self.changed = asyncio.Event()  # set (and replaced) by each append

    @property
    def end(self) -> int:
        """The position the next event gets."""
        return self.first + len(self.items)

    def append(self, data: bytes, stamp: float) -> bool:
        """Add an event and wake its waiters; True when this append trimmed the log."""
        self.items.append((data, stamp))
        changed, self.changed = self.changed, asyncio.Event()
        changed.set()
        if len(self.items) < self.keep + self.trim_every:
            return False
        dropped = len(self.items) - self.keep
        for _ in range(dropped):
            self.items.popleft()
        self.first += dropped
        return True

    def clear(self) -> None:
        """Drop every kept event (nobody reads them); positions go on from where they were."""
        self.first = self.end
        self.items.clear()

    def since(self, cursor: int) -> list[tuple[bytes, float]] | None:
        """The events from position `cursor` on, or None when they are no longer kept."""
        if cursor < self.first:
            return None
        return list(itertools.islice(self.items, cursor - self.first, None))


class AgentCore:
    """Pool + store + inventory + watchers. All pool changes go through `commit()`."""

    def __init__(self, backend: InventoryBackend, pool: Pool, store: Store, metrics: AgentMetrics) -> None:
        self.backend = backend
        self.pool = pool
        self.store = store
        self.metrics = metrics
        self.sequence = 0
        self.watchers: list[_Watcher] = []  # of every event (they read `log`)
        self.log = EventLog()
        self._ending: set[asyncio.Task[None]] = set()  # tasks ending cut-off streams a few per turn
        self.lease_watchers: dict[str, list[_Watcher]] = {}  # lease id -> watchers of that lease only
        # Each live lease encoded once as a SNAPSHOT's `leases` entry, for every snapshot page
        # until it changes (opening many Watch streams over many leases re-encoded them all).
        self._entries: dict[str, bytes] = {}
        self.snapshot_writers = asyncio.Semaphore(SNAPSHOT_WRITERS)
        self._inventory: pb.Inventory | None = None  # the whole inventory, until the next change
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
        self._inventory = None
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
            self._inventory = None
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
            if ev.lease is not None:
                self._entries.pop(ev.lease.id, None)
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
            if not self.watchers and x.id not in self.lease_watchers:
                continue  # nobody watches this lease: skip building the message
            stamp = (decided or time.perf_counter()) if ev.reclaim_ms else 0.0
            self._send(pb.WatchEvent(kind=pb.WatchEvent.LEASE, sequence=self.sequence, time_ms=ev.time_ms,
                                     lease=lease_pb(x)), x.id, stamp)
        if capacity and self.watchers:
            self.sequence += 1
            inv = self.inventory_pb(only=set(capacity))
            self._send(pb.WatchEvent(kind=pb.WatchEvent.CAPACITY, sequence=self.sequence, time_ms=now_ms(),
                                     inventory=inv), "", 0.0)

    def _send(self, ev: pb.WatchEvent, lease_id: str, stamp: float) -> None:
        if self.watchers and self.log.append(ev.SerializeToString(), stamp):
            first = self.log.first
            self.cut_off_many([w for w in self.watchers if w.cursor < first], _BEHIND)
        item = (ev, stamp)
        keyless: tuple[pb.WatchEvent, float] | None = None
        behind: list[_Watcher] = []
        for w in self.lease_watchers.get(lease_id, ()) if lease_id else ():
            if len(w.queue) >= WATCH_QUEUE:
                behind.append(w)
                continue
            if not w.keys and ev.lease.idempotency_key:
                if keyless is None:
                    stripped = pb.WatchEvent()
                    stripped.CopyFrom(ev)
                    stripped.lease.idempotency_key = ""
                    keyless = (stripped, stamp)
                w.queue.append(keyless)
            else:
                w.queue.append(item)
            w.wake.set()
        if behind:
            self.cut_off_many(behind, _BEHIND)

    def add_watcher(self, w: _Watcher) -> None:
        if len(self.watchers) + sum(len(v) for v in self.lease_watchers.values()) >= MAX_WATCHERS:
            raise PoolError("RESOURCE_EXHAUSTED", f"this agent already serves {MAX_WATCHERS} Watch streams; "
                            "close one, or watch later")
        if w.lease_id:
            self.lease_watchers.setdefault(w.lease_id, []).append(w)
        else:
            assert w.keys, "all-events watchers are admins: the shared log keeps idempotency keys"
            w.cursor = self.log.end
            self.watchers.append(w)

    def remove_watcher(self, w: _Watcher) -> None:
        if not w.lease_id:
            with contextlib.suppress(ValueError):
                self.watchers.remove(w)
            if not self.watchers:
                self.log.clear()
            return
        group = self.lease_watchers.get(w.lease_id)
        if group is not None:
            with contextlib.suppress(ValueError):
                group.remove(w)
            if not group:
                del self.lease_watchers[w.lease_id]

    def cut_off_many(self, ws: list[_Watcher], why: str) -> None:
        """Cut off many watchers that fell behind on the same event (a client that stopped reading
        all its streams): one pass over the watcher lists and one log line, not one per watcher
        (a thousand list removals and log lines stalled the loop for every other call)."""
        ws = [w for w in ws if not w.cut]
        if len(ws) < 8:
            for w in ws:
                self.cut_off(w, why)
            return
        gone = {id(w) for w in ws}
        self.watchers = [w for w in self.watchers if id(w) not in gone]
        if not self.watchers:
            self.log.clear()
        for lease_id in {w.lease_id for w in ws if w.lease_id}:
            group = [w for w in self.lease_watchers.get(lease_id, []) if id(w) not in gone]
            if group:
                self.lease_watchers[lease_id] = group
            else:
                self.lease_watchers.pop(lease_id, None)
        for w in ws:
            w.cut = why
            w.queue.clear()
        self.metrics.watch_cutoffs.labels(self.metrics.node).inc(len(ws))
        log.warning("watchers cut off", extra={"count": len(ws), "reason": "fell behind"})
        ending = asyncio.create_task(self._end_streams([w.task for w in ws if w.task is not None]))
        self._ending.add(ending)
        ending.add_done_callback(self._ending.discard)

    @staticmethod
    async def _end_streams(tasks: list[asyncio.Task[Any]]) -> None:
        """Interrupt cut-off watchers' streams CUT_OFF_TURN per loop turn: each stream's abort
        is Python work, and a thousand at once held every other call for tens of ms. They get
        no events meanwhile (they are off the lists)."""
        for start in range(0, len(tasks), CUT_OFF_TURN):
            for t in tasks[start:start + CUT_OFF_TURN]:
                t.cancel()
            await asyncio.sleep(0)

    def cut_off(self, w: _Watcher, why: str, short: str = "fell behind") -> None:
        """Disconnect a watcher now: drop its queue, stop sending to it, and interrupt its
        stream (even one blocked writing to a client that does not read)."""
        if w.cut:
            return
        w.cut = why
        w.queue.clear()
        self.remove_watcher(w)
        self.metrics.watch_cutoffs.labels(self.metrics.node).inc()
        log.warning("watcher cut off", extra={"lease": w.lease_id or "(all)", "reason": short})
        if w.task is not None:
            w.task.cancel()

    # --- views ------------------------------------------------------------------------

    def snapshot_page(self, ids: list[str], *, first: bool, more: bool, keys: bool) -> bytes:
        """One SNAPSHOT message, encoded: the leases named by `ids` that still exist (their
        current state), the inventory on the first page. Admin pages reuse each lease's cached
        encoding (a repeated field is the concatenation of its entries' encodings)."""
        self.sequence += 1
        head = pb.WatchEvent(kind=pb.WatchEvent.SNAPSHOT, sequence=self.sequence, time_ms=now_ms(),
                             snapshot_more=more)
        if first:
            if self._inventory is None:
                self._inventory = self.inventory_pb()  # O(leases) (borrower PIDs): once per change
            head.inventory.CopyFrom(self._inventory)
        parts = [head.SerializeToString()]
        leases = self.pool.leases
        for i in ids:
            x = leases.get(i)
            if x is None:
                continue
            if not keys:
                parts.append(_entry(lease_pb(x, keys=False).SerializeToString()))
                continue
            entry = self._entries.get(i)
            if entry is None:
                entry = self._entries[i] = _entry(lease_pb(x).SerializeToString())
            parts.append(entry)
        return b"".join(parts)


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


_BEHIND = (f"this watcher fell more than {WATCH_QUEUE} events behind (it does not read its stream fast enough) "
           "and was cut off; watch again (the first event is a fresh snapshot)")
_LEASES_TAG = bytes([(6 << 3) | 2])  # WatchEvent.leases: field 6, length-delimited


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _entry(lease: bytes) -> bytes:
    return _LEASES_TAG + _varint(len(lease)) + lease


def _encode(message: Any) -> bytes:
    """Response serializer that also passes messages encoded beforehand (snapshot pages)."""
    return message if isinstance(message, bytes) else message.SerializeToString()


# --- the servicer ------------------------------------------------------------------------


def _rpc(method: str) -> Callable[[Callable[..., Awaitable[T]]], Callable[..., Awaitable[T]]]:
    """Admit (decode, role, bounds), time and count a unary call; turn rejections into status
    codes; never crash. The handler gets the caller as a third argument."""

    def deco(fn: Callable[..., Awaitable[T]]) -> Callable[..., Awaitable[T]]:
        @functools.wraps(fn)
        async def wrapper(self: AgentServicer, request: Any, context: grpc.aio.ServicerContext) -> T:
            t0 = time.perf_counter()
            counted = False

            def count(code: str) -> None:  # before the answer leaves: a caller then sees it counted
                nonlocal counted
                if not counted:
                    counted = True
                    self.core.metrics.observe_call(method, code, time.perf_counter() - t0)

            try:
                caller = self.admit(method, request, context)
                out = await fn(self, request, context, caller)
                count("OK")
                return out
            except PoolError as exc:
                count(exc.code)
                if exc.largest is not None:
                    context.set_trailing_metadata(((LARGEST_METADATA, str(exc.largest)),))
                await context.abort(grpc.StatusCode[exc.code], exc.message)
                raise  # pragma: no cover - abort raises
            except QuantityError as exc:
                count("INVALID_ARGUMENT")
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
                raise  # pragma: no cover
            except asyncio.CancelledError:
                count("CANCELLED")
                raise
            except Exception as exc:
                if isinstance(exc, grpc.aio.AbortError):
                    raise
                count("INTERNAL")
                log.exception("unexpected error", extra={"method": method})
                await context.abort(grpc.StatusCode.INTERNAL, f"internal error in {method}: {type(exc).__name__}; "
                                    "see the agent log, and report it")
                raise  # pragma: no cover
            finally:
                count("UNKNOWN")  # only if nothing above counted it (an abort raised by the handler itself)

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


def _cursor(token: str) -> int:
    if not token:
        return 0
    cursor = plain_int(token)
    if cursor is None:
        raise PoolError("INVALID_ARGUMENT", "page_token is not one this agent gave out: pass next_page_token of the "
                        "previous page unchanged, or nothing for the first page")
    return cursor


def tls_names(context: grpc.aio.ServicerContext) -> list[str]:
    """The names of a mutual-TLS caller's certificate: its common name first, then its subject
    alternative names; [] on a unix socket."""
    auth = context.auth_context()
    return [v.decode(errors="replace") for prop in ("x509_common_name", "x509_subject_alternative_name")
            for v in auth.get(prop) or ()]


class AgentServicer(pb_grpc.AgentServicer):
    """The API as one role sees it: `role` is fixed by the server (socket) it is added to;
    on the admin server, a TCP caller's identity is its certificate's name."""

    def __init__(self, core: AgentCore, role: Role = Role.ADMIN, tls_clients: frozenset[str] = frozenset()) -> None:
        self.core = core
        self.role = role
        self.tls_clients = tls_clients  # empty: every certificate the CA signed

    @property
    def pool(self) -> Pool:
        return self.core.pool

    def caller(self, context: grpc.aio.ServicerContext) -> Caller:
        if self.role == Role.BORROWER:
            return Caller(Role.BORROWER, "unix:borrower")
        names = tls_names(context)
        if not names:
            return Caller(Role.ADMIN, "unix:admin")
        if self.tls_clients and self.tls_clients.isdisjoint(names):
            raise PoolError("PERMISSION_DENIED", f"the client certificate {names[0][:64]!r} is signed by the agent's "
                            "CA but is not one this agent admits: the agent's --tls-client-name lists "
                            f"{', '.join(sorted(self.tls_clients))}")
        return Caller(Role.ADMIN, "tls:" + names[0])

    def admit(self, method: str, request: Any, context: grpc.aio.ServicerContext) -> Caller:
        """Who calls, and may it: PERMISSION_DENIED or INVALID_ARGUMENT before any work."""
        if isinstance(request, Undecodable):
            log.warning("undecodable request", extra={"method": method, "type": request.message_type,
                                                      "error": request.error})
            raise PoolError("INVALID_ARGUMENT", f"the request is not a valid {request.message_type} protobuf message "
                            f"({request.error}); use the generated spillway.v1 stubs")
        caller = self.caller(context)
        authorize(method, caller)
        check_bounds(request)
        return caller

    @_rpc("GetInventory")
    async def GetInventory(self, request: pb.GetInventoryRequest, context: grpc.aio.ServicerContext,
                           caller: Caller) -> pb.Inventory:
        return self.core.inventory_pb()

    @_rpc("Acquire")
    async def Acquire(self, request: pb.AcquireRequest, context: grpc.aio.ServicerContext,
                      caller: Caller) -> pb.AcquireResponse:
        size = _size(request.size)
        # Admins also reach keys of leases made before keys were scoped (an older agent's table).
        scopes = (caller.identity, "") if caller.admin else (caller.identity,)
        lease, token = self.pool.acquire(
            size=size, holder=request.holder, kind=_kind(request.kind), gpu_uuid=request.gpu_uuid,
            near_gpu_uuid=request.near_gpu_uuid, ttl_ms=request.ttl_ms, priority=request.priority,
            idempotency_key=request.idempotency_key, pod=request.pod, key_scopes=scopes)
        self.core.commit()
        return pb.AcquireResponse(lease=lease_pb(lease, keys=caller.admin), token=token)

    @_rpc("Renew")
    async def Renew(self, request: pb.RenewRequest, context: grpc.aio.ServicerContext, caller: Caller) -> pb.Lease:
        lease = self.pool.renew(request.lease_id, request.token, request.ttl_ms)
        self.core.commit()
        return lease_pb(lease, keys=caller.admin)

    @_rpc("Release")
    async def Release(self, request: pb.ReleaseRequest, context: grpc.aio.ServicerContext,
                      caller: Caller) -> pb.Lease:
        lease = self.pool.release(request.lease_id, request.token)
        self.core.commit()
        return lease_pb(lease, keys=caller.admin)

    @_rpc("Claim")
    async def Claim(self, request: pb.ClaimRequest, context: grpc.aio.ServicerContext, caller: Caller) -> pb.Lease:
        lease = self.pool.claim(request.lease_id, request.token, request.holder, request.pod)
        self.core.commit()
        return lease_pb(lease, keys=caller.admin)

    @_rpc("ListLeases")
    async def ListLeases(self, request: pb.ListLeasesRequest, context: grpc.aio.ServicerContext,
                         caller: Caller) -> pb.ListLeasesResponse:
        limit = min(request.page_size or LIST_PAGE, LIST_PAGE_MAX)
        leases, after = self.pool.list_page(holder=request.holder, include_ended=request.include_ended,
                                            gpu_uuid=request.gpu_uuid, after_seq=_cursor(request.page_token),
                                            limit=limit)
        return pb.ListLeasesResponse(leases=[lease_pb(x) for x in leases], next_page_token=str(after) if after else "")

    @_rpc("Reclaim")
    async def Reclaim(self, request: pb.ReclaimRequest, context: grpc.aio.ServicerContext,
                      caller: Caller) -> pb.ReclaimResponse:
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
                                   "victims": ",".join(v.id for v in victims), "reason": request.reason,
                                   "caller": caller.identity})
        return pb.ReclaimResponse(revoking=[lease_pb(v) for v in victims], requested_bytes=size,
                                  revoking_bytes=sum(v.bytes for v in victims))
    @_rpc("SetGpuLocal")
    async def SetGpuLocal(self, request: pb.SetGpuLocalRequest, context: grpc.aio.ServicerContext,
                          caller: Caller) -> pb.Gpu:
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
        log.info("gpu local set", extra={"gpu": request.gpu_uuid, "reserved": reserved, "simulated_used": used,
                                         "caller": caller.identity})
        return self.core.inventory_pb(only={request.gpu_uuid}).gpus[0]

    async def Watch(self, request: pb.WatchRequest, context: grpc.aio.ServicerContext) -> None:
        t0 = time.perf_counter()
        watcher: _Watcher | None = None
        try:
            caller = self.admit("Watch", request, context)
            if request.lease_id:
                ids = [self.pool.get(request.lease_id, request.token).id]
            elif not caller.admin:
                raise PoolError("PERMISSION_DENIED", "watching every event of the node needs the admin role (the "
                                "agent's admin socket or mutual TLS); a borrower watches its own lease: give "
                                "lease_id and its token")
            else:
                ids = list(self.pool.live)  # the snapshot's leases; pages read their state as they go
            watcher = _Watcher(request.lease_id, asyncio.current_task(), keys=caller.admin)
            self.core.add_watcher(watcher)
            self.core.metrics.observe_call("Watch", "OK", time.perf_counter() - t0)
            await self._snapshot(context, watcher, ids)
            await (self._follow_lease(context, watcher) if request.lease_id else self._follow_log(context, watcher))
        except PoolError as exc:
            self.core.metrics.observe_call("Watch", exc.code, time.perf_counter() - t0)
            await context.abort(grpc.StatusCode[exc.code], exc.message)
        except asyncio.CancelledError:
            if watcher is None or not watcher.cut:
                raise  # the client went away, or the server stops
            task = asyncio.current_task()
            if task is not None:
                task.uncancel()
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, watcher.cut)
        finally:
            if watcher is not None:
                watcher.queue.clear()
                self.core.remove_watcher(watcher)

    async def _follow_lease(self, context: grpc.aio.ServicerContext, watcher: _Watcher) -> None:
        """A lease's watcher: its queue, filled by `AgentCore._send`."""
        while True:
            watcher.wake.clear()
            while watcher.queue:
                ev, stamp = watcher.queue.popleft()
                await context.write(ev)
                self._observe_notify(stamp)
            await watcher.wake.wait()

    async def _follow_log(self, context: grpc.aio.ServicerContext, watcher: _Watcher) -> None:
        """An all-events watcher: the shared log from its cursor on. Falling out of the log is
        noticed by `AgentCore._send` at the next trim, which cuts this stream off."""
        log_ = self.core.log
        while True:
            changed = log_.changed
            items = log_.since(watcher.cursor)
            if items is None:  # trimmed past us between two turns: the trim's cut-off is on its way
                await asyncio.Event().wait()
            for data, stamp in items or ():
                await context.write(data)
                watcher.cursor += 1
                self._observe_notify(stamp)
            if watcher.cursor >= log_.end:
                await changed.wait()

    def _observe_notify(self, stamp: float) -> None:
        if stamp:
            self.core.metrics.notify.labels(self.core.metrics.node).observe(time.perf_counter() - stamp)

    async def _snapshot(self, context: grpc.aio.ServicerContext, watcher: _Watcher, ids: list[str]) -> None:
        """The SNAPSHOT event(s): the inventory and the leases named by `ids`, SNAPSHOT_PAGE at
        a time. Each page is encoded just before it is written, by at most SNAPSHOT_WRITERS
        streams at once (many watchers opening together take turns instead of flooding the
        loop); a client that does not take a page within SNAPSHOT_WRITE_S is cut off."""
        for start in range(0, max(1, len(ids)), SNAPSHOT_PAGE):
            async with self.core.snapshot_writers:
                page = self.core.snapshot_page(ids[start:start + SNAPSHOT_PAGE], first=start == 0,
                                               more=start + SNAPSHOT_PAGE < len(ids), keys=watcher.keys)
                try:
                    await asyncio.wait_for(context.write(page), SNAPSHOT_WRITE_S)
                except TimeoutError:
                    self.core.cut_off(watcher, f"this watcher did not read its snapshot within {SNAPSHOT_WRITE_S:g} "
                                      "s and was cut off; watch again and read the stream", "snapshot not read")
                    await asyncio.sleep(0)  # cut_off cancelled this task: the handler answers


def add_to_server(servicer: AgentServicer, server: grpc.aio.Server) -> None:
    """Register the servicer with request decoders that never raise (undecodable bytes are
    INVALID_ARGUMENT from the handler, not UNKNOWN with a traceback from gRPC)."""
    service = pb.DESCRIPTOR.services_by_name["Agent"]
    handlers: dict[str, grpc.RpcMethodHandler] = {}
    for method in service.methods:
        assert method.name in PERMISSIONS, method.name  # every RPC has its row in the permission table
        decode = safe_decoder(getattr(pb, method.input_type.name))
        encode = getattr(pb, method.output_type.name).SerializeToString
        fn = getattr(servicer, method.name)
        if method.server_streaming:
            handlers[method.name] = grpc.unary_stream_rpc_method_handler(fn, request_deserializer=decode,
                                                                         response_serializer=_encode)
        else:
            handlers[method.name] = grpc.unary_unary_rpc_method_handler(fn, request_deserializer=decode,
                                                                        response_serializer=encode)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service.full_name, handlers),))

"""The lease pool: pure bookkeeping of one node's lendable GPU memory (no I/O, injected clock).

Accounting, per GPU (all in bytes):

    local     = min(max(local reserved, local used), total - leased)
    leased    = sum of the bytes of live leases (RESERVED, ACTIVE, REVOKING)
    lendable  = max(0, total - headroom_nominal - max(reserved, local used) - leased),
                rounded down to the granularity
    headroom  = total - leased - local - lendable   (reported)

so `leased + lendable + headroom + local == total` holds exactly at every moment. The
reported headroom is the nominal one (default max(2 GiB, 5 % of total)) plus the sub-granule
remainder that cannot be lent; while a reclaim is in flight (the GPU's own tenants grew into
leased memory), the overcommit comes out of the reported headroom first (down to 0), and
beyond that `local` is capped at `total - leased` until the revocations complete.

Leases are granted only from lendable memory, so no byte is ever granted twice. Every
change is recorded as an event (`drain()`), which the service persists and then publishes.

Settling: a lease that ends while a borrower process is attached to it does not give its bytes
back at once. The borrower's process may still hold them (a torch cache that was not emptied),
and NVML is the judge: until an inventory refresh shows that process's memory on the lender
down by the lease (or the process gone), the bytes stay out of `lendable` (they show in the
reported headroom, and as `settling`) and the process still counts as a borrower. A borrower
that has not let go within `settle_timeout_ms` is reported (`overdue()`: the service logs it
with its PID and counts it) and from then on its memory counts as the GPU's own use, which is
what it is. Either way no byte that a borrower still holds is lent again.

Revoke deadlines grow with the lease: `max(deadline, bytes / drain rate)`, so a borrower that
must copy a large lease to host memory is given the time that copy takes.
"""

from __future__ import annotations

import hashlib
import heapq
import hmac
import secrets
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from enum import IntEnum

from spillway.agent.inventory import GpuFacts, InventoryFacts, LinkFacts
from spillway.units import format_bytes

GiB = 1 << 30
MiB = 1 << 20
DEFAULT_GRANULARITY = 64 * MiB
DEFAULT_TTL_MS = 60_000
DEFAULT_REVOKE_MS = 5_000
MAX_TTL_MS = 30 * 24 * 3600 * 1000
DEFAULT_RETENTION_MS = 10 * 60_000
DEFAULT_MAX_ENDED = 10_000
DEFAULT_SETTLE_TIMEOUT_MS = 15_000
# What a borrower process may keep on the lender after its lease ends: its CUDA context.
CONTEXT_ALLOWANCE = 1 * GiB
# A borrower moves a revoked lease to pinned host memory at least this fast (bytes/s): pinned
# copies run at ~55 GB/s on an H200; a tenth of that leaves room to pin buffers on the spot.
DEFAULT_DRAIN_BYTES_PER_S = 5 * GiB


class Kind(IntEnum):
    RESERVATION = 1
    ELASTIC = 2


class State(IntEnum):
    RESERVED = 1
    ACTIVE = 2
    REVOKING = 3
    RELEASED = 4
    EXPIRED = 5
    REVOKED = 6


LIVE = frozenset({State.RESERVED, State.ACTIVE, State.REVOKING})


class PoolError(Exception):
    """A rejected call. `code` is a gRPC status code name; nothing changed in the pool."""

    def __init__(self, code: str, message: str, *, largest: int | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.largest = largest


@dataclass
class Lease:
    id: str
    holder: str
    kind: Kind
    gpu_uuid: str
    bytes: int
    priority: int
    state: State
    created_at_ms: int
    expires_at_ms: int
    ttl_ms: int
    token_hash: str
    node_name: str = ""
    revoke_deadline_ms: int = 0
    idempotency_key: str = ""
    pod: str = ""
    pid: int = 0
    reason: str = ""
    ended_at_ms: int = 0
    seq: int = 0  # creation order, for "newest first" among leases created in the same ms
    key_scope: str = ""  # the identity of the caller whose idempotency key names this lease
    key_fingerprint: str = ""  # hash of the Acquire that made it, to refuse the key for another request

    @property
    def live(self) -> bool:
        return self.state in LIVE

    def snapshot(self) -> Lease:
        """An independent copy (what callers and events get; the pool keeps mutating its own).
        Several times cheaper than dataclasses.replace, which re-runs __init__."""
        out = object.__new__(Lease)
        out.__dict__.update(self.__dict__)
        return out


@dataclass(frozen=True)
class Headroom:
    """Never lent: max(min_bytes, fraction of total)."""

    min_bytes: int = 2 * GiB
    fraction: float = 0.05

    def of(self, total: int) -> int:
        return min(total, max(self.min_bytes, int(total * self.fraction + 0.999999)))


@dataclass
class GpuAccount:
    facts: GpuFacts
    local_used: int  # borrowers excluded
    reserved: int = 0
    headroom_nominal: int = 0


@dataclass(frozen=True)
class GpuView:
    """One GPU's accounting, as reported."""

    uuid: str
    index: int
    total: int
    local_used: int
    reserved: int
    local: int
    leased: int
    lendable: int
    headroom: int
    revoking: int
    settling: int = 0  # bytes of ended leases that a borrower process may still hold (in headroom)


@dataclass
class Settling:
    """An ended lease whose borrower process has not yet been seen to free its bytes."""

    lease: Lease
    pid: int
    held_at_end: int  # the process's memory on the lender at the last refresh before the end
    since_ms: int


@dataclass(frozen=True)
class Event:
    kind: str  # "lease" | "capacity"
    lease: Lease | None = None
    gpu_uuid: str = ""
    time_ms: int = 0
    reclaim_ms: int = 0  # set on REVOKING events: when the reclaim was decided


def _process_bytes(inventory: InventoryFacts, gpu_uuid: str, pid: int) -> int:
    """What NVML last reported for one process on one GPU (0 when it is not listed)."""
    for g in inventory.gpus:
        if g.uuid == gpu_uuid:
            return sum(p.used_bytes for p in g.processes if p.pid == pid)
    return 0


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def request_fingerprint(holder: str, kind: int, nbytes: int, gpu_uuid: str, near_gpu_uuid: str, ttl_ms: int,
                        priority: int, pod: str) -> str:
    """What an idempotent retry must repeat exactly, as a short hash (stored with the lease)."""
    text = "\x00".join((holder, str(kind), str(nbytes), gpu_uuid, near_gpu_uuid, str(ttl_ms), str(priority), pod))
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def round_up(n: int, granularity: int) -> int:
    return -(-n // granularity) * granularity


def victim_order(leases: Iterable[Lease]) -> list[Lease]:
    """ELASTIC before RESERVATION, lower priority first, newest first."""
    return sorted(leases, key=lambda x: (0 if x.kind == Kind.ELASTIC else 1, x.priority, -x.created_at_ms, -x.seq))


class Pool:
    def __init__(
        self,
        inventory: InventoryFacts,
        *,
        clock_ms: Callable[[], int],
        key: bytes,
        granularity: int = DEFAULT_GRANULARITY,
        headroom: Headroom | None = None,
        default_ttl_ms: int = DEFAULT_TTL_MS,
        default_revoke_ms: int = DEFAULT_REVOKE_MS,
        retention_ms: int = DEFAULT_RETENTION_MS,
        max_ended: int = DEFAULT_MAX_ENDED,
        new_id: Callable[[], str] | None = None,
        settle_timeout_ms: int = DEFAULT_SETTLE_TIMEOUT_MS,
        drain_bytes_per_s: int = DEFAULT_DRAIN_BYTES_PER_S,
    ) -> None:
        if granularity <= 0:
            raise ValueError("granularity must be positive")
        self.node_name = inventory.node_name
        self.clock_ms = clock_ms
        self._key = key
        self.granularity = granularity
        self.headroom = headroom or Headroom()
        self.default_ttl_ms = default_ttl_ms
        self.default_revoke_ms = default_revoke_ms
        self.retention_ms = retention_ms
        self.settle_timeout_ms = settle_timeout_ms
        self.drain_bytes_per_s = drain_bytes_per_s
        self.settling: dict[str, Settling] = {}  # lease id -> what its borrower may still hold
        self._settling: dict[str, int] = {}  # GPU -> bytes settling
        self._overdue: list[Settling] = []
        self._new_id = new_id or (lambda: "l-" + secrets.token_hex(8))
        self.inventory = inventory
        self.gpus: dict[str, GpuAccount] = {}
        self.links: dict[frozenset[str], LinkFacts] = {}
        self.leases: dict[str, Lease] = {}  # every lease remembered, live or ended
        self.live: dict[str, Lease] = {}  # live leases (RESERVED, ACTIVE, REVOKING)
        self._live_gpu: dict[str, dict[str, Lease]] = {}  # GPU -> its live leases
        self._leased: dict[str, int] = {}  # GPU -> bytes of its live leases
        self._revoking: dict[str, int] = {}  # GPU -> bytes of its REVOKING leases
        self._attached: set[str] = set()  # leases with a borrower PID (a few; scanning every lease was O(leases))
        self._ended: dict[str, None] = {}  # ended leases, oldest end first
        self.max_ended = max_ended
        self._by_key: dict[tuple[str, str], str] = {}  # (caller identity, idempotency key) -> lease id
        self._seq = 0
        self._events: list[Event] = []
        self.reclaims: list[tuple[str, int]] = []  # (trigger, time) of reclaim rounds since the last drain
        self.update_inventory(inventory, borrower_pids={})
        self._events.clear()

    # --- inventory ------------------------------------------------------------------

    def update_inventory(self, inventory: InventoryFacts, borrower_pids: dict[str, set[int]] | None = None) -> None:
        """New facts from the backend. Settles ended leases, emits CAPACITY for GPUs whose
        accounting moved and starts a reclaim where local use grew into leased memory.
        `borrower_pids` (default: the pool's own, `borrower_pids()`) are excluded from local use."""
        from spillway.agent.inventory import local_used_bytes

        self.inventory = inventory
        self.links = {frozenset((lk.gpu_a, lk.gpu_b)): lk for lk in inventory.links}
        self._settle(inventory)
        pids = self.borrower_pids() if borrower_pids is None else borrower_pids
        for g in inventory.gpus:
            local = local_used_bytes(g.used_bytes, g.processes, pids.get(g.uuid, set()))
            acct = self.gpus.get(g.uuid)
            if acct is None:
                self.gpus[g.uuid] = GpuAccount(g, local, 0, self.headroom.of(g.total_bytes))
                continue
            before = self.view(g.uuid)
            acct.facts, acct.local_used = g, local
            acct.headroom_nominal = self.headroom.of(g.total_bytes)
            if self.view(g.uuid) != before:
                self._emit_capacity(g.uuid)
                self._reclaim_growth(g.uuid)

    def _settle(self, inventory: InventoryFacts) -> None:
        """Give back the bytes of ended leases whose borrower process let go of them (or is
        gone), and report the ones that did not within the timeout."""
        if not self.settling:
            return
        now = self.clock_ms()
        for rec in list(self.settling.values()):
            used = _process_bytes(inventory, rec.lease.gpu_uuid, rec.pid)
            if used > max(0, rec.held_at_end - rec.lease.bytes) + CONTEXT_ALLOWANCE:
                if now - rec.since_ms < self.settle_timeout_ms:
                    continue
                rec.lease.reason += (f"; its borrower (pid {rec.pid}) still held {format_bytes(used)} on the lender "
                                     f"{(now - rec.since_ms) / 1000:.1f}s after the end: counted as the GPU's own use")
                self._overdue.append(rec)
                self._emit_lease(rec.lease)
            self._unsettle(rec)

    def _unsettle(self, rec: Settling) -> None:
        del self.settling[rec.lease.id]
        self._settling[rec.lease.gpu_uuid] -= rec.lease.bytes
        if rec.lease.gpu_uuid in self.gpus:
            self._emit_capacity(rec.lease.gpu_uuid)

    def overdue(self) -> list[Settling]:
        """Borrowers reported for holding an ended lease's memory past the timeout (drained)."""
        out, self._overdue = self._overdue, []
        return out

    def borrower_pids(self) -> dict[str, set[int]]:
        """GPU -> PIDs whose memory there is lent memory: attached to a live lease, or settling."""
        out: dict[str, set[int]] = {}
        for lease_id in self._attached:
            x = self.live.get(lease_id)
            if x is not None and x.pid:
                out.setdefault(x.gpu_uuid, set()).add(x.pid)
        for rec in self.settling.values():
            out.setdefault(rec.lease.gpu_uuid, set()).add(rec.pid)
        return out

    def set_reserved(self, gpu_uuid: str, reserved: int) -> None:
        acct = self._gpu(gpu_uuid)
        if reserved < 0 or reserved > acct.facts.total_bytes:
            raise PoolError("INVALID_ARGUMENT", f"local reservation {format_bytes(reserved)} must be between 0 and "
                            f"the GPU's total {format_bytes(acct.facts.total_bytes)}")
        if acct.reserved != reserved:
            acct.reserved = reserved
            self._emit_capacity(gpu_uuid)
            self._reclaim_growth(gpu_uuid)

    def restore_reserved(self, reserved: dict[str, int]) -> None:
        for u, r in reserved.items():
            if u in self.gpus:
                self.gpus[u].reserved = min(r, self.gpus[u].facts.total_bytes)

    # --- accounting -----------------------------------------------------------------

    def leased_on(self, gpu_uuid: str) -> int:
        return self._leased.get(gpu_uuid, 0)

    def view(self, gpu_uuid: str) -> GpuView:
        acct = self._gpu(gpu_uuid)
        total = acct.facts.total_bytes
        leased = self._leased.get(gpu_uuid, 0)
        revoking = self._revoking.get(gpu_uuid, 0)
        settling = self._settling.get(gpu_uuid, 0)
        raw_local = max(acct.reserved, acct.local_used)
        local = min(raw_local, max(0, total - leased))
        lendable = max(0, total - acct.headroom_nominal - raw_local - leased - settling)
        lendable -= lendable % self.granularity
        headroom = total - leased - local - lendable
        return GpuView(gpu_uuid, acct.facts.index, total, acct.local_used, acct.reserved, local, leased, lendable,
                       headroom, revoking, settling)

    def lendable(self, gpu_uuid: str) -> int:
        """`view(gpu_uuid).lendable`, without building the view (the Acquire hot path)."""
        acct = self.gpus[gpu_uuid]
        free = (acct.facts.total_bytes - acct.headroom_nominal - max(acct.reserved, acct.local_used)
                - self._leased.get(gpu_uuid, 0) - self._settling.get(gpu_uuid, 0))
        return max(0, free - free % self.granularity)

    def views(self) -> list[GpuView]:
        return [self.view(u) for u in sorted(self.gpus, key=lambda u: self.gpus[u].facts.index)]

    def largest_grantable(self, candidates: Iterable[str] | None = None) -> int:
        return max((self.view(u).lendable for u in (candidates if candidates is not None else self.gpus)), default=0)

    # --- calls ----------------------------------------------------------------------

    def acquire(
        self,
        *,
        size: int,
        holder: str,
        kind: Kind = Kind.RESERVATION,
        gpu_uuid: str = "",
        near_gpu_uuid: str = "",
        ttl_ms: int = 0,
        priority: int = 0,
        idempotency_key: str = "",
        pod: str = "",
        key_scopes: Sequence[str] = ("",),
    ) -> tuple[Lease, str]:
        """Grant `size` bytes (rounded up to the granularity). Returns (lease, token).

        An idempotency key belongs to the caller that used it: `key_scopes[0]` is the caller's
        identity (the scope a new lease's key is recorded under); a retry finds the lease only
        under one of `key_scopes`, so no caller can reach another's lease (or token) by its key.
        The same key with a different request (size, holder, kind, GPU, TTL, priority or pod)
        is FAILED_PRECONDITION."""
        if not holder.strip():
            raise PoolError("INVALID_ARGUMENT", "holder is required: name who asks (tenant, pod or component)")
        if kind not in (Kind.RESERVATION, Kind.ELASTIC):
            raise PoolError("INVALID_ARGUMENT", "kind must be RESERVATION or ELASTIC")
        if size <= 0:
            raise PoolError("INVALID_ARGUMENT", f"size must be at least 1 byte, got {size}")
        if ttl_ms < 0 or ttl_ms > MAX_TTL_MS:
            raise PoolError("INVALID_ARGUMENT", f"ttl must be between 0 (the default, {self.default_ttl_ms} ms) and "
                            f"{MAX_TTL_MS // 86_400_000} days, got {ttl_ms} ms")
        if gpu_uuid and near_gpu_uuid:
            raise PoolError("INVALID_ARGUMENT", "set gpu_uuid (lend from this GPU) or near_gpu_uuid (lend from the "
                            "best GPU near this one), not both")
        for u in (gpu_uuid, near_gpu_uuid):
            if u:
                self._gpu(u)
        nbytes = round_up(size, self.granularity)
        fingerprint = request_fingerprint(holder, int(kind), nbytes, gpu_uuid, near_gpu_uuid, ttl_ms, priority, pod)
        if idempotency_key:
            prior = self._keyed(idempotency_key, key_scopes)
            if prior is not None and prior.live:
                same = (prior.key_fingerprint == fingerprint if prior.key_fingerprint else
                        (prior.holder, prior.kind, prior.bytes) == (holder, kind, nbytes)
                        and (not gpu_uuid or gpu_uuid == prior.gpu_uuid))
                if not same:
                    raise PoolError("FAILED_PRECONDITION", f"this idempotency key already names lease {prior.id} "
                                    f"({prior.holder}, {Kind(prior.kind).name}, {format_bytes(prior.bytes)} on "
                                    f"{prior.gpu_uuid}), made by a different request (size, holder, kind, GPU, TTL, "
                                    "priority or pod differ); retry with the same request, or use a new key")
                return prior.snapshot(), self.token_for(prior.id)
        if gpu_uuid:
            candidates = [gpu_uuid]
            biggest = self.gpus[gpu_uuid].facts.total_bytes
            where = f"GPU {gpu_uuid}"
        else:
            candidates = [u for u in self.gpus if u != near_gpu_uuid]
            biggest = max((self.gpus[u].facts.total_bytes for u in candidates), default=0)
            where = f"any GPU near {near_gpu_uuid}" if near_gpu_uuid else "any GPU of this node"
        if nbytes > biggest:
            raise PoolError("INVALID_ARGUMENT", f"size {format_bytes(nbytes)} is more than the total memory of "
                            f"{where} ({format_bytes(biggest)}); ask for less")
        lendable = {u: self.lendable(u) for u in candidates}
        fits = [u for u in candidates if lendable[u] >= nbytes]
        if not fits:
            largest = max(lendable.values(), default=0)
            raise PoolError("RESOURCE_EXHAUSTED", f"no room for {format_bytes(nbytes)} on {where}: the largest lease "
                            f"that can be granted now is {format_bytes(largest)} ({largest} bytes)", largest=largest)
        chosen = self._place(fits, near_gpu_uuid, lendable)
        now = self.clock_ms()
        ttl = ttl_ms or self.default_ttl_ms
        lease_id = self._new_id()
        while lease_id in self.leases:
            lease_id = self._new_id()
        token = self.token_for(lease_id)
        self._seq += 1
        lease = Lease(id=lease_id, holder=holder, kind=Kind(kind), gpu_uuid=chosen, bytes=nbytes, priority=priority,
                      state=State.RESERVED, created_at_ms=now, expires_at_ms=now + ttl, ttl_ms=ttl,
                      token_hash=hash_token(token), node_name=self.node_name, idempotency_key=idempotency_key,
                      pod=pod, seq=self._seq, key_scope=key_scopes[0] if idempotency_key else "",
                      key_fingerprint=fingerprint if idempotency_key else "")
        self._add(lease)
        if idempotency_key:
            self._by_key[(lease.key_scope, idempotency_key)] = lease_id
        self._emit_lease(lease)
        self._emit_capacity(chosen)
        return lease.snapshot(), token

    def _keyed(self, key: str, scopes: Sequence[str]) -> Lease | None:
        for scope in scopes:
            lease_id = self._by_key.get((scope, key))
            if lease_id is not None:
                return self.leases.get(lease_id)
        return None

    def _place(self, fits: Sequence[str], near: str, lendable: dict[str, int]) -> str:
        """NVLink peers of the borrower GPU first (more links first), then the most lendable."""

        def key(u: str) -> tuple[int, int, int, int]:
            link = self.links.get(frozenset((u, near))) if near else None
            nvlink = bool(link and link.nvlink)
            return (0 if nvlink else 1, -(link.nvlink_count if link else 0), -lendable[u], self.gpus[u].facts.index)

        return min(fits, key=key)

    def renew(self, lease_id: str, token: str, ttl_ms: int = 0) -> Lease:
        lease = self._authorized(lease_id, token)
        if ttl_ms < 0 or ttl_ms > MAX_TTL_MS:
            raise PoolError("INVALID_ARGUMENT", f"ttl must be between 0 (the lease's own) and "
                            f"{MAX_TTL_MS // 86_400_000} days, got {ttl_ms} ms")
        if lease.state == State.REVOKING:
            left = max(0, lease.revoke_deadline_ms - self.clock_ms())
            raise PoolError("FAILED_PRECONDITION", f"lease {lease_id} is REVOKING (deadline in {left} ms): "
                            "release it, it cannot be renewed")
        if not lease.live:
            raise PoolError("FAILED_PRECONDITION", f"lease {lease_id} is {lease.state.name}: it cannot be renewed; "
                            "acquire a new lease")
        if ttl_ms:
            lease.ttl_ms = ttl_ms
        lease.expires_at_ms = self.clock_ms() + lease.ttl_ms
        self._emit_lease(lease)
        return lease.snapshot()

    def release(self, lease_id: str, token: str) -> Lease:
        lease = self._authorized(lease_id, token)
        if lease.live:
            was_revoking = lease.state == State.REVOKING
            self._end(lease, State.RELEASED, "released by the holder before the revoke deadline" if was_revoking
                      else "released by the holder")
        return lease.snapshot()

    def claim(self, lease_id: str, token: str, holder: str = "", pod: str = "") -> Lease:
        lease = self._authorized(lease_id, token)
        if lease.state not in (State.RESERVED, State.ACTIVE):
            raise PoolError("FAILED_PRECONDITION", f"lease {lease_id} is {lease.state.name}: only a RESERVED or "
                            "ACTIVE lease can be claimed")
        lease.state = State.ACTIVE
        if holder.strip():
            lease.holder = holder
        if pod:
            lease.pod = pod
        self._emit_lease(lease)
        return lease.snapshot()

    def set_pid(self, lease_id: str, token: str, pid: int) -> Lease:
        lease = self._authorized(lease_id, token)
        if not lease.live:
            raise PoolError("FAILED_PRECONDITION", f"lease {lease_id} is {lease.state.name}: nothing to attach to")
        if lease.pid != pid:
            lease.pid = pid
            if pid:
                self._attached.add(lease.id)
            else:
                self._attached.discard(lease.id)
            self._emit_lease(lease)
        return lease.snapshot()

    def clear_pid(self, lease_id: str, pid: int) -> None:
        lease = self.leases.get(lease_id)
        if lease is not None and lease.pid == pid:
            lease.pid = 0
            self._attached.discard(lease.id)
            self._emit_lease(lease)

    def list_leases(self, holder: str = "", include_ended: bool = False, gpu_uuid: str = "") -> list[Lease]:
        if gpu_uuid:
            self._gpu(gpu_uuid)
        out = [x.snapshot() for x in (self.leases if include_ended else self.live).values()
               if (not holder or x.holder == holder)
               and (not gpu_uuid or x.gpu_uuid == gpu_uuid)]
        return sorted(out, key=lambda x: (x.created_at_ms, x.seq))

    def list_page(self, *, holder: str = "", include_ended: bool = False, gpu_uuid: str = "", after_seq: int = 0,
                  limit: int = 500) -> tuple[list[Lease], int]:
        """One page of `list_leases` in creation order: up to `limit` leases created after
        `after_seq`, and the cursor of the next page (0 on the last one)."""
        if gpu_uuid:
            self._gpu(gpu_uuid)
        source = self.leases if include_ended else self.live
        picked = heapq.nsmallest(limit + 1, (x for x in source.values() if x.seq > after_seq
                                             and (not holder or x.holder == holder)
                                             and (not gpu_uuid or x.gpu_uuid == gpu_uuid)),
                                 key=lambda x: x.seq)
        more = len(picked) > limit
        page = [x.snapshot() for x in picked[:limit]]
        return page, (page[-1].seq if more and page else 0)

    def get(self, lease_id: str, token: str) -> Lease:
        return self._authorized(lease_id, token).snapshot()

    def reclaim(self, gpu_uuid: str, size: int, reason: str = "", deadline_ms: int = 0) -> list[Lease]:
        """Explicit reclaim: move leases on the GPU worth at least `size` bytes to REVOKING
        (leases already REVOKING count). Returns the leases now revoking because of it."""
        self._gpu(gpu_uuid)
        if size <= 0:
            raise PoolError("INVALID_ARGUMENT", f"reclaim size must be at least 1 byte, got {size}")
        if deadline_ms < 0 or deadline_ms > MAX_TTL_MS:
            raise PoolError("INVALID_ARGUMENT", f"deadline must be 0 (the default, {self.default_revoke_ms} ms) or a "
                            f"positive grace period, got {deadline_ms} ms")
        return self._revoke(gpu_uuid, size, reason or "reclaim requested", deadline_ms or self.default_revoke_ms)

    def revoke_deadline_for(self, nbytes: int, deadline_ms: int) -> int:
        """The grace a lease of `nbytes` gets: at least `deadline_ms`, and at least the time its
        borrower needs to copy it to host memory at the drain rate."""
        if self.drain_bytes_per_s <= 0:
            return deadline_ms
        return max(deadline_ms, -(-nbytes * 1000 // self.drain_bytes_per_s))

    def _reclaim_growth(self, gpu_uuid: str) -> list[Lease]:
        acct = self.gpus[gpu_uuid]
        v = self.view(gpu_uuid)
        deficit = max(acct.reserved, acct.local_used) + v.leased + acct.headroom_nominal - v.total
        if deficit <= 0:
            return []
        return self._revoke(gpu_uuid, deficit, "the lender GPU's own tenant needs its memory back",
                            self.default_revoke_ms, trigger="local_growth")

    def _revoke(self, gpu_uuid: str, size: int, reason: str, deadline_ms: int, trigger: str = "api") -> list[Lease]:
        now = self.clock_ms()
        live = list(self._live_gpu.get(gpu_uuid, {}).values())
        wanted = size - sum(x.bytes for x in live if x.state == State.REVOKING)
        victims: list[Lease] = []
        for x in victim_order(y for y in live if y.state != State.REVOKING):
            if wanted <= 0:
                break
            x.state = State.REVOKING
            self._revoking[gpu_uuid] = self._revoking.get(gpu_uuid, 0) + x.bytes
            x.revoke_deadline_ms = now + self.revoke_deadline_for(x.bytes, deadline_ms)
            x.reason = reason
            wanted -= x.bytes
            victims.append(x)
            self._emit_lease(x, reclaim_ms=now)
        self.reclaims.append((trigger, now))
        if victims:
            self._emit_capacity(gpu_uuid)
        return [x.snapshot() for x in victims]

    # --- time -----------------------------------------------------------------------

    def tick(self) -> int | None:
        """Expire leases whose TTL ran out, revoke those past their deadline, forget old ended
        ones. Returns when the next thing is due (ms), or None."""
        now = self.clock_ms()
        due: int | None = None
        for lease in list(self.live.values()):
            if lease.state == State.REVOKING and lease.revoke_deadline_ms <= now:
                self._end(lease, State.REVOKED, f"{lease.reason}; not released by the revoke deadline")
                continue
            if lease.expires_at_ms <= now:
                self._end(lease, State.EXPIRED, f"TTL of {lease.ttl_ms} ms ran out without a renew")
                continue
            nxt = lease.expires_at_ms
            if lease.state == State.REVOKING:
                nxt = min(nxt, lease.revoke_deadline_ms)
            due = nxt if due is None else min(due, nxt)
        while self._ended:
            lease = self.leases[next(iter(self._ended))]
            if lease.ended_at_ms + self.retention_ms > now:
                nxt = lease.ended_at_ms + self.retention_ms
                due = nxt if due is None else min(due, nxt)
                break
            self._forget(lease)
        return due

    def _forget(self, lease: Lease) -> None:
        if lease.id in self.settling:
            self._unsettle(self.settling[lease.id])
        del self.leases[lease.id]
        self._ended.pop(lease.id, None)
        if self._by_key.get((lease.key_scope, lease.idempotency_key)) == lease.id:
            del self._by_key[(lease.key_scope, lease.idempotency_key)]
        self._events.append(Event("forget", lease=lease.snapshot(), time_ms=self.clock_ms()))

    def _add(self, lease: Lease) -> None:
        self.leases[lease.id] = lease
        if lease.live:
            self.live[lease.id] = lease
            self._live_gpu.setdefault(lease.gpu_uuid, {})[lease.id] = lease
            self._leased[lease.gpu_uuid] = self._leased.get(lease.gpu_uuid, 0) + lease.bytes
            if lease.state == State.REVOKING:
                self._revoking[lease.gpu_uuid] = self._revoking.get(lease.gpu_uuid, 0) + lease.bytes
        else:
            self._ended[lease.id] = None

    # --- restore --------------------------------------------------------------------

    def restore(self, leases: Iterable[Lease]) -> None:
        """Load leases from the store (restart). Live leases whose GPU is gone expire."""
        for lease in sorted(leases, key=lambda x: (x.ended_at_ms, x.seq)):
            self._add(lease)
            self._seq = max(self._seq, lease.seq)
            if lease.idempotency_key:
                self._by_key[(lease.key_scope, lease.idempotency_key)] = lease.id
            if lease.live and lease.gpu_uuid not in self.gpus:
                self._end(lease, State.EXPIRED, "its GPU is no longer on this node")
            elif lease.pid:
                lease.pid = 0  # attach connections do not survive a restart: the borrower re-attaches
                self._emit_lease(lease)

    # --- plumbing -------------------------------------------------------------------

    def token_for(self, lease_id: str) -> str:
        """The lease's secret: HMAC of its id under the agent's key (kept in the state
        directory, mode 0600), so a retried Acquire can return it again while only its hash
        is stored."""
        return hmac.new(self._key, lease_id.encode(), hashlib.sha256).hexdigest()

    def _authorized(self, lease_id: str, token: str) -> Lease:
        if not lease_id:
            raise PoolError("INVALID_ARGUMENT", "lease_id is required")
        lease = self.leases.get(lease_id)
        if lease is None:
            raise PoolError("NOT_FOUND", f"no lease {lease_id!r} on node {self.node_name} (it may have ended more "
                            f"than {self.retention_ms // 1000} s ago); list leases with `spillway lease list`")
        if not token:
            raise PoolError("PERMISSION_DENIED", f"lease {lease_id} needs its token (returned by Acquire)")
        if not hmac.compare_digest(hash_token(token), lease.token_hash):
            raise PoolError("PERMISSION_DENIED", f"wrong token for lease {lease_id}: present the token that "
                            "Acquire returned")
        return lease

    def _gpu(self, gpu_uuid: str) -> GpuAccount:
        acct = self.gpus.get(gpu_uuid)
        if acct is None:
            known = ", ".join(f"{a.facts.index}:{u}" for u, a in sorted(self.gpus.items(),
                                                                          key=lambda kv: kv[1].facts.index))
            raise PoolError("NOT_FOUND", f"no GPU {gpu_uuid!r} on node {self.node_name}; its GPUs are {known}")
        return acct

    def _end(self, lease: Lease, state: State, reason: str) -> None:
        if self.live.pop(lease.id, None) is not None:
            self._attached.discard(lease.id)
            self._live_gpu[lease.gpu_uuid].pop(lease.id, None)
            self._leased[lease.gpu_uuid] -= lease.bytes
            if lease.state == State.REVOKING:
                self._revoking[lease.gpu_uuid] -= lease.bytes
            held = _process_bytes(self.inventory, lease.gpu_uuid, lease.pid) if lease.pid else 0
            if held:  # the borrower's process holds memory on the lender: wait for NVML to see it go
                self.settling[lease.id] = Settling(lease, lease.pid, held, self.clock_ms())
                self._settling[lease.gpu_uuid] = self._settling.get(lease.gpu_uuid, 0) + lease.bytes
        self._ended[lease.id] = None
        lease.state = state
        lease.reason = reason
        lease.ended_at_ms = self.clock_ms()
        self._emit_lease(lease)
        if lease.gpu_uuid in self.gpus:
            self._emit_capacity(lease.gpu_uuid)
        while len(self._ended) > self.max_ended:
            self._forget(self.leases[next(iter(self._ended))])

    def _emit_lease(self, lease: Lease, reclaim_ms: int = 0) -> None:
        self._events.append(Event("lease", lease=lease.snapshot(), time_ms=self.clock_ms(), reclaim_ms=reclaim_ms))

    def _emit_capacity(self, gpu_uuid: str) -> None:
        self._events.append(Event("capacity", gpu_uuid=gpu_uuid, time_ms=self.clock_ms()))

    def drain(self) -> list[Event]:
        out, self._events = self._events, []
        return out

    def drain_reclaims(self) -> list[tuple[str, int]]:
        out, self.reclaims = self.reclaims, []
        return out

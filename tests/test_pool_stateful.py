"""Hypothesis state machine over the pool and its SQLite store: random Acquire, Renew,
Release, Claim, Reclaim, local growth, expiry (the injected clock moves) and restart (the
store is reopened), checking after every step that no byte is granted twice and that per
GPU `leased + lendable + headroom + local == total`."""

from __future__ import annotations

import dataclasses
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from spillway.agent.inventory import GpuFacts, InventoryFacts, LinkFacts
from spillway.agent.pool import LIVE, Kind, Pool, PoolError, State
from spillway.agent.store import Store

GiB = 1 << 30
MiB = 1 << 20
KEY = b"k" * 32


def facts(used: dict[str, int] | None = None) -> InventoryFacts:
    used = used or {}
    sizes = [16 * GiB, 16 * GiB, 24 * GiB, 40 * GiB]
    gpus = tuple(GpuFacts(f"GPU-{i}", i, "Test GPU", s, used.get(f"GPU-{i}", 0)) for i, s in enumerate(sizes))
    links = tuple(LinkFacts(f"GPU-{a}", f"GPU-{b}", (a // 2) == (b // 2), 4 if (a // 2) == (b // 2) else 0)
                  for a in range(4) for b in range(a + 1, 4))
    return InventoryFacts("node-h", "simulated", True, gpus, links)


class PoolMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.dir = Path(tempfile.mkdtemp(prefix="spw-pool-"))
        self.now = 1_000_000
        self.used: dict[str, int] = {}
        self.tokens: dict[str, str] = {}
        self.store = Store(self.dir / "leases.db")
        self.pool = self._new_pool()
        self.granted: list[tuple[str, int]] = []

    def _new_pool(self) -> Pool:
        counter = iter(range(10**9))
        base = len(getattr(self, "tokens", {}))
        return Pool(facts(self.used), clock_ms=lambda: self.now, key=KEY, retention_ms=20_000, max_ended=6,
                    new_id=lambda: f"l-{base}-{next(counter)}")

    def _commit(self) -> None:
        reserved = {u: a.reserved for u, a in self.pool.gpus.items()}
        self.store.apply(self.pool.drain(), reserved)
        self.pool.drain_reclaims()

    @initialize()
    def start(self) -> None:
        self._commit()

    def teardown(self) -> None:
        self.store.close()

    # --- rules ------------------------------------------------------------------------

    @rule(size_mi=st.integers(1, 30 * 1024), kind=st.sampled_from([Kind.RESERVATION, Kind.ELASTIC]),
          where=st.sampled_from(["", "gpu", "near"]), gpu=st.integers(0, 3), ttl=st.integers(0, 5000),
          priority=st.integers(0, 3), key=st.sampled_from(["", "", "k1", "k2"]))
    def acquire(self, size_mi: int, kind: Kind, where: str, gpu: int, ttl: int, priority: int, key: str) -> None:
        before = {u: self.pool.view(u) for u in self.pool.gpus}
        prior = key and self.pool._by_key.get(("", key))  # keys are scoped to their caller ("" here)
        try:
            lease, token = self.pool.acquire(size=size_mi * MiB, holder="h", kind=kind,
                                             gpu_uuid=f"GPU-{gpu}" if where == "gpu" else "",
                                             near_gpu_uuid=f"GPU-{gpu}" if where == "near" else "",
                                             ttl_ms=ttl, priority=priority, idempotency_key=key)
        except PoolError as exc:
            assert exc.code in ("RESOURCE_EXHAUSTED", "INVALID_ARGUMENT", "FAILED_PRECONDITION")
            assert self.pool.drain() == [], "a rejected call changes nothing"
            if exc.code == "RESOURCE_EXHAUSTED":
                assert exc.largest is not None and exc.largest < -(-size_mi * MiB // (64 * MiB)) * 64 * MiB
            return
        assert token == self.pool.token_for(lease.id)
        if prior and prior == lease.id:
            return  # idempotent retry: nothing new granted
        assert lease.bytes % (64 * MiB) == 0 and lease.bytes >= size_mi * MiB
        assert before[lease.gpu_uuid].lendable >= lease.bytes, "granted only from lendable memory"
        if where == "near":
            assert lease.gpu_uuid != f"GPU-{gpu}"
        self.tokens[lease.id] = token
        self._commit()

    def _some_lease(self, idx: int) -> str | None:
        ids = sorted(self.pool.leases)
        return ids[idx % len(ids)] if ids else None

    @rule(idx=st.integers(0, 1000), good=st.booleans(), ttl=st.integers(0, 5000))
    def renew(self, idx: int, good: bool, ttl: int) -> None:
        lid = self._some_lease(idx)
        if lid is None:
            return
        token = self.tokens[lid] if good else "bad"
        try:
            x = self.pool.renew(lid, token, ttl)
            assert good and x.expires_at_ms == self.now + x.ttl_ms
        except PoolError as exc:
            assert exc.code == ("PERMISSION_DENIED" if not good else "FAILED_PRECONDITION")
            assert self.pool.drain() == []
        self._commit()

    @rule(idx=st.integers(0, 1000), good=st.booleans())
    def release(self, idx: int, good: bool) -> None:
        lid = self._some_lease(idx)
        if lid is None:
            return
        try:
            x = self.pool.release(lid, self.tokens[lid] if good else "")
            assert good and x.state in (State.RELEASED, State.EXPIRED, State.REVOKED)
        except PoolError as exc:
            assert not good and exc.code == "PERMISSION_DENIED"
        self._commit()

    @rule(idx=st.integers(0, 1000))
    def claim(self, idx: int) -> None:
        lid = self._some_lease(idx)
        if lid is None:
            return
        try:
            x = self.pool.claim(lid, self.tokens[lid], pod="ns/p")
            assert x.state == State.ACTIVE
        except PoolError as exc:
            assert exc.code == "FAILED_PRECONDITION"
        self._commit()

    @rule(idx=st.integers(0, 1000), pid=st.integers(0, 3), detach=st.booleans())
    def attach(self, idx: int, pid: int, detach: bool) -> None:
        """A borrower process attaches to (or lets go of) a lease."""
        lid = self._some_lease(idx)
        if lid is None:
            return
        if detach:
            self.pool.clear_pid(lid, pid)
        else:
            try:
                self.pool.set_pid(lid, self.tokens[lid], 1000 + pid)
            except PoolError as exc:
                assert exc.code == "FAILED_PRECONDITION"
        self._commit()

    @rule(gpu=st.integers(0, 3), size_mi=st.integers(1, 20 * 1024), deadline=st.integers(0, 3000))
    def reclaim(self, gpu: int, size_mi: int, deadline: int) -> None:
        u = f"GPU-{gpu}"
        live_before = [x for x in self.pool.leases.values() if x.gpu_uuid == u and x.live]
        victims = self.pool.reclaim(u, size_mi * MiB, "test", deadline)
        revoking = sum(x.bytes for x in self.pool.leases.values() if x.gpu_uuid == u and x.state == State.REVOKING)
        assert revoking >= min(size_mi * MiB, sum(x.bytes for x in live_before))
        for v in victims:
            assert v.state == State.REVOKING
            assert v.revoke_deadline_ms == self.now + self.pool.revoke_deadline_for(v.bytes, deadline or 5000)
        self._commit()

    @rule(gpu=st.integers(0, 3), used_gi=st.integers(0, 16), reserved=st.booleans())
    def local_grows(self, gpu: int, used_gi: int, reserved: bool) -> None:
        u = f"GPU-{gpu}"
        if reserved:
            self.pool.set_reserved(u, used_gi * GiB)
        else:
            self.used[u] = used_gi * GiB
            self.pool.update_inventory(facts(self.used))
        acct = self.pool.gpus[u]
        v = self.pool.view(u)
        need = max(acct.reserved, acct.local_used) + acct.headroom_nominal + v.leased - v.total
        if need > 0:
            assert v.revoking >= min(need, v.leased), "local growth into leased memory reclaims"
        self._commit()

    @rule(ms=st.integers(1, 6000))
    def time_passes(self, ms: int) -> None:
        self.now += ms
        due = self.pool.tick()
        for x in self.pool.leases.values():
            if x.live:
                assert x.expires_at_ms > self.now
                assert x.state != State.REVOKING or x.revoke_deadline_ms > self.now
            else:
                assert x.ended_at_ms + 20_000 > self.now, "ended leases are forgotten after the retention"
        if due is not None:
            assert due > self.now
        self._commit()

    @rule()
    def restart(self) -> None:
        before = {k: dataclasses.asdict(v) for k, v in self.pool.leases.items()}
        for v in before.values():  # attach connections do not survive a restart: leases come back detached
            v["pid"] = 0
        reserved = {u: a.reserved for u, a in self.pool.gpus.items()}
        self.store.close()
        self.store = Store(self.dir / "leases.db")
        self.pool = self._new_pool()
        leases, stored_reserved = self.store.load()
        self.pool.restore_reserved(stored_reserved)
        self.pool.restore(leases)
        after = {k: dataclasses.asdict(v) for k, v in self.pool.leases.items()}
        assert after == before, "the store gives back exactly the lease table"
        assert {u: a.reserved for u, a in self.pool.gpus.items()} == reserved
        self._commit()

    @rule()
    def wrong_calls_change_nothing(self) -> None:
        before = {k: dataclasses.asdict(v) for k, v in self.pool.leases.items()}
        for call in (lambda: self.pool.renew("l-missing", "x"), lambda: self.pool.release("l-missing", "x"),
                     lambda: self.pool.acquire(size=1, holder="h", gpu_uuid="GPU-9"),
                     lambda: self.pool.acquire(size=10**15, holder="h")):
            try:
                call()
                raise AssertionError("should have been rejected")
            except PoolError:
                pass
        assert {k: dataclasses.asdict(v) for k, v in self.pool.leases.items()} == before
        assert self.pool.drain() == []

    # --- invariants -------------------------------------------------------------------

    @invariant()
    def accounting_adds_up(self) -> None:
        for u in self.pool.gpus:
            v = self.pool.view(u)
            assert v.leased + v.lendable + v.headroom + v.local == v.total
            assert self.pool.lendable(u) == v.lendable
            assert v.lendable >= 0 and v.headroom >= 0 and v.local >= 0
            live = sum(x.bytes for x in self.pool.leases.values() if x.gpu_uuid == u and x.state in LIVE)
            assert v.leased == live
            assert v.revoking == sum(x.bytes for x in self.pool.leases.values()
                                     if x.gpu_uuid == u and x.state == State.REVOKING)
            acct = self.pool.gpus[u]
            if v.revoking == 0:
                # without a reclaim in flight, leases never reach into the GPU's own memory or the
                # nominal headroom: nothing is granted twice
                local = max(acct.reserved, acct.local_used)
                assert v.leased == 0 or v.leased <= v.total - acct.headroom_nominal - local
                assert v.headroom >= min(acct.headroom_nominal, v.total - local)

    @invariant()
    def indexes_consistent(self) -> None:
        assert set(self.pool.live) == {k for k, v in self.pool.leases.items() if v.state in LIVE}
        assert len(self.pool.leases) - len(self.pool.live) <= 6, "ended leases are forgotten beyond the cap"
        every: dict[str, set[int]] = {}  # the borrower PIDs by brute force (the pool keeps an index)
        for x in self.pool.live.values():
            if x.pid:
                every.setdefault(x.gpu_uuid, set()).add(x.pid)
        for rec in self.pool.settling.values():
            every.setdefault(rec.lease.gpu_uuid, set()).add(rec.pid)
        assert self.pool.borrower_pids() == every

    @invariant()
    def store_matches_memory(self) -> None:
        leases, _ = self.store.load()
        assert {x.id: dataclasses.asdict(x) for x in leases} == {
            k: dataclasses.asdict(v) for k, v in self.pool.leases.items()}


PoolMachine.TestCase.settings = settings(max_examples=60, stateful_step_count=50, deadline=None,
                                         suppress_health_check=[HealthCheck.too_slow])
TestPoolStateful = PoolMachine.TestCase

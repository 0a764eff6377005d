"""An ended lease's bytes come back only when NVML shows its borrower let go of them, and a
revoked lease gets the time its borrower needs to copy it out. The pool on its own (injected
clock, facts as NVML would report them): a lender whose own tenant is another process."""

from __future__ import annotations

from spillway.agent.inventory import GpuFacts, InventoryFacts, ProcessFacts
from spillway.agent.pool import CONTEXT_ALLOWANCE, Kind, Pool

GiB = 1 << 30
TOTAL = 80 * GiB
BORROWER = 4242
TENANT = 77


class Clock:
    def __init__(self) -> None:
        self.ms = 1_000_000

    def __call__(self) -> int:
        return self.ms


def facts(procs: dict[int, int]) -> InventoryFacts:
    used = sum(procs.values())
    gpu = GpuFacts("GPU-L", 0, "Test GPU", TOTAL, used, processes=tuple(ProcessFacts(p, b) for p, b in procs.items()))
    return InventoryFacts("node-s", "nvml", False, (gpu,), ())


def adds_up(pool: Pool) -> None:
    v = pool.view("GPU-L")
    assert sum(x.bytes for x in pool.live.values()) + v.lendable + v.headroom + v.local == v.total


def test_released_bytes_wait_for_the_borrower_process_to_free_them() -> None:
    clock = Clock()
    procs = {TENANT: 10 * GiB}
    pool = Pool(facts(procs), clock_ms=clock, key=b"k" * 32, granularity=GiB)
    lendable0 = pool.view("GPU-L").lendable
    lease, token = pool.acquire(size=16 * GiB, holder="llm", kind=Kind.ELASTIC, gpu_uuid="GPU-L")
    pool.set_pid(lease.id, token, BORROWER)
    procs[BORROWER] = 16 * GiB + CONTEXT_ALLOWANCE // 2  # the arena and a CUDA context
    pool.update_inventory(facts(procs))
    assert pool.view("GPU-L").local_used == 10 * GiB  # the borrower is not the GPU's own use
    assert pool.view("GPU-L").lendable == lendable0 - 16 * GiB

    pool.release(lease.id, token)  # the borrower still holds its arena (torch's cache, say)
    v = pool.view("GPU-L")
    assert v.settling == 16 * GiB and v.lendable == lendable0 - 16 * GiB, "released bytes lent again while held"
    assert BORROWER in pool.borrower_pids()["GPU-L"]
    adds_up(pool)
    clock.ms += 2_000
    pool.update_inventory(facts(procs))  # NVML: still held
    assert pool.view("GPU-L").settling == 16 * GiB
    assert pool.view("GPU-L").local_used == 10 * GiB  # and not mistaken for the tenant's growth
    assert not any(x.state.name == "REVOKING" for x in pool.live.values())
    adds_up(pool)

    procs[BORROWER] = CONTEXT_ALLOWANCE // 2  # the arena went back to the driver; the context stays
    pool.update_inventory(facts(procs))
    v = pool.view("GPU-L")
    assert v.settling == 0 and v.lendable == lendable0 - GiB  # (the context now counts as the GPU's own use)
    assert pool.overdue() == []
    adds_up(pool)


def test_a_borrower_that_never_lets_go_is_reported_and_its_memory_counts_as_used() -> None:
    clock = Clock()
    procs = {TENANT: 10 * GiB}
    pool = Pool(facts(procs), clock_ms=clock, key=b"k" * 32, granularity=GiB, settle_timeout_ms=15_000)
    lease, token = pool.acquire(size=8 * GiB, holder="stuck", kind=Kind.ELASTIC, gpu_uuid="GPU-L", pod="ns/p")
    pool.set_pid(lease.id, token, BORROWER)
    procs[BORROWER] = 8 * GiB
    pool.update_inventory(facts(procs))
    pool.release(lease.id, token)
    pool.drain()
    clock.ms += 14_000
    pool.update_inventory(facts(procs))
    assert pool.overdue() == [] and pool.view("GPU-L").settling == 8 * GiB
    clock.ms += 2_000
    pool.update_inventory(facts(procs))
    [rec] = pool.overdue()
    assert rec.pid == BORROWER and rec.lease.id == lease.id
    assert f"pid {BORROWER}" in pool.leases[lease.id].reason
    assert any(e.lease is not None and e.lease.id == lease.id for e in pool.drain())  # watchers see the reason
    v = pool.view("GPU-L")
    assert v.settling == 0
    # the next refresh counts the stuck memory as the GPU's own: still not lendable
    pool.update_inventory(facts(procs))
    assert pool.view("GPU-L").local_used == 18 * GiB
    adds_up(pool)


def test_a_borrower_that_exits_settles_at_once_and_one_that_held_nothing_never_waits() -> None:
    clock = Clock()
    procs: dict[int, int] = {}
    pool = Pool(facts(procs), clock_ms=clock, key=b"k" * 32, granularity=GiB)
    lendable0 = pool.view("GPU-L").lendable
    a, ta = pool.acquire(size=4 * GiB, holder="a", gpu_uuid="GPU-L")
    pool.set_pid(a.id, ta, BORROWER)
    pool.release(a.id, ta)  # NVML never listed the process on the lender: nothing to wait for
    assert pool.view("GPU-L").settling == 0 and pool.view("GPU-L").lendable == lendable0
    b, tb = pool.acquire(size=4 * GiB, holder="b", gpu_uuid="GPU-L")
    pool.set_pid(b.id, tb, BORROWER + 1)
    procs[BORROWER + 1] = 4 * GiB
    pool.update_inventory(facts(procs))
    pool.release(b.id, tb)
    assert pool.view("GPU-L").settling == 4 * GiB
    del procs[BORROWER + 1]  # the process is gone
    pool.update_inventory(facts(procs))
    assert pool.view("GPU-L").settling == 0 and pool.view("GPU-L").lendable == lendable0


def test_revoke_deadlines_grow_with_the_lease() -> None:
    clock = Clock()
    pool = Pool(facts({}), clock_ms=clock, key=b"k" * 32, granularity=GiB, default_revoke_ms=5_000,
                drain_bytes_per_s=4 * GiB)
    small, _ = pool.acquire(size=2 * GiB, holder="s", kind=Kind.ELASTIC, gpu_uuid="GPU-L")
    big, _ = pool.acquire(size=40 * GiB, holder="b", kind=Kind.ELASTIC, gpu_uuid="GPU-L")
    revoked = {x.id: x for x in pool.reclaim("GPU-L", 60 * GiB)}
    assert revoked[small.id].revoke_deadline_ms - clock.ms == 5_000
    assert revoked[big.id].revoke_deadline_ms - clock.ms == 10_000  # 40 GiB at 4 GiB/s
    assert pool.revoke_deadline_for(40 * GiB, 20_000) == 20_000
    off = Pool(facts({}), clock_ms=clock, key=b"k" * 32, drain_bytes_per_s=0)
    assert off.revoke_deadline_for(400 * GiB, 5_000) == 5_000

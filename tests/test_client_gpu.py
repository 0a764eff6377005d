"""spillway.client with blocks on a real GPU. Skipped only when no NVIDIA GPU is present.

The lender is cuda:1 when there are two GPUs, else cuda:0 (the borrower's own GPU): the data
path is the same code either way. One test runs the agent on its nvml backend and checks that
the agent sees the borrower's memory on the lender GPU."""

from __future__ import annotations

import asyncio
import hashlib
import os
import sys
import time
from pathlib import Path

import pytest
import torch

from spillway.api.v1 import agent_pb2
from spillway.client import OutOfPeerMemory, PeerMemory
from spillway.testing.agentproc import AgentProcess

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no NVIDIA GPU present"),
]

BORROWER = torch.device("cuda", 0)


def lender() -> torch.device:
    return torch.device("cuda", 1 if torch.cuda.device_count() > 1 else 0)


def digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()).hexdigest()


def first_gpu(agent: AgentProcess) -> str:
    async def go() -> str:
        async with agent.client() as c:
            return str((await c.inventory()).gpus[0].uuid)

    return asyncio.run(go())


def lease_of(agent: AgentProcess, lease_id: str) -> agent_pb2.Lease:
    async def go() -> agent_pb2.Lease:
        async with agent.client() as c:
            return next(x for x in await c.leases(include_ended=True) if x.id == lease_id)

    return asyncio.run(go())


def test_round_trips_on_the_device_with_checksums(agent: AgentProcess) -> None:
    with PeerMemory.acquire(str(agent.socket), "256Mi", gpu_uuid=first_gpu(agent), device=lender()) as pm:
        assert pm.device_kind == "cuda"
        gen = torch.Generator(device=BORROWER).manual_seed(1)
        for size, batch in [(16 << 10, 512), (64 << 10, 64), (2 << 20, 8), (3000, 5)]:
            blocks = [
                torch.randint(0, 255, (size,), dtype=torch.uint8, device=BORROWER, generator=gen) for _ in range(batch)
            ]
            want = [digest(b) for b in blocks]
            keys = [(size, i) for i in range(batch)]
            t = pm.put(keys, blocks)
            t.wait()  # the model's stream may now reuse the sources
            outs = [torch.empty_like(b) for b in blocks]
            pm.get(keys, out=outs).synchronize()
            assert [digest(o) for o in outs] == want
            pm.evict(keys)
        # the paged-pool form
        pool = torch.randn(128, 2, 2, 8, 16, 64, device=BORROWER, dtype=torch.float16)
        rows = list(range(0, 128, 3))
        want = [digest(pool[r]) for r in rows]
        pm.put_rows([("r", r) for r in rows], pool, rows).synchronize()
        pool.zero_()
        pm.get_rows([("r", r) for r in rows], pool, rows).synchronize()
        assert [digest(pool[r]) for r in rows] == want


def test_the_arena_is_exactly_the_lease_and_a_full_lease_refuses(agent: AgentProcess) -> None:
    dev = lender()
    torch.cuda.synchronize(dev)
    before = torch.cuda.memory_allocated(dev)
    with PeerMemory.acquire(str(agent.socket), "64Mi", gpu_uuid=first_gpu(agent), device=dev) as pm:
        assert torch.cuda.memory_allocated(dev) - before == 64 << 20  # the arena, nothing else
        blocks = [torch.full((1 << 20,), i, dtype=torch.uint8, device=BORROWER) for i in range(64)]
        pm.put(list(range(64)), blocks).synchronize()
        with pytest.raises(OutOfPeerMemory):
            pm.put(["x"], [torch.zeros(1, dtype=torch.uint8, device=BORROWER)])
        s = pm.stats()
        assert s.peer_used_bytes == s.peer_capacity_bytes == s.leased_bytes == 64 << 20
        got = pm.get(list(range(64))).result()
        assert all(int(g[0]) == i and g.device == BORROWER for i, g in enumerate(got))


def test_revocation_moves_device_blocks_to_pinned_host_memory_in_time(agent: AgentProcess) -> None:
    gpu = first_gpu(agent)
    dev = lender()
    pm = PeerMemory.acquire(str(agent.socket), "512Mi", gpu_uuid=gpu, device=dev)
    blocks = [torch.randint(0, 255, (1 << 20,), dtype=torch.uint8, device=BORROWER) for _ in range(400)]
    want = [digest(b) for b in blocks]
    pm.put(list(range(400)), blocks)  # still in flight when the reclaim comes: must land first

    async def reclaim() -> None:
        async with agent.client() as c:
            await c.reclaim(gpu, "512Mi", reason="test", deadline_s=5.0)

    asyncio.run(reclaim())
    deadline = time.monotonic() + 10
    while not (pm.revocation and pm.revocation.released_at) and time.monotonic() < deadline:
        time.sleep(0.02)
    rec = pm.revocation
    assert rec is not None and rec.on_time and rec.blocks == 400
    assert pm.device_kind == "host-pinned"
    assert lease_of(agent, pm.lease_id).state == agent_pb2.RELEASED
    torch.cuda.synchronize(dev)
    got = pm.get(list(range(400)), device=BORROWER).result()
    assert [digest(g) for g in got] == want
    pm.close()


def test_the_nvml_agent_sees_the_borrower_memory_on_the_lender_gpu() -> None:
    with AgentProcess(extra_args=["--backend", "nvml", "--headroom-min", "1Gi"]) as agent:

        async def inventory() -> agent_pb2.Inventory:
            async with agent.client() as c:
                return await c.inventory()

        inv = asyncio.run(inventory())
        assert not inv.simulated and inv.backend == "nvml"
        gpu = inv.gpus[-1]  # the last GPU lends (cuda:0 itself on a one-GPU machine)
        with PeerMemory.acquire(str(agent.socket), "1Gi", gpu_uuid=gpu.uuid) as pm:
            assert pm.device_kind == "cuda"  # found by UUID, whatever the CUDA numbering
            pm.put(["x"], [torch.ones(1 << 20, device=BORROWER)]).synchronize()
            # The agent refreshes NVML every second: wait for a snapshot taken after the arena
            # exists *and* after the attach, then check its accounting on that same snapshot.
            deadline = time.monotonic() + 15
            mine = g = None
            while time.monotonic() < deadline:
                g = next(x for x in asyncio.run(inventory()).gpus if x.uuid == gpu.uuid)
                # by PID; where NVML reports PIDs of another namespace, by the borrower mark
                mine = next((p for p in g.processes if p.pid == os.getpid()), None) or next(
                    (p for p in g.processes if p.borrower), None
                )
                if (
                    mine is not None
                    and mine.borrower
                    and mine.used_bytes >= 1 << 30
                    and g.local_used_bytes + mine.used_bytes <= g.used_bytes + (1 << 20)
                ):
                    break
                time.sleep(0.25)
            assert mine is not None and g is not None, "the agent does not list this process on the lender GPU"
            assert mine.borrower and mine.used_bytes >= 1 << 30, mine
            assert g.local_used_bytes + mine.used_bytes <= g.used_bytes + (1 << 20), g


def test_slot_api_round_trips_on_the_device_with_every_byte_compared(agent: AgentProcess) -> None:
    """The CPU property test's cases on the GPU: random rows, scattered and contiguous slots,
    dtypes, offsets, a per-layer strided view, lent arena on the lender GPU and pinned host slots."""
    from spillway.client import HostMemory

    gen = torch.Generator(device="cpu").manual_seed(11)
    with PeerMemory.acquire(str(agent.socket), "1Gi", gpu_uuid=first_gpu(agent), device=lender()) as pm:
        for store in (pm.slots(64 << 10, 4096), HostMemory().slots(64 << 10, 512)):
            assert store.kind in ("cuda", "host-pinned")
            for case in range(24):
                dtype = [torch.float16, torch.bfloat16, torch.float32, torch.uint8][case % 4]
                elem = torch.empty(0, dtype=dtype).element_size()
                row_bytes = [16 << 10, 32 << 10, 64 << 10, 3000][case % 4] // elem * elem
                layers = torch.randint(0, 100, (2, 300, row_bytes // elem), generator=gen).to(dtype).to(BORROWER)
                pool = layers[case % 2]  # rows of one layer: strided inside the bigger tensor
                n = int(torch.randint(1, 256, (1,), generator=gen))
                rows = torch.randperm(300, generator=gen)[:n]
                ids = store.alloc(n) if case % 3 else torch.randperm(store.num_slots, generator=gen)[:n]
                offset = 0 if row_bytes == 64 << 10 else (case % 5) * 8
                if case % 2:
                    rows = rows.to(BORROWER)  # ids already on the device are used as they are
                t = store.store(pool, rows, ids, offset=offset)
                t.wait()
                back = torch.zeros_like(pool)
                store.load(back, rows, ids, offset=offset).synchronize()
                r = rows.cpu()
                assert [digest(back[i]) for i in r] == [digest(pool[i]) for i in r], f"case {case}"
                if case % 3:
                    store.free(ids)
            store.close()


def test_a_32gib_lease_drains_to_host_memory_within_its_deadline(agent: AgentProcess) -> None:
    """The largest lease we let a borrower hold must fit its revoke deadline: fill 32 GiB of slots,
    reclaim, and compare the drain rate with the deadline the agent gave (sized by the lease)."""
    gpu = first_gpu(agent)
    dev = lender()
    free, _ = torch.cuda.mem_get_info(dev)
    if free < 40 << 30:
        pytest.fail(f"the GPU has {free >> 30} GiB free; this test needs 40 GiB (a 32 GiB lease and room to work)")
    pm = PeerMemory.acquire(str(agent.socket), "32Gi", gpu_uuid=gpu, device=dev, reserve_host=True)
    slots = pm.slots(2 << 20)
    ids = slots.alloc(slots.num_slots)
    src = torch.randint(0, 255, (512, 2 << 20), dtype=torch.uint8, device=BORROWER)
    for k in range(0, slots.num_slots, 512):
        chunk = ids[k : k + 512]
        slots.store(src, torch.arange(len(chunk)), chunk)
    pm.synchronize()
    sample = [0, slots.num_slots // 2, slots.num_slots - 1]
    want = [digest(src[int(i) % 512]) for i in sample]

    async def reclaim() -> agent_pb2.ReclaimResponse:
        async with agent.client() as c:
            return await c.reclaim(gpu, "32Gi", reason="test: 32 GiB drain")

    asyncio.run(reclaim())
    t_end = time.monotonic() + 120
    while not (pm.revocation and pm.revocation.released_at) and time.monotonic() < t_end:
        time.sleep(0.05)
    rec = pm.revocation
    assert rec is not None and rec.released_at, "the borrower did not release"
    lease = lease_of(agent, pm.lease_id)
    given = rec.deadline - rec.notified_at
    rate = rec.bytes / rec.migrate_s / 1e9 if rec.migrate_s else float("inf")
    print(f"32 GiB drain: {rec.migrate_s:.2f} s ({rate:.1f} GB/s) against a deadline of {given:.1f} s; "
          f"lease {agent_pb2.LeaseState.Name(lease.state)}")
    assert rec.on_time and lease.state == agent_pb2.RELEASED
    assert slots.kind == "host-pinned"
    back = torch.empty((1, 2 << 20), dtype=torch.uint8, device=BORROWER)
    got = []
    for i in sample:
        slots.load(back, [0], [i]).synchronize()
        got.append(digest(back[0]))
    assert got == want
    pm.close()


TENANT = r"""
import json, sys, time, torch
step, steps, bound = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
held = []
for i in range(steps):
    t0 = time.monotonic(); tries = 0
    while True:
        try:
            held.append(torch.empty(step, dtype=torch.uint8, device="cuda:0")); break
        except torch.OutOfMemoryError:
            tries += 1
            if time.monotonic() - t0 > bound:
                print(json.dumps({"step": i, "ok": False, "waited": time.monotonic() - t0, "tries": tries}), flush=True)
                sys.exit(1)
            time.sleep(0.05)
    print(json.dumps({"step": i, "ok": True, "waited": time.monotonic() - t0, "tries": tries}), flush=True)
    time.sleep(1.5)  # let the agent see it (one refresh) before the next step
"""


def test_the_lenders_own_tenant_grows_past_what_is_left_and_gets_every_allocation() -> None:
    """The H200 case of issue 11: a borrower holds most of the GPU; the GPU's own tenant (another
    process) grows in 5 GiB steps. The agent (nvml) sees the growth and revokes; the borrower moves
    its blocks to pinned host memory and gives the bytes back to the driver; every allocation of
    the tenant succeeds within a bound; the borrower's blocks survive; and the agent never shows
    as lendable bytes that a process still holds."""
    import json
    import subprocess
    import threading

    step = 5 << 30
    with AgentProcess(extra_args=["--backend", "nvml", "--headroom-min", "2Gi", "--refresh", "0.25s"]) as agent:

        async def inventory() -> agent_pb2.Inventory:
            async with agent.client() as c:
                return await c.inventory()

        gpu = next(g for g in asyncio.run(inventory()).gpus if g.index == 0)
        lend = (int(gpu.lendable_bytes) - (8 << 30)) // (1 << 30)
        assert lend >= 16, f"GPU 0 lends only {gpu.lendable_bytes >> 30} GiB; the test needs a mostly free GPU"
        pm = PeerMemory.acquire(str(agent.socket), f"{lend}Gi", gpu_uuid=gpu.uuid, device="cuda:0", reserve_host=True)
        slots = pm.slots(64 << 20)
        ids = slots.alloc(16)
        src = torch.randint(0, 255, (16, 64 << 20), dtype=torch.uint8, device="cuda:0")
        slots.store(src, torch.arange(16), ids).synchronize()
        want = [digest(src[i]) for i in range(16)]
        del src
        steps = int((lend << 30) // step) + 2  # past what is left once the lease is counted
        violations: list[str] = []
        stop = threading.Event()

        def watch() -> None:  # the agent's lendable never exceeds what NVML shows free
            while not stop.is_set():
                g = next(x for x in asyncio.run(inventory()).gpus if x.uuid == gpu.uuid)
                free = int(g.total_bytes) - int(g.used_bytes)
                if int(g.lendable_bytes) > free:
                    violations.append(f"lendable {g.lendable_bytes >> 20} MiB > NVML free {free >> 20} MiB")
                time.sleep(0.1)

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        tenant = subprocess.run([sys.executable, "-c", TENANT, str(step), str(steps), "30"], capture_output=True,
                                text=True, timeout=600)
        stop.set()
        watcher.join()
        waits = [json.loads(line) for line in tenant.stdout.splitlines() if line.startswith("{")]
        print("tenant steps (waited s):", [round(w["waited"], 2) for w in waits])
        rec = pm.revocation
        print(f"revocation: {rec}")
        assert tenant.returncode == 0 and all(w["ok"] for w in waits), tenant.stdout + tenant.stderr[-2000:]
        assert max(w["waited"] for w in waits) < 15, waits
        assert rec is not None and rec.on_time
        back = torch.empty((16, 64 << 20), dtype=torch.uint8, device="cuda:0")
        slots.load(back, torch.arange(16), ids).synchronize()
        assert [digest(back[i]) for i in range(16)] == want
        assert not violations, violations[:5]
        pm.close()


def test_toy_server_on_the_gpu_swaps_to_lent_memory_without_changing_outputs(agent: AgentProcess) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
    from toy_server import Engine, EngineConfig, ModelConfig, TinyDecoder

    model = TinyDecoder(ModelConfig(d_model=256, n_layers=4, n_heads=4, d_ff=1024), BORROWER, torch.float16)
    prompts = [[(i * 7 + j) % 90 for j in range(400)] for i in range(6)]

    def generate(engine: Engine) -> list[list[int]]:
        out: list[list[int]] = [[] for _ in prompts]
        for i, p in enumerate(prompts):
            engine.submit(p, 6, lambda tok, fin, err, i=i: out[i].append(tok) if tok is not None else None, seed=i)
        while engine.has_work:
            engine.run_round()
        return out

    from spillway.client import HostMemory

    reference = generate(Engine(model, HostMemory(), EngineConfig(kv_blocks=256)))
    with PeerMemory.acquire(str(agent.socket), "256Mi", gpu_uuid=first_gpu(agent), device=lender()) as pm:
        engine = Engine(model, pm, EngineConfig(kv_blocks=60))
        assert generate(engine) == reference
        assert engine.stats.out_blocks > 0 and engine.stats.overflow_blocks == 0

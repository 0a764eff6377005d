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
            deadline = time.monotonic() + 15
            mine = None
            while time.monotonic() < deadline:
                g = next(x for x in asyncio.run(inventory()).gpus if x.uuid == gpu.uuid)
                # by PID; where NVML reports PIDs of another namespace, by the borrower mark
                mine = next((p for p in g.processes if p.pid == os.getpid()), None) or next(
                    (p for p in g.processes if p.borrower), None
                )
                if mine is not None and mine.used_bytes >= 1 << 30:
                    break
                time.sleep(0.5)
            assert mine is not None, "the agent does not list this process on the lender GPU"
            assert mine.borrower and mine.used_bytes >= 1 << 30
            assert g.local_used_bytes + mine.used_bytes <= g.used_bytes + (1 << 20)


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

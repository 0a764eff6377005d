"""The toy model server: the Llama-shaped decoder (tiny configuration; the 8B one on the meta
device), the engine's schedule (one batched forward per round, bounded admission, prefetched
swap-ins, identical tokens whatever the swap target) and the server end to end over real HTTP:
streaming completions, contexts swapped through spillway.client's slot API (to a real agent's
lease, simulated-cpu tier here), and the vLLM-named histograms on /metrics."""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import torch

from spillway.client import HostMemory, PeerMemory
from spillway.testing.agentproc import AgentProcess

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from toy_server import (
    PRESETS,
    Chunk,
    Decoder,
    Engine,
    EngineConfig,
    ModelConfig,
    ToyServer,
    encode,
)

REPO = Path(__file__).resolve().parents[1]
MODEL = ModelConfig(d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=128)
CPU = torch.device("cpu")


def make_server(swap: PeerMemory, kv_blocks: int, round_blocks: int = 0) -> ToyServer:
    model = Decoder(MODEL, CPU, torch.float32)
    cfg = EngineConfig(kv_blocks=kv_blocks, prefill_chunk=32, round_blocks=round_blocks)
    return ToyServer(model, swap, cfg, model_name="toy-test")


async def stream(port: int, prompt: str, max_tokens: int, seed: int) -> list[dict[str, Any]]:
    chunks: list[dict[str, Any]] = []
    body = {"model": "toy-test", "prompt": prompt, "max_tokens": max_tokens, "stream": True, "seed": seed}
    async with aiohttp.ClientSession() as http:
        async with http.post(f"http://127.0.0.1:{port}/v1/completions", json=body) as r:
            assert r.status == 200, await r.text()
            assert r.headers["Content-Type"].startswith("text/event-stream")
            done = False
            async for raw in r.content:
                line = raw.decode().strip()
                if not line:
                    continue
                assert line.startswith("data: ")
                if line == "data: [DONE]":
                    done = True
                    continue
                chunks.append(json.loads(line[6:]))
            assert done, "the stream must end with data: [DONE]"
    return chunks


async def metrics(port: int) -> dict[str, float]:
    async with aiohttp.ClientSession() as http:
        async with http.get(f"http://127.0.0.1:{port}/metrics") as r:
            text = await r.text()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


Tokens = dict[int, list[int]]


def run_engine(
    engine: Engine,
    prompts: list[str],
    max_tokens: int,
    *,
    late: dict[int, str] | None = None,
    before: Callable[[int], None] = lambda r: None,
) -> Tokens:
    """Submit `prompts` (and `late[r]` before round r; `before(r)` runs then too), run rounds
    until every request is done; return each request's tokens (by submission index)."""
    out: Tokens = {}

    def submit(i: int, text: str) -> None:
        out[i] = []

        def emit(token: int | None, finish: str, error: str) -> None:
            assert not error, error
            if token is not None:
                out[i].append(token)

        engine.submit(encode(text), max_tokens, emit, seed=100 + i)

    for i, p in enumerate(prompts):
        submit(i, p)
    while engine.has_work:
        for text in [t for r, t in (late or {}).items() if r == engine.round + 1]:
            submit(len(out), text)
        before(engine.round + 1)
        engine.run_round()
    return out


PROMPTS = [f"prompt number {i} " + "the quick brown fox jumps over the lazy dog " * (3 + i % 3) for i in range(6)]


def test_the_8b_configuration_has_llama3_8b_shapes_on_the_meta_device() -> None:
    cfg = PRESETS["llama3-8b"]
    model = Decoder(cfg, torch.device("meta"), torch.bfloat16)
    assert cfg.kv_bytes_per_token(torch.bfloat16) == 128 * 1024  # an 8,192-token context is 1 GiB
    assert model.block_bytes() == 16 * 128 * 1024
    assert (cfg.n_layers, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.d_ff) == (32, 32, 8, 128, 14336)
    n = sum(t.numel() for layer in model.layers for t in layer.values())
    n += model.embed.numel() + model.lm_head.numel() + model.norm.numel()
    assert n == cfg.n_params() and 8.0e9 < n < 8.1e9
    pool = model.new_pool(600)
    out = model.forward([Chunk(list(range(100)), 0, list(range(7))), Chunk([5], 8000, list(range(7, 508)))], pool)
    assert out.shape == (2, cfg.vocab)


def test_a_ragged_batch_computes_what_each_sequence_computes_alone() -> None:
    model = Decoder(MODEL, CPU, torch.float32)
    a, b = encode("hello world, this is the paged cache " * 3), encode("another, shorter one")
    whole = model.forward([Chunk(a, 0, list(range(8)))], model.new_pool(32))[0]
    # in prompt chunks, batched with another sequence at other positions and blocks
    pool = model.new_pool(32)
    model.forward([Chunk(a[:40], 0, list(range(10, 18))), Chunk(b[:7], 0, [20, 21])], pool)
    both = model.forward([Chunk(a[40:], 40, list(range(10, 18))), Chunk(b[7:8], 7, [20, 21])], pool)
    alone_b = model.forward([Chunk(b[:8], 0, [0])], model.new_pool(2))[0]
    torch.testing.assert_close(both[0], whole, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(both[1], alone_b, rtol=1e-4, atol=1e-4)
    # a chunked prefill of one sequence alone is exact
    pool = model.new_pool(32)
    model.forward([Chunk(a[:33], 0, list(range(8)))], pool)
    assert torch.equal(model.forward([Chunk(a[33:], 33, list(range(8)))], pool)[0], whole)


def _engine(swap: PeerMemory, kv_blocks: int, round_blocks: int = 24) -> Engine:
    cfg = EngineConfig(kv_blocks=kv_blocks, prefill_chunk=32, round_blocks=round_blocks)
    return Engine(Decoder(MODEL, CPU, torch.float32), swap, cfg)


@pytest.mark.timeout(300)
async def test_tokens_are_identical_whatever_the_swap_target(agent: AgentProcess) -> None:
    """No swapping (everything fits), swaps to host memory, swaps to the lent memory: the same
    schedule and the same tokens; only where the contexts wait differs."""
    none = _engine(HostMemory(), kv_blocks=1024)
    reference = await asyncio.to_thread(run_engine, none, PROMPTS, 5)
    none.close()
    assert none.stats.out_blocks == 0 and none.stats.in_blocks == 0

    host = _engine(HostMemory(), kv_blocks=48)
    assert await asyncio.to_thread(run_engine, host, PROMPTS, 5) == reference
    host.close()

    gpu = await _first_gpu(agent)
    lease = await asyncio.to_thread(PeerMemory.acquire, str(agent.socket), "64Mi", holder="toy", gpu_uuid=gpu)
    try:
        lent = _engine(lease, kv_blocks=48)
        assert lent._slot_stores[0].kind == "simulated-cpu"
        assert await asyncio.to_thread(run_engine, lent, PROMPTS, 5) == reference
        lent.close()
    finally:
        await asyncio.to_thread(lease.close)
    for e in (host, lent):
        st = e.stats
        assert st.out_blocks > 0 and st.in_blocks == st.out_blocks and st.overflow_blocks == 0
        assert e.round == none.round  # the same rounds...
        forwards = lambda x: [ev.seqs for ev in x.events if ev.kind == "forward"]  # noqa: E731
        assert forwards(e) == forwards(none)  # ...with the same batches
    assert host.stats.out_bytes == lent.stats.out_bytes
    # requests share forwards: fewer forwards than requests' steps
    assert max(len(seqs) for seqs in forwards(none)) > 1 and none.stats.rounds < sum(map(len, forwards(none)))


@pytest.mark.timeout(300)
async def test_a_revocation_mid_run_moves_the_swapped_contexts_to_host_memory_and_changes_no_token(
    agent: AgentProcess,
) -> None:
    """The lender wants its memory back while contexts sit in the lease's slots: the client moves
    them to host memory and releases the lease in time; the engine goes on with the same slot
    ids (now host memory) and every request gets the tokens it gets without any swapping."""
    from spillway.api.v1 import agent_pb2

    none = _engine(HostMemory(), kv_blocks=1024)
    reference = await asyncio.to_thread(run_engine, none, PROMPTS, 5)
    none.close()
    gpu = await _first_gpu(agent)
    lease = await asyncio.to_thread(PeerMemory.acquire, str(agent.socket), "64Mi", holder="toy", gpu_uuid=gpu)
    engine = _engine(lease, kv_blocks=48)
    revoked_with: list[int] = []

    def revoke(r: int) -> None:
        if r != 12:
            return
        revoked_with.append(engine.swap_slots_used)
        assert engine.swap_tier == "simulated-cpu"

        async def reclaim() -> agent_pb2.ReclaimResponse:
            async with agent.client() as c:
                return await c.reclaim(gpu, "64Mi", reason="lender needs it", deadline_s=4.0)

        assert [x.id for x in asyncio.run(reclaim()).revoking] == [lease.lease_id]
        deadline = time.monotonic() + 10
        while not (lease.revocation and lease.revocation.released_at):
            assert time.monotonic() < deadline, "the client did not move its slots and release"
            time.sleep(0.05)

    try:
        got = await asyncio.to_thread(run_engine, engine, PROMPTS, 5, before=revoke)
        assert revoked_with and revoked_with[0] > 0  # contexts were in the lease when it went
        assert got == reference
        assert engine.swap_tier == "host-pageable" and engine._slot_stores[0].generation == 1
        st = engine.stats
        assert st.in_blocks == st.out_blocks and st.overflow_blocks == 0
        assert lease.revocation is not None and lease.revocation.on_time
        engine.close()
    finally:
        await asyncio.to_thread(lease.close)
    async with agent.client() as c:
        assert next(x for x in await c.leases(include_ended=True) if x.id == lease.lease_id).state == agent_pb2.RELEASED


def test_swap_ins_are_prefetched_a_round_ahead_and_swap_outs_issued_before_the_forward() -> None:
    """From the engine's own event log: every swap-in is issued in the round before the forward
    that needs it (so it runs while that round computes), and every swap-out is issued before
    its round's forward is launched."""
    engine = _engine(HostMemory(), kv_blocks=48)
    run_engine(engine, PROMPTS, 4)
    events = list(engine.events)
    loads = [e for e in events if e.kind == "load"]
    assert len(loads) > 10 and engine.stats.prefetched == len(loads) and engine.stats.late == 0
    assert all(e.for_round == e.round + 1 for e in loads)
    forward_at = {e.round: i for i, e in enumerate(events) if e.kind == "forward"}
    out_since: dict[int, int] = {}  # seq -> round of its last swap-out
    for i, e in enumerate(events):
        if e.kind in ("load", "store"):
            assert i < forward_at[e.round], f"{e} was issued after its round's forward was launched"
        if e.kind == "store":
            out_since[e.seqs[0]] = e.round
        if e.kind == "load":
            out_since.pop(e.seqs[0])
        if e.kind == "forward":
            swapped_out = [s for s in e.seqs if s in out_since]
            assert not swapped_out, f"round {e.round} ran {swapped_out} without swapping them in"
    # a round waits only for its own swap-ins, which had the previous round's forward to run in
    assert all(e.kind != "wait" for e in events)  # CPU copies are done when issued


def test_cancelled_requests_give_back_their_blocks_and_slots() -> None:
    """Requests cancelled while resident, swapped out or being swapped in leave nothing behind,
    and the others finish."""
    engine = _engine(HostMemory(), kv_blocks=48)
    seqs: dict[int, Any] = {}
    states_seen: list[dict[int, tuple[bool, bool, bool]]] = []

    def cancel(r: int) -> None:
        if not seqs:
            seqs.update({s.id: s for s in engine.active})
        if r == 8:
            states = {s.id: (bool(s.blocks) and not s.loading, s.swapped, s.loading is not None) for s in engine.active}
            states_seen.append(states)
            # one of each kind that exists now: resident, swapped out, being swapped in
            for kind in range(3):
                victim = next((i for i, st in states.items() if st[kind] and not seqs[i].cancelled), None)
                if victim is not None:
                    seqs[victim].cancelled = True

    out: Tokens = {}
    for i, p in enumerate(PROMPTS):
        out[i] = []
        engine.submit(encode(p), 5, lambda t, f, e, i=i: out[i].append(t if t is not None else f), seed=100 + i)
    while engine.has_work:
        cancel(engine.round + 1)
        engine.run_round()
    cancelled = [i for i, s in seqs.items() if s.cancelled]
    assert len(cancelled) == 3, states_seen
    for i, toks in out.items():
        if seqs[i + 1].cancelled:
            assert toks[-1] == "cancelled"
        else:
            assert len(toks) == 5 and all(isinstance(t, int) for t in toks)
    assert engine.swap_slots_used == 0 and sorted(engine.free) == list(range(48))


def test_fair_time_sharing_admits_a_new_prompt_within_bounded_rounds() -> None:
    """A prompt that arrives while others are being served joins the rotation's tail: it runs
    within as many rounds as there are requests ahead of it, and every request runs at least
    once every len(active) rounds."""
    engine = _engine(HostMemory(), kv_blocks=80, round_blocks=20)
    late = {6: "a latecomer " * 20, 11: "another latecomer " * 10}
    run_engine(engine, PROMPTS, 6, late=late)
    forwards = [e for e in engine.events if e.kind == "forward"]
    first = {}
    for e in forwards:
        for s in e.seqs:
            first.setdefault(s, e.round)
    for r, seq_id in zip(late, (7, 8), strict=True):
        ahead = len(PROMPTS) + (seq_id - 7)
        assert r <= first[seq_id] <= r + ahead, (r, first[seq_id])
    last: dict[int, int] = {}
    for e in forwards:
        for s in e.seqs:
            if s in last:
                assert e.round - last[s] <= len(PROMPTS) + len(late), (s, last[s], e.round)
            last[s] = e.round


async def test_streaming_completion_and_vllm_histograms() -> None:
    server = make_server(HostMemory(), kv_blocks=64)
    port = await server.start(0)
    try:
        results = await asyncio.gather(
            *(stream(port, f"request {i}: " + "tell me a story " * 8, 6, i) for i in range(3))
        )
        for chunks in results:
            assert len(chunks) == 6
            assert all(c["object"] == "text_completion" and c["model"] == "toy-test" for c in chunks)
            assert [c["choices"][0]["finish_reason"] for c in chunks] == [None] * 5 + ["length"]
            assert all(len(c["choices"][0]["text"]) == 1 for c in chunks)
        m = await metrics(port)
        lbl = '{model_name="toy-test"}'
        assert m[f"vllm:time_to_first_token_seconds_count{lbl}"] == 3
        assert m[f"vllm:inter_token_latency_seconds_count{lbl}"] == 3 * 5
        assert m[f"vllm:time_per_output_token_seconds_count{lbl}"] == 3 * 5
        assert m[f"vllm:e2e_request_latency_seconds_count{lbl}"] == 3
        assert m[f"vllm:generation_tokens_total{lbl}"] == 18
        assert m['vllm:request_success_total{finished_reason="length",model_name="toy-test"}'] == 3
        assert m[f"vllm:time_to_first_token_seconds_sum{lbl}"] > 0
        # non-streaming form, with usage
        async with aiohttp.ClientSession() as http:
            async with http.post(
                f"http://127.0.0.1:{port}/v1/completions", json={"prompt": "hi there", "max_tokens": 4}
            ) as r:
                body = await r.json()
        assert body["usage"] == {"prompt_tokens": 8, "completion_tokens": 4, "total_tokens": 12}
        assert len(body["choices"][0]["text"]) == 4
    finally:
        await server.stop()


async def test_bad_requests_get_clear_errors() -> None:
    server = make_server(HostMemory(), kv_blocks=8)
    port = await server.start(0)
    try:
        async with aiohttp.ClientSession() as http:
            url = f"http://127.0.0.1:{port}/v1/completions"
            for body, status, msg in [
                ({"prompt": ""}, 400, "'prompt' must be a non-empty string"),
                ({"prompt": "x", "max_tokens": 0}, 400, "'max_tokens' must be a positive integer"),
                ({"prompt": "x", "model": "gpt-9"}, 404, "is not served here"),
                ({"prompt": "x" * 200, "max_tokens": 1}, 400, "the local budget is 8 blocks"),
            ]:
                async with http.post(url, json=body) as r:
                    assert r.status == status
                    assert msg in (await r.json())["error"]["message"]
    finally:
        await server.stop()


@pytest.mark.timeout(240)
async def test_fair_time_sharing_swaps_contexts_through_peer_memory_without_changing_outputs(
    agent: AgentProcess,
) -> None:
    prompts = [f"prompt number {i} " + "the quick brown fox jumps over the lazy dog " * 6 for i in range(4)]

    async def run(swap: PeerMemory, kv_blocks: int) -> tuple[list[str], ToyServer]:
        server = make_server(swap, kv_blocks, round_blocks=20)
        port = await server.start(0)
        try:
            results = await stream_in_order(server, port, prompts, 5)
            assert server.engine.swap_slots_used == 0  # finished requests leave nothing behind
        finally:
            await server.stop()
        return ["".join(c["choices"][0]["text"] for c in chunks) for chunks in results], server

    # every context fits locally: no swapping (the reference outputs)
    reference, roomy = await run(HostMemory(), kv_blocks=256)
    assert roomy.engine.stats.out_blocks == 0
    # room for two contexts: one computes while the next one's swap-in runs
    inv_gpu = await _first_gpu(agent)
    swap = await asyncio.to_thread(PeerMemory.acquire, str(agent.socket), "64Mi", holder="toy", gpu_uuid=inv_gpu)
    try:
        swapped, tight = await run(swap, kv_blocks=40)
        st = tight.engine.stats
        assert st.out_blocks > 0 and st.in_blocks == st.out_blocks and st.overflow_blocks == 0
        assert st.prefetched > 0
        assert swapped == reference  # the KV bytes came back exactly: same tokens
        m = await _metrics_of(tight)
        lbl = 'direction="{}",model_name="toy-test",tier="simulated-cpu"'
        assert m["spillway_client_swap_bytes_total{" + lbl.format("out") + "}"] > 0
        assert m["spillway_client_swap_duration_seconds_count{" + lbl.format("in") + "}"] > 0
    finally:
        await asyncio.to_thread(swap.close)


async def stream_in_order(
    server: ToyServer, port: int, prompts: list[str], max_tokens: int
) -> list[list[dict[str, Any]]]:
    """Stream every prompt, submitted one after another while the engine holds its rounds, so
    each run admits them in the same round and order (the schedule, hence the batches)."""
    server.hold()
    tasks = []
    for i, p in enumerate(prompts):
        tasks.append(asyncio.create_task(stream(port, p, max_tokens, seed=100 + i)))
        await server.queued(i + 1)
    server.release()
    return list(await asyncio.gather(*tasks))


async def _first_gpu(agent: AgentProcess) -> str:
    async with agent.client() as c:
        return str((await c.inventory()).gpus[0].uuid)


async def _metrics_of(server: ToyServer) -> dict[str, float]:
    from prometheus_client import generate_latest

    out: dict[str, float] = {}
    for line in generate_latest(server.metrics.registry).decode().splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


@pytest.mark.timeout(180)
async def test_the_server_process_swaps_into_the_lease_from_its_environment(
    agent: AgentProcess, tmp_path: Path
) -> None:
    """`python -m toy_server --swap env` in its own process, with the environment the device
    plugin gives a pod: it claims and attaches the lease, swaps into it, releases on SIGTERM."""
    import os
    import signal

    from spillway.api.v1 import agent_pb2
    from spillway.testing.agentproc import free_port

    gpu = await _first_gpu(agent)
    async with agent.client() as c:
        got = await c.acquire("64Mi", "tenant-toy", gpu_uuid=gpu, ttl_s=60)
    repo = REPO
    port = free_port()
    env = dict(
        os.environ,
        PYTHONPATH=f"{repo}{os.pathsep}{repo / 'examples'}",
        SPILLWAY_LEASE_ID=got.lease.id,
        SPILLWAY_LEASE_TOKEN=got.token,
        SPILLWAY_AGENT_SOCKET=str(agent.socket),
        SPILLWAY_LENDER_GPUS=gpu,
    )
    cmd = [
        sys.executable,
        "-m",
        "toy_server",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--device",
        "cpu",
        "--kv-blocks",
        "24",
        "--d-model",
        "64",
        "--layers",
        "2",
        "--prefill-chunk",
        "32",
        "--model-name",
        "toy-test",
        "--swap",
        "env",
    ]
    log = tmp_path / "toy.log"
    with open(log, "wb") as out:  # noqa: ASYNC230 - opening a local file is instant
        proc = await asyncio.create_subprocess_exec(*cmd, env=env, stdout=out, stderr=out)
    try:
        async with aiohttp.ClientSession() as http:
            for _ in range(600):
                assert proc.returncode is None, log.read_text()
                try:
                    async with http.get(f"http://127.0.0.1:{port}/healthz") as r:
                        if r.status == 200:
                            break
                except aiohttp.ClientConnectionError:
                    await asyncio.sleep(0.1)
        async with agent.client() as c:
            lease = next(x for x in await c.leases() if x.id == got.lease.id)
        assert lease.state == agent_pb2.ACTIVE and lease.pid == proc.pid
        prompts = [f"{i} " + "a long prompt that will not fit twice " * 8 for i in range(3)]
        results = await asyncio.gather(*(stream(port, p, 3, i) for i, p in enumerate(prompts)))
        assert all(len(r) == 3 for r in results)
        m = await metrics(port)
        assert m['spillway_client_swap_bytes_total{direction="out",model_name="toy-test",tier="simulated-cpu"}'] > 0
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), 30)
        except TimeoutError:
            proc.kill()
            await proc.wait()
    async with agent.client() as c:
        lease = next(x for x in await c.leases(include_ended=True) if x.id == got.lease.id)
    assert lease.state == agent_pb2.RELEASED

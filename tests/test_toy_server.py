"""The toy model server end to end over real HTTP: streaming completions, fair time-sharing
with contexts swapped through spillway.client (to a real agent's lease, simulated-cpu tier
here), and the vLLM-named histograms on /metrics."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import torch

from spillway.client import HostMemory, PeerMemory
from spillway.testing.agentproc import AgentProcess

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from toy_server import EngineConfig, ModelConfig, TinyDecoder, ToyServer

REPO = Path(__file__).resolve().parents[1]
MODEL = ModelConfig(d_model=64, n_layers=2, n_heads=4, d_ff=128)


def make_server(swap: PeerMemory, kv_blocks: int) -> ToyServer:
    model = TinyDecoder(MODEL, torch.device("cpu"), torch.float32)
    return ToyServer(model, swap, EngineConfig(kv_blocks=kv_blocks, prefill_chunk=32), model_name="toy-test")


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
        server = make_server(swap, kv_blocks)
        port = await server.start(0)
        try:
            results = await asyncio.gather(*(stream(port, p, 5, seed=100 + i) for i, p in enumerate(prompts)))
        finally:
            await server.stop()
        return ["".join(c["choices"][0]["text"] for c in chunks) for chunks in results], server

    # every context fits locally: no swapping (the reference outputs)
    reference, roomy = await run(HostMemory(), kv_blocks=256)
    assert roomy.engine.stats.out_blocks == 0
    # room for about one context: every round swaps contexts out to the lent memory and back
    inv_gpu = await _first_gpu(agent)
    swap = await asyncio.to_thread(PeerMemory.acquire, str(agent.socket), "64Mi", holder="toy", gpu_uuid=inv_gpu)
    try:
        swapped, tight = await run(swap, kv_blocks=20)
        st = tight.engine.stats
        assert st.out_blocks > 0 and st.in_blocks == st.out_blocks and st.overflow_blocks == 0
        assert swapped == reference  # the KV bytes came back exactly: same tokens
        m = await _metrics_of(tight)
        assert m['spillway_client_swap_bytes_total{direction="out",model_name="toy-test",tier="simulated-cpu"}'] > 0
        assert len(swap) == 0  # finished requests leave nothing behind
    finally:
        await asyncio.to_thread(swap.close)


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

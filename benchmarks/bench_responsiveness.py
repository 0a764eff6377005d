"""Responsiveness: the toy model server under N concurrent long prompts with fair time-sharing,
KV contexts swapped to lent memory (spillway.client.PeerMemory) vs to host memory
(HostMemory), in the same run. Reports time to first token p50/p99 (measured by the client
on the streamed responses) and throughput, and checks both runs produced the same tokens.

On a GPU the lent memory is cuda:1 (or cuda:0 itself on a one-GPU machine: said in the
output) and host memory is pinned; without a GPU every tier is CPU memory, so the two runs
differ only by noise (labelled "CPU only").

    python -m benchmarks responsiveness
    python -m benchmarks.bench_responsiveness --requests 16 --prompt-tokens 2048
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import torch

from spillway.client import HostMemory, PeerMemory
from spillway.testing.agentproc import AgentProcess
from spillway.units import format_bytes

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from toy_server import BLOCK_TOKENS, EngineConfig, ModelConfig, TinyDecoder, ToyServer


@dataclass
class Result:
    label: str
    tier: str
    ttft: list[float]
    wall_s: float
    tokens: int
    texts: list[str]
    swap_out_bytes: int
    swap_s: float

    def pct(self, q: float) -> float:
        xs = sorted(self.ttft)
        return xs[min(len(xs) - 1, round(q * (len(xs) - 1)))]


async def _one(port: int, prompt: str, max_tokens: int, seed: int) -> tuple[float, str]:
    t0 = time.monotonic()
    ttft = 0.0
    text = []
    body = {"prompt": prompt, "max_tokens": max_tokens, "stream": True, "seed": seed}
    async with aiohttp.ClientSession() as http:
        async with http.post(f"http://127.0.0.1:{port}/v1/completions", json=body) as r:
            r.raise_for_status()
            async for raw in r.content:
                line = raw.decode().strip()
                if line.startswith("data: ") and line != "data: [DONE]":
                    chunk = json.loads(line[6:])
                    if "error" in chunk:
                        raise RuntimeError(chunk["error"]["message"])
                    ttft = ttft or time.monotonic() - t0
                    text.append(chunk["choices"][0]["text"])
    return ttft, "".join(text)


async def _run(label: str, swap: PeerMemory, args: argparse.Namespace, device: torch.device) -> Result:
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    model = TinyDecoder(
        ModelConfig(d_model=args.d_model, n_layers=args.layers, n_heads=args.heads, d_ff=4 * args.d_model),
        device,
        dtype,
    )
    server = ToyServer(
        model, swap, EngineConfig(kv_blocks=args.kv_blocks, prefill_chunk=args.prefill_chunk), model_name="toy-bench"
    )
    port = await server.start(0)
    prompts = [
        f"{i:04d} " + ("the quick brown fox jumps over the lazy dog " * 200)[: args.prompt_tokens - 5]
        for i in range(args.requests)
    ]
    try:
        await _one(port, prompts[0], 2, 0)  # warm up: the first forwards are slower
        t0 = time.monotonic()
        got = await asyncio.gather(*(_one(port, p, args.max_tokens, 1000 + i) for i, p in enumerate(prompts)))
        wall = time.monotonic() - t0
    finally:
        await server.stop()
    st = server.engine.stats
    return Result(
        label,
        swap.device_kind,
        [g[0] for g in got],
        wall,
        args.requests * args.max_tokens,
        [g[1] for g in got],
        st.out_bytes,
        st.out_s + st.in_s,
    )


def main(argv: list[str]) -> int:
    gpu = torch.cuda.is_available()
    p = argparse.ArgumentParser(
        prog="bench_responsiveness", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--requests", type=int, default=16 if gpu else 6, help="concurrent long prompts")
    p.add_argument("--prompt-tokens", type=int, default=2048 if gpu else 384)
    p.add_argument("--max-tokens", type=int, default=16 if gpu else 4)
    p.add_argument("--d-model", type=int, default=1024 if gpu else 64)
    p.add_argument("--layers", type=int, default=8 if gpu else 2)
    p.add_argument("--heads", type=int, default=8 if gpu else 4)
    p.add_argument("--prefill-chunk", type=int, default=256 if gpu else 64)
    p.add_argument("--rounds", type=int, default=2, help="alternate lent/host runs this many times")
    p.add_argument("--kv-blocks", type=int, default=0, help="local KV budget (default: room for 2 contexts)")
    args = p.parse_args(argv)
    ctx_blocks = -(-(args.prompt_tokens + args.max_tokens) // BLOCK_TOKENS)
    args.kv_blocks = args.kv_blocks or 2 * ctx_blocks
    device = torch.device("cuda", 0) if gpu else torch.device("cpu")
    lender = torch.device("cuda", 1 if torch.cuda.device_count() > 1 else 0) if gpu else None
    dtype_bytes = 2 if gpu else 4
    block_bytes = args.layers * 2 * args.d_model * BLOCK_TOKENS * dtype_bytes
    swap_need = (args.requests + 2) * ctx_blocks * block_bytes * 2
    print(
        f"device: {torch.cuda.get_device_name(0) if gpu else 'CPU only, no GPU'}; {args.requests} concurrent "
        f"prompts of {args.prompt_tokens} tokens, {args.max_tokens} output tokens each; KV block "
        f"{format_bytes(block_bytes)}, context {ctx_blocks} blocks ({format_bytes(ctx_blocks * block_bytes)}), "
        f"local budget {args.kv_blocks} blocks (2 contexts)"
    )
    if gpu and lender == device:
        print("single GPU: the lent memory is on the borrower's own GPU (HBM copies, not NVLink)")
    with AgentProcess() as agent:

        async def first_gpu() -> str:
            async with agent.client() as c:
                return str((await c.inventory()).gpus[0].uuid)

        lease = PeerMemory.acquire(
            str(agent.socket),
            swap_need,
            holder="bench-responsiveness",
            gpu_uuid=asyncio.run(first_gpu()),
            device=lender,
        )
        host = HostMemory()
        try:
            # alternate the two, twice, so warm-up and background load hit both alike; report the last pair
            for _ in range(args.rounds):
                peer = asyncio.run(_run("lent memory", lease, args, device))
                base = asyncio.run(_run("host memory", host, args, device))
        finally:
            lease.close()
            host.close()
    print(f"{'swap target':<14} {'tier':<15} {'TTFT p50':>9} {'TTFT p99':>9} {'tok/s':>7} {'swapped':>9} {'swap s':>7}")
    for r in (peer, base):
        print(
            f"{r.label:<14} {r.tier:<15} {r.pct(0.5):9.3f} {r.pct(0.99):9.3f} {r.tokens / r.wall_s:7.1f} "
            f"{format_bytes(r.swap_out_bytes):>9} {r.swap_s:7.2f}"
        )
    print(
        f"TTFT p50 ratio host/lent: {base.pct(0.5) / peer.pct(0.5):.2f}; p99: {base.pct(0.99) / peer.pct(0.99):.2f}; "
        f"throughput ratio lent/host: {(peer.tokens / peer.wall_s) / (base.tokens / base.wall_s):.2f}"
    )
    same = peer.texts == base.texts
    print(f"outputs identical in both runs: {same}")
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))

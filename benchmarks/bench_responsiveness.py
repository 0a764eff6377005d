"""Responsiveness: time to first token under fair time-sharing, KV contexts swapped to lent memory
(spillway.client.PeerMemory) vs pinned host memory (HostMemory), in the same run.

The toy server (examples/toy_server) with the Llama-3-8B-shaped configuration on a GPU (random
weights, bf16; the tiny one without a GPU) serves N concurrent long prompts over HTTP with a
local KV budget of a few contexts: every round runs one batch in one forward while the next
batch's contexts swap in. Three runs of the same requests: swaps to lent memory, swaps to host
memory, and no swaps (a budget that holds everything; same batches). Reports, per swap target:
TTFT p50/p99 (client-side, from the moment the engine admits the requests), output tokens/s,
the share of wall time the engine waited on swaps, the bytes swapped each way, and the
effective swap GB/s of each direction (bytes / time with a swap of that direction in flight)
beside that path's copy ceiling measured in the same run (one plain copy of one context).
Checks that the three runs produced the same tokens. Then projects the TTFT for a two-GPU
NVLink node: the same rounds (measured forward times) with the same swapped bytes at
--nvlink-gbps; the same model applied to the measured runs shows how well it predicts them.

On a one-GPU machine the lent arena is on the borrower's own GPU (HBM copies, said in the
output). Without a GPU every tier is CPU memory, so lent and host differ only by noise.

    python -m benchmarks responsiveness
    python -m benchmarks.bench_responsiveness --requests 16 --prompt-tokens 8192 --contexts 4
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
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
from toy_server import BLOCK_TOKENS, PRESETS, Decoder, EngineConfig, EngineEvent, SwapStats, ToyServer, preset


@dataclass
class Result:
    label: str
    tier: str
    ttft: list[float]
    wall_s: float
    tokens: int
    texts: list[str]
    stats: SwapStats
    events: list[EngineEvent]

    def pct(self, q: float) -> float:
        return _pct(self.ttft, q)

    def gbps(self, direction: str = "") -> float:
        """Effective swap GB/s: bytes of `direction` ("": both) over the time such swaps were in flight."""
        st = self.stats
        nbytes = {"out": st.out_bytes, "in": st.in_bytes, "": st.out_bytes + st.in_bytes}[direction]
        busy = st.busy_s(direction)
        return nbytes / busy / 1e9 if busy > 0 else 0.0


def _pct(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, round(q * (len(s) - 1)))]


async def _one(port: int, prompt: str, max_tokens: int, seed: int, first: list[float]) -> str:
    text = []
    body = {"prompt": prompt, "max_tokens": max_tokens, "stream": True, "seed": seed}
    timeout = aiohttp.ClientTimeout(total=None)
    async with aiohttp.ClientSession(timeout=timeout) as http:
        async with http.post(f"http://127.0.0.1:{port}/v1/completions", json=body) as r:
            r.raise_for_status()
            async for raw in r.content:
                line = raw.decode().strip()
                if line.startswith("data: ") and line != "data: [DONE]":
                    chunk = json.loads(line[6:])
                    if "error" in chunk:
                        raise RuntimeError(chunk["error"]["message"])
                    if not text:
                        first.append(time.monotonic())
                    text.append(chunk["choices"][0]["text"])
    return "".join(text)


async def _run(label: str, swap: PeerMemory, model: Decoder, cfg: EngineConfig, args: argparse.Namespace) -> Result:
    server = ToyServer(model, swap, cfg, model_name="toy-bench")
    port = await server.start(0)
    prompts = [
        f"{i:04d} "
        + ("the quick brown fox jumps over the lazy dog " * (args.prompt_tokens // 40 + 1))[: args.prompt_tokens - 5]
        for i in range(args.requests)
    ]
    try:
        await _one(port, prompts[0][:200], 2, 0, [])  # warm up: the first forwards are slower
        skip = len(server.engine.events)
        # every request queued, in order, before the first round: each run admits them alike
        server.hold()
        firsts: list[list[float]] = [[] for _ in prompts]
        tasks = []
        for i, p in enumerate(prompts):
            tasks.append(asyncio.create_task(_one(port, p, args.max_tokens, 1000 + i, firsts[i])))
            await server.queued(i + 1)
        t0 = time.monotonic()
        server.release()
        texts = await asyncio.gather(*tasks)
        wall = time.monotonic() - t0
        server.engine.drain()
    finally:
        await server.stop()
    engine = server.engine
    return Result(
        label,
        engine.swap_tier,
        [f[0] - t0 for f in firsts],
        wall,
        args.requests * args.max_tokens,
        list(texts),
        engine.stats,
        list(engine.events)[skip:],
    )


def copy_ceiling(src: torch.device, dst: torch.device, nbytes: int) -> float:
    """GB/s of one plain copy of `nbytes` from `src` to `dst` (pinned where host and GPU meet),
    the best of 10."""
    pin = torch.cuda.is_available()
    a = torch.empty(nbytes, dtype=torch.uint8, device=src, pin_memory=pin and src.type == "cpu")
    b = torch.empty(nbytes, dtype=torch.uint8, device=dst, pin_memory=pin and dst.type == "cpu")
    times = []
    for _ in range(11):
        if pin:
            torch.cuda.synchronize()
        t = time.perf_counter()
        b.copy_(a, non_blocking=True)
        if pin:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return nbytes / min(times[1:]) / 1e9


def project(events: list[EngineEvent], gbps: float, requests: int) -> list[float]:
    """TTFT of each request if the same rounds ran with swaps at `gbps` (GB/s): a round takes
    its late swap-ins, then the longer of its forward and the swaps it issued for the next
    round (they run during the forward). Returns the first-token times from the first round."""
    rounds: dict[int, dict[str, float]] = {}
    firsts: dict[int, list[int]] = {}
    for e in events:
        rd = rounds.setdefault(e.round, {"fwd": 0.0, "late": 0.0, "ahead": 0.0})
        if e.kind == "forward-done":
            rd["fwd"] = e.seconds
            firsts[e.round] = list(e.seqs)
        elif e.kind == "load" and e.for_round == e.round:
            rd["late"] += e.nbytes
        elif e.kind in ("load", "store"):
            rd["ahead"] += e.nbytes
    out: list[float] = []
    t = 0.0
    for r in sorted(rounds):
        rd = rounds[r]
        t += rd["late"] / (gbps * 1e9) + max(rd["fwd"], rd["ahead"] / (gbps * 1e9))
        out += [t] * len(firsts.get(r, []))
    return out[:requests]


def main(argv: list[str]) -> int:
    gpu = torch.cuda.is_available()
    p = argparse.ArgumentParser(
        prog="bench_responsiveness", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", choices=sorted(PRESETS), default="llama3-8b" if gpu else "tiny")
    p.add_argument("--d-model", type=int, default=0 if gpu else 64, help="override the model's d_model")
    p.add_argument("--layers", type=int, default=0 if gpu else 2, help="override the model's layer count")
    p.add_argument("--requests", type=int, default=16 if gpu else 6, help="concurrent long prompts")
    p.add_argument("--prompt-tokens", type=int, default=8192 if gpu else 384)
    p.add_argument("--max-tokens", type=int, default=16 if gpu else 4)
    p.add_argument("--contexts", type=int, default=4, help="local KV budget, in contexts (2-4)")
    p.add_argument("--prefill-chunk", type=int, default=128 if gpu else 64, help="prompt tokens per request per round")
    p.add_argument("--nvlink-gbps", type=float, default=400.0, help="NVLink GB/s each way, for the projection")
    args = p.parse_args(argv)
    if args.contexts < 2:
        print("--contexts must be at least 2 (one batch computes while the next one's swaps run)", file=sys.stderr)
        return 2
    device = torch.device("cuda", 0) if gpu else torch.device("cpu")
    lender = torch.device("cuda", 1 if torch.cuda.device_count() > 1 else 0) if gpu else device
    if gpu:
        # Identical tokens across runs need the same batches (the engine's schedule) and kernels
        # without atomics: the model's are (GEMMs, SDPA forward, index_select, scatters to unique
        # slots); cuBLAS keeps a fixed workspace so its choice does not vary with other streams.
        # torch.use_deterministic_algorithms is not needed, and would route the KV scatter through
        # a sorting kernel.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    dtype = torch.bfloat16 if gpu else torch.float32
    mcfg = preset(args.model, d_model=args.d_model, n_layers=args.layers)
    t = time.monotonic()
    model = Decoder(mcfg, device, dtype)
    init_s = time.monotonic() - t
    ctx_blocks = -(-(args.prompt_tokens + args.max_tokens) // BLOCK_TOKENS)
    kv_blocks = args.contexts * ctx_blocks
    block = model.block_bytes()
    swap_blocks = args.requests * ctx_blocks
    tight = EngineConfig(
        kv_blocks=kv_blocks, prefill_chunk=args.prefill_chunk, round_blocks=kv_blocks // 2, swap_blocks=swap_blocks
    )
    # no swapping: a budget for every context, the same batches (round_blocks)
    roomy = EngineConfig(
        kv_blocks=(args.requests + 1) * ctx_blocks,
        prefill_chunk=args.prefill_chunk,
        round_blocks=kv_blocks // 2,
        swap_blocks=1,
    )
    print(
        f"device: {torch.cuda.get_device_name(0) if gpu else 'CPU only, no GPU'}; model {args.model} "
        f"({mcfg.n_layers} layers, d_model {mcfg.d_model}, {mcfg.n_heads}/{mcfg.n_kv_heads} heads, "
        f"{mcfg.n_params() / 1e6:,.1f} M parameters, {str(dtype).removeprefix('torch.')}, random weights, "
        f"built in {init_s:.1f} s); {args.requests} concurrent prompts of {args.prompt_tokens} tokens, "
        f"{args.max_tokens} output tokens each, prefill chunk {args.prefill_chunk}; KV "
        f"{format_bytes(mcfg.kv_bytes_per_token(dtype))}/token, context {format_bytes(ctx_blocks * block)}, "
        f"local budget {args.contexts} contexts ({format_bytes(kv_blocks * block)}), a round's batch up to half"
    )
    if gpu and lender == device:
        print("single GPU: the lent memory is on the borrower's own GPU (HBM copies, not NVLink)")
    with AgentProcess() as agent:

        async def first_gpu() -> str:
            async with agent.client() as c:
                return str((await c.inventory()).gpus[0].uuid)

        lease = PeerMemory.acquire(
            str(agent.socket),
            swap_blocks * block + (64 << 20),
            holder="bench-responsiveness",
            gpu_uuid=asyncio.run(first_gpu()),
            device=lender,
        )
        host = HostMemory()
        try:
            lent = asyncio.run(_run("lent memory", lease, model, tight, args))
            base = asyncio.run(_run("host memory", host, model, tight, args))
            none = asyncio.run(_run("no swapping", host, model, roomy, args))
            ceil_lent = (
                copy_ceiling(device, lender, ctx_blocks * block),
                copy_ceiling(lender, device, ctx_blocks * block),
            )
            host_dev = torch.device("cpu")
            ceil_host = (
                copy_ceiling(device, host_dev, ctx_blocks * block),
                copy_ceiling(host_dev, device, ctx_blocks * block),
            )
        finally:
            lease.close()
            host.close()
    print(
        f"{'swap target':<12} {'tier':<14} {'TTFT p50':>8} {'p99':>7} {'tok/s':>7} {'swap wait':>13} "
        f"{'out':>9} {'in':>9} {'GB/s out':>14} {'GB/s in':>14} {'GB/s both':>14}"
    )
    for r, ceil in ((lent, ceil_lent), (base, ceil_host), (none, None)):
        st = r.stats
        cells = []
        if ceil is not None:
            # both directions through one path, back to back: the ceiling is the bytes-weighted harmonic mean
            both = (st.out_bytes + st.in_bytes) / max(1e-12, st.out_bytes / ceil[0] + st.in_bytes / ceil[1])
            for d, c in (("out", ceil[0]), ("in", ceil[1]), ("", both)):
                cells.append(f"{r.gbps(d):.1f}/{c:.0f} {100 * r.gbps(d) / c:3.0f}%" if r.gbps(d) else "-")
        else:
            cells = ["-"] * 3
        print(
            f"{r.label:<12} {r.tier:<14} {r.pct(0.5):8.3f} {r.pct(0.99):7.3f} {r.tokens / r.wall_s:7.1f} "
            f"{st.wait_s:6.2f} s {100 * st.wait_s / r.wall_s:3.0f}% {format_bytes(st.out_bytes):>9} "
            f"{format_bytes(st.in_bytes):>9} {cells[0]:>14} {cells[1]:>14} {cells[2]:>14}"
        )
    print(
        "(GB/s: effective swap bandwidth (bytes over the time a swap of that direction was in flight; one "
        "direction's figure includes time queued behind the other where they share a stream) / that path's "
        "copy ceiling (the best plain copy of one context), and the share; swap wait: time the engine "
        f"blocked on swaps, share of wall; swap-ins prefetched {lent.stats.prefetched}, late {lent.stats.late} "
        "per run)"
    )
    print(
        f"TTFT p50 ratio host/lent: {base.pct(0.5) / lent.pct(0.5):.2f}; p99: {base.pct(0.99) / lent.pct(0.99):.2f}; "
        f"throughput ratio lent/host: {(lent.tokens / lent.wall_s) / (base.tokens / base.wall_s):.2f}"
    )
    for r in (lent, base):
        bw = r.gbps()
        pred = project(r.events, bw, args.requests)
        print(
            f"model check, {r.label}: swaps at the measured {bw:.1f} GB/s predict TTFT p50 {_pct(pred, 0.5):.3f} s "
            f"(measured {r.pct(0.5):.3f})"
        )
    # the NVLink node: the lent run's rounds (forward times) with its swapped bytes at --nvlink-gbps,
    # against the same rounds at the host path's measured bandwidth
    nv = project(lent.events, args.nvlink_gbps, args.requests)
    as_host = project(lent.events, base.gbps(), args.requests)
    print(
        f"two-GPU NVLink projection at {args.nvlink_gbps:.0f} GB/s each way: the same "
        f"{format_bytes(lent.stats.out_bytes + lent.stats.in_bytes)} swapped take "
        f"{(lent.stats.out_bytes + lent.stats.in_bytes) / args.nvlink_gbps / 1e9:.2f} s of copies; TTFT p50 "
        f"{_pct(nv, 0.5):.3f} s, p99 {_pct(nv, 0.99):.3f} s; host/NVLink on the same rounds: p50 "
        f"{_pct(as_host, 0.5) / _pct(nv, 0.5):.2f}, p99 {_pct(as_host, 0.99) / _pct(nv, 0.99):.2f}"
    )
    same = lent.texts == base.texts == none.texts
    print(f"outputs identical in all three runs (lent, host, no swapping): {same}")
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))

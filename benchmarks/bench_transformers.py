"""transformers `generate()` at long context, three KV caches side by side in one run:

  plain              DynamicCache: every layer's KV stays on the GPU (the reference tokens)
  hf-offload         DynamicCache(offloading=True): transformers' own offloading to host memory
  spillway           spillway.integrations.transformers.SpillwayCache on a lease (the lent arena)

For each: the generated tokens (must equal plain's: deterministic algorithms are on, as a
random-weight model has tiny logit margins), decode tokens/s (from the first generated token to
the last), and the borrower GPU's peak memory beyond the weights. The model is Llama-3-8B-shaped
with random bf16 weights (built from a config, nothing downloaded), batch 1.

The lease comes from a real agent subprocess on the simulated backend; its arena is on cuda:1
when there are two GPUs, else on cuda:0 itself, where its bytes are part of cuda:0's peak: the
figure subtracts them then and says so. Without a GPU the model is scaled down and the figures
are labelled "CPU only": they check the code path, not HBM or PCIe (hf-offload needs CUDA).

    python -m benchmarks transformers                    # via make bench
    python -m benchmarks.bench_transformers --context 32768 --new-tokens 32
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from spillway.client import PeerMemory
from spillway.testing.agentproc import AgentProcess
from spillway.units import format_bytes

MODES = ("plain", "hf-offload", "spillway")


@dataclass
class Run:
    mode: str
    tokens: list[int]
    decode_tok_s: float
    prefill_s: float
    peak_bytes: int  # borrower GPU peak beyond the weights (0 on the CPU)
    note: str = ""


def llama3_8b_config(layers: int, context: int) -> Any:
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=layers,
        num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=max(context * 2, 8192),
        rope_theta=500000.0, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )


def tiny_config(layers: int, context: int) -> Any:
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=1024, hidden_size=256, intermediate_size=512, num_hidden_layers=layers, num_attention_heads=8,
        num_key_value_heads=2, max_position_embeddings=max(context * 2, 1024), pad_token_id=0,
    )


class StepClock:
    """A stopping criterion that only timestamps each generated token."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.times: list[float] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kw: Any) -> torch.Tensor:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.times.append(time.perf_counter())
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


def run_mode(
    mode: str, model: Any, ids: torch.Tensor, new_tokens: int, make_cache: Callable[[], Any], arena_bytes: int
) -> Run:
    from transformers import StoppingCriteriaList

    dev = ids.device
    clock = StepClock(dev)
    cache = make_cache()
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(dev)
    base = torch.cuda.memory_allocated(dev) if dev.type == "cuda" else 0
    t0 = time.perf_counter()
    with torch.no_grad():
        out = model.generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
            do_sample=False, past_key_values=cache, stopping_criteria=StoppingCriteriaList([clock]),
        )
    peak = torch.cuda.max_memory_allocated(dev) - base if dev.type == "cuda" else 0
    note = ""
    if mode == "spillway" and arena_bytes and peak:
        note = f"(the lent arena, {format_bytes(arena_bytes)}, is on this GPU and excluded)"
    steps = clock.times
    decode = (len(steps) - 1) / (steps[-1] - steps[0]) if len(steps) > 1 else 0.0
    close = getattr(cache, "close", None)
    if close is not None:
        close()
    del cache
    return Run(mode, out[0, ids.shape[1] :].tolist(), decode, steps[0] - t0, peak, note)


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="bench_transformers", description=__doc__.split("\n\n")[0])
    gpu = torch.cuda.is_available()
    ap.add_argument("--context", type=int, default=32768 if gpu else 512, help="prompt tokens")
    ap.add_argument("--new-tokens", type=int, default=32 if gpu else 8)
    ap.add_argument("--layers", type=int, default=32 if gpu else 2)
    ap.add_argument("--chunk-tokens", type=int, default=256)
    ap.add_argument("--modes", default=",".join(MODES))
    args = ap.parse_args(argv)
    # deterministic algorithms: without them the same greedy decode may pick other tokens
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)
    from transformers import DynamicCache, LlamaForCausalLM

    from spillway.integrations.transformers import SpillwayCache

    dev = torch.device("cuda", 0) if gpu else torch.device("cpu")
    lender = torch.device("cuda", 1 if torch.cuda.device_count() > 1 else 0) if gpu else torch.device("cpu")
    cfg = (llama3_8b_config if gpu else tiny_config)(args.layers, args.context)
    dtype = torch.bfloat16 if gpu else torch.float32
    torch.manual_seed(0)
    with torch.device(dev):
        model = LlamaForCausalLM._from_config(cfg, dtype=dtype, attn_implementation="sdpa").eval()
    ids = torch.randint(3, cfg.vocab_size, (1, args.context), generator=torch.Generator().manual_seed(1)).to(dev)
    text = cfg.get_text_config(decoder=True)
    head_dim = text.hidden_size // text.num_attention_heads
    kv_bytes = 2 * text.num_hidden_layers * text.num_key_value_heads * head_dim * torch.finfo(dtype).bits // 8
    chunks = -(-(args.context + args.new_tokens) // args.chunk_tokens)
    lease_bytes = kv_bytes * chunks * args.chunk_tokens + (64 << 20)
    label = torch.cuda.get_device_name(dev) if gpu else f"CPU only ({platform.processor() or platform.machine()})"
    shape = "Llama-3-8B" if gpu else "small Llama"
    print(
        f"{label}: {shape}-shaped random model, {args.layers} layers, {dtype}, batch 1, context {args.context}, "
        f"{args.new_tokens} new tokens; KV {format_bytes(kv_bytes * (args.context + args.new_tokens))}; "
        f"lender {lender}" + ("" if gpu else " (a scaled-down model: no GPU here)")
    )
    modes = [m for m in args.modes.split(",") if m]
    runs: list[Run] = []
    with AgentProcess() as agent:
        gpu_uuid = _first_gpu(agent)
        for mode in modes:
            if mode == "hf-offload" and not gpu:
                print("hf-offload: skipped (transformers' offloading needs CUDA)")
                continue
            if mode == "spillway":
                size = f"{-(-lease_bytes // (1 << 20))}Mi"
                with PeerMemory.acquire(str(agent.socket), size, gpu_uuid=gpu_uuid, device=lender) as pm:
                    arena = pm.stats().peer_capacity_bytes if lender == dev else 0
                    runs.append(run_mode(mode, model, ids, args.new_tokens,
                                         lambda pm=pm: SpillwayCache(pm, cfg, chunk_tokens=args.chunk_tokens), arena))
            else:
                offload = mode == "hf-offload"
                runs.append(run_mode(mode, model, ids, args.new_tokens,
                                     lambda offload=offload: DynamicCache(config=cfg, offloading=offload), 0))
    ref = next((r for r in runs if r.mode == "plain"), None)
    print(f"{'mode':<12} {'decode tok/s':>12} {'x plain':>8} {'prefill s':>10} {'peak beyond weights':>20}  tokens")
    for r in runs:
        same = "reference" if r is ref else ("same" if ref and r.tokens == ref.tokens else "DIFFERENT")
        ratio = r.decode_tok_s / ref.decode_tok_s if ref and ref.decode_tok_s else 0.0
        peak = format_bytes(r.peak_bytes) if gpu else "-"
        print(f"{r.mode:<12} {r.decode_tok_s:>12.2f} {ratio:>8.2f} {r.prefill_s:>10.2f} {peak:>20}  {same} {r.note}")
    hf = next((r for r in runs if r.mode == "hf-offload"), None)
    sp = next((r for r in runs if r.mode == "spillway"), None)
    if hf and sp and hf.decode_tok_s:
        print(f"spillway / hf-offload decode: {sp.decode_tok_s / hf.decode_tok_s:.2f}x (goal >= 3x at 32K)")
    different = [r.mode for r in runs if ref and r.tokens != ref.tokens]
    if different:
        print(f"tokens differ from plain: {', '.join(different)}")
        return 1
    return 0


def _first_gpu(agent: AgentProcess) -> str:
    import asyncio

    async def go() -> str:
        async with agent.client() as c:
            return str((await c.inventory()).gpus[0].uuid)

    return asyncio.run(go())


if __name__ == "__main__":
    import sys

    raise SystemExit(main(sys.argv[1:]))

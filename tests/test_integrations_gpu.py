"""spillway.integrations on a real GPU. Skipped only when no NVIDIA GPU is present.

- The vLLM spec, from vLLM's own factory and the user's --kv-transfer-config, on a lease of the
  agent's nvml backend (the lender found by UUID: the last GPU, cuda:0 itself on a one-GPU
  machine): vLLM-shaped CUDA page tensors round-trip byte for byte through the lease, and the
  store and load are timed beside a raw same-device gather of the same pages (printed). Needs
  vLLM's Python files (requirements-vllm.txt) beside the tree.
- transformers: greedy generate() of a small random Llama in bf16 on the GPU with SpillwayCache
  gives the tokens of the plain cache (deterministic algorithms on), with the next layer
  prefetched on the side stream.

The Llama-3-8B-shaped comparison with transformers' own offloading is benchmarks/bench_transformers.py."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterator

import pytest
import torch

from spillway.client import PeerMemory
from spillway.testing.agentproc import AgentProcess
from tests.test_client_gpu import first_gpu, lender

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no NVIDIA GPU present"),
]

DEV = torch.device("cuda", 0)


@pytest.fixture
def deterministic() -> Iterator[None]:
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    yield
    torch.use_deterministic_algorithms(before)


def timed(fn: Callable[[], object]) -> float:
    torch.cuda.synchronize(DEV)
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize(DEV)
    return time.perf_counter() - t0


def test_vllm_worker_round_trips_cuda_pages_through_the_lease(monkeypatch: pytest.MonkeyPatch) -> None:
    from vllm.v1.kv_offload.base import (
        CanonicalKVCacheRef,
        CanonicalKVCaches,
        CanonicalKVCacheTensor,
        GPULoadStoreSpec,
        ReqContext,
        make_offload_key,
    )
    from vllm.v1.kv_offload.factory import OffloadingSpecFactory

    from tests.test_integrations_vllm import USER_CONFIG, offloading_config

    layers, page, blocks, n = 32, 64 << 10, 512, 256  # Llama-3-8B pages of 16 tokens; 512 MiB a job
    with AgentProcess(extra_args=["--backend", "nvml", "--headroom-min", "1Gi"]) as agent:
        import asyncio

        async def acquire() -> tuple[str, str, str]:
            async with agent.client() as c:
                inv = await c.inventory()
                gpu = inv.gpus[-1].uuid
                got = await c.acquire("1Gi", "vllm-test", gpu_uuid=gpu)
                return gpu, got.lease.id, got.token

        gpu, lease_id, token = asyncio.run(acquire())
        monkeypatch.setenv("SPILLWAY_LEASE_ID", lease_id)
        monkeypatch.setenv("SPILLWAY_LEASE_TOKEN", token)
        monkeypatch.setenv("SPILLWAY_AGENT_SOCKET", str(agent.socket))
        extra = json.loads(USER_CONFIG)["kv_connector_extra_config"]
        spec = OffloadingSpecFactory.create_spec(offloading_config(extra, page=page, layers=layers))
        manager = spec.get_manager()
        tensors = [torch.randint(-128, 127, (blocks, page), dtype=torch.int8, device=DEV) for _ in range(layers)]
        caches = CanonicalKVCaches(
            tensors=[CanonicalKVCacheTensor(t, page) for t in tensors],
            group_data_refs=[[CanonicalKVCacheRef(tensor_idx=i, page_size_bytes=page) for i in range(layers)]],
        )
        worker = spec.get_worker(caches)
        try:
            assert worker.slots.kind == "cuda"
            ctx = ReqContext(req_id="r")
            keys = [make_offload_key(i.to_bytes(8, "big"), 0) for i in range(n)]
            src = torch.randperm(blocks)[:n].tolist()
            dst = torch.randperm(blocks)[:n].tolist()
            want = [t[src].clone() for t in tensors]
            out = manager.prepare_store(keys, ctx)
            assert out is not None

            def store() -> None:
                worker.submit_store(1, GPULoadStoreSpec(src, [n], [0]), out.store_spec)
                worker.wait({1})

            def load() -> None:
                worker.submit_load(2, load_spec, GPULoadStoreSpec(dst, [n], [0]))
                worker.wait({2})

            store_s = timed(store)
            assert [r.success for r in worker.get_finished()] == [True]
            manager.complete_store(keys, ctx)
            for t in tensors:
                t.zero_()
            load_spec = manager.prepare_load(keys, ctx)
            load_s = timed(load)
            assert [r.success for r in worker.get_finished()] == [True]
            assert all(torch.equal(t[dst], w) for t, w in zip(tensors, want, strict=True))
            idx = torch.tensor(src, device=DEV)
            raw_s = timed(lambda: [t.index_select(0, idx) for t in tensors])
            nbytes = n * page * layers
            print(
                f"\nvLLM worker, {nbytes >> 20} MiB ({n} blocks x {layers} layers x {page >> 10} KiB) on lender {gpu}: "
                f"store {nbytes / store_s / 1e9:.0f} GB/s, load {nbytes / load_s / 1e9:.0f} GB/s, "
                f"raw same-device gather {nbytes / raw_s / 1e9:.0f} GB/s"
            )
        finally:
            worker.shutdown()
            manager.shutdown()


def test_transformers_generate_on_the_gpu_gives_the_plain_caches_tokens(
    agent: AgentProcess, deterministic: None
) -> None:
    from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

    from spillway.integrations.transformers import SpillwayCache

    cfg = LlamaConfig(
        vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=8, num_attention_heads=16,
        num_key_value_heads=4, max_position_embeddings=8192, pad_token_id=0,
    )
    torch.manual_seed(0)
    with torch.device(DEV):
        model = LlamaForCausalLM._from_config(cfg, dtype=torch.bfloat16, attn_implementation="sdpa").eval()
    ids = torch.randint(3, 32000, (1, 4096), generator=torch.Generator().manual_seed(1)).to(DEV)

    def generate(cache: object) -> list[int]:
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=24,
                                 do_sample=False, past_key_values=cache)
        return out[0, ids.shape[1] :].tolist()

    reference = generate(DynamicCache(config=cfg))
    with PeerMemory.acquire(str(agent.socket), "256Mi", gpu_uuid=first_gpu(agent), device=lender()) as pm:
        cache = SpillwayCache(pm, cfg, chunk_tokens=256)
        assert generate(cache) == reference
        assert cache.slots is not None and cache.slots.kind == "cuda"
        cache.close()

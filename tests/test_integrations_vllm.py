"""spillway.integrations.vllm against the real vLLM (the pinned release, installed without its
dependencies: requirements-vllm.txt), on the CPU.

The spec comes out of vLLM's own OffloadingSpecFactory, from the `--kv-transfer-config` a user
writes; the lease is a real one from a real agent subprocess (simulated GPUs), so the worker's
slots are the simulated-cpu arena of the lease and a revocation is the agent's real REVOKING.
vLLM's page tensors are CPU tensors of the shape its worker hands over (int8 [blocks, page])."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
import torch
from vllm.v1.kv_offload.base import (
    CanonicalKVCacheRef,
    CanonicalKVCaches,
    CanonicalKVCacheTensor,
    GPULoadStoreSpec,
    LookupResult,
    OffloadKey,
    ReqContext,
    ScheduleEndContext,
    make_offload_key,
)
from vllm.v1.kv_offload.config import (
    OffloadingCacheConfig,
    OffloadingConfig,
    OffloadingGroupConfig,
    OffloadingModelConfig,
    OffloadingParallelConfig,
)
from vllm.v1.kv_offload.factory import OffloadingSpecFactory

from spillway.client import LeaseUnavailable
from spillway.integrations.vllm import (
    SUPPORTED_VLLM,
    SpillwayOffloadingManager,
    SpillwayOffloadingSpec,
    SpillwayOffloadingWorker,
    UnsupportedVllm,
    check_vllm_version,
)
from spillway.testing.agentproc import AgentProcess
from tests.test_client_lease import acquire_env, call, wait_for

# What a user passes to `vllm serve --kv-transfer-config` (README, docs/client.md)
USER_CONFIG = (
    '{"kv_connector": "OffloadingConnector", "kv_role": "kv_both", "kv_connector_extra_config": '
    '{"spec_name": "SpillwayOffloadingSpec", "spec_module_path": "spillway.integrations.vllm"}}'
)
PAGE = 4096  # bytes per block per layer (a small model's page)
LAYERS = 2
BLOCKS = 64  # GPU blocks in vLLM's KV cache
CTX = ReqContext(req_id="r0")


def offloading_config(
    extra: dict[str, object], *, blocks_per_chunk: int = 1, world_size: int = 1, page: int = PAGE, layers: int = LAYERS
) -> OffloadingConfig:
    """What vLLM's build_offloading_config makes for one full-attention group of `layers` layers."""
    return OffloadingConfig(
        groups=(OffloadingGroupConfig(tokens_per_block=16, layer_names=tuple(f"l{i}" for i in range(layers)),
                                      group_id=0),),
        worker_kv_bytes_per_block=page * layers,
        enable_kv_cache_events=True,
        extra_config=extra,
        engine_id="engine-0",
        model=OffloadingModelConfig(name="tiny", dtype="float16", max_model_len=4096),
        cache=OffloadingCacheConfig(tokens_per_hash=16, blocks_per_chunk=blocks_per_chunk),
        parallel=OffloadingParallelConfig(
            rank=0, world_size=world_size, tp_size=world_size, pp_size=1, pcp_size=1, dcp_size=1,
            data_parallel_index=0, data_parallel_size=1, data_parallel_rank_local=None, is_parallelism_agnostic=True,
        ),
    )


def user_extra(**more: object) -> dict[str, object]:
    cfg = json.loads(USER_CONFIG)
    assert cfg["kv_connector"] == "OffloadingConnector"
    return {**cfg["kv_connector_extra_config"], **more}


def kv_caches(seed: int, *, padded: bool = False) -> tuple[CanonicalKVCaches, list[torch.Tensor]]:
    """vLLM's worker-side view: one int8 [blocks, page] tensor per layer (rows padded past the
    page when `padded`, as some attention backends lay them out)."""
    g = torch.Generator().manual_seed(seed)
    row = PAGE + (256 if padded else 0)
    tensors = [torch.randint(-128, 127, (BLOCKS, row), generator=g, dtype=torch.int8) for _ in range(LAYERS)]
    caches = CanonicalKVCaches(
        tensors=[CanonicalKVCacheTensor(t, row) for t in tensors],
        group_data_refs=[[CanonicalKVCacheRef(tensor_idx=i, page_size_bytes=PAGE) for i in range(LAYERS)]],
    )
    return caches, tensors


def keys(n: int, start: int = 0) -> list[OffloadKey]:
    return [make_offload_key(i.to_bytes(16, "big"), 0) for i in range(start, start + n)]


def gpu_spec(blocks: list[int], first_block_index: int = 0) -> GPULoadStoreSpec:
    return GPULoadStoreSpec(blocks, group_sizes=[len(blocks)], block_indices=[first_block_index])


def pages(tensors: list[torch.Tensor], blocks: list[int]) -> list[bytes]:
    return [t[b, :PAGE].numpy().tobytes() for b in blocks for t in tensors]


@pytest.fixture
def lease_env(agent: AgentProcess, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[dict[str, str], str]]:
    env, gpu = acquire_env(agent, size="64Mi")
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    yield env, gpu


def finished(worker: SpillwayOffloadingWorker, job_ids: set[int]) -> dict[int, bool]:
    worker.wait(job_ids)
    got = {r.job_id: r.success for r in worker.get_finished()}
    assert set(got) == job_ids
    return got


def test_vllms_factory_loads_the_spec_from_the_users_kv_transfer_config(lease_env: tuple[dict[str, str], str]) -> None:
    spec = OffloadingSpecFactory.create_spec(offloading_config(user_extra()))
    assert type(spec) is SpillwayOffloadingSpec
    manager = spec.get_manager()
    try:
        assert isinstance(manager, SpillwayOffloadingManager)
        assert manager.num_slots == (64 << 20) // (PAGE * LAYERS)  # the lease, in chunks
        assert manager.free_slots == manager.num_slots
    finally:
        manager.shutdown()


def test_manager_lookup_store_hit_load_and_lru_eviction(lease_env: tuple[dict[str, str], str]) -> None:
    spec = OffloadingSpecFactory.create_spec(offloading_config(user_extra(max_bytes=4 * PAGE * LAYERS)))
    m = spec.get_manager()
    try:
        assert m.num_slots == 4
        a, b, c, d, e = keys(5)
        assert m.lookup(a, CTX) is LookupResult.MISS
        out = m.prepare_store([a, b], CTX)
        assert out is not None and out.keys_to_store == [a, b] and out.evicted_keys == []
        slot_a, slot_b = out.store_spec.block_ids.tolist()
        assert m.lookup(a, CTX) is LookupResult.HIT_PENDING  # being written: not readable yet
        m.complete_store([a, b], CTX)
        assert m.lookup(a, CTX) is LookupResult.HIT and m.lookup(b, CTX) is LookupResult.HIT
        stored = list(m.take_events())
        assert [(ev.keys, ev.removed) for ev in stored] == [([a, b], False)]
        load = m.prepare_load([a], CTX)
        assert load.block_ids.tolist() == [slot_a]
        # storing an existing key stores nothing; a failed store frees its slot
        again = m.prepare_store([a, c], CTX)
        assert again is not None and again.keys_to_store == [c]
        m.complete_store([c], CTX, success=False)
        assert m.lookup(c, CTX) is LookupResult.MISS and m.free_slots == 2
        out = m.prepare_store([c, d], CTX)
        assert out is not None
        m.complete_store([c, d], CTX)  # the lease is full: a, b, c, d
        # a is being loaded, so the least recently used evictable key is b
        out = m.prepare_store([e], CTX)
        assert out is not None and out.evicted_keys == [b] and out.store_spec.block_ids.tolist() == [slot_b]
        assert m.lookup(b, CTX) is LookupResult.MISS
        m.complete_store([e], CTX)
        m.complete_load([a], CTX)
        m.touch([c], CTX)  # c is used again: a goes next
        (f,) = keys(1, start=10)
        out = m.prepare_store([f], CTX)
        assert out is not None and out.evicted_keys == [a]
        # nothing evictable (all pending or protected): refused, nothing changes
        assert m.prepare_store(keys(5, start=20), CTX) is None
        assert m.lookup(c, CTX) is LookupResult.HIT and m.free_slots == 0
        events = [(ev.keys, ev.removed) for ev in m.take_events()]
        assert ([b], True) in events and ([a], True) in events
    finally:
        m.shutdown()


@pytest.mark.parametrize(("blocks_per_chunk", "padded"), [(1, False), (2, True)])
def test_worker_round_trips_pages_byte_for_byte_through_the_lease(
    lease_env: tuple[dict[str, str], str], blocks_per_chunk: int, padded: bool
) -> None:
    spec = OffloadingSpecFactory.create_spec(offloading_config(user_extra(), blocks_per_chunk=blocks_per_chunk))
    m = spec.get_manager()
    caches, tensors = kv_caches(seed=blocks_per_chunk, padded=padded)
    w = spec.get_worker(caches)
    try:
        assert w.slots.kind == "simulated-cpu" and w.slots.num_slots == m.num_slots
        src_blocks = [5, 9, 2, 40, 41, 42, 17]  # a request's blocks, in its order
        # the first block sits at index 1 of its chunk: with 2 blocks per chunk it starts part-way
        first = 1 if blocks_per_chunk > 1 else 0
        n_chunks = -(-(len(src_blocks) + first) // blocks_per_chunk)
        ks = keys(n_chunks)
        out = m.prepare_store(ks, CTX)
        assert out is not None
        want = pages(tensors, src_blocks)
        assert w.submit_store(1, gpu_spec(src_blocks, first), out.store_spec)
        assert finished(w, {1}) == {1: True}
        m.complete_store(ks, CTX)
        for t in tensors:  # the GPU blocks are reused by other requests
            t.zero_()
        dst_blocks = [30, 3, 4, 60, 61, 0, 7]
        assert all(m.lookup(k, CTX) is LookupResult.HIT for k in ks)
        assert w.submit_load(2, m.prepare_load(ks, CTX), gpu_spec(dst_blocks, first))
        assert finished(w, {2}) == {2: True}
        m.complete_load(ks, CTX)
        assert pages(tensors, dst_blocks) == want
        untouched = [b for b in range(BLOCKS) if b not in dst_blocks]
        assert all(not t[untouched].any() for t in tensors)  # no other block was written
    finally:
        w.shutdown()
        m.shutdown()


@pytest.mark.parametrize(
    ("on_revoke", "fail_revoked_jobs"), [("recompute", False), ("recompute", True), ("host", False)]
)
def test_a_revocation_mid_job_never_returns_wrong_bytes_and_then_misses(
    agent: AgentProcess, lease_env: tuple[dict[str, str], str], on_revoke: str, fail_revoked_jobs: bool
) -> None:
    """A store and a load are in flight (submitted, not yet reported) when the lender takes its
    memory back. With vLLM 0.33 (whose connector stops the engine on a failed transfer) they
    are reported done: their bytes are right, the slots moved to host memory; a vLLM that takes
    failed transfers gets them reported failed. Either way, with on_revoke=recompute every
    lookup then MISSes and nothing more is stored, so vLLM recomputes."""
    env, gpu = lease_env
    spec = OffloadingSpecFactory.create_spec(offloading_config(user_extra(on_revoke=on_revoke)))
    assert spec.fail_revoked_jobs is False  # vLLM 0.33 cannot take a failed transfer
    m = spec.get_manager()
    caches, tensors = kv_caches(seed=7)
    w = spec.get_worker(caches)
    w.fail_revoked_jobs = fail_revoked_jobs  # as it is where vLLM accepts failed transfers
    try:
        done_keys = keys(3)
        out = m.prepare_store(done_keys, CTX)
        assert out is not None
        want = pages(tensors, [0, 1, 2])
        w.submit_store(1, gpu_spec([0, 1, 2]), out.store_spec)
        assert finished(w, {1}) == {1: True}
        m.complete_store(done_keys, CTX)
        # in flight across the revocation: a store of new keys and a load of stored ones
        new_keys = keys(2, start=3)
        out = m.prepare_store(new_keys, CTX)
        assert out is not None
        w.submit_store(2, gpu_spec([10, 11]), out.store_spec)
        w.submit_load(3, m.prepare_load(done_keys, CTX), gpu_spec([20, 21, 22]))

        resp = call(agent, lambda c: c.reclaim(gpu, "64Mi", reason="lender needs it", deadline_s=4.0))
        assert [x.id for x in resp.revoking] == [env["SPILLWAY_LEASE_ID"]]
        wait_for(lambda: w.revocations == 1, 10, "the worker's slots to move to host memory")
        assert w.slots.kind == "host-pageable" and w.slots.generation == 1
        wait_for(lambda: m.revoked.is_set(), 10, "the scheduler's manager to hear of the revocation")

        results = finished(w, {2, 3})
        assert results == {2: not fail_revoked_jobs, 3: not fail_revoked_jobs}
        assert pages(tensors, [20, 21, 22]) == want  # the load that spanned it: right bytes
        m.complete_store(new_keys, CTX, success=results[2])
        m.complete_load(done_keys, CTX)
        m.on_schedule_end(ScheduleEndContext(new_req_ids=(), preempted_req_ids=()))

        if on_revoke == "recompute":
            assert all(m.lookup(k, CTX) is LookupResult.MISS for k in [*done_keys, *new_keys])
            assert m.prepare_store(keys(1, start=50), CTX) is None  # no more offloading
            removed = [k for ev in m.take_events() if ev.removed and not ev.metadata_only for k in ev.keys]
            assert set(done_keys) <= set(removed)  # vLLM's KV event stream hears they are gone
        else:  # host: the slots go on serving from host memory, byte for byte
            assert all(m.lookup(k, CTX) is LookupResult.HIT for k in done_keys)
            for t in tensors:
                t.zero_()
            w.submit_load(4, m.prepare_load(done_keys, CTX), gpu_spec([30, 31, 32]))
            assert finished(w, {4}) == {4: True}
            assert pages(tensors, [30, 31, 32]) == want
            out = m.prepare_store(keys(1, start=50), CTX)
            assert out is not None and out.keys_to_store
    finally:
        w.shutdown()
        m.shutdown()


def test_host_memory_without_a_lease_when_asked_and_a_clear_refusal_otherwise(monkeypatch: pytest.MonkeyPatch) -> None:
    for k in ("SPILLWAY_LEASE_ID", "SPILLWAY_LEASE_TOKEN", "SPILLWAY_AGENT_SOCKET"):
        monkeypatch.delenv(k, raising=False)
    with pytest.raises(LeaseUnavailable, match=r"request spillway.dev/peer-hbm .* host_bytes"):
        OffloadingSpecFactory.create_spec(offloading_config(user_extra()))
    spec = OffloadingSpecFactory.create_spec(offloading_config(user_extra(host_bytes="1Mi")))
    m = spec.get_manager()
    caches, tensors = kv_caches(seed=3)
    w = spec.get_worker(caches)
    try:
        assert m.num_slots == (1 << 20) // (PAGE * LAYERS) and w.slots.kind.startswith("host-")
        ks = keys(2)
        out = m.prepare_store(ks, CTX)
        assert out is not None
        want = pages(tensors, [8, 9])
        w.submit_store(1, gpu_spec([8, 9]), out.store_spec)
        m.complete_store(ks, CTX)
        w.submit_load(2, m.prepare_load(ks, CTX), gpu_spec([50, 51]))
        assert finished(w, {1, 2}) == {1: True, 2: True}
        assert pages(tensors, [50, 51]) == want
    finally:
        w.shutdown()
        m.shutdown()


@pytest.mark.parametrize(
    ("extra", "world_size", "message"),
    [
        ({"on_revoke": "ignore"}, 1, "on_revoke 'ignore' is not one of recompute, host"),
        ({"max_bytes": "lots"}, 1, "max_bytes 'lots' is not a size"),
        ({}, 2, "one GPU worker per lease; this engine has 2 workers"),
    ],
)
def test_bad_options_are_refused_with_what_to_fix(
    lease_env: tuple[dict[str, str], str], extra: dict[str, object], world_size: int, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        OffloadingSpecFactory.create_spec(offloading_config(user_extra(**extra), world_size=world_size))


def test_an_unsupported_vllm_is_refused_with_the_supported_range(monkeypatch: pytest.MonkeyPatch) -> None:
    assert str(check_vllm_version()) == "0.33.0"  # the pinned one is accepted
    # the user's path: vLLM's factory imports the package, whose first act is the check
    import sys
    from importlib import metadata

    real = metadata.version
    monkeypatch.setattr(metadata, "version", lambda name: "0.34.1" if name == "vllm" else real(name))
    monkeypatch.delitem(sys.modules, "spillway.integrations.vllm")
    with pytest.raises(UnsupportedVllm, match=r"vLLM 0.34.1 is not supported .* vllm>=0.33.0,<0.34"):
        OffloadingSpecFactory.create_spec(offloading_config(user_extra(host_bytes="1Mi")))
    for bad in ("0.32.4", "0.34.0", "1.0.0"):
        with pytest.raises(UnsupportedVllm, match=f"vLLM {bad} is not supported") as err:
            check_vllm_version(bad)
        assert SUPPORTED_VLLM == ">=0.33.0,<0.34" and SUPPORTED_VLLM in str(err.value)


def test_slot_numbering_agrees_between_scheduler_and_worker() -> None:
    from spillway.integrations.vllm.spec import arena_sizes, slots_that_fit

    assert arena_sizes([64 << 20, 32 << 20], 80 << 20) == [64 << 20, 16 << 20]
    assert slots_that_fit([64 << 20], 8192) == 8192
    assert slots_that_fit([1 << 20, 1 << 20], 3001) == 2 * ((1 << 20) // 3008)  # per arena, 8-byte stride


def test_the_scheduler_side_refuses_a_wrong_token_and_a_missing_agent(
    lease_env: tuple[dict[str, str], str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import grpc

    monkeypatch.setenv("SPILLWAY_LEASE_TOKEN", "not-the-token")
    spec = OffloadingSpecFactory.create_spec(offloading_config(user_extra()))
    with pytest.raises(grpc.aio.AioRpcError) as err:
        spec.get_manager()
    assert err.value.code() is grpc.StatusCode.PERMISSION_DENIED
    monkeypatch.setenv("SPILLWAY_AGENT_SOCKET", "/tmp/spw-no-agent-here.sock")
    spec = OffloadingSpecFactory.create_spec(offloading_config(user_extra()))
    assert isinstance(spec, SpillwayOffloadingSpec)
    spec.agent_timeout_s = 1.0
    with pytest.raises(TimeoutError, match="check that the agent runs and that its socket is mounted"):
        spec.get_manager()

"""The block store on its own (no agent): round trips with checksums, batching, the byte
budget, tier migration. The peer tier here is the CPU arena the client uses when no GPU is
present (labelled simulated-cpu); tests/test_client_gpu.py repeats the essentials on a GPU."""

from __future__ import annotations

import hashlib
import random
import threading
import time

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from spillway.client import HostMemory, OutOfPeerMemory, UnknownBlock
from spillway.client.arena import ALIGNMENT, RangeAllocator, Tier, align_up
from spillway.client.store import BlockStore, _as_block


def digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()).hexdigest()


def make_store(peer_bytes: int, device: str = "cpu") -> BlockStore:
    return BlockStore(
        Tier("simulated-cpu", torch.device(device), fixed_bytes=peer_bytes),
        Tier("host-pageable", torch.device("cpu"), chunk_bytes=1 << 20),
    )


def random_block(nbytes: int, dtype: torch.dtype = torch.float16, gen: torch.Generator | None = None) -> torch.Tensor:
    n = nbytes // torch.empty(0, dtype=dtype).element_size()
    return torch.randint(-(2**7), 2**7, (n,), dtype=torch.int16, generator=gen).to(dtype)


@pytest.mark.parametrize("block_bytes", [16 << 10, 64 << 10, 256 << 10, 3 * 1000 + 2])
@pytest.mark.parametrize("batch", [1, 7, 64])
def test_put_get_round_trip_preserves_every_byte(block_bytes: int, batch: int) -> None:
    gen = torch.Generator().manual_seed(block_bytes + batch)
    store = make_store(align_up(block_bytes) * batch * 2)
    blocks = [random_block(block_bytes, gen=gen) for _ in range(batch)]
    sums = [digest(b) for b in blocks]
    keys = [f"seq/{i}" for i in range(batch)]
    store.put(keys, blocks).synchronize()
    for b in blocks:  # the store must own a copy: scribbling on the sources changes nothing
        b.zero_()
    fetched = store.get(keys).result()
    assert [digest(t) for t in fetched] == sums
    # into caller-provided buffers, in another order, across two gets
    outs = [torch.empty_like(b) for b in blocks]
    order = list(range(batch))
    random.Random(1).shuffle(order)
    store.get([keys[i] for i in order], out=[outs[i] for i in order]).synchronize()
    assert [digest(t) for t in outs] == sums
    assert store.counts() == {"primary": batch, "fallback": 0}


def test_mixed_dtypes_and_shapes_come_back_as_they_went_in() -> None:
    store = make_store(1 << 20)
    blocks = [
        torch.arange(24, dtype=torch.float32).reshape(2, 3, 4),
        torch.tensor([True, False, True]),
        torch.arange(5, dtype=torch.int64),
        torch.randn(4, 8).to(torch.bfloat16),
    ]
    store.put(["a", "b", "c", "d"], blocks)
    for got, want in zip(store.get(["a", "b", "c", "d"]).result(), blocks, strict=True):
        assert got.dtype == want.dtype and got.shape == want.shape
        assert torch.equal(got, want)


def test_a_batch_lands_in_one_contiguous_range() -> None:
    store = make_store(1 << 20)
    store.put(list(range(32)), [torch.ones(4096, dtype=torch.uint8) * i for i in range(32)])
    offsets = sorted(store._index[k].extent.offset for k in range(32))
    assert offsets == [offsets[0] + i * 4096 for i in range(32)]


def test_budget_is_never_exceeded_and_a_batch_that_does_not_fit_changes_nothing() -> None:
    cap = 256 << 10
    store = make_store(cap)
    first = [random_block(16 << 10) for _ in range(12)]  # 192 KiB
    store.put([f"a{i}" for i in range(12)], first)
    with pytest.raises(OutOfPeerMemory, match=r"does not fit in the leased memory.*nothing was stored"):
        store.put([f"b{i}" for i in range(5)], [random_block(16 << 10) for _ in range(5)])  # 80 KiB > 64 KiB free
    assert store.primary.used_bytes <= cap and store.primary.capacity_bytes == cap
    assert len(store) == 12 and not any(f"b{i}" in store for i in range(5))
    assert [digest(t) for t in store.get([f"a{i}" for i in range(12)]).result()] == [digest(b) for b in first]
    # exactly filling it works; one more byte does not
    store.put([f"c{i}" for i in range(4)], [random_block(16 << 10) for _ in range(4)])
    assert store.primary.used_bytes == cap
    with pytest.raises(OutOfPeerMemory):
        store.put(["d"], [torch.zeros(1, dtype=torch.uint8)])
    # evicting makes room again
    assert store.evict([f"a{i}" for i in range(4)]) == 4
    store.put(["d"], [torch.zeros(64 << 10, dtype=torch.uint8)])
    assert store.primary.used_bytes == cap


def test_replacing_a_key_keeps_the_new_bytes_and_frees_the_old() -> None:
    store = make_store(64 << 10)
    store.put(["k"], [torch.full((16 << 10,), 1, dtype=torch.uint8)])
    store.put(["k"], [torch.full((16 << 10,), 2, dtype=torch.uint8)])
    assert store.primary.used_bytes == 16 << 10
    assert int(store.get(["k"]).result()[0].sum()) == 2 * (16 << 10)


def test_clear_errors_for_bad_calls() -> None:
    store = make_store(64 << 10)
    with pytest.raises(ValueError, match="2 keys but 1 tensors"):
        store.put(["a", "b"], [torch.zeros(4)])
    with pytest.raises(ValueError, match="same key twice"):
        store.put(["a", "a"], [torch.zeros(4), torch.zeros(4)])
    with pytest.raises(UnknownBlock, match="never put or was evicted"):
        store.get(["nope"])
    store.put(["a"], [torch.zeros(4)])
    with pytest.raises(ValueError, match="has 12 bytes, the block 16"):
        store.get(["a"], out=[torch.zeros(3)])
    assert len(store) == 1
    with pytest.raises(UnknownBlock, match=r"'nope' \(nothing was evicted\)"):
        store.evict(["a", "nope"])
    assert len(store) == 1 and store.primary.used_bytes > 0  # "a" is still there
    assert store.evict(["a", "nope"], missing_ok=True) == 1
    assert store.primary.used_bytes == 0


def test_fragmentation_falls_back_to_per_block_ranges_and_stays_correct() -> None:
    store = make_store(64 * 4096)
    store.put(list(range(64)), [torch.full((4096,), i, dtype=torch.uint8) for i in range(64)])
    store.evict(range(0, 64, 2))  # every other block: 32 holes of 4 KiB, no two adjacent
    new = [torch.full((4096,), 100 + i, dtype=torch.uint8) for i in range(32)]
    store.put([f"n{i}" for i in range(32)], new)
    assert store.primary.used_bytes == 64 * 4096
    got = store.get([f"n{i}" for i in range(32)] + list(range(1, 64, 2))).result()
    assert [int(t[0]) for t in got] == [100 + i for i in range(32)] + list(range(1, 64, 2))
    assert all(bool((t == t[0]).all()) for t in got)


def test_close_primary_moves_every_block_to_host_while_a_writer_keeps_putting() -> None:
    store = make_store(8 << 20)
    written: dict[str, str] = {}
    errors: list[BaseException] = []
    stop = threading.Event()

    def writer() -> None:
        gen = torch.Generator().manual_seed(7)
        i = 0
        try:
            while not stop.is_set() and i < 2000:
                keys = [f"w{i + j}" for j in range(8)]
                blocks = [random_block(16 << 10, gen=gen) for _ in keys]
                try:
                    store.put(keys, blocks).synchronize()
                except OutOfPeerMemory:
                    store.evict([f"w{i - 256 + j}" for j in range(8)], missing_ok=True)
                    for j in range(8):
                        written.pop(f"w{i - 256 + j}", None)
                    continue
                written.update({k: digest(b) for k, b in zip(keys, blocks, strict=True)})
                i += 8
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    t = threading.Thread(target=writer)
    t.start()
    while len(written) < 200 and t.is_alive():
        time.sleep(0.005)
    moved, nbytes, _ = store.close_primary()
    stop.set()
    t.join(timeout=60)
    assert not errors
    assert moved > 0 and nbytes >= moved * (16 << 10)
    assert store.counts()["primary"] == 0 and store.primary.capacity_bytes == 0
    keys = sorted(written)
    assert [digest(x) for x in store.get(keys).result()] == [written[k] for k in keys]


def test_host_memory_fallback_grows_and_keeps_data() -> None:
    mem = HostMemory(limit_bytes="4Mi")
    assert mem.device_kind == "host-pageable"  # no CUDA on this machine: says so
    blocks = [random_block(256 << 10) for _ in range(12)]
    mem.put(list(range(12)), blocks)
    assert [digest(t) for t in mem.get(list(range(12))).result()] == [digest(b) for b in blocks]
    with pytest.raises(Exception, match="host memory limit reached"):
        mem.put(["big"], [torch.zeros(2 << 20, dtype=torch.uint8)])
    assert "tier=host-pageable" in repr(mem)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.integers(1, 9)), min_size=1, max_size=80))
def test_allocator_never_overlaps_and_accounts_exactly(ops: list[tuple[bool, int]]) -> None:
    alloc = RangeAllocator(32 * ALIGNMENT)
    live: dict[int, int] = {}
    for is_alloc, units in ops:
        if is_alloc or not live:
            off = alloc.alloc(units * ALIGNMENT)
            if off is None:
                assert alloc.largest_free < units * ALIGNMENT
                continue
            for o, n in live.items():
                assert off + units * ALIGNMENT <= o or o + n <= off
            assert off + units * ALIGNMENT <= alloc.capacity
            live[off] = units * ALIGNMENT
        else:
            off = sorted(live)[units % len(live)]
            alloc.free(off)
            del live[off]
        assert alloc.used_bytes == sum(live.values())
    for off in list(live):
        alloc.free(off)
    assert alloc.largest_free == alloc.capacity


@pytest.mark.parametrize("row_shape", [(2, 2, 4, 16, 16), (1000,), (3, 7)])  # 16 KiB fp16 rows; unaligned rows
def test_pool_rows_round_trip_with_one_gather_and_one_scatter(row_shape: tuple[int, ...]) -> None:
    gen = torch.Generator().manual_seed(5)
    pool = torch.randn(64, *row_shape, generator=gen).to(torch.float16)
    store = make_store(4 << 20)
    rows = [5, 3, 60, 0, 17, 42, 41, 40]
    want = [digest(pool[r]) for r in rows]
    keys = [("ctx", i) for i in range(len(rows))]
    store.put_rows(keys, pool, rows).synchronize()
    if row_shape == (2, 2, 4, 16, 16):  # aligned rows: one contiguous range, in batch order
        offs = [_as_block(k, store._index[k]).extent.offset for k in keys]
        assert offs == sorted(offs) and offs[-1] - offs[0] == (len(rows) - 1) * pool[0].nbytes
    pool[rows] = 0  # the store holds its own copy
    back = [9, 1, 2, 63, 30, 31, 32, 33]
    store.get_rows(keys, pool, back).synchronize()
    assert [digest(pool[r]) for r in back] == want
    # the general get sees the same blocks, shape and dtype
    got = store.get(keys).result()
    assert got[0].shape == row_shape and got[0].dtype == torch.float16
    assert [digest(t) for t in got] == want


def test_pool_rows_fall_back_when_fragmented_and_respect_the_budget() -> None:
    row = 16 << 10
    store = make_store(16 * row)
    pool = torch.arange(32 * row, dtype=torch.int64).remainder(251).to(torch.uint8).view(32, row)
    for i in range(16):  # one batch per row, so rows free one by one
        store.put_rows([i], pool, [i])
    with pytest.raises(OutOfPeerMemory):
        store.put_rows(["x"], pool, [20])
    store.evict(range(0, 16, 2))  # 8 single-row holes
    store.put_rows([f"f{i}" for i in range(8)], pool, list(range(16, 24)))  # no contiguous room: per-row path
    assert store.primary.used_bytes == 16 * row
    out = torch.zeros(8, row, dtype=torch.uint8)
    store.get_rows([f"f{i}" for i in range(8)], out, list(range(8)))
    assert torch.equal(out, pool[16:24])


def test_a_revocation_copies_into_host_memory_set_aside_ahead() -> None:
    store = make_store(1 << 20)
    spare = torch.empty(1 << 20, dtype=torch.uint8)
    store.spare_host = [spare]
    blocks = [random_block(64 << 10) for _ in range(8)]
    store.put(list(range(8)), blocks)
    store.close_primary()
    assert store.spare_host == []  # used, not a fresh allocation
    assert store._index[0].extent.arena.tensor.data_ptr() == spare.data_ptr()
    assert [digest(t) for t in store.get(list(range(8))).result()] == [digest(b) for b in blocks]


def test_row_batches_free_their_range_when_the_last_block_goes() -> None:
    row = 16 << 10
    store = make_store(9 * row)  # one row spare: a replacement lands before the old copy goes
    pool = torch.arange(8 * row).remainder(253).to(torch.uint8).view(8, row)
    store.put_rows(list(range(8)), pool, list(range(8)))
    assert store.primary.used_bytes == 8 * row
    store.evict(range(7))  # partial: the batch's range stays (block 7 still lives in it)
    assert store.primary.used_bytes == 8 * row
    assert torch.equal(store.get([7]).result()[0], pool[7])
    store.put_rows([7], pool, [0])  # replacing its last block frees the old range
    assert store.primary.used_bytes == row
    out = torch.zeros(1, row, dtype=torch.uint8)
    store.get_rows([7], out, [0])
    assert torch.equal(out[0], pool[0])
    # migration moves row batches too, then they free on the host tier
    store.put_rows(["a", "b"], pool, [3, 4])
    moved, nbytes, _ = store.close_primary()
    assert (moved, nbytes) == (3, 3 * row)
    assert store.tier_of("a") == "host-pageable" and store.counts() == {"primary": 0, "fallback": 3}
    store.get_rows(["a", "b"], out.expand(2, row).contiguous(), [0, 1])
    got = torch.zeros(2, row, dtype=torch.uint8)
    store.get_rows(["b", "a"], got, [0, 1])
    assert torch.equal(got, pool[[4, 3]])
    store.evict(["a", "b", 7])
    assert store.fallback.used_bytes == 0


@settings(max_examples=40, deadline=None)
@given(
    data=st.data(),
    dtype=st.sampled_from([torch.uint8, torch.float16, torch.bfloat16, torch.float32, torch.int64]),
    row_shape=st.sampled_from([(64,), (4, 32), (2, 8, 16), (3, 100)]),
)
def test_keyed_api_round_trips_random_batches_byte_for_byte(
    data: st.DataObject, dtype: torch.dtype, row_shape: tuple[int, ...]
) -> None:
    """put_rows/get_rows and put/get over random batches and row orders, rows that are aligned or
    not, blocks that are views of a bigger tensor (non-contiguous) for put: every byte compared."""
    n_rows = data.draw(st.integers(2, 48), label="rows")
    pool = torch.randint(-100, 100, (n_rows, *row_shape), dtype=torch.int16).to(dtype)
    store = make_store(n_rows * pool[0].numel() * pool.element_size() * 4 + (64 << 10))
    rows = data.draw(st.permutations(range(n_rows)), label="order")[: data.draw(st.integers(1, n_rows), label="n")]
    keys = [("k", r) for r in rows]
    store.put_rows(keys, pool, rows).synchronize()
    back = torch.zeros_like(pool)
    order = data.draw(st.permutations(range(len(rows))), label="get order")
    store.get_rows([keys[i] for i in order], back, [rows[i] for i in order]).synchronize()
    for r in rows:
        assert digest(back[r]) == digest(pool[r])
    # the list form, with non-contiguous blocks (every other element of a row)
    blocks = [pool[r].reshape(-1)[::2] for r in rows]
    lkeys = [("l", r) for r in rows]
    store.put(lkeys, blocks).synchronize()
    got = store.get(lkeys).result()
    assert [digest(g) for g in got] == [digest(b) for b in blocks]
    assert store.evict(keys + lkeys) == 2 * len(rows)
    assert store.primary.used_bytes == 0 and len(store) == 0

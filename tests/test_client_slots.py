"""The slot API (block ids in, block ids out) on the CPU: every byte compared over random
batches, row orders, non-contiguous rows, dtypes, block sizes and in-slot offsets; a revocation
in the middle of a stream of batches loses nothing; bad calls change nothing. The lender is the
CPU arena the client uses without a GPU (simulated-cpu); tests/test_client_gpu.py repeats the
properties on a GPU."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from spillway.client import HostMemory, OutOfPeerMemory, SlotStore
from spillway.client.arena import Tier
from spillway.client.rows import as_index
from spillway.client.store import BlockStore

DTYPES = [torch.uint8, torch.int16, torch.float16, torch.bfloat16, torch.float32, torch.int64]


def make_store(peer_bytes: int, *, lenders: int = 1) -> BlockStore:
    primary = Tier("simulated-cpu", torch.device("cpu"), fixed_bytes=peer_bytes)
    for _ in range(lenders - 1):
        primary.add_fixed(peer_bytes, torch.device("cpu"))
    return BlockStore(primary, Tier("host-pageable", torch.device("cpu"), chunk_bytes=1 << 20))


def random_pool(rows: int, row_shape: tuple[int, ...], dtype: torch.dtype, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(-100, 100, (rows, *row_shape), generator=g, dtype=torch.int16).to(dtype)


def bytes_of(t: torch.Tensor) -> bytes:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


@settings(max_examples=60, deadline=None)
@given(
    data=st.data(),
    dtype=st.sampled_from(DTYPES),
    row_shape=st.sampled_from([(4,), (2, 3), (8, 16), (3, 5, 7), (64,), (1,)]),
    strided=st.booleans(),
    lenders=st.integers(1, 2),
    index_kind=st.sampled_from(["tensor", "int32", "numpy", "list"]),
)
def test_store_then_load_returns_every_byte(
    data: st.DataObject, dtype: torch.dtype, row_shape: tuple[int, ...], strided: bool, lenders: int, index_kind: str
) -> None:
    n_rows = data.draw(st.integers(1, 40), label="pool rows")
    pool = random_pool(n_rows * (2 if strided else 1), row_shape, dtype, seed=n_rows)
    if strided:  # rows of a larger tensor (every other row, as a per-layer view would be)
        pool = pool[::2]
    row_bytes = pool[0].numel() * pool.element_size()
    extra = data.draw(st.integers(0, 24), label="spare bytes per slot")
    slot_bytes = row_bytes + extra
    offset = data.draw(st.integers(0, extra), label="offset")
    store = make_store(64 * (slot_bytes + 8) + 4096, lenders=lenders)
    slots = store.slots(slot_bytes)
    assert slots.num_slots >= 64 * lenders
    batch = data.draw(st.integers(1, n_rows), label="batch")
    rows = data.draw(st.permutations(range(n_rows)), label="rows")[:batch]
    # half the time contiguous slots (as alloc gives them), half the time scattered ids
    ids = slots.alloc(slots.num_slots)
    pick = data.draw(st.booleans(), label="scattered slots")
    shuffled = ids[torch.randperm(len(ids), generator=torch.Generator().manual_seed(batch))]
    chosen = shuffled[:batch] if pick else ids[:batch]

    def ix(v: list[int] | torch.Tensor) -> object:
        t = torch.as_tensor(v, dtype=torch.int64)
        return {"tensor": t, "int32": t.int(), "numpy": t.numpy(), "list": t.tolist()}[index_kind]

    slots.store(pool, ix(rows), ix(chosen), offset=offset).synchronize()
    back = torch.zeros_like(pool)
    slots.load(back, ix(rows), ix(chosen), offset=offset).synchronize()
    for r in rows:
        assert bytes_of(back[r]) == bytes_of(pool[r])
    untouched = sorted(set(range(n_rows)) - set(rows))
    for r in untouched:
        assert not back[r].any()
    # the same slots into other rows of another pool, in another order
    other = torch.zeros_like(pool)
    perm = list(reversed(range(batch)))
    slots.load(other, ix([rows[i] for i in perm]), ix(chosen[perm]), offset=offset).synchronize()
    for r in rows:
        assert bytes_of(other[r]) == bytes_of(pool[r])


def test_two_layers_share_a_slot_at_their_offsets() -> None:
    """The layout engines use: one slot per block holds every layer's page, each at its offset."""
    store = make_store(1 << 20)
    k = random_pool(16, (4, 8), torch.bfloat16, seed=1)  # 64 B pages
    v = random_pool(16, (4, 8), torch.bfloat16, seed=2)
    slots = store.slots(128, 32)
    ids = slots.alloc(5)
    rows = [3, 1, 4, 15, 9]
    slots.store(k, rows, ids, offset=0)
    slots.store(v, rows, ids, offset=64)
    k2, v2 = torch.zeros_like(k), torch.zeros_like(v)
    slots.load(v2, rows, ids, offset=64)
    slots.load(k2, rows, ids, offset=0)
    assert torch.equal(k2[rows], k[rows]) and torch.equal(v2[rows], v[rows])


def test_alloc_is_contiguous_and_free_refuses_what_it_does_not_own() -> None:
    store = make_store(1 << 20)
    slots = store.slots(4096)
    assert slots.num_slots == 256
    a = slots.alloc(100)
    assert a.tolist() == list(range(100))
    b = slots.alloc(10)
    assert b.tolist() == list(range(100, 110))
    slots.free(a[:50])
    c = slots.alloc(50)
    assert sorted(c.tolist()) == list(range(50))
    with pytest.raises(OutOfPeerMemory, match="free slots or make a larger slot store"):
        slots.alloc(slots.free_slots + 1)
    free_before = slots.free_slots
    with pytest.raises(ValueError, match="not allocated"):
        slots.free([200, 201])  # never allocated
    with pytest.raises(ValueError, match="same id twice"):
        slots.free([0, 0])
    with pytest.raises(IndexError, match=r"outside \[0, 256\)"):
        slots.free([256])
    assert slots.free_slots == free_before  # a refused free frees nothing
    slots.free(b)
    assert slots.free_slots == free_before + 10


def test_bad_moves_are_refused_with_a_message_and_change_nothing() -> None:
    store = make_store(1 << 20)
    slots = store.slots(64, 16)
    pool = random_pool(8, (16,), torch.float32, seed=3)  # 64 B rows
    ids = slots.alloc(4)
    slots.store(pool, [0, 1, 2, 3], ids)
    snapshot = bytes_of(store.primary.arenas[0].tensor)
    with pytest.raises(ValueError, match="does not fit a slot of 64 B"):
        slots.store(pool, [0], ids[:1], offset=8)
    with pytest.raises(ValueError, match="4 src_rows but 3 slots"):
        slots.store(pool, [0, 1, 2, 3], ids[:3])
    with pytest.raises(IndexError, match=r"src_rows holds 8, outside \[0, 8\)"):
        slots.store(pool, [8], ids[:1])
    with pytest.raises(IndexError, match=r"slots holds 16, outside \[0, 16\)"):
        slots.store(pool, [0], [16])
    with pytest.raises(IndexError, match=r"slots holds -1"):
        slots.load(pool, [0], [-1])
    with pytest.raises(ValueError, match="must hold integers"):
        slots.store(pool, torch.tensor([0.0]), ids[:1])
    with pytest.raises(ValueError, match="must be contiguous"):
        slots.store(torch.zeros(8, 32)[:, ::2], [0], ids[:1])  # rows that are not contiguous
    assert bytes_of(store.primary.arenas[0].tensor) == snapshot


def test_slots_that_do_not_fit_are_refused_and_reserve_nothing() -> None:
    store = make_store(1 << 16)
    with pytest.raises(OutOfPeerMemory, match="do not fit"):
        store.slots(4096, 17)
    assert store.primary.used_bytes == 0
    s = store.slots(4096, 16)
    assert store.primary.free_bytes == 0
    s.close()
    assert store.primary.used_bytes == 0
    with pytest.raises(RuntimeError, match="closed"):
        s.alloc(1)


def test_slots_and_keyed_blocks_share_the_lease_without_overlap() -> None:
    store = make_store(1 << 20)
    slots = store.slots(4096, 128)  # half the arena
    pool = random_pool(128, (1024,), torch.float32, seed=4)
    ids = slots.alloc(128)
    slots.store(pool, range(128), ids)
    blocks = [random_pool(1, (512,), torch.float32, seed=10 + i)[0] for i in range(100)]
    store.put(list(range(100)), blocks)  # the rest of the arena
    with pytest.raises(OutOfPeerMemory):
        store.put(["one more"], [torch.zeros(100_000)])
    back = torch.zeros_like(pool)
    slots.load(back, range(128), ids)
    assert torch.equal(back, pool)
    assert all(torch.equal(a, b) for a, b in zip(store.get(list(range(100))).result(), blocks, strict=True))


def test_host_memory_slots() -> None:
    mem = HostMemory()
    slots = mem.slots(256, 64)
    assert slots.kind in ("host-pinned", "host-pageable")
    pool = random_pool(64, (128,), torch.bfloat16, seed=5)
    ids = slots.alloc(64)
    order = np.random.default_rng(0).permutation(64)
    slots.store(pool, order, ids)
    back = torch.zeros_like(pool)
    slots.load(back, order, ids)
    assert torch.equal(back, pool)
    with pytest.raises(ValueError, match="give num_slots"):
        mem.slots(256)
    mem.close()


def test_a_revocation_between_batches_moves_the_slots_to_host_memory_and_loses_nothing() -> None:
    """A writer stores batch after batch while the lease is revoked: every batch stored before or
    after the move comes back byte for byte, slot ids stay valid, listeners run once."""
    store = make_store(4 << 20)
    slots = store.slots(16 << 10)
    pool = random_pool(512, (8 << 10,), torch.float16, seed=6)  # 16 KiB rows
    seen: list[int] = []
    slots.add_revoke_listener(lambda s: seen.append(s.generation))
    stored: list[tuple[torch.Tensor, torch.Tensor]] = []
    stop = threading.Event()
    errors: list[BaseException] = []

    def writer() -> None:
        try:
            i = 0
            while not stop.is_set() and slots.free_slots >= 8:
                ids = slots.alloc(8)
                rows = torch.arange(i % 500, i % 500 + 8)
                slots.store(pool, rows, ids).synchronize()
                stored.append((rows, ids))
                i += 8
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    t = threading.Thread(target=writer)
    t.start()
    while len(stored) < 20:
        pass
    assert slots.kind == "simulated-cpu"
    store.close_primary()
    stop.set()
    t.join()
    assert not errors
    assert slots.kind == "host-pageable" and slots.generation == 1 and seen == [1]
    assert store.primary.arenas == []
    for rows, ids in stored:
        back = torch.zeros((8, 8 << 10), dtype=torch.float16)
        slots.load(back, torch.arange(8), ids).synchronize()
        assert torch.equal(back, pool[rows])
    # and the store keeps working on host memory with the same ids
    slots.free(stored[0][1])
    ids = slots.alloc(4)
    slots.store(pool, [0, 1, 2, 3], ids)
    back = torch.zeros((4, 8 << 10), dtype=torch.float16)
    slots.load(back, range(4), ids)
    assert torch.equal(back, pool[:4])


def test_a_revocation_of_one_lease_moves_only_its_slots() -> None:
    store = make_store(1 << 20, lenders=2)
    slots = store.slots(4096)
    assert slots.num_slots == 512 and len(slots.segments) == 2
    pool = random_pool(512, (2048,), torch.float16, seed=7)
    ids = slots.alloc(512)
    slots.store(pool, range(512), ids)
    second = store.primary.arenas[1]
    store.close_primary([second])
    kinds = [seg.tier.kind for seg in slots.segments]
    assert kinds == ["simulated-cpu", "host-pageable"]
    back = torch.zeros_like(pool)
    slots.load(back, torch.randperm(512), ids[torch.randperm(512, generator=torch.Generator().manual_seed(0))])
    back.zero_()
    slots.load(back, range(512), ids)
    assert torch.equal(back, pool)


def test_index_runs_are_found_on_the_host() -> None:
    assert as_index([5, 6, 7], "x", 10).run == 5
    assert as_index(np.array([5, 7]), "x", 10).run is None
    assert as_index(torch.arange(3, 9), "x", 10).run == 3
    assert as_index([], "x", 10).run == 0
    assert as_index([4, 5, 9, 10, 11, 2], "x", 12).runs() == [(4, 2, 0), (9, 3, 2), (2, 1, 5)]


def test_slot_store_repr_names_the_tier() -> None:
    slots = make_store(1 << 16).slots(1024)
    assert isinstance(slots, SlotStore)
    assert "64 x 1024 B on simulated-cpu" in repr(slots)

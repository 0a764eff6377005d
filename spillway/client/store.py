"""The block store: batched, asynchronous put/get/evict of tensors over two tiers.

The primary tier is the lender GPU's leased memory (or, without a GPU, a CPU arena labelled
`simulated-cpu`); the fallback tier is (pinned) host memory. Every block lives in exactly one
tier. A block moves between tiers by copy, synchronize, then index update, then free: it is
never dropped from one tier before it is safely in the other.

Batching: a batch is placed in one contiguous range where possible, gathered on the source
device with one `torch.cat` into that range (or into a staging buffer, then one copy), and
fetched with one copy per contiguous run plus one multi-tensor scatter on the destination.
So a batch of 16 KiB blocks costs a handful of kernels/copies, not one per block.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from itertools import repeat
from typing import cast

import torch

from spillway.client.arena import ALIGNMENT, Arena, Extent, Tier
from spillway.client.rows import Index, as_index, as_words, copy_rows, layout, widest, word_rows
from spillway.client.slots import SlotStore, carve
from spillway.units import format_bytes

log = logging.getLogger("spillway.client")


class StoreError(Exception):
    """Base class of block store errors."""


class OutOfPeerMemory(StoreError):
    """The batch does not fit in the leased memory; nothing of it was stored."""


class UnknownBlock(StoreError, KeyError):
    """A key that the store does not hold."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "unknown block"


@dataclass(slots=True)
class Block:
    key: object
    tier: Tier
    extent: Extent
    nbytes: int
    dtype: torch.dtype
    shape: tuple[int, ...]
    device: torch.device  # where it came from: the default destination of a get


@dataclass(slots=True, eq=False)
class RowBatch:
    """The blocks of one `put_rows`: one allocation, block i at `extent.offset + i * stride`.
    Its range is freed when the last of its blocks is evicted or replaced. Bookkeeping per
    block is then one index entry `(batch, i)`, not an object per block."""

    tier: Tier
    extent: Extent
    stride: int
    nbytes: int
    dtype: torch.dtype
    shape: tuple[int, ...]
    device: torch.device
    live: int


Entry = Block | tuple[RowBatch, int]
_NONE = object()  # a sentinel that no key equals


class Transfer:
    """Handle of one batched put or get. On CUDA the copies run on the store's own streams (one
    per GPU involved); `wait()` makes the caller's current streams wait for them (no host
    block), `synchronize()` blocks the host until they are done. On CPU it is already done."""

    def __init__(
        self,
        events: list[torch.cuda.Event],
        tensors: list[torch.Tensor],
        keep: list[torch.Tensor],
        devices: list[torch.device] | None = None,
    ) -> None:
        self.events = events
        self.devices = devices or []  # the GPU of each event
        self.tensors = tensors
        self._keep = keep  # staging and sources that must live until the copies finish

    def done(self) -> bool:
        return all(bool(e.query()) for e in self.events)

    def wait(self, stream: torch.cuda.Stream | None = None) -> None:
        """Order later work on `stream` (default: the current stream of each GPU involved) after
        these copies."""
        for e, dev in zip(self.events, self.devices, strict=True):
            (stream or torch.cuda.current_stream(dev)).wait_event(e)

    def synchronize(self) -> list[torch.Tensor]:
        for e in self.events:
            e.synchronize()
        self._keep = []
        return self.tensors

    def result(self) -> list[torch.Tensor]:
        """The fetched tensors, after the copies are done."""
        return self.synchronize()


def _as_bytes(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().reshape(-1).view(torch.uint8)


def _runs(extents: Sequence[Extent]) -> list[tuple[int, int]]:
    """Split a batch into runs [i, j) of extents that are adjacent in one arena."""
    runs: list[tuple[int, int]] = []
    start = 0
    for i in range(1, len(extents) + 1):
        if (
            i == len(extents)
            or extents[i].arena is not extents[i - 1].arena
            or extents[i].offset != extents[i - 1].offset + extents[i - 1].size
        ):
            runs.append((start, i))
            start = i
    return runs


class BlockStore:
    """Thread-safe key -> block store over a primary tier and a host fallback tier."""

    def __init__(self, primary: Tier, fallback: Tier) -> None:
        self.primary = primary
        self.fallback = fallback
        self._index: dict[object, Entry] = {}
        self._lock = threading.RLock()
        self._primary_open = True
        self._streams: dict[int, torch.cuda.Stream] = {}
        # Host memory set aside for revocations, one buffer per lease (pinning a large buffer
        # takes time; doing it ahead keeps the move within the revoke deadline). Empty:
        # allocate when needed.
        self.spare_host: list[torch.Tensor] = []
        self._slot_stores: list[SlotStore] = []

    # ---- slots: the block-id hot path (spillway.client.slots) ----------------------------
    def slots(self, slot_bytes: int, num_slots: int | None = None) -> SlotStore:
        """Carve `num_slots` fixed-size slots (default: as many as fit in the leased arenas)
        out of the tier where new blocks go. Raises OutOfPeerMemory when they do not fit."""
        if slot_bytes <= 0:
            raise ValueError(f"slot_bytes must be positive, got {slot_bytes}")
        if num_slots is not None and num_slots <= 0:
            raise ValueError(f"num_slots must be positive, got {num_slots}")
        with self._lock:
            tier = self.primary if self._primary_open else self.fallback
            segments = carve(tier, tier.arenas, slot_bytes, num_slots)
            if not segments:
                want = "any slot" if num_slots is None else f"{num_slots} slots"
                raise OutOfPeerMemory(
                    f"{want} of {format_bytes(slot_bytes)} do not fit in {tier.kind} memory: "
                    f"{format_bytes(tier.free_bytes)} free of {format_bytes(tier.capacity_bytes)}; ask for fewer "
                    "slots or a larger lease (nothing was reserved)"
                )
            store = SlotStore(self, segments, slot_bytes)
            self._slot_stores.append(store)
            return store

    def drop_slots(self, store: SlotStore) -> None:
        """Give a slot store's memory back to its arenas (its contents are dropped)."""
        with self._lock:
            if store not in self._slot_stores:
                return
            self._slot_stores.remove(store)
            store._closed = True
            for seg in store.segments:
                seg.views.clear()
                if seg.arena.tensor.numel():  # a closed lender arena is gone already
                    seg.tier.free(seg.extent)

    def done(self) -> Transfer:
        """A transfer with nothing to wait for."""
        return Transfer([], [], [])

    # ---- inspection -------------------------------------------------------------------
    @property
    def primary_open(self) -> bool:
        return self._primary_open

    def __len__(self) -> int:
        return len(self._index)

    def __contains__(self, key: object) -> bool:
        return key in self._index

    def keys(self) -> list[object]:
        with self._lock:
            return list(self._index)

    def tier_of(self, key: object) -> str:
        with self._lock:
            entry = self._index.get(key)
            if entry is None:
                raise UnknownBlock(f"no block with key {key!r}")
            return _tier_of(entry).kind

    def counts(self) -> dict[str, int]:
        with self._lock:
            primary = sum(1 for e in self._index.values() if _tier_of(e) is self.primary)
            return {"primary": primary, "fallback": len(self._index) - primary}

    # ---- stream plumbing ---------------------------------------------------------------
    # Every GPU that a transfer touches gets its current stream set to one of the store's own
    # streams for the duration (PyTorch runs a cross-GPU copy on the source GPU's current
    # stream and syncs the destination's), so copies overlap the model's compute stream.
    def _stream(self, dev: torch.device) -> torch.cuda.Stream:
        idx = dev.index if dev.index is not None else torch.cuda.current_device()
        s = self._streams.get(idx)
        if s is None:
            s = self._streams[idx] = torch.cuda.Stream(device=torch.device("cuda", idx))
        return s

    @staticmethod
    def cuda_devices(devices: Iterable[torch.device]) -> list[torch.device]:
        out: list[torch.device] = []
        for d in devices:
            if d.type == "cuda":
                d = torch.device("cuda", d.index if d.index is not None else torch.cuda.current_device())
                if d not in out:
                    out.append(d)
        return out

    def begin(self, devices: list[torch.device]) -> None:
        """Order our streams after the work already queued on the callers' current streams."""
        for d in devices:
            self._stream(d).wait_stream(torch.cuda.current_stream(d))

    def finish(self, devices: list[torch.device], tensors: list[torch.Tensor], keep: list[torch.Tensor]) -> Transfer:
        if not devices:
            return Transfer([], tensors, [])
        host_keep = []
        for t in keep:
            if t.is_cuda:  # the caching allocator keeps it until our stream is past the copy
                t.record_stream(self._stream(t.device))
            else:
                host_keep.append(t)
        events = []
        for d in devices:
            e = torch.cuda.Event()
            e.record(self._stream(d))
            events.append(e)
        # A transfer holds no reference to device memory (a caller may keep it to wait on later
        # without pinning a layer's buffers); host staging stays referenced until synchronize().
        return Transfer(events, tensors, host_keep, devices)

    def host_barrier(self) -> None:
        """Before the CPU itself reads or writes host arena memory: let asynchronous copies
        from or to GPUs that may touch it finish first."""
        if self._streams:
            self.synchronize()

    def stream_ctx(self, devices: list[torch.device]) -> contextlib.AbstractContextManager[object]:
        if not devices:
            return contextlib.nullcontext()
        stack = contextlib.ExitStack()
        for d in devices:
            stack.enter_context(torch.cuda.stream(self._stream(d)))
        return stack

    # ---- put ---------------------------------------------------------------------------
    def put(self, keys: Sequence[object], tensors: Sequence[torch.Tensor]) -> Transfer:
        """Store `tensors` under `keys` (one batch, all or nothing). An existing key is replaced
        once its new copy is in place. Raises OutOfPeerMemory when the primary tier is open
        and cannot hold the batch; nothing is stored then."""
        if len(keys) != len(tensors):
            raise ValueError(f"put got {len(keys)} keys but {len(tensors)} tensors")
        if len(set(keys)) != len(keys):
            raise ValueError("put got the same key twice in one batch")
        if not keys:
            return Transfer([], [], [])
        srcs = list(tensors)
        sizes = [t.numel() * t.element_size() for t in srcs]
        for k, s in zip(keys, sizes, strict=True):
            if s == 0:
                raise ValueError(f"block {k!r} is empty; store blocks of at least 1 byte")
        with self._lock:
            tier = self.primary if self._primary_open else self.fallback
            extents = tier.alloc_batch(sizes)
            if extents is None:
                if tier is self.primary and tier is not self.fallback:
                    raise OutOfPeerMemory(
                        f"the batch of {len(keys)} blocks ({format_bytes(sum(sizes))}) does not fit in the leased "
                        f"memory: {format_bytes(tier.used_bytes)} of {format_bytes(tier.capacity_bytes)} in use, "
                        f"{format_bytes(tier.free_bytes)} free; evict blocks or put smaller batches "
                        "(nothing was stored)"
                    )
                raise StoreError(
                    f"host memory limit reached: cannot store {format_bytes(sum(sizes))} more "
                    f"({format_bytes(tier.used_bytes)} in use); nothing was stored"
                )
            devices = self.cuda_devices([*{t.device for t in srcs}, *_arena_devices(extents)])
            keep = self._copy_in(srcs, sizes, extents, devices)
            transfer = self.finish(devices, [], keep)
            for k, t, ext, s in zip(keys, srcs, extents, sizes, strict=True):
                old = self._index.get(k)
                self._index[k] = Block(k, tier, ext, s, t.dtype, tuple(t.shape), t.device)
                if old is not None:
                    _release(old)  # same stream: later writes to it are ordered after
            return transfer

    def _copy_in(
        self, srcs: list[torch.Tensor], sizes: list[int], extents: list[Extent], devices: list[torch.device]
    ) -> list[torch.Tensor]:
        keep: list[torch.Tensor] = list(srcs)
        self.begin(devices)
        with self.stream_ctx(devices):
            for i, j in _runs(extents):
                arena = extents[i].arena
                start = extents[i].offset
                end = extents[j - 1].offset + extents[j - 1].size
                parts: list[torch.Tensor] = []
                for t, s, e in zip(srcs[i:j], sizes[i:j], extents[i:j], strict=True):
                    parts.append(_as_bytes(t))
                    if e.size > s:
                        parts.append(torch.zeros(e.size - s, dtype=torch.uint8, device=t.device))
                dst = arena.view(start, end - start)
                src_dev = srcs[i].device
                same_dev = all(t.device == src_dev for t in srcs[i:j])
                if same_dev and src_dev == arena.tensor.device:
                    if src_dev.type == "cpu":
                        self.host_barrier()
                    torch.cat(parts, out=dst) if len(parts) > 1 else dst.copy_(parts[0])
                else:
                    if not same_dev:
                        parts = [p.to(src_dev) for p in parts]
                    staging = torch.cat(parts) if len(parts) > 1 else parts[0]
                    dst.copy_(staging, non_blocking=True)
                    keep.append(staging)
                keep.extend(parts)
        return keep

    # ---- pool form: blocks that are rows of one tensor (a paged KV cache) ----------------
    def put_rows(self, keys: Sequence[object], pool: torch.Tensor, rows: Sequence[int]) -> Transfer:
        """Store `pool[rows[i]]` under `keys[i]`: one gather kernel and at most one copy for the
        whole batch when it lands in one contiguous range (the usual case), whatever the block
        size. Same guarantees as `put`."""
        if len(keys) != len(rows):
            raise ValueError(f"put_rows got {len(keys)} keys but {len(rows)} rows")
        keyset = set(keys)
        if len(keyset) != len(keys):
            raise ValueError("put_rows got the same key twice in one batch")
        if not keys:
            return Transfer([], [], [])
        if not pool.is_contiguous():
            raise ValueError("put_rows needs a contiguous pool tensor")
        row_bytes = pool[0].numel() * pool.element_size()
        n = len(keys)
        src_rows = as_index(rows, "rows", pool.shape[0])  # bad rows are refused before anything changes
        with self._lock:
            tier = self.primary if self._primary_open else self.fallback
            exts = None if row_bytes % ALIGNMENT else tier.alloc_batch([row_bytes * n])
            if exts is None:  # unaligned rows, a fragmented or a full tier: the general path
                return self.put(keys, _rows(pool, rows))
            ext = exts[0]
            arena = ext.arena
            src = word_rows(pool, "pool")
            _, dt = widest(*layout(src))
            dst = arena.view(ext.offset, row_bytes * n).view(n, row_bytes)
            devices = self.cuda_devices([pool.device, arena.tensor.device])
            keep: list[torch.Tensor] = [pool]
            if not devices:
                self.host_barrier()
            self.begin(devices)
            with self.stream_ctx(devices):
                copy_rows(as_words(dst, dt), _RUN0(n), as_words(src, dt), src_rows, keep)
            transfer = self.finish(devices, [], keep)
            batch = RowBatch(tier, ext, row_bytes, row_bytes, pool.dtype, tuple(pool.shape[1:]), pool.device, n)
            index = self._index
            replaced = [index[k] for k in keyset & index.keys()]  # usually none
            index.update(zip(keys, zip(repeat(batch), range(n)), strict=True))
            for old in replaced:
                _release(old)
            return transfer

    def get_rows(self, keys: Sequence[object], pool: torch.Tensor, rows: Sequence[int]) -> Transfer:
        """Fetch blocks into `pool[rows[i]]`: one copy and one scatter kernel when the blocks lie
        in one contiguous range in order (as `put_rows` left them)."""
        if len(keys) != len(rows):
            raise ValueError(f"get_rows got {len(keys)} keys but {len(rows)} rows")
        if not keys:
            return Transfer([], [], [])
        row_bytes = pool[0].numel() * pool.element_size()
        n = len(keys)
        with self._lock:
            found = list(map(self._index.get, keys))  # one C-level pass, not a Python loop
            if None in found:
                k = keys[found.index(None)]
                raise UnknownBlock(f"no block with key {k!r}: it was never put or was evicted")
            entries = cast("list[Entry]", found)
            e0 = entries[0]
            if isinstance(e0, tuple) and pool.is_contiguous():
                batch, i0 = e0
                if batch.nbytes == row_bytes and entries == list(zip(repeat(batch), range(i0, i0 + n))):
                    return self._get_run(batch, i0, n, pool, rows)
            blocks = [_as_block(k, e) for k, e in zip(keys, entries, strict=True)]
            for b in blocks:
                if b.nbytes != row_bytes:
                    raise ValueError(f"block {b.key!r} has {b.nbytes} bytes, a pool row {row_bytes}")
            return self._copy_out(blocks, _rows(pool, rows), None)

    def _get_run(self, batch: RowBatch, i0: int, n: int, pool: torch.Tensor, rows: Sequence[int]) -> Transfer:
        """Blocks i0..i0+n of one batch into pool rows: one copy and one scatter (wide words)."""
        arena = batch.extent.arena
        dst = word_rows(pool, "pool")
        _, dt = widest(*layout(dst))
        src = arena.view(batch.extent.offset + i0 * batch.stride, batch.stride * n).view(n, batch.stride)
        devices = self.cuda_devices([pool.device, arena.tensor.device])
        keep: list[torch.Tensor] = [pool]
        if not devices:
            self.host_barrier()
        self.begin(devices)
        with self.stream_ctx(devices):
            copy_rows(as_words(dst, dt), as_index(rows, "rows", pool.shape[0]), as_words(src, dt), _RUN0(n), keep)
        return self.finish(devices, [], keep)

    # ---- get ---------------------------------------------------------------------------
    def get(
        self,
        keys: Sequence[object],
        out: Sequence[torch.Tensor] | None = None,
        *,
        device: torch.device | str | None = None,
    ) -> Transfer:
        """Fetch blocks (they stay stored). With `out`, copy into those tensors (same number of
        bytes each); else into new tensors on `device` (default: where each block came from)."""
        if out is not None and len(out) != len(keys):
            raise ValueError(f"get got {len(keys)} keys but {len(out)} output tensors")
        with self._lock:
            blocks = []
            for k in keys:
                e = self._index.get(k)
                if e is None:
                    raise UnknownBlock(f"no block with key {k!r}: it was never put or was evicted")
                blocks.append(_as_block(k, e))
            if out is not None:
                for b, o in zip(blocks, out, strict=True):
                    if o.numel() * o.element_size() != b.nbytes:
                        raise ValueError(
                            f"output tensor for {b.key!r} has {o.numel() * o.element_size()} bytes, "
                            f"the block {b.nbytes}"
                        )
                    if not o.is_contiguous():
                        raise ValueError(f"output tensor for {b.key!r} must be contiguous")
            return self._copy_out(blocks, out, None if device is None else torch.device(device))

    def _copy_out(
        self, blocks: list[Block], out: Sequence[torch.Tensor] | None, device: torch.device | None
    ) -> Transfer:
        results: list[torch.Tensor] = []
        keep: list[torch.Tensor] = []
        dests = [o.device for o in out] if out is not None else [device or b.device for b in blocks]
        devices = self.cuda_devices([*set(dests), *_arena_devices([b.extent for b in blocks])])
        self.begin(devices)
        with self.stream_ctx(devices):
            extents = [b.extent for b in blocks]
            for i, j in _runs(extents):
                # split a run further where destination devices differ
                sub_start = i
                for k in range(i + 1, j + 1):
                    if k == j or dests[k] != dests[sub_start]:
                        results.extend(
                            self._copy_run(
                                blocks[sub_start:k], None if out is None else out[sub_start:k], dests[sub_start], keep
                            )
                        )
                        sub_start = k
        return self.finish(devices, results, keep)

    def _copy_run(
        self, blocks: list[Block], out: Sequence[torch.Tensor] | None, dest: torch.device, keep: list[torch.Tensor]
    ) -> list[torch.Tensor]:
        arena = blocks[0].extent.arena
        start = blocks[0].extent.offset
        end = blocks[-1].extent.offset + blocks[-1].extent.size
        region = arena.view(start, end - start)
        staged = region.device != dest
        if staged:
            # Into host memory: a pinned staging buffer copied asynchronously when the caller gets
            # it back (it synchronizes before reading); a blocking copy when we scatter it on
            # the CPU ourselves right after.
            to_host = dest.type == "cpu"
            staging = torch.empty(end - start, dtype=torch.uint8, device=dest, pin_memory=to_host and out is None)
            staging.copy_(region, non_blocking=not (to_host and out is not None))
            keep.append(staging)
            region = staging
        if not staged and dest.type == "cpu":
            self.host_barrier()
        views = [region[b.extent.offset - start : b.extent.offset - start + b.nbytes] for b in blocks]
        if out is None:
            tensors = [v.view(b.dtype).view(b.shape) for v, b in zip(views, blocks, strict=True)]
            if not staged:
                # views into the arena itself would alias stored memory: hand out copies
                tensors = [t.clone() for t in tensors]
            return tensors
        dsts = [_as_bytes_view(o) for o in out]
        if len(dsts) > 1:
            torch._foreach_copy_(dsts, views)
        else:
            dsts[0].copy_(views[0])
        keep.extend(out)
        return list(out)

    # ---- evict and migrate -------------------------------------------------------------
    def evict(self, keys: Iterable[object], *, missing_ok: bool = False) -> int:
        """Drop blocks and free their memory. Returns how many were dropped."""
        keys = list(keys)
        with self._lock:
            index = self._index
            if not missing_ok:  # all or nothing: an unknown key evicts nothing
                missing = next((k for k in keys if k not in index), _NONE)
                if missing is not _NONE:
                    raise UnknownBlock(f"no block with key {missing!r} (nothing was evicted)")
            popped = [e for e in map(index.pop, keys, repeat(None)) if e is not None]
            for e in popped:
                _release(e)
        return len(popped)

    def synchronize(self) -> None:
        for st in self._streams.values():
            st.synchronize()

    def close_primary(self, arenas: Iterable[Arena] | None = None) -> tuple[int, int, float]:
        """Move every block in these primary arenas (default: all of them; one arena per lease)
        to the fallback tier and stop using those arenas; the primary tier closes with its last
        arena. Copy, synchronize, then update the index, then drop the arena: a block is never
        gone from one tier before it is safely in the other. Slot stores on those arenas move
        with them (their ids stay valid). The lender's memory goes back to the driver before
        this returns (see `give_back`). Returns (blocks, bytes, seconds)."""
        t0 = time.monotonic()
        moved_slots: list[SlotStore] = []
        with self._lock:
            closing = list(self.primary.arenas) if arenas is None else [a for a in arenas if a in self.primary.arenas]
            if self.primary is self.fallback or not closing:
                if arenas is None:
                    self._primary_open = False
                return 0, 0, time.monotonic() - t0
            closing_ids = {id(a) for a in closing}
            remaining = [a for a in self.primary.arenas if id(a) not in closing_ids]
            if not remaining:
                self._primary_open = False  # new puts go to the fallback from now on
            entries = [
                e
                for e in self._index.values()
                if _tier_of(e) is self.primary and id(_extent_of(e).arena) in closing_ids
            ]
            nbytes = sum(e.nbytes if isinstance(e, Block) else e[0].nbytes for e in entries)
            # what holds an extent: single blocks, and each row batch once
            holders: list[Block | RowBatch] = [e for e in entries if isinstance(e, Block)]
            holders += list({id(e[0]): e[0] for e in entries if isinstance(e, tuple)}.values())
            new_arena_of: dict[int, Arena] = {}
            copies: list[tuple[torch.Tensor, torch.Tensor]] = []
            for arena in closing:
                hw = arena.allocator.high_water
                if hw == 0:
                    continue
                host = self._take_spare(hw)
                if host is None:
                    host = self.fallback._empty(hw)
                copies.append((host, arena.view(0, hw)))
                new_arena_of[id(arena)] = self.fallback.adopt(host, arena.allocator.used_ranges())
            self.synchronize()  # puts still in flight into the arenas land first
            devices = self.cuda_devices([a.tensor.device for a in closing])
            self.begin(devices)
            with self.stream_ctx(devices):
                for dst, src in copies:
                    dst.copy_(src, non_blocking=True)
            self.synchronize()
            copies.clear()  # (the last references to the lender's memory besides the arenas)
            for h in holders:  # the data is safely in host memory: switch the index over
                h.tier = self.fallback
                h.extent = Extent(new_arena_of[id(h.extent.arena)], h.extent.offset, h.extent.size)
            for ss in self._slot_stores:
                hit = False
                for seg in ss.segments:
                    if id(seg.arena) in closing_ids:
                        seg.rebind(new_arena_of[id(seg.arena)], self.fallback)
                        hit = True
                if hit:
                    moved_slots.append(ss)
            lender_bytes = sum(a.tensor.numel() for a in closing if a.tensor.is_cuda)
            for arena in closing:
                arena.tensor = torch.empty(0, dtype=torch.uint8, device=arena.tensor.device)
            self.primary.arenas[:] = remaining
        give_back(devices, lender_bytes)
        for ss in moved_slots:
            ss.revoked()
        return len(entries), nbytes, time.monotonic() - t0

    def close(self) -> None:
        """Drop every block and slot and give the lender's memory back to the driver (before the
        lease is released: `PeerMemory.close`)."""
        with self._lock:
            self.synchronize()
            self._index.clear()
            for ss in list(self._slot_stores):
                ss._closed = True
                for seg in ss.segments:
                    seg.views.clear()
            self._slot_stores.clear()
            lender = [a for a in self.primary.arenas if a.tensor.is_cuda] if self.primary is not self.fallback else []
            devices = self.cuda_devices([a.tensor.device for a in lender])
            lender_bytes = sum(a.tensor.numel() for a in lender)
            for arena in self.primary.arenas if self.primary is not self.fallback else []:
                arena.tensor = torch.empty(0, dtype=torch.uint8, device=arena.tensor.device)
            self.primary.arenas.clear()
            self._primary_open = False
            self.fallback.arenas.clear()
            self.spare_host = []
        give_back(devices, lender_bytes)

    def _take_spare(self, nbytes: int) -> torch.Tensor | None:
        """A slice of host memory set aside ahead of a revocation, when one is big enough."""
        for i, spare in enumerate(self.spare_host):
            if spare.numel() >= nbytes:
                del self.spare_host[i]
                return spare[:nbytes]
        return None


def _RUN0(n: int) -> Index:
    """The index 0, 1, ..., n-1 (a batch's own rows, contiguous in its range)."""
    return Index(torch.arange(n), None, 0)


def give_back(devices: Sequence[torch.device], nbytes: int) -> int:
    """Return freed lender memory to the driver, not to torch's cache, so the lender's own
    tenant (another process) can allocate it at once and the agent sees it free in NVML.
    Works from any thread. Returns the bytes torch still holds in reserve on those devices;
    logs a warning when that is more than what was just given back could explain."""
    if not devices:
        return 0
    gc.collect()  # a reference cycle (an exception's frame, say) may still hold a view
    before = {d: torch.cuda.memory_reserved(d) for d in devices}
    held = 0
    for d in devices:
        torch.cuda.synchronize(d)
        with torch.cuda.device(d):
            torch.cuda.empty_cache()
        held += torch.cuda.memory_reserved(d)
    freed = sum(before.values()) - held
    if nbytes and freed < nbytes:
        log.warning(
            "lender memory not fully given back: something in this process still references it",
            extra={
                "expected": format_bytes(nbytes),
                "freed": format_bytes(max(freed, 0)),
                "reserved": format_bytes(held),
            },
        )
    return held


def _extent_of(entry: Entry) -> Extent:
    return entry.extent if isinstance(entry, Block) else entry[0].extent


def _tier_of(entry: Entry) -> Tier:
    return entry.tier if isinstance(entry, Block) else entry[0].tier


def _release(entry: Entry) -> None:
    """Free what an index entry holds (a row batch's range once its last block goes)."""
    if isinstance(entry, Block):
        entry.tier.free(entry.extent)
        return
    batch = entry[0]
    batch.live -= 1
    if batch.live == 0:
        batch.tier.free(batch.extent)


def _as_block(key: object, entry: Entry) -> Block:
    """A read-only Block view of an entry (never freed on its own)."""
    if isinstance(entry, Block):
        return entry
    b, i = entry
    ext = Extent(b.extent.arena, b.extent.offset + i * b.stride, b.stride)
    return Block(key, b.tier, ext, b.nbytes, b.dtype, b.shape, b.device)


def _arena_devices(extents: Iterable[Extent]) -> list[torch.device]:
    return [a.tensor.device for a in {id(e.arena): e.arena for e in extents}.values()]


def _rows(pool: torch.Tensor, rows: Sequence[int]) -> list[torch.Tensor]:
    views = pool.unbind(0)  # all row views in one call (indexing row by row costs microseconds each)
    return [views[r] for r in rows]


def _as_bytes_view(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1).view(torch.uint8)


"""The slot API: the block-id hot path that engines use.

Engines address KV blocks by integer ids and keep the map from a request's blocks to storage
in their own scheduler. A `SlotStore` gives them fixed-size slots (ids `0..num_slots-1`) in a
lease's arena on the lender GPU (or in host memory) and moves rows of their page tensors into
and out of slots by tensors of ids: no per-block Python work, a small constant host cost per
batch, the copies of `spillway.client.rows`.

Slots live in extents of the block store's arenas (one segment per lease), so a revocation
moves them with the rest of the arena: the lease thread takes the store's lock, waits for the
copies in flight, copies the arena to pinned host memory, re-points the segment at the host
copy and gives the lender's memory back. Slot ids stay valid (now backed by host memory),
`generation` goes up by one and the revoke listeners run.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch

from spillway.client.arena import ALIGNMENT, Arena, Extent, Tier, align_up
from spillway.client.rows import Index, IndexLike, as_index, as_words, copy_rows, layout, widest, word_rows

if TYPE_CHECKING:
    from spillway.client.store import BlockStore, Transfer

log = logging.getLogger("spillway.client")

# Slot stride: a multiple of 8 bytes, so every slot starts on a word boundary.
SLOT_ALIGN = 8


@dataclass(eq=False)
class Segment:
    """Slots `base .. base + count` in one extent of one arena (one lease, or host memory)."""

    base: int
    count: int
    tier: Tier
    extent: Extent
    stride: int
    views: dict[torch.dtype, torch.Tensor] = field(default_factory=dict)

    @property
    def arena(self) -> Arena:
        return self.extent.arena

    def words(self, dt: torch.dtype) -> torch.Tensor:
        """The segment as `[count, stride]` bytes viewed in words of `dt` (cached)."""
        v = self.views.get(dt)
        if v is None:
            b = self.arena.view(self.extent.offset, self.count * self.stride).view(self.count, self.stride)
            v = self.views[dt] = as_words(b, dt)
        return v

    def rebind(self, arena: Arena, tier: Tier) -> None:
        self.extent = Extent(arena, self.extent.offset, self.extent.size)
        self.tier = tier
        self.views.clear()


class SlotStore:
    """Fixed-size slots for an engine's KV blocks. Make one with `PeerMemory.slots()` or
    `HostMemory.slots()`. Thread-safe (the store's lock)."""

    def __init__(self, owner: BlockStore, segments: list[Segment], slot_bytes: int) -> None:
        self._owner = owner
        self._segments = segments
        self.slot_bytes = slot_bytes
        self.num_slots = sum(s.count for s in segments)
        self.generation = 0
        self._listeners: list[Callable[[SlotStore], None]] = []
        # free ids as a stack whose top is the lowest id, so allocations come out ascending and
        # contiguous; `_used` catches double frees and foreign ids without a Python loop
        self._free = np.arange(self.num_slots - 1, -1, -1, dtype=np.int64)
        self._nfree = self.num_slots
        self._used = np.zeros(self.num_slots, dtype=bool)
        self._closed = False

    # ---- inspection --------------------------------------------------------------------
    @property
    def kind(self) -> str:
        """Where the slots' bytes are now: cuda, simulated-cpu, host-pinned or host-pageable
        (after a revocation, host memory). With several leases, the kind of the first."""
        return self._segments[0].tier.kind

    @property
    def device(self) -> torch.device:
        return self._segments[0].arena.tensor.device

    @property
    def free_slots(self) -> int:
        return self._nfree

    @property
    def segments(self) -> list[Segment]:
        return list(self._segments)

    def __repr__(self) -> str:
        return (
            f"<SlotStore {self.num_slots} x {self.slot_bytes} B on {self.kind} ({self.device}), "
            f"{self._nfree} free, generation {self.generation}>"
        )

    # ---- allocation --------------------------------------------------------------------
    def alloc(self, n: int) -> torch.Tensor:
        """`n` free slot ids (int64, CPU), ascending and contiguous when possible. Raises
        OutOfPeerMemory (nothing allocated) when fewer than `n` are free."""
        from spillway.client.store import OutOfPeerMemory

        if n < 0:
            raise ValueError(f"cannot allocate {n} slots")
        with self._owner._lock:
            self._check_open()
            if n > self._nfree:
                raise OutOfPeerMemory(
                    f"{n} slots asked, {self._nfree} of {self.num_slots} free ({self.slot_bytes} B each); "
                    "free slots or make a larger slot store (nothing was allocated)"
                )
            top = self._nfree
            ids = self._free[top - n : top][::-1].copy()
            self._nfree = top - n
            self._used[ids] = True
        return torch.from_numpy(ids)

    def free(self, slots: IndexLike) -> None:
        """Give slots back. Ids that are not allocated (or repeated) are refused, nothing freed."""
        ix = as_index(slots, "slots", self.num_slots)
        if ix.a is None:
            raise ValueError("free() takes slot ids on the host (a CPU tensor, array or list)")
        a = ix.a
        with self._owner._lock:
            self._check_open()
            if len(a) and (not self._used[a].all() or len(np.unique(a)) != len(a)):
                raise ValueError("free() got a slot id that is not allocated (or the same id twice); nothing freed")
            self._used[a] = False
            self._free[self._nfree : self._nfree + len(a)] = a[::-1]
            self._nfree += len(a)

    # ---- the hot path ------------------------------------------------------------------
    def store(self, src: torch.Tensor, src_rows: IndexLike, slots: IndexLike, *, offset: int = 0) -> Transfer:
        """`slot[slots[i]][offset : offset + row_bytes] <- src[src_rows[i]]` for every i.

        `src`: dim 0 indexes rows, each row contiguous (any dtype; a paged KV pool or a view of
        one layer). Asynchronous on CUDA (the store's streams, ordered after the caller's
        current stream; `Transfer.wait()` orders the caller's later work after it); done on
        return on the CPU."""
        return self._move(src, src_rows, slots, offset, to_slots=True)

    def load(self, dst: torch.Tensor, dst_rows: IndexLike, slots: IndexLike, *, offset: int = 0) -> Transfer:
        """`dst[dst_rows[i]] <- slot[slots[i]][offset : offset + row_bytes]` for every i."""
        return self._move(dst, dst_rows, slots, offset, to_slots=False)

    def _move(self, pool: torch.Tensor, rows: IndexLike, slots: IndexLike, offset: int, *, to_slots: bool) -> Transfer:
        what = "src" if to_slots else "dst"
        b = word_rows(pool, what)
        row_bytes, row_stride, addr = layout(b)
        if offset < 0 or offset + row_bytes > self.slot_bytes:
            raise ValueError(
                f"a row of {what} has {row_bytes} B; at offset {offset} it does not fit a slot of {self.slot_bytes} B"
            )
        r = as_index(rows, f"{what}_rows", b.shape[0])
        owner = self._owner
        with owner._lock:
            self._check_open()
            s = as_index(slots, "slots", self.num_slots)
            if len(r) != len(s):
                raise ValueError(f"{len(r)} {what}_rows but {len(s)} slots: give one slot per row")
            if len(s) == 0:
                return owner.done()
            segs = self._segments
            parts = [(segs[0], r, s)] if len(segs) == 1 else self._split(r, s)
            arenas = [seg.arena.tensor for seg, _, _ in parts]
            on_gpu = pool.is_cuda or any(a.is_cuda for a in arenas)
            devices = owner.cuda_devices([pool.device, *(a.device for a in arenas)]) if on_gpu else []
            keep: list[torch.Tensor] = [pool]
            if devices:
                owner.begin(devices)
            else:
                owner.host_barrier()  # the CPU itself copies: GPU copies into host slots land first
            with owner.stream_ctx(devices):
                for seg, ri, si in parts:
                    w, dt = widest(row_bytes, row_stride, addr, offset, seg.stride)
                    side = as_words(b, dt)
                    col = seg.words(dt)
                    if offset or row_bytes != seg.stride:
                        col = col[:, offset // w : (offset + row_bytes) // w]
                    if to_slots:
                        copy_rows(col, si, side, ri, keep)
                    else:
                        copy_rows(side, ri, col, si, keep)
            return owner.finish(devices, [], keep)

    def _split(self, r: Index, s: Index) -> list[tuple[Segment, Index, Index]]:
        """Several segments (several leases): one copy group per segment touched."""
        if s.a is None:
            raise ValueError("a slot store over several leases needs slot ids on the host")
        bases = np.array([seg.base for seg in self._segments])
        which = np.searchsorted(bases, s.a, side="right") - 1
        out: list[tuple[Segment, Index, Index]] = []
        for k, seg in enumerate(self._segments):
            mask = which == k
            if not mask.any():
                continue
            ra = r.a[mask] if r.a is not None else None
            rsel = as_index(ra, "rows", 1 << 62) if ra is not None else _device_subset(r, mask)
            out.append((seg, rsel, as_index(s.a[mask] - seg.base, "slots", seg.count)))
        return out

    # ---- revocation and lifetime ---------------------------------------------------------
    def add_revoke_listener(self, fn: Callable[[SlotStore], None]) -> None:
        """`fn(store)` runs in the lease thread after a revocation moved this store's slots to
        host memory (ids stay valid). An engine that would rather recompute drops its keys."""
        self._listeners.append(fn)

    def revoked(self) -> None:
        """Called by the block store (outside its lock) after it moved some of our segments."""
        self.generation += 1
        log.warning("slot store moved to host memory by a revocation", extra={"slots": self.num_slots,
                                                                            "generation": self.generation})
        for fn in list(self._listeners):
            try:
                fn(self)
            except Exception:  # a listener's bug must not stop the revocation
                log.exception("slot store revoke listener failed")

    def close(self) -> None:
        """Give the slots' memory back to the store (their contents are dropped)."""
        self._owner.drop_slots(self)

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("this SlotStore is closed")


def _device_subset(r: Index, mask: np.ndarray) -> Index:
    sel = torch.from_numpy(np.flatnonzero(mask)).to(r.t.device)
    return Index(r.t.index_select(0, sel), None, None)


def slot_stride(slot_bytes: int) -> int:
    """Bytes between consecutive slots: the slot size rounded up to a word."""
    return align_up(slot_bytes, SLOT_ALIGN)


def slots_in(free_bytes: int, slot_bytes: int) -> int:
    """How many slots of `slot_bytes` fit in a free range of `free_bytes` (what `slots()` carves
    out of a fresh lease arena of that size)."""
    return (free_bytes // ALIGNMENT * ALIGNMENT) // slot_stride(slot_bytes)


def carve(tier: Tier, arenas: list[Arena], slot_bytes: int, num_slots: int | None) -> list[Segment]:
    """Reserve slot segments in `arenas` (fixed tiers: as many as fit when `num_slots` is None)
    or in a growable tier. Returns [] when they do not fit (nothing reserved)."""
    stride = slot_stride(slot_bytes)
    segs: list[Segment] = []
    base = 0
    if tier.fixed_bytes is None:  # host memory: one extent of the asked size
        if num_slots is None:
            raise ValueError("host memory grows on demand: give num_slots")
        got = tier.alloc_batch([num_slots * stride])
        return [] if got is None else [Segment(0, num_slots, tier, got[0], stride)]
    want = num_slots
    for arena in arenas:
        room = slots_in(arena.allocator.largest_free, slot_bytes)
        n = room if want is None else min(room, want - base)
        if n <= 0:
            continue
        off = arena.allocator.alloc(align_up(n * stride))
        if off is None:  # pragma: no cover - largest_free said it fits
            continue
        segs.append(Segment(base, n, tier, Extent(arena, off, align_up(n * stride)), stride))
        base += n
        if want is not None and base >= want:
            break
    if (want is not None and base < want) or not segs:
        for seg in segs:
            seg.arena.allocator.free(seg.extent.offset)
        return []
    return segs

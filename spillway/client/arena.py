"""Memory tiers for the block store: fixed or growable byte arenas with a range allocator.

An `Arena` is one flat `uint8` tensor (on the lender GPU, in pinned host memory, or in plain
CPU memory for the simulated tier) plus a first-fit allocator over its byte range. A `Tier`
is a list of arenas: the peer tier has exactly one arena of the leased size, so it can never
hold more than the lease; the host tier grows by chunks.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

import torch

# Every block starts on this boundary: enough for any dtype view and for vectorised copies.
ALIGNMENT = 256


def align_up(n: int, alignment: int = ALIGNMENT) -> int:
    return (n + alignment - 1) // alignment * alignment


class RangeAllocator:
    """First-fit allocator over `[0, capacity)` with coalescing of freed neighbours."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._free_offsets: list[int] = [0] if capacity > 0 else []
        self._free_sizes: dict[int, int] = {0: capacity} if capacity > 0 else {}
        self._used: dict[int, int] = {}
        self.used_bytes = 0

    def alloc(self, nbytes: int) -> int | None:
        """Reserve `nbytes` (already aligned) and return the offset, or None when no free range fits."""
        if nbytes <= 0:
            raise ValueError(f"allocation size must be positive, got {nbytes}")
        for i, off in enumerate(self._free_offsets):
            size = self._free_sizes[off]
            if size >= nbytes:
                del self._free_sizes[off]
                if size == nbytes:
                    del self._free_offsets[i]
                else:
                    self._free_offsets[i] = off + nbytes
                    self._free_sizes[off + nbytes] = size - nbytes
                self._used[off] = nbytes
                self.used_bytes += nbytes
                return off
        return None

    def alloc_split(self, sizes: list[int]) -> int | None:
        """Reserve one contiguous range for all `sizes` (aligned) and record each as its own
        allocation, so each frees on its own. Returns the start offset, or None."""
        off = self.alloc(sum(sizes))
        if off is None:
            return None
        del self._used[off]
        pos = off
        for n in sizes:
            self._used[pos] = n
            pos += n
        return off

    def reserve(self, offset: int, nbytes: int) -> None:
        """Mark exactly `[offset, offset+nbytes)` used; it must lie inside one free range."""
        i = bisect.bisect_right(self._free_offsets, offset) - 1
        if i < 0:
            raise ValueError(f"range {offset}+{nbytes} is not free")
        start = self._free_offsets[i]
        size = self._free_sizes[start]
        if offset + nbytes > start + size:
            raise ValueError(f"range {offset}+{nbytes} is not free")
        del self._free_sizes[start]
        del self._free_offsets[i]
        tail = start + size - (offset + nbytes)
        if tail:
            bisect.insort(self._free_offsets, offset + nbytes)
            self._free_sizes[offset + nbytes] = tail
        if offset > start:
            bisect.insort(self._free_offsets, start)
            self._free_sizes[start] = offset - start
        self._used[offset] = nbytes
        self.used_bytes += nbytes

    def free(self, offset: int) -> None:
        nbytes = self._used.pop(offset)
        self.used_bytes -= nbytes
        i = bisect.bisect_left(self._free_offsets, offset)
        start, size = offset, nbytes
        # merge with the following free range
        if i < len(self._free_offsets) and self._free_offsets[i] == offset + nbytes:
            nxt = self._free_offsets.pop(i)
            size += self._free_sizes.pop(nxt)
        # merge with the preceding free range
        if i > 0:
            prev = self._free_offsets[i - 1]
            if prev + self._free_sizes[prev] == offset:
                start = prev
                size += self._free_sizes[prev]
                self._free_offsets.pop(i - 1)
                i -= 1
        self._free_offsets.insert(i, start)
        self._free_sizes[start] = size

    @property
    def free_bytes(self) -> int:
        return self.capacity - self.used_bytes

    @property
    def largest_free(self) -> int:
        return max(self._free_sizes.values(), default=0)

    @property
    def high_water(self) -> int:
        """End of the last used range (bytes that hold data are all below it)."""
        if not self._used:
            return 0
        last = max(self._used)
        return last + self._used[last]

    def used_ranges(self) -> list[tuple[int, int]]:
        return sorted(self._used.items())


class Arena:
    """One flat byte tensor and its allocator."""

    def __init__(self, tensor: torch.Tensor) -> None:
        if tensor.dtype != torch.uint8 or tensor.dim() != 1:
            raise ValueError("an arena is a 1-D uint8 tensor")
        self.tensor = tensor
        self.allocator = RangeAllocator(tensor.numel())

    @property
    def capacity(self) -> int:
        return self.allocator.capacity

    def view(self, offset: int, nbytes: int) -> torch.Tensor:
        return self.tensor[offset : offset + nbytes]


@dataclass(frozen=True, slots=True)
class Extent:
    """Where one block's bytes live: an arena and an aligned byte range in it."""

    arena: Arena
    offset: int
    size: int  # aligned size reserved in the arena


@dataclass
class Tier:
    """A place for blocks. `kind` names it for logs and stats: "cuda" (the lender GPU),
    "simulated-cpu" (the peer tier when no GPU is present), "host-pinned" or "host-pageable".
    A fixed tier has one arena per lease (`fixed_bytes` makes the first; `add_fixed` the others,
    each on its lender's device); a growable tier adds chunks up to `limit_bytes`."""

    kind: str
    device: torch.device
    pinned: bool = False
    fixed_bytes: int | None = None  # a fixed single arena of this size; None: growable
    chunk_bytes: int = 64 << 20  # growable tiers allocate chunks of at least this size
    limit_bytes: int | None = None  # growable tiers: never allocate more than this in total
    arenas: list[Arena] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.fixed_bytes is not None:
            self.arenas.append(Arena(self._empty(self.fixed_bytes)))

    def _empty(self, nbytes: int, device: torch.device | None = None) -> torch.Tensor:
        return torch.empty(nbytes, dtype=torch.uint8, device=device or self.device, pin_memory=self.pinned)

    def add_fixed(self, nbytes: int, device: torch.device) -> Arena:
        """Another fixed arena, on its own device (a second lease, on a second lender GPU)."""
        if self.fixed_bytes is None:
            raise ValueError("add_fixed is for fixed tiers (one arena per lease)")
        arena = Arena(self._empty(nbytes, device))
        self.arenas.append(arena)
        return arena

    @property
    def capacity_bytes(self) -> int:
        return sum(a.capacity for a in self.arenas)

    @property
    def used_bytes(self) -> int:
        return sum(a.allocator.used_bytes for a in self.arenas)

    @property
    def free_bytes(self) -> int:
        """Bytes still free in the existing arenas (a growable tier may add more)."""
        return sum(a.allocator.free_bytes for a in self.arenas)

    def alloc_batch(self, sizes: list[int]) -> list[Extent] | None:
        """Reserve one extent per size, all or nothing. Tries one contiguous range for the whole
        batch first (so the batch moves in one copy), then block by block; a growable tier adds a
        chunk when needed. Returns None when the tier cannot hold the batch."""
        aligned = [align_up(s) for s in sizes]
        total = sum(aligned)
        for attempt in range(2):
            for arena in self.arenas:
                off = arena.allocator.alloc_split(aligned)
                if off is not None:
                    out, pos = [], off
                    for a in aligned:
                        out.append(Extent(arena, pos, a))
                        pos += a
                    return out
            got: list[Extent] = []
            for a in aligned:
                ext = None
                for arena in self.arenas:
                    off = arena.allocator.alloc(a)
                    if off is not None:
                        ext = Extent(arena, off, a)
                        break
                if ext is None:
                    break
                got.append(ext)
            if len(got) == len(aligned):
                return got
            for e in got:
                e.arena.allocator.free(e.offset)
            if attempt or not self._grow(total):
                return None
        return None

    def _grow(self, need: int) -> bool:
        if self.fixed_bytes is not None:
            return False
        size = align_up(max(self.chunk_bytes, need), 2 << 20)
        if self.limit_bytes is not None:
            room = self.limit_bytes - self.capacity_bytes
            if room < need:
                return False
            size = min(size, room)
        self.arenas.append(Arena(self._empty(size)))
        return True

    def adopt(self, tensor: torch.Tensor, ranges: list[tuple[int, int]]) -> Arena:
        """Add an arena made elsewhere (a whole-arena copy) with these ranges already in use."""
        arena = Arena(tensor)
        for off, size in ranges:
            arena.allocator.reserve(off, size)
        self.arenas.append(arena)
        return arena

    def free(self, extent: Extent) -> None:
        extent.arena.allocator.free(extent.offset)
        if self.fixed_bytes is None and extent.arena.allocator.used_bytes == 0:
            # give empty chunks back (pinned host memory is precious) but keep the largest empty
            # one, so a put/evict cycle does not allocate and pin a chunk every time
            empty = [a for a in self.arenas if a.allocator.used_bytes == 0]
            if len(empty) > 1:
                keep = max(empty, key=lambda a: a.capacity)
                self.arenas = [a for a in self.arenas if a.allocator.used_bytes or a is keep]

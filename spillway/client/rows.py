"""Row copies at the hardware's speed: the one place where bytes move between a caller's tensor
and the store's memory.

A "row" is `t[i]` of a tensor whose dim 0 indexes rows (a paged KV pool `[blocks, ...]`, the
store's slots `[slots, slot_bytes]`); each row is contiguous, rows may be strided. Every copy
is `dst[d[i]] = src[s[i]]` for index vectors `s`, `d`, and is done with as few kernels as the
layout allows:

- both index vectors are runs (`k, k+1, ...`): one plain copy;
- one side is a run: one gather (`index_select`) or one scatter (`index_copy_`) on the GPU;
- across devices: one gather on the source, **one** copy across (peer GPU or PCIe), one scatter
  on the destination; a host side that is not a run is copied run by run straight from/into
  host memory (never scattered by the CPU after a synchronous copy);
- gathers and scatters move the widest word (8, 4, 2 or 1 bytes) that divides the row, its
  stride and its address: the same kernels on `uint8` rows run several times slower.

Index vectors arrive as CPU tensors, numpy arrays or lists (checked against the bounds on the
host, where runs are detected) or as tensors already on the GPU (used as they are: the caller
vouches for them). A CPU index goes to the GPU through pinned memory, asynchronously.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

_WORDS = ((8, torch.int64), (4, torch.int32), (2, torch.int16), (1, torch.uint8))
IndexLike = torch.Tensor | np.ndarray | Sequence[int]


@dataclass(slots=True)
class Index:
    """One index vector: the tensor, and (for a host index) its numpy view and run start."""

    t: torch.Tensor  # int64, 1-D
    a: np.ndarray | None  # host values; None when the index lives on a GPU
    run: int | None  # start of `k, k+1, ...` when the index is one run (host indices only)

    def __len__(self) -> int:
        return int(self.t.shape[0])

    def on(self, dev: torch.device) -> torch.Tensor:
        """The index on `dev`; a host index travels through pinned memory without a host block."""
        if self.t.device == dev:
            return self.t
        if dev.type == "cuda" and self.t.device.type == "cpu":
            return self.t.pin_memory().to(dev, non_blocking=True)
        return self.t.to(dev)

    def runs(self) -> list[tuple[int, int, int]]:
        """`(start, length, position)` of each run of a host index, in order."""
        assert self.a is not None
        a = self.a
        if len(a) == 0:
            return []
        breaks = np.flatnonzero(np.diff(a) != 1) + 1
        starts = np.concatenate(([0], breaks))
        ends = np.concatenate((breaks, [len(a)]))
        return [(int(a[s]), int(e - s), int(s)) for s, e in zip(starts.tolist(), ends.tolist(), strict=True)]


def as_index(x: IndexLike, what: str, limit: int) -> Index:
    """Normalise an index vector and check it against `[0, limit)` (host indices only). A few
    microseconds for 1,024 ids: one pass finds a run, or one reduction bounds the rest."""
    if type(x) is torch.Tensor and x.dtype == torch.int64 and x.is_cpu and x.ndim == 1:
        t, a = x, x.numpy()  # the hot path: no copy, no conversion
    elif isinstance(x, torch.Tensor):
        if x.dim() != 1:
            raise ValueError(f"{what} must be a 1-D integer tensor, got shape {tuple(x.shape)}")
        if x.dtype.is_floating_point or x.dtype.is_complex or x.dtype == torch.bool:
            raise ValueError(f"{what} must hold integers, got {x.dtype}")
        t = x if x.dtype == torch.int64 else x.long()
        if t.device.type != "cpu":
            return Index(t, None, None)
        a = t.numpy()
    else:
        a = np.asarray(x)
        if a.ndim != 1 or (a.size and a.dtype.kind not in "iu"):
            raise ValueError(f"{what} must be a 1-D sequence of integers")
        a = np.ascontiguousarray(a, dtype=np.int64)
        t = torch.from_numpy(a)
    n = len(a)
    if n == 0:
        return Index(t, a, 0)
    first, last = int(a[0]), int(a[-1])
    if last - first == n - 1 and (n == 1 or bool((a[1:] - a[:-1] == 1).all())):
        if first < 0 or last >= limit:
            raise IndexError(f"{what} holds {first if first < 0 else last}, outside [0, {limit})")
        return Index(t, a, first)
    if int(a.view(np.uint64).max()) >= limit:  # one reduction: negative ids wrap to huge ones
        lo = int(a.min())
        raise IndexError(f"{what} holds {lo if lo < 0 else int(a.max())}, outside [0, {limit})")
    return Index(t, a, None)


def word_rows(t: torch.Tensor, what: str) -> torch.Tensor:
    """`t` as `[rows, k]` in its own dtype, a view (dim 0 indexes rows; each row contiguous).
    `layout()` gives its bytes; `as_words()` re-views it in the word type."""
    if t.dim() == 0:
        raise ValueError(f"{what} must have a row dimension (dim 0), got a scalar")
    if t.dim() == 2:
        flat = t
    else:
        try:
            flat = t.view(t.shape[0], -1)
        except RuntimeError:
            raise ValueError(f"{what}: each row ({what}[i]) must be contiguous in memory") from None
    if flat.shape[1] > 1 and flat.stride(1) != 1:
        raise ValueError(f"{what}: each row ({what}[i]) must be contiguous in memory")
    return flat


def widest(*byte_counts: int) -> tuple[int, torch.dtype]:
    """The widest word that divides every count (sizes, strides, offsets, addresses)."""
    acc = 0
    for c in byte_counts:
        acc |= c
    for w, dt in _WORDS:
        if acc % w == 0:
            return w, dt
    return 1, torch.uint8  # pragma: no cover - w = 1 divides everything


def as_words(rows: torch.Tensor, dt: torch.dtype) -> torch.Tensor:
    """A `[rows, k]` view (any dtype, rows contiguous) re-viewed as `[rows, row_bytes / w]` words."""
    if rows.dtype == dt:
        return rows
    if rows.shape[1] == 1 and rows.stride(1) != 1:  # one element per row: make its stride plain
        rows = rows.as_strided(rows.shape, (rows.stride(0), 1))
    return rows.view(dt)


def layout(b: torch.Tensor) -> tuple[int, int, int]:
    """(row bytes, row stride in bytes, address) of a `[rows, k]` view."""
    size = b.element_size()
    return b.shape[1] * size, b.stride(0) * size, b.data_ptr()


def copy_rows(dst: torch.Tensor, d: Index, src: torch.Tensor, s: Index, keep: list[torch.Tensor]) -> None:
    """`dst[d[i]] = src[s[i]]` for `[rows, words]` views of one word type. On CUDA it runs on
    the current streams (the caller sets them); tensors that must outlive the queued copies
    are appended to `keep`."""
    n = len(s)
    if n == 0:
        return
    sdev, ddev = src.device, dst.device
    if sdev == ddev:
        if s.run is not None and d.run is not None:
            dst[d.run : d.run + n].copy_(src[s.run : s.run + n])
        elif s.run is not None:
            dst.index_copy_(0, d.on(ddev), src[s.run : s.run + n])
        elif d.run is not None and dst.is_contiguous():
            torch.index_select(src, 0, s.on(sdev), out=dst[d.run : d.run + n])
        else:
            dst.index_copy_(0, d.on(ddev), src.index_select(0, s.on(sdev)))
        return
    # Across devices: pack on the source side, one copy across, unpack on the destination side.
    # (Views of the store's own memory are never put in `keep`: a kept view would hold a lender's
    # memory after a revocation or close gave it back.)
    if s.run is not None:
        packed = src[s.run : s.run + n]
    elif sdev.type == "cuda":
        packed = src.index_select(0, s.on(sdev))
        keep.append(packed)
    else:  # a scattered host source: copy it run by run into a device buffer
        packed = torch.empty((n, src.shape[1]), dtype=src.dtype, device=ddev)
        for start, length, pos in s.runs():
            packed[pos : pos + length].copy_(src[start : start + length], non_blocking=True)
        keep.append(packed)
        _unpack_same_device(dst, d, packed)
        return
    if d.run is not None:
        dst[d.run : d.run + n].copy_(packed, non_blocking=True)
    elif ddev.type == "cuda":
        staged = torch.empty(packed.shape, dtype=packed.dtype, device=ddev)
        staged.copy_(packed, non_blocking=True)
        keep.append(staged)
        dst.index_copy_(0, d.on(ddev), staged)
    else:  # a scattered host destination: copied into run by run, no CPU scatter afterwards
        for start, length, pos in d.runs():
            dst[start : start + length].copy_(packed[pos : pos + length], non_blocking=True)


def _unpack_same_device(dst: torch.Tensor, d: Index, packed: torch.Tensor) -> None:
    n = packed.shape[0]
    if d.run is not None:
        dst[d.run : d.run + n].copy_(packed)
    else:
        dst.index_copy_(0, d.on(dst.device), packed)

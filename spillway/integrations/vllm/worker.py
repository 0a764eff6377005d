"""Worker side of the vLLM offloading spec: moves vLLM's KV pages between its GPU page tensors
and the slots of the lease (`SlotStore`), one batched copy per page tensor per job.

A slot holds one offloaded chunk (`blocks_per_chunk` GPU blocks of one KV cache group): for
each of the group's page tensors in turn, its pages of the chunk's blocks, back to back.
The copies run on the slot store's own CUDA streams, ordered after vLLM's current stream (so a
store reads the KV the model just wrote); `get_finished` reports a job once its copies are done.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from vllm.v1.kv_offload.base import (
    BlockIDsLoadStoreSpec,
    CanonicalKVCaches,
    GPULoadStoreSpec,
    LoadStoreSpec,
    OffloadingWorker,
    TransferResult,
)

from spillway.client import SlotStore, Transfer

log = logging.getLogger("spillway.integrations.vllm")


@dataclass(frozen=True)
class _Page:
    """One page tensor of a KV cache group, as rows of bytes, and where its pages sit in a slot."""

    rows: torch.Tensor  # [num_blocks, page_bytes] uint8 (a view of vLLM's tensor; rows may be strided)
    page_bytes: int
    base: int  # offset in the slot of this tensor's first page


@dataclass
class _Job:
    job_id: int
    generation: int  # the slot store's generation at submit
    transfers: list[Transfer] = field(default_factory=list)
    nbytes: int = 0
    started: float = 0.0
    error: str = ""

    def done(self) -> bool:
        return all(t.done() for t in self.transfers)


def _page_rows(t: torch.Tensor, page_bytes: int) -> torch.Tensor:
    """vLLM's (num_blocks, ...) page tensor as [num_blocks, page_bytes] bytes, without a copy."""
    b = t.view(torch.uint8) if t.dtype != torch.uint8 else t
    if b.dim() > 2:
        b = b.flatten(1)  # a view while each block's bytes are contiguous
    if b.dim() != 2 or b.stride(1) != 1 or b.shape[1] < page_bytes:
        raise ValueError(
            f"a KV page tensor of shape {tuple(t.shape)} and strides {t.stride()} is not rows of at least "
            f"{page_bytes} contiguous bytes per block; the Spillway spec needs vLLM's standard page layout"
        )
    return b[:, :page_bytes]


class SpillwayOffloadingWorker(OffloadingWorker):
    """`OffloadingWorker` on a `SlotStore`. `fail_revoked_jobs`: report a job that a revocation
    overtook (the store's generation changed before the job was reported) as failed; off while
    the running vLLM cannot take a failed transfer (see version.py), when such a job is
    reported as done: its bytes are right either way."""

    def __init__(
        self,
        kv_caches: CanonicalKVCaches,
        slots: SlotStore,
        *,
        blocks_per_chunk: int = 1,
        fail_revoked_jobs: bool = False,
        on_shutdown: Callable[[], None] | None = None,
    ) -> None:
        if blocks_per_chunk <= 0:
            raise ValueError(f"blocks_per_chunk must be positive, got {blocks_per_chunk}")
        self.slots = slots
        self.blocks_per_chunk = blocks_per_chunk
        self.fail_revoked_jobs = fail_revoked_jobs
        self._on_shutdown = on_shutdown
        self.groups: list[list[_Page]] = []
        for g, refs in enumerate(kv_caches.group_data_refs):
            pages: list[_Page] = []
            base = 0
            for ref in refs:
                if ref.mapping is not None:
                    raise ValueError(
                        "the canonical host layout (kv_connector_extra_config canonical_layout) is not supported by "
                        "the Spillway spec; leave it off"
                    )
                tensor = kv_caches.tensors[ref.tensor_idx].tensor
                pages.append(_Page(_page_rows(tensor, ref.page_size_bytes), ref.page_size_bytes, base))
                base += ref.page_size_bytes * blocks_per_chunk
            if base > slots.slot_bytes:
                raise ValueError(
                    f"KV cache group {g} needs {base} B per chunk but a slot has {slots.slot_bytes} B: the slot size "
                    "must come from the same OffloadingConfig (worker_kv_bytes_per_block x blocks_per_chunk)"
                )
            self.groups.append(pages)
        self._jobs: dict[int, _Job] = {}
        self._lock = threading.Lock()
        self.revocations = 0
        slots.add_revoke_listener(self._revoked)

    def _revoked(self, store: SlotStore) -> None:
        with self._lock:
            self.revocations += 1
            overtaken = sorted(self._jobs)
        log.warning(
            "lease revoked: KV slots now in host memory",
            extra={"generation": store.generation, "jobs_in_flight": len(overtaken), "slot_kind": store.kind},
        )

    # ---- vLLM's OffloadingWorker -------------------------------------------------------
    def submit_store(self, job_id: int, src_spec: GPULoadStoreSpec, dst_spec: LoadStoreSpec) -> bool:
        return self._submit(job_id, src_spec, dst_spec, to_slots=True)

    def submit_load(
        self, job_id: int, src_spec: LoadStoreSpec, dst_spec: GPULoadStoreSpec, expedited: bool = False
    ) -> bool:
        # the slot store has one stream per GPU: an expedited load does not wait behind other
        # loads of ours, but it is not put ahead of stores already queued either
        return self._submit(job_id, dst_spec, src_spec, to_slots=False)

    def _submit(self, job_id: int, gpu: GPULoadStoreSpec, other: LoadStoreSpec, *, to_slots: bool) -> bool:
        if not isinstance(other, BlockIDsLoadStoreSpec):
            raise TypeError(f"job {job_id}: expected slot ids (SlotLoadStoreSpec), got {type(other).__name__}")
        job = _Job(job_id, self.slots.generation, started=time.monotonic())
        try:
            for pages, blocks, slot_ids in self._plan(gpu, np.asarray(other.block_ids, dtype=np.int64)):
                for page in pages:
                    for sub, (rows, ids) in enumerate(zip(blocks, slot_ids, strict=True)):
                        if len(rows) == 0:
                            continue
                        off = page.base + sub * page.page_bytes  # the block's place in its chunk
                        if to_slots:
                            t = self.slots.store(page.rows, rows, ids, offset=off)
                        else:
                            t = self.slots.load(page.rows, rows, ids, offset=off)
                        job.transfers.append(t)
                        job.nbytes += len(rows) * page.page_bytes
        except Exception as exc:  # reported as a failed job; vLLM's view of the bytes stays untouched
            job.error = f"{type(exc).__name__}: {exc}"
            log.exception("offloading job could not be submitted", extra={"job": job_id})
        with self._lock:
            self._jobs[job_id] = job
        return True

    def _plan(
        self, gpu: GPULoadStoreSpec, slot_ids: np.ndarray
    ) -> list[tuple[list[_Page], list[np.ndarray], list[np.ndarray]]]:
        """Per KV cache group: its pages and, per position of a block in its chunk, the GPU
        blocks and the slots they go with (each block once, in order)."""
        block_ids = np.asarray(gpu.block_ids, dtype=np.int64)
        sizes = list(gpu.group_sizes)
        if len(sizes) != len(self.groups) or len(gpu.block_indices) != len(sizes):
            raise ValueError(
                f"the job names {len(sizes)} KV cache group(s); this worker was set up for {len(self.groups)}"
            )
        bpc = self.blocks_per_chunk
        plan = []
        b0 = s0 = 0
        for pages, n, first in zip(self.groups, sizes, gpu.block_indices, strict=True):
            if n == 0:
                continue
            skip = int(first) % bpc  # the first chunk may start part-way (its earlier blocks are elsewhere)
            nslots = -(-(n + skip) // bpc)
            blocks = block_ids[b0 : b0 + n]
            slots = slot_ids[s0 : s0 + nslots]
            if len(blocks) != n or len(slots) != nslots:
                raise ValueError(
                    f"the job has {len(block_ids)} GPU blocks and {len(slot_ids)} slots; its groups need more"
                )
            pos = np.arange(skip, skip + n)
            chunk, sub = pos // bpc, pos % bpc
            by_sub = [np.flatnonzero(sub == j) for j in range(bpc)]
            plan.append((pages, [blocks[i] for i in by_sub], [slots[chunk[i]] for i in by_sub]))
            b0 += n
            s0 += nslots
        if b0 != len(block_ids) or s0 != len(slot_ids):
            raise ValueError(
                f"the job has {len(block_ids)} GPU blocks and {len(slot_ids)} slots; its groups use {b0} and {s0}"
            )
        return plan

    def get_finished(self) -> list[TransferResult]:
        out: list[TransferResult] = []
        with self._lock:
            finished = [j for j in self._jobs.values() if j.error or j.done()]
            for j in finished:
                del self._jobs[j.job_id]
        generation = self.slots.generation
        for j in finished:
            overtaken = j.generation != generation
            ok = not j.error and not (overtaken and self.fail_revoked_jobs)
            if overtaken:
                log.info("offloading job overtaken by a revocation", extra={"job": j.job_id, "reported_ok": ok})
            out.append(TransferResult(job_id=j.job_id, success=ok, transfer_size=j.nbytes if ok else None))
        return out

    def wait(self, job_ids: set[int]) -> None:
        with self._lock:
            jobs = [self._jobs[j] for j in job_ids if j in self._jobs]
        for j in jobs:
            for t in j.transfers:
                t.synchronize()

    def shutdown(self) -> None:
        with self._lock:
            jobs = list(self._jobs.values())
            self._jobs.clear()
        for j in jobs:
            for t in j.transfers:
                t.synchronize()
        fn, self._on_shutdown = self._on_shutdown, None
        if fn is not None:
            fn()

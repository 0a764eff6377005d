"""Spillway for Hugging Face transformers: a KV cache whose layers live in lent HBM between
uses, for `model.generate(..., past_key_values=SpillwayCache(memory, model.config))`.

transformers' own `DynamicCache(offloading=True)` moves each layer's whole KV to host memory
after the layer ran and back before it runs again (over PCIe, twice per layer per token).
`SpillwayCache` keeps each layer's KV in slots of the lease instead (`spillway.client`'s slot
API): after a layer ran only its new tokens are stored, and the next layer is fetched back on
a side CUDA stream while this one computes. At most two layers' KV are on the GPU at a time.

Layout: a layer's KV is a buffer `[2 (K, V), batch, kv_heads, capacity, head_dim]` whose
capacity is a whole number of chunks of `chunk_tokens`; one slot holds one chunk of one
(K or V, batch, head) row, `chunk_tokens * head_dim` values. The attention gets exactly what
`DynamicLayer` would give it (a contiguous `[batch, heads, tokens, head_dim]` tensor), so
greedy decoding returns the same tokens as the plain cache.

A revocation moves the slots to host memory (the slot store does it, ids unchanged): the cache
goes on, slower, with the same bytes.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from transformers.cache_utils import Cache, DynamicLayer

from spillway.client import HostMemory, PeerMemory, SlotStore, Transfer

log = logging.getLogger("spillway.integrations.transformers")

__all__ = ["SpillwayCache", "SpillwayLayer"]


class SpillwayLayer(DynamicLayer):
    """One decoder layer's KV, resident on the GPU only between its prefetch and its offload."""

    def __init__(self, cache: SpillwayCache) -> None:
        super().__init__()
        self.keys: torch.Tensor | None = None  # the attention's view while resident (DynamicLayer's fields)
        self.values: torch.Tensor | None = None
        self._cache = cache
        self._len = 0  # tokens cached
        self._ncap = 0  # chunks of capacity (slots per row)
        self._rows = 0  # rows: 2 * batch * kv_heads
        self._buf: torch.Tensor | None = None  # [2, B, H, ncap * C, D] while resident
        self._table = torch.empty(0, 0, dtype=torch.int64)  # [rows, ncap] slot ids
        self._stored: Transfer | None = None  # the last store: the next fetch reads what it wrote

    # ---- transformers' CacheLayerMixin -------------------------------------------------
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        if key_states.shape != value_states.shape:
            raise ValueError(
                f"SpillwayCache needs keys and values of one shape per token (got {tuple(key_states.shape)} and "
                f"{tuple(value_states.shape)}); use DynamicCache for this model"
            )
        super().lazy_initialization(key_states, value_states)
        b, h, _, d = key_states.shape
        self._shape = (b, h, d)
        self._rows = 2 * b * h
        self._table = torch.empty(self._rows, 0, dtype=torch.int64)
        self._cache._ensure_slots(self, d * key_states.element_size(), self._rows)

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if self._buf is None:
            self.prefetch()  # not prefetched (the first layer of a run, or no CUDA): fetch here
        buf = self._buf
        assert buf is not None
        if buf.is_cuda:  # it may come from the side stream: keep it until our stream is done with it
            buf.record_stream(torch.cuda.current_stream(buf.device))
        n, t = self._len, key_states.shape[-2]
        buf = self._grow(n + t)
        buf[0, :, :, n : n + t] = key_states
        buf[1, :, :, n : n + t] = value_states
        self._store_chunks(n, n + t)
        self._len = n + t
        # exactly what DynamicLayer returns (a contiguous tensor), so attention sees the same input
        self.keys = buf[0, :, :, : self._len].contiguous()
        self.values = buf[1, :, :, : self._len].contiguous()
        return self.keys, self.values

    def offload(self) -> None:
        """Drop the GPU copy: every token is already in the slots (stored as it came)."""
        self._buf = None
        self.keys = self.values = None

    def prefetch(self) -> None:
        """Bring the layer back from the slots, on the current stream (the cache's side stream)."""
        if not self.is_initialized or self._buf is not None:
            return
        b, h, d = self._shape
        c = self._cache.chunk_tokens
        buf = torch.empty(2, b, h, self._ncap * c, d, dtype=self.dtype, device=self.device)
        if self._ncap:
            if self._stored is not None and buf.is_cuda:
                self._stored.wait()  # read after write, whichever streams the two copies ran on
            t = self._slots.load(self._as_rows(buf), torch.arange(self._rows * self._ncap), self._table.reshape(-1))
            _order_after(t, buf)
        self._buf = buf

    def get_seq_length(self) -> int:
        return self._len

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.release()

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError(_UNSUPPORTED)

    def batch_repeat_interleave(self, repeats: int) -> None:
        raise NotImplementedError(_UNSUPPORTED)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        raise NotImplementedError(_UNSUPPORTED)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        raise NotImplementedError(_UNSUPPORTED)

    # ---- slots -------------------------------------------------------------------------
    @property
    def _slots(self) -> SlotStore:
        s = self._cache.slots
        assert s is not None
        return s

    def _as_rows(self, buf: torch.Tensor) -> torch.Tensor:
        """The buffer as [rows * ncap, chunk] rows: row r * ncap + c is chunk c of row r."""
        return buf.view(self._rows * self._ncap, -1)

    def _grow(self, tokens: int) -> torch.Tensor:
        buf = self._buf
        assert buf is not None
        c = self._cache.chunk_tokens
        need = -(-tokens // c)
        if need <= self._ncap:
            return buf
        # exactly the chunks needed: the buffer is made afresh from the slots at every prefetch,
        # so growing it one chunk every chunk_tokens tokens costs one extra copy of the layer then
        ncap = need
        ids = self._slots.alloc(self._rows * (ncap - self._ncap))  # OutOfPeerMemory: nothing allocated
        self._table = torch.cat([self._table, ids.view(self._rows, -1)], dim=1)
        grown = torch.empty(*buf.shape[:3], ncap * c, buf.shape[4], dtype=buf.dtype, device=buf.device)
        grown[:, :, :, : self._len] = buf[:, :, :, : self._len]
        self._ncap = ncap
        self._buf = grown
        return grown

    def _store_chunks(self, start: int, end: int) -> None:
        """Store the chunks that tokens [start, end) touched (whole chunks, from their start)."""
        c = self._cache.chunk_tokens
        first, last = start // c, (end - 1) // c
        chunks = torch.arange(first, last + 1)
        rows = (torch.arange(self._rows)[:, None] * self._ncap + chunks[None, :]).reshape(-1)
        assert self._buf is not None
        # (a Transfer holds no reference to device memory: keeping it does not keep the buffer)
        self._stored = self._slots.store(self._as_rows(self._buf), rows, self._table[:, first : last + 1].reshape(-1))

    def release(self) -> None:
        """Give this layer's slots back and forget its tokens."""
        if self._table.numel() and self._cache.slots is not None:
            self._cache.slots.free(self._table.reshape(-1))
        self._table = torch.empty(self._rows, 0, dtype=torch.int64)
        self._ncap = self._len = 0
        self._buf = None
        self._stored = None
        self.keys = self.values = None


_UNSUPPORTED = (
    "SpillwayCache keeps whole sequences in place: decoding that crops, repeats or reorders the cache "
    "(beam search, assisted decoding) is not supported; use DynamicCache for it"
)


def _order_after(t: Transfer, buf: torch.Tensor) -> None:
    if buf.is_cuda:
        t.wait()  # the current (side) stream waits for the copies; no host block


class SpillwayCache(Cache):
    """A transformers `Cache` whose layers are offloaded to a Spillway lease (or host memory).

        memory = PeerMemory.from_env()          # the pod's lease; HostMemory() without one
        cache = SpillwayCache(memory, model.config)
        out = model.generate(ids, max_new_tokens=256, past_key_values=cache)

    `chunk_tokens`: tokens per slot (a slot holds one chunk of one K or V head row).
    `max_tokens`: for `HostMemory`, the longest sequence to make room for (host memory is
    carved at the first update); with a lease the slots fill the lease.
    `prefetch`: fetch the next layer on a side CUDA stream while this one computes."""

    def __init__(
        self,
        memory: PeerMemory,
        config: Any = None,
        *,
        num_layers: int | None = None,
        chunk_tokens: int = 256,
        max_tokens: int | None = None,
        prefetch: bool = True,
    ) -> None:
        if chunk_tokens <= 0:
            raise ValueError(f"chunk_tokens must be positive, got {chunk_tokens}")
        if config is not None:
            text = config.get_text_config(decoder=True)
            kinds = set(getattr(text, "layer_types", None) or ["full_attention"])
            if kinds != {"full_attention"}:
                raise ValueError(
                    f"SpillwayCache offloads full-attention layers only; this model has {sorted(kinds)}: "
                    "use DynamicCache(offloading=True) for it"
                )
            num_layers = num_layers or int(text.num_hidden_layers)
        if not num_layers:
            raise ValueError("give the model's config (or num_layers) so the cache knows its layers")
        if isinstance(memory, HostMemory) and max_tokens is None:
            raise ValueError("host memory is carved to size: give max_tokens (the longest sequence) with HostMemory")
        self.memory = memory
        self.chunk_tokens = chunk_tokens
        self.max_tokens = max_tokens
        self.prefetch_next = prefetch
        self.slots: SlotStore | None = None
        self._side: dict[torch.device, torch.cuda.Stream] = {}
        super().__init__(layers=[SpillwayLayer(self) for _ in range(num_layers)])

    def _ensure_slots(self, layer: SpillwayLayer, row_bytes_per_token: int, rows: int) -> None:
        slot_bytes = row_bytes_per_token * self.chunk_tokens
        if self.slots is not None:
            if self.slots.slot_bytes != slot_bytes:
                raise ValueError(
                    f"layers of different head sizes ({self.slots.slot_bytes} and {slot_bytes} B per chunk row): "
                    "SpillwayCache needs one head size; use DynamicCache for this model"
                )
            return
        n = None
        if self.max_tokens is not None:
            n = -(-self.max_tokens // self.chunk_tokens) * rows * len(self.layers)
        self.slots = self.memory.slots(slot_bytes, n)
        log.info(
            "SpillwayCache slots ready",
            extra={"slots": self.slots.num_slots, "slot_bytes": slot_bytes, "kind": self.slots.kind},
        )

    def _side_stream(self, device: torch.device) -> torch.cuda.Stream:
        s = self._side.get(device)
        if s is None:
            s = self._side[device] = torch.cuda.Stream(device)
        return s

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        dev = key_states.device
        if dev.type == "cuda" and self.prefetch_next:
            side = self._side_stream(dev)
            torch.cuda.current_stream(dev).wait_stream(side)  # this layer's prefetch has landed
            nxt = self.layers[(layer_idx + 1) % len(self.layers)]
            if nxt is not self.layers[layer_idx]:
                with torch.cuda.stream(side):
                    nxt.prefetch()
        layer = self.layers[layer_idx]
        assert isinstance(layer, SpillwayLayer)
        keys, values = layer.update(key_states, value_states, *args, **kwargs)
        layer.offload()
        return keys, values

    def close(self) -> None:
        """Give every slot back (the cache is empty afterwards)."""
        for layer in self.layers:
            if isinstance(layer, SpillwayLayer):
                layer.release()
        if self.slots is not None:
            self.slots.close()
            self.slots = None

    def __repr__(self) -> str:
        where = self.slots.kind if self.slots is not None else "no slots yet"
        return f"SpillwayCache(layers={len(self.layers)}, chunk_tokens={self.chunk_tokens}, slots on {where})"

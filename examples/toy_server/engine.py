"""The toy server's engine: a fixed local KV budget, fair time-sharing, swapping through
spillway.client.

Every round, every active request makes progress: a chunk of its prompt (prefill) or one
token (decode). A request whose context is not in the local pool is swapped in first; to make
room, the resident context that ran most recently is swapped out (under round-robin that is
the one needed last). Swapped contexts live in a `PeerMemory` (lent GPU memory, or host
memory with `HostMemory`); when the lease is full they overflow to host memory.
"""

from __future__ import annotations

import itertools
import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from spillway.client import HostMemory, OutOfPeerMemory, PeerMemory

from .model import BLOCK_TOKENS, TinyDecoder

log = logging.getLogger("toy_server")


@dataclass(frozen=True)
class EngineConfig:
    kv_blocks: int = 256  # the local KV budget, in blocks of BLOCK_TOKENS tokens
    prefill_chunk: int = 64  # prompt tokens per request per round
    seed: int = 0


class ContextTooLong(Exception):
    pass


# (token id or None at the end, finish reason or "", error text or "")
Emit = Callable[[int | None, str, str], None]


@dataclass
class Sequence:
    id: int
    prompt: list[int]
    max_tokens: int
    emit: Emit
    arrival: float = field(default_factory=time.monotonic)
    generated: list[int] = field(default_factory=list)
    cached: int = 0  # tokens whose K/V are in the cache
    blocks: list[int] = field(default_factory=list)  # local pool block ids while resident
    swapped: int = 0  # number of blocks held in the swap store (0: resident or new)
    swap_store: PeerMemory | None = None
    last_run: int = -1
    first_token_at: float = 0.0
    last_token_at: float = 0.0
    cancelled: bool = False
    generator: torch.Generator = field(default_factory=torch.Generator)

    @property
    def context(self) -> list[int]:
        return self.prompt + self.generated

    def keys(self, n: int) -> list[tuple[int, int]]:
        return [(self.id, i) for i in range(n)]


@dataclass
class SwapStats:
    out_blocks: int = 0
    in_blocks: int = 0
    out_bytes: int = 0
    in_bytes: int = 0
    out_s: float = 0.0
    in_s: float = 0.0
    overflow_blocks: int = 0


class Engine:
    """Not thread-safe by itself: `run_round` is called from one worker at a time."""

    def __init__(
        self,
        model: TinyDecoder,
        swap: PeerMemory,
        cfg: EngineConfig,
        *,
        on_swap: Callable[[str, str, int, float], None] | None = None,
    ) -> None:
        self.model = model
        self.cfg = cfg
        self.swap = swap
        self.overflow = swap if isinstance(swap, HostMemory) else HostMemory()
        self.pool = torch.zeros((cfg.kv_blocks, *model.block_shape()), dtype=model.dtype, device=model.device)
        self.free = list(range(cfg.kv_blocks))
        self.active: list[Sequence] = []
        self.round = 0
        self.stats = SwapStats()
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self._pending: list[Sequence] = []
        self.on_swap = on_swap or (lambda direction, tier, nbytes, seconds: None)
        self.block_bytes = self.pool[0].numel() * self.pool.element_size()

    # ---- requests ----------------------------------------------------------------------
    def submit(self, prompt: list[int], max_tokens: int, emit: Emit, seed: int | None = None) -> Sequence:
        if not prompt:
            raise ValueError("the prompt is empty")
        need = math.ceil((len(prompt) + max_tokens) / BLOCK_TOKENS)
        if need > self.cfg.kv_blocks:
            raise ContextTooLong(
                f"prompt ({len(prompt)} tokens) + max_tokens ({max_tokens}) needs {need} KV blocks; the local "
                f"budget is {self.cfg.kv_blocks} blocks of {BLOCK_TOKENS} tokens"
            )
        if len(prompt) + max_tokens > self.model.cfg.max_context:
            raise ContextTooLong(f"prompt + max_tokens exceeds the model's context of {self.model.cfg.max_context}")
        seq = Sequence(next(self._ids), prompt, max_tokens, emit)
        seq.generator.manual_seed(self.cfg.seed + seq.id if seed is None else seed)
        with self._lock:
            self._pending.append(seq)
        return seq

    @property
    def has_work(self) -> bool:
        with self._lock:
            return bool(self.active or self._pending)

    @property
    def waiting(self) -> int:
        with self._lock:
            return len(self._pending)

    @property
    def swapped_count(self) -> int:
        return sum(1 for s in self.active if s.swapped)

    # ---- one round of fair time-sharing ------------------------------------------------
    def run_round(self) -> int:
        """Give every active request one step. Returns the number of tokens produced."""
        with self._lock:
            self.active.extend(self._pending)
            self._pending.clear()
        self.round += 1
        produced = 0
        for seq in list(self.active):
            if seq.cancelled:
                self._finish(seq, None)
                continue
            try:
                produced += self._step(seq)
            except Exception as exc:
                log.exception("request failed", extra={"seq": seq.id})
                self._finish(seq, str(exc))
        return produced

    def _step(self, seq: Sequence) -> int:
        prefill = seq.cached < len(seq.prompt)
        if prefill:
            chunk = seq.prompt[seq.cached : seq.cached + self.cfg.prefill_chunk]
        else:
            chunk = seq.context[seq.cached :]  # the last generated token
        self._make_resident(seq, seq.cached + len(chunk))
        logits = self.model.forward(chunk, seq.cached, self.pool, seq.blocks)
        seq.cached += len(chunk)
        seq.last_run = self.round
        if seq.cached < len(seq.prompt):
            return 0  # more prompt to go
        token = int(torch.multinomial(torch.softmax(logits.cpu() / 0.8, -1), 1, generator=seq.generator))
        seq.generated.append(token)
        now = time.monotonic()
        if not seq.first_token_at:
            seq.first_token_at = now
        seq.last_token_at = now
        done = len(seq.generated) >= seq.max_tokens
        seq.emit(token, "length" if done else "", "")
        if done:
            self._finish(seq, None, emitted=True)
        return 1

    def _finish(self, seq: Sequence, error: str | None, emitted: bool = False) -> None:
        if seq in self.active:
            self.active.remove(seq)
        self.free.extend(seq.blocks)
        seq.blocks = []
        if seq.swapped and seq.swap_store is not None:
            seq.swap_store.evict(seq.keys(seq.swapped), missing_ok=True)
            seq.swapped = 0
        if error is not None:
            seq.emit(None, "error", error)
        elif not emitted:
            seq.emit(None, "cancelled", "")

    # ---- local pool and swapping -------------------------------------------------------
    def _make_resident(self, seq: Sequence, tokens: int) -> None:
        need = math.ceil(tokens / BLOCK_TOKENS)
        want_free = need - (0 if seq.swapped else len(seq.blocks))  # a swapped context comes back whole
        while len(self.free) < want_free:
            victims = [s for s in self.active if s is not seq and s.blocks]
            if not victims:
                raise ContextTooLong(f"a context of {need} blocks does not fit the local budget of {len(self.free)}")
            self._swap_out(max(victims, key=lambda s: s.last_run))
        if seq.swapped:
            self._swap_in(seq)
        while len(seq.blocks) < need:
            seq.blocks.append(self.free.pop())

    def _swap_out(self, seq: Sequence) -> None:
        n = len(seq.blocks)
        keys = seq.keys(n)
        t0 = time.perf_counter()
        store = self.swap
        try:
            handle = store.put_rows(keys, self.pool, seq.blocks)
        except OutOfPeerMemory:
            store = self.overflow
            handle = store.put_rows(keys, self.pool, seq.blocks)
            self.stats.overflow_blocks += n
        # the freed local blocks may be overwritten by the next forward: wait for the copy
        if self.model.device.type == "cuda":
            handle.wait()
        handle.synchronize()
        dt = time.perf_counter() - t0
        self.free.extend(seq.blocks)
        seq.blocks = []
        seq.swapped = n
        seq.swap_store = store
        self.stats.out_blocks += n
        self.stats.out_bytes += n * self.block_bytes
        self.stats.out_s += dt
        self.on_swap("out", store.device_kind, n * self.block_bytes, dt)

    def _swap_in(self, seq: Sequence) -> None:
        n = seq.swapped
        assert seq.swap_store is not None
        blocks = [self.free.pop() for _ in range(n)]
        t0 = time.perf_counter()
        handle = seq.swap_store.get_rows(seq.keys(n), self.pool, blocks)
        handle.synchronize()
        dt = time.perf_counter() - t0
        seq.swap_store.evict(seq.keys(n))
        kind = seq.swap_store.device_kind
        seq.blocks = blocks
        seq.swapped = 0
        seq.swap_store = None
        self.stats.in_blocks += n
        self.stats.in_bytes += n * self.block_bytes
        self.stats.in_s += dt
        self.on_swap("in", kind, n * self.block_bytes, dt)

"""The toy server's engine: a fixed local KV budget, fair time-sharing, contexts swapped through
spillway.client's slot API.

Requests wait in a rotation queue. Each round takes a batch from the head of the queue (as
many requests, in order, as fit `round_blocks` of the local budget: at least one), runs all of
them in **one batched forward** (a prompt chunk of each request still in prefill, one token of
each request decoding) and moves them to the tail. New requests join the tail at the start of
the next round, so a waiting prompt runs within as many rounds as there are batches ahead of
it. The schedule depends on the requests and the budget only, never on when a copy finishes,
so the tokens are the same whatever memory the contexts swap to.

The next round's batch is known when a round starts, so its swap-ins are **prefetched**: the
round issues them (and the swap-outs that make room: contexts needed furthest in the future go
first) on the slot store's streams before it launches its own forward, and they run while it
computes. A round waits only for its own batch's swap-ins, issued one round earlier; a context
that could not be prefetched (no room) is swapped in when its round starts ("late"). Every
issue, wait and forward is in `Engine.events`.

Swapped contexts live in slots of `PeerMemory.slots()` (lent GPU memory, or pinned host
memory with `HostMemory`); when the lease's slots run out, in host-memory slots.
"""

from __future__ import annotations

import bisect
import collections
import itertools
import logging
import math
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch

from spillway.client import HostMemory, OutOfPeerMemory, PeerMemory, SlotStore, Transfer

from .model import BLOCK_TOKENS, Chunk, Decoder

log = logging.getLogger("toy_server")


@dataclass(frozen=True)
class EngineConfig:
    kv_blocks: int = 256  # the local KV budget, in blocks of BLOCK_TOKENS tokens
    prefill_chunk: int = 64  # prompt tokens per request per round
    # KV blocks one round's batch may hold (0: half the budget; the other half takes the next
    # round's swap-ins while this round computes). Runs that must produce the same tokens
    # must use the same value: it decides which requests share a forward.
    round_blocks: int = 0
    # slots to carve out of the swap memory (0: as many as the lease holds; host memory:
    # 4 x kv_blocks); more come from host memory when they run out
    swap_blocks: int = 0
    seed: int = 0
    event_log: int = 100_000  # engine events kept (the oldest are dropped)

    def __post_init__(self) -> None:
        if self.kv_blocks < 1 or self.prefill_chunk < 1 or self.round_blocks < 0 or self.swap_blocks < 0:
            raise ValueError(f"bad engine configuration {self}: kv_blocks and prefill_chunk must be positive")
        if self.round_blocks > self.kv_blocks:
            raise ValueError(f"round_blocks ({self.round_blocks}) cannot exceed the budget of {self.kv_blocks} blocks")

    @property
    def batch_blocks(self) -> int:
        return self.round_blocks or max(1, self.kv_blocks // 2)


class ContextTooLong(Exception):
    pass


# (token id or None at the end, finish reason or "", error text or "")
Emit = Callable[[int | None, str, str], None]


@dataclass(eq=False)
class Sequence:
    id: int
    prompt: list[int]
    max_tokens: int
    emit: Emit
    arrival: float = field(default_factory=time.monotonic)
    generated: list[int] = field(default_factory=list)
    cached: int = 0  # tokens whose K/V are in the cache
    blocks: list[int] = field(default_factory=list)  # local block ids while resident (or loading)
    slots: torch.Tensor | None = None  # slot ids of the swapped-out context (until its swap-in is done)
    slot_store: SlotStore | None = None
    loading: Transfer | None = None  # the swap-in into `blocks`, not yet waited for
    storing: Transfer | None = None  # the swap-out into `slots`, not yet known done
    first_token_at: float = 0.0
    last_token_at: float = 0.0
    cancelled: bool = False
    generator: torch.Generator = field(default_factory=torch.Generator)

    @property
    def context(self) -> list[int]:
        return self.prompt + self.generated

    @property
    def swapped(self) -> bool:
        return self.slots is not None and self.loading is None


@dataclass(frozen=True)
class EngineEvent:
    round: int
    # "load" (swap-in issued), "store" (swap-out issued), "wait" (blocked on swaps), "forward"
    # (launched), "forward-done" (logits on the host; seqs: the requests that got their first token)
    kind: str
    seqs: tuple[int, ...]
    for_round: int = 0  # load: the round whose forward needs it
    nbytes: int = 0
    seconds: float = 0.0  # wait: how long; forward-done: launch to logits


@dataclass
class SwapStats:
    out_blocks: int = 0
    in_blocks: int = 0
    out_bytes: int = 0
    in_bytes: int = 0
    prefetched: int = 0  # contexts swapped in one round ahead of their forward
    late: int = 0  # contexts swapped in by the round that needed them
    overflow_blocks: int = 0  # blocks that went to host memory because the lease's slots were full
    wait_s: float = 0.0  # time the engine blocked waiting for swaps
    forward_s: float = 0.0  # time in forwards (launch to logits on the host)
    rounds: int = 0
    # per direction: (start, end) of every swap batch, seconds since the engine's first swap
    intervals: dict[str, list[tuple[float, float]]] = field(default_factory=lambda: {"in": [], "out": []})

    def busy_s(self, direction: str = "") -> float:
        """Seconds during which at least one swap of `direction` ("in", "out"; "": either) was
        in flight."""
        spans = self.intervals[direction] if direction else self.intervals["in"] + self.intervals["out"]
        total, end = 0.0, -math.inf
        for a, b in sorted(spans):
            if b <= end:
                continue
            total += b - max(a, end)
            end = b
        return total


@dataclass
class _Timing:
    direction: str
    tier: str
    nbytes: int
    start: torch.cuda.Event | float
    end: torch.cuda.Event | float


class Engine:
    """Not thread-safe by itself: `run_round` is called from one worker at a time (`submit`
    may be called from any thread)."""

    def __init__(
        self,
        model: Decoder,
        swap: PeerMemory,
        cfg: EngineConfig,
        *,
        on_swap: Callable[[str, str, int, float], None] | None = None,
    ) -> None:
        self.model = model
        self.cfg = cfg
        self.swap = swap
        self.pool = model.new_pool(cfg.kv_blocks)
        self.block_bytes = model.block_bytes()
        self.free: list[int] = list(range(cfg.kv_blocks))  # sorted: allocations come out contiguous
        self.queue: list[Sequence] = []  # the rotation, in order of next use
        self.round = 0
        self.stats = SwapStats()
        self.events: collections.deque[EngineEvent] = collections.deque(maxlen=cfg.event_log)
        self.on_swap = on_swap or (lambda direction, tier, nbytes, seconds: None)
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self._pending: list[Sequence] = []
        self._next: list[Sequence] = []  # the batch planned for the next round
        self._fences: dict[int, Transfer] = {}  # local block -> the swap-out still reading it
        self._timings: list[_Timing] = []
        host = isinstance(swap, HostMemory)
        self._slot_stores = [swap.slots(self.block_bytes, cfg.swap_blocks or (4 * cfg.kv_blocks if host else None))]
        self._cuda = model.device.type == "cuda"
        if self._cuda:
            self._load_stream = torch.cuda.Stream(model.device)
            self._probes = {d: torch.cuda.Stream(model.device) for d in ("in", "out")}
            self._t0: torch.cuda.Event | float = torch.cuda.Event(enable_timing=True)
            self._t0.record(torch.cuda.current_stream(model.device))
        else:
            self._t0 = time.perf_counter()

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
            return bool(self.queue or self._pending)

    @property
    def waiting(self) -> int:
        with self._lock:
            return len(self._pending)

    @property
    def active(self) -> list[Sequence]:
        return list(self.queue)

    @property
    def swap_tier(self) -> str:
        """Where swapped contexts go now: cuda, simulated-cpu, host-pinned or host-pageable."""
        return self._slot_stores[0].kind

    @property
    def swap_slots_used(self) -> int:
        return sum(st.num_slots - st.free_slots for st in self._slot_stores)

    @property
    def swapped_count(self) -> int:
        return sum(1 for s in self.queue if s.swapped)

    # ---- the schedule (a function of the requests and the budget only) ---------------------
    def _step_len(self, seq: Sequence, cached: int) -> int:
        return min(self.cfg.prefill_chunk, len(seq.prompt) - cached) if cached < len(seq.prompt) else 1

    def _blocks_for_step(self, seq: Sequence, cached: int) -> int:
        return math.ceil((cached + self._step_len(seq, cached)) / BLOCK_TOKENS)

    def _plan(self, order: Iterable[Sequence], cached: dict[int, int]) -> list[Sequence]:
        """The batch: requests from the head of `order` while they fit `batch_blocks` (at least one)."""
        batch: list[Sequence] = []
        used = 0
        for s in order:
            need = self._blocks_for_step(s, cached.get(s.id, s.cached))
            if batch and used + need > self.cfg.batch_blocks:
                break
            batch.append(s)
            used += need
        return batch

    # ---- one round of fair time-sharing ------------------------------------------------
    def run_round(self) -> int:
        """Run the next batch in one forward, with the next round's swaps in flight. Returns
        the number of tokens produced."""
        with self._lock:
            self.queue.extend(self._pending)
            self._pending.clear()
        for s in [s for s in self.queue if s.cancelled]:
            self._finish(s, None)
        if not self.queue:
            return 0
        self.round += 1
        r = self.round
        self._resolve_timings()
        live = set(map(id, self.queue))
        cur = [s for s in self._next if id(s) in live] or self._plan(self.queue, {})
        in_cur = set(map(id, cur))
        self.queue = [s for s in self.queue if id(s) not in in_cur] + cur
        after = {s.id: s.cached + self._step_len(s, s.cached) for s in cur}
        ending = {id(s) for s in cur if after[s.id] >= len(s.prompt) and len(s.generated) + 1 >= s.max_tokens}
        nxt = self._plan((s for s in self.queue if id(s) not in ending), after)
        try:
            # this round's batch: resident, with room for its new tokens (swap-ins here are late)
            for s in cur:
                self._reserve(s, self._blocks_for_step(s, s.cached), keep=in_cur, for_round=r)
            # the next round's batch: swap-ins (and the swap-outs that make room) start now
            keep = in_cur | set(map(id, nxt))
            for s in nxt:
                if not self._reserve(s, self._blocks_for_step(s, after.get(s.id, s.cached)), keep, r + 1):
                    break  # no room: the rest comes in late, in order
            self._next = nxt
            self._await(cur)
        except Exception as exc:
            log.exception("swapping failed", extra={"round": r})
            for s in cur:
                self._finish(s, f"swapping its KV context failed: {exc}")
            self._next = []
            return 0
        return self._forward(cur, r)

    def _forward(self, cur: list[Sequence], r: int) -> int:
        chunks = []
        for s in cur:
            n = self._step_len(s, s.cached)
            chunks.append(Chunk(s.context[s.cached : s.cached + n], s.cached, s.blocks))
        self.events.append(EngineEvent(r, "forward", tuple(s.id for s in cur)))
        t0 = time.perf_counter()
        try:
            logits = self.model.forward(chunks, self.pool).cpu()
        except Exception as exc:
            log.exception("forward failed", extra={"round": r})
            for s in cur:
                self._finish(s, str(exc))
            return 0
        dt = time.perf_counter() - t0
        self.stats.forward_s += dt
        self.stats.rounds += 1
        produced = 0
        now = time.monotonic()
        firsts = []
        for s, ch, row in zip(cur, chunks, logits, strict=True):
            s.cached += len(ch.tokens)
            if s.cached < len(s.prompt):
                continue  # more prompt to go
            if not s.generated:
                firsts.append(s.id)
            token = int(torch.multinomial(torch.softmax(row / 0.8, -1), 1, generator=s.generator))
            s.generated.append(token)
            produced += 1
            s.first_token_at = s.first_token_at or now
            s.last_token_at = now
            done = len(s.generated) >= s.max_tokens
            s.emit(token, "length" if done else "", "")
            if done:
                self._finish(s, None, emitted=True)
        self.events.append(EngineEvent(r, "forward-done", tuple(firsts), seconds=dt))
        return produced

    def _finish(self, seq: Sequence, error: str | None, emitted: bool = False) -> None:
        if seq in self.queue:
            self.queue.remove(seq)
        if seq in self._next:
            self._next.remove(seq)
        for t in (seq.loading, seq.storing):
            if t is not None:
                t.synchronize()  # nothing may still copy into or out of what we give back
        seq.loading = seq.storing = None
        self._give_blocks(seq.blocks)
        seq.blocks = []
        if seq.slots is not None and seq.slot_store is not None:
            seq.slot_store.free(seq.slots)
        seq.slots = seq.slot_store = None
        if error is not None:
            seq.emit(None, "error", error)
        elif not emitted:
            seq.emit(None, "cancelled", "")

    # ---- local pool and swapping -------------------------------------------------------
    def _give_blocks(self, blocks: list[int]) -> None:
        for b in blocks:
            bisect.insort(self.free, b)

    def _take_blocks(self, n: int) -> list[int]:
        got, self.free = self.free[:n], self.free[n:]
        return got

    def _reserve(self, seq: Sequence, need: int, keep: set[int], for_round: int) -> bool:
        """Make `seq` hold `need` local blocks, swapping it in if it is out (issued now, for
        `for_round`'s forward) and swapping out other contexts, furthest next use first (never
        one of `keep`), to make room. False when there is no room without touching `keep`."""
        have = 0 if seq.swapped else len(seq.blocks)
        want = need - have
        if want <= 0:
            return True
        if len(self.free) < want:
            order = {id(s): i for i, s in enumerate(self.queue)}
            victims = sorted(
                (s for s in self.queue if id(s) not in keep and s.blocks and not s.swapped and s.loading is None),
                key=lambda s: -order[id(s)],
            )
            out: list[Sequence] = []
            room = len(self.free)
            for v in victims:
                if room >= want:
                    break
                out.append(v)
                room += len(v.blocks)
            if room < want:
                return False
            self._swap_out(out)
        if seq.swapped:
            self._swap_in(seq, for_round)
        seq.blocks += self._take_blocks(need - len(seq.blocks))
        return True

    def _slot_store_for(self, n: int) -> tuple[SlotStore, torch.Tensor]:
        for store in self._slot_stores:
            try:
                return store, store.alloc(n)
            except OutOfPeerMemory:
                continue
        # the lease's slots are full: host memory takes the overflow
        extra = HostMemory().slots(self.block_bytes, max(n, self.cfg.kv_blocks))
        self._slot_stores.append(extra)
        log.warning("swap slots full; overflowing to host memory", extra={"slots": extra.num_slots})
        return extra, extra.alloc(n)

    def _swap_out(self, victims: list[Sequence]) -> None:
        """Issue the swap-outs (ordered after the forwards already launched, which wrote the
        contexts); the freed blocks carry a fence until the copy is done."""
        for s in victims:
            n = len(s.blocks)
            store, slots = self._slot_store_for(n)
            if store is not self._slot_stores[0]:
                self.stats.overflow_blocks += n
            start = self._mark()
            t = store.store(self.pool, torch.tensor(s.blocks, dtype=torch.long), slots)
            self._timed("out", store.kind, n * self.block_bytes, start, t)
            for b in s.blocks:
                self._fences[b] = t
            self._give_blocks(s.blocks)
            s.blocks, s.slots, s.slot_store, s.storing = [], slots, store, t
            self.stats.out_blocks += n
            self.stats.out_bytes += n * self.block_bytes
            self.events.append(EngineEvent(self.round, "store", (s.id,), nbytes=n * self.block_bytes))

    def _swap_in(self, seq: Sequence, for_round: int) -> None:
        assert seq.slots is not None and seq.slot_store is not None
        n = len(seq.slots)
        blocks = self._take_blocks(n)
        rows = torch.tensor(blocks, dtype=torch.long)
        if self._cuda:
            # on a stream of our own, after the forwards already launched and after the swap-outs
            # still reading these blocks (or writing these slots); the forward stream goes on
            stream = self._load_stream
            stream.wait_stream(torch.cuda.current_stream(self.model.device))
            for fence in {id(f): f for f in (self._fences.pop(b, None) for b in blocks) if f is not None}.values():
                fence.wait(stream)
            if seq.storing is not None:
                seq.storing.wait(stream)
            with torch.cuda.stream(stream):
                start = self._mark()
                t = seq.slot_store.load(self.pool, rows, seq.slots)
        else:
            for b in blocks:
                self._fences.pop(b, None)
            start = self._mark()
            t = seq.slot_store.load(self.pool, rows, seq.slots)
        self._timed("in", seq.slot_store.kind, n * self.block_bytes, start, t)
        seq.blocks, seq.loading, seq.storing = blocks, t, None
        late = for_round == self.round
        self.stats.in_blocks += n
        self.stats.in_bytes += n * self.block_bytes
        self.stats.late += late
        self.stats.prefetched += not late
        self.events.append(EngineEvent(self.round, "load", (seq.id,), for_round=for_round, nbytes=n * self.block_bytes))

    def _await(self, batch: list[Sequence]) -> None:
        """Before the forward: the batch's swap-ins are done, and no swap-out still reads a block
        the forward will write. Blocks the host (measured) only if a copy is still running."""
        waits = [s.loading for s in batch if s.loading is not None]
        waits += [f for s in batch for b in s.blocks if (f := self._fences.pop(b, None)) is not None]
        pending = [t for t in waits if not t.done()]
        if pending:
            t0 = time.perf_counter()
            for t in pending:
                t.synchronize()
            dt = time.perf_counter() - t0
            self.stats.wait_s += dt
            self.events.append(EngineEvent(self.round, "wait", tuple(s.id for s in batch), seconds=dt))
        for s in batch:
            if s.loading is not None:
                assert s.slots is not None and s.slot_store is not None
                s.slot_store.free(s.slots)
                s.slots, s.slot_store, s.loading = None, None, None

    # ---- swap timing (never used by the schedule) ---------------------------------------
    def _mark(self) -> torch.cuda.Event | float:
        if not self._cuda:
            return time.perf_counter()
        e = torch.cuda.Event(enable_timing=True)
        e.record(torch.cuda.current_stream(self.model.device))
        return e

    def _timed(self, direction: str, tier: str, nbytes: int, start: torch.cuda.Event | float, t: Transfer) -> None:
        if self._cuda:
            probe = self._probes[direction]
            t.wait(probe)
            end: torch.cuda.Event | float = torch.cuda.Event(enable_timing=True)
            assert isinstance(end, torch.cuda.Event)
            end.record(probe)
        else:
            end = time.perf_counter()
        self._timings.append(_Timing(direction, tier, nbytes, start, end))

    def _resolve_timings(self, wait: bool = False) -> None:
        """Record the swaps that have finished: their interval and the `on_swap` callback."""
        left = []
        for tm in self._timings:
            if isinstance(tm.end, torch.cuda.Event):
                if wait:
                    tm.end.synchronize()
                elif not tm.end.query():
                    left.append(tm)
                    continue
                assert isinstance(self._t0, torch.cuda.Event) and isinstance(tm.start, torch.cuda.Event)
                a = self._t0.elapsed_time(tm.start) / 1e3
                b = self._t0.elapsed_time(tm.end) / 1e3
            else:
                assert isinstance(self._t0, float) and isinstance(tm.start, float)
                a, b = tm.start - self._t0, tm.end - self._t0
            self.stats.intervals[tm.direction].append((a, b))
            self.on_swap(tm.direction, tm.tier, tm.nbytes, b - a)
        self._timings = left

    def drain(self) -> None:
        """Wait for every swap in flight and record its timing (benchmarks, shutdown)."""
        self._resolve_timings(wait=True)

    def close(self) -> None:
        """Give the swap slots back to the swap memory (the engine is done)."""
        self.drain()
        for store in self._slot_stores:
            store.close()

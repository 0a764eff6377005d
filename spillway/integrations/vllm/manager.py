"""Scheduler side of the vLLM offloading spec: which KV chunk (an `OffloadKey`) lives in which
slot of the lent arena, LRU eviction, and the events vLLM publishes on its KV event stream.

It runs in vLLM's scheduler, which owns no GPU and holds no lease: the worker process attaches
the lease and moves the bytes. The manager only hands out slot ids (`0 .. num_slots-1`, the
same numbering as the worker's `SlotStore`) and learns of a revocation from the agent (a
`LeaseWatcher` on the pod's lease). With `on_revoke: recompute` it then drops every key at the
end of the scheduler step and stores nothing more, so lookups MISS and vLLM recomputes; with
`on_revoke: host` the slots keep serving from the host memory the worker moved them to.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass

from vllm.v1.kv_offload.base import (
    BlockIDsLoadStoreSpec,
    LookupResult,
    Medium,
    OffloadingEvent,
    OffloadingManager,
    OffloadKey,
    PrepareStoreOutput,
    ReqContext,
    RequestOffloadingContext,
    ScheduleEndContext,
)

ON_REVOKE_RECOMPUTE = "recompute"
ON_REVOKE_HOST = "host"
ON_REVOKE = (ON_REVOKE_RECOMPUTE, ON_REVOKE_HOST)

# vLLM's event stream knows two media, CPU and STORAGE. Lent HBM is memory, not storage, and
# after a revocation it is host memory: CPU is what its consumers should read.
MEDIUM = Medium.CPU


class SlotLoadStoreSpec(BlockIDsLoadStoreSpec):
    """Where offloaded chunks are: slot ids of the worker's SlotStore (`block_ids`)."""


@dataclass(slots=True)
class _Entry:
    slot: int
    ready: bool = False  # stored (complete_store came); before that it may be half-written
    loads: int = 0  # loads in flight: not evictable while > 0


class SpillwayOffloadingManager(OffloadingManager):
    """Key -> slot map with LRU eviction over `num_slots` slots.

    `revoked` is set (from another thread) when the lease is revoked; the manager acts on it at
    the end of a scheduler step, never between a lookup's HIT and the prepare_load that pins
    it. Only the scheduler thread calls the other methods, so the lock is vLLM's default."""

    def __init__(
        self,
        num_slots: int,
        *,
        on_revoke: str = ON_REVOKE_RECOMPUTE,
        enable_events: bool = False,
        revoked: threading.Event | None = None,
        on_shutdown: Callable[[], None] | None = None,
    ) -> None:
        if on_revoke not in ON_REVOKE:
            raise ValueError(f"on_revoke {on_revoke!r} is not one of {', '.join(ON_REVOKE)}")
        self.num_slots = num_slots
        self.on_revoke = on_revoke
        self.revoked = revoked or threading.Event()
        self.stopped = False  # recompute mode after a revocation: nothing is stored any more
        self._entries: OrderedDict[OffloadKey, _Entry] = OrderedDict()  # least recently used first
        self._free = list(range(num_slots - 1, -1, -1))  # a stack: lowest id on top
        self._events: list[OffloadingEvent] | None = [] if enable_events else None
        self._on_shutdown = on_shutdown

    # ---- state -------------------------------------------------------------------------
    @property
    def free_slots(self) -> int:
        return len(self._free)

    def __len__(self) -> int:
        return len(self._entries)

    def slot_of(self, key: OffloadKey) -> int | None:
        e = self._entries.get(key)
        return None if e is None else e.slot

    def _event(self, keys: list[OffloadKey], *, removed: bool, metadata_only: bool = False) -> None:
        if keys and self._events is not None:
            self._events.append(OffloadingEvent(keys=keys, medium=MEDIUM, removed=removed, metadata_only=metadata_only))

    # ---- vLLM's OffloadingManager ------------------------------------------------------
    def on_new_request(self, req_context: ReqContext) -> RequestOffloadingContext:
        return RequestOffloadingContext()

    def lookup(self, key: OffloadKey, req_context: ReqContext) -> LookupResult:
        e = self._entries.get(key)
        if e is None:
            return LookupResult.MISS
        return LookupResult.HIT if e.ready else LookupResult.HIT_PENDING

    def prepare_load(self, keys: Collection[OffloadKey], req_context: ReqContext) -> SlotLoadStoreSpec:
        slots = []
        for key in keys:
            e = self._entries.get(key)
            if e is None or not e.ready:
                raise KeyError(f"prepare_load of offload key {key.hex()} that is not stored (lookup said MISS)")
            e.loads += 1
            self._entries.move_to_end(key)  # used again
            slots.append(e.slot)
        return SlotLoadStoreSpec(slots)

    def touch(self, keys: Collection[OffloadKey], req_context: ReqContext) -> None:
        # the first key of a prefix ends most recent: a request's tail goes before its head
        for key in reversed(list(keys)):
            if key in self._entries:
                self._entries.move_to_end(key)

    def complete_load(self, keys: Collection[OffloadKey], req_context: ReqContext) -> None:
        for key in keys:
            e = self._entries.get(key)
            if e is not None and e.loads > 0:  # a key dropped at a revocation is simply gone
                e.loads -= 1

    def prepare_store(self, keys: Collection[OffloadKey], req_context: ReqContext) -> PrepareStoreOutput | None:
        if self.stopped:
            return None
        keys = list(keys)
        for key in keys:  # already stored: in use again
            if key in self._entries:
                self._entries.move_to_end(key)
        to_store = list(dict.fromkeys(k for k in keys if k not in self._entries))
        if not to_store:
            return PrepareStoreOutput(keys_to_store=[], store_spec=SlotLoadStoreSpec([]), evicted_keys=[])
        need = len(to_store) - len(self._free)
        evicted: list[OffloadKey] = []
        if need > 0:
            protected = set(keys)
            victims = []
            for key, e in self._entries.items():  # least recently used first
                if e.ready and e.loads == 0 and key not in protected:
                    victims.append(key)
                    if len(victims) == need:
                        break
            if len(victims) < need:
                return None  # nothing changed: vLLM skips this store
            for key in victims:
                self._free.append(self._entries.pop(key).slot)
            evicted = victims
            self._event(evicted, removed=True)
        slots = [self._free.pop() for _ in to_store]
        for key, slot in zip(to_store, slots, strict=True):
            self._entries[key] = _Entry(slot)
        return PrepareStoreOutput(keys_to_store=to_store, store_spec=SlotLoadStoreSpec(slots), evicted_keys=evicted)

    def complete_store(self, keys: Collection[OffloadKey], req_context: ReqContext, success: bool = True) -> None:
        stored, removed = [], []
        for key in keys:
            e = self._entries.get(key)
            if e is None or e.ready:
                continue
            if success:
                e.ready = True
                stored.append(key)
            else:
                del self._entries[key]
                self._free.append(e.slot)
                removed.append(key)
        self._event(removed, removed=True, metadata_only=True)
        self._event(stored, removed=False)

    def on_schedule_end(self, context: ScheduleEndContext) -> None:
        if self.revoked.is_set() and self.on_revoke == ON_REVOKE_RECOMPUTE and not self.stopped:
            self.drop_all()
            self.stopped = True

    def drop_all(self) -> None:
        """Forget every key (a revocation, or a cache reset). Jobs in flight finish on slots that
        are no longer handed out; their complete_* calls find nothing and do nothing."""
        gone = [k for k, e in self._entries.items() if e.ready]
        self._entries.clear()
        self._free = list(range(self.num_slots - 1, -1, -1))
        self._event(gone, removed=True)

    def reset_cache(self) -> None:
        self.drop_all()

    def take_events(self) -> Iterable[OffloadingEvent]:
        if self._events is None:
            return
        events, self._events = self._events, []
        yield from events

    def shutdown(self) -> None:
        fn, self._on_shutdown = self._on_shutdown, None
        if fn is not None:
            fn()

"""`SpillwayOffloadingSpec`: vLLM's OffloadingConnector offloads KV chunks to the pod's lease.

vLLM builds one spec per role from `--kv-transfer-config`: the scheduler's asks for a manager
(key -> slot, eviction, events) and the GPU worker's for a worker (the copies). Both read the
lease the device plugin put in the pod's environment (`SPILLWAY_LEASE_ID`, ...): the worker
attaches it and carves its slots; the scheduler only watches it at the agent, for its size
(the number of slots, computed the same way on both sides) and for a revocation.

Options (`kv_connector_extra_config`, beside vLLM's `spec_name` and `spec_module_path`):

  on_revoke   "recompute" (default): after a revocation the manager drops every key and stores
              nothing more, so vLLM recomputes; "host": keep offloading into the host memory the
              slots moved to (vLLM's CPU offloading, in effect).
  max_bytes   use at most this much of the lease(s) (a quantity: "8Gi"); default: all of it.
  host_bytes  without a lease in the environment, offload to this much pinned host memory;
              default: refuse to start without a lease.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from vllm.v1.kv_offload.base import CanonicalKVCaches, OffloadingSpec
from vllm.v1.kv_offload.config import OffloadingConfig

from spillway.client import HostMemory, LeaseUnavailable, PeerMemory
from spillway.client.lease import LeaseWatcher
from spillway.client.peer import ENV_AGENT_SOCKET, ENV_LEASE_ID, ENV_LEASE_TOKEN
from spillway.client.slots import slot_stride, slots_in
from spillway.integrations.vllm.manager import ON_REVOKE, ON_REVOKE_RECOMPUTE, SpillwayOffloadingManager
from spillway.integrations.vllm.version import accepts_failed_transfers, check_vllm_version
from spillway.integrations.vllm.worker import SpillwayOffloadingWorker
from spillway.units import parse_quantity

log = logging.getLogger("spillway.integrations.vllm")


@dataclass(frozen=True)
class LeaseEnv:
    """The pod's lease(s), as the device plugin hands them over (lists when several lenders)."""

    socket: str
    ids: list[str]
    tokens: list[str]

    @classmethod
    def read(cls, env: Mapping[str, str]) -> LeaseEnv | None:
        ids = [x.strip() for x in env.get(ENV_LEASE_ID, "").split(",") if x.strip()]
        if not ids:
            return None
        tokens = [x.strip() for x in env.get(ENV_LEASE_TOKEN, "").split(",") if x.strip()]
        socket = env.get(ENV_AGENT_SOCKET, "")
        if not socket or len(tokens) != len(ids):
            raise LeaseUnavailable(
                f"{ENV_LEASE_ID} names {len(ids)} lease(s) but {ENV_LEASE_TOKEN} has {len(tokens)} token(s) and "
                f"{ENV_AGENT_SOCKET} is {socket or 'not set'}: the device plugin sets all three at Allocate"
            )
        return cls(socket, ids, tokens)


def slots_that_fit(arena_bytes: list[int], slot_bytes: int) -> int:
    """How many slots a slot store carves out of fresh arenas of these sizes (the worker asks for
    exactly this many, so the scheduler's slot ids are the worker's)."""
    return sum(slots_in(b, slot_bytes) for b in arena_bytes)


def arena_sizes(lease_bytes: list[int], max_bytes: int | None) -> list[int]:
    """The arena each lease gets: all of it, or up to `max_bytes` in lease order (as `attach`)."""
    out = []
    for b in lease_bytes:
        size = b if max_bytes is None else min(b, max_bytes)
        if max_bytes is not None:
            max_bytes -= size
        out.append(size)
    return out


class SpillwayOffloadingSpec(OffloadingSpec):
    """vLLM offloading spec: KV chunks in slots of the pod's Spillway lease."""

    agent_timeout_s = 30.0  # how long the scheduler waits for the agent's snapshot of the lease

    def __init__(self, config: OffloadingConfig, env: Mapping[str, str] | None = None) -> None:
        super().__init__(config)
        self.vllm_version = check_vllm_version()
        x = self.extra_config
        self.on_revoke = str(x.get("on_revoke", ON_REVOKE_RECOMPUTE))
        if self.on_revoke not in ON_REVOKE:
            raise ValueError(
                f"kv_connector_extra_config on_revoke {self.on_revoke!r} is not one of {', '.join(ON_REVOKE)}"
            )
        self.max_bytes = _quantity(x, "max_bytes")
        self.host_bytes = _quantity(x, "host_bytes")
        if config.parallel.world_size != 1:
            raise ValueError(
                f"the Spillway offloading spec runs with one GPU worker per lease; this engine has "
                f"{config.parallel.world_size} workers (tensor/pipeline/context parallel): run one engine per GPU "
                "(each pod with its own lease) or use vLLM's CPUOffloadingSpec"
            )
        if config.canonical_layout:
            raise ValueError("canonical_layout is not supported by the Spillway offloading spec: leave it off")
        self.slot_bytes = config.worker_kv_bytes_per_block * self.blocks_per_chunk
        self.lease_env = LeaseEnv.read(os.environ if env is None else env)
        if self.lease_env is None and self.host_bytes is None:
            raise LeaseUnavailable(
                f"no Spillway lease in the environment ({ENV_LEASE_ID} is not set): request spillway.dev/peer-hbm in "
                "the pod spec so the device plugin hands the pod a lease, or set host_bytes in "
                "kv_connector_extra_config to offload to host memory instead"
            )
        # vLLM 0.33 stops the engine on a failed transfer; only later ones can take one
        self.fail_revoked_jobs = self.on_revoke == ON_REVOKE_RECOMPUTE and accepts_failed_transfers(self.vllm_version)
        self._manager: SpillwayOffloadingManager | None = None
        self._worker: SpillwayOffloadingWorker | None = None

    # ---- sizing ------------------------------------------------------------------------
    def _watch(self) -> LeaseWatcher:
        assert self.lease_env is not None
        e = self.lease_env
        return LeaseWatcher(e.socket, e.ids, e.tokens, start_timeout_s=self.agent_timeout_s)

    def num_slots(self, watcher: LeaseWatcher | None = None) -> int:
        if self.slot_bytes <= 0:
            return 0
        if self.lease_env is None:
            assert self.host_bytes is not None
            return self.host_bytes // slot_stride(self.slot_bytes)
        w = watcher or self._watch()
        try:
            sizes = [int(w.leases[i].bytes) if i in w.leases else 0 for i in w.lease_ids]
        finally:
            if watcher is None:
                w.close()
        return slots_that_fit(arena_sizes(sizes, self.max_bytes), self.slot_bytes)

    # ---- vLLM's OffloadingSpec ---------------------------------------------------------
    def get_manager(self) -> SpillwayOffloadingManager:
        if self._manager is None:
            watcher = self._watch() if self.lease_env is not None else None
            try:
                n = self.num_slots(watcher)
            except BaseException:
                if watcher is not None:
                    watcher.close()
                raise
            self._manager = SpillwayOffloadingManager(
                n,
                on_revoke=self.on_revoke,
                enable_events=self.kv_events_config.enable_kv_cache_events,
                revoked=watcher.revoked if watcher is not None else None,
                on_shutdown=watcher.close if watcher is not None else None,
            )
            log.info(
                "Spillway offloading manager ready",
                extra={"slots": n, "slot_bytes": self.slot_bytes, "on_revoke": self.on_revoke,
                       "lease": ",".join(self.lease_env.ids) if self.lease_env else "host memory"},
            )
        return self._manager

    def get_worker(self, kv_caches: CanonicalKVCaches) -> SpillwayOffloadingWorker:
        if self._worker is None:
            n = self.num_slots()
            if n <= 0:
                raise ValueError(
                    f"no room for a single KV chunk of {self.slot_bytes} B in the lease (max_bytes {self.max_bytes}): "
                    "ask for a larger spillway.dev/peer-hbm or fewer blocks_per_chunk"
                )
            memory: PeerMemory
            if self.lease_env is None:
                memory = HostMemory()
            else:
                e = self.lease_env
                memory = PeerMemory.attach(
                    e.socket, ",".join(e.ids), ",".join(e.tokens), max_bytes=self.max_bytes, reserve_host=True
                )
            try:
                slots = memory.slots(self.slot_bytes, n)
                if slots.alloc(n).tolist() != list(range(n)):  # the manager numbers slots 0..n-1
                    raise RuntimeError("a fresh slot store did not hand out ids 0..n-1")
                self._worker = SpillwayOffloadingWorker(
                    kv_caches,
                    slots,
                    blocks_per_chunk=self.blocks_per_chunk,
                    fail_revoked_jobs=self.fail_revoked_jobs,
                    on_shutdown=memory.close,
                )
            except BaseException:
                memory.close()
                raise
            log.info(
                "Spillway offloading worker ready",
                extra={"slots": n, "slot_bytes": self.slot_bytes, "slot_kind": slots.kind, "device": str(slots.device)},
            )
        return self._worker


def _quantity(x: Mapping[str, Any], key: str) -> int | None:
    v = x.get(key)
    if v is None:
        return None
    try:
        n = parse_quantity(v)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"kv_connector_extra_config {key} {v!r} is not a size (say 8Gi or 8589934592)") from exc
    if n <= 0:
        raise ValueError(f"kv_connector_extra_config {key} must be positive, got {v!r}")
    return n

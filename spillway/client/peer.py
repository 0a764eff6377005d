"""`PeerMemory`: a model server's handle on lent GPU memory (or on host memory without a lease)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
from collections.abc import Callable, Coroutine, Iterable, Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, TypeVar

import torch

from spillway.api.v1 import agent_pb2
from spillway.client.arena import Arena, Tier
from spillway.client.devices import cuda_available, find_cuda_device, visible_gpu_uuids
from spillway.client.lease import LeaseKeeper, RevocationRecord
from spillway.client.slots import SlotStore
from spillway.client.store import BlockStore, Transfer
from spillway.contract import ENV_AGENT_SOCKET, ENV_LEASE_ID, ENV_LEASE_TOKEN, ENV_LENDER_GPUS  # set by the plugin
from spillway.units import format_bytes, parse_quantity

log = logging.getLogger("spillway.client")
T = TypeVar("T")

# What the peer tier is, as shown in logs, repr and stats.
KIND_CUDA = "cuda"  # the lender GPU's HBM
KIND_SIMULATED = "simulated-cpu"  # no GPU here: the "lender" is a CPU arena of the leased size
KIND_HOST_PINNED = "host-pinned"
KIND_HOST_PAGEABLE = "host-pageable"


class LeaseUnavailable(RuntimeError):
    """The lease in the environment (or asked for) cannot be used; the message says why."""


@dataclass(frozen=True)
class Stats:
    device_kind: str  # where new blocks go now
    peer_kind: str  # what the peer tier is (or was): cuda, simulated-cpu, or "" without a lease
    lease_id: str  # comma-separated when several leases back the store (so are state and lender)
    lease_state: str
    lender_gpu: str
    leased_bytes: int  # all leases together
    peer_capacity_bytes: int
    peer_used_bytes: int
    host_used_bytes: int
    blocks_peer: int
    blocks_host: int
    renewals: int


def _host_tier(limit_bytes: int | None = None) -> Tier:
    pinned = cuda_available()
    return Tier(
        KIND_HOST_PINNED if pinned else KIND_HOST_PAGEABLE,
        torch.device("cpu"),
        pinned=pinned,
        limit_bytes=limit_bytes,
    )


def _lender_device(keeper: LeaseKeeper, device: torch.device | str | None) -> tuple[torch.device, str]:
    """Where a lease's arena lives, and the peer tier's kind."""
    lease = keeper.lease
    assert lease is not None
    if device is not None:
        dev = torch.device(device)
        return dev, (KIND_CUDA if dev.type == "cuda" else KIND_SIMULATED)
    found = find_cuda_device(lease.gpu_uuid)
    if found is not None:
        return found, KIND_CUDA
    if keeper.simulated:
        return torch.device("cpu"), KIND_SIMULATED
    raise LeaseUnavailable(
        f"the lender GPU {lease.gpu_uuid} of lease {lease.id} is not visible to this process "
        f"(visible: {', '.join(visible_gpu_uuids()) or 'no CUDA devices'}); the device plugin mounts "
        "the lender's device node: check that the pod requests spillway.dev/peer-hbm and that "
        "NVIDIA_VISIBLE_DEVICES / CUDA_VISIBLE_DEVICES do not hide it"
    )


class PeerMemory:
    """Block store on leased peer memory with a host-memory fallback.

    Make one with `PeerMemory.from_env()` (the lease the device plugin put in the pod's
    environment), `PeerMemory.acquire(...)` (an ELASTIC lease asked for at run time) or
    `HostMemory()` (no lease: pinned host memory from the start). Then `put`, `get`, `evict`.
    """

    def __init__(
        self, store: BlockStore, keepers: Sequence[LeaseKeeper] = (), *, peer_kind: str, lender_gpu: str = ""
    ) -> None:
        self._store = store
        self._keepers = list(keepers)
        self.peer_kind = peer_kind
        self.lender_gpu = lender_gpu  # comma-separated when several leases (lenders) back this store
        self._closed = False

    # ---- construction ------------------------------------------------------------------
    @classmethod
    def attach(
        cls,
        agent_socket: str,
        lease_id: str,
        token: str,
        *,
        holder: str = "",
        pod: str = "",
        max_bytes: int | str | None = None,
        device: torch.device | str | None = None,
        host_limit: int | str | None = None,
        renew_ttl_s: float = 0.0,
        reserve_host: bool = False,
    ) -> PeerMemory:
        """Claim a lease, attach this PID to it and allocate its bytes on the lender.

        `lease_id` and `token` may each be a comma-separated list (the device plugin's form when
        a pod's peer memory comes from several lender GPUs): each lease is claimed and gets its
        own arena on its own lender, blocks spread over them, and a revocation of one lease moves
        only that lease's blocks to host memory.

        The arena lives on the CUDA device whose UUID is the lease's GPU. `device` overrides
        that (for example the one GPU of a single-GPU benchmark machine). When the agent's GPU
        is simulated and no override is given, the peer tier is a CPU arena labelled
        `simulated-cpu`. `max_bytes` caps the arenas (in lease order) below the leased size.
        `renew_ttl_s` is the TTL each background renewal asks for (0: the lease's own).
        `reserve_host` sets aside (pinned) host memory of each arena's size now, so a revocation
        only copies: use it for large leases, where pinning at revocation time could miss the
        deadline."""
        ids = [x.strip() for x in lease_id.split(",")]
        tokens = [x.strip() for x in token.split(",")]
        if len(ids) != len(tokens) or not all(ids) or not all(tokens):
            raise LeaseUnavailable(
                f"{len(ids)} lease id(s) but {len(tokens)} token(s) (or an empty one): {ENV_LEASE_ID} and "
                f"{ENV_LEASE_TOKEN} must list the same number of comma-separated entries, in the same order"
            )
        # holder/pod "" keep what the lease has (the operator or device plugin named it)
        store_box: list[BlockStore] = []
        arena_of: dict[str, Arena] = {}

        def revoker(lid: str) -> Callable[[], tuple[int, int]]:
            def on_revoke() -> tuple[int, int]:
                if not store_box or lid not in arena_of:
                    return 0, 0
                blocks, nbytes, _ = store_box[0].close_primary([arena_of[lid]])
                return blocks, nbytes

            return on_revoke

        keepers: list[LeaseKeeper] = []
        try:
            for lid, tok in zip(ids, tokens, strict=True):
                keepers.append(
                    LeaseKeeper(agent_socket, lid, tok, on_revoke=revoker(lid), holder=holder, pod=pod,
                                renew_ttl_s=renew_ttl_s)
                )
            budget = None if max_bytes is None else parse_quantity(max_bytes)
            host = _host_tier(None if host_limit is None else parse_quantity(host_limit))
            primary: Tier | None = None
            kind = ""
            placed: list[tuple[LeaseKeeper, torch.device, int]] = []
            for keeper in keepers:
                lease = keeper.lease
                assert lease is not None
                size = lease.bytes if budget is None else min(lease.bytes, budget)
                if budget is not None:
                    budget -= size
                dev, k = _lender_device(keeper, device)
                if kind and k != kind:
                    raise LeaseUnavailable(
                        f"lease {lease.id} would live in {k} memory but the others in {kind}: all lenders of one "
                        "store must be real GPUs, or all simulated"
                    )
                kind = k
                if size <= 0:
                    continue  # max_bytes leaves nothing for this lease: it is kept, unused
                if primary is None:
                    primary = Tier(kind, dev, fixed_bytes=size)
                    arena_of[keeper.lease_id] = primary.arenas[0]
                else:
                    arena_of[keeper.lease_id] = primary.add_fixed(size, dev)
                placed.append((keeper, dev, size))
            if primary is None:
                raise LeaseUnavailable(f"max_bytes {max_bytes} leaves no room in lease(s) {lease_id}: ask for more")
            store = BlockStore(primary, host)
            if reserve_host:
                store.spare_host = [host._empty(size) for _, _, size in placed]
            store_box.append(store)
            for keeper in keepers:
                if keeper.revoked and keeper.lease_id in arena_of:  # REVOKING arrived while we allocated
                    store.close_primary([arena_of[keeper.lease_id]])
        except BaseException:
            for keeper in keepers:
                keeper.close(release=False)
            raise
        lenders = ",".join(k.lease.gpu_uuid for k in keepers if k.lease is not None)
        pm = cls(store, keepers, peer_kind=kind, lender_gpu=lenders)
        for keeper, dev, size in placed:
            assert keeper.lease is not None
            log.info(
                "peer memory ready",
                extra={
                    "lease": keeper.lease.id,
                    "tier": kind,
                    "device": str(dev),
                    "bytes": format_bytes(size),
                    "lender_gpu": keeper.lease.gpu_uuid,
                },
            )
        return pm

    @classmethod
    def from_env(
        cls,
        env: Mapping[str, str] | None = None,
        *,
        holder: str = "",
        pod: str = "",
        max_bytes: int | str | None = None,
        device: torch.device | str | None = None,
        fallback: str = "HostMemory",
        renew_ttl_s: float = 0.0,
        reserve_host: bool = False,
    ) -> PeerMemory:
        """Attach the lease the device plugin put in the environment. Without one, use host
        memory (fallback "HostMemory") or raise (fallback "None")."""
        env = os.environ if env is None else env
        lease_id = env.get(ENV_LEASE_ID, "")
        if not lease_id:
            if fallback == "None":
                raise LeaseUnavailable(
                    f"{ENV_LEASE_ID} is not set and the fallback is None: request spillway.dev/peer-hbm in the "
                    "pod spec so the device plugin hands this pod a lease, or allow fallback HostMemory"
                )
            if fallback != "HostMemory":
                raise ValueError(f"fallback {fallback!r} is not one of HostMemory, None")
            log.info("no lease in the environment; using host memory (HostMemory fallback)")
            return HostMemory()
        missing = [k for k in (ENV_LEASE_TOKEN, ENV_AGENT_SOCKET) if not env.get(k)]
        if missing:
            raise LeaseUnavailable(
                f"{ENV_LEASE_ID} is set but {', '.join(missing)} is not: the pod's environment is "
                "incomplete; it is set by the Spillway device plugin at Allocate"
            )
        pod = pod or _pod_from_env(env)
        pm = cls.attach(
            env[ENV_AGENT_SOCKET],
            lease_id,
            env[ENV_LEASE_TOKEN],
            holder=holder,
            pod=pod,
            max_bytes=max_bytes,
            device=device,
            renew_ttl_s=renew_ttl_s,
            reserve_host=reserve_host,
        )
        lenders = [u.strip() for u in env.get(ENV_LENDER_GPUS, "").split(",") if u.strip()]
        if lenders and any(u not in lenders for u in pm.lender_gpu.split(",")):
            log.warning(
                "lease GPU is not among SPILLWAY_LENDER_GPUS",
                extra={"lease_gpu": pm.lender_gpu, "lender_gpus": ",".join(lenders)},
            )
        return pm

    @classmethod
    def acquire(
        cls,
        agent_socket: str,
        size: int | str,
        *,
        holder: str = "",
        near_gpu_uuid: str = "",
        gpu_uuid: str = "",
        kind: int = agent_pb2.ELASTIC,
        ttl_s: float = 0.0,
        priority: int = 0,
        device: torch.device | str | None = None,
        reserve_host: bool = False,
    ) -> PeerMemory:
        """Ask the agent for a new lease (ELASTIC by default: first to be reclaimed) and attach it."""
        from spillway.agent.client import AgentClient

        holder = holder or f"pid-{os.getpid()}"

        async def _acquire() -> agent_pb2.AcquireResponse:
            async with AgentClient(agent_socket) as client:
                resp: agent_pb2.AcquireResponse = await client.acquire(
                    size,
                    holder,
                    kind=kind,
                    gpu_uuid=gpu_uuid,
                    near_gpu_uuid=near_gpu_uuid,
                    ttl_s=ttl_s,
                    priority=priority,
                )
                return resp

        resp = _run_coroutine(_acquire())
        return cls.attach(
            agent_socket, resp.lease.id, resp.token, holder=holder, device=device, reserve_host=reserve_host
        )

    # ---- slots: the block-id hot path ----------------------------------------------------
    def slots(self, slot_bytes: int, num_slots: int | None = None) -> SlotStore:
        """Fixed-size slots for an engine's KV blocks (see `SlotStore`), carved out of the
        lease's arena(s): `num_slots` of them, or as many as fit. `HostMemory` carves them out
        of pinned host memory (give `num_slots`). Raises `OutOfPeerMemory` when they do not fit."""
        self._check_open()
        return self._store.slots(slot_bytes, num_slots)

    # ---- block store -------------------------------------------------------------------
    def put(self, keys: Sequence[object], tensors: Sequence[torch.Tensor]) -> Transfer:
        """Store a batch of blocks (asynchronously on CUDA; see `Transfer`). All or nothing:
        raises `OutOfPeerMemory` when the lease cannot hold the batch."""
        self._check_open()
        return self._store.put(keys, tensors)

    def put_rows(self, keys: Sequence[object], pool: torch.Tensor, rows: Sequence[int]) -> Transfer:
        """Store rows of a paged KV pool (`pool[rows[i]]` under `keys[i]`) with one gather and one
        copy per batch. All or nothing, like `put`."""
        self._check_open()
        return self._store.put_rows(keys, pool, rows)

    def get_rows(self, keys: Sequence[object], pool: torch.Tensor, rows: Sequence[int]) -> Transfer:
        """Fetch blocks into rows of a paged KV pool with one copy and one scatter per batch."""
        self._check_open()
        return self._store.get_rows(keys, pool, rows)

    def get(
        self,
        keys: Sequence[object],
        out: Sequence[torch.Tensor] | None = None,
        *,
        device: torch.device | str | None = None,
    ) -> Transfer:
        """Fetch a batch of blocks into `out` (or new tensors); `.result()` waits and returns them."""
        self._check_open()
        return self._store.get(keys, out, device=device)

    def evict(self, keys: Iterable[object], *, missing_ok: bool = False) -> int:
        return self._store.evict(keys, missing_ok=missing_ok)

    def synchronize(self) -> None:
        self._store.synchronize()

    def __contains__(self, key: object) -> bool:
        return key in self._store

    def __len__(self) -> int:
        return len(self._store)

    def keys(self) -> list[object]:
        return self._store.keys()

    def tier_of(self, key: object) -> str:
        return self._store.tier_of(key)

    @property
    def free_bytes(self) -> int:
        """Room left where new blocks go (for host memory: in the chunks already allocated)."""
        tier = self._store.primary if self._store.primary_open else self._store.fallback
        return tier.free_bytes

    # ---- state -------------------------------------------------------------------------
    @property
    def device_kind(self) -> str:
        """Where new blocks go: cuda, simulated-cpu, host-pinned or host-pageable."""
        return self._store.primary.kind if self._store.primary_open else self._store.fallback.kind

    @property
    def lease_id(self) -> str:
        """The lease's id (comma-separated when several leases back this store)."""
        return ",".join(k.lease_id for k in self._keepers)

    @property
    def revocation(self) -> RevocationRecord | None:
        """The first revocation that happened (per lease: `revocations`)."""
        return next((r for r in self.revocations if r is not None), None)

    @property
    def revocations(self) -> list[RevocationRecord | None]:
        """Per lease, in lease order: what its revocation did, or None."""
        return [k.revocation for k in self._keepers]

    def stats(self) -> Stats:
        counts = self._store.counts()
        leases = [k.lease for k in self._keepers if k.lease is not None]
        has_peer = self._store.primary is not self._store.fallback and self._store.primary_open
        return Stats(
            device_kind=self.device_kind,
            peer_kind=self.peer_kind,
            lease_id=self.lease_id,
            lease_state=",".join(agent_pb2.LeaseState.Name(x.state) for x in leases),
            lender_gpu=self.lender_gpu,
            leased_bytes=sum(x.bytes for x in leases),
            peer_capacity_bytes=self._store.primary.capacity_bytes if has_peer else 0,
            peer_used_bytes=self._store.primary.used_bytes if has_peer else 0,
            host_used_bytes=self._store.fallback.used_bytes,
            blocks_peer=counts["primary"] if has_peer else 0,
            blocks_host=counts["fallback"] if has_peer else len(self._store),
            renewals=sum(k.renewals for k in self._keepers),
        )

    def __repr__(self) -> str:
        s = self.stats()
        lease = f" lease={s.lease_id} ({s.lease_state}) lender={s.lender_gpu or '-'}" if s.lease_id else ""
        return (
            f"<PeerMemory tier={s.device_kind}{lease} peer={format_bytes(s.peer_used_bytes)}/"
            f"{format_bytes(s.peer_capacity_bytes)} host={format_bytes(s.host_used_bytes)} blocks={len(self)}>"
        )

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("this PeerMemory is closed")

    def close(self, *, release: bool = True) -> None:
        """Give the lender's memory back to the driver, then stop renewing and give the
        lease(s) back (blocks and slots are dropped)."""
        if self._closed:
            return
        self._closed = True
        self._store.close()
        for keeper in self._keepers:
            keeper.close(release=release)

    def __enter__(self) -> PeerMemory:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


class HostMemory(PeerMemory):
    """The fallback: no lease, blocks in pinned host memory (plain CPU memory without CUDA)."""

    def __init__(self, *, limit_bytes: int | str | None = None) -> None:
        host = _host_tier(None if limit_bytes is None else parse_quantity(limit_bytes))
        # The primary tier is the host tier itself: there is no peer tier to overflow.
        super().__init__(BlockStore(host, host), (), peer_kind="")


def _run_coroutine(coro: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine to completion from sync code, even when this thread runs an event loop."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coro).result()


def _pod_from_env(env: Mapping[str, str]) -> str:
    name = env.get("POD_NAME") or env.get("HOSTNAME", "")
    ns = env.get("POD_NAMESPACE", "")
    return f"{ns}/{name}" if ns and name else ""

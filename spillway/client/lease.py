"""Keeps a borrower's lease alive: claim, PID attach, background renew, and the Watch stream
that brings REVOKING. Runs its own asyncio loop in a daemon thread, so the model server's
code stays synchronous (or on its own loop) and a slow server never starves the renewals."""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import grpc

from spillway.api.v1 import agent_pb2

log = logging.getLogger("spillway.client")

# Renew when this share of the TTL has passed (so two renewals can fail before expiry).
RENEW_FRACTION = 1 / 3
_TERMINAL = (agent_pb2.RELEASED, agent_pb2.EXPIRED, agent_pb2.REVOKED)
_LOST_CODES = (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.PERMISSION_DENIED)


@dataclass
class RevocationRecord:
    """What happened when the lender took its memory back."""

    notified_at: float  # time.time() when REVOKING arrived
    deadline: float  # time.time() of the revoke deadline
    blocks: int = 0
    bytes: int = 0
    migrate_s: float = 0.0
    released_at: float = 0.0
    on_time: bool = False
    error: str = ""


@dataclass
class LeaseInfo:
    lease: agent_pb2.Lease
    simulated: bool
    events: list[str] = field(default_factory=list)


def _state_name(state: int) -> str:
    return agent_pb2.LeaseState.Name(state)


class _LoopThread:
    """An asyncio loop on a daemon thread, for one agent connection: `_main()` runs there until
    `_stop_loop()`; its start (or failure) is reported through `_ready`."""

    _loop: asyncio.AbstractEventLoop
    _stopping: threading.Event
    _astop: asyncio.Event | None
    _thread: threading.Thread
    _ready: concurrent.futures.Future[Any]

    def _start_loop(self, name: str) -> None:
        self._loop = asyncio.new_event_loop()
        self._stopping = threading.Event()
        self._astop = None
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    async def _main(self) -> None:  # pragma: no cover - every subclass has one
        raise NotImplementedError

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            self._loop.run_until_complete(self._main())
        except Exception as exc:  # pragma: no cover - carried by the start future, or logged
            if not self._ready.done():
                self._ready.set_exception(exc)
            else:
                log.exception("lease thread stopped", extra={"thread": self._thread.name})
        finally:
            self._loop.close()

    async def _wait_stop(self) -> None:
        """In `_main`: return once `_stop_loop()` was called (also before this was reached)."""
        self._astop = asyncio.Event()
        if self._stopping.is_set():
            self._astop.set()
        await self._astop.wait()

    def _stop_loop(self) -> None:
        self._stopping.set()
        stop = self._astop
        if stop is not None and not self._loop.is_closed():
            try:
                self._loop.call_soon_threadsafe(stop.set)
            except RuntimeError:  # the loop just closed
                pass
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout=10)


class LeaseKeeper(_LoopThread):
    """Owns the agent connection for one lease.

    `renew_ttl_s` (0: the lease's own TTL) is the TTL each renewal asks for: a short one makes
    the lease expire soon after this process dies. `on_revoke()` is called (in a worker thread)
    when the lease goes REVOKING or is lost; it must move every block off the lender and return
    (blocks, bytes). The keeper then releases the lease. Construction claims the lease and
    attaches the PID, raising on failure."""

    def __init__(
        self,
        agent_socket: str,
        lease_id: str,
        token: str,
        *,
        on_revoke: Callable[[], tuple[int, int]],
        holder: str = "",
        pod: str = "",
        attach: bool = True,
        renew_ttl_s: float = 0.0,
        start_timeout_s: float = 30.0,
    ) -> None:
        self.agent_socket = agent_socket
        self.lease_id = lease_id
        self.token = token
        self.holder = holder
        self.pod = pod
        self._on_revoke = on_revoke
        self._want_attach = attach
        self.renew_ttl_s = renew_ttl_s
        self._attachment: Any = None
        self._ready: concurrent.futures.Future[LeaseInfo] = concurrent.futures.Future()
        self._client: Any = None
        self._revoke_lock = threading.Lock()
        self._revoked = False
        self.lease: agent_pb2.Lease | None = None
        self.simulated = False
        self.renewals = 0
        self.revocation: RevocationRecord | None = None
        self.released = False
        self._start_loop(f"spillway-lease-{lease_id[:8]}")
        try:
            info = self._ready.result(timeout=start_timeout_s)
        except BaseException:
            self.close(release=False)
            raise
        self.lease = info.lease
        self.simulated = info.simulated

    # ---- the loop thread ---------------------------------------------------------------
    async def _main(self) -> None:
        from spillway.agent.client import AgentClient  # the agent's client, on the agent's socket

        self._client = AgentClient(self.agent_socket)
        try:
            try:
                lease = await self._client.claim(self.lease_id, self.token, holder=self.holder, pod=self.pod)
                inv = await self._client.inventory()
                if self._want_attach:
                    from spillway.agent.attach import attach

                    self._attachment = await asyncio.to_thread(attach, self.agent_socket, self.lease_id, self.token)
            except BaseException as exc:
                self._ready.set_exception(exc)
                return
            self.lease = lease
            self._ready.set_result(LeaseInfo(lease, bool(inv.simulated)))
            log.info(
                "lease attached",
                extra={
                    "lease": lease.id,
                    "gpu": lease.gpu_uuid,
                    "bytes": lease.bytes,
                    "ttl_ms": lease.ttl_ms,
                    "simulated": bool(inv.simulated),
                },
            )
            tasks = [asyncio.create_task(self._renew_loop()), asyncio.create_task(self._watch_loop())]
            await self._wait_stop()
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        finally:
            if self._release_on_close and not self.released and self._ready.done() and self._ready.exception() is None:
                await self._release()
            await self._client.close()

    _release_on_close = True

    async def _renew_loop(self) -> None:
        assert self.lease is not None
        ttl_s = max(self.renew_ttl_s or self.lease.ttl_ms / 1000.0, 0.3)
        interval = max(ttl_s * RENEW_FRACTION, 0.1)
        while not self._stopping.is_set() and not self._revoked:
            await asyncio.sleep(interval)
            if self._revoked or self._stopping.is_set():
                return
            try:
                self.lease = await self._client.renew(self.lease_id, self.token, self.renew_ttl_s)
                self.renewals += 1
            except grpc.aio.AioRpcError as exc:
                if exc.code() in _LOST_CODES:
                    log.error(
                        "lease lost on renew; moving blocks to host memory",
                        extra={"lease": self.lease_id, "code": exc.code().name, "details": exc.details()},
                    )
                    await self._handle_revoke(reason=f"renew failed: {exc.code().name}: {exc.details()}")
                    return
                log.warning("renew failed; will retry", extra={"lease": self.lease_id, "code": exc.code().name})

    async def _watch_loop(self) -> None:
        backoff = 0.2
        while not self._stopping.is_set() and not self._revoked:
            try:
                async for ev in self._client.watch(self.lease_id, self.token):
                    backoff = 0.2
                    leases = list(ev.leases) if ev.kind == agent_pb2.WatchEvent.SNAPSHOT else [ev.lease]
                    for lease in leases:
                        if lease.id != self.lease_id:
                            continue
                        if lease.state == agent_pb2.REVOKING:
                            self.lease = lease
                            await self._handle_revoke(reason=lease.reason or "reclaimed by the lender")
                            return
                        if lease.state in _TERMINAL:
                            self.lease = lease
                            if not self.released:
                                await self._handle_revoke(reason=f"lease is {_state_name(lease.state)}")
                            return
            except grpc.aio.AioRpcError as exc:
                if self._stopping.is_set():
                    return
                if exc.code() in _LOST_CODES:
                    await self._handle_revoke(reason=f"watch refused: {exc.code().name}: {exc.details()}")
                    return
                log.warning("watch stream broke; reconnecting", extra={"lease": self.lease_id, "code": exc.code().name})
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 5.0)

    async def _handle_revoke(self, reason: str) -> None:
        with self._revoke_lock:
            if self._revoked:
                return
            self._revoked = True
        lease = self.lease
        now = time.time()
        deadline = lease.revoke_deadline_ms / 1000.0 if lease is not None and lease.revoke_deadline_ms else now
        rec = RevocationRecord(notified_at=now, deadline=deadline)
        self.revocation = rec
        log.warning(
            "lease revoking: moving every block to host memory",
            extra={"lease": self.lease_id, "reason": reason, "deadline_in_s": round(deadline - now, 3)},
        )
        try:
            t0 = time.monotonic()
            rec.blocks, rec.bytes = await asyncio.to_thread(self._on_revoke)
            rec.migrate_s = time.monotonic() - t0
        except Exception as exc:  # the blocks stay where they are; the lender will escalate
            rec.error = f"migration failed: {exc}"
            log.exception("could not move blocks off the lender", extra={"lease": self.lease_id})
            return
        await self._release()
        rec.released_at = time.time()
        rec.on_time = rec.released_at <= rec.deadline or lease is None or not lease.revoke_deadline_ms
        log.info(
            "lease given back",
            extra={
                "lease": self.lease_id,
                "blocks": rec.blocks,
                "bytes": rec.bytes,
                "migrate_s": round(rec.migrate_s, 4),
                "on_time": rec.on_time,
            },
        )

    async def _release(self) -> None:
        if self.released:
            return
        try:
            self.lease = await self._client.release(self.lease_id, self.token)
        except grpc.aio.AioRpcError as exc:
            if exc.code() not in _LOST_CODES:
                log.warning(
                    "release failed", extra={"lease": self.lease_id, "code": exc.code().name, "details": exc.details()}
                )
                return
        self.released = True
        if self._attachment is not None:
            self._attachment.close()
            self._attachment = None

    # ---- caller side -------------------------------------------------------------------
    @property
    def revoked(self) -> bool:
        return self._revoked

    def close(self, release: bool = True) -> None:
        """Stop renewing; release the lease (unless told not to) and close the connection."""
        self._release_on_close = release
        self._stop_loop()
        if self._attachment is not None:
            self._attachment.close()
            self._attachment = None


class LeaseWatcher(_LoopThread):
    """Watches leases held by another part of this pod, without claiming, renewing or releasing
    them: a scheduler that must know a lease's size and hear of its revocation while a worker
    process owns the lease (vLLM's scheduler beside its GPU worker).

    Construction waits for the agent's first snapshot (the leases' sizes); a lease that is not
    live then counts as revoked. `revoked` is set when any of them goes REVOKING or ends, and
    `on_revoke()` (if given) runs once, in the watcher's thread."""

    def __init__(
        self,
        agent_socket: str,
        lease_ids: list[str],
        tokens: list[str],
        *,
        on_revoke: Callable[[], None] | None = None,
        start_timeout_s: float = 30.0,
    ) -> None:
        if len(lease_ids) != len(tokens) or not lease_ids:
            raise ValueError(f"{len(lease_ids)} lease id(s) but {len(tokens)} token(s): give one token per lease")
        self.agent_socket = agent_socket
        self.lease_ids = list(lease_ids)
        self._tokens = list(tokens)
        self._on_revoke = on_revoke
        self.leases: dict[str, agent_pb2.Lease] = {}
        self.revoked = threading.Event()
        self.reason = ""
        self._ready: concurrent.futures.Future[None] = concurrent.futures.Future()
        self._start_loop("spillway-lease-watch")
        try:
            self._ready.result(timeout=start_timeout_s)
        except concurrent.futures.TimeoutError as exc:
            self.close()
            raise TimeoutError(
                f"no snapshot of lease(s) {','.join(lease_ids)} from the agent at {agent_socket} within "
                f"{start_timeout_s:g}s: check that the agent runs and that its socket is mounted in the pod"
            ) from exc
        except BaseException:
            self.close()
            raise

    async def _main(self) -> None:
        from spillway.agent.client import AgentClient

        client = AgentClient(self.agent_socket)
        seen: set[str] = set()
        try:
            tasks = [
                asyncio.create_task(self._watch(client, lid, tok, seen))
                for lid, tok in zip(self.lease_ids, self._tokens, strict=True)
            ]
            await self._wait_stop()
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        finally:
            await client.close()

    async def _watch(self, client: Any, lease_id: str, token: str, seen: set[str]) -> None:
        backoff = 0.2
        while not self._stopping.is_set() and not self.revoked.is_set():
            try:
                async for ev in client.watch(lease_id, token):
                    backoff = 0.2
                    if ev.kind == agent_pb2.WatchEvent.SNAPSHOT:
                        lease = next((x for x in ev.leases if x.id == lease_id), None)
                        if lease is None:
                            self._revoke(f"lease {lease_id} is not live")
                        else:
                            self.leases[lease_id] = lease
                            if lease.state in (agent_pb2.REVOKING, *_TERMINAL):
                                self._revoke(f"lease {lease_id} is {_state_name(lease.state)}")
                        seen.add(lease_id)
                        if seen.issuperset(self.lease_ids) and not self._ready.done():
                            self._ready.set_result(None)
                    elif ev.lease.id == lease_id:
                        self.leases[lease_id] = ev.lease
                        if ev.lease.state in (agent_pb2.REVOKING, *_TERMINAL):
                            self._revoke(ev.lease.reason or f"lease {lease_id} is {_state_name(ev.lease.state)}")
                    if self.revoked.is_set():
                        return
            except grpc.aio.AioRpcError as exc:
                if self._stopping.is_set():
                    return
                if exc.code() in _LOST_CODES:
                    if not self._ready.done():
                        self._ready.set_exception(exc)
                        return
                    self._revoke(f"watch refused: {exc.code().name}: {exc.details()}")
                    return
                log.warning("watch stream broke; reconnecting", extra={"lease": lease_id, "code": exc.code().name})
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 5.0)

    def _revoke(self, reason: str) -> None:
        if self.revoked.is_set():
            return
        self.reason = reason
        self.revoked.set()
        log.warning("watched lease revoked", extra={"leases": ",".join(self.lease_ids), "reason": reason})
        if self._on_revoke is not None:
            try:
                self._on_revoke()
            except Exception:  # a callback's bug must not stop the watcher
                log.exception("lease watcher callback failed")

    def close(self) -> None:
        self._stop_loop()

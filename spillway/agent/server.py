"""Runs the agent: inventory backend, pool restored from the store, the gRPC service on two
unix sockets (mode 0660): the admin socket (`--socket`) and the borrower socket
(`--borrower-socket`, the one mounted into borrower pods), and optionally on TCP with mutual
TLS (admin role), an attach socket beside each unix socket, metrics, and signal handling
(SIGTERM/SIGINT stop, SIGHUP re-reads the inventory configuration). See `guard` for the roles."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import signal
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from spillway import __version__
from spillway.agent.attach import AttachServer, attach_socket_path
from spillway.agent.guard import MAX_MESSAGE_BYTES, Role
from spillway.agent.inventory import InventoryBackend, NvmlBackend, SimulatedBackend
from spillway.agent.metrics import AgentMetrics
from spillway.agent.pool import (
    DEFAULT_DRAIN_BYTES_PER_S,
    DEFAULT_GRANULARITY,
    DEFAULT_REVOKE_MS,
    DEFAULT_SETTLE_TIMEOUT_MS,
    DEFAULT_TTL_MS,
    Headroom,
    Pool,
)
from spillway.agent.publisher import run_publisher
from spillway.agent.service import AgentCore, AgentServicer, add_to_server, lease_pb, now_ms
from spillway.agent.store import Store, load_or_create_key
from spillway.contract import DEFAULT_AGENT_SOCKET
from spillway.metrics import HttpEndpoint
from spillway.pki import TlsFiles, read_tls, tls_signature

log = logging.getLogger("spillway.agent")

DEFAULT_SOCKET = DEFAULT_AGENT_SOCKET
BORROWER_DIR = "borrower"  # the borrower socket's default directory, beside the admin socket
# gRPC options of every agent server: small requests only, and no port sharing.
SERVER_OPTIONS = [("grpc.so_reuseport", 0), ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                  ("grpc.max_metadata_size", 16 * 1024)]
MAX_UNIX_PATH = 107  # sockaddr_un.sun_path is 108 bytes with the terminating NUL
DEFAULT_STATE_DIR = "/var/lib/spillway/agent"
REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_TOPOLOGY = REPO_ROOT / "examples" / "topologies" / "dgx-h100.yaml"


@dataclass
class AgentConfig:
    backend: str = "simulated"
    topology: Path = DEFAULT_TOPOLOGY
    node_name: str = field(default_factory=lambda: os.environ.get("NODE_NAME") or socket.gethostname())
    socket: Path = Path(DEFAULT_SOCKET)
    borrower_socket: Path | None = None  # None: <socket's directory>/borrower/<socket's name>
    listen: str = ""
    tls: TlsFiles | None = None
    tls_clients: frozenset[str] = frozenset()  # certificate names admitted over mutual TLS (empty: any the CA signed)
    state_dir: Path | None = Path(DEFAULT_STATE_DIR)
    metrics_port: int | None = None
    metrics_host: str = "127.0.0.1"  # the chart passes the pod IP
    granularity: int = DEFAULT_GRANULARITY
    headroom: Headroom = field(default_factory=Headroom)
    default_ttl_ms: int = DEFAULT_TTL_MS
    revoke_deadline_ms: int = DEFAULT_REVOKE_MS
    drain_bytes_per_s: int = DEFAULT_DRAIN_BYTES_PER_S
    settle_timeout_ms: int = DEFAULT_SETTLE_TIMEOUT_MS
    refresh_s: float = 1.0
    durable: bool = False
    publish: bool = False
    advertise_endpoint: str = ""
    status_refresh_s: float = 10.0  # the MemoryPool status is rewritten at least this often

    @property
    def borrower_path(self) -> Path:
        return self.borrower_socket or default_borrower_socket(self.socket)


def default_borrower_socket(admin_socket: Path) -> Path:
    return admin_socket.parent / BORROWER_DIR / admin_socket.name


def borrower_paths(agent_socket: str, agent_socket_host_dir: str = "", borrower_socket: str = "",
                   borrower_socket_host_dir: str = "") -> tuple[str, str]:
    """The agent's borrower socket as borrower containers see it, and its directory on the host:
    what the device plugin and the DRA driver hand a borrower (never the admin socket). Defaults
    follow the agent's: borrower/ beside the admin socket, and borrower/ in its host directory."""
    borrower = borrower_socket or str(default_borrower_socket(Path(agent_socket)))
    if borrower_socket_host_dir:
        return borrower, borrower_socket_host_dir
    if agent_socket_host_dir and not borrower_socket:
        return borrower, os.path.join(agent_socket_host_dir, BORROWER_DIR)
    return borrower, os.path.dirname(borrower)


class TlsReloader:
    """Serves the TCP port's certificate from files and picks up a new one without a restart
    (cert-manager renewals, a rotated Secret): gRPC asks before each new connection; the files
    are re-read only when one of them changed, and a pair whose key does not match its
    certificate is refused (logged) while the previous one stays in use. Connections already
    open keep the certificate they were made with."""

    def __init__(self, files: TlsFiles) -> None:
        self.files = files
        self.loaded = tls_signature(self.files)
        self.reloads = 0
        self._refused: tuple[tuple[int, int, int], ...] | None = None
        self._initial = self._config(*read_tls(files))

    @staticmethod
    def _config(cert: bytes, key: bytes, ca: bytes) -> grpc.ServerCertificateConfiguration:
        return grpc.ssl_server_certificate_configuration([(key, cert)], root_certificates=ca)

    def credentials(self) -> grpc.ServerCredentials:
        return grpc.dynamic_ssl_server_credentials(self._initial, self.fetch, require_client_authentication=True)

    def fetch(self) -> grpc.ServerCertificateConfiguration | None:
        """gRPC's callback: a new configuration, or None to keep the current one."""
        sig = tls_signature(self.files)
        if sig == self.loaded or sig == self._refused:
            return None
        try:
            config = self._config(*read_tls(self.files))
        except (OSError, ValueError) as exc:
            self._refused = sig
            log.error("TLS files changed but cannot be used; keeping the previous certificate",
                      extra={"error": str(exc)})
            return None
        self.loaded = sig
        self.reloads += 1
        log.info("TLS certificate reloaded", extra={"cert": str(self.files.cert), "reloads": self.reloads})
        return config


def make_backend(cfg: AgentConfig) -> InventoryBackend:
    if cfg.backend == "simulated":
        return SimulatedBackend(cfg.topology, cfg.node_name)
    if cfg.backend == "nvml":
        return NvmlBackend(cfg.node_name)
    raise ValueError(f"backend {cfg.backend!r}: use simulated or nvml")


class Agent:
    """One running agent. `await start()`, then `await stop()`."""

    def __init__(self, cfg: AgentConfig) -> None:
        self.cfg = cfg
        if cfg.borrower_path.resolve() == cfg.socket.resolve() or cfg.borrower_path.parent.resolve() == \
                cfg.socket.parent.resolve():
            raise ValueError(f"--borrower-socket {cfg.borrower_path} must be in another directory than --socket "
                             f"{cfg.socket}: borrower pods get the borrower socket's directory mounted, and must not "
                             "see the admin socket")
        for flag, path in (("--socket", cfg.socket), ("--borrower-socket", cfg.borrower_path)):
            longest = attach_socket_path(path)  # each socket has its attach socket: PATH and PATH.attach
            if len(os.fsencode(str(longest))) > MAX_UNIX_PATH:
                raise ValueError(f"{flag} {path} is too long: its attach socket {longest} has "
                                 f"{len(os.fsencode(str(longest)))} bytes and unix socket paths hold at most "
                                 f"{MAX_UNIX_PATH}; choose a shorter path (the default is {DEFAULT_SOCKET})")
        self.backend = make_backend(cfg)
        facts = self.backend.read()
        self.metrics = AgentMetrics(cfg.node_name, self.backend.name, self.backend.simulated)
        self.store = Store(cfg.state_dir / "leases.db" if cfg.state_dir else None, durable=cfg.durable)
        key = load_or_create_key(cfg.state_dir)
        self.pool = Pool(facts, clock_ms=now_ms, key=key, granularity=cfg.granularity, headroom=cfg.headroom,
                         default_ttl_ms=cfg.default_ttl_ms, default_revoke_ms=cfg.revoke_deadline_ms,
                         drain_bytes_per_s=cfg.drain_bytes_per_s, settle_timeout_ms=cfg.settle_timeout_ms)
        leases, reserved = self.store.load()
        self.pool.restore_reserved(reserved)
        self.pool.restore(leases)
        self.restored = sum(1 for x in leases if x.live)
        self.core = AgentCore(self.backend, self.pool, self.store, self.metrics)
        self.server: grpc.aio.Server | None = None  # admin: --socket, and --listen (mutual TLS)
        self.borrower_server: grpc.aio.Server | None = None  # --borrower-socket
        self.attaches = [AttachServer(attach_socket_path(p), self._on_attach, self._on_detach)
                         for p in (cfg.socket, cfg.borrower_path)]
        self.http: HttpEndpoint | None = None
        self.tcp_port = 0
        self.tls_reloader: TlsReloader | None = None
        self._publisher: asyncio.Task[None] | None = None

    def _on_attach(self, lease_id: str, token: str, pid: int) -> dict[str, Any]:
        lease = self.pool.set_pid(lease_id, token, pid)
        self.core.commit()
        log.info("borrower attached", extra={"lease": lease_id, "pid": pid})
        return {"id": lease.id, "gpu_uuid": lease.gpu_uuid, "bytes": lease.bytes, "state": lease.state.name}

    def _on_detach(self, lease_id: str, pid: int) -> None:
        self.pool.clear_pid(lease_id, pid)
        self.core.commit()
        log.info("borrower detached", extra={"lease": lease_id, "pid": pid})

    def ready(self) -> str:
        return f"inventory unreadable: {self.core.inventory_error}" if self.core.inventory_error else ""

    async def start(self) -> None:
        cfg = self.cfg
        if self.backend.simulated:
            log.warning("SIMULATED GPU backend: inventory comes from a topology file, not from a GPU",
                        extra={"topology": str(cfg.topology), "node": cfg.node_name})
        self.core.start(cfg.refresh_s)
        self.server = grpc.aio.server(options=SERVER_OPTIONS)
        add_to_server(AgentServicer(self.core, Role.ADMIN, tls_clients=cfg.tls_clients), self.server)
        self.borrower_server = grpc.aio.server(options=SERVER_OPTIONS)
        add_to_server(AgentServicer(self.core, Role.BORROWER), self.borrower_server)
        for server, path in ((self.server, cfg.socket), (self.borrower_server, cfg.borrower_path)):
            path.parent.mkdir(parents=True, exist_ok=True)
            path.unlink(missing_ok=True)
            server.add_insecure_port(f"unix:{path}")
        if cfg.listen:
            if cfg.tls is None:
                raise ValueError("--listen needs --tls-cert, --tls-key and --tls-ca (mutual TLS)")
            self.tls_reloader = TlsReloader(cfg.tls)
            self.tcp_port = self.server.add_secure_port(cfg.listen, self.tls_reloader.credentials())
        await self.server.start()
        await self.borrower_server.start()
        cfg.socket.chmod(0o660)
        cfg.borrower_path.chmod(0o660)
        for attach in self.attaches:
            await attach.start()
        if cfg.metrics_port is not None:
            self.http = HttpEndpoint(self.metrics.registry, self.ready)
            await self.http.start(cfg.metrics_port, cfg.metrics_host)
        if cfg.publish:
            target = f"unix:{cfg.socket}"
            self._publisher = asyncio.create_task(
                run_publisher(target, cfg.node_name, cfg.advertise_endpoint or cfg.listen,
                              status_refresh_s=cfg.status_refresh_s), name="publisher")
        # Everything allocated so far (modules, gRPC, the restored pool) lives as long as the
        # process: move it out of the collector's sight, so a full collection scans only
        # what calls allocate since (a full one over the imports took ~15 ms, a tail latency spike).
        gc.collect()
        gc.freeze()
        gpus = self.pool.views()
        log.info("agent started", extra={
            "node": cfg.node_name, "backend": self.backend.name, "simulated": self.backend.simulated,
            "gpus": len(gpus), "socket": str(cfg.socket), "borrower_socket": str(cfg.borrower_path),
            "tcp": f"{cfg.listen} (port {self.tcp_port})" if cfg.listen
            else "", "state_dir": str(cfg.state_dir or ""), "restored_leases": self.restored,
            "metrics_port": self.http.port if self.http else "", "version": __version__})

    def reload(self) -> None:
        try:
            self.backend.reload()
            log.info("SIGHUP: inventory configuration re-read", extra={"backend": self.backend.name})
        except Exception as exc:
            log.error("SIGHUP: reload failed; keeping the previous configuration", extra={"error": str(exc)})
            return
        asyncio.get_running_loop().create_task(self.core.refresh())

    async def stop(self) -> None:
        if self._publisher is not None:
            self._publisher.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._publisher
        for attach in self.attaches:
            await attach.stop()
        for server in (self.server, self.borrower_server):
            if server is not None:
                await server.stop(grace=1.0)
        await self.core.stop()
        if self.http is not None:
            await self.http.stop()
        self.store.close()
        self.backend.close()
        for path in (self.cfg.socket, self.cfg.borrower_path):
            with contextlib.suppress(OSError):
                path.unlink()


async def run_agent(cfg: AgentConfig) -> int:
    agent = Agent(cfg)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    loop.add_signal_handler(signal.SIGHUP, agent.reload)
    await agent.start()
    await stop.wait()
    log.info("agent stopping")
    await agent.stop()
    return 0


__all__ = ["Agent", "AgentConfig", "lease_pb", "run_agent"]

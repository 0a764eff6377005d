"""`spillway agent`, `spillway pool show`, `spillway lease ...` and `spillway gpu ...`."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import grpc

from spillway import output
from spillway.agent.client import AgentClient, largest_grantable
from spillway.api.v1 import agent_pb2 as pb
from spillway.contract import DEFAULT_AGENT_SOCKET, ENV_AGENT_SOCKET, ENV_LEASE_TOKEN
from spillway.metrics import add_address_argument
from spillway.pki import TlsFiles
from spillway.units import (
    DurationError,
    QuantityError,
    format_bytes,
    format_duration,
    parse_duration,
    parse_quantity,
)

T = TypeVar("T")
DEFAULT_SOCKET = os.environ.get(ENV_AGENT_SOCKET, DEFAULT_AGENT_SOCKET)
TOKEN_ENV = ENV_LEASE_TOKEN  # also what the device plugin gives a borrower container


class UsageError(Exception):
    """Bad command-line input: exit 2 with the message."""


def _quantity(text: str) -> int:
    try:
        return parse_quantity(text)
    except QuantityError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def _quantity0(text: str) -> int:
    try:
        return parse_quantity(text, allow_zero=True)
    except QuantityError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def _duration(text: str) -> float:
    try:
        return parse_duration(text)
    except DurationError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def _tls_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tls-cert", type=Path, help="certificate (PEM) for mutual TLS")
    p.add_argument("--tls-key", type=Path, help="its private key (PEM)")
    p.add_argument("--tls-ca", type=Path, help="CA certificate (PEM) that verifies the peer")


def _tls(args: argparse.Namespace) -> TlsFiles | None:
    given = [args.tls_cert, args.tls_key, args.tls_ca]
    if not any(given):
        return None
    if not all(given):
        raise UsageError("mutual TLS needs all three of --tls-cert, --tls-key and --tls-ca")
    return TlsFiles(args.tls_cert, args.tls_key, args.tls_ca)


def _target_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--socket", default=DEFAULT_SOCKET, help=f"agent unix socket (default {DEFAULT_SOCKET}, "
                   "or $SPILLWAY_AGENT_SOCKET)")
    p.add_argument("--target", default="", help="agent HOST:PORT over TCP with mutual TLS (instead of --socket)")
    _tls_args(p)
    p.add_argument("--tls-server-name", default="", metavar="NAME",
                   help="check the agent's certificate against NAME instead of --target's host (an agent "
                        "dialled by IP whose certificate names e.g. spillway-agent)")
    p.add_argument("-o", "--output", choices=output.FORMATS, default="table",
                   help="table (default), wide (more columns), json or yaml (integers as numbers, keys in a "
                        "stable order), or name (kind/name a line)")


def _run(args: argparse.Namespace, fn: Callable[[AgentClient], Awaitable[T]]) -> T:
    tls = _tls(args)
    target = args.target or args.socket
    if args.tls_server_name and not (args.target and tls):
        raise UsageError("--tls-server-name applies to --target HOST:PORT with --tls-cert, --tls-key and --tls-ca")

    async def go() -> T:
        async with AgentClient(target, tls=tls, server_name=args.tls_server_name or None) as client:
            return await fn(client)

    return asyncio.run(go())


def _call(args: argparse.Namespace, fn: Callable[[AgentClient], Awaitable[T]]) -> T:
    try:
        return _run(args, fn)
    except grpc.aio.AioRpcError as exc:
        msg = exc.details() or ""
        if exc.code() == grpc.StatusCode.UNAVAILABLE and "Hostname Verification" in msg:
            name = args.tls_server_name or args.target.rsplit(":", 1)[0]
            msg = (f"the agent at {args.target} answered with a certificate that does not name {name!r}: give "
                   f"--tls-server-name with a name its certificate carries ({msg})")
        elif exc.code() == grpc.StatusCode.UNAVAILABLE:
            msg = f"cannot reach the agent at {args.target or args.socket}: is `spillway agent` running? ({msg})"
        raise RuntimeError(f"{exc.code().name}: {msg}") from None


def _token(args: argparse.Namespace) -> str:
    """The lease token from --token, --token-file or $SPILLWAY_LEASE_TOKEN, in that order."""
    if args.token:
        return str(args.token)
    if args.token_file:
        try:
            token = Path(args.token_file).read_text().strip()
        except OSError as exc:
            raise UsageError(f"--token-file {args.token_file}: {exc.strerror}") from None
        if not token:
            raise UsageError(f"--token-file {args.token_file} is empty: it should hold the token from acquire")
        return token
    token = os.environ.get(TOKEN_ENV, "").strip()
    if token:
        return token
    raise UsageError(f"give the lease's token: --token-file FILE, ${TOKEN_ENV}, or --token TOKEN (visible to "
                     "other users in the process list)")


def _print_leases(leases: Sequence[pb.Lease], wide: bool = False) -> None:
    head = ("ID", "HOLDER", "KIND", "STATE", "GPU", "SIZE", "PRIO", "EXPIRES", "POD")
    rows: list[tuple[str, ...]] = [head + (("CREATED", "PID", "NODE", "REASON") if wide else ())]
    now = _now_ms()
    for x in leases:
        expires = "-" if x.ended_at_ms else format_duration(max(0, x.expires_at_ms - now) / 1000)
        row: tuple[str, ...] = (x.id, x.holder, pb.LeaseKind.Name(x.kind), pb.LeaseState.Name(x.state), x.gpu_uuid,
               format_bytes(x.bytes), str(x.priority), expires, x.pod or "-")
        if wide:
            created = format_duration(max(0, now - x.created_at_ms) / 1000) + " ago" if x.created_at_ms else "-"
            row += (created, str(x.pid or "-"), x.node_name or "-", x.reason or "-")
        rows.append(row)
    output.table(rows)


def _emit_leases(args: argparse.Namespace, leases: Sequence[pb.Lease], empty: str = "") -> None:
    """Leases in the format asked for."""
    if args.output in ("json", "yaml"):
        output.dump([output.message_dict(x) for x in leases], args.output)
    elif args.output == "name":
        output.names("lease", (x.id for x in leases))
    elif leases or not empty:
        _print_leases(leases, wide=args.output == "wide")
    else:
        print(empty)


def _now_ms() -> int:
    import time

    return int(time.time() * 1000)


# --- agent -----------------------------------------------------------------------------


def _cmd_agent(args: argparse.Namespace) -> int:
    from spillway.agent.pool import Headroom
    from spillway.agent.server import AgentConfig, run_agent

    if args.publish and not (args.advertise_endpoint or args.listen):
        raise UsageError("--publish needs --advertise-endpoint HOST:PORT (or --listen) so the operator can reach it")
    cfg = AgentConfig(
        backend=args.backend, topology=args.topology, socket=args.socket, borrower_socket=args.borrower_socket,
        listen=args.listen, tls=_tls(args), tls_clients=frozenset(args.tls_client_name), state_dir=args.state_dir,
        metrics_port=args.metrics_port,        metrics_host=args.metrics_address, granularity=args.granularity,
        headroom=Headroom(args.headroom_min, args.headroom_fraction), default_ttl_ms=round(args.default_ttl * 1000),
        revoke_deadline_ms=round(args.revoke_deadline * 1000), refresh_s=args.refresh, durable=args.fsync,
        publish=args.publish, advertise_endpoint=args.advertise_endpoint, drain_bytes_per_s=args.drain_rate,
        settle_timeout_ms=round(args.settle_timeout * 1000), status_refresh_s=args.status_refresh)
    if args.node_name:
        cfg.node_name = args.node_name
    if args.listen and cfg.tls is None:
        raise UsageError("--listen serves TCP with mutual TLS only: give --tls-cert, --tls-key and --tls-ca")
    if args.tls_client_name and not args.listen:
        raise UsageError("--tls-client-name names who may call over mutual TLS: it needs --listen HOST:PORT")
    if not 0 <= args.headroom_fraction < 1:
        raise UsageError("--headroom-fraction must be in [0, 1), e.g. 0.05")
    return asyncio.run(run_agent(cfg))


# --- pool ------------------------------------------------------------------------------


def _cmd_pool_show(args: argparse.Namespace) -> int:
    async def go(c: AgentClient) -> tuple[pb.Inventory, list[pb.Lease]]:
        return await c.inventory(), await c.leases()

    inv, leases = _call(args, go)
    if args.output in ("json", "yaml"):
        out = output.message_dict(inv)
        out["leases"] = [output.message_dict(x) for x in leases]
        output.dump(out, args.output)
        return 0
    if args.output == "name":
        output.names("gpu", (g.uuid for g in inv.gpus))
        return 0
    wide = args.output == "wide"
    sim = " (SIMULATED GPUs)" if inv.simulated else ""
    print(f"node {inv.node_name}  backend {inv.backend}{sim}  granularity {format_bytes(inv.granularity_bytes)}"
          + (f"  agent {inv.agent_version or '-'}  driver {inv.driver_version or '-'}" if wide else ""))
    head = ("IDX", "GPU", "NAME", "TOTAL", "LOCAL", "RESERVED", "HEADROOM", "LEASED", "LENDABLE")
    rows: list[tuple[str, ...]] = [head + (("USED", "FREE", "UTIL", "PROCS", "NVLINK PEERS") if wide else ())]
    for g in inv.gpus:
        row: tuple[str, ...] = (
            str(g.index), g.uuid, g.name, format_bytes(g.total_bytes), format_bytes(g.local_used_bytes),
            format_bytes(g.local_reserved_bytes), format_bytes(g.headroom_bytes), format_bytes(g.leased_bytes),
            format_bytes(g.lendable_bytes))
        if wide:
            peers = sorted({(lk.gpu_b if lk.gpu_a == g.uuid else lk.gpu_a) for lk in inv.links
                            if lk.nvlink and g.uuid in (lk.gpu_a, lk.gpu_b) and lk.gpu_a != lk.gpu_b})
            index = {x.uuid: str(x.index) for x in inv.gpus}
            row += (format_bytes(g.used_bytes), format_bytes(g.free_bytes), f"{g.utilization_gpu_percent}%",
                    str(len(g.processes)), ",".join(index.get(u, u) for u in peers) or "-")
        rows.append(row)
    output.table(rows)
    print()
    if leases:
        _print_leases(leases, wide=wide)
    else:
        print("no live leases")
    return 0


# --- lease -----------------------------------------------------------------------------


def _cmd_lease_acquire(args: argparse.Namespace) -> int:
    kind = pb.ELASTIC if args.kind == "elastic" else pb.RESERVATION

    async def go(c: AgentClient) -> pb.AcquireResponse:
        try:
            return await c.acquire(args.bytes, args.holder, kind=kind, gpu_uuid=args.gpu or "",
                                   near_gpu_uuid=args.near or "", ttl_s=args.ttl or 0.0, priority=args.priority,
                                   idempotency_key=args.idempotency_key, pod=args.pod)
        except grpc.aio.AioRpcError as exc:
            largest = largest_grantable(exc)
            if largest is not None:
                print(f"largest grantable now: {format_bytes(largest)}", file=sys.stderr)
            raise

    resp = _call(args, go)
    if args.output in ("json", "yaml"):
        output.dump({"lease": output.message_dict(resp.lease), "token": resp.token}, args.output)
    elif args.output == "name":
        output.names("lease", [resp.lease.id])
    else:
        x = resp.lease
        print(f"lease {x.id}  {format_bytes(x.bytes)} on GPU {x.gpu_uuid}  {pb.LeaseKind.Name(x.kind)} "
              f"{pb.LeaseState.Name(x.state)}  expires in {format_duration(x.ttl_ms / 1000)}")
        print(f"token {resp.token}")
        print("(the token is shown only now: keep it; every later call about this lease needs it)")
    return 0


def _cmd_lease_renew(args: argparse.Namespace) -> int:
    token = _token(args)
    x = _call(args, lambda c: c.renew(args.id, token, args.ttl or 0.0))
    _print_one(args, x)
    return 0


def _cmd_lease_release(args: argparse.Namespace) -> int:
    token = _token(args)
    x = _call(args, lambda c: c.release(args.id, token))
    _print_one(args, x)
    return 0


def _cmd_lease_claim(args: argparse.Namespace) -> int:
    token = _token(args)
    x = _call(args, lambda c: c.claim(args.id, token, args.holder, args.pod))
    _print_one(args, x)
    return 0


def _cmd_lease_list(args: argparse.Namespace) -> int:
    leases = _call(args, lambda c: c.leases(args.holder, args.all, args.gpu))
    _emit_leases(args, leases, empty="no leases")
    return 0


def _print_one(args: argparse.Namespace, x: pb.Lease) -> None:
    if args.output in ("json", "yaml"):
        output.dump(output.message_dict(x), args.output)
    else:
        _emit_leases(args, [x])


# --- gpu (admin) -----------------------------------------------------------------------


def _cmd_gpu_set_local(args: argparse.Namespace) -> int:
    if args.reserved is None and args.simulated_used is None:
        raise UsageError("give --reserved and/or --simulated-used")
    g = _call(args, lambda c: c.set_gpu_local(args.gpu, args.reserved, args.simulated_used))
    if args.output in ("json", "yaml"):
        output.dump(output.message_dict(g), args.output)
    elif args.output == "name":
        output.names("gpu", [g.uuid])
    else:
        print(f"GPU {g.index} {g.uuid}: local used {format_bytes(g.local_used_bytes)}, reserved "
              f"{format_bytes(g.local_reserved_bytes)}, leased {format_bytes(g.leased_bytes)}, lendable "
              f"{format_bytes(g.lendable_bytes)}")
    return 0


def _cmd_gpu_reclaim(args: argparse.Namespace) -> int:
    r = _call(args, lambda c: c.reclaim(args.gpu, args.bytes, args.reason, args.deadline or 0.0))
    if args.output in ("json", "yaml"):
        output.dump(output.message_dict(r), args.output)
    elif args.output == "name":
        output.names("lease", (x.id for x in r.revoking))
    else:
        print(f"requested {format_bytes(r.requested_bytes)}, revoking {format_bytes(r.revoking_bytes)} in "
              f"{len(r.revoking)} lease(s)")
        if r.revoking:
            _print_leases(list(r.revoking), wide=args.output == "wide")
    return 0


def _wrap(fn: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        try:
            return fn(args)
        except UsageError as exc:
            print(f"spillway: error: {exc}", file=sys.stderr)
            return 2

    return run


def add_commands(sub: Any) -> None:
    size_help = "a Kubernetes quantity: 4Gi, 512Mi, 80G or a byte count"

    a = sub.add_parser("agent", help="run the node agent (lease pool of lendable GPU memory)")
    a.add_argument("--backend", choices=("simulated", "nvml"), default="nvml",
                   help="nvml: a real NVIDIA GPU; simulated: GPUs from --topology (default nvml)")
    a.add_argument("--topology", type=Path, default=Path(__file__).resolve().parents[2] / "examples" / "topologies"
                   / "dgx-h100.yaml", help="topology YAML of the simulated backend")
    a.add_argument("--node-name", default="", help="node name (default $NODE_NAME or the host name)")
    a.add_argument("--socket", type=Path, default=Path(DEFAULT_AGENT_SOCKET),
                   help="admin unix socket to serve on (every call; for the device plugin and the node's operators)")
    a.add_argument("--borrower-socket", type=Path, default=None,
                   help="borrower unix socket, the one mounted into borrower pods (leases by token only; no "
                        "ListLeases, Reclaim, SetGpuLocal or all-events Watch); default: borrower/ beside --socket")
    a.add_argument("--listen", default="", help="also serve HOST:PORT over TCP with mutual TLS")
    _tls_args(a)
    a.add_argument("--tls-client-name", action="append", default=[], metavar="NAME",
                   help="admit over mutual TLS only certificates with this common or alternative name "
                        "(repeatable; default: every certificate --tls-ca signed; the chart admits its operator's)")
    a.add_argument("--state-dir", type=Path, default=Path("/var/lib/spillway/agent"),
                   help="lease table (SQLite) and token key")
    a.add_argument("--metrics-port", type=int, default=None, help="serve /metrics, /healthz, /readyz on this port")
    add_address_argument(a)
    a.add_argument("--granularity", type=_quantity, default=64 << 20, help="lease size granularity (default 64Mi)")
    a.add_argument("--headroom-min", type=_quantity0, default=2 << 30, help="never lend this much (default 2Gi)")
    a.add_argument("--headroom-fraction", type=float, default=0.05, help="...or this share of total if larger")
    a.add_argument("--default-ttl", type=_duration, default=60.0, help="lease TTL when none is asked (default 60s)")
    a.add_argument("--revoke-deadline", type=_duration, default=5.0, help="grace period of a reclaim (default 5s)")
    a.add_argument("--drain-rate", type=_quantity0, default=5 << 30,
                   help="bytes per second a borrower is assumed to move a revoked lease to host memory at: a lease's "
                        "revoke deadline is at least its size over this rate (default 5Gi; 0: --revoke-deadline only)")
    a.add_argument("--settle-timeout", type=_duration, default=15.0,
                   help="how long an ended lease's bytes wait for NVML to show its borrower process let go of them "
                        "before the borrower is reported and its memory counted as the GPU's own (default 15s)")
    a.add_argument("--refresh", type=_duration, default=1.0, help="inventory refresh period (default 1s)")
    a.add_argument("--fsync", action="store_true", help="fsync every change (survives power loss; slower)")
    a.add_argument("--publish", action="store_true", help="publish this node's MemoryPool object")
    a.add_argument("--advertise-endpoint", default="", help="HOST:PORT the operator uses to reach this agent")
    a.add_argument("--status-refresh", type=_duration, default=10.0,
                   help="rewrite the MemoryPool status at least this often when nothing changed (default 10s); "
                        "keep it below the operator's --pool-stale-after. The heartbeat proper is a Lease renewed "
                        "every 10s")
    a.set_defaults(func=_wrap(_cmd_agent))

    p = sub.add_parser("pool", help="show the node's pool of lendable GPU memory")
    psub = p.add_subparsers(dest="pool_command", metavar="SUBCOMMAND", required=True)
    show = psub.add_parser("show", help="GPUs with total, local, leased and lendable memory; live leases")
    _target_args(show)
    show.set_defaults(func=_wrap(_cmd_pool_show))

    lease = sub.add_parser("lease", help="acquire, renew, release, claim or list leases")
    lsub = lease.add_subparsers(dest="lease_command", metavar="SUBCOMMAND", required=True)
    acq = lsub.add_parser("acquire", help="lease GPU memory (prints the lease id and its token)")
    acq.add_argument("--bytes", required=True, type=_quantity, help=size_help)
    acq.add_argument("--holder", required=True, help="who holds the lease (tenant, pod, ...)")
    acq.add_argument("--gpu", help="lend from this GPU (UUID)")
    acq.add_argument("--near", help="lend from the best GPU near this borrower GPU (UUID): NVLink first")
    acq.add_argument("--ttl", type=_duration, help="lease TTL, e.g. 60s (default: the agent's)")
    acq.add_argument("--kind", choices=("reservation", "elastic"), default="reservation",
                     help="reservation (kept until released or expired) or elastic (reclaimed first when the "
                          "lender GPU needs its memory back); default reservation")
    acq.add_argument("--priority", type=int, default=0,
                     help="reclaim order among leases of one kind: lower goes first (default 0)")
    acq.add_argument("--idempotency-key", default="",
                     help="a retry with the same key returns the same lease instead of a second one")
    acq.add_argument("--pod", default="", help="namespace/name of the pod using it")
    _target_args(acq)
    acq.set_defaults(func=_wrap(_cmd_lease_acquire))
    for name, fn, helptext in (("renew", _cmd_lease_renew, "extend a lease's expiry"),
                               ("release", _cmd_lease_release, "give a lease's memory back"),
                               ("claim", _cmd_lease_claim, "bind a reservation to its holder: RESERVED -> ACTIVE")):
        c = lsub.add_parser(name, help=helptext)
        c.add_argument("id", help="lease id")
        tok = c.add_mutually_exclusive_group()
        tok.add_argument("--token", default="", help=f"the lease's token (from acquire); visible in the process "
                         f"list, so prefer --token-file or ${TOKEN_ENV}")
        tok.add_argument("--token-file", type=Path, metavar="FILE",
                         help=f"read the token from FILE (default: ${TOKEN_ENV}, which the device plugin sets in "
                              "borrower containers)")
        if name == "renew":
            c.add_argument("--ttl", type=_duration, help="new TTL (default: the lease's own)")
        if name == "claim":
            c.add_argument("--holder", default="", help="who holds the lease now (default: unchanged)")
            c.add_argument("--pod", default="", help="namespace/name of the pod using it")
        _target_args(c)
        c.set_defaults(func=_wrap(fn))
    ls = lsub.add_parser("list", help="leases on the node")
    ls.add_argument("--holder", default="", help="only this holder's leases")
    ls.add_argument("--gpu", default="", help="only leases lent from this GPU (UUID)")
    ls.add_argument("--all", action="store_true", help="include ended leases still remembered")
    _target_args(ls)
    ls.set_defaults(func=_wrap(_cmd_lease_list))

    gpu = sub.add_parser("gpu", help="admin: a GPU's local reservation, simulated local use, reclaim")
    gsub = gpu.add_subparsers(dest="gpu_command", metavar="SUBCOMMAND", required=True)
    sl = gsub.add_parser("set-local", help="set a GPU's local reservation and (simulated backend) local use")
    sl.add_argument("gpu", help="GPU UUID")
    sl.add_argument("--reserved", type=_quantity0, help="memory its own tenant keeps (quantity)")
    sl.add_argument("--simulated-used", type=_quantity0, help="simulated backend only: its own tenant's use")
    _target_args(sl)
    sl.set_defaults(func=_wrap(_cmd_gpu_set_local))
    rc = gsub.add_parser("reclaim", help="ask for memory back on a GPU: victims go REVOKING")
    rc.add_argument("gpu", help="GPU UUID")
    rc.add_argument("--bytes", required=True, type=_quantity, help=size_help)
    rc.add_argument("--reason", default="", help="why, shown to the holders and in their leases' reason")
    rc.add_argument("--deadline", type=_duration, help="grace period (default: the agent's, 5s)")
    _target_args(rc)
    rc.set_defaults(func=_wrap(_cmd_gpu_reclaim))

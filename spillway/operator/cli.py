"""`spillway operator`: the kopf operator, run in-process, with metrics and readiness on our
HttpEndpoint and kopf's liveness probe on the health port."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import secrets
import signal
from typing import Any

from spillway.contract import ALLOCATION_AUTO, ALLOCATION_MODES
from spillway.metrics import HttpEndpoint, add_address_argument
from spillway.units import DurationError, QuantityError, parse_duration, parse_quantity

log = logging.getLogger(__name__)


def add_commands(sub: Any) -> None:
    p = sub.add_parser("operator", help="run the InferenceTenant operator (kopf)",
                       description="Reconcile InferenceTenants: place replicas, reserve peer memory at the node "
                                   "agents, create pods, follow SLOs.")
    p.add_argument("--kubeconfig", default=None, help="kubeconfig file (default: $KUBECONFIG, then in-cluster)")
    p.add_argument("--namespace", action="append", default=[], metavar="NS",
                   help="watch only this namespace (repeatable; default: all namespaces)")
    p.add_argument("--metrics-port", type=int, default=8080, help="/metrics and /readyz (0: a free port)")
    add_address_argument(p)
    p.add_argument("--health-port", type=int, default=8081, help="kopf liveness probe /healthz (-1: off)")
    p.add_argument("--allocation", choices=ALLOCATION_MODES, default=ALLOCATION_AUTO,
                   help="how a replica gets its peer memory: dra (a ResourceClaim per replica, allocated by "
                        "kube-scheduler; docs/dra.md), deviceplugin (RESERVATION leases at the agents and "
                        "spillway.dev/peer-hbm units), or auto (the default: dra when the API server serves "
                        "resource.k8s.io/v1 and the DeviceClass peer-hbm.spillway.dev exists, decided at start-up)")
    p.add_argument("--prometheus-url", default="", help="Prometheus for SLO feedback (e.g. http://prometheus:9090)")
    p.add_argument("--slo-selector", default=None,
                   help="PromQL label matchers of a tenant's series, with {namespace} and {tenant} "
                        "(default: namespace=\"{namespace}\",pod=~\"{tenant}-[0-9]+\")")
    p.add_argument("--slo-step", default="1Gi", help="peer memory added or removed per SLO window (default 1Gi)")
    p.add_argument("--tls-cert", default=None, help="client certificate for the agents' mutual TLS")
    p.add_argument("--tls-key", default=None, help="client key for the agents' mutual TLS")
    p.add_argument("--tls-ca", default=None, help="CA that signed the agents' server certificates")
    p.add_argument("--agent-server-name", default="", metavar="NAME",
                   help="check each agent's certificate against NAME instead of the host in its MemoryPool "
                        "endpoint (agents advertise POD_IP:PORT; the chart's certificates name "
                        "tls.agentServerName). Default: the dialled host")
    p.add_argument("--lease-ttl", default="2m", help="TTL of reservations; renewed every resync (default 2m)")
    p.add_argument("--resync-interval", default="30s", help="per-tenant resync: renew, re-check, SLO (default 30s)")
    p.add_argument("--pool-stale-after", default="60s",
                   help="a node whose MemoryPool heartbeat is older is lost: its replicas are re-placed (default 60s)")
    p.add_argument("--peering", default=None, help="kopf peering name (several operators, one active)")
    p.add_argument("--standalone", action="store_true", help="no peering (the default unless --peering is set)")
    p.add_argument("--priority", type=int, default=None,
                   help="kopf peering priority: the highest-priority operator runs, the others stand by. kopf pauses "
                        "every peer when two share a priority, so the default is drawn at random at start-up "
                        "(1..1000000) and replicas of one Deployment differ")
    p.add_argument("--peering-lifetime", default="15s",
                   help="how long an operator's peering record counts as alive without a refresh: a standby takes "
                        "over this long after the active one dies (refreshed every lifetime minus 5-10 s; at "
                        "least 15s; kopf's own default is 60s)")
    p.set_defaults(func=run)


def _config(args: argparse.Namespace) -> dict[str, Any]:
    tls = [args.tls_cert, args.tls_key, args.tls_ca]
    if any(tls) and not all(tls):
        raise SystemExit("spillway operator: give all of --tls-cert, --tls-key and --tls-ca, or none")
    if args.agent_server_name and not all(tls):
        raise SystemExit("spillway operator: --agent-server-name checks the agents' TLS certificates: give "
                         "--tls-cert, --tls-key and --tls-ca too")
    for path in filter(None, tls):
        if not os.path.isfile(path):
            raise SystemExit(f"spillway operator: {path} does not exist")
    try:
        ttl = parse_duration(args.lease_ttl)
        resync = parse_duration(args.resync_interval)
        step = parse_quantity(args.slo_step)
        stale = parse_duration(args.pool_stale_after)
        lifetime = parse_duration(args.peering_lifetime)
    except (DurationError, QuantityError) as exc:
        raise SystemExit(f"spillway operator: {exc}") from exc
    if resync >= ttl:
        raise SystemExit(f"spillway operator: --resync-interval ({args.resync_interval}) must be shorter than "
                         f"--lease-ttl ({args.lease_ttl}), or reservations expire between renewals")
    if lifetime < 15:
        raise SystemExit(f"spillway operator: --peering-lifetime {args.peering_lifetime} is too short: kopf refreshes "
                         "the record 5-10 s before it runs out, so give at least 15s")
    return {"ttl": ttl, "resync": resync, "step": step, "stale": stale, "lifetime": round(lifetime)}


def _drop_kopf_extras(record: logging.LogRecord) -> bool:
    """kopf attaches its whole settings object and the object reference to every log record; the
    structured log line keeps only the object's namespace/name."""
    record.__dict__.pop("settings", None)
    ref = record.__dict__.pop("k8s_ref", None)
    record.__dict__.pop("k8s_skip", None)
    if isinstance(ref, dict) and ref.get("name"):
        record.__dict__["object"] = f"{ref.get('namespace', '')}/{ref['name']}".lstrip("/")
    return True


def run(args: argparse.Namespace) -> int:
    cfg = _config(args)
    if args.kubeconfig:
        os.environ["KUBECONFIG"] = os.path.abspath(args.kubeconfig)
    return asyncio.run(_main(args, cfg))


async def _main(args: argparse.Namespace, cfg: dict[str, Any]) -> int:
    import kopf

    from spillway.operator import handlers
    from spillway.operator.agents import AgentPool, Agents, Tls
    from spillway.operator.apiserver import ApiServer
    from spillway.operator.claims import choose_allocation
    from spillway.operator.engine import Engine, EngineConfig
    from spillway.operator.metrics import OperatorMetrics
    from spillway.operator.slo import DEFAULT_SELECTOR

    for handler in logging.getLogger().handlers:
        handler.addFilter(_drop_kopf_extras)
    if logging.getLogger().level > logging.DEBUG:
        # kopf logs every handler run at info; our own log lines and events tell the story.
        logging.getLogger("kopf").setLevel(logging.WARNING)
    tls = Tls(args.tls_cert, args.tls_key, args.tls_ca, args.agent_server_name) if args.tls_cert else None
    metrics = OperatorMetrics()
    kube = await ApiServer.connect(args.kubeconfig)
    allocation, why = await choose_allocation(kube, args.allocation)
    log.info(f"allocation {allocation}: {why}", extra={"allocation": allocation})
    metrics.allocation.labels(mode=allocation).set(1)
    engine = Engine(
        kube=kube,
        agents=Agents(AgentPool(tls), ttl_s=cfg["ttl"]),
        metrics=metrics,
        config=EngineConfig(
            namespaces=tuple(args.namespace), lease_ttl_s=cfg["ttl"], prometheus_url=args.prometheus_url,
            slo_selector=args.slo_selector or DEFAULT_SELECTOR, slo_step_bytes=cfg["step"], pool_stale_s=cfg["stale"],
            allocation=allocation,
        ),
        event=handlers.post_event,
    )
    registry = kopf.OperatorRegistry()
    handlers.register(registry, engine, resync_s=cfg["resync"], peering_lifetime_s=cfg["lifetime"])
    endpoint = HttpEndpoint(metrics.registry, ready=engine.ready)
    port = await endpoint.start(args.metrics_port, args.metrics_address)
    log.info("operator metrics", extra={"port": port})
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    liveness = f"http://0.0.0.0:{args.health_port}/healthz" if args.health_port >= 0 else None
    standalone = args.standalone or not args.peering
    try:
        await kopf.operator(
            registry=registry,
            standalone=standalone,
            peering_name=args.peering,
            priority=args.priority if args.priority is not None else 1 + secrets.randbelow(1_000_000),
            clusterwide=not args.namespace,
            namespaces=list(args.namespace),
            liveness_endpoint=liveness,
            stop_flag=stop,
        )
    finally:
        await endpoint.stop()
    return 0

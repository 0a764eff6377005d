"""`spillway deviceplugin`: the kubelet device plugin for spillway.dev/peer-hbm."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
from pathlib import Path
from typing import Any

from spillway.contract import DEFAULT_AGENT_SOCKET
from spillway.metrics import add_address_argument
from spillway.units import QuantityError, parse_quantity

DEFAULT_KUBELET_DIR = "/var/lib/kubelet/device-plugins"
DEFAULT_POD_RESOURCES = "/var/lib/kubelet/pod-resources/kubelet.sock"
DEFAULT_STATE_DIR = "/var/lib/spillway/deviceplugin"


def add_socket_args(p: argparse.ArgumentParser) -> None:
    """The agent's two sockets, as a node component that hands out leases sees them (the device
    plugin and the DRA driver): the admin one for its own calls, the borrower one for pods."""
    p.add_argument("--agent-socket", default=DEFAULT_AGENT_SOCKET,
                   help=f"the agent's admin unix socket, for this component's own calls ({DEFAULT_AGENT_SOCKET})")
    p.add_argument("--agent-socket-host-dir", default="",
                   help="the admin socket's directory on the host; the borrower socket's directory on the host is "
                        "its borrower/ subdirectory unless --borrower-socket-host-dir says otherwise")
    p.add_argument("--borrower-socket", default="",
                   help="the agent's borrower socket as borrower containers see it; its directory is mounted into "
                        "them (default: borrower/ beside --agent-socket, the agent's default)")
    p.add_argument("--borrower-socket-host-dir", default="",
                   help="the borrower socket's directory on the host (default: see --agent-socket-host-dir)")


def check_socket_args(args: argparse.Namespace, prog: str) -> None:
    if not os.path.isabs(args.agent_socket):
        raise SystemExit(f"{prog}: --agent-socket {args.agent_socket!r} must be an absolute path "
                         "(the borrower socket is found beside it)")
    if args.borrower_socket and not os.path.isabs(args.borrower_socket):
        raise SystemExit(f"{prog}: --borrower-socket {args.borrower_socket!r} must be an absolute path "
                         "(it is also the path borrower containers see)")


def add_commands(sub: Any) -> None:
    p = sub.add_parser("deviceplugin", help="kubelet device plugin: advertise spillway.dev/peer-hbm, claim at Allocate",
                       description="Advertise the node's lendable GPU memory to the kubelet as spillway.dev/peer-hbm "
                                   "units and hand out leases at Allocate (see docs/deviceplugin.md).")
    add_socket_args(p)
    p.add_argument("--node-name", default=os.environ.get("NODE_NAME", ""),
                   help="this node's name (default: $NODE_NAME)")
    p.add_argument("--kubelet-dir", default=DEFAULT_KUBELET_DIR,
                   help=f"device-plugins directory ({DEFAULT_KUBELET_DIR})")
    p.add_argument("--pod-resources-socket", default=DEFAULT_POD_RESOURCES,
                   help=f"kubelet PodResources socket ({DEFAULT_POD_RESOURCES})")
    p.add_argument("--unit", default="1Gi", help="bytes per spillway.dev/peer-hbm unit (1Gi)")
    p.add_argument("--device-list-strategy", choices=("device-specs", "cdi"), default="device-specs",
                   help="how the lender GPU reaches the container: device node specs or CDI names")
    p.add_argument("--state-dir", default=DEFAULT_STATE_DIR,
                   help=f"where the plugin keeps the leases it handed out, with tokens ({DEFAULT_STATE_DIR})")
    p.add_argument("--kubeconfig", default=None, help="kubeconfig (default: in-cluster, then $KUBECONFIG)")
    p.add_argument("--no-kubernetes", action="store_true",
                   help="do not read pods: every Allocate leases on the spot (reservations are not claimed)")
    p.add_argument("--metrics-port", type=int, default=9402, help="/metrics, /healthz, /readyz port (9402; -1: off)")
    add_address_argument(p)
    p.add_argument("--sync-interval", default="5s", help="how often PodResources is read (5s)")
    p.add_argument("--release-grace", default="30s",
                   help="age before a lease whose pod is not listed is released (30s)")
    p.set_defaults(func=run)


def build_config(args: argparse.Namespace) -> Any:
    from spillway.deviceplugin.plugin import Config
    from spillway.units import DurationError, parse_duration

    if not args.node_name:
        raise SystemExit("spillway deviceplugin: --node-name (or $NODE_NAME) is required")
    try:
        unit = parse_quantity(args.unit)
    except QuantityError as exc:
        raise SystemExit(f"spillway deviceplugin: --unit: {exc}") from exc
    try:
        sync = parse_duration(args.sync_interval)
        grace = parse_duration(args.release_grace, allow_zero=True)
    except DurationError as exc:
        raise SystemExit(f"spillway deviceplugin: {exc}") from exc
    check_socket_args(args, "spillway deviceplugin")
    return Config(
        node=args.node_name,
        agent_socket=args.agent_socket,
        agent_socket_host_dir=args.agent_socket_host_dir,
        borrower_socket=args.borrower_socket,
        borrower_socket_host_dir=args.borrower_socket_host_dir,
        kubelet_dir=Path(args.kubelet_dir),
        pod_resources_socket=Path(args.pod_resources_socket),
        unit_bytes=unit,
        cdi=args.device_list_strategy == "cdi",
        state_dir=Path(args.state_dir) if args.state_dir else None,
        kubeconfig=args.kubeconfig,
        use_kubernetes=not args.no_kubernetes,
        metrics_port=None if args.metrics_port < 0 else args.metrics_port,
        metrics_host=args.metrics_address,
        sync_interval_s=sync,
        release_grace_s=grace,
    )


def run(args: argparse.Namespace) -> int:
    from spillway.deviceplugin.plugin import DevicePlugin

    config = build_config(args)
    plugin = DevicePlugin(config)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(plugin.run())
    return 0

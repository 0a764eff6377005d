"""`spillway dra`: the DRA driver peer-hbm.spillway.dev (ResourceSlices and the kubelet plugin)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
from pathlib import Path
from typing import Any

from spillway.deviceplugin.cli import add_socket_args, check_socket_args
from spillway.metrics import add_address_argument

DEFAULT_STATE_DIR = "/var/lib/spillway/dra"


def add_commands(sub: Any) -> None:
    p = sub.add_parser("dra", help="DRA driver peer-hbm.spillway.dev: ResourceSlices with consumable memory, "
                                   "claims prepared as leases",
                       description="Publish each lending GPU of this node as a device with consumable `memory` "
                                   "capacity in a ResourceSlice and prepare the ResourceClaims that the scheduler "
                                   "allocates on it as leases at the agent (see docs/dra.md).")
    add_socket_args(p)
    p.add_argument("--node-name", default=os.environ.get("NODE_NAME", ""), help="this node's name ($NODE_NAME)")
    p.add_argument("--registry-dir", default="/var/lib/kubelet/plugins_registry",
                   help="the kubelet's plugin registration directory")
    p.add_argument("--plugins-dir", default="/var/lib/kubelet/plugins",
                   help="where the DRA socket goes (<dir>/peer-hbm.spillway.dev/dra.sock)")
    p.add_argument("--cdi-dir", default="/var/run/cdi", help="where CDI spec files are written (/var/run/cdi)")
    p.add_argument("--state-dir", default=DEFAULT_STATE_DIR,
                   help=f"where the driver keeps the leases of prepared claims, with tokens ({DEFAULT_STATE_DIR})")
    p.add_argument("--kubeconfig", default=None, help="kubeconfig (default: in-cluster, then $KUBECONFIG)")
    p.add_argument("--publish-only", action="store_true",
                   help="only publish ResourceSlices (no kubelet plugin): for nodes without a kubelet, tests")
    p.add_argument("--metrics-port", type=int, default=9403, help="/metrics, /healthz, /readyz port (9403; -1: off)")
    add_address_argument(p)
    p.set_defaults(func=run)


def build_config(args: argparse.Namespace) -> Any:
    from spillway.dra.plugin import Config

    if not args.node_name:
        raise SystemExit("spillway dra: --node-name (or $NODE_NAME) is required")
    check_socket_args(args, "spillway dra")
    return Config(
        node=args.node_name,
        agent_socket=args.agent_socket,
        agent_socket_host_dir=args.agent_socket_host_dir,
        borrower_socket=args.borrower_socket,
        borrower_socket_host_dir=args.borrower_socket_host_dir,
        registry_dir=Path(args.registry_dir),
        plugins_dir=Path(args.plugins_dir),
        cdi_dir=Path(args.cdi_dir),
        state_dir=Path(args.state_dir) if args.state_dir else None,
        kubeconfig=args.kubeconfig,
        kubelet_plugin=not args.publish_only,
        metrics_port=None if args.metrics_port < 0 else args.metrics_port,
        metrics_host=args.metrics_address,
    )


def run(args: argparse.Namespace) -> int:
    from spillway.dra.plugin import DraDriver

    driver = DraDriver(build_config(args))
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(driver.run())
    return 0

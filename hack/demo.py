#!/usr/bin/env python3
"""`make demo`: the whole Spillway system on this machine, with simulated GPUs.

The local Kubernetes control plane (etcd, kube-apiserver, controller manager, scheduler, kwok),
the CRDs, two kwok nodes standing for DGX H100s (8 x H100 80GB each, SIMULATED: no GPU is used),
one Spillway agent per node (simulated backend, gRPC over TCP with mutual TLS, publishing its
MemoryPool), the operator, and the example tenants (`kubectl apply -f examples/tenants/`).

By default everything keeps running until Ctrl-C; `--once` tears it down after printing.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from spillway.testing.cluster import wait_until  # noqa: E402
from spillway.testing.sandbox import Sandbox  # noqa: E402

NODES = ("dgx-h100-0", "dgx-h100-1")
SETTLED = ("Running", "Degraded")


def say(text: str) -> None:
    print(f"\n==> {text}", flush=True)


def show(sb: Sandbox, *args: str) -> str:
    assert sb.cluster is not None
    out = sb.cluster.kubectl(*args).stdout
    print(f"$ kubectl {' '.join(args)}\n{out}", flush=True)
    return str(out)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--once", action="store_true", help="tear everything down after printing the tables")
    parser.add_argument("--timeout", type=float, default=240.0, help="seconds to wait for the tenants to be placed")
    args = parser.parse_args(argv)

    state = Path(os.environ.get("SPILLWAY_DEMO_DIR", Path.home() / ".cache" / "spillway" / "demo"))
    if state.exists():
        import shutil

        shutil.rmtree(state, ignore_errors=True)
    sb = Sandbox(workdir=state)
    sb._own_cluster = True
    stop = False

    def on_signal(signum: int, _frame: object) -> None:
        nonlocal stop
        stop = True

    try:
        say("starting the local control plane (etcd, kube-apiserver, controller manager, scheduler, kwok)")
        sb.start()
        assert sb.cluster is not None
        say(f"adding {len(NODES)} kwok GPU nodes (SIMULATED DGX H100: 8 x H100 80GB each) and one Spillway agent "
            "per node (simulated GPU backend, gRPC over TCP + mutual TLS, publishing its MemoryPool)")
        sb.add_gpu_nodes(list(NODES))
        say("starting the operator (python -m spillway operator)")
        sb.start_operator(["--resync-interval", "10s", "--lease-ttl", "2m"])
        say("kubectl apply -f examples/tenants/")
        print(sb.cluster.kubectl("apply", "-f", str(REPO / "examples" / "tenants")).stdout, flush=True)

        def placed() -> bool:
            items = sb.cluster.get_json("inferencetenants", "-A")["items"]  # type: ignore[union-attr]
            return bool(items) and all((t.get("status") or {}).get("phase") in SETTLED for t in items)

        say("waiting until every tenant is placed")
        t0 = time.monotonic()
        try:
            wait_until(placed, timeout=args.timeout, what="the tenants to be placed")
        except TimeoutError as exc:
            print(f"warning: {exc}; showing where things are", flush=True)
        else:
            print(f"placed in {time.monotonic() - t0:.1f} s", flush=True)

        say("the tenants, their pods and the node pools (GPUs are SIMULATED)")
        show(sb, "get", "inferencetenants", "-A")
        show(sb, "get", "pods", "-A", "-l", "spillway.dev/tenant", "-o", "wide")
        show(sb, "get", "memorypools")
        node = NODES[0]
        a, tls = sb.agents[node], sb.client_tls
        cmd = [sys.executable, "-m", "spillway", "pool", "show", "--target", a.endpoint,
               "--tls-cert", str(tls.cert), "--tls-key", str(tls.key), "--tls-ca", str(tls.ca)]
        print(f"$ spillway pool show --target {a.endpoint} ...   # node {node} (simulated GPUs)", flush=True)
        env = dict(os.environ, PYTHONPATH=str(REPO))
        res = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=str(REPO), check=False)
        print(res.stdout + res.stderr, flush=True)
        events = sb.cluster.kubectl("get", "events", "-n", "default", "--field-selector",
                                    "involvedObject.kind=InferenceTenant", "-o", "json").stdout
        reasons: dict[str, int] = {}
        for e in json.loads(events)["items"]:
            reasons[e["reason"]] = reasons.get(e["reason"], 0) + int(e.get("count") or 1)
        print("operator events by reason: " + ", ".join(f"{k}={v}" for k, v in sorted(reasons.items())), flush=True)
        print("\nAll GPUs above are SIMULATED (the agents' simulated backend, examples/topologies/dgx-h100.yaml); "
              "the CUDA data path is not exercised by the demo.", flush=True)
        if args.once:
            return 0
        say("the system keeps running; in another terminal:")
        print(f"  export KUBECONFIG={sb.kubeconfig}\n"
              "  kubectl get it -A; kubectl describe it llama-70b-chat; kubectl get memorypools\n"
              f"  logs: {sb.workdir} (operator.log, agents/*/agent.log, cluster/logs)\n"
              "Press Ctrl-C to stop everything.", flush=True)
        signal.signal(signal.SIGINT, on_signal)
        signal.signal(signal.SIGTERM, on_signal)
        while not stop:
            time.sleep(0.5)
        return 0
    finally:
        say("stopping the operator, the agents and the control plane")
        sb.stop()


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))

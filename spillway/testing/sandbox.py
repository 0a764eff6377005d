"""A whole local Spillway for the demo, the operator's tests and the scale benchmark.

The local control plane (`spillway.testing.cluster.Cluster`), the CRDs, kwok GPU nodes that stand
for DGX H100s, one agent per node (simulated GPUs, TCP with mutual TLS, `--publish` keeping the
node's MemoryPool current), and the operator (`python -m spillway operator`) as a subprocess so
it can be killed outright. `start_dra` adds the DRA driver: the chart's DeviceClass and one
`spillway dra --publish-only` per node (kwok nodes run no kubelet). The GPUs are simulated;
nothing here pretends otherwise.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from spillway.testing.agentproc import free_port
from spillway.testing.cluster import wait_until

REPO_ROOT = Path(__file__).resolve().parents[2]
CRDS = REPO_ROOT / "crds"
DGX_H100 = REPO_ROOT / "examples" / "topologies" / "dgx-h100.yaml"
H100_LABELS = {
    "nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3",
    "nvidia.com/gpu.count": "8",
    "spillway.dev/simulated": "true",
}





def _env(kubeconfig: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["KUBECONFIG"] = str(kubeconfig)
    env["PYTHONPATH"] = str(REPO_ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def dra_class_manifest(cluster: Any) -> str:
    """The chart's DeviceClass `peer-hbm.spillway.dev` and its request-policy admission, as
    `helm template --set dra.enabled=true` renders them for a cluster serving resource.k8s.io/v1."""
    return str(cluster.helm("template", "spillway", str(REPO_ROOT / "charts" / "spillway"), "--api-versions",
                            "resource.k8s.io/v1", "--set", "dra.enabled=true",
                            "--show-only", "templates/dra-deviceclass.yaml").stdout)


@dataclass
class AgentHandle:
    node: str
    endpoint: str
    socket: Path
    state_dir: Path
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None


class Sandbox:
    """`with Sandbox(cluster) as sb: sb.add_gpu_nodes(2); sb.start_operator()`."""

    def __init__(self, cluster: Any | None = None, workdir: Path | str | None = None) -> None:
        self._own_cluster = cluster is None
        self.cluster = cluster
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="spw-sb-", dir="/tmp"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._sockets: Path | None = None
        self.agents: dict[str, AgentHandle] = {}
        self.operator: subprocess.Popen[bytes] | None = None
        self.operator_log = self.workdir / "operator.log"
        self.operator_metrics_port = 0
        self.server_tls: Any = None
        self.client_tls: Any = None
        self.dra: dict[str, subprocess.Popen[bytes]] = {}  # node -> its `spillway dra --publish-only`

    # -- lifecycle --

    def start(self) -> Sandbox:
        from spillway.pki import write_mtls_dir

        if self.cluster is None:
            from spillway.testing.cluster import Cluster

            self.cluster = Cluster(self.workdir / "cluster")
            self.cluster.start()
        self.server_tls, self.client_tls = write_mtls_dir(self.workdir / "tls")
        self.cluster.kubectl("apply", "-f", str(CRDS))
        for crd in ("inferencetenants.spillway.dev", "memorypools.spillway.dev"):
            self.cluster.kubectl("wait", "--for=condition=Established", f"crd/{crd}", "--timeout=60s")
        return self

    def __enter__(self) -> Sandbox:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        self.stop_operator()
        for proc in self.dra.values():
            self._stop_proc(proc)
        self.dra.clear()
        for a in list(self.agents.values()):
            self._stop_proc(a.proc)
            a.proc = None
        if self.cluster is not None and self._own_cluster:
            self.cluster.stop()
        if self._own_cluster:
            shutil.rmtree(self.workdir, ignore_errors=True)
        if self._sockets is not None:
            shutil.rmtree(self._sockets, ignore_errors=True)
            self._sockets = None

    @property
    def kubeconfig(self) -> Path:
        assert self.cluster is not None
        return Path(self.cluster.kubeconfig)

    # -- GPU nodes and agents --

    def agent_command(self, a: AgentHandle, topology: Path) -> list[str]:
        t = self.server_tls
        return [
            sys.executable, "-m", "spillway", "agent", "--backend", "simulated", "--topology", str(topology),
            "--node-name", a.node, "--socket", str(a.socket), "--state-dir", str(a.state_dir),
            "--metrics-port", "0", "--listen", a.endpoint,
            "--tls-cert", str(t.cert), "--tls-key", str(t.key), "--tls-ca", str(t.ca),
            "--publish", "--advertise-endpoint", a.endpoint,
        ]

    def _socket_dir(self) -> Path:
        """Unix socket paths are limited to 107 bytes, and the workdir may be deep (a test's tmp_path,
        SPILLWAY_DEMO_DIR): the agents' sockets live in a short directory of their own."""
        if self._sockets is None:
            self._sockets = Path(tempfile.mkdtemp(prefix="spw-s-", dir="/tmp"))
        return self._sockets

    def start_agent(self, node: str, topology: Path = DGX_H100) -> AgentHandle:
        d = self.workdir / "agents" / node
        d.mkdir(parents=True, exist_ok=True)
        a = self.agents.get(node) or AgentHandle(
            node=node, endpoint=f"127.0.0.1:{free_port()}", socket=self._socket_dir() / f"{node}.sock",
            state_dir=d / "state", log_path=d / "agent.log",
        )
        with a.log_path.open("ab") as log:
            a.proc = subprocess.Popen(
                self.agent_command(a, topology), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env=_env(self.kubeconfig), cwd=str(REPO_ROOT), start_new_session=True,
            )
        self.agents[node] = a
        return a

    def add_gpu_nodes(self, names: Sequence[str], *, peer_hbm_units: int | None = None,
                      timeout: float = 120.0, topology: Path = DGX_H100) -> list[str]:
        """kwok nodes standing for DGX H100s (8 simulated GPUs each; another `topology` file
        gives other simulated GPUs), one agent each; returns when every node's MemoryPool is
        published. `spillway.dev/peer-hbm` capacity is the pool's lendable memory in GiB (read
        from the first MemoryPool) unless given."""
        for n in names:
            self.start_agent(n, topology)
        pools = self.wait_pools(names, timeout=timeout)
        gpus = str(len(pools[names[0]]["status"]["gpus"]))
        units = peer_hbm_units
        if units is None:
            first = pools[names[0]]
            units = sum(int(g.get("lendableBytes", 0)) for g in first["status"]["gpus"]) >> 30
        assert self.cluster is not None
        for n in names:
            self.cluster.add_node(
                n, {"nvidia.com/gpu": gpus, "spillway.dev/peer-hbm": str(units)},
                {**H100_LABELS, "nvidia.com/gpu.count": gpus}, wait=False
            )
        wait_until(lambda: all(self._node_ready(x) for x in names), timeout=timeout, what="nodes Ready")
        return list(names)

    def _node_ready(self, name: str) -> bool:
        assert self.cluster is not None
        r = self.cluster.kubectl("get", "node", name, "-o",
                                 "jsonpath={.status.conditions[?(@.type=='Ready')].status}", check=False)
        return r.returncode == 0 and r.stdout.strip() == "True"

    def pools(self) -> dict[str, dict[str, Any]]:
        assert self.cluster is not None
        out = self.cluster.kubectl("get", "memorypools", "-o", "json", check=False)
        if out.returncode != 0:
            return {}
        return {p["metadata"]["name"]: p for p in json.loads(out.stdout).get("items", [])}

    def wait_pools(self, names: Sequence[str], timeout: float = 120.0) -> dict[str, dict[str, Any]]:
        def ready() -> dict[str, dict[str, Any]] | None:
            pools = self.pools()
            ok = all(n in pools and (pools[n].get("status") or {}).get("gpus") for n in names)
            if not ok:
                for a in self.agents.values():
                    if a.proc is not None and a.proc.poll() is not None:
                        raise RuntimeError(f"agent {a.node} exited: {a.log_path.read_text()[-3000:]}")
            return pools if ok else None

        return wait_until(ready, timeout=timeout, what=f"MemoryPools of {', '.join(names)}")

    def agent_client(self, node: str) -> Any:
        from spillway.agent.client import AgentClient

        return AgentClient(self.agents[node].endpoint, tls=self.client_tls)

    def kill_agent(self, node: str) -> None:
        a = self.agents[node]
        if a.proc is not None and a.proc.poll() is None:
            a.proc.kill()
            a.proc.wait()
        a.proc = None

    # -- the DRA driver --

    def start_dra(self, nodes: Sequence[str], timeout: float = 60.0) -> str:
        """Apply the chart's DeviceClass and start `spillway dra --publish-only` beside the agents of
        `nodes`; returns when their ResourceSlices exist. Returns the DeviceClass manifest (to
        delete it again)."""
        assert self.cluster is not None
        manifest = dra_class_manifest(self.cluster)
        self.cluster.kubectl("apply", "-f", "-", input=manifest)
        for node in nodes:
            a = self.agents[node]
            d = self.workdir / "dra" / node
            d.mkdir(parents=True, exist_ok=True)
            with (d / "dra.log").open("ab") as log:
                self.dra[node] = subprocess.Popen(
                    [sys.executable, "-m", "spillway", "dra", "--publish-only", "--node-name", node,
                     "--agent-socket", str(a.socket), "--kubeconfig", str(self.kubeconfig),
                     "--state-dir", str(d / "state"), "--metrics-port", "-1"],
                    stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=_env(self.kubeconfig),
                    cwd=str(REPO_ROOT), start_new_session=True)

        def published() -> bool:
            assert self.cluster is not None
            out = self.cluster.kubectl("get", "resourceslices", "-o", "jsonpath={.items[*].spec.nodeName}",
                                       check=False).stdout.split()
            return all(n in out for n in nodes)

        wait_until(published, timeout=timeout, what="the ResourceSlices of the DRA drivers")
        return manifest

    # -- the operator --

    def operator_command(self, extra: Sequence[str] = ()) -> list[str]:
        t = self.client_tls
        return [
            sys.executable, "-m", "spillway", "operator", "--kubeconfig", str(self.kubeconfig),
            "--tls-cert", str(t.cert), "--tls-key", str(t.key), "--tls-ca", str(t.ca),
            "--metrics-port", str(self.operator_metrics_port), "--metrics-address", "127.0.0.1", "--health-port", "-1",
            *extra,
        ]

    def start_operator(self, extra: Sequence[str] = ("--resync-interval", "5s", "--lease-ttl", "60s"),
                       wait_ready: bool = True) -> subprocess.Popen[bytes]:
        self.stop_operator()
        self.operator_metrics_port = free_port()
        self._operator_extra = list(extra)
        with self.operator_log.open("ab") as log:
            self.operator = subprocess.Popen(
                self.operator_command(extra), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env=_env(self.kubeconfig), cwd=str(REPO_ROOT), start_new_session=True,
            )
        if wait_ready:
            self.wait_operator_ready()
        return self.operator

    def wait_operator_ready(self, timeout: float = 90.0) -> None:
        import urllib.request

        def ready() -> bool:
            if self.operator is None or self.operator.poll() is not None:
                raise RuntimeError(f"operator exited: {self.operator_log.read_text()[-4000:]}")
            with contextlib.suppress(OSError):
                url = f"http://127.0.0.1:{self.operator_metrics_port}/readyz"
                with urllib.request.urlopen(url, timeout=2) as resp:
                    return bool(resp.status == 200)
            return False

        wait_until(ready, timeout=timeout, what="the operator to be ready", interval=0.3)

    def kill_operator(self) -> None:
        """SIGKILL: no cleanup code runs."""
        if self.operator is not None and self.operator.poll() is None:
            os.killpg(self.operator.pid, signal.SIGKILL)
            self.operator.wait()
        self.operator = None

    def stop_operator(self) -> None:
        self._stop_proc(self.operator)
        self.operator = None

    @staticmethod
    def _stop_proc(proc: subprocess.Popen[bytes] | None) -> None:
        if proc is None or proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()

    def logs(self) -> str:
        parts = [f"===== operator ({self.operator_log}) =====\n" + _tail(self.operator_log)]
        for a in self.agents.values():
            parts.append(f"===== agent {a.node} ({a.log_path}) =====\n" + _tail(a.log_path, 20))
        return "\n".join(parts)


def _tail(path: Path, lines: int = 60) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""

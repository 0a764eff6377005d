"""Pytest wiring for the device plugin tests.

- `dpconformance_bin` (session): the Go harness in hack/dpconformance, built once with the
  machine's Go and cached outside the clone (~/.cache/spillway/dpconformance-<hash of its
  sources>/), so a second run costs nothing.
- `Kubelet`: runs that harness (the kubelet's own registration server and plugin client) in a
  device-plugins directory and reads what it sees.
- `PodResourcesServer`: a real gRPC server on a unix socket speaking the kubelet's PodResources
  v1 messages, listing whatever pods the test puts in it.
- `PluginProcess`: a real `python -m spillway deviceplugin` subprocess.
"""

from __future__ import annotations

import hashlib
import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import pytest

from spillway.api.podresources.v1 import api_pb2 as pr_pb2
from spillway.api.podresources.v1 import api_pb2_grpc as pr_grpc
from spillway.deviceplugin import RESOURCE_NAME
from spillway.testing.agentproc import AgentProcess, free_port

REPO = Path(__file__).resolve().parent.parent
HARNESS_DIR = REPO / "hack" / "dpconformance"
GO = shutil.which("go") or "/usr/local/go/bin/go"


def harness_hash(directory: Path = HARNESS_DIR) -> str:
    h = hashlib.sha256()
    for name in ("go.mod", "go.sum", "main.go"):
        h.update(name.encode() + b"\0" + (directory / name).read_bytes())
    return h.hexdigest()[:12]


def build_harness(directory: Path = HARNESS_DIR, prebuilt_env: str = "SPILLWAY_DPCONFORMANCE_BIN") -> Path:
    """Builds a Go harness of hack/ (dpconformance, draconformance) once, cached by its sources."""
    prebuilt = os.environ.get(prebuilt_env)
    if prebuilt:  # the GPU machine has no Go: hack/gpu-bundle.sh builds it here and carries it there
        path = Path(prebuilt)
        if not (path.is_file() and os.access(path, os.X_OK)):
            raise RuntimeError(f"{prebuilt_env}={prebuilt} is not an executable file")
        return path
    cache = Path(os.environ.get("SPILLWAY_CACHE_DIR", Path.home() / ".cache" / "spillway"))
    out = cache / f"{directory.name}-{harness_hash(directory)}" / directory.name
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(f".tmp{os.getpid()}")
    env = dict(os.environ, GOTOOLCHAIN="local", GOFLAGS="-mod=readonly", CGO_ENABLED="0",
               PATH=f"/usr/local/go/bin:{os.environ.get('PATH', '')}")
    result = subprocess.run([GO, "build", "-trimpath", "-o", str(tmp), "."], cwd=directory, env=env,
                            capture_output=True, text=True, timeout=1800)
    if result.returncode != 0:
        raise RuntimeError(f"building hack/{directory.name} failed:\n{result.stderr[-4000:]}")
    tmp.rename(out)
    return out


@pytest.fixture(scope="session")
def dpconformance_bin() -> Path:
    return build_harness()


class Kubelet:
    """The kubelet's device-manager registration server and plugin client (Go harness)."""

    REPLIES: tuple[str, ...] = ("preferred", "allocate", "prestart")   # events that answer a command

    def __init__(self, binary: Path, plugin_dir: Path) -> None:
        self.binary = binary
        self.dir = plugin_dir
        self.events: list[dict[str, Any]] = []
        self._cond = threading.Condition()
        self._replies: queue.Queue[dict[str, Any]] = queue.Queue()
        self.proc: subprocess.Popen[str] | None = None
        self.stderr_path = plugin_dir.parent / f"kubelet-{id(self)}.log"

    def start(self) -> Kubelet:
        self.dir.mkdir(parents=True, exist_ok=True)
        with self._cond:
            self.events = []
        self._replies = queue.Queue()
        self.proc = subprocess.Popen([str(self.binary), *self.arguments()], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=open(self.stderr_path, "a"), text=True)
        threading.Thread(target=self._read, args=(self.proc,), daemon=True).start()
        self.wait_for(lambda e: e["event"] == "ready", 30, "the harness to be ready")
        return self

    def arguments(self) -> list[str]:
        return ["--dir", str(self.dir)]

    def _read(self, proc: subprocess.Popen[str]) -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            ev = json.loads(line)
            ev["t"] = time.monotonic()
            if ev["event"] in self.REPLIES:
                self._replies.put(ev)
            with self._cond:
                self.events.append(ev)
                self._cond.notify_all()

    def wait_for(self, pred: Callable[[dict[str, Any]], bool], timeout: float, what: str = "an event",
                 since: int = 0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for ev in self.events[since:]:
                    if pred(ev):
                        return ev
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"timed out after {timeout}s waiting for {what}; saw {self.events[-5:]}")
                self._cond.wait(left)

    def mark(self) -> int:
        with self._cond:
            return len(self.events)

    def devices(self) -> list[dict[str, str]]:
        ev = self.wait_for(lambda e: e["event"] == "devices", 20, "a ListAndWatch response")
        with self._cond:
            last = [e for e in self.events if e["event"] == "devices"][-1] if self.events else ev
        return list(last["devices"])

    def wait_devices(self, pred: Callable[[list[dict[str, str]]], bool], timeout: float, what: str
                     ) -> list[dict[str, str]]:
        ev = self.wait_for(lambda e: e["event"] == "devices" and pred(e["devices"]), timeout, what,
                           since=self._last_devices_index())
        return list(ev["devices"])

    def _last_devices_index(self) -> int:
        with self._cond:
            idx = [i for i, e in enumerate(self.events) if e["event"] == "devices"]
            return idx[-1] if idx else 0

    def _command(self, cmd: dict[str, Any], timeout: float = 40) -> dict[str, Any]:
        assert self.proc is not None and self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        return self._replies.get(timeout=timeout)

    def preferred(self, available: list[str], size: int, must_include: list[str] | None = None) -> dict[str, Any]:
        return self._command({"cmd": "preferred", "available": available, "must_include": must_include or [],
                              "size": size})

    def allocate(self, ids: list[str]) -> dict[str, Any]:
        return self._command({"cmd": "allocate", "ids": ids})

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None


class _Lister(pr_grpc.PodResourcesListerServicer):
    def __init__(self) -> None:
        self.pods: dict[str, dict[str, list[str]]] = {}
        self.lock = threading.Lock()
        self.calls = 0

    def List(self, request: pr_pb2.ListPodResourcesRequest, context: grpc.ServicerContext
             ) -> pr_pb2.ListPodResourcesResponse:
        with self.lock:
            self.calls += 1
            resp = pr_pb2.ListPodResourcesResponse()
            for key, containers in self.pods.items():
                ns, name = key.split("/", 1)
                pod = resp.pod_resources.add(name=name, namespace=ns)
                for cname, ids in containers.items():
                    c = pod.containers.add(name=cname)
                    c.devices.add(resource_name=RESOURCE_NAME, device_ids=ids)
                    c.devices.add(resource_name="nvidia.com/gpu", device_ids=["GPU-own"])
            return resp


class PodResourcesServer:
    """A real gRPC server on a unix socket with the kubelet's PodResources v1 messages."""

    def __init__(self, socket: Path) -> None:
        self.socket = socket
        self.lister = _Lister()
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        pr_grpc.add_PodResourcesListerServicer_to_server(self.lister, self.server)
        self.server.add_insecure_port(f"unix://{socket}")
        self.server.start()

    def set_pod(self, key: str, containers: dict[str, list[str]]) -> None:
        with self.lister.lock:
            self.lister.pods[key] = containers

    def remove_pod(self, key: str) -> None:
        with self.lister.lock:
            self.lister.pods.pop(key, None)

    def stop(self) -> None:
        self.server.stop(0)


class PluginProcess:
    """`python -m spillway deviceplugin` as a subprocess."""

    def __init__(self, workdir: Path, agent_socket: Path, node: str, *, kubeconfig: Path | None = None,
                 extra: list[str] | None = None) -> None:
        self.workdir = workdir
        self.kubelet_dir = workdir / "device-plugins"
        self.pod_resources = workdir / "pod-resources.sock"
        self.state_dir = workdir / "dpstate"
        self.metrics_port = free_port()
        self.log_path = workdir / "deviceplugin.log"
        self.cmd = [sys.executable, "-m", "spillway", "deviceplugin",
                    "--agent-socket", str(agent_socket), "--node-name", node,
                    "--kubelet-dir", str(self.kubelet_dir), "--pod-resources-socket", str(self.pod_resources),
                    "--state-dir", str(self.state_dir), "--metrics-port", str(self.metrics_port),
                    "--sync-interval", "0.3s", "--release-grace", "1s"]
        self.cmd += ["--kubeconfig", str(kubeconfig)] if kubeconfig else ["--no-kubernetes"]
        self.cmd += extra or []
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> PluginProcess:
        env = dict(os.environ, PYTHONPATH=str(REPO))
        env.pop("KUBECONFIG", None)
        self.proc = subprocess.Popen(self.cmd, stdout=open(self.log_path, "ab"), stderr=subprocess.STDOUT, env=env,
                                     cwd=str(REPO))
        return self

    def logs(self) -> str:
        return self.log_path.read_text() if self.log_path.exists() else ""

    def metrics(self) -> str:
        import urllib.request

        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5) as r:
            return str(r.read().decode())

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


@pytest.fixture
def dp_workdir() -> Iterator[Path]:
    # unix socket paths are limited to 107 bytes: keep the directory short
    d = Path(tempfile.mkdtemp(prefix="spw-dp-", dir="/tmp"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def stack(dpconformance_bin: Path, dp_workdir: Path, agent: AgentProcess
          ) -> Iterator[tuple[AgentProcess, PluginProcess, Kubelet, PodResourcesServer]]:
    plugin = PluginProcess(dp_workdir, agent.socket, agent.node_name)
    pods = PodResourcesServer(plugin.pod_resources)
    kubelet = Kubelet(dpconformance_bin, plugin.kubelet_dir).start()
    plugin.start()
    try:
        kubelet.wait_for(lambda e: e["event"] == "registered", 30, "the plugin to register")
        yield agent, plugin, kubelet, pods
    except BaseException:
        print(plugin.logs()[-6000:])
        raise
    finally:
        plugin.stop()
        kubelet.stop()
        pods.stop()

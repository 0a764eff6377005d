"""A real local Kubernetes control plane for the tests, the demo and people.

etcd, kube-apiserver (client-certificate auth, RBAC), kube-controller-manager, kube-scheduler
and kwok (nodes and pods without a kubelet) run as child processes on free loopback ports,
from binaries that hack/build-k8s.sh builds from source and caches by version.

    with Cluster() as c:
        c.add_node("gpu-0", {"nvidia.com/gpu": "8", "spillway.dev/peer-hbm": "400"})
        c.kubectl("apply", "-f", "crds/")

From a shell: ``python -m spillway.testing.cluster up`` starts one in the background and prints
``export KUBECONFIG=...``; ``python -m spillway.testing.cluster down`` stops it.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import json
import logging
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import IO, Any, TypeVar

import yaml

from spillway import pki

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[2]
VERSIONS_FILE = REPO_ROOT / "hack" / "versions.env"
BUILD_SCRIPT = REPO_ROOT / "hack" / "build-k8s.sh"
BINARIES = ("etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "kwok", "kubectl", "helm")
KWOK_NODE_ANNOTATION = "kwok.x-k8s.io/node"
DEFAULT_NODE_CAPACITY = {"cpu": "64", "memory": "512Gi", "pods": "110", "ephemeral-storage": "1Ti"}
SERVICE_CIDR = "10.96.0.0/16"
SERVICE_IP = "10.96.0.1"
STATE_FILE = "state.json"

T = TypeVar("T")


class ClusterError(RuntimeError):
    """The control plane failed to start or a component died; the message carries log tails."""


class CommandError(subprocess.CalledProcessError):
    """A kubectl/helm call failed; unlike CalledProcessError its message includes stderr."""

    def __str__(self) -> str:
        return f"{super().__str__()}\nstdout:\n{self.stdout}\nstderr:\n{self.stderr}"


# --- versions and binaries ---------------------------------------------------------------


def versions() -> dict[str, str]:
    """The pinned versions from hack/versions.env (the one place they are written)."""
    out: dict[str, str] = {}
    for line in VERSIONS_FILE.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#") and "=" in line:
            key, _, value = line.partition("=")
            out[key.strip()] = value.strip().strip("\"'")
    return out


def cache_root() -> Path:
    return Path(os.environ.get("SPILLWAY_CACHE_DIR", Path.home() / ".cache" / "spillway"))


def ensure_binaries() -> Path:
    """Returns the directory of the control-plane binaries, building them first if needed.

    The build script returns at once when the binaries of the pinned versions are cached; the
    first build (from source, through the Go module proxy) takes tens of minutes.
    SPILLWAY_K8S_BIN_DIR points at a ready directory instead.
    """
    override = os.environ.get("SPILLWAY_K8S_BIN_DIR")
    if override:
        path = Path(override)
        missing = [b for b in BINARIES if not (path / b).is_file()]
        if missing:
            raise ClusterError(f"SPILLWAY_K8S_BIN_DIR={path} lacks {', '.join(missing)}")
        return path
    # Its progress goes to our stderr (fd 2, which works under pytest capturing too).
    result = subprocess.run([str(BUILD_SCRIPT)], stdout=2, check=False)
    if result.returncode != 0:
        raise ClusterError(f"{BUILD_SCRIPT} failed with exit status {result.returncode}")
    return cache_root() / "k8s" / versions()["K8S_VERSION"] / "bin"


# --- small helpers -----------------------------------------------------------------------


def wait_until(
    check: Callable[[], T | None], *, timeout: float = 30.0, interval: float = 0.2, what: str = "condition"
) -> T:
    """Polls `check` until it returns something truthy, and returns that; raises TimeoutError."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


def _free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _http_ok(url: str, context: ssl.SSLContext | None = None) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2, context=context) as resp:
            return bool(resp.status == 200)
    except (urllib.error.URLError, OSError, ssl.SSLError):
        return False


def _tail(path: Path, lines: int) -> str:
    try:
        with path.open("rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - 200 * lines))
            text = f.read().decode(errors="replace")
    except OSError as e:
        return f"(cannot read {path}: {e})"
    return "\n".join(text.splitlines()[-lines:])


def _kubeconfig(path: Path, server: str, ca: Path, user: Mapping[str, str]) -> Path:
    """Writes a self-contained kubeconfig (certificate data inlined, so it can be copied)."""
    import base64

    def b64(p: Path) -> str:
        return base64.b64encode(p.read_bytes()).decode()

    creds: dict[str, str] = {}
    if "token" in user:
        creds["token"] = user["token"]
    else:
        creds["client-certificate-data"] = b64(Path(user["cert"]))
        creds["client-key-data"] = b64(Path(user["key"]))
    doc = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "spillway", "cluster": {"server": server, "certificate-authority-data": b64(ca)}}],
        "users": [{"name": "user", "user": creds}],
        "contexts": [{"name": "spillway", "context": {"cluster": "spillway", "user": "user"}}],
        "current-context": "spillway",
    }
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    path.chmod(0o600)
    return path


# --- processes ---------------------------------------------------------------------------


@dataclass
class _Component:
    name: str
    argv: list[str]
    log_path: Path
    process: subprocess.Popen[bytes] | None = None
    pid: int | None = None
    _log: IO[bytes] | None = field(default=None, repr=False)

    def start(self, *, die_with_parent: bool) -> None:
        self._log = self.log_path.open("ab")
        argv = self.argv
        if die_with_parent and shutil.which("setpriv"):
            # If the test process is killed outright, the kernel stops the component too.
            argv = ["setpriv", "--pdeathsig", "KILL", "--", *argv]
        env = {k: v for k, v in os.environ.items() if k != "KUBECONFIG"}
        self.process = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True, env=env
        )
        self.pid = self.process.pid

    def alive(self) -> bool:
        if self.process is not None:
            if self.process.returncode is not None:
                return False
            # Looks without reaping: while the exited leader stays a zombie, its process group
            # id cannot be reused, so signalling the group stays safe.
            try:
                return os.waitid(os.P_PID, self.process.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is None
            except ChildProcessError:
                return False
        return self.pid is not None and _pid_is(self.pid, self.argv[0])

    def stop(self, timeout: float = 5.0) -> None:
        """SIGTERM to the component's process group, SIGKILL after `timeout`."""
        if self.pid is None:
            return
        if self.alive():
            _killpg(self.pid, signal.SIGTERM)
            deadline = time.monotonic() + timeout
            while self.alive() and time.monotonic() < deadline:
                time.sleep(0.05)
        if self.alive():
            _killpg(self.pid, signal.SIGKILL)
        if self.process is not None:
            # Whatever the component left in its group goes too (the leader is not reaped yet).
            _killpg(self.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(timeout=timeout)
        if self._log is not None:
            self._log.close()
            self._log = None


def _killpg(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def _pid_is(pid: int, binary: str) -> bool:
    """Whether `pid` is alive and still runs `binary` (guards against reuse of a stale pid)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    if stat.rsplit(")", 1)[-1].split()[0] == "Z":
        return False
    return any(part.decode(errors="replace") == binary for part in cmdline)


# --- the cluster -------------------------------------------------------------------------


class Cluster:
    """A local control plane. `start()` returns when every component is ready."""

    def __init__(
        self,
        state_dir: Path | str | None = None,
        bin_dir: Path | str | None = None,
        *,
        detached: bool = False,
    ) -> None:
        self._own_state_dir = state_dir is None
        self.state_dir = Path(state_dir or tempfile.mkdtemp(prefix="spillway-cluster-")).resolve()
        self.bin_dir = Path(bin_dir) if bin_dir else None
        self.detached = detached
        self.log_dir = self.state_dir / "logs"
        self.pki_dir = self.state_dir / "pki"
        self.kubeconfig = self.state_dir / "admin.kubeconfig"
        self.server = ""
        self.ports: dict[str, int] = {}
        self.startup_seconds: float | None = None
        self._components: list[_Component] = []
        self._sa_kubeconfigs: dict[tuple[str, str], Path] = {}

    # -- lifecycle --

    def __enter__(self) -> Cluster:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def start(self, timeout: float = 90.0) -> None:
        t0 = time.monotonic()
        if self.bin_dir is None:
            self.bin_dir = ensure_binaries()
        for d in (self.log_dir, self.pki_dir):
            d.mkdir(parents=True, exist_ok=True)
        if not self.detached:
            atexit.register(self.stop)
        try:
            self._start(t0 + timeout)
        except BaseException:
            self.stop()
            raise
        self.startup_seconds = time.monotonic() - t0
        self._save_state()
        log.info("cluster ready", extra={"seconds": round(self.startup_seconds, 1), "kubeconfig": str(self.kubeconfig)})

    def stop(self) -> None:
        """Stops every component (newest first) and waits until each is gone."""
        for comp in reversed(self._components):
            comp.stop()
        self._components.clear()
        state = self.state_dir / STATE_FILE
        if state.exists():
            state.unlink()
        with contextlib.suppress(ValueError):
            atexit.unregister(self.stop)

    def running(self) -> bool:
        return bool(self._components) and all(c.alive() for c in self._components)

    def _bin(self, name: str) -> str:
        assert self.bin_dir is not None
        return str(self.bin_dir / name)

    def _start(self, deadline: float) -> None:
        v = versions()
        etcd_client, etcd_peer, api, kcm, sched, kwok = _free_ports(6)
        self.ports = {
            "etcd": etcd_client,
            "etcd-peer": etcd_peer,
            "apiserver": api,
            "kcm": kcm,
            "scheduler": sched,
            "kwok": kwok,
        }
        self.server = f"https://127.0.0.1:{api}"

        ca = pki.make_ca("spillway-local-ca")
        ca_cert = ca.write(self.pki_dir)
        serving = ca.issue_files(
            self.pki_dir,
            "apiserver",
            "kube-apiserver",
            (
                "localhost",
                "kubernetes",
                "kubernetes.default",
                "kubernetes.default.svc",
                "kubernetes.default.svc.cluster.local",
                "127.0.0.1",
                SERVICE_IP,
            ),
            client=False,
            server=True,
        )
        sa = pki.service_account_keys(self.pki_dir)
        admin = ca.issue_files(
            self.pki_dir, "admin", "spillway-admin", client=True, server=False, organizations=("system:masters",)
        )
        front_proxy = ca.issue_files(
            self.pki_dir, "front-proxy-client", "front-proxy-client", client=True, server=False
        )
        kubeconfigs = {}
        for name, cn, orgs in (
            ("controller-manager", "system:kube-controller-manager", ()),
            ("scheduler", "system:kube-scheduler", ()),
            ("kwok", "kwok", ("system:masters",)),
        ):
            pair = ca.issue_files(self.pki_dir, name, cn, client=True, server=False, organizations=orgs)
            kubeconfigs[name] = _kubeconfig(
                self.state_dir / f"{name}.kubeconfig",
                self.server,
                ca_cert,
                {"cert": str(pair.cert), "key": str(pair.key)},
            )
        _kubeconfig(self.kubeconfig, self.server, ca_cert, {"cert": str(admin.cert), "key": str(admin.key)})

        etcd_data = self.state_dir / "etcd"
        shutil.rmtree(etcd_data, ignore_errors=True)
        self._spawn(
            "etcd",
            [
                self._bin("etcd"),
                "--name=default",
                f"--data-dir={etcd_data}",
                f"--listen-client-urls=http://127.0.0.1:{etcd_client}",
                f"--advertise-client-urls=http://127.0.0.1:{etcd_client}",
                f"--listen-peer-urls=http://127.0.0.1:{etcd_peer}",
                f"--initial-advertise-peer-urls=http://127.0.0.1:{etcd_peer}",
                f"--initial-cluster=default=http://127.0.0.1:{etcd_peer}",
                "--unsafe-no-fsync",
                "--log-level=warn",
            ],
        )
        self._wait_http("etcd", f"http://127.0.0.1:{etcd_client}/health", deadline)

        self._spawn(
            "kube-apiserver",
            [
                self._bin("kube-apiserver"),
                f"--etcd-servers=http://127.0.0.1:{etcd_client}",
                "--bind-address=127.0.0.1",
                "--advertise-address=127.0.0.1",
                f"--secure-port={api}",
                # A loopback address may not back the `kubernetes` Service's endpoints; no pod here
                # needs them (kwok runs no containers).
                "--endpoint-reconciler-type=none",
                f"--cert-dir={self.state_dir / 'apiserver-certs'}",
                f"--tls-cert-file={serving.cert}",
                f"--tls-private-key-file={serving.key}",
                f"--client-ca-file={ca_cert}",
                # The aggregation layer's front proxy: without it every component that delegates
                # authentication logs a missing request-header CA bundle.
                f"--requestheader-client-ca-file={ca_cert}",
                "--requestheader-allowed-names=front-proxy-client",
                "--requestheader-username-headers=X-Remote-User",
                "--requestheader-group-headers=X-Remote-Group",
                "--requestheader-extra-headers-prefix=X-Remote-Extra-",
                f"--proxy-client-cert-file={front_proxy.cert}",
                f"--proxy-client-key-file={front_proxy.key}",
                "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
                f"--service-account-key-file={sa.public}",
                f"--service-account-signing-key-file={sa.private}",
                "--authorization-mode=Node,RBAC",
                f"--service-cluster-ip-range={SERVICE_CIDR}",
                "--allow-privileged=true",
                # kwok marks a node Ready at once; the admission-time not-ready taint would only
                # delay scheduling until the node lifecycle controller's next pass.
                "--disable-admission-plugins=TaintNodesByCondition",
                "--profiling=false",
                "--v=1",
            ],
        )
        ca_ctx = ssl.create_default_context(cafile=str(ca_cert))
        self._wait_http("kube-apiserver", f"{self.server}/readyz", deadline, ca_ctx)

        insecure = ssl.create_default_context()
        insecure.check_hostname = False
        insecure.verify_mode = ssl.CERT_NONE
        for name, port, kc, extra in (
            (
                "kube-controller-manager",
                kcm,
                kubeconfigs["controller-manager"],
                [
                    "--use-service-account-credentials=true",
                    f"--root-ca-file={ca_cert}",
                    f"--service-account-private-key-file={sa.private}",
                    "--controllers=*",
                    f"--service-cluster-ip-range={SERVICE_CIDR}",
                ],
            ),
            ("kube-scheduler", sched, kubeconfigs["scheduler"], []),
        ):
            self._spawn(
                name,
                [
                    self._bin(name),
                    f"--kubeconfig={kc}",
                    f"--authentication-kubeconfig={kc}",
                    f"--authorization-kubeconfig={kc}",
                    "--leader-elect=false",
                    "--bind-address=127.0.0.1",
                    f"--secure-port={port}",
                    f"--cert-dir={self.state_dir / name}",
                    "--v=1",
                    *extra,
                ],
            )
        assert self.bin_dir is not None
        self._spawn(
            "kwok",
            [
                self._bin("kwok"),
                f"--kubeconfig={kubeconfigs['kwok']}",
                f"--config={self.bin_dir.parent / 'etc' / 'kwok-stages.yaml'}",
                "--manage-all-nodes=false",
                f"--manage-nodes-with-annotation-selector={KWOK_NODE_ANNOTATION}=fake",
                f"--server-address=127.0.0.1:{kwok}",
                "--node-lease-duration-seconds=40",
            ],
        )
        self._wait_http("kube-controller-manager", f"https://127.0.0.1:{kcm}/healthz", deadline, insecure)
        self._wait_http("kube-scheduler", f"https://127.0.0.1:{sched}/healthz", deadline, insecure)
        self._wait_http("kwok", f"http://127.0.0.1:{kwok}/healthz", deadline)
        # The ServiceAccount admission refuses pods until the controller manager has made the
        # namespace's "default" account; waiting for it shows the controllers work.
        self._wait(
            "kube-controller-manager",
            lambda: self.kubectl("get", "serviceaccount", "default", "-n", "default", check=False).returncode == 0,
            deadline,
        )
        log.debug("versions", extra=v)

    def _spawn(self, name: str, argv: list[str]) -> None:
        comp = _Component(name, argv, self.log_dir / f"{name}.log")
        comp.log_path.write_text(f"# {' '.join(argv)}\n")
        comp.start(die_with_parent=not self.detached)
        self._components.append(comp)

    def _wait(self, name: str, check: Callable[[], bool], deadline: float) -> None:
        t0 = time.monotonic()
        while not check():
            for comp in self._components:
                if not comp.alive():
                    raise ClusterError(f"{comp.name} exited during start-up\n{self.dump_logs()}")
            if time.monotonic() > deadline:
                raise ClusterError(f"{name} not ready in time\n{self.dump_logs()}")
            time.sleep(0.1)
        log.debug("component ready", extra={"component": name, "waited_s": round(time.monotonic() - t0, 2)})

    def _wait_http(self, name: str, url: str, deadline: float, context: ssl.SSLContext | None = None) -> None:
        self._wait(name, lambda: _http_ok(url, context), deadline)

    # -- state for the detached CLI --

    def _save_state(self) -> None:
        state = {
            "server": self.server,
            "kubeconfig": str(self.kubeconfig),
            "bin_dir": str(self.bin_dir),
            "ports": self.ports,
            "startup_seconds": self.startup_seconds,
            "components": [{"name": c.name, "pid": c.pid, "argv": c.argv} for c in self._components],
        }
        (self.state_dir / STATE_FILE).write_text(json.dumps(state, indent=2))

    @classmethod
    def attach(cls, state_dir: Path | str) -> Cluster:
        """A handle on a cluster that `python -m spillway.testing.cluster up` started."""
        state_dir = Path(state_dir)
        state = json.loads((state_dir / STATE_FILE).read_text())
        c = cls(state_dir, state["bin_dir"], detached=True)
        c.server, c.ports, c.startup_seconds = state["server"], state["ports"], state.get("startup_seconds")
        for entry in state["components"]:
            c._components.append(
                _Component(entry["name"], entry["argv"], c.log_dir / f"{entry['name']}.log", pid=entry["pid"])
            )
        return c

    # -- clients --

    def kubectl(
        self,
        *args: str,
        check: bool = True,
        input: str | None = None,
        as_user: str | None = None,
        as_groups: Sequence[str] = (),
        kubeconfig: Path | str | None = None,
        timeout: float = 300.0,
    ) -> subprocess.CompletedProcess[str]:
        """Runs the built kubectl against this cluster (as admin unless `kubeconfig` says
        otherwise). `as_user` impersonates, e.g. "system:serviceaccount:ns:name"."""
        cmd = [
            self._bin("kubectl"),
            f"--kubeconfig={kubeconfig or self.kubeconfig}",
            f"--cache-dir={self.state_dir / 'kube-cache'}",
        ]
        if as_user:
            cmd.append(f"--as={as_user}")
            if as_user.startswith("system:serviceaccount:") and not as_groups:
                ns = as_user.split(":")[2]
                as_groups = ("system:serviceaccounts", f"system:serviceaccounts:{ns}", "system:authenticated")
        cmd += [f"--as-group={g}" for g in as_groups]
        return self._run(cmd + list(args), check=check, input=input, timeout=timeout)

    def helm(
        self,
        *args: str,
        check: bool = True,
        input: str | None = None,
        kubeconfig: Path | str | None = None,
        timeout: float = 300.0,
    ) -> subprocess.CompletedProcess[str]:
        """Runs the built helm against this cluster; helm's own state stays in the state dir."""
        home = self.state_dir / "helm"
        env = {
            "KUBECONFIG": str(kubeconfig or self.kubeconfig),
            "HELM_CONFIG_HOME": str(home / "config"),
            "HELM_CACHE_HOME": str(home / "cache"),
            "HELM_DATA_HOME": str(home / "data"),
        }
        return self._run([self._bin("helm"), *args], check=check, input=input, timeout=timeout, env=env)

    def _run(
        self, cmd: list[str], *, check: bool, input: str | None, timeout: float, env: Mapping[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        full_env = {k: v for k, v in os.environ.items() if k != "KUBECONFIG"}
        full_env.update(env or {})
        result = subprocess.run(cmd, input=input, capture_output=True, text=True, timeout=timeout, env=full_env)
        if check and result.returncode != 0:
            raise CommandError(result.returncode, cmd, result.stdout, result.stderr)
        return result

    def get_json(self, *args: str, **kwargs: Any) -> Any:
        """`kubectl get ... -o json`, parsed."""
        return json.loads(self.kubectl("get", *args, "-o", "json", **kwargs).stdout)

    def apply(
        self, manifest: Mapping[str, Any] | str, namespace: str | None = None, **kwargs: Any
    ) -> subprocess.CompletedProcess[str]:
        """`kubectl apply -f -` of a manifest given as a dict or as YAML text."""
        text = manifest if isinstance(manifest, str) else json.dumps(manifest)
        ns = ["-n", namespace] if namespace else []
        return self.kubectl("apply", *ns, "-f", "-", input=text, **kwargs)

    def create_namespace(self, name: str) -> str:
        """Creates a namespace and waits for its "default" ServiceAccount (pods need it)."""
        self.kubectl("create", "namespace", name)
        wait_until(
            lambda: self.kubectl("get", "serviceaccount", "default", "-n", name, check=False).returncode == 0,
            what=f"the default ServiceAccount of namespace {name}",
        )
        return name

    def kubeconfig_for_service_account(self, namespace: str, name: str, duration: str = "24h") -> Path:
        """A kubeconfig that authenticates as the ServiceAccount with a token from the
        TokenRequest API (`kubectl create token`), to test what its RBAC allows."""
        token = self.kubectl("create", "token", name, "-n", namespace, f"--duration={duration}").stdout.strip()
        path = self.state_dir / f"sa-{namespace}-{name}.kubeconfig"
        _kubeconfig(path, self.server, self.pki_dir / "ca.crt", {"token": token})
        self._sa_kubeconfigs[(namespace, name)] = path
        return path

    # -- nodes --

    def add_node(
        self,
        name: str,
        capacity: Mapping[str, str],
        labels: Mapping[str, str] | None = None,
        allocatable: Mapping[str, str] | None = None,
        *,
        taints: Sequence[Mapping[str, str]] = (),
        wait: bool = True,
    ) -> dict[str, Any]:
        """Creates a fake node that kwok keeps Ready. `capacity` adds to (or overrides) a
        default of 64 CPUs, 512Gi memory and 110 pods; `allocatable` defaults to capacity."""
        cap = {**DEFAULT_NODE_CAPACITY, **{k: str(v) for k, v in capacity.items()}}
        alloc = {**cap, **{k: str(v) for k, v in (allocatable or {}).items()}}
        node = {
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {
                "name": name,
                "annotations": {KWOK_NODE_ANNOTATION: "fake", "node.alpha.kubernetes.io/ttl": "0"},
                "labels": {
                    "kubernetes.io/hostname": name,
                    "kubernetes.io/os": "linux",
                    "kubernetes.io/arch": "amd64",
                    "type": "kwok",
                    **(labels or {}),
                },
            },
            "spec": {"taints": [dict(t) for t in taints]} if taints else {},
            "status": {"capacity": cap, "allocatable": alloc},
        }
        self.kubectl("create", "-f", "-", input=json.dumps(node))
        if not wait:
            return node

        def ready() -> dict[str, Any] | None:
            obj: dict[str, Any] = self.get_json("node", name)
            conditions = {c["type"]: c["status"] for c in obj.get("status", {}).get("conditions", [])}
            system_taints = [t for t in obj["spec"].get("taints", []) if t["key"].startswith("node.kubernetes.io/")]
            return obj if conditions.get("Ready") == "True" and not system_taints else None

        return wait_until(ready, timeout=30, what=f"node {name} to be Ready")

    def remove_node(self, name: str) -> None:
        self.kubectl("delete", "node", name, "--ignore-not-found")

    # -- diagnostics --

    def dump_logs(self, lines: int = 40) -> str:
        """The last lines of every component's log, with the log paths."""
        parts = [f"cluster state dir: {self.state_dir}"]
        for path in sorted(self.log_dir.glob("*.log")):
            parts.append(f"===== {path.name} ({path}) =====\n{_tail(path, lines)}")
        return "\n".join(parts)


# --- command line ------------------------------------------------------------------------


def _default_state_dir() -> Path:
    return cache_root() / "cluster"


def _parse_kv(items: Sequence[str]) -> dict[str, str]:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"expected KEY=VALUE, got {item!r}")
        out[key] = value
    return out


def _attached(state_dir: Path) -> Cluster | None:
    if not (state_dir / STATE_FILE).exists():
        return None
    c = Cluster.attach(state_dir)
    return c if c.running() else None


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m spillway.testing.cluster", description="A local Kubernetes control plane."
    )
    parser.add_argument("--state-dir", type=Path, default=_default_state_dir())
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("up", help="start a cluster in the background and print `export KUBECONFIG=...`")
    sub.add_parser("down", help="stop the cluster")
    sub.add_parser("status", help="print whether the cluster runs")
    node = sub.add_parser("add-node", help="add a kwok node")
    node.add_argument("name")
    node.add_argument("--capacity", nargs="*", default=[], metavar="RESOURCE=QUANTITY")
    node.add_argument("--label", nargs="*", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    state_dir: Path = args.state_dir.resolve()

    if args.cmd == "up":
        running = _attached(state_dir)
        if running is None:
            if (state_dir / STATE_FILE).exists():
                Cluster.attach(state_dir).stop()  # remnants of a cluster that half died
            if state_dir.exists():
                shutil.rmtree(state_dir)
            running = Cluster(state_dir, detached=True)
            running.start()
            print(f"# cluster ready in {running.startup_seconds:.1f} s; logs in {running.log_dir}", file=sys.stderr)
        print(f"export KUBECONFIG={running.kubeconfig}")
        return 0
    if args.cmd == "down":
        if (state_dir / STATE_FILE).exists():
            Cluster.attach(state_dir).stop()
            print(f"# cluster stopped; logs stay in {state_dir / 'logs'}", file=sys.stderr)
        else:
            print("# no cluster running", file=sys.stderr)
        return 0
    if args.cmd == "status":
        c = _attached(state_dir)
        print(f"running: {c.server} KUBECONFIG={c.kubeconfig}" if c else "not running")
        return 0 if c else 1
    if args.cmd == "add-node":
        c = _attached(state_dir)
        if c is None:
            print("no cluster running; run `up` first", file=sys.stderr)
            return 1
        c.add_node(args.name, _parse_kv(args.capacity), _parse_kv(args.label))
        print(f"node/{args.name} ready")
        return 0
    return 2


if __name__ == "__main__":
    sys.exit(main())

"""The container image, built for real and run: hack/image.sh builds it from the Dockerfile with
buildah (vfs storage, chroot isolation) over a Debian base that mmdebstrap makes from Debian's
mirror (both from hack/system-deps.sh); then the agent (simulated GPUs), the device plugin and
the operator (against the local control plane) start inside it as uid 65532, and
`spillway pool show` answers from inside it.

The build is cached under ~/.cache/spillway/buildah, keyed by the inputs' hash: a cold build
takes minutes (downloads come from a pip cache kept there too), a warm one only checks the key.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from spillway.testing.agentproc import free_port
from spillway.testing.cluster import Cluster

REPO = Path(__file__).resolve().parents[1]
CACHE = Path(os.environ.get("SPILLWAY_CACHE_DIR", Path.home() / ".cache" / "spillway"))
ROOT = Path(os.environ.get("SPILLWAY_BUILDAH_ROOT", CACHE / "buildah"))

# Runs inside the image with its own Python: starts the three long-running parts, asks the agent
# for its pool with the CLI, checks each part's HTTP endpoint, stops them, writes out.json.
PROBE = r'''
import json, os, subprocess, sys, time, urllib.request
work, agent_port, dp_port, op_port = sys.argv[1], *sys.argv[2:5]
sock = f"{work}/run/agent.sock"
procs, out = {}, {"uid": os.getuid(), "gid": os.getgid()}

def start(name, *args):
    with open(f"{work}/{name}.log", "wb") as log:
        procs[name] = subprocess.Popen(["spillway", *args], stdout=log, stderr=subprocess.STDOUT)

def ok(port, path):
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=2) as r:
            return r.status == 200
    except OSError:
        return False

def wait(name, pred, within=90):
    end = time.monotonic() + within
    while time.monotonic() < end:
        if procs[name].poll() is not None:
            raise SystemExit(f"{name} exited with {procs[name].returncode}")
        if pred():
            return
        time.sleep(0.3)
    raise SystemExit(f"{name} not ready within {within}s")

try:
    start("agent", "agent", "--backend", "simulated", "--topology", "/usr/share/spillway/topologies/dgx-h100.yaml",
          "--node-name", "image-node", "--socket", sock, "--state-dir", f"{work}/state", "--metrics-port", agent_port)
    wait("agent", lambda: os.path.exists(sock) and ok(agent_port, "/readyz"))
    show = subprocess.run(["spillway", "pool", "show", "-o", "json", "--socket", sock], capture_output=True, text=True)
    out["pool_show"] = {"rc": show.returncode, "stdout": show.stdout, "stderr": show.stderr[-2000:]}
    start("deviceplugin", "deviceplugin", "--agent-socket", sock, "--node-name", "image-node", "--no-kubernetes",
          "--kubelet-dir", f"{work}/kubelet/device-plugins",
          "--pod-resources-socket", f"{work}/kubelet/pod-resources/kubelet.sock",
          "--state-dir", f"{work}/dp", "--metrics-port", dp_port)
    wait("deviceplugin", lambda: ok(dp_port, "/healthz"))
    out["deviceplugin"] = "healthy"
    start("operator", "operator", "--kubeconfig", f"{work}/kubeconfig", "--standalone", "--metrics-address",
          "127.0.0.1", "--metrics-port", op_port, "--health-port", "-1")
    wait("operator", lambda: ok(op_port, "/readyz"), within=120)
    out["operator"] = "ready"
finally:
    for p in procs.values():
        p.terminate()
    for name, p in procs.items():
        try:
            out[f"{name}_exit"] = p.wait(timeout=20)
        except subprocess.TimeoutExpired:
            p.kill()
            out[f"{name}_exit"] = "killed"
    with open(f"{work}/out.json", "w") as f:
        json.dump(out, f)
'''


def buildah(*args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    cmd = ["buildah", "--root", str(ROOT / "storage"), "--runroot", str(ROOT / "run"), "--storage-driver", "vfs", *args]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, f"{' '.join(cmd)}:\n{r.stderr[-4000:]}"
    return r


@pytest.fixture(scope="module")
def image() -> str:
    for tool in ("buildah", "mmdebstrap"):
        assert shutil.which(tool), f"{tool} is missing: run hack/system-deps.sh"
    r = subprocess.run([str(REPO / "hack" / "image.sh")], capture_output=True, text=True, timeout=3000, cwd=REPO)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-6000:]
    name = r.stdout.strip().splitlines()[-1]
    assert re.fullmatch(r"localhost/spillway:[0-9a-f]{12}-amd64", name), name
    return name


@pytest.mark.slow
@pytest.mark.timeout(3300)
def test_image_carries_oci_labels_and_runs_as_non_root(image: str) -> None:
    config: dict[str, Any] = json.loads(buildah("inspect", "--type", "image", image).stdout)["OCIv1"]["config"]
    labels = config["Labels"]
    version = re.search(r'^version = "(.+)"$', (REPO / "pyproject.toml").read_text(), re.M)
    assert version and labels["org.opencontainers.image.version"] == version.group(1)
    assert re.fullmatch(r"[0-9a-f]{40}", labels["org.opencontainers.image.revision"]), labels
    assert labels["org.opencontainers.image.source"].startswith("https://")
    assert config["User"] == "65532:65532" and config["Entrypoint"] == ["spillway"]
    # Hash-checked from the lock file: exactly its versions are in the image.
    ctr = buildah("from", "--pull=never", image).stdout.strip()
    try:
        r = buildah("run", "--isolation", "chroot", ctr, "--", "python3", "-c",
                    "import importlib.metadata as m, json; print(json.dumps({d.metadata['Name'].lower(): d.version "
                    "for d in m.distributions()}))")
    finally:
        buildah("rm", ctr)
    installed = json.loads(r.stdout)
    locked = dict(re.findall(r"^([A-Za-z0-9_.-]+)==(\S+)", (REPO / "requirements.lock").read_text(), re.M))
    for name, version_ in installed.items():
        if name == "spillway":
            continue
        key = next((k for k in locked if k.lower().replace("_", "-") == name.replace("_", "-")), None)
        assert key, f"{name} {version_} is in the image but not in requirements.lock"
        assert locked[key] == version_, f"{name}: locked {locked[key]}, image {version_}"
    assert "torch" not in installed and "pip" not in installed and "setuptools" not in installed


@pytest.mark.slow
@pytest.mark.cluster
@pytest.mark.timeout(3300)
def test_agent_device_plugin_and_operator_start_inside_the_image(image: str, cluster: Cluster,
                                                                 tmp_path: Path) -> None:
    for path in sorted((REPO / "crds").glob("*.yaml")):  # the operator watches InferenceTenants
        cluster.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(path))
    cluster.kubectl("wait", "--for=condition=Established", "crd/inferencetenants.spillway.dev", "--timeout=60s")
    work = tmp_path / "work"
    for sub in ("run", "state", "dp", "kubelet/device-plugins", "kubelet/pod-resources"):
        (work / sub).mkdir(parents=True)
    shutil.copy(cluster.kubeconfig, work / "kubeconfig")
    (work / "probe.py").write_text(PROBE)
    for path in [work, *work.rglob("*")]:  # the image runs as uid 65532
        path.chmod(0o777 if path.is_dir() else 0o666)
    for _attempt in range(3):  # a port picked free may be taken before a part binds it (shared host)
        for log in work.glob("*.log"):
            log.unlink()
        ports = [str(free_port()) for _ in range(3)]
        ctr = buildah("from", "--pull=never", image).stdout.strip()
        try:
            # chroot isolation shares the host's network: the operator reaches the API server on
            # 127.0.0.1 as the kubeconfig says, and the probe reaches each part's port.
            r = subprocess.run(
                ["buildah", "--root", str(ROOT / "storage"), "--runroot", str(ROOT / "run"), "--storage-driver",
                 "vfs", "run", "--isolation", "chroot", "--volume", f"{work}:/work", ctr, "--",
                 "python3", "/work/probe.py", "/work", *ports],
                capture_output=True, text=True, timeout=600)
        finally:
            buildah("rm", ctr)
        logs = "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in sorted(work.glob("*.log")))
        if "address already in use" not in logs:
            break
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:] + logs
    out = json.loads((work / "out.json").read_text())
    assert out["uid"] == 65532 and out["gid"] == 65532
    show = out["pool_show"]
    assert show["rc"] == 0, show["stderr"] + logs
    pool = json.loads(show["stdout"])
    assert pool["node_name"] == "image-node" and pool["simulated"] is True and len(pool["gpus"]) == 8
    assert out["deviceplugin"] == "healthy" and out["operator"] == "ready", out
    exits = {n: out[f"{n}_exit"] for n in ("agent", "deviceplugin", "operator")}
    # SIGTERM (what the kubelet sends) stops the agent and the operator cleanly. The device plugin
    # has no SIGTERM handler yet and dies of the signal (-15): still a stop, not a hang.
    assert exits["agent"] == 0 and exits["operator"] == 0 and exits["deviceplugin"] in (0, -15), (exits, logs)

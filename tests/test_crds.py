"""The CRDs against the real API server: examples apply, bad ones are refused with the CEL message."""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime
from pathlib import Path

import pytest
import yaml

from spillway.operator.model import NodeView, TenantSpec
from spillway.testing.cluster import Cluster

ROOT = Path(__file__).resolve().parent.parent
CRDS = sorted((ROOT / "crds").glob("*.yaml"))
TENANTS = sorted((ROOT / "examples" / "tenants").glob("*.yaml"))
INVALID = sorted((ROOT / "examples" / "invalid").glob("*.yaml"))


def _expected(path: Path) -> str:
    match = re.search(r"^# expect: (.+)$", path.read_text(), re.M)
    assert match, f"{path.name} needs a '# expect: <message>' comment"
    return match.group(1).strip()


def _walk(schema: dict, where: str) -> list[str]:
    """Paths of schema nodes (below the top) that lack a description."""
    missing = []
    for name, sub in (schema.get("properties") or {}).items():
        path = f"{where}.{name}"
        if name != "metadata" and not sub.get("description"):
            missing.append(path)
        missing += _walk(sub, path)
    if "items" in schema:
        missing += _walk(schema["items"], f"{where}[]")
    return missing


@pytest.mark.parametrize("path", CRDS, ids=lambda p: p.name)
def test_every_field_has_a_description(path: Path) -> None:
    crd = yaml.safe_load(path.read_text())
    for version in crd["spec"]["versions"]:
        schema = version["schema"]["openAPIV3Schema"]
        assert schema.get("description")
        assert _walk(schema, "") == []


@pytest.mark.parametrize("path", TENANTS, ids=lambda p: p.name)
def test_examples_parse_as_tenant_specs(path: Path) -> None:
    body = yaml.safe_load(path.read_text())
    body["metadata"]["namespace"] = "default"
    spec = TenantSpec.from_resource(body)
    assert spec.memory > 0
    assert spec.image == "spillway/toy-server:0.1.0"


def test_tenant_spec_rejects_what_cel_rejects() -> None:
    for path in INVALID:
        body = yaml.safe_load(path.read_text())
        if path.name in ("negative-replicas.yaml", "priority-out-of-range.yaml"):
            continue  # schema bounds the parser does not repeat (priority) or checks itself (replicas)
        with pytest.raises(ValueError, match="InferenceTenant"):
            TenantSpec.from_resource(body)


def test_nodeview_from_memorypool() -> None:
    obj = {
        "metadata": {"name": "gpu-1"},
        "status": {
            "node": "gpu-1",
            "agentEndpoint": "10.0.0.1:50051",
            "simulated": True,
            "heartbeat": "2026-11-21T17:00:00Z",
            "gpus": [
                {"uuid": "GPU-a", "index": 0, "name": "H100", "totalBytes": 80, "lendableBytes": 70,
                 "headroomBytes": 2, "leasedBytes": 8},
                {"uuid": "GPU-b", "index": 1, "name": "H100", "totalBytes": 80, "lendableBytes": 78},
            ],
            "links": [{"a": "GPU-a", "b": "GPU-b", "nvlink": True, "count": 18}],
        },
    }
    node = NodeView.from_memorypool(obj)
    assert node.name == "gpu-1" and node.simulated and node.endpoint == "10.0.0.1:50051"
    assert [g.lendable for g in node.gpus] == [70, 78]
    assert node.gpus[0].leased == 8 and node.gpus[0].headroom == 2
    assert node.nvlinked("GPU-a", "GPU-b") and node.nvlinked("GPU-b", "GPU-a")
    assert not node.nvlinked("GPU-a", "GPU-a")
    assert node.heartbeat == datetime(2026, 11, 21, 17, tzinfo=UTC).timestamp()
    with pytest.raises(ValueError, match="MemoryPool gpu-1"):
        NodeView.from_memorypool({"metadata": {"name": "gpu-1"}, "status": {"gpus": [{"index": 0}]}})


@pytest.fixture(scope="module")
def crds(cluster: Cluster) -> Cluster:
    for path in CRDS:
        cluster.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(path))
    for name in ("inferencetenants.spillway.dev", "memorypools.spillway.dev"):
        cluster.kubectl("wait", "--for=condition=Established", f"crd/{name}", "--timeout=60s")
    return cluster


@pytest.mark.cluster
def test_examples_apply_and_columns_show(crds: Cluster, k8s_namespace: str) -> None:
    for path in TENANTS:
        crds.kubectl("apply", "-n", k8s_namespace, "-f", str(path))
    out = crds.kubectl("get", "it", "-n", k8s_namespace).stdout
    header = out.splitlines()[0].split()
    assert header == ["NAME", "REPLICAS", "READY", "PHASE", "PEER-MEM", "TTFT-P99", "TBT-P99", "SLO", "AGE"]
    assert len(out.splitlines()) == 1 + len(TENANTS)
    # Defaults are filled in by the API server.
    whisper = crds.get_json("inferencetenant", "whisper", "-n", k8s_namespace)
    assert whisper["spec"]["slo"]["percentile"] == 99
    assert whisper["spec"]["slo"]["window"] == "5m"
    assert whisper["spec"]["model"]["port"] == 8000
    # Every applied example parses as the operator will read it.
    items = crds.get_json("inferencetenants", "-n", k8s_namespace)["items"]
    specs = {TenantSpec.from_resource(i).name: TenantSpec.from_resource(i) for i in items}
    assert specs["llama-70b-chat"].peer_request == 20 << 30 and specs["llama-70b-chat"].ttft_s == 0.5
    # The category lists both kinds.
    crds.kubectl("get", "spillway", "-n", k8s_namespace)


@pytest.mark.cluster
@pytest.mark.parametrize("path", INVALID, ids=lambda p: p.name)
def test_invalid_examples_are_refused(crds: Cluster, k8s_namespace: str, path: Path) -> None:
    result = crds.kubectl("apply", "-n", k8s_namespace, "-f", str(path), check=False)
    assert result.returncode != 0, f"{path.name} was accepted"
    assert _expected(path) in result.stderr, result.stderr
    name = yaml.safe_load(path.read_text())["metadata"]["name"]
    gone = crds.kubectl("get", "it", name, "-n", k8s_namespace, check=False)
    assert gone.returncode != 0


@pytest.mark.cluster
def test_scale_subresource(crds: Cluster, k8s_namespace: str) -> None:
    crds.kubectl("apply", "-n", k8s_namespace, "-f", str(ROOT / "examples/tenants/sdxl.yaml"))
    crds.kubectl("scale", "-n", k8s_namespace, "it/sdxl", "--replicas=5")
    assert crds.get_json("it", "sdxl", "-n", k8s_namespace)["spec"]["replicas"] == 5


@pytest.mark.cluster
def test_explain_teaches_the_api(crds: Cluster) -> None:
    out = crds.kubectl("explain", "inferencetenant.spec.peerMemory").stdout
    assert "Peer HBM this tenant borrows" in out
    for field in ("request", "limit", "fallback"):
        assert re.search(rf"^\s+{field}\s", out, re.M), out
    fallback = " ".join(crds.kubectl("explain", "it.spec.peerMemory.fallback").stdout.split())
    assert "HostMemory runs the replica anyway" in fallback
    assert "heartbeat" in crds.kubectl("explain", "memorypool.status").stdout


@pytest.mark.cluster
def test_memorypool_columns(crds: Cluster) -> None:
    name = "crd-test-node"
    crds.kubectl("delete", "memorypool", name, "--ignore-not-found")
    crds.kubectl("apply", "-f", "-", input=yaml.safe_dump(
        {"apiVersion": "spillway.dev/v1alpha1", "kind": "MemoryPool", "metadata": {"name": name}, "spec": {}}))
    status = {
        "status": {
            "node": name, "simulated": True, "backend": "simulated",
            "gpus": [{"uuid": "GPU-x", "index": 0, "name": "H100", "totalBytes": 80 << 30, "lendableBytes": 60 << 30}],
            "totals": {"gpus": 1, "totalBytes": 80 << 30, "lendableBytes": 60 << 30, "leasedBytes": 0,
                       "total": "80Gi", "lendable": "60Gi", "leased": "0", "leases": 0},
            "agentEndpoint": "10.0.0.9:7443", "heartbeat": "2026-11-30T17:00:00Z",
            "conditions": [
                {"type": "Ready", "status": "True", "reason": "Publishing", "message": "ok",
                 "lastTransitionTime": "2026-11-30T17:00:00Z"},
                {"type": "Stale", "status": "False", "reason": "HeartbeatCurrent", "message": "ok",
                 "lastTransitionTime": "2026-11-30T17:00:00Z"}],
        }
    }

    crds.kubectl("patch", "memorypool", name, "--subresource=status", "--type=merge", "-p", json.dumps(status))
    out = crds.kubectl("get", "memorypools", name).stdout.splitlines()
    assert out[0].split() == ["NAME", "GPUS", "TOTAL", "LENDABLE", "LEASED", "READY", "SIMULATED", "AGE"]
    assert out[1].split()[:7] == [name, "1", "80Gi", "60Gi", "0", "True", "true"]
    wide = crds.kubectl("get", "memorypools", name, "-o", "wide").stdout.splitlines()
    assert wide[0].split()[8:] == ["LEASES", "BACKEND", "ENDPOINT", "HEARTBEAT"]
    assert wide[1].split()[8:11] == ["0", "simulated", "10.0.0.9:7443"]
    # The docs name the same columns.
    ref = (ROOT / "docs" / "crd-reference.md").read_text()
    assert "`kubectl get memorypools` columns: `" + " ".join(out[0].split()) + "`" in ref
    assert "`-o wide` adds `" + " ".join(wide[0].split()[8:]) + "`" in ref
    crds.kubectl("wait", "--for=condition=Ready", f"memorypool/{name}", "--timeout=5s")
    bad = {"type": "Ready", "status": "Maybe", "reason": "X", "message": "",
           "lastTransitionTime": "2026-11-30T17:00:00Z"}
    refused = crds.kubectl("patch", "memorypool", name, "--subresource=status", "--type=merge", "-p",
                           json.dumps({"status": {"conditions": [bad]}}), check=False)
    assert refused.returncode != 0 and "Unsupported value" in refused.stderr
    node = NodeView.from_memorypool(crds.get_json("memorypool", name))
    assert node.simulated and node.gpus[0].lendable == 60 << 30
    crds.kubectl("delete", "memorypool", name)

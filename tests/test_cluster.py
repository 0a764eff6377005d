"""The local control plane does what the other tests rely on: real CRDs, scheduling of
extended resources onto kwok nodes, garbage collection, RBAC, helm, and a quick warm start."""

from __future__ import annotations

import json
import os
import socket
import textwrap
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from spillway.testing.cluster import Cluster, CommandError, wait_until
from tests.fixtures_cluster import AddNode

pytestmark = pytest.mark.cluster

GPU_PRODUCT = "NVIDIA-H100-80GB-HBM3"


def pod(
    name: str, requests: dict[str, str], *, selector: dict[str, str] | None = None, owner: dict[str, str] | None = None
) -> dict[str, Any]:
    manifest: dict[str, Any] = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name},
        "spec": {
            "containers": [
                {
                    "name": "main",
                    "image": "example.invalid/model-server:1",
                    # Extended resources are set as limits (requests default to them).
                    "resources": {"limits": requests},
                }
            ],
            "nodeSelector": selector or {},
            "terminationGracePeriodSeconds": 0,
        },
    }
    if owner:
        manifest["metadata"]["ownerReferences"] = [owner]
    return manifest


def test_crd_apply_then_object_then_get(cluster: Cluster, k8s_namespace: str, tmp_path: Path) -> None:
    group = f"t{uuid.uuid4().hex[:6]}.spillway.dev"
    crd = tmp_path / "crd.yaml"
    crd.write_text(
        textwrap.dedent(f"""\
        apiVersion: apiextensions.k8s.io/v1
        kind: CustomResourceDefinition
        metadata:
          name: widgets.{group}
        spec:
          group: {group}
          scope: Namespaced
          names: {{plural: widgets, singular: widget, kind: Widget}}
          versions:
          - name: v1
            served: true
            storage: true
            schema:
              openAPIV3Schema:
                type: object
                properties:
                  spec:
                    type: object
                    properties:
                      size: {{type: integer, minimum: 1}}
            additionalPrinterColumns:
            - {{name: Size, type: integer, jsonPath: .spec.size}}
        """)
    )
    cluster.kubectl("apply", "-f", str(crd))
    cluster.kubectl("wait", "--for=condition=Established", f"crd/widgets.{group}", "--timeout=30s")

    obj = tmp_path / "widget.yaml"
    obj.write_text(f"apiVersion: {group}/v1\nkind: Widget\nmetadata: {{name: w1}}\nspec: {{size: 3}}\n")
    cluster.kubectl("apply", "-n", k8s_namespace, "-f", str(obj))

    got = cluster.get_json(f"widgets.{group}", "w1", "-n", k8s_namespace)
    assert got["spec"] == {"size": 3}
    table = cluster.kubectl("get", f"widgets.{group}", "-n", k8s_namespace).stdout
    assert table.split() == ["NAME", "SIZE", "w1", "3"]

    # The schema is enforced by the API server: a size of 0 is refused.
    bad = cluster.kubectl(
        "apply",
        "-n",
        k8s_namespace,
        "-f",
        "-",
        check=False,
        input=obj.read_text().replace("size: 3", "size: 0").replace("w1", "w2"),
    )
    assert bad.returncode != 0 and "spec.size" in bad.stderr
    cluster.kubectl("delete", "crd", f"widgets.{group}", "--wait=false")


def test_gpu_pod_is_bound_to_the_node_that_has_the_resources(
    cluster: Cluster, k8s_namespace: str, kwok_nodes: AddNode
) -> None:
    tag = {"spillway.dev/test": uuid.uuid4().hex[:8]}
    cpu_node = kwok_nodes({}, labels=tag, prefix="cpu")
    gpu_node = kwok_nodes(
        {"nvidia.com/gpu": "8", "spillway.dev/peer-hbm": "400"},
        labels={**tag, "nvidia.com/gpu.product": GPU_PRODUCT},
        prefix="gpu",
    )
    node = cluster.get_json("node", gpu_node)
    assert node["status"]["allocatable"]["nvidia.com/gpu"] == "8"
    assert node["metadata"]["labels"]["nvidia.com/gpu.product"] == GPU_PRODUCT

    cluster.apply(
        pod("borrower", {"nvidia.com/gpu": "1", "spillway.dev/peer-hbm": "16"}, selector=tag), namespace=k8s_namespace
    )
    cluster.kubectl(
        "wait", "-n", k8s_namespace, "pod/borrower", "--for=jsonpath={.status.phase}=Running", "--timeout=30s"
    )
    got = cluster.get_json("pod", "borrower", "-n", k8s_namespace)
    assert got["spec"]["nodeName"] == gpu_node != cpu_node
    assert {c["type"]: c["status"] for c in got["status"]["conditions"]}["Ready"] == "True"


def test_pod_that_asks_too_much_stays_pending(cluster: Cluster, k8s_namespace: str, kwok_nodes: AddNode) -> None:
    tag = {"spillway.dev/test": uuid.uuid4().hex[:8]}
    kwok_nodes({"nvidia.com/gpu": "8"}, labels=tag, prefix="gpu")
    cluster.apply(pod("greedy", {"nvidia.com/gpu": "9"}, selector=tag), namespace=k8s_namespace)

    def failed_scheduling() -> dict[str, Any] | None:
        events = cluster.get_json(
            "events", "-n", k8s_namespace, "--field-selector=involvedObject.name=greedy,reason=FailedScheduling"
        )
        return events["items"][0] if events["items"] else None

    event = wait_until(failed_scheduling, timeout=30, what="a FailedScheduling event")
    assert "Insufficient nvidia.com/gpu" in event["message"]
    got = cluster.get_json("pod", "greedy", "-n", k8s_namespace)
    assert got["status"]["phase"] == "Pending" and not got["spec"].get("nodeName")
    scheduled = next(c for c in got["status"]["conditions"] if c["type"] == "PodScheduled")
    assert (scheduled["status"], scheduled["reason"]) == ("False", "Unschedulable")


def test_deleting_the_owner_deletes_its_pods(cluster: Cluster, k8s_namespace: str, kwok_nodes: AddNode) -> None:
    tag = {"spillway.dev/test": uuid.uuid4().hex[:8]}
    kwok_nodes({"nvidia.com/gpu": "2"}, labels=tag)
    cluster.kubectl("create", "configmap", "owner", "-n", k8s_namespace)
    uid = cluster.get_json("configmap", "owner", "-n", k8s_namespace)["metadata"]["uid"]
    owner = {"apiVersion": "v1", "kind": "ConfigMap", "name": "owner", "uid": uid}
    for i in range(2):
        cluster.apply(pod(f"child-{i}", {"nvidia.com/gpu": "1"}, selector=tag, owner=owner), namespace=k8s_namespace)
    cluster.kubectl(
        "wait",
        "-n",
        k8s_namespace,
        "pod/child-0",
        "pod/child-1",
        "--for=jsonpath={.status.phase}=Running",
        "--timeout=30s",
    )

    cluster.kubectl("delete", "configmap", "owner", "-n", k8s_namespace)
    wait_until(
        lambda: not cluster.get_json("pods", "-n", k8s_namespace)["items"],
        timeout=30,
        what="the garbage collector to delete the owned pods",
    )


def test_deployment_pods_run(cluster: Cluster, k8s_namespace: str, kwok_nodes: AddNode) -> None:
    tag = {"spillway.dev/test": uuid.uuid4().hex[:8]}
    kwok_nodes({}, labels=tag)
    cluster.kubectl("create", "deployment", "web", "-n", k8s_namespace, "--image=example.invalid/web:1", "--replicas=3")
    cluster.kubectl(
        "patch",
        "deployment",
        "web",
        "-n",
        k8s_namespace,
        "--type=merge",
        "-p",
        json.dumps({"spec": {"template": {"spec": {"nodeSelector": tag}}}}),
    )
    cluster.kubectl("rollout", "status", "deployment/web", "-n", k8s_namespace, "--timeout=60s")


def test_service_account_needs_a_role(cluster: Cluster, k8s_namespace: str) -> None:
    ns = k8s_namespace
    cluster.kubectl("create", "serviceaccount", "reader", "-n", ns)
    kubeconfig = cluster.kubeconfig_for_service_account(ns, "reader")

    refused = cluster.kubectl("get", "pods", "-n", ns, kubeconfig=kubeconfig, check=False)
    assert refused.returncode != 0
    assert "forbidden" in refused.stderr.lower() and f"system:serviceaccount:{ns}:reader" in refused.stderr
    who = f"system:serviceaccount:{ns}:reader"
    assert cluster.kubectl("auth", "can-i", "list", "pods", "-n", ns, as_user=who, check=False).stdout.strip() == "no"

    cluster.kubectl("create", "role", "pod-reader", "-n", ns, "--verb=get,list,watch", "--resource=pods")
    cluster.kubectl("create", "rolebinding", "reader", "-n", ns, "--role=pod-reader", f"--serviceaccount={ns}:reader")
    wait_until(
        lambda: cluster.kubectl("get", "pods", "-n", ns, kubeconfig=kubeconfig, check=False).returncode == 0,
        timeout=10,
        what="the RoleBinding to take effect",
    )
    assert cluster.kubectl("auth", "can-i", "list", "pods", "-n", ns, as_user=who).stdout.strip() == "yes"
    # Only what the Role grants: still no pods in another namespace, no creating.
    with pytest.raises(CommandError, match="forbidden"):
        cluster.kubectl("get", "pods", "-n", "default", kubeconfig=kubeconfig)
    with pytest.raises(CommandError, match="forbidden"):
        cluster.kubectl("create", "configmap", "x", "-n", ns, kubeconfig=kubeconfig)


def test_helm_installs_a_chart(cluster: Cluster, k8s_namespace: str, tmp_path: Path) -> None:
    chart = tmp_path / "hello"
    (chart / "templates").mkdir(parents=True)
    (chart / "Chart.yaml").write_text("apiVersion: v2\nname: hello\nversion: 0.1.0\n")
    (chart / "values.yaml").write_text("greeting: hi\n")
    (chart / "templates" / "cm.yaml").write_text(
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: {{ .Release.Name }}-cm\n"
        "data:\n  greeting: {{ .Values.greeting | quote }}\n"
    )
    cluster.helm("install", "hello", str(chart), "-n", k8s_namespace, "--set", "greeting=hello", "--wait")
    cm = cluster.get_json("configmap", "hello-cm", "-n", k8s_namespace)
    assert cm["data"] == {"greeting": "hello"}
    assert "hello" in cluster.helm("list", "-n", k8s_namespace).stdout
    cluster.helm("uninstall", "hello", "-n", k8s_namespace, "--wait")
    assert cluster.kubectl("get", "configmap", "hello-cm", "-n", k8s_namespace, check=False).returncode != 0


def _port_free(port: int) -> bool:
    """No one listens on the port (closed connections may linger in TIME_WAIT; servers reuse)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def test_warm_start_is_quick_and_stop_leaves_nothing(
    cluster: Cluster, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    second = Cluster(tmp_path / "second", cluster.bin_dir)
    t0 = time.monotonic()
    second.start()
    elapsed = time.monotonic() - t0
    pids = [c.pid for c in second._components]
    ports = dict(second.ports)
    try:
        assert second.kubectl("get", "--raw=/readyz").stdout == "ok"
    finally:
        second.stop()
    with capsys.disabled():
        print(
            f"\nwarm start of the control plane: {elapsed:.1f} s (session cluster: {cluster.startup_seconds:.1f} s)"
            f" on {os.cpu_count()} CPUs"
        )
    assert elapsed < 20, f"warm start took {elapsed:.1f} s"
    for pid in pids:
        assert pid is not None and not Path(f"/proc/{pid}").exists(), f"process {pid} still there"
    for name, port in ports.items():
        assert _port_free(port), f"port {port} ({name}) still in use"

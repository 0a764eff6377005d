"""The Helm chart (charts/spillway) against the real helm, kubectl and kube-apiserver.

Without a cluster: the CRD copies match crds/, and the sync script notices drift. With the
control-plane binaries (helm comes from there): lint, schema refusals, the rendered command
lines parse with the real `spillway` CLI, the Helm-made certificates carry mutual TLS to a real
agent, every example renders and passes a server-side dry run, and install / upgrade /
uninstall work, with each ServiceAccount allowed exactly what its part needs.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import importlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from spillway.testing.agentproc import AgentProcess
from spillway.testing.cluster import Cluster, ensure_binaries, wait_until

REPO = Path(__file__).resolve().parents[1]
CHART = REPO / "charts" / "spillway"
EXAMPLES = sorted((REPO / "examples" / "values").glob("*.yaml"))
CHART_ONLY_CRDS = {"kopf-peerings.yaml"}


# --- helpers -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def helm(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """Runs the harness's helm (no cluster), with its state in a temporary directory."""
    binary = ensure_binaries() / "helm"
    home = tmp_path_factory.mktemp("helm-home")
    env = {**os.environ, "HELM_CONFIG_HOME": str(home / "c"), "HELM_CACHE_HOME": str(home / "k"),
           "HELM_DATA_HOME": str(home / "d"), "KUBECONFIG": str(home / "none")}

    def run(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        result = subprocess.run([str(binary), *args], capture_output=True, text=True, env=env, timeout=120)
        if check and result.returncode != 0:
            raise AssertionError(f"helm {' '.join(args)} failed:\n{result.stderr}")
        return result

    return run


def docs(text: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(text) if d]


def render(helm: Any, *args: str) -> list[dict[str, Any]]:
    return docs(helm("template", "sw", str(CHART), "-n", "spillway-system", *args).stdout)


def find(objs: list[dict[str, Any]], kind: str, suffix: str = "") -> dict[str, Any]:
    hits = [o for o in objs if o["kind"] == kind and o["metadata"]["name"].endswith(suffix)]
    assert len(hits) == 1, f"expected one {kind} *{suffix}, got {[o['metadata']['name'] for o in hits]}"
    return hits[0]


def cli_parser() -> argparse.ArgumentParser:
    """The real `spillway` parser, with every component's commands (whether or not
    spillway/cli.py lists them yet)."""
    from spillway import cli

    parser = argparse.ArgumentParser(prog="spillway")
    parser.add_argument("--log-level")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("spillway.agent.cli", "spillway.deviceplugin.cli", "spillway.operator.cli"):
        importlib.import_module(name).add_commands(sub)
    assert cli.build_parser() is not None
    return parser


# --- CRDs ----------------------------------------------------------------------------------


def test_chart_crds_are_byte_identical_copies() -> None:
    sources = sorted((REPO / "crds").glob("*.yaml"))
    assert sources, "crds/ has no CRDs"
    for src in sources:
        copy = CHART / "crds" / src.name
        assert copy.is_file(), f"{copy} missing: run hack/sync-crds.sh"
        assert copy.read_bytes() == src.read_bytes(), f"{copy} drifted from {src}: run hack/sync-crds.sh"
    extra = {p.name for p in (CHART / "crds").glob("*.yaml")} - {p.name for p in sources}
    assert extra == CHART_ONLY_CRDS
    names = [d["metadata"]["name"] for p in sorted((CHART / "crds").glob("*.yaml")) for d in docs(p.read_text())]
    assert len(names) == len(set(names)), f"a CRD is defined twice in the chart: {names}"
    assert {"clusterkopfpeerings.kopf.dev", "kopfpeerings.kopf.dev"} <= set(names)
    assert subprocess.run([str(REPO / "hack" / "sync-crds.sh"), "--check"], capture_output=True).returncode == 0


def test_sync_crds_check_notices_drift_and_sync_repairs_it(tmp_path: Path) -> None:
    tree = tmp_path / "repo"
    (tree / "hack").mkdir(parents=True)
    shutil.copy(REPO / "hack" / "sync-crds.sh", tree / "hack")
    shutil.copytree(REPO / "crds", tree / "crds")
    shutil.copytree(CHART / "crds", tree / "charts" / "spillway" / "crds")
    script = tree / "hack" / "sync-crds.sh"
    target = tree / "charts" / "spillway" / "crds" / "memorypool.yaml"
    target.write_text(target.read_text() + "# edited by hand\n")
    (tree / "charts" / "spillway" / "crds" / "stray.yaml").write_text("kind: Nothing\n")

    check = subprocess.run([str(script), "--check"], capture_output=True, text=True)
    assert check.returncode == 1
    assert "memorypool.yaml differs" in check.stderr and "stray.yaml has no source" in check.stderr
    assert "# edited by hand" in target.read_text(), "--check must change nothing"

    assert subprocess.run([str(script)], capture_output=True).returncode == 0
    assert target.read_bytes() == (REPO / "crds" / "memorypool.yaml").read_bytes()
    assert not (tree / "charts" / "spillway" / "crds" / "stray.yaml").exists()
    assert (tree / "charts" / "spillway" / "crds" / "kopf-peerings.yaml").exists()
    assert subprocess.run([str(script), "--check"], capture_output=True).returncode == 0


# --- helm without a cluster ------------------------------------------------------------------


@pytest.mark.cluster
@pytest.mark.parametrize("values", [None, *EXAMPLES], ids=lambda p: p.name if p else "defaults")
def test_helm_lint_strict(helm: Any, values: Path | None) -> None:
    args = ["lint", "--strict", str(CHART)] + (["-f", str(values)] if values else [])
    result = helm(*args, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 chart(s) failed" in result.stdout


BAD_VALUES = [
    ("devicePlugin.unit=-1Gi", "/devicePlugin/unit"),
    ("devicePlugin.unit=0", "/devicePlugin/unit"),
    ("agent.headroomMin=-2Gi", "/agent/headroomMin"),
    ("agent.granularity=-64Mi", "/agent/granularity"),
    ("devicePlugin.deviceListStrategy=mig", "/devicePlugin/deviceListStrategy"),
    ("agent.backend=cuda", "/agent/backend"),
    ("image.repository=", "/image/repository"),
    ("image.repository=null", "/image"),
    ("operator.replicas=-1", "/operator/replicas"),
    ("agent.defaultTtl=soon", "/agent/defaultTtl"),
    ("node.hostPaths.stateDir=var/lib/spillway", "/node/hostPaths/stateDir"),
    ("devicePlugin.unti=2Gi", "/devicePlugin"),
    ("tls.agentServerName=Spillway_Agent", "/tls/agentServerName"),
    ("tls.agentServerName=", "/tls/agentServerName"),
    ("openshift.enabled=maybe", "/openshift/enabled"),
    ("namespaceOverride=Spillway_NS", "/namespaceOverride"),
    ("node.waitForDriver.validationFile=run/nvidia/ready", "/node/waitForDriver/validationFile"),
    ("node.gpuNodeLabels[0].operator=Has", "/node/gpuNodeLabels/0/operator"),
]


@pytest.mark.cluster
@pytest.mark.parametrize(("setting", "field"), BAD_VALUES, ids=[b[0] for b in BAD_VALUES])
def test_schema_refuses_bad_values_naming_the_field(helm: Any, setting: str, field: str) -> None:
    result = helm("template", "sw", str(CHART), "--set", setting, check=False)
    assert result.returncode != 0, f"{setting} was accepted"
    assert "values don't meet the specifications of the schema" in result.stderr
    assert f"at '{field}'" in result.stderr, result.stderr
    assert result.stdout == "", "nothing may render from refused values"


@pytest.mark.cluster
def test_defaults_render_every_part(helm: Any) -> None:
    objs = render(helm)
    kinds = sorted(o["kind"] for o in objs)
    for kind in ("Deployment", "DaemonSet", "ClusterRole", "ServiceAccount", "Service", "Secret", "ConfigMap", "Pod"):
        assert kind in kinds
    # No Prometheus-operator objects without its CRDs; no PDB or peering with one replica.
    assert not {"ServiceMonitor", "PrometheusRule", "PodDisruptionBudget", "ClusterKopfPeering"} & set(kinds)
    op = find(objs, "Deployment", "-operator")["spec"]["template"]["spec"]["containers"][0]
    assert "--standalone" in op["args"]
    assert op["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert op["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert op["image"] == "spillway/spillway:" + yaml.safe_load((CHART / "Chart.yaml").read_text())["appVersion"]
    ds = find(objs, "DaemonSet")["spec"]["template"]["spec"]
    assert [c["name"] for c in ds["containers"]] == ["agent", "deviceplugin"]
    assert ds["automountServiceAccountToken"] is False and ds["hostPID"] is True
    # GPU nodes by NFD's or GFD's labels or GKE's (one term each: ORed), as NVIDIA's chart does.
    assert "nodeSelector" not in ds
    terms = ds["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
    assert [t["matchExpressions"][0]["key"] for t in terms] == [
        "feature.node.kubernetes.io/pci-10de.present", "feature.node.kubernetes.io/cpu-model.vendor_id",
        "nvidia.com/gpu.present", "cloud.google.com/gke-accelerator"]
    assert all(len(t["matchExpressions"]) == 1 for t in terms)
    assert {t["key"] for t in ds["tolerations"]} == {"nvidia.com/gpu", "CriticalAddonsOnly"}
    # The agent waits for the driver (NVML) in an init container instead of crash-looping.
    (init,) = ds["initContainers"]
    assert init["name"] == "wait-for-driver" and "pynvml.nvmlInit()" in init["command"][-1]
    assert init["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    assert {e["name"]: e.get("value") for e in init["env"]}["NVIDIA_VISIBLE_DEVICES"] == "all"
    paths = {v["hostPath"]["path"] for v in ds["volumes"] if "hostPath" in v}
    assert paths == {"/var/lib/kubelet/device-plugins", "/var/lib/kubelet/pod-resources", "/var/lib/spillway",
                     "/run/spillway"}
    env = {e["name"]: e for e in ds["containers"][0]["env"]}
    assert env["NODE_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"
    assert env["POD_NAMESPACE"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.namespace"  # heartbeat Lease
    assert not [o for o in objs if o["kind"] in ("SecurityContextConstraints", "Namespace")]
    dashboards = [o for o in objs
                  if o["kind"] == "ConfigMap" and o["metadata"]["labels"].get("grafana_dashboard") == "1"]
    assert len(dashboards) == 3
    for cm in dashboards:
        (text,) = cm["data"].values()
        assert json.loads(text)["panels"]


@pytest.mark.cluster
def test_ha_monitoring_and_cert_manager_render(helm: Any) -> None:
    objs = render(helm, "--set", "operator.replicas=2", "--set", "certManager.enabled=true",
                  "--set", "node.runtimeClassName=nvidia", "--api-versions", "monitoring.coreos.com/v1")
    kinds = [o["kind"] for o in objs]
    assert kinds.count("ServiceMonitor") == 2 and kinds.count("PrometheusRule") == 1
    assert kinds.count("Certificate") == 3 and kinds.count("Issuer") == 2
    assert "PodDisruptionBudget" in kinds and "ClusterKopfPeering" in kinds
    assert not [o for o in objs if o["kind"] == "Secret" and o["type"] == "kubernetes.io/tls"], \
        "with cert-manager, Helm makes no certificates"
    op = find(objs, "Deployment", "-operator")
    assert "--peering=sw-spillway" in op["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "--agent-server-name=spillway-agent" in op["spec"]["template"]["spec"]["containers"][0]["args"]
    agent_cert = find(objs, "Certificate", "-agent-tls")["spec"]
    assert agent_cert["dnsNames"] == AGENT_SANS and agent_cert["commonName"] == "spillway-agent"
    assert find(objs, "DaemonSet")["spec"]["template"]["spec"]["runtimeClassName"] == "nvidia"
    rule = find(objs, "PrometheusRule")
    plain = yaml.safe_load((CHART / "rules" / "spillway.rules.yaml").read_text())
    assert [g["name"] for g in rule["spec"]["groups"]] == [g["name"] for g in plain["groups"]]


# The agent certificate's DNS names for release "sw" in namespace spillway-system, defaults.
AGENT_SANS = ["spillway-agent", "sw-spillway-agent", "sw-spillway-agent.spillway-system",
              "sw-spillway-agent.spillway-system.svc", "sw-spillway-agent.spillway-system.svc.cluster.local"]


@pytest.mark.cluster
def test_selection_values_registry_namespace_and_security_contexts(helm: Any) -> None:
    """gpuNodeLabels: [] drops the GPU-label rule, an affinity of one's own replaces it, the
    driver wait follows the backend; global.imageRegistry prefixes every image;
    namespaceOverride moves every namespaced object; security contexts are values."""
    objs = render(helm, "--set", "node.gpuNodeLabels=null", "--set", "node.nodeSelector.pool=gpu",
                  "--set", "agent.backend=simulated")
    ds = find(objs, "DaemonSet")["spec"]["template"]["spec"]
    assert "affinity" not in ds and ds["nodeSelector"] == {"pool": "gpu"} and "initContainers" not in ds
    own = {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
        {"matchExpressions": [{"key": "gpu", "operator": "Exists"}]}]}}}
    objs = render(helm, "--set-json", f"node.affinity={json.dumps(own)}", "--set",
                  "node.waitForDriver.validationFile=/run/nvidia/validations/driver-ready")
    ds = find(objs, "DaemonSet")["spec"]["template"]["spec"]
    assert ds["affinity"] == own
    assert "/run/nvidia/validations/driver-ready" in ds["initContainers"][0]["command"][-1]
    assert ds["initContainers"][0]["volumeMounts"] == [
        {"name": "driver-validations", "mountPath": "/run/nvidia/validations", "readOnly": True}]
    assert {"name": "driver-validations", "hostPath": {"path": "/run/nvidia/validations",
                                                         "type": "DirectoryOrCreate"}} in ds["volumes"]

    objs = render(helm, "--set", "global.imageRegistry=mirror.example:5000/", "--set", "namespaceOverride=gpu-infra",
                  "--set", "operator.podSecurityContext.runAsUser=1001", "--set", "agent.securityContext.runAsUser=7")
    images = {c["image"] for o in objs if o["kind"] in ("Deployment", "DaemonSet", "Pod")
              for spec in [o["spec"] if o["kind"] == "Pod" else o["spec"]["template"]["spec"]]
              for c in spec["containers"] + spec.get("initContainers", [])}
    assert images == {"mirror.example:5000/spillway/spillway:" + yaml.safe_load(
        (CHART / "Chart.yaml").read_text())["appVersion"]}
    namespaced = [o for o in objs if o["kind"] not in ("ClusterRole", "ClusterRoleBinding")]
    assert {o["metadata"].get("namespace") for o in namespaced} == {"gpu-infra"}
    subjects = {s["namespace"] for o in objs if "Binding" in o["kind"] for s in o["subjects"]}
    assert subjects == {"gpu-infra"}
    op = find(objs, "Deployment", "-operator")["spec"]["template"]["spec"]
    assert op["securityContext"]["runAsUser"] == 1001 and op["securityContext"]["runAsNonRoot"] is True
    assert find(objs, "DaemonSet")["spec"]["template"]["spec"]["containers"][0]["securityContext"]["runAsUser"] == 7


@pytest.mark.cluster
def test_openshift_gets_its_scc_and_no_fixed_user_ids(helm: Any) -> None:
    for args in (["--set", "openshift.enabled=true"],
                 ["--api-versions", "security.openshift.io/v1/SecurityContextConstraints"]):  # auto
        objs = render(helm, *args)
        scc = find(objs, "SecurityContextConstraints")
        assert scc["allowHostPID"] is True and scc["allowHostDirVolumePlugin"] is True
        assert scc["allowPrivilegedContainer"] is False and scc["allowHostNetwork"] is False
        assert scc["requiredDropCapabilities"] == ["ALL"] and scc["allowedCapabilities"] == []
        role = find(objs, "ClusterRole", "-node-scc")
        assert role["rules"] == [{"apiGroups": ["security.openshift.io"], "resources": ["securitycontextconstraints"],
                                  "resourceNames": [scc["metadata"]["name"]], "verbs": ["use"]}]
        binding = find(objs, "RoleBinding", "-node-scc")
        pod_sa = find(objs, "DaemonSet")["spec"]["template"]["spec"]["serviceAccountName"]
        assert binding["subjects"][0]["name"] == pod_sa
        for kind, suffix in (("Deployment", "-operator"), ("Pod", "-test-agents")):
            obj = find(objs, kind, suffix)
            spec = obj["spec"] if kind == "Pod" else obj["spec"]["template"]["spec"]
            assert "runAsUser" not in spec["securityContext"] and "runAsGroup" not in spec["securityContext"]
            assert spec["securityContext"]["runAsNonRoot"] is True
    assert not [o for o in render(helm) if o["kind"] == "SecurityContextConstraints"]


@pytest.mark.cluster
def test_create_namespace_needs_a_namespace_of_its_own(helm: Any) -> None:
    r = helm("template", "sw", str(CHART), "-n", "spillway-system", "--set", "podSecurity.createNamespace=true",
             check=False)
    assert r.returncode != 0 and "set namespaceOverride" in r.stderr and r.stdout == ""
    objs = render(helm, "--set", "podSecurity.createNamespace=true", "--set", "namespaceOverride=spillway-nodes")
    ns = find(objs, "Namespace")
    assert ns["metadata"]["name"] == "spillway-nodes"
    assert ns["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "privileged"


def _container_argv(container: dict[str, Any], env: dict[str, str], bin_dir: Path) -> list[str]:
    """What the container would run after the entry point `spillway`: Kubernetes $(VAR)
    expansion by hand; a `command` (the agent's sh -c wrapper) is run by the real /bin/sh with
    a stand-in `spillway` on PATH (`bin_dir`) that prints its arguments."""
    args = []
    for a in container["args"]:
        for k, v in env.items():
            a = a.replace(f"$({k})", v)
        args.append(a)
    if container.get("command"):
        fake = bin_dir / "spillway"
        if not fake.exists():
            fake.write_text('#!/bin/sh\nprintf "%s\\n" "$@"\n')
            fake.chmod(0o755)
        out = subprocess.run([*container["command"], *args], capture_output=True, text=True, check=True,
                             env={"PATH": f"{bin_dir}:/usr/bin:/bin", **env})
        return out.stdout.splitlines()
    return args


@pytest.mark.cluster
@pytest.mark.parametrize("values", [None, *EXAMPLES], ids=lambda p: p.name if p else "defaults")
def test_rendered_command_lines_parse_with_the_real_cli(helm: Any, values: Path | None, tmp_path: Path) -> None:
    """Every container's command line parses; the agent advertises its pod IP (IPv6 in
    brackets), and the operator checks the name that the agent certificate carries."""
    from cryptography import x509

    objs = render(helm, *(["-f", str(values)] if values else []))
    parser = cli_parser()
    seen = set()
    for pod_ip, endpoint in (("10.1.2.3", "10.1.2.3:7443"), ("fd00:10:244::3", "[fd00:10:244::3]:7443")):
        env = {"NODE_NAME": "gpu-0", "POD_IP": pod_ip}
        for obj in objs:
            if obj["kind"] not in ("Deployment", "DaemonSet", "Pod"):
                continue
            spec = obj["spec"] if obj["kind"] == "Pod" else obj["spec"]["template"]["spec"]
            for c in spec["containers"]:
                argv = _container_argv(c, env, tmp_path)
                args = parser.parse_args(argv)  # SystemExit (exit 2) on a flag the CLI does not know
                seen.add(args.command)
                if args.command == "agent":
                    assert args.node_name == "gpu-0"
                    if "--publish" in argv:
                        assert args.advertise_endpoint == endpoint
                if args.command == "operator":
                    server_name = args.agent_server_name
    assert {"agent", "deviceplugin", "operator", "pool"} <= seen
    # The operator's name is one the agent certificate carries (Helm-made or cert-manager).
    if any(o["kind"] == "Certificate" for o in objs):
        sans = find(objs, "Certificate", "-agent-tls")["spec"]["dnsNames"]
    else:
        pem = base64.b64decode(find(objs, "Secret", "-agent-tls")["data"]["tls.crt"])
        sans = x509.load_pem_x509_certificate(pem).extensions.get_extension_for_class(
            x509.SubjectAlternativeName).value.get_values_for_type(x509.DNSName)
    assert server_name and server_name in sans
    assert not [n for n in sans if ".pod" in n], f"no pod DNS names any more: {sans}"


def _secret_files(objs: list[dict[str, Any]], suffix: str, into: Path) -> tuple[Path, Path, Path]:
    secret = find(objs, "Secret", suffix)
    into.mkdir(parents=True, exist_ok=True)
    paths = []
    for key in ("tls.crt", "tls.key", "ca.crt"):
        p = into / key
        p.write_bytes(base64.b64decode(secret["data"][key]))
        paths.append(p)
    return paths[0], paths[1], paths[2]


def _dns_sans(cert_path: Path) -> list[str]:
    from cryptography import x509

    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    return list(cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
                .get_values_for_type(x509.DNSName))


def _serve(server: tuple[Path, Path, Path], node: str) -> tuple[AgentProcess, str]:
    """A real agent (simulated GPUs) serving mutual TLS on 127.0.0.1 with these files."""
    from spillway.testing.agentproc import AgentProcess, free_port

    endpoint = f"127.0.0.1:{free_port()}"
    proc = AgentProcess(node_name=node, extra_args=[
        "--listen", endpoint, "--tls-cert", str(server[0]), "--tls-key", str(server[1]), "--tls-ca", str(server[2])])
    return proc.start(), endpoint


def _node_name(endpoint: str, client: tuple[Path, Path, Path], server_name: str | None) -> str:
    """The agent's node name as the operator would read it: dialled at `endpoint` (an IP),
    its certificate checked against `server_name`; the gRPC status code name on failure."""
    import grpc

    from spillway.agent.client import AgentClient
    from spillway.pki import TlsFiles

    async def go() -> str:
        async with AgentClient(endpoint, tls=TlsFiles(*client), server_name=server_name, timeout=30) as c:
            try:
                return (await c.inventory()).node_name
            except grpc.aio.AioRpcError as exc:
                return exc.code().name

    return asyncio.run(go())


@pytest.mark.cluster
def test_helm_made_certificates_carry_mutual_tls_to_a_real_agent(helm: Any, tmp_path: Path) -> None:
    """The agent serves with the chart's agent certificate, dialled by IP: the operator's
    client certificate and --agent-server-name reach it; without the name, or without a client
    certificate, it is refused. The helm-test pod's command (which dials the agent Service)
    reads its pool. The simulated backend stands in for the GPU."""
    objs = render(helm)
    server = _secret_files(objs, "-agent-tls", tmp_path / "agent")
    client = _secret_files(objs, "-operator-tls", tmp_path / "operator")
    assert _dns_sans(server[0]) == AGENT_SANS
    op_args = find(objs, "Deployment", "-operator")["spec"]["template"]["spec"]["containers"][0]["args"]
    (server_name,) = [a.split("=", 1)[1] for a in op_args if a.startswith("--agent-server-name=")]

    agent, endpoint = _serve(server, "chart-node")
    try:
        assert _node_name(endpoint, client, server_name) == "chart-node"
        assert _node_name(endpoint, client, None) == "UNAVAILABLE", "the IP is not in the certificate"
        assert _node_name(endpoint, (client[0], client[1], server[2]), "sw-spillway-agent.spillway-system") \
            == "chart-node"

        pod = find(objs, "Pod", "-test-agents")["spec"]["containers"][0]
        argv = []
        service = ""
        for a in pod["args"]:
            if a.startswith("--target="):
                service = a.removeprefix("--target=").rsplit(":", 1)[0]
                a = f"--target={endpoint}"
            for key, path in zip(("tls.crt", "tls.key", "ca.crt"), client, strict=True):
                a = a.replace(f"/etc/spillway/tls/{key}", str(path))
            argv.append(a)
        assert service in AGENT_SANS
        # The pod resolves the Service name to the agent; here 127.0.0.1 stands in, so the
        # Service name is checked as the server name.
        r = subprocess.run([sys.executable, "-m", "spillway", *argv, "--tls-server-name", service],
                           capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=60)
        assert r.returncode == 0, r.stderr
        pool = json.loads(r.stdout)
        assert pool["node_name" if "node_name" in pool else "nodeName"] == "chart-node"

        from spillway.agent.client import AgentClient

        async def no_cert() -> str:
            async with AgentClient(endpoint, tls=None, timeout=10) as c:
                try:
                    await c.inventory()
                except Exception as exc:  # refused: no client certificate
                    return type(exc).__name__
            return "answered"

        assert asyncio.run(no_cert()) != "answered"
    finally:
        agent.cleanup()


# --- against the real API server ------------------------------------------------------------

STAND_IN_CRDS = {
    "monitoring.coreos.com": [("ServiceMonitor", "servicemonitors"), ("PodMonitor", "podmonitors"),
                              ("PrometheusRule", "prometheusrules")],
    "cert-manager.io": [("Issuer", "issuers"), ("Certificate", "certificates")],
}


def _stand_in_crds() -> str:
    """Minimal CRDs (any content allowed) for the Prometheus operator's and cert-manager's
    kinds, so that the API server knows them; their real schemas are not checked here."""
    out = []
    for group, kinds in STAND_IN_CRDS.items():
        for kind, plural in kinds:
            out.append({
                "apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
                "metadata": {"name": f"{plural}.{group}"},
                "spec": {"group": group, "scope": "Namespaced",
                         "names": {"kind": kind, "plural": plural, "singular": kind.lower()},
                         "versions": [{"name": "v1", "served": True, "storage": True, "schema": {"openAPIV3Schema": {
                             "type": "object", "x-kubernetes-preserve-unknown-fields": True}}}]},
            })
    return yaml.safe_dump_all(out)


@pytest.fixture(scope="module")
def chart_cluster(cluster: Cluster) -> Iterator[Cluster]:
    cluster.kubectl("apply", "--server-side", "-f", str(CHART / "crds"))
    cluster.kubectl("apply", "--server-side", "-f", "-", input=_stand_in_crds())
    for crd in ("inferencetenants.spillway.dev", "memorypools.spillway.dev", "clusterkopfpeerings.kopf.dev",
                "kopfpeerings.kopf.dev", "servicemonitors.monitoring.coreos.com", "certificates.cert-manager.io"):
        cluster.kubectl("wait", "--for=condition=Established", f"crd/{crd}", "--timeout=60s")
    yield cluster


@pytest.mark.cluster
@pytest.mark.parametrize("values", [None, *EXAMPLES], ids=lambda p: p.name if p else "defaults")
def test_rendering_passes_server_side_dry_run(chart_cluster: Cluster, values: Path | None) -> None:
    c = chart_cluster
    ns = c.create_namespace(f"dry-{(values.stem if values else 'defaults')[:20]}")
    try:
        args = ["template", "sw", str(CHART), "-n", ns, "--api-versions", "monitoring.coreos.com/v1"]
        text = c.helm(*args, *(["-f", str(values)] if values else [])).stdout
        for other in sorted({o["metadata"].get("namespace") for o in docs(text)} - {None, ns}):
            if c.kubectl("get", "namespace", other, check=False).returncode != 0:
                c.create_namespace(other)
        result = c.kubectl("apply", "--dry-run=server", "-f", "-", input=text, check=False)
        assert result.returncode == 0, result.stderr
        assert result.stdout.count("(server dry run)") == len(docs(text))
    finally:
        c.kubectl("delete", "namespace", ns, "--wait=false", check=False)


def can_i(c: Cluster, ns: str, sa: str, verb: str, resource: str, *extra: str) -> bool:
    """`kubectl auth can-i` as the ServiceAccount; "kind.group/sub" asks about a subresource."""
    resource, _, sub = resource.partition("/")
    sub_args = [f"--subresource={sub}"] if sub else []
    r = c.kubectl("auth", "can-i", verb, resource, *sub_args, *extra, as_user=f"system:serviceaccount:{ns}:{sa}",
                  check=False)
    return r.stdout.strip() == "yes"


@pytest.mark.cluster
def test_install_rbac_upgrade_uninstall(chart_cluster: Cluster, kwok_nodes: Any) -> None:
    c = chart_cluster
    ns = c.create_namespace("spillway-it")
    node = kwok_nodes({"nvidia.com/gpu": "8"}, labels={"spillway.dev/simulated": "true"}, prefix="gpu")
    values = REPO / "examples" / "values" / "simulated.yaml"
    install = c.helm("install", "sw", str(CHART), "-n", ns, "-f", str(values), "--set", "operator.replicas=2",
                     check=False)
    assert install.returncode == 0, install.stderr
    assert "helm test sw" in install.stdout, "NOTES.txt tells the next steps"
    try:
        for kind, name in (("deployment", "sw-spillway-operator"), ("daemonset", "sw-spillway-node"),
                           ("service", "sw-spillway-agent"), ("service", "sw-spillway-operator"),
                           ("secret", "sw-spillway-agent-tls"), ("secret", "sw-spillway-operator-tls"),
                           ("secret", "sw-spillway-ca"),
                           ("poddisruptionbudget", "sw-spillway-operator"), ("serviceaccount", "sw-spillway-agent"),
                           ("serviceaccount", "sw-spillway-deviceplugin"), ("serviceaccount", "sw-spillway-operator")):
            c.kubectl("get", kind, name, "-n", ns)
        c.kubectl("get", "clusterkopfpeering", "sw-spillway")
        # The DaemonSet lands on the (simulated) GPU node.
        wait_until(lambda: c.get_json("daemonset", "sw-spillway-node", "-n", ns)["status"].get(
            "desiredNumberScheduled") == 1, timeout=60, what="the DaemonSet to schedule on the GPU node")
        pods = c.get_json("pods", "-n", ns, "-l", "app.kubernetes.io/component=node")["items"]
        assert [p["spec"]["nodeName"] for p in pods] == [node]
        # Each container's token is its own ServiceAccount's, filled in by the token controller.
        for part in ("agent", "deviceplugin"):
            def token(part: str = part) -> bool:
                data = c.get_json("secret", f"sw-spillway-{part}-token", "-n", ns).get("data") or {}
                return "token" in data
            wait_until(token, timeout=60, what=f"the {part} token")

        op, agent, dp = "sw-spillway-operator", "sw-spillway-agent", "sw-spillway-deviceplugin"
        allowed = [
            (op, "list", "inferencetenants.spillway.dev"), (op, "patch", "inferencetenants.spillway.dev/status"),
            (op, "watch", "memorypools.spillway.dev"), (op, "patch", "memorypools.spillway.dev"),
            (op, "create", "pods"), (op, "delete", "pods"),
            (op, "patch", "pods"), (op, "create", "events"), (op, "patch", "clusterkopfpeerings.kopf.dev"),
            (op, "create", "pods/eviction"), (op, "list", "nodes"), (op, "watch", "nodes"),
            (op, "create", "resourceclaims.resource.k8s.io"), (op, "delete", "resourceclaims.resource.k8s.io"),
            (op, "get", "deviceclasses.resource.k8s.io"),
            (agent, "create", "memorypools.spillway.dev"), (agent, "patch", "memorypools.spillway.dev/status"),
            (agent, "update", "memorypools.spillway.dev"), (agent, "get", "nodes"),
            (dp, "list", "pods"), (dp, "watch", "pods"), (dp, "patch", "pods"), (dp, "create", "events"),
        ]
        denied = [
            (op, "delete", "nodes"), (op, "patch", "nodes"), (op, "list", "secrets"),
            (op, "create", "memorypools.spillway.dev"),
            (op, "delete", "memorypools.spillway.dev"), (op, "patch", "memorypools.spillway.dev/status"),
            (op, "create", "clusterroles.rbac.authorization.k8s.io"),
            (op, "create", "deviceclasses.resource.k8s.io"), (op, "update", "resourceslices.resource.k8s.io"),
            (agent, "list", "secrets"), (agent, "get", "secrets"), (agent, "delete", "memorypools.spillway.dev"),
            (agent, "list", "nodes"), (agent, "patch", "nodes"), (agent, "list", "pods"), (agent, "create", "pods"),
            (dp, "create", "pods"), (dp, "delete", "pods"), (dp, "list", "secrets"), (dp, "get", "nodes"),
            (dp, "patch", "memorypools.spillway.dev"), (dp, "create", "pods/eviction"),
            (agent, "create", "pods/eviction"),
            (agent, "patch", "inferencetenants.spillway.dev/status"), (dp, "patch", "memorypools.spillway.dev/status"),
        ]
        wrong = [f"{sa} cannot {v} {r}" for sa, v, r in allowed if not can_i(c, ns, sa, v, r)]
        wrong += [f"{sa} can {v} {r}" for sa, v, r in denied if can_i(c, ns, sa, v, r)]
        assert can_i(c, ns, op, "update", "leases.coordination.k8s.io", "-n", ns)
        assert can_i(c, ns, agent, "update", "leases.coordination.k8s.io", "-n", ns)  # its heartbeat
        assert can_i(c, ns, agent, "list", "leases.coordination.k8s.io", "-n", ns)  # the watchdog
        assert not can_i(c, ns, agent, "update", "leases.coordination.k8s.io", "-n", "kube-node-lease")
        assert not can_i(c, ns, agent, "delete", "leases.coordination.k8s.io", "-n", ns)
        assert not can_i(c, ns, op, "update", "leases.coordination.k8s.io", "-n", "kube-system")
        assert not wrong, wrong

        # Upgrade: same certificates (looked up, not made again), new values applied.
        tls_secrets = ("sw-spillway-agent-tls", "sw-spillway-operator-tls", "sw-spillway-ca")
        before = [c.get_json("secret", name, "-n", ns)["data"] for name in tls_secrets]
        up = c.helm("upgrade", "sw", str(CHART), "-n", ns, "-f", str(values), "--set", "operator.replicas=1",
                    "--set", "devicePlugin.unit=2Gi", check=False)
        assert up.returncode == 0, up.stderr
        assert [c.get_json("secret", name, "-n", ns)["data"] for name in tls_secrets] == before
        ds = c.get_json("daemonset", "sw-spillway-node", "-n", ns)
        assert "--unit=2Gi" in ds["spec"]["template"]["spec"]["containers"][1]["args"]
        assert c.kubectl("get", "poddisruptionbudget", "sw-spillway-operator", "-n", ns, check=False).returncode != 0
        assert c.kubectl("get", "clusterkopfpeering", "sw-spillway", check=False).returncode != 0
        history = c.helm("history", "sw", "-n", ns, "-o", "json").stdout
        assert [h["status"] for h in json.loads(history)] == ["superseded", "deployed"]
    finally:
        un = c.helm("uninstall", "sw", "-n", ns, "--wait", "--timeout", "120s", check=False)
    assert un.returncode == 0, un.stderr
    left = c.kubectl("get", "all,secrets,serviceaccounts,roles,rolebindings,configmaps,poddisruptionbudgets", "-n", ns,
                     "-l", "app.kubernetes.io/instance=sw", "-o", "name").stdout.split()
    assert left == []
    cluster_left = c.kubectl("get", "clusterroles,clusterrolebindings,clusterkopfpeerings", "-l",
                             "app.kubernetes.io/instance=sw", "-o", "name").stdout.split()
    assert cluster_left == []
    c.kubectl("delete", "namespace", ns, "--wait=false", check=False)


def _tls_secret(name: str, ns: str, cert: bytes, key: bytes, ca: bytes) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Secret", "type": "kubernetes.io/tls",
            "metadata": {"name": name, "namespace": ns,
                         "labels": {"app.kubernetes.io/instance": "sw", "app.kubernetes.io/managed-by": "Helm"},
                         "annotations": {"meta.helm.sh/release-name": "sw", "meta.helm.sh/release-namespace": ns}},
            "data": {k: base64.b64encode(v).decode() for k, v in (("tls.crt", cert), ("tls.key", key),
                                                                    ("ca.crt", ca))}}


def _pems(bundle: bytes) -> list[bytes]:
    end = b"-----END CERTIFICATE-----"
    return [p.strip() + b"\n" + end + b"\n" for p in bundle.split(end) if p.strip()]


@pytest.mark.cluster
def test_upgrade_reissues_the_agent_certificate_when_its_names_change(chart_cluster: Cluster, tmp_path: Path) -> None:
    """Secrets as a chart of before (agent certificate naming pod DNS wildcards, no CA Secret,
    no annotations) meet this chart's lookups (`helm template --dry-run=server`, as an upgrade
    renders): the agent certificate is made again with the new names under a new CA; the
    operator's client certificate is kept and the trust bundle holds both CAs, so old and new
    agents and the operator all accept each other while the pods roll. Rendered again over its
    own Secrets, nothing changes; a new tls.agentServerName re-issues the agent certificate
    under the same CA. Real handshakes with a real agent check each step."""
    from spillway.pki import make_ca

    c = chart_cluster
    ns = c.create_namespace("tls-upgrade")
    try:
        sans = [n.replace("spillway-system", ns) for n in AGENT_SANS]
        old_ca = make_ca("sw-spillway-ca")
        old_agent = old_ca.issue("spillway-agent", [*sans, f"*.{ns}.pod.cluster.local", f"*.{ns}.pod"], client=False,
                                 server=True)
        old_operator = old_ca.issue("spillway-operator", client=True, server=False)
        c.kubectl("apply", "-f", "-", input=yaml.safe_dump_all([
            _tls_secret("sw-spillway-agent-tls", ns, *old_agent, old_ca.cert_pem),
            _tls_secret("sw-spillway-operator-tls", ns, *old_operator, old_ca.cert_pem)]))

        def upgrade_render(*extra: str) -> list[dict[str, Any]]:
            text = c.helm("template", "sw", str(CHART), "-n", ns, "--dry-run=server", "-s", "templates/tls.yaml",
                          *extra).stdout
            return docs(text)

        objs = upgrade_render()
        agent = _secret_files(objs, "-agent-tls", tmp_path / "new-agent")
        operator = _secret_files(objs, "-operator-tls", tmp_path / "operator")
        new_ca = base64.b64decode(find(objs, "Secret", "-ca")["data"]["tls.crt"])
        assert agent[0].read_bytes() != old_agent[0] and _dns_sans(agent[0]) == sans
        assert operator[0].read_bytes() == old_operator[0] and operator[1].read_bytes() == old_operator[1]
        bundle = operator[2].read_bytes()
        assert agent[2].read_bytes() == bundle
        assert _pems(bundle) == [old_ca.cert_pem, new_ca], "the trust bundle: the old CA, then the new one"
        annotations = find(objs, "Secret", "-agent-tls")["metadata"]["annotations"]
        assert json.loads(annotations["spillway.dev/dns-names"]) == sans

        old_dir = tmp_path / "old-agent"
        old_dir.mkdir()
        old_files = (old_dir / "tls.crt", old_dir / "tls.key", old_dir / "ca.crt")
        for path, data in zip(old_files, (*old_agent, old_ca.cert_pem), strict=True):
            path.write_bytes(data)
        new_agent, new_ep = _serve(agent, "new-agent")
        not_rolled, old_ep = _serve(old_files, "old-agent")
        try:
            # The operator after the upgrade (kept certificate, both CAs) reaches both agents by IP.
            assert _node_name(new_ep, operator, "spillway-agent") == "new-agent"
            assert _node_name(old_ep, operator, "spillway-agent") == "old-agent"
            # The operator before the upgrade (old CA only) still reaches the agent not yet rolled.
            before = (operator[0], operator[1], old_files[2])
            assert _node_name(old_ep, before, "spillway-agent") == "old-agent"
            assert _node_name(new_ep, operator, None) == "UNAVAILABLE"
        finally:
            new_agent.cleanup()
            not_rolled.cleanup()

        # The upgrade applied: rendering again over these Secrets changes nothing.
        applied = [o for o in objs if o["kind"] == "Secret"]
        for o in applied:  # as `helm upgrade` would own them
            o["metadata"].setdefault("annotations", {}).update(
                {"meta.helm.sh/release-name": "sw", "meta.helm.sh/release-namespace": ns})
        c.kubectl("apply", "-f", "-", input=yaml.safe_dump_all(applied))
        assert [o["data"] for o in upgrade_render() if o["kind"] == "Secret"] == [o["data"] for o in applied]

        # A new server name: the agent certificate is made again, under the same CA.
        renamed = upgrade_render("--set", "tls.agentServerName=agents.spillway.example")
        agent2 = _secret_files(renamed, "-agent-tls", tmp_path / "renamed")
        assert _dns_sans(agent2[0])[0] == "agents.spillway.example"
        for suffix in ("-ca", "-operator-tls"):
            assert find(renamed, "Secret", suffix)["data"] == find(applied, "Secret", suffix)["data"]
        assert agent2[2].read_bytes() == bundle
        renamed_agent, ep = _serve(agent2, "renamed-agent")
        try:
            assert _node_name(ep, operator, "agents.spillway.example") == "renamed-agent"
            assert _node_name(ep, operator, "spillway-agent") == "UNAVAILABLE"
        finally:
            renamed_agent.cleanup()
    finally:
        c.kubectl("delete", "namespace", ns, "--wait=false", check=False)


@pytest.mark.cluster
@pytest.mark.slow
def test_real_agent_and_operator_work_with_only_their_chart_accounts(
        chart_cluster: Cluster, kwok_nodes: Any, tmp_path: Path) -> None:
    """The agent publishes its MemoryPool and the operator (with --peering, as with
    replicas > 1) joins the chart's ClusterKopfPeering and writes a tenant's status, each
    authenticated as its own ServiceAccount from the chart: the RBAC is enough for the real
    processes, not only for `can-i`."""
    from spillway.testing.agentproc import DEFAULT_TOPOLOGY, free_port

    c = chart_cluster
    ns = c.create_namespace("spillway-rt")
    tenants = c.create_namespace("tenants-rt")
    node = kwok_nodes({"nvidia.com/gpu": "8"}, labels={"spillway.dev/simulated": "true"}, prefix="rt")
    c.helm("install", "rt", str(CHART), "-n", ns, "-f", str(REPO / "examples" / "values" / "simulated.yaml"),
           "--set", "operator.replicas=2")
    procs: list[subprocess.Popen[bytes]] = []
    logs = {name: tmp_path / f"{name}.log" for name in ("agent", "operator")}

    def spawn(name: str, sa: str, argv: list[str]) -> None:
        env = {**os.environ, "PYTHONPATH": str(REPO), "KUBECONFIG": str(c.kubeconfig_for_service_account(ns, sa)),
               "POD_ID": f"{name}-0"}
        with logs[name].open("ab") as log:
            procs.append(subprocess.Popen([sys.executable, "-m", "spillway", *argv], stdout=log,
                                          stderr=subprocess.STDOUT, env=env, start_new_session=True))

    try:
        spawn("agent", "rt-spillway-agent", [
            "agent", "--backend", "simulated", "--topology", str(DEFAULT_TOPOLOGY), "--node-name", node,
            "--socket", str(tmp_path / "a.sock"), "--state-dir", str(tmp_path / "state"),
            "--metrics-port", str(free_port()), "--publish", "--advertise-endpoint", "127.0.0.1:1"])

        def pool() -> dict[str, Any] | None:
            r = c.kubectl("get", "memorypool", node, "-o", "json", check=False)
            obj = json.loads(r.stdout) if r.returncode == 0 else None
            return obj if obj and obj.get("status", {}).get("gpus") else None

        published = wait_until(pool, timeout=90, interval=1, what="the agent's MemoryPool")
        assert len(published["status"]["gpus"]) == 8

        spawn("operator", "rt-spillway-operator", [
            "operator", "--peering", "rt-spillway", "--metrics-port", str(free_port()), "--health-port", "-1",
            "--resync-interval", "5s", "--lease-ttl", "60s"])

        def peers() -> dict[str, Any] | None:
            return (c.get_json("clusterkopfpeering", "rt-spillway").get("status") or None)

        assert "operator-0" in wait_until(peers, timeout=90, interval=1, what="the operator in the peering object")
        c.apply({"apiVersion": "spillway.dev/v1alpha1", "kind": "InferenceTenant", "metadata": {"name": "t"},
                 "spec": {"replicas": 1, "model": {"image": "spillway/toy-server:0.1.0", "memory": "40Gi"}}}, tenants)

        def status() -> dict[str, Any] | None:
            return c.get_json("inferencetenant", "t", "-n", tenants).get("status") or None

        assert wait_until(status, timeout=90, interval=1, what="the operator to write the tenant's status")
        for name, path in logs.items():
            text = path.read_text()
            # an RBAC refusal names the account ("... is forbidden: User \"system:serviceaccount:...\" cannot
            # ..."); other 403s (an Event posted into some other test's terminating namespace) are not RBAC
            denied = [line for line in text.splitlines() if re.search(r'forbidden: User \\?"[^"\\]+\\?" cannot', line)]
            assert not denied, f"{name} was refused by RBAC:\n" + "\n".join(denied)[-3000:]
    finally:
        for p in procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGTERM)
        for p in procs:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait(timeout=10)
        c.kubectl("delete", "inferencetenant", "t", "-n", tenants, "--wait=false", check=False)
        c.kubectl("patch", "inferencetenant", "t", "-n", tenants, "--type=merge", "-p",
                  '{"metadata":{"finalizers":null}}', check=False)
        c.helm("uninstall", "rt", "-n", ns, check=False)
        c.kubectl("delete", "memorypool", node, "--wait=false", check=False)
        c.kubectl("delete", "namespace", ns, tenants, "--wait=false", check=False)


@pytest.mark.cluster
@pytest.mark.slow
def test_real_device_plugin_works_with_only_its_chart_account(
        chart_cluster: Cluster, kwok_nodes: Any, dpconformance_bin: Path, dp_workdir: Path, agent: Any) -> None:
    """The device plugin, authenticated as the chart's device-plugin ServiceAccount, finds the
    pending pod an Allocate is for and marks it (pods list/patch), behind the kubelet's own
    registration and device-manager code; the agent is a real subprocess (simulated GPUs)."""
    from tests.fixtures_deviceplugin import Kubelet, PluginProcess, PodResourcesServer

    c = chart_cluster
    ns = c.create_namespace("spillway-dp")
    workload = c.create_namespace("workload-dp")
    node = kwok_nodes({"spillway.dev/peer-hbm": "600", "nvidia.com/gpu": "8"}, prefix="dp")
    c.helm("install", "dp", str(CHART), "-n", ns, "--set", "operator.enabled=false")
    plugin = PluginProcess(dp_workdir, agent.socket, node,
                           kubeconfig=c.kubeconfig_for_service_account(ns, "dp-spillway-deviceplugin"))
    pods = PodResourcesServer(plugin.pod_resources)
    kubelet = Kubelet(dpconformance_bin, plugin.kubelet_dir).start()
    plugin.start()
    try:
        kubelet.wait_for(lambda e: e["event"] == "registered", 60, "the plugin to register")
        c.apply({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "plain", "namespace": workload},
                 "spec": {"nodeName": node, "containers": [{"name": "server", "image": "registry.example/llm:1",
                          "resources": {"limits": {"spillway.dev/peer-hbm": "2"}}}]}})
        ids = [d["id"] for d in kubelet.devices() if d["health"] == "Healthy"][:2]
        alloc = kubelet.allocate(ids)
        assert "error" not in alloc, alloc
        pod = c.get_json("pod", "plain", "-n", workload)
        mark = json.loads(pod["metadata"]["annotations"]["spillway.dev/allocation"])["server"]
        assert mark["result"] == "on_the_spot"
        assert "Forbidden" not in plugin.logs(), plugin.logs()[-3000:]
    finally:
        plugin.stop()
        kubelet.stop()
        pods.stop()
        c.helm("uninstall", "dp", "-n", ns, check=False)
        c.kubectl("delete", "namespace", ns, workload, "--wait=false", check=False)


@pytest.mark.cluster
def test_pod_security_baseline_is_refused_with_the_fix_or_the_chart_makes_a_privileged_namespace(
        chart_cluster: Cluster, kwok_nodes: Any) -> None:
    """The API server's Pod Security admission refuses the node pods in a baseline namespace
    (the quiet failure: Helm succeeds, DESIRED 1 CURRENT 0); the chart refuses such an install
    itself with the command that fixes it, and with podSecurity.createNamespace it installs into a
    privileged namespace of its own where the pods are admitted."""
    c = chart_cluster
    values = REPO / "examples" / "values" / "simulated.yaml"
    ns = c.create_namespace(f"psa-{os.getpid() % 10000}")
    own = f"{ns}-nodes"
    c.kubectl("label", "namespace", ns, "pod-security.kubernetes.io/enforce=baseline")
    kwok_nodes({"nvidia.com/gpu": "8"}, labels={"spillway.dev/simulated": "true"}, prefix="psa")
    try:
        r = c.helm("install", "psa", str(CHART), "-n", ns, "-f", str(values), check=False)
        assert r.returncode != 0
        assert f'namespace "{ns}" enforces Pod Security level "baseline"' in r.stderr, r.stderr
        assert f"kubectl label namespace {ns} pod-security.kubernetes.io/enforce=privileged --overwrite" in r.stderr
        assert "podSecurity.createNamespace=true" in r.stderr
        assert c.kubectl("get", "all,secrets", "-n", ns, "-l", "app.kubernetes.io/instance=psa", "-o",
                         "name").stdout.split() == [], "a refused install makes nothing"

        # Without the check, what users saw: Helm succeeds and no node pod is ever admitted.
        r = c.helm("install", "psa", str(CHART), "-n", ns, "-f", str(values), "--set", "podSecurity.check=false",
                   "--set", "operator.enabled=false", check=False)
        assert r.returncode == 0, r.stderr

        def refused() -> bool:
            events = c.get_json("events", "-n", ns, "--field-selector", "reason=FailedCreate")["items"]
            return any("violates PodSecurity" in e.get("message", "") for e in events)

        wait_until(refused, timeout=60, what="Pod Security admission to refuse the node pod")
        assert c.get_json("daemonset", "psa-spillway-node", "-n", ns)["status"].get("currentNumberScheduled", 0) == 0
        assert c.helm("uninstall", "psa", "-n", ns, "--wait", check=False).returncode == 0

        # The chart's own privileged namespace: the node pod is admitted.
        r = c.helm("install", "psa", str(CHART), "-n", ns, "-f", str(values), "--set", f"namespaceOverride={own}",
                   "--set", "podSecurity.createNamespace=true", check=False)
        assert r.returncode == 0, r.stderr
        labels = c.get_json("namespace", own)["metadata"]["labels"]
        assert labels["pod-security.kubernetes.io/enforce"] == "privileged"
        wait_until(lambda: c.get_json("daemonset", "psa-spillway-node", "-n", own)["status"].get(
            "currentNumberScheduled") == 1, timeout=60, what="the node pod in the privileged namespace")
        assert c.get_json("deployment", "psa-spillway-operator", "-n", own)["spec"]["replicas"] == 1
    finally:
        c.helm("uninstall", "psa", "-n", ns, "--wait", "--timeout", "120s", check=False)
        c.kubectl("delete", "namespace", ns, own, "--wait=false", "--ignore-not-found", check=False)

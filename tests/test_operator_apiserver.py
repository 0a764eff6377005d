"""The operator's Kubernetes client (`spillway.operator.apiserver`, the official client's asyncio
API) against the real control plane, logged in the ways managed clusters log in:

- an `exec` credential plugin (a test plugin that prints a service-account token, as EKS's,
  GKE's and AKS's plugins print theirs): the plugin runs once, not per request, and again when
  the API server refuses its token; the whole operator (kopf's watches and its own calls) runs
  with such a kubeconfig;
- the in-cluster service account whose bound token rotates: the new token in the file is used,
  the old one is dead.

Tokens are bound to a Secret (`kubectl create token --bound-object-kind Secret`), so deleting the
Secret kills the token at the API server: a client that kept the old token would fail."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import ssl
import subprocess
import sys
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from spillway.operator.apiserver import ApiServer, KubeError
from spillway.testing.agentproc import free_port
from spillway.testing.cluster import Cluster, wait_until
from spillway.testing.sandbox import REPO_ROOT, Sandbox

pytestmark = [pytest.mark.cluster]

PLUGIN = '''\
import json, pathlib, sys
token = pathlib.Path(sys.argv[1]).read_text().strip()
with open(sys.argv[2], "a") as runs:
    runs.write("run\\n")
print(json.dumps({"apiVersion": "client.authentication.k8s.io/v1", "kind": "ExecCredential",
                  "status": {"token": token}}))
'''


@dataclass
class Account:
    """A service account with rights, and tokens for it that can be killed one by one."""

    cluster: Cluster
    namespace: str
    account: str
    dir: Path

    def token(self, name: str) -> str:
        """A token bound to a new Secret `name` (deleting it kills the token)."""
        self.cluster.kubectl("create", "secret", "generic", name, "-n", self.namespace)
        uid = self.cluster.kubectl("get", "secret", name, "-n", self.namespace, "-o",
                                   "jsonpath={.metadata.uid}").stdout.strip()
        return str(self.cluster.kubectl(
            "create", "token", self.account, "-n", self.namespace, "--bound-object-kind", "Secret",
            "--bound-object-name", name, "--bound-object-uid", uid, "--duration", "1h").stdout.strip())

    def kill(self, name: str, token: str) -> None:
        """Delete the token's Secret and wait until the API server refuses the token."""
        self.cluster.kubectl("delete", "secret", name, "-n", self.namespace)
        wait_until(lambda: self.status(token) == 401, timeout=30, what="the old token to be refused")

    def status(self, token: str) -> int:
        ctx = ssl.create_default_context(cafile=str(self.cluster.pki_dir / "ca.crt"))
        req = urllib.request.Request(f"{self.cluster.server}/api/v1/namespaces/{self.namespace}/pods",
                                     headers={"Authorization": f"Bearer {token}"})
        try:
            with urllib.request.urlopen(req, context=ctx, timeout=10) as resp:
                return int(resp.status)
        except urllib.error.HTTPError as exc:
            return int(exc.code)

    def kubeconfig(self, user: dict[str, Any], name: str = "kubeconfig") -> Path:
        ca = base64.b64encode((self.cluster.pki_dir / "ca.crt").read_bytes()).decode()
        doc = {
            "apiVersion": "v1", "kind": "Config",
            "clusters": [{"name": "c", "cluster": {"server": self.cluster.server, "certificate-authority-data": ca}}],
            "users": [{"name": "u", "user": user}],
            "contexts": [{"name": "c", "context": {"cluster": "c", "user": "u"}}],
            "current-context": "c",
        }
        path = self.dir / name
        path.write_text(yaml.safe_dump(doc))
        return path

    def exec_kubeconfig(self, token_file: Path, runs: Path) -> Path:
        plugin = self.dir / "plugin.py"
        plugin.write_text(PLUGIN)
        return self.kubeconfig({"exec": {
            "apiVersion": "client.authentication.k8s.io/v1", "command": sys.executable,
            "args": [str(plugin), str(token_file), str(runs)], "interactiveMode": "Never",
        }}, "exec.kubeconfig")


@pytest.fixture
def account(cluster: Cluster, k8s_namespace: str, tmp_path: Path) -> Iterator[Account]:
    account = "operator"
    binding = f"spw-op-{uuid.uuid4().hex[:6]}"
    cluster.kubectl("create", "serviceaccount", account, "-n", k8s_namespace)
    cluster.kubectl("create", "clusterrolebinding", binding, "--clusterrole=cluster-admin",
                    f"--serviceaccount={k8s_namespace}:{account}")
    try:
        yield Account(cluster, k8s_namespace, account, tmp_path)
    finally:
        cluster.kubectl("delete", "clusterrolebinding", binding, "--ignore-not-found", check=False)


def _write(path: Path, text: str) -> None:
    """Replace a file in one step, as the kubelet swaps a projected token."""
    tmp = path.with_suffix(".new")
    tmp.write_text(text)
    os.replace(tmp, path)


def _pod(namespace: str, name: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": namespace,
                                                            "labels": {"app": "probe"}},
            "spec": {"containers": [{"name": "c", "image": "probe"}], "nodeName": "nowhere"}}


def test_an_exec_plugin_logs_in_runs_once_and_again_when_its_token_is_refused(account: Account) -> None:
    ns = account.namespace
    token_file, runs = account.dir / "token", account.dir / "runs"
    first = account.token("t1")
    token_file.write_text(first)
    kubeconfig = account.exec_kubeconfig(token_file, runs)

    async def go() -> None:
        # Without the plugin the same calls are refused: this is what the test tells apart.
        anonymous = await ApiServer.connect(str(account.kubeconfig({}, "anonymous.kubeconfig")))
        try:
            with pytest.raises(KubeError) as refused:
                await anonymous.list_pods(ns, "app=probe")
            assert refused.value.status in (401, 403)
        finally:
            await anonymous.close()

        api = await ApiServer.connect(str(kubeconfig))
        try:
            created = await api.create_pod(_pod(ns, "probe"))
            assert created["metadata"]["uid"]
            await api.patch_pod(ns, "probe", {"metadata": {"annotations": {"spillway.test/x": "1"}}})
            got = await api.get_pod(ns, "probe")
            assert got is not None and got["metadata"]["annotations"]["spillway.test/x"] == "1"
            assert [p["metadata"]["name"] for p in await api.list_pods(ns, "app=probe")] == ["probe"]
            _, rv = await api.list_nodes()
            assert rv
            assert runs.read_text().count("run") == 1  # the credential is kept, not fetched per call

            second = account.token("t2")
            _write(token_file, second)
            await asyncio.to_thread(account.kill, "t1", first)
            assert await api.delete_pod(ns, "probe", grace_s=0)  # 401 with the old token: the plugin runs again
            assert runs.read_text().count("run") == 2 and api.credentials.refreshes == 1
            assert await api.get_pod(ns, "probe") is None
            creds = await api.login()
            assert creds.token == second and creds.server == account.cluster.server
        finally:
            await api.close()

    asyncio.run(go())


def test_a_rotated_service_account_token_is_picked_up(account: Account) -> None:
    ns = account.namespace
    sa_dir = account.dir / "serviceaccount"
    sa_dir.mkdir()
    (sa_dir / "ca.crt").write_bytes((account.cluster.pki_dir / "ca.crt").read_bytes())
    first = account.token("r1")
    (sa_dir / "token").write_text(first)
    host, port = account.cluster.server.removeprefix("https://").rsplit(":", 1)
    env = {"KUBERNETES_SERVICE_HOST": host, "KUBERNETES_SERVICE_PORT": port}

    async def go() -> None:
        api = await ApiServer.connect(str(account.dir / "no-kubeconfig"), service_account_dir=sa_dir, environ=env)
        try:
            assert await api.list_pods(ns, "app=probe") == []
            second = account.token("r2")
            _write(sa_dir / "token", second)
            await asyncio.to_thread(account.kill, "r1", first)
            assert await api.list_pods(ns, "app=probe") == []  # with the new token, at once
            assert api.credentials.refreshes == 1
            assert (await api.login()).token == second
        finally:
            await api.close()

    asyncio.run(go())


def test_the_operator_runs_with_an_exec_plugin_kubeconfig(account: Account) -> None:
    """kopf's watches and the operator's own calls both log in through the plugin: the tenant gets
    kopf's finalizer and a status written by the operator, and its deletion completes."""
    ns = account.namespace
    token_file, runs = account.dir / "token", account.dir / "runs"
    token_file.write_text(account.token("op"))
    kubeconfig = account.exec_kubeconfig(token_file, runs)
    sb = Sandbox(account.cluster, account.dir / "sandbox")
    sb.start()  # the CRDs
    port = free_port()
    path = os.pathsep.join(x for x in (str(REPO_ROOT), os.environ.get("PYTHONPATH", "")) if x)
    env = {**os.environ, "KUBECONFIG": str(kubeconfig), "PYTHONPATH": path}
    log = account.dir / "operator.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "spillway", "operator", "--kubeconfig", str(kubeconfig), "--namespace", ns,
             "--standalone", "--metrics-port", str(port), "--metrics-address", "127.0.0.1", "--health-port", "-1"],
            stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, cwd=str(REPO_ROOT),
            start_new_session=True)
    try:
        tenant = {"apiVersion": "spillway.dev/v1alpha1", "kind": "InferenceTenant",
                  "metadata": {"name": "exec-llm", "namespace": ns},
                  "spec": {"replicas": 1, "model": {"image": "toy", "memory": "40Gi"}}}
        account.cluster.apply(json.dumps(tenant))

        def status() -> dict[str, Any] | None:
            if proc.poll() is not None:
                raise RuntimeError(f"operator exited: {log.read_text()[-3000:]}")
            obj = account.cluster.get_json("inferencetenant", "exec-llm", "-n", ns)
            return obj if (obj.get("status") or {}).get("phase") and obj["metadata"].get("finalizers") else None

        obj = wait_until(status, timeout=90, what="the operator to write the tenant's status")
        assert obj is not None and obj["status"]["phase"] == "Pending"  # no GPU node: nowhere to place it
        assert "system:anonymous" not in log.read_text() and "403" not in log.read_text()
        assert runs.read_text().count("run") >= 1
        account.cluster.kubectl("delete", "inferencetenant", "exec-llm", "-n", ns, "--timeout=60s")
    finally:
        Sandbox._stop_proc(proc)
        sb.stop()
        print(log.read_text()[-4000:])

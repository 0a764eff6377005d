"""A small asyncio client for the few Kubernetes REST calls the reconcile makes (aiohttp).

kopf watches and posts events with its own client; the reconcile lists, creates, patches and
deletes pods and patches the tenant's status through this one, so it never blocks the loop.
Credentials come from a kubeconfig (client certificate or bearer token) or, inside a pod, from
the service account.
"""

from __future__ import annotations

import base64
import json
import os
import ssl
import tempfile
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

import aiohttp
import yaml

SA_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")


class KubeError(RuntimeError):
    """An API call failed; `status` is the HTTP status (409 AlreadyExists, 404 NotFound, ...)."""

    def __init__(self, status: int, message: str, reason: str = "") -> None:
        super().__init__(message)
        self.status = status
        self.reason = reason


def _data_file(data_b64: str, suffix: str, keep: list[str]) -> str:
    fd, path = tempfile.mkstemp(prefix="spillway-kube-", suffix=suffix)
    with os.fdopen(fd, "wb") as f:
        f.write(base64.b64decode(data_b64))
    keep.append(path)
    return path


class KubeClient:
    def __init__(self, server: str, ssl_context: ssl.SSLContext, token: str = "") -> None:
        self.server = server.rstrip("/")
        self.ssl_context = ssl_context
        self.token = token
        self._session: aiohttp.ClientSession | None = None

    @classmethod
    def from_env(cls, kubeconfig: str | None = None) -> KubeClient:
        """From `kubeconfig`, else $KUBECONFIG, else ~/.kube/config, else the in-cluster service account."""
        path = kubeconfig or os.environ.get("KUBECONFIG") or str(Path.home() / ".kube" / "config")
        if Path(path).is_file():
            return cls.from_kubeconfig(path)
        host, port = os.environ.get("KUBERNETES_SERVICE_HOST"), os.environ.get("KUBERNETES_SERVICE_PORT", "443")
        if host and (SA_DIR / "token").is_file():
            ctx = ssl.create_default_context(cafile=str(SA_DIR / "ca.crt"))
            return cls(f"https://{host}:{port}", ctx, (SA_DIR / "token").read_text().strip())
        raise RuntimeError(f"no Kubernetes credentials: {path} does not exist and this is not a pod; set KUBECONFIG")

    @classmethod
    def from_kubeconfig(cls, path: str) -> KubeClient:
        doc = yaml.safe_load(Path(path).read_text()) or {}
        ctx_name = doc.get("current-context")
        contexts = {c["name"]: c["context"] for c in doc.get("contexts") or []}
        clusters = {c["name"]: c["cluster"] for c in doc.get("clusters") or []}
        users = {u["name"]: u.get("user") or {} for u in doc.get("users") or []}
        if ctx_name not in contexts:
            raise RuntimeError(f"kubeconfig {path}: current-context {ctx_name!r} is not defined")
        context = contexts[ctx_name]
        cluster = clusters[context["cluster"]]
        user = users.get(context.get("user", ""), {})
        base = Path(path).parent
        temp: list[str] = []
        if cluster.get("certificate-authority-data"):
            ctx = ssl.create_default_context(cafile=_data_file(cluster["certificate-authority-data"], ".crt", temp))
        elif cluster.get("certificate-authority"):
            ctx = ssl.create_default_context(cafile=str(base / cluster["certificate-authority"]))
        else:
            ctx = ssl.create_default_context()
        if cluster.get("insecure-skip-tls-verify"):
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        cert = user.get("client-certificate") and str(base / user["client-certificate"])
        key = user.get("client-key") and str(base / user["client-key"])
        if user.get("client-certificate-data"):
            cert = _data_file(user["client-certificate-data"], ".crt", temp)
        if user.get("client-key-data"):
            key = _data_file(user["client-key-data"], ".key", temp)
        if cert and key:
            ctx.load_cert_chain(cert, key)
        for f in temp:
            os.unlink(f)
        return cls(cluster["server"], ctx, str(user.get("token") or ""))

    async def _http(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
            connector = aiohttp.TCPConnector(ssl=self.ssl_context, limit=32)
            self._session = aiohttp.ClientSession(
                connector=connector, headers=headers, timeout=aiohttp.ClientTimeout(total=30)
            )
        return self._session

    async def request(
        self, method: str, path: str, *, body: Any = None, params: Mapping[str, str] | None = None,
        content_type: str = "application/json",
    ) -> Any:
        session = await self._http()
        data = json.dumps(body) if body is not None else None
        headers = {"Content-Type": content_type} if data is not None else {}
        try:
            async with session.request(method, self.server + path, data=data, params=params, headers=headers) as resp:
                text = await resp.text()
                if resp.status >= 400:
                    try:
                        status = json.loads(text)
                        message, reason = status.get("message", text), status.get("reason", "")
                    except ValueError:
                        message, reason = text, ""
                    raise KubeError(resp.status, f"{method} {path}: {resp.status} {message}", reason)
                return json.loads(text) if text else None
        except aiohttp.ClientError as exc:
            raise KubeError(0, f"{method} {path}: {exc}") from exc

    # -- the calls the operator makes --

    async def list_pods(self, namespace: str, label_selector: str) -> list[dict[str, Any]]:
        ns = f"/namespaces/{namespace}" if namespace else ""
        out = await self.request("GET", f"/api/v1{ns}/pods", params={"labelSelector": label_selector})
        return list(out.get("items") or [])

    async def create_pod(self, pod: Mapping[str, Any]) -> dict[str, Any]:
        ns = pod["metadata"]["namespace"]
        return dict(await self.request("POST", f"/api/v1/namespaces/{ns}/pods", body=pod))

    async def get_pod(self, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            return dict(await self.request("GET", f"/api/v1/namespaces/{namespace}/pods/{name}"))
        except KubeError as exc:
            if exc.status == 404:
                return None
            raise

    async def patch_pod(self, namespace: str, name: str, patch: Mapping[str, Any]) -> None:
        await self.request("PATCH", f"/api/v1/namespaces/{namespace}/pods/{name}", body=patch,
                           content_type="application/merge-patch+json")

    async def delete_pod(self, namespace: str, name: str, uid: str = "", grace_s: int | None = None) -> bool:
        """Delete a pod (only this incarnation when `uid` is given); False when it was already gone."""
        body: dict[str, Any] = {"kind": "DeleteOptions", "apiVersion": "v1"}
        if uid:
            body["preconditions"] = {"uid": uid}
        if grace_s is not None:
            body["gracePeriodSeconds"] = grace_s
        try:
            await self.request("DELETE", f"/api/v1/namespaces/{namespace}/pods/{name}", body=body)
        except KubeError as exc:
            if exc.status in (404, 409):
                return False
            raise
        return True

    async def get_custom(self, group: str, version: str, plural: str, name: str, namespace: str = "") -> Any:
        ns = f"/namespaces/{namespace}" if namespace else ""
        try:
            return await self.request("GET", f"/apis/{group}/{version}{ns}/{plural}/{name}")
        except KubeError as exc:
            if exc.status == 404:
                return None
            raise

    async def list_custom(self, group: str, version: str, plural: str, namespace: str = "") -> list[dict[str, Any]]:
        ns = f"/namespaces/{namespace}" if namespace else ""
        out = await self.request("GET", f"/apis/{group}/{version}{ns}/{plural}")
        return list(out.get("items") or [])

    async def patch_custom(
        self, group: str, version: str, plural: str, name: str, patch: Mapping[str, Any], namespace: str = "",
        *, subresource: str = "",
    ) -> None:
        """A merge patch of a custom object (its `status` with subresource="status")."""
        ns = f"/namespaces/{namespace}" if namespace else ""
        sub = f"/{subresource}" if subresource else ""
        await self.request("PATCH", f"/apis/{group}/{version}{ns}/{plural}/{name}{sub}", body=patch,
                           content_type="application/merge-patch+json")

    async def list_nodes(self) -> tuple[list[dict[str, Any]], str]:
        """All Nodes and the list's resourceVersion (to watch from)."""
        out = await self.request("GET", "/api/v1/nodes")
        return list(out.get("items") or []), str((out.get("metadata") or {}).get("resourceVersion") or "")

    async def watch(self, path: str, resource_version: str, timeout_s: int = 300) -> AsyncIterator[dict[str, Any]]:
        """Watch events (`{"type": ..., "object": ...}`) of a collection from `resource_version`
        until the server ends the stream. A 410 (too old) comes as KubeError(410) or as an ERROR
        event whose object is a Status with code 410: list again."""
        session = await self._http()
        params = {"watch": "1", "resourceVersion": resource_version, "timeoutSeconds": str(timeout_s),
                  "allowWatchBookmarks": "true"}
        try:
            async with session.get(self.server + path, params=params,
                                   timeout=aiohttp.ClientTimeout(total=None, sock_read=timeout_s + 30)) as resp:
                if resp.status >= 400:
                    raise KubeError(resp.status, f"WATCH {path}: {resp.status} {(await resp.text())[:300]}")
                buf = b""
                async for chunk in resp.content.iter_any():  # lines may exceed aiohttp's readline limit
                    buf += chunk
                    while b"\n" in buf:
                        line, buf = buf.split(b"\n", 1)
                        if line.strip():
                            yield json.loads(line)
        except aiohttp.ClientError as exc:
            raise KubeError(0, f"WATCH {path}: {exc}") from exc

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

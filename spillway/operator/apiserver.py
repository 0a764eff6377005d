"""The operator's calls to the Kubernetes API server, through the official client's asyncio API
(`kubernetes.aio`), so every way of logging in that kubectl knows works here too: client
certificates, bearer tokens, `exec` credential plugins (EKS, GKE, AKS, SSO logins), OIDC, and
the in-cluster service account.

Credentials are kept current (`Credentials`): an exec plugin runs again when its credential
expires or when the API server answers 401; a token file (the in-cluster service account's, or
a kubeconfig's `tokenFile`) is read again when it changes, since bound service-account tokens
rotate. kopf watches and posts events with its own client; the reconcile's pods, custom
objects and the Node watch go through this one, so it never blocks the loop. Objects come
and go as the API server's JSON (dicts), as the engine reads them.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
from kubernetes.aio import client
from kubernetes.aio.config import incluster_config
from kubernetes.aio.config.config_exception import ConfigException
from kubernetes.aio.config.kube_config import KubeConfigLoader, _get_kube_config_loader_for_yaml_file

log = logging.getLogger(__name__)

SA_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")
MERGE_PATCH = "application/merge-patch+json"


class KubeError(RuntimeError):
    """An API call failed; `status` is the HTTP status (409 AlreadyExists, 404 NotFound, ...; 0
    when the API server could not be reached)."""

    def __init__(self, status: int, message: str, reason: str = "") -> None:
        super().__init__(message)
        self.status = status
        self.reason = reason


class Credentials:
    """Keeps the configuration's bearer token current (the client calls `refresh` before each
    request through `Configuration.refresh_api_key_hook`)."""

    def __init__(self, loader: KubeConfigLoader | None = None, token_file: str = "") -> None:
        self.loader = loader if loader is not None and loader._user is not None and "exec" in loader._user else None
        self.token_file = token_file
        self._stale = False
        self._token_stat: tuple[int, int] | None = None
        self.refreshes = 0  # how many times a new credential was taken (exec run or file re-read)

    def install(self, configuration: client.Configuration) -> None:
        if self.token_file:
            self._read_token_file(configuration)
        if self.loader is not None or self.token_file:
            configuration.refresh_api_key_hook = self.refresh  # type: ignore[assignment]

    def invalidate(self) -> None:
        """The API server said 401: take a new credential before the next request."""
        self._stale = True
        self._token_stat = None

    async def refresh(self, configuration: client.Configuration) -> None:
        if self.loader is not None:
            expiry = getattr(self.loader, "exec_plugin_expiry", None)
            if self._stale and expiry is not None:
                del self.loader.exec_plugin_expiry  # run the plugin again, whatever it said
            if self._stale or expiry is not None:
                # Without an expiry the credential is kept until the API server refuses it.
                await self.loader.load_from_exec_plugin()
                if getattr(self.loader, "token", None):
                    configuration.api_key["BearerToken"] = self.loader.token
                self.refreshes += int(self._stale or expiry != getattr(self.loader, "exec_plugin_expiry", None))
        if self.token_file:
            self._read_token_file(configuration)
        self._stale = False

    def _read_token_file(self, configuration: client.Configuration) -> None:
        try:
            st = os.stat(self.token_file)
        except OSError as exc:
            log.warning("cannot read the token file", extra={"path": self.token_file, "error": str(exc)})
            return
        sig = (st.st_mtime_ns, st.st_ino)
        if sig == self._token_stat:
            return
        token = Path(self.token_file).read_text().strip()
        if not token:
            return
        if self._token_stat is not None:
            self.refreshes += 1
            log.info("token file changed: using the new token", extra={"path": self.token_file})
        self._token_stat = sig
        configuration.api_key["BearerToken"] = f"Bearer {token}"


@dataclass(frozen=True)
class Login:
    """What another client (kopf's) needs to log in as this one does."""

    server: str
    ca_path: str | None
    insecure: bool
    token: str | None
    certificate_path: str | None
    private_key_path: str | None


def _token_file(loader: KubeConfigLoader, kubeconfig: str) -> str:
    path = loader._user.safe_get("tokenFile") if loader._user else None
    if not path:
        return ""
    p = Path(str(path))
    return str(p if p.is_absolute() else Path(kubeconfig).resolve().parent / p)


def _source(kubeconfig: str | None, env: Mapping[str, str], service_account_dir: Path) -> tuple[str, bool]:
    """(the kubeconfig to load, False) or (the service account's directory, True)."""
    path = kubeconfig or env.get("KUBECONFIG") or str(Path.home() / ".kube" / "config")
    if Path(path).is_file():
        return path, False
    if env.get("KUBERNETES_SERVICE_HOST") and (service_account_dir / "token").is_file():
        return str(service_account_dir), True
    raise RuntimeError(f"no Kubernetes credentials: {path} does not exist and this is not a pod; set KUBECONFIG")


class ApiServer:
    def __init__(self, api: client.ApiClient, credentials: Credentials | None = None) -> None:
        self.api = api
        self.credentials = credentials or Credentials()
        self.core = client.CoreV1Api(api)
        self.custom = client.CustomObjectsApi(api)

    @classmethod
    async def connect(
        cls, kubeconfig: str | None = None, *, service_account_dir: Path = SA_DIR,
        environ: Mapping[str, str] | None = None,
    ) -> ApiServer:
        """From `kubeconfig`, else $KUBECONFIG, else ~/.kube/config, else the in-cluster service
        account (`service_account_dir` and $KUBERNETES_SERVICE_HOST/PORT)."""
        env = os.environ if environ is None else environ
        path, in_cluster = _source(kubeconfig, env, service_account_dir)
        configuration = client.Configuration()
        if not in_cluster:
            try:
                loader = _get_kube_config_loader_for_yaml_file(path, persist_config=False)
                await loader.load_and_set(configuration)
            except (ConfigException, KeyError, ValueError) as exc:
                raise RuntimeError(f"kubeconfig {path}: {exc}") from exc
            credentials = Credentials(loader, _token_file(loader, path))
        elif path:
            try:
                incluster_config.InClusterConfigLoader(
                    token_filename=str(service_account_dir / "token"),
                    cert_filename=str(service_account_dir / "ca.crt"), try_refresh_token=False, environ=env,
                ).load_and_set(configuration)
            except ConfigException as exc:
                raise RuntimeError(f"in-cluster configuration: {exc}") from exc
            credentials = Credentials(token_file=str(service_account_dir / "token"))
        credentials.install(configuration)
        return cls(client.ApiClient(configuration), credentials)

    async def _call(self, what: str, call: Callable[[], Awaitable[Any]], *, stream: bool = False) -> Any:
        """Run one raw API call (a `*_without_preload_content` method) and return its JSON body
        (or, with `stream`, the open response); a 401 takes a new credential and tries once more."""
        for attempt in (1, 2):
            try:
                resp = await call()
            except client.ApiException as exc:  # raised before a response (e.g. a refused connection)
                raise KubeError(exc.status or 0, f"{what}: {exc.reason or exc}") from exc
            except (aiohttp.ClientError, TimeoutError, OSError) as exc:
                raise KubeError(0, f"{what}: {exc}") from exc
            if resp.status == 401 and attempt == 1:
                resp.release()
                self.credentials.invalidate()
                continue
            if resp.status >= 400:
                text = (await resp.read()).decode(errors="replace")
                resp.release()
                try:
                    status = json.loads(text)
                    message, reason = status.get("message", text), status.get("reason", "")
                except ValueError:
                    message, reason = text, ""
                raise KubeError(resp.status, f"{what}: {resp.status} {message}", reason)
            if stream:
                return resp
            try:
                body = await resp.read()
            except (aiohttp.ClientError, TimeoutError) as exc:
                raise KubeError(0, f"{what}: {exc}") from exc
            finally:
                resp.release()
            return json.loads(body) if body else None
        raise AssertionError("unreachable")

    async def login(self, *, fresh: bool = False) -> Login:
        """The credentials this client uses now (`fresh`: take new ones first: the last ones
        were refused)."""
        cfg = self.api.configuration
        if fresh:
            self.credentials.invalidate()
        await self.credentials.refresh(cfg)
        header = str(cfg.api_key.get("BearerToken") or "")
        token = header.split(" ", 1)[1] if header.lower().startswith("bearer ") else header
        return Login(cfg.host, cfg.ssl_ca_cert, not cfg.verify_ssl, token or None, cfg.cert_file, cfg.key_file)

    # -- the calls the operator makes --

    async def list_pods(self, namespace: str, label_selector: str) -> list[dict[str, Any]]:
        core = self.core
        if namespace:
            out = await self._call(f"list pods in {namespace}",
                                   lambda: core.list_namespaced_pod_without_preload_content(
                                       namespace, label_selector=label_selector))
        else:
            out = await self._call("list pods", lambda: core.list_pod_for_all_namespaces_without_preload_content(
                label_selector=label_selector))
        return list(out.get("items") or [])

    async def create_pod(self, pod: Mapping[str, Any]) -> dict[str, Any]:
        ns = pod["metadata"]["namespace"]
        body = client.V1Pod.from_dict(dict(pod))
        assert body is not None
        return dict(await self._call(f"create pod {ns}/{pod['metadata']['name']}",
                                     lambda: self.core.create_namespaced_pod_without_preload_content(ns, body)))

    async def get_pod(self, namespace: str, name: str) -> dict[str, Any] | None:
        core = self.core
        try:
            return dict(await self._call(f"get pod {namespace}/{name}",
                                         lambda: core.read_namespaced_pod_without_preload_content(name, namespace)))
        except KubeError as exc:
            if exc.status == 404:
                return None
            raise

    async def patch_pod(self, namespace: str, name: str, patch: Mapping[str, Any]) -> None:
        core = self.core
        await self._call(f"patch pod {namespace}/{name}", lambda: core.patch_namespaced_pod_without_preload_content(
            name, namespace, dict(patch), _content_type=MERGE_PATCH))

    async def delete_pod(self, namespace: str, name: str, uid: str = "", grace_s: int | None = None) -> bool:
        """Delete a pod (only this incarnation when `uid` is given); False when it was already gone."""
        body = client.V1DeleteOptions(api_version="v1", kind="DeleteOptions", grace_period_seconds=grace_s,
                                      preconditions=client.V1Preconditions(uid=uid) if uid else None)
        core = self.core
        try:
            await self._call(f"delete pod {namespace}/{name}",
                             lambda: core.delete_namespaced_pod_without_preload_content(name, namespace, body=body))
        except KubeError as exc:
            if exc.status in (404, 409):
                return False
            raise
        return True

    async def get_custom(self, group: str, version: str, plural: str, name: str, namespace: str = "") -> Any:
        what = f"get {plural} {namespace + '/' if namespace else ''}{name}"
        try:
            if namespace:
                return await self._call(what, lambda: self.custom.get_namespaced_custom_object_without_preload_content(
                    group, version, namespace, plural, name))
            return await self._call(what, lambda: self.custom.get_cluster_custom_object_without_preload_content(
                group, version, plural, name))
        except KubeError as exc:
            if exc.status == 404:
                return None
            raise

    async def list_custom(self, group: str, version: str, plural: str, namespace: str = "",
                          label_selector: str = "") -> list[dict[str, Any]]:
        custom = self.custom
        if namespace:
            out = await self._call(f"list {plural} in {namespace}",
                                   lambda: custom.list_namespaced_custom_object_without_preload_content(
                                       group, version, namespace, plural, label_selector=label_selector or None))
        else:
            out = await self._call(f"list {plural}", lambda: custom.list_cluster_custom_object_without_preload_content(
                group, version, plural, label_selector=label_selector or None))
        return list(out.get("items") or [])

    async def create_custom(self, group: str, version: str, plural: str, body: Mapping[str, Any],
                            namespace: str) -> dict[str, Any]:
        """Create a namespaced object of any API group (ResourceClaims too); KubeError(409) when
        one of that name exists."""
        name = (body.get("metadata") or {}).get("name")
        return dict(await self._call(f"create {plural} {namespace}/{name}",
                                     lambda: self.custom.create_namespaced_custom_object_without_preload_content(
                                         group, version, namespace, plural, dict(body))))

    async def delete_custom(self, group: str, version: str, plural: str, name: str, namespace: str,
                            uid: str = "") -> bool:
        """Delete a namespaced object (only this incarnation when `uid` is given); False when it
        was already gone (or is another incarnation)."""
        body = client.V1DeleteOptions(api_version="v1", kind="DeleteOptions",
                                      preconditions=client.V1Preconditions(uid=uid) if uid else None)
        try:
            await self._call(f"delete {plural} {namespace}/{name}",
                             lambda: self.custom.delete_namespaced_custom_object_without_preload_content(
                                 group, version, namespace, plural, name, body=body))
        except KubeError as exc:
            if exc.status in (404, 409):
                return False
            raise
        return True

    async def serves(self, group: str, version: str) -> bool:
        """Whether the API server serves `group/version` (discovery)."""
        try:
            await self._call(f"discover {group}/{version}",
                             lambda: self.custom.get_api_resources_without_preload_content(group, version))
        except KubeError as exc:
            if exc.status == 404:
                return False
            raise
        return True

    async def patch_custom(
        self, group: str, version: str, plural: str, name: str, patch: Mapping[str, Any], namespace: str = "",
        *, subresource: str = "",
    ) -> None:
        """A merge patch of a custom object (its `status` with subresource="status")."""
        if subresource not in ("", "status"):
            raise ValueError(f"subresource {subresource!r}: only the status subresource is patched")
        what, body = f"patch {plural} {namespace + '/' if namespace else ''}{name}", dict(patch)
        if namespace:
            method = (self.custom.patch_namespaced_custom_object_status_without_preload_content if subresource
                      else self.custom.patch_namespaced_custom_object_without_preload_content)
            await self._call(what, lambda: method(group, version, namespace, plural, name, body,
                                                  _content_type=MERGE_PATCH))
        else:
            cmethod = (self.custom.patch_cluster_custom_object_status_without_preload_content if subresource
                       else self.custom.patch_cluster_custom_object_without_preload_content)
            await self._call(what, lambda: cmethod(group, version, plural, name, body, _content_type=MERGE_PATCH))

    async def list_nodes(self) -> tuple[list[dict[str, Any]], str]:
        """All Nodes and the list's resourceVersion (to watch from)."""
        out = await self._call("list nodes", lambda: self.core.list_node_without_preload_content())
        return list(out.get("items") or []), str((out.get("metadata") or {}).get("resourceVersion") or "")

    async def watch_nodes(self, resource_version: str, timeout_s: int = 300) -> AsyncIterator[dict[str, Any]]:
        """Watch events (`{"type": ..., "object": ...}`) of the Nodes from `resource_version` until
        the server ends the stream. A 410 (too old) comes as KubeError(410) or as an ERROR event
        whose object is a Status with code 410: list again."""
        resp = await self._call("watch nodes", lambda: self.core.list_node_without_preload_content(
            watch=True, resource_version=resource_version, timeout_seconds=timeout_s, allow_watch_bookmarks=True,
            _request_timeout=float(timeout_s + 30)), stream=True)
        try:
            buf = b""
            async for chunk in resp.content.iter_any():  # lines may exceed aiohttp's readline limit
                buf += chunk
                while b"\n" in buf:
                    line, buf = buf.split(b"\n", 1)
                    if line.strip():
                        yield json.loads(line)
        except (TimeoutError, aiohttp.ClientError) as exc:
            raise KubeError(0, f"watch nodes: {exc}") from exc
        finally:
            resp.release()

    async def close(self) -> None:
        await self.api.close()

"""Which pod and container an Allocate is for.

The kubelet's Allocate carries device IDs only. Like other device plugins that must know the
pod, we look at the pods bound to this node (Kubernetes API). The kubelet admits one pod at a
time and calls Allocate once per container that asks for `spillway.dev/peer-hbm`, in its
allocation order: init containers first, then app containers, each in spec order
(kubelet devicemanager `Allocate`, topologymanager scope). So a pod's candidate container is the
first asking container, in that order, that is not yet marked in our `spillway.dev/allocation`
annotation; the pod is a candidate when that container asks for exactly the allocated number of
units. Pods whose admission is under way (some containers marked) come first, then the oldest
pod, as the kubelet admits pods in creation order. A pod with a failed Allocate (an `error`
mark) is rejected by the kubelet and is not offered again. The plugin marks the chosen
container (with the pod's resourceVersion as a precondition, so a concurrent writer makes the
mark fail instead of taking the container twice).

The operator's reservation (one per pod) belongs to the pod's first app container that asks
(`reservation_container`); init containers never claim it.

`pod_candidates` is the pure rule; `PodSource` talks to the API server (the synchronous
kubernetes client, in a worker thread).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from spillway.deviceplugin import ANN_ALLOCATION, ANN_LENDERS, ANN_NODE, ANN_RESERVATION, ANN_TOKEN, RESOURCE_NAME

log = logging.getLogger(__name__)

TERMINAL_PHASES = frozenset({"Succeeded", "Failed"})

# Container roles, as the kubelet's device manager treats them.
ROLE_INIT = "init"        # an init container that runs to completion before the app containers
ROLE_SIDECAR = "sidecar"  # a restartable init container (restartPolicy: Always): runs beside the app
ROLE_APP = "app"


class PodSourceError(RuntimeError):
    """The Kubernetes API did not answer as needed."""


def _split(value: str | None) -> tuple[str, ...]:
    return tuple(part.strip() for part in (value or "").split(",") if part.strip())


@dataclass(frozen=True)
class PodRef:
    namespace: str
    name: str
    uid: str
    resource_version: str
    created: str
    container: str
    units: int
    reservations: tuple[str, ...] = ()
    tokens: tuple[str, ...] = ()
    reservation_node: str = ""
    lender_gpus: tuple[str, ...] = ()
    allocation: Mapping[str, Any] = field(default_factory=dict)
    role: str = ROLE_APP   # ROLE_INIT, ROLE_SIDECAR or ROLE_APP

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"


@dataclass(frozen=True)
class AskingContainer:
    name: str
    units: int
    role: str


def _units(container: Mapping[str, Any]) -> int:
    resources = container.get("resources") or {}
    for part in ("limits", "requests"):
        value = (resources.get(part) or {}).get(RESOURCE_NAME)
        if value is not None:
            try:
                return int(str(value))
            except ValueError:
                return -1
    return 0


def parse_allocation(annotations: Mapping[str, str]) -> dict[str, Any]:
    try:
        value = json.loads(annotations.get(ANN_ALLOCATION) or "{}")
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def asking_containers(spec: Mapping[str, Any]) -> list[AskingContainer]:
    """The containers that ask for peer-hbm units, in the order the kubelet allocates them:
    init containers, then app containers, each in spec order."""
    out: list[AskingContainer] = []
    for c in spec.get("initContainers") or []:
        role = ROLE_SIDECAR if c.get("restartPolicy") == "Always" else ROLE_INIT
        if _units(c):
            out.append(AskingContainer(c.get("name", ""), _units(c), role))
    for c in spec.get("containers") or []:
        if _units(c):
            out.append(AskingContainer(c.get("name", ""), _units(c), ROLE_APP))
    return out


def reservation_container(spec: Mapping[str, Any]) -> str:
    """The container that claims the pod's reservation: its first app container that asks."""
    return next((c.name for c in asking_containers(spec) if c.role == ROLE_APP), "")


def pod_candidates(pods: Iterable[Mapping[str, Any]], units: int, prefer: Iterable[str] = ()) -> list[PodRef]:
    """For each pod, its next unmarked asking container when that one asks for `units`.
    Order: pods in `prefer` ("namespace/name", e.g. the pod whose init container's units this
    Allocate reuses), then pods whose admission is under way, then the oldest."""
    preferred = set(prefer)
    found: list[tuple[bool, PodRef]] = []
    for pod in pods:
        meta = pod.get("metadata") or {}
        if meta.get("deletionTimestamp") or (pod.get("status") or {}).get("phase") in TERMINAL_PHASES:
            continue
        annotations = meta.get("annotations") or {}
        taken = parse_allocation(annotations)
        if any(isinstance(v, dict) and v.get("result") == "error" for v in taken.values()):
            continue  # an Allocate of this pod failed: the kubelet rejected it
        spec = pod.get("spec") or {}
        nxt = next((c for c in asking_containers(spec) if c.name not in taken), None)
        if nxt is None or nxt.units != units:
            continue
        claimed = any(isinstance(v, dict) and v.get("result") == "reservation" for v in taken.values())
        owns = nxt.name == reservation_container(spec) and not claimed
        found.append((bool(taken), PodRef(
            namespace=meta.get("namespace", ""),
            name=meta.get("name", ""),
            uid=meta.get("uid", ""),
            resource_version=meta.get("resourceVersion", ""),
            created=meta.get("creationTimestamp", ""),
            container=nxt.name,
            units=units,
            reservations=_split(annotations.get(ANN_RESERVATION)) if owns else (),
            tokens=_split(annotations.get(ANN_TOKEN)) if owns else (),
            reservation_node=(annotations.get(ANN_NODE) or "").strip(),
            lender_gpus=_split(annotations.get(ANN_LENDERS)),
            allocation=taken,
            role=nxt.role,
        )))
    # RFC 3339 timestamps in UTC sort as text.
    found.sort(key=lambda f: (f[1].key not in preferred, not f[0], f[1].created, f[1].namespace, f[1].name))
    return [ref for _, ref in found]


def completed_init_containers(pods: Iterable[Mapping[str, Any]]) -> set[tuple[str, str]]:
    """(pod uid, container) of the init containers (not sidecars) that completed (exit code 0):
    the kubelet does not run them again, so their leases can go."""
    out: set[tuple[str, str]] = set()
    for pod in pods:
        meta = pod.get("metadata") or {}
        sidecars = {c.get("name") for c in (pod.get("spec") or {}).get("initContainers") or []
                    if c.get("restartPolicy") == "Always"}
        for st in (pod.get("status") or {}).get("initContainerStatuses") or []:
            done = ((st.get("state") or {}).get("terminated") or {})
            if done and done.get("exitCode") == 0 and st.get("name") not in sidecars:
                out.add((meta.get("uid", ""), st.get("name", "")))
    return out


class PodSource:
    """The pods bound to one node, from the Kubernetes API (in-cluster or a kubeconfig)."""

    def __init__(self, node: str, kubeconfig: str | None = None, timeout_s: float = 10.0) -> None:
        from kubernetes import client, config

        self.node = node
        self.timeout_s = timeout_s
        configuration = client.Configuration()
        if kubeconfig is None and os.environ.get("KUBERNETES_SERVICE_HOST"):
            config.load_incluster_config(client_configuration=configuration)
        else:
            config.load_kube_config(config_file=kubeconfig, client_configuration=configuration)
        self._api = client.CoreV1Api(client.ApiClient(configuration))

    @staticmethod
    def configured(kubeconfig: str | None) -> bool:
        """Whether there is a Kubernetes API to talk to."""
        if kubeconfig or os.environ.get("KUBERNETES_SERVICE_HOST") or os.environ.get("KUBECONFIG"):
            return True
        return os.path.exists(os.path.expanduser("~/.kube/config"))

    def _list(self) -> list[dict[str, Any]]:
        from kubernetes.client.exceptions import ApiException
        from urllib3.exceptions import HTTPError

        try:
            resp = self._api.list_pod_for_all_namespaces(
                field_selector=f"spec.nodeName={self.node}", _preload_content=False,
                _request_timeout=self.timeout_s)
            items: list[dict[str, Any]] = json.loads(resp.data).get("items") or []  # type: ignore[attr-defined]
            return items
        except (ApiException, HTTPError, OSError, ValueError) as exc:
            raise PodSourceError(f"cannot list the pods of node {self.node} from the Kubernetes API: "
                                 f"{_api_error(exc)}") from exc

    async def candidates(self, units: int, prefer: Iterable[str] = ()) -> list[PodRef]:
        return pod_candidates(await asyncio.to_thread(self._list), units, prefer)

    async def completed_init_containers(self) -> set[tuple[str, str]]:
        return completed_init_containers(await asyncio.to_thread(self._list))

    def _patch(self, ref: PodRef, entry: Mapping[str, Any], check_version: bool) -> bool:
        from kubernetes.client.exceptions import ApiException
        from urllib3.exceptions import HTTPError

        allocation = dict(ref.allocation)
        allocation[ref.container] = dict(entry)
        meta: dict[str, Any] = {"annotations": {ANN_ALLOCATION: json.dumps(allocation, sort_keys=True)}}
        if check_version:
            meta["resourceVersion"] = ref.resource_version
        try:
            self._api.patch_namespaced_pod(ref.name, ref.namespace, {"metadata": meta},
                                           _request_timeout=self.timeout_s)
            return True
        except ApiException as exc:
            if exc.status == 409 and check_version:
                return False
            raise PodSourceError(f"cannot mark pod {ref.key}: {_api_error(exc)}") from exc
        except (HTTPError, OSError) as exc:
            raise PodSourceError(f"cannot mark pod {ref.key}: {_api_error(exc)}") from exc

    async def mark(self, ref: PodRef, entry: Mapping[str, Any]) -> bool:
        """Mark the pod's container as taken; False when the pod changed since it was read."""
        return await asyncio.to_thread(self._patch, ref, entry, True)

    async def update_mark(self, ref: PodRef, entry: Mapping[str, Any]) -> None:
        """Rewrite our mark (after the agent answered); the container is already ours."""
        await asyncio.to_thread(self._patch, ref, entry, False)


def _api_error(exc: BaseException) -> str:
    status = getattr(exc, "status", None)
    reason = getattr(exc, "reason", None)
    body = getattr(exc, "body", None)
    if status is not None:
        message = ""
        try:
            message = json.loads(body or "{}").get("message", "")
        except ValueError:
            message = str(body or "")[:200]
        return f"HTTP {status} {reason or ''}: {message}".strip()
    return str(exc) or type(exc).__name__

"""Wires the DRA driver's parts together and runs them until cancelled."""

from __future__ import annotations

import logging
import os
from collections.abc import Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from spillway.agent.server import borrower_paths
from spillway.deviceplugin.resources import ResourceManager
from spillway.deviceplugin.state import AllocationStore
from spillway.dra.kubelet import DEFAULT_PLUGINS_DIR, DEFAULT_REGISTRY_DIR, KubeletPluginServer
from spillway.dra.metrics import Metrics
from spillway.dra.prepare import ClaimSource, PrepareConfig, Preparer
from spillway.dra.slices import SliceApi, SlicePublisher
from spillway.metrics import HttpEndpoint

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Config:
    node: str
    agent_socket: str
    agent_socket_host_dir: str = ""          # default: the directory of agent_socket
    borrower_socket: str = ""                # the agent's borrower socket; default: borrower/ beside agent_socket
    borrower_socket_host_dir: str = ""       # its directory on the host; default: borrower/ in agent_socket_host_dir
    registry_dir: Path = DEFAULT_REGISTRY_DIR
    plugins_dir: Path = DEFAULT_PLUGINS_DIR
    cdi_dir: Path = Path("/var/run/cdi")
    state_dir: Path | None = None            # None: keep the lease record in memory only
    kubeconfig: str | None = None            # None: in-cluster, $KUBECONFIG or ~/.kube/config
    kubelet_plugin: bool = True              # False: only publish ResourceSlices
    metrics_port: int | None = None
    metrics_host: str = "127.0.0.1"
    agent_poll_s: float = 1.0
    publish_interval_s: float = 0.5
    lease_ttl_s: float = 0.0


def api_client(kubeconfig: str | None) -> Any:
    """A `kubernetes` ApiClient: in-cluster when running in a pod, else the kubeconfig."""
    from kubernetes import client, config

    configuration = client.Configuration()
    if kubeconfig is None and os.environ.get("KUBERNETES_SERVICE_HOST"):
        config.load_incluster_config(client_configuration=configuration)
    else:
        config.load_kube_config(config_file=kubeconfig, client_configuration=configuration)
    return client.ApiClient(configuration)


class DraDriver:
    def __init__(self, config: Config, api: Any = None) -> None:
        self.config = config
        api = api if api is not None else api_client(config.kubeconfig)
        # The device plugin's agent follower (Watch + poll). Its units only wake the publisher
        # early on a change of a GiB or more; the publisher also polls every publish interval.
        self.metrics = Metrics(config.node)
        self.resources = ResourceManager(config.agent_socket, 1 << 30, self.metrics, poll_s=config.agent_poll_s)
        self.publisher = SlicePublisher(config.node, self.resources, SliceApi(api),
                                        interval_s=config.publish_interval_s, metrics=self.metrics)
        self.store = AllocationStore(config.state_dir)
        borrower, host_dir = borrower_paths(config.agent_socket, config.agent_socket_host_dir, config.borrower_socket,
                                            config.borrower_socket_host_dir)
        self.preparer = Preparer(
            PrepareConfig(node=config.node, agent_socket=config.agent_socket, borrower_socket=borrower,
                          borrower_socket_host_dir=host_dir,
                          cdi_dir=config.cdi_dir, lease_ttl_s=config.lease_ttl_s),
            self.resources, ClaimSource(api), self.store, self.metrics)
        self.server = KubeletPluginServer(self.preparer, registry_dir=config.registry_dir,
                                          plugins_dir=config.plugins_dir)
        self.http = HttpEndpoint(self.metrics.registry, self.ready)

    def ready(self) -> str:
        if not self.resources.agent_up:
            return f"agent unreachable: {self.resources.agent_error}"
        if self.publisher.error:
            return f"cannot write the ResourceSlice: {self.publisher.error[:200]}"
        return ""

    def _jobs(self) -> dict[str, Coroutine[Any, Any, None]]:
        jobs = {"resourceslices": self.publisher.run()}
        if self.config.kubelet_plugin:
            jobs |= {"kubelet": self.server.run(), "renew": self.preparer.renew_forever()}
        return jobs

    async def run(self) -> None:
        await self.resources.run_with(self._jobs, self.http, self.config.metrics_port, self.config.metrics_host)

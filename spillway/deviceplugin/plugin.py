"""Wires the device plugin's parts together and runs them until cancelled."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from spillway.agent.server import borrower_paths
from spillway.deviceplugin.allocator import Allocator, AllocatorConfig
from spillway.deviceplugin.metrics import Metrics
from spillway.deviceplugin.podresources import Attributor
from spillway.deviceplugin.pods import PodSource
from spillway.deviceplugin.resources import ResourceManager
from spillway.deviceplugin.server import DevicePluginService, PluginServer
from spillway.deviceplugin.state import AllocationStore
from spillway.metrics import HttpEndpoint

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Config:
    node: str
    agent_socket: str
    kubelet_dir: Path
    pod_resources_socket: Path
    unit_bytes: int
    cdi: bool = False
    agent_socket_host_dir: str = ""      # the admin socket's directory on the host; default: its directory here
    borrower_socket: str = ""            # the agent's borrower socket; default: borrower/ beside agent_socket
    borrower_socket_host_dir: str = ""   # its directory on the host; default: borrower/ in agent_socket_host_dir
    state_dir: Path | None = None        # None: keep the allocation record in memory only
    kubeconfig: str | None = None        # None: in-cluster, $KUBECONFIG or ~/.kube/config
    use_kubernetes: bool = True
    metrics_port: int | None = None
    metrics_host: str = "127.0.0.1"
    agent_poll_s: float = 1.0
    kubelet_poll_s: float = 0.25
    sync_interval_s: float = 5.0
    release_grace_s: float = 30.0
    lease_ttl_s: float = 0.0


class DevicePlugin:
    def __init__(self, config: Config, metrics: Metrics | None = None) -> None:
        self.config = config
        self.metrics = metrics or Metrics(config.node)
        self.resources = ResourceManager(config.agent_socket, config.unit_bytes, self.metrics,
                                         poll_s=config.agent_poll_s)
        self.store = AllocationStore(config.state_dir)
        pods: PodSource | None = None
        if config.use_kubernetes and PodSource.configured(config.kubeconfig):
            pods = PodSource(config.node, config.kubeconfig)
        else:
            log.warning("no Kubernetes API configured: Allocate cannot see pods, so it leases without "
                        "reservations; pod names come from the PodResources API later")
        self.pods = pods
        borrower, host_dir = borrower_paths(config.agent_socket, config.agent_socket_host_dir, config.borrower_socket,
                                            config.borrower_socket_host_dir)
        self.allocator = Allocator(
            AllocatorConfig(node=config.node, agent_socket=config.agent_socket, borrower_socket=borrower,
                            borrower_socket_host_dir=host_dir, unit_bytes=config.unit_bytes, cdi=config.cdi,
                            lease_ttl_s=config.lease_ttl_s),
            self.resources, pods, self.store, self.metrics)
        self.server = PluginServer(DevicePluginService(self.resources, self.allocator), config.kubelet_dir,
                                   self.metrics, poll_s=config.kubelet_poll_s)
        self.attributor = Attributor(config.pod_resources_socket, self.resources, self.store,
                                     interval_s=config.sync_interval_s, grace_s=config.release_grace_s,
                                     completed_inits=pods.completed_init_containers if pods else None)
        self.http = HttpEndpoint(self.metrics.registry, self.ready)

    def ready(self) -> str:
        if not self.server.registered:
            return "not registered with the kubelet"
        if not self.resources.agent_up:
            return f"agent unreachable: {self.resources.agent_error}"
        return ""

    async def run(self) -> None:
        # Advertise what the agent has before the kubelet asks (`run_with` waits for its first answer).
        await self.resources.run_with(lambda: {"podresources": self.attributor.run(), "kubelet": self.server.run()},
                                      self.http, self.config.metrics_port, self.config.metrics_host)

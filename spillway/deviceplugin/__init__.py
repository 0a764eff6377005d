"""The kubelet device plugin for `spillway.dev/peer-hbm` (see docs/deviceplugin.md).

Parts, in the shape of NVIDIA's k8s-device-plugin:
- `resources`: the resource manager (units from the agent's pool, their IDs and health);
- `server`: the kubelet-facing gRPC server, its registration and kubelet-restart handling;
- `pods`: finds the pod an Allocate is for (Kubernetes API) and marks it;
- `allocator`: Allocate and GetPreferredAllocation (claims reservations at the agent);
- `podresources`: kubelet PodResources client: pod names on leases, leases of gone pods released;
- `state`: the plugin's own record of the leases it handed out (tokens survive a restart);
- `plugin`: wires them together; `cli`: the `spillway deviceplugin` command.
"""

from spillway.contract import (
    ANN_ALLOCATION,
    ANN_LENDERS,
    ANN_NODE,
    ANN_RESERVATION,
    ANN_TOKEN,
    ENV_AGENT_SOCKET,
    ENV_LEASE_ID,
    ENV_LEASE_TOKEN,
    ENV_LENDER_GPUS,
)
from spillway.contract import PEER_HBM_RESOURCE as RESOURCE_NAME

SOCKET_NAME = "spillway-peer-hbm.sock"
KUBELET_SOCKET = "kubelet.sock"
KUBELET_API_VERSION = "v1beta1"  # the kubelet device plugin API (not a Spillway CRD version)
HEALTHY = "Healthy"
UNHEALTHY = "Unhealthy"

# The pod annotations (ANN_*) and the borrower environment (ENV_*) are the processes' shared
# contract: spillway.contract. A container listed in ANN_ALLOCATION is taken, so no second
# Allocate picks it.
__all__ = [
    "ANN_ALLOCATION", "ANN_LENDERS", "ANN_NODE", "ANN_RESERVATION", "ANN_TOKEN", "ENV_AGENT_SOCKET", "ENV_LEASE_ID",
    "ENV_LEASE_TOKEN", "ENV_LENDER_GPUS", "HEALTHY", "KUBELET_API_VERSION", "KUBELET_SOCKET", "RESOURCE_NAME",
    "SOCKET_NAME", "UNHEALTHY",
]

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

RESOURCE_NAME = "spillway.dev/peer-hbm"
SOCKET_NAME = "spillway-peer-hbm.sock"
KUBELET_SOCKET = "kubelet.sock"
API_VERSION = "v1beta1"
HEALTHY = "Healthy"
UNHEALTHY = "Unhealthy"

# Pod annotations written by the operator (spillway/operator/pods.py): comma-separated lists,
# one entry per lease, in the same order.
ANN_RESERVATION = "spillway.dev/reservation"
ANN_TOKEN = "spillway.dev/reservation-token"
ANN_NODE = "spillway.dev/reservation-node"
ANN_LENDERS = "spillway.dev/lender-gpus"
# Written by the device plugin: JSON {container: {"leases": [...], "result": ..., "message": ...}};
# a container listed here is taken, so no second Allocate picks it.
ANN_ALLOCATION = "spillway.dev/allocation"

# Environment of the borrower containers (read by spillway.client).
ENV_LEASE_ID = "SPILLWAY_LEASE_ID"
ENV_LEASE_TOKEN = "SPILLWAY_LEASE_TOKEN"
ENV_AGENT_SOCKET = "SPILLWAY_AGENT_SOCKET"
ENV_LENDER_GPUS = "SPILLWAY_LENDER_GPUS"

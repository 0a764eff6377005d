"""The DRA driver `peer-hbm.spillway.dev` (see docs/dra.md).

Parts:
- `slices`: the node's ResourceSlice (one device per lending GPU, consumable `memory`
  capacity), computed from the agent's pool and kept current by `SlicePublisher`;
- `prepare`: NodePrepareResources / NodeUnprepareResources: claims' consumed capacity into
  leases at the agent, CDI spec files for the container runtime;
- `kubelet`: the kubelet-facing gRPC servers (plugin registration, DRA service v1);
- `plugin`: wires them together; `cli`: the `spillway dra` command.
"""

DRIVER = "peer-hbm.spillway.dev"
CAPACITY = "memory"                 # the consumable capacity of every device
DEVICE_CLASS = DRIVER               # the DeviceClass the chart ships (selects this driver's devices)
# Lease idempotency keys start with this (then the claim UID): the leases of DRA claims.
LEASE_KEY_PREFIX = "dra/"

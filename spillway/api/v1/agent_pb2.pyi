from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class LeaseKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    LEASE_KIND_UNSPECIFIED: _ClassVar[LeaseKind]
    RESERVATION: _ClassVar[LeaseKind]
    ELASTIC: _ClassVar[LeaseKind]

class LeaseState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    LEASE_STATE_UNSPECIFIED: _ClassVar[LeaseState]
    RESERVED: _ClassVar[LeaseState]
    ACTIVE: _ClassVar[LeaseState]
    REVOKING: _ClassVar[LeaseState]
    RELEASED: _ClassVar[LeaseState]
    EXPIRED: _ClassVar[LeaseState]
    REVOKED: _ClassVar[LeaseState]

class P2PStatus(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    P2P_STATUS_UNSPECIFIED: _ClassVar[P2PStatus]
    P2P_OK: _ClassVar[P2PStatus]
    P2P_NOT_SUPPORTED: _ClassVar[P2PStatus]
    P2P_CHIPSET_NOT_SUPPORTED: _ClassVar[P2PStatus]
    P2P_GPU_NOT_SUPPORTED: _ClassVar[P2PStatus]
    P2P_TOPOLOGY_NOT_SUPPORTED: _ClassVar[P2PStatus]
    P2P_DISABLED_BY_REGKEY: _ClassVar[P2PStatus]
    P2P_UNKNOWN: _ClassVar[P2PStatus]
LEASE_KIND_UNSPECIFIED: LeaseKind
RESERVATION: LeaseKind
ELASTIC: LeaseKind
LEASE_STATE_UNSPECIFIED: LeaseState
RESERVED: LeaseState
ACTIVE: LeaseState
REVOKING: LeaseState
RELEASED: LeaseState
EXPIRED: LeaseState
REVOKED: LeaseState
P2P_STATUS_UNSPECIFIED: P2PStatus
P2P_OK: P2PStatus
P2P_NOT_SUPPORTED: P2PStatus
P2P_CHIPSET_NOT_SUPPORTED: P2PStatus
P2P_GPU_NOT_SUPPORTED: P2PStatus
P2P_TOPOLOGY_NOT_SUPPORTED: P2PStatus
P2P_DISABLED_BY_REGKEY: P2PStatus
P2P_UNKNOWN: P2PStatus

class Lease(_message.Message):
    __slots__ = ("id", "holder", "kind", "gpu_uuid", "bytes", "priority", "state", "created_at_ms", "expires_at_ms", "revoke_deadline_ms", "idempotency_key", "pod", "pid", "node_name", "ttl_ms", "reason", "ended_at_ms")
    ID_FIELD_NUMBER: _ClassVar[int]
    HOLDER_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    GPU_UUID_FIELD_NUMBER: _ClassVar[int]
    BYTES_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_MS_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_MS_FIELD_NUMBER: _ClassVar[int]
    REVOKE_DEADLINE_MS_FIELD_NUMBER: _ClassVar[int]
    IDEMPOTENCY_KEY_FIELD_NUMBER: _ClassVar[int]
    POD_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    NODE_NAME_FIELD_NUMBER: _ClassVar[int]
    TTL_MS_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    ENDED_AT_MS_FIELD_NUMBER: _ClassVar[int]
    id: str
    holder: str
    kind: LeaseKind
    gpu_uuid: str
    bytes: int
    priority: int
    state: LeaseState
    created_at_ms: int
    expires_at_ms: int
    revoke_deadline_ms: int
    idempotency_key: str
    pod: str
    pid: int
    node_name: str
    ttl_ms: int
    reason: str
    ended_at_ms: int
    def __init__(self, id: _Optional[str] = ..., holder: _Optional[str] = ..., kind: _Optional[_Union[LeaseKind, str]] = ..., gpu_uuid: _Optional[str] = ..., bytes: _Optional[int] = ..., priority: _Optional[int] = ..., state: _Optional[_Union[LeaseState, str]] = ..., created_at_ms: _Optional[int] = ..., expires_at_ms: _Optional[int] = ..., revoke_deadline_ms: _Optional[int] = ..., idempotency_key: _Optional[str] = ..., pod: _Optional[str] = ..., pid: _Optional[int] = ..., node_name: _Optional[str] = ..., ttl_ms: _Optional[int] = ..., reason: _Optional[str] = ..., ended_at_ms: _Optional[int] = ...) -> None: ...

class GpuProcess(_message.Message):
    __slots__ = ("pid", "used_bytes", "borrower")
    PID_FIELD_NUMBER: _ClassVar[int]
    USED_BYTES_FIELD_NUMBER: _ClassVar[int]
    BORROWER_FIELD_NUMBER: _ClassVar[int]
    pid: int
    used_bytes: int
    borrower: bool
    def __init__(self, pid: _Optional[int] = ..., used_bytes: _Optional[int] = ..., borrower: _Optional[bool] = ...) -> None: ...

class Gpu(_message.Message):
    __slots__ = ("uuid", "index", "name", "total_bytes", "used_bytes", "free_bytes", "local_used_bytes", "local_reserved_bytes", "headroom_bytes", "leased_bytes", "lendable_bytes", "utilization_gpu_percent", "utilization_memory_percent", "processes", "minor_number")
    UUID_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    USED_BYTES_FIELD_NUMBER: _ClassVar[int]
    FREE_BYTES_FIELD_NUMBER: _ClassVar[int]
    LOCAL_USED_BYTES_FIELD_NUMBER: _ClassVar[int]
    LOCAL_RESERVED_BYTES_FIELD_NUMBER: _ClassVar[int]
    HEADROOM_BYTES_FIELD_NUMBER: _ClassVar[int]
    LEASED_BYTES_FIELD_NUMBER: _ClassVar[int]
    LENDABLE_BYTES_FIELD_NUMBER: _ClassVar[int]
    UTILIZATION_GPU_PERCENT_FIELD_NUMBER: _ClassVar[int]
    UTILIZATION_MEMORY_PERCENT_FIELD_NUMBER: _ClassVar[int]
    PROCESSES_FIELD_NUMBER: _ClassVar[int]
    MINOR_NUMBER_FIELD_NUMBER: _ClassVar[int]
    uuid: str
    index: int
    name: str
    total_bytes: int
    used_bytes: int
    free_bytes: int
    local_used_bytes: int
    local_reserved_bytes: int
    headroom_bytes: int
    leased_bytes: int
    lendable_bytes: int
    utilization_gpu_percent: int
    utilization_memory_percent: int
    processes: _containers.RepeatedCompositeFieldContainer[GpuProcess]
    minor_number: int
    def __init__(self, uuid: _Optional[str] = ..., index: _Optional[int] = ..., name: _Optional[str] = ..., total_bytes: _Optional[int] = ..., used_bytes: _Optional[int] = ..., free_bytes: _Optional[int] = ..., local_used_bytes: _Optional[int] = ..., local_reserved_bytes: _Optional[int] = ..., headroom_bytes: _Optional[int] = ..., leased_bytes: _Optional[int] = ..., lendable_bytes: _Optional[int] = ..., utilization_gpu_percent: _Optional[int] = ..., utilization_memory_percent: _Optional[int] = ..., processes: _Optional[_Iterable[_Union[GpuProcess, _Mapping]]] = ..., minor_number: _Optional[int] = ...) -> None: ...

class PeerLink(_message.Message):
    __slots__ = ("gpu_a", "gpu_b", "nvlink", "nvlink_count", "p2p_read", "p2p_write")
    GPU_A_FIELD_NUMBER: _ClassVar[int]
    GPU_B_FIELD_NUMBER: _ClassVar[int]
    NVLINK_FIELD_NUMBER: _ClassVar[int]
    NVLINK_COUNT_FIELD_NUMBER: _ClassVar[int]
    P2P_READ_FIELD_NUMBER: _ClassVar[int]
    P2P_WRITE_FIELD_NUMBER: _ClassVar[int]
    gpu_a: str
    gpu_b: str
    nvlink: bool
    nvlink_count: int
    p2p_read: P2PStatus
    p2p_write: P2PStatus
    def __init__(self, gpu_a: _Optional[str] = ..., gpu_b: _Optional[str] = ..., nvlink: _Optional[bool] = ..., nvlink_count: _Optional[int] = ..., p2p_read: _Optional[_Union[P2PStatus, str]] = ..., p2p_write: _Optional[_Union[P2PStatus, str]] = ...) -> None: ...

class Inventory(_message.Message):
    __slots__ = ("node_name", "backend", "simulated", "gpus", "links", "granularity_bytes", "captured_at_ms", "agent_version", "driver_version")
    NODE_NAME_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    SIMULATED_FIELD_NUMBER: _ClassVar[int]
    GPUS_FIELD_NUMBER: _ClassVar[int]
    LINKS_FIELD_NUMBER: _ClassVar[int]
    GRANULARITY_BYTES_FIELD_NUMBER: _ClassVar[int]
    CAPTURED_AT_MS_FIELD_NUMBER: _ClassVar[int]
    AGENT_VERSION_FIELD_NUMBER: _ClassVar[int]
    DRIVER_VERSION_FIELD_NUMBER: _ClassVar[int]
    node_name: str
    backend: str
    simulated: bool
    gpus: _containers.RepeatedCompositeFieldContainer[Gpu]
    links: _containers.RepeatedCompositeFieldContainer[PeerLink]
    granularity_bytes: int
    captured_at_ms: int
    agent_version: str
    driver_version: str
    def __init__(self, node_name: _Optional[str] = ..., backend: _Optional[str] = ..., simulated: _Optional[bool] = ..., gpus: _Optional[_Iterable[_Union[Gpu, _Mapping]]] = ..., links: _Optional[_Iterable[_Union[PeerLink, _Mapping]]] = ..., granularity_bytes: _Optional[int] = ..., captured_at_ms: _Optional[int] = ..., agent_version: _Optional[str] = ..., driver_version: _Optional[str] = ...) -> None: ...

class GetInventoryRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class AcquireRequest(_message.Message):
    __slots__ = ("size", "holder", "kind", "gpu_uuid", "near_gpu_uuid", "ttl_ms", "priority", "idempotency_key", "pod")
    SIZE_FIELD_NUMBER: _ClassVar[int]
    HOLDER_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    GPU_UUID_FIELD_NUMBER: _ClassVar[int]
    NEAR_GPU_UUID_FIELD_NUMBER: _ClassVar[int]
    TTL_MS_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    IDEMPOTENCY_KEY_FIELD_NUMBER: _ClassVar[int]
    POD_FIELD_NUMBER: _ClassVar[int]
    size: str
    holder: str
    kind: LeaseKind
    gpu_uuid: str
    near_gpu_uuid: str
    ttl_ms: int
    priority: int
    idempotency_key: str
    pod: str
    def __init__(self, size: _Optional[str] = ..., holder: _Optional[str] = ..., kind: _Optional[_Union[LeaseKind, str]] = ..., gpu_uuid: _Optional[str] = ..., near_gpu_uuid: _Optional[str] = ..., ttl_ms: _Optional[int] = ..., priority: _Optional[int] = ..., idempotency_key: _Optional[str] = ..., pod: _Optional[str] = ...) -> None: ...

class AcquireResponse(_message.Message):
    __slots__ = ("lease", "token")
    LEASE_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    lease: Lease
    token: str
    def __init__(self, lease: _Optional[_Union[Lease, _Mapping]] = ..., token: _Optional[str] = ...) -> None: ...

class RenewRequest(_message.Message):
    __slots__ = ("lease_id", "token", "ttl_ms")
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    TTL_MS_FIELD_NUMBER: _ClassVar[int]
    lease_id: str
    token: str
    ttl_ms: int
    def __init__(self, lease_id: _Optional[str] = ..., token: _Optional[str] = ..., ttl_ms: _Optional[int] = ...) -> None: ...

class ReleaseRequest(_message.Message):
    __slots__ = ("lease_id", "token")
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    lease_id: str
    token: str
    def __init__(self, lease_id: _Optional[str] = ..., token: _Optional[str] = ...) -> None: ...

class ClaimRequest(_message.Message):
    __slots__ = ("lease_id", "token", "holder", "pod")
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    HOLDER_FIELD_NUMBER: _ClassVar[int]
    POD_FIELD_NUMBER: _ClassVar[int]
    lease_id: str
    token: str
    holder: str
    pod: str
    def __init__(self, lease_id: _Optional[str] = ..., token: _Optional[str] = ..., holder: _Optional[str] = ..., pod: _Optional[str] = ...) -> None: ...

class ListLeasesRequest(_message.Message):
    __slots__ = ("holder", "include_ended", "gpu_uuid", "page_size", "page_token")
    HOLDER_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_ENDED_FIELD_NUMBER: _ClassVar[int]
    GPU_UUID_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    holder: str
    include_ended: bool
    gpu_uuid: str
    page_size: int
    page_token: str
    def __init__(self, holder: _Optional[str] = ..., include_ended: _Optional[bool] = ..., gpu_uuid: _Optional[str] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListLeasesResponse(_message.Message):
    __slots__ = ("leases", "next_page_token")
    LEASES_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    leases: _containers.RepeatedCompositeFieldContainer[Lease]
    next_page_token: str
    def __init__(self, leases: _Optional[_Iterable[_Union[Lease, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class WatchRequest(_message.Message):
    __slots__ = ("lease_id", "token")
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    lease_id: str
    token: str
    def __init__(self, lease_id: _Optional[str] = ..., token: _Optional[str] = ...) -> None: ...

class WatchEvent(_message.Message):
    __slots__ = ("kind", "sequence", "time_ms", "lease", "inventory", "leases", "snapshot_more")
    class Kind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        KIND_UNSPECIFIED: _ClassVar[WatchEvent.Kind]
        SNAPSHOT: _ClassVar[WatchEvent.Kind]
        LEASE: _ClassVar[WatchEvent.Kind]
        CAPACITY: _ClassVar[WatchEvent.Kind]
    KIND_UNSPECIFIED: WatchEvent.Kind
    SNAPSHOT: WatchEvent.Kind
    LEASE: WatchEvent.Kind
    CAPACITY: WatchEvent.Kind
    KIND_FIELD_NUMBER: _ClassVar[int]
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    TIME_MS_FIELD_NUMBER: _ClassVar[int]
    LEASE_FIELD_NUMBER: _ClassVar[int]
    INVENTORY_FIELD_NUMBER: _ClassVar[int]
    LEASES_FIELD_NUMBER: _ClassVar[int]
    SNAPSHOT_MORE_FIELD_NUMBER: _ClassVar[int]
    kind: WatchEvent.Kind
    sequence: int
    time_ms: int
    lease: Lease
    inventory: Inventory
    leases: _containers.RepeatedCompositeFieldContainer[Lease]
    snapshot_more: bool
    def __init__(self, kind: _Optional[_Union[WatchEvent.Kind, str]] = ..., sequence: _Optional[int] = ..., time_ms: _Optional[int] = ..., lease: _Optional[_Union[Lease, _Mapping]] = ..., inventory: _Optional[_Union[Inventory, _Mapping]] = ..., leases: _Optional[_Iterable[_Union[Lease, _Mapping]]] = ..., snapshot_more: _Optional[bool] = ...) -> None: ...

class ReclaimRequest(_message.Message):
    __slots__ = ("gpu_uuid", "size", "reason", "deadline_ms")
    GPU_UUID_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    DEADLINE_MS_FIELD_NUMBER: _ClassVar[int]
    gpu_uuid: str
    size: str
    reason: str
    deadline_ms: int
    def __init__(self, gpu_uuid: _Optional[str] = ..., size: _Optional[str] = ..., reason: _Optional[str] = ..., deadline_ms: _Optional[int] = ...) -> None: ...

class ReclaimResponse(_message.Message):
    __slots__ = ("revoking", "requested_bytes", "revoking_bytes")
    REVOKING_FIELD_NUMBER: _ClassVar[int]
    REQUESTED_BYTES_FIELD_NUMBER: _ClassVar[int]
    REVOKING_BYTES_FIELD_NUMBER: _ClassVar[int]
    revoking: _containers.RepeatedCompositeFieldContainer[Lease]
    requested_bytes: int
    revoking_bytes: int
    def __init__(self, revoking: _Optional[_Iterable[_Union[Lease, _Mapping]]] = ..., requested_bytes: _Optional[int] = ..., revoking_bytes: _Optional[int] = ...) -> None: ...

class SetGpuLocalRequest(_message.Message):
    __slots__ = ("gpu_uuid", "reserved", "simulated_used")
    GPU_UUID_FIELD_NUMBER: _ClassVar[int]
    RESERVED_FIELD_NUMBER: _ClassVar[int]
    SIMULATED_USED_FIELD_NUMBER: _ClassVar[int]
    gpu_uuid: str
    reserved: str
    simulated_used: str
    def __init__(self, gpu_uuid: _Optional[str] = ..., reserved: _Optional[str] = ..., simulated_used: _Optional[str] = ...) -> None: ...

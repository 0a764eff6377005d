"""Borrower library: a model server's block store on lent GPU memory (`PeerMemory`), with a
host-memory fallback (`HostMemory`). See docs/client.md."""

from spillway.client.peer import (
    KIND_CUDA,
    KIND_HOST_PAGEABLE,
    KIND_HOST_PINNED,
    KIND_SIMULATED,
    HostMemory,
    LeaseUnavailable,
    PeerMemory,
    Stats,
)
from spillway.client.slots import SlotStore
from spillway.client.store import BlockStore, OutOfPeerMemory, StoreError, Transfer, UnknownBlock

__all__ = [
    "KIND_CUDA",
    "KIND_HOST_PAGEABLE",
    "KIND_HOST_PINNED",
    "KIND_SIMULATED",
    "BlockStore",
    "HostMemory",
    "LeaseUnavailable",
    "OutOfPeerMemory",
    "PeerMemory",
    "SlotStore",
    "Stats",
    "StoreError",
    "Transfer",
    "UnknownBlock",
]

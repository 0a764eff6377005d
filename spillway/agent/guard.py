"""What the agent checks before a request reaches the pool: who calls (the role, told by how
the caller connected), whether that role may make the call, and that every field is within
its bound. One place, so no handler can forget a check and the table in docs/agent.md has a
single source (`PERMISSIONS`, tested against the doc).

- **Roles.** `admin`: the agent's admin unix socket (`--socket`; the device plugin, the
  MemoryPool publisher, the CLI of the node's operators) and TCP with mutual TLS (the
  operator; its identity is the certificate's common name). `borrower`: the borrower socket
  (`--borrower-socket`), the only one mounted into borrower pods. The role comes from the
  socket the call arrived on, never from the request.
- **Bounds.** Every string field has a length limit, checked before anything parses it, so a
  700,000-digit size costs a length comparison. Refusals are INVALID_ARGUMENT naming the
  field and the limit and quote at most a short prefix of the input. A message that is not
  valid protobuf is INVALID_ARGUMENT too (`Undecodable`), with a warning and no traceback.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from google.protobuf.message import Message  # type: ignore[import-untyped]

from spillway.agent.pool import PoolError

MAX_MESSAGE_BYTES = 1 << 20  # gRPC receive limit for one request; field limits refuse far less, by name
QUOTE = 40  # characters of a refused input an error message may show


class Role(enum.Enum):
    ADMIN = "admin"
    BORROWER = "borrower"


@dataclass(frozen=True)
class Caller:
    """Who is calling: the role and the identity that scopes its idempotency keys
    (`unix:admin`, `unix:borrower`, `tls:<certificate common name>`)."""

    role: Role
    identity: str

    @property
    def admin(self) -> bool:
        return self.role == Role.ADMIN


# Per-field length limits (characters), checked on every request before parsing. Names are
# the proto field names; a string field missing here gets DEFAULT_LIMIT.
FIELD_LIMITS: dict[str, int] = {
    "size": 64,               # a quantity: "1073741824", "4Gi", "1.5G"
    "reserved": 64,
    "simulated_used": 64,
    "holder": 256,
    "pod": 317,               # namespace (63) / name (253)
    "gpu_uuid": 128,
    "near_gpu_uuid": 128,
    "idempotency_key": 256,
    "lease_id": 64,
    "token": 128,
    "reason": 1024,
    "page_token": 32,
}
DEFAULT_LIMIT = 256


def quote(text: str, n: int = QUOTE) -> str:
    """`text` for an error message: at most `n` characters of it, marked when cut."""
    return repr(text) if len(text) <= n else repr(text[:n]) + f"... ({len(text)} characters)"


def check_bounds(request: Message) -> None:
    """INVALID_ARGUMENT for the first string field over its limit (nothing is parsed before)."""
    for field, value in request.ListFields():
        if isinstance(value, str):
            limit = FIELD_LIMITS.get(field.name, DEFAULT_LIMIT)
            if len(value) > limit:
                raise PoolError("INVALID_ARGUMENT", f"{field.name} is {len(value)} characters long; at most {limit} "
                                f"are accepted (it starts {quote(value, 20)})")


# Which role may call what. "token" means the call must also present the lease's token.
ALL = frozenset({Role.ADMIN, Role.BORROWER})
ADMIN = frozenset({Role.ADMIN})


@dataclass(frozen=True)
class Permission:
    roles: frozenset[Role]
    note: str


PERMISSIONS: dict[str, Permission] = {
    "GetInventory": Permission(ALL, "anyone"),
    "Acquire": Permission(ALL, "anyone; an idempotency key is scoped to the caller's identity"),
    "Renew": Permission(ALL, "the lease's token"),
    "Release": Permission(ALL, "the lease's token"),
    "Claim": Permission(ALL, "the lease's token"),
    "ListLeases": Permission(ADMIN, "admin only (shows every lease and its idempotency key)"),
    "Watch": Permission(ALL, "one lease: its token; every event (no lease_id): admin only"),
    "Reclaim": Permission(ADMIN, "admin only"),
    "SetGpuLocal": Permission(ADMIN, "admin only"),
}


def authorize(method: str, caller: Caller) -> None:
    perm = PERMISSIONS[method]
    if caller.role not in perm.roles:
        raise PoolError("PERMISSION_DENIED", f"{method} needs the admin role (the agent's admin socket or mutual "
                        f"TLS); this call came on the {caller.role.value} socket ({perm.note})")


@dataclass(frozen=True)
class Undecodable:
    """What the safe deserializer returns for bytes that are not a valid request message."""

    message_type: str
    error: str


def safe_decoder(cls: Any) -> Callable[[bytes], Any]:
    """gRPC's request deserializer for `cls` that never raises (gRPC would answer UNKNOWN and
    log a traceback): bad bytes become `Undecodable`, which the handler answers INVALID_ARGUMENT."""
    name = cls.DESCRIPTOR.full_name

    def decode(data: bytes) -> Any:
        try:
            return cls.FromString(data)
        except Exception as exc:  # DecodeError, and whatever else the parser raises
            return Undecodable(name, type(exc).__name__)

    return decode

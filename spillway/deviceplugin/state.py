"""The plugin's record of the leases it handed out at Allocate, with their tokens.

The record lets the plugin renew those leases while their pods live, put pod names on them,
and release them when their pods are gone, also after a restart of the plugin. It is a JSON
file (mode 0600, replaced atomically) in the plugin's state directory, never in the directory
that is mounted into borrower pods.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

STATE_FILE = "allocations.json"


@dataclass
class Allocation:
    lease_ids: list[str]
    tokens: list[str]
    device_ids: list[str]
    gpu_uuids: list[str]
    result: str                   # "reservation" (claimed) or "on_the_spot"
    pod: str = ""                 # "namespace/name"; empty until known
    container: str = ""
    role: str = "app"             # the container's role: "init", "sidecar" or "app" (pods.ROLE_*)
    pod_uid: str = ""
    ttl_s: float = 0.0
    created_at: float = field(default_factory=time.time)
    renewed_at: float = field(default_factory=time.time)

    @property
    def key(self) -> str:
        return ",".join(self.lease_ids)


class AllocationStore:
    def __init__(self, state_dir: Path | None) -> None:
        self.path = state_dir / STATE_FILE if state_dir else None
        self._items: dict[str, Allocation] = {}
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._load()

    def _load(self) -> None:
        assert self.path is not None
        if not self.path.exists():
            return
        try:
            raw = json.loads(self.path.read_text())
            for item in raw.get("allocations", []):
                a = Allocation(**item)
                self._items[a.key] = a
        except (OSError, ValueError, TypeError) as exc:
            # A damaged record must not stop the plugin; its leases still expire at the agent.
            log.error("cannot read the allocation record; starting empty",
                      extra={"path": str(self.path), "error": str(exc)})

    def _save(self) -> None:
        if self.path is None:
            return
        body = json.dumps({"allocations": [asdict(a) for a in self._items.values()]}, indent=1)
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".allocations.")
        try:
            os.fchmod(fd, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(body)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def all(self) -> list[Allocation]:
        return list(self._items.values())

    def add(self, a: Allocation) -> None:
        self._items[a.key] = a
        self._save()

    def update(self, a: Allocation) -> None:
        self._items[a.key] = a
        self._save()

    def remove(self, a: Allocation) -> None:
        if self._items.pop(a.key, None) is not None:
            self._save()

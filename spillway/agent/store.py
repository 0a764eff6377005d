"""Lease table persistence: SQLite in WAL mode under the agent's state directory.

Every pool change is committed here before the call that made it is answered, so a lease
whose Acquire was answered survives a kill -9 of the agent. `synchronous=NORMAL` in WAL
mode is durable against a process crash (the WAL is in the OS page cache); `durable=True`
(`--fsync`) uses `synchronous=FULL` and also survives a power loss, at the cost of an
fsync per call.

Checkpoints (copying the WAL into the database file, with an fsync) do not run inside a
commit, where SQLite runs them by default every 1000 pages and where they stalled an
answer for several milliseconds; the agent calls `checkpoint()` from a worker thread on a
second connection instead.
"""

from __future__ import annotations

import operator
import os
import secrets
import sqlite3
from collections.abc import Iterable
from pathlib import Path

from spillway.agent.pool import Event, Kind, Lease, State

_SCHEMA = """
CREATE TABLE IF NOT EXISTS leases (
  id TEXT PRIMARY KEY,
  holder TEXT NOT NULL,
  kind INTEGER NOT NULL,
  gpu_uuid TEXT NOT NULL,
  bytes INTEGER NOT NULL,
  priority INTEGER NOT NULL,
  state INTEGER NOT NULL,
  created_at_ms INTEGER NOT NULL,
  expires_at_ms INTEGER NOT NULL,
  ttl_ms INTEGER NOT NULL,
  token_hash TEXT NOT NULL,
  node_name TEXT NOT NULL,
  revoke_deadline_ms INTEGER NOT NULL,
  idempotency_key TEXT NOT NULL,
  pod TEXT NOT NULL,
  pid INTEGER NOT NULL,
  reason TEXT NOT NULL,
  ended_at_ms INTEGER NOT NULL,
  seq INTEGER NOT NULL,
  key_scope TEXT NOT NULL DEFAULT '',
  key_fingerprint TEXT NOT NULL DEFAULT ''
);
CREATE TABLE IF NOT EXISTS gpu_local (
  gpu_uuid TEXT PRIMARY KEY,
  reserved INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS meta (
  k TEXT PRIMARY KEY,
  v TEXT NOT NULL
);
"""

_COLUMNS = ("id", "holder", "kind", "gpu_uuid", "bytes", "priority", "state", "created_at_ms", "expires_at_ms",
            "ttl_ms", "token_hash", "node_name", "revoke_deadline_ms", "idempotency_key", "pod", "pid", "reason",
            "ended_at_ms", "seq", "key_scope", "key_fingerprint")
# Columns added after the first release: ALTER TABLE adds them to an older state file.
_ADDED = {"key_scope": "TEXT NOT NULL DEFAULT ''", "key_fingerprint": "TEXT NOT NULL DEFAULT ''"}
_UPSERT = f"INSERT OR REPLACE INTO leases ({', '.join(_COLUMNS)}) VALUES ({', '.join('?' for _ in _COLUMNS)})"
_ROW = operator.attrgetter(*_COLUMNS)  # Kind and State are IntEnums, which sqlite3 stores as integers


class Store:
    """The lease table. `path=None` keeps it in memory (tests of the pure parts only)."""

    def __init__(self, path: Path | None, *, durable: bool = False) -> None:
        self.path = path
        if path is not None:
            private_files(path)
        self.db = sqlite3.connect(str(path) if path else ":memory:", isolation_level=None, check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute(f"PRAGMA synchronous={'FULL' if durable else 'NORMAL'}")
        self.db.executescript(_SCHEMA)
        have = {row[1] for row in self.db.execute("PRAGMA table_info(leases)")}
        for column, decl in _ADDED.items():
            if column not in have:
                self.db.execute(f"ALTER TABLE leases ADD COLUMN {column} {decl}")
        self.commits = 0  # transactions since the last checkpoint
        self._checkpointer: sqlite3.Connection | None = None
        if path is not None:
            self.db.execute("PRAGMA wal_autocheckpoint=0")  # see checkpoint()
            self._checkpointer = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)

    def load(self) -> tuple[list[Lease], dict[str, int]]:
        rows = self.db.execute(f"SELECT {', '.join(_COLUMNS)} FROM leases").fetchall()
        leases = []
        for row in rows:
            d = dict(zip(_COLUMNS, row, strict=True))
            d["kind"] = Kind(d["kind"])
            d["state"] = State(d["state"])
            leases.append(Lease(**d))
        reserved = dict(self.db.execute("SELECT gpu_uuid, reserved FROM gpu_local").fetchall())
        return leases, reserved

    def apply(self, events: Iterable[Event], reserved: dict[str, int] | None = None) -> None:
        """Commit the leases changed by these events (one transaction), and the GPUs' local
        reservations when given."""
        upserts: dict[str, Lease] = {}
        forgets: set[str] = set()
        for ev in events:
            if ev.lease is None:
                continue
            if ev.kind == "forget":
                forgets.add(ev.lease.id)
                upserts.pop(ev.lease.id, None)
            else:
                upserts[ev.lease.id] = ev.lease
                forgets.discard(ev.lease.id)
        if not upserts and not forgets and reserved is None:
            return
        with self.db:
            self.db.execute("BEGIN")
            if upserts:
                self.db.executemany(_UPSERT, [_ROW(x) for x in upserts.values()])
            if forgets:
                self.db.executemany("DELETE FROM leases WHERE id = ?", [(i,) for i in forgets])
            if reserved is not None:
                self.db.executemany("INSERT OR REPLACE INTO gpu_local (gpu_uuid, reserved) VALUES (?, ?)",
                                    list(reserved.items()))
        self.commits += 1

    def checkpoint(self, mode: str = "PASSIVE") -> tuple[int, int, int]:
        """Copy committed WAL frames into the database file; safe from another thread while
        commits go on (PASSIVE never blocks them). Returns SQLite's (busy, wal frames,
        frames checkpointed)."""
        if self._checkpointer is None:
            return 0, 0, 0
        self.commits = 0
        row = self._checkpointer.execute(f"PRAGMA wal_checkpoint({mode})").fetchone()
        return int(row[0]), int(row[1]), int(row[2])

    def close(self) -> None:
        if self._checkpointer is not None:
            self.checkpoint("TRUNCATE")
            self._checkpointer.close()
        self.db.close()


def private_files(db: Path) -> None:
    """The lease table names holders, pods, idempotency keys and token hashes: only the agent's
    user may read it. Creates the database file mode 0600 before SQLite opens it (SQLite gives
    its -wal and -shm files the database file's mode) and tightens files an older agent left
    0644."""
    db.parent.mkdir(parents=True, exist_ok=True)
    os.close(os.open(db, os.O_WRONLY | os.O_CREAT, 0o600))
    for path in (db, db.with_name(db.name + "-wal"), db.with_name(db.name + "-shm")):
        try:
            if path.stat().st_mode & 0o077:
                path.chmod(0o600)
        except FileNotFoundError:
            pass


def load_or_create_key(state_dir: Path | None) -> bytes:
    """The agent's token key: 32 random bytes in `<state-dir>/agent.key` (mode 0600)."""
    if state_dir is None:
        return secrets.token_bytes(32)
    path = state_dir / "agent.key"
    try:
        data = path.read_bytes()
        if len(data) == 32:
            return data
    except FileNotFoundError:
        pass
    state_dir.mkdir(parents=True, exist_ok=True)
    data = secrets.token_bytes(32)
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return data

"""The attach socket: how a borrower process tells the agent its PID.

The agent listens on `<agent socket>.attach` (a unix stream socket). A borrower connects,
sends one JSON line `{"lease_id": ..., "token": ...}`, and keeps the connection open while it
uses the lease. The agent learns the borrower's PID in its own PID namespace from the
kernel (SO_PEERCRED), so a process cannot claim another's PID; it records the PID on the
lease (so the nvml backend's local use excludes the borrower's memory) and clears it when
the connection closes. Replies are one JSON line: `{"ok": true, "pid": N, "lease": {...}}` or
`{"ok": false, "code": "PERMISSION_DENIED", "error": "..."}`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger("spillway.agent.attach")

MAX_LINE = 4096
MAX_NESTING = 4  # brackets and braces a request line may hold: it is one flat object
FIELD_LIMITS = {"lease_id": 64, "token": 128}  # as on the gRPC sockets (spillway.agent.guard)


def attach_socket_path(agent_socket: str | Path) -> Path:
    text = str(agent_socket).removeprefix("unix://").removeprefix("unix:")
    return Path(text + ".attach")


def peer_pid(sock: socket.socket) -> int:
    """The connected peer's PID, as the kernel saw it at connect time (Linux SO_PEERCRED)."""
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, _uid, _gid = struct.unpack("3i", creds)
    return int(pid)


class AttachError(RuntimeError):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


@dataclass
class Attachment:
    """An open attachment; the agent counts the PID as a borrower until `close()`."""

    pid: int
    lease_id: str
    gpu_uuid: str
    sock: socket.socket

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> Attachment:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def attach(agent_socket_path: str | Path, lease_id: str, token: str, *, timeout: float = 10.0) -> Attachment:
    """Attach this process to a lease (sync). Raises AttachError with the agent's status code."""
    path = attach_socket_path(agent_socket_path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect(str(path))
        sock.sendall((json.dumps({"lease_id": lease_id, "token": token}) + "\n").encode())
        buf = b""
        while not buf.endswith(b"\n"):
            chunk = sock.recv(MAX_LINE)
            if not chunk:
                break
            buf += chunk
        reply = json.loads(buf or b"{}")
    except (OSError, ValueError) as exc:
        sock.close()
        raise AttachError("UNAVAILABLE", f"cannot attach through {path}: {exc}") from exc
    if not reply.get("ok"):
        sock.close()
        raise AttachError(str(reply.get("code", "UNKNOWN")), str(reply.get("error", "no reply from the agent")))
    sock.settimeout(None)
    lease = reply.get("lease") or {}
    return Attachment(pid=int(reply["pid"]), lease_id=lease_id, gpu_uuid=str(lease.get("gpu_uuid", "")), sock=sock)


def parse_request(line: bytes) -> tuple[str, str]:
    """(lease_id, token) of one request line; ValueError says what is wrong. Bounded before
    parsing: the line's length by the reader's limit, its nesting here (a deeply nested line
    would otherwise exhaust the JSON parser's recursion)."""
    if not line.endswith(b"\n"):
        raise ValueError(f"the line must end with a newline and hold at most {MAX_LINE} bytes")
    if line.count(b"[") + line.count(b"{") > MAX_NESTING:
        raise ValueError("the request is nested too deeply: one flat object with two strings is expected")
    try:
        req = json.loads(line)
    except RecursionError as exc:  # pragma: no cover - the nesting check comes first
        raise ValueError("the request is nested too deeply") from exc
    if not isinstance(req, dict):
        raise ValueError("not a JSON object")
    out = []
    for name, limit in FIELD_LIMITS.items():
        value = req.get(name, "")
        if not isinstance(value, str):
            raise ValueError(f"{name} must be a string")
        if len(value) > limit:
            raise ValueError(f"{name} is {len(value)} characters long; at most {limit} are accepted")
        out.append(value)
    return out[0], out[1]


class AttachServer:
    """Agent side. `on_attach(lease_id, token, pid) -> lease dict` raises on refusal (an
    exception with `.code` and `.message`); `on_detach(lease_id, pid)` runs when the
    connection closes."""

    def __init__(self, path: Path, on_attach: Callable[[str, str, int], dict[str, Any]],
                 on_detach: Callable[[str, int], None]) -> None:
        self.path = path
        self.on_attach = on_attach
        self.on_detach = on_detach
        self._server: asyncio.AbstractServer | None = None
        self._conns: set[asyncio.StreamWriter] = set()

    async def start(self) -> None:
        self.path.unlink(missing_ok=True)
        self._server = await asyncio.start_unix_server(self._handle, path=str(self.path), limit=MAX_LINE)
        self.path.chmod(0o660)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            for w in list(self._conns):
                w.close()
            await self._server.wait_closed()
            self._server = None
        self.path.unlink(missing_ok=True)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._conns.add(writer)
        attached: tuple[str, int] | None = None
        try:
            sock = writer.get_extra_info("socket")
            pid = peer_pid(sock)
            try:
                line = await asyncio.wait_for(reader.readline(), 10.0)
                lease_id, token = parse_request(line)
            except (ValueError, TimeoutError, asyncio.LimitOverrunError) as exc:
                hint = 'send one JSON line {"lease_id": ..., "token": ...}'
                log.warning("attach request refused", extra={"pid": pid, "error": str(exc)[:200]})
                await self._reply(writer, {"ok": False, "code": "INVALID_ARGUMENT", "error": f"{hint} ({exc})"})
                return
            try:
                lease = self.on_attach(lease_id, token, pid)
            except Exception as exc:
                await self._reply(writer, {"ok": False, "code": getattr(exc, "code", "INTERNAL"),
                                           "error": getattr(exc, "message", str(exc))})
                return
            attached = (lease_id, pid)
            await self._reply(writer, {"ok": True, "pid": pid, "lease": lease})
            while await reader.read(MAX_LINE):
                pass  # the borrower keeps the connection; anything it sends is ignored
        except (ConnectionError, OSError):
            pass
        except Exception:  # never let one connection take the server down; log and close it
            log.exception("attach connection failed")
        finally:
            self._conns.discard(writer)
            if attached is not None:
                try:
                    self.on_detach(*attached)
                except Exception:  # never let a detach crash the server
                    log.exception("detach failed")
            writer.close()

    @staticmethod
    async def _reply(writer: asyncio.StreamWriter, obj: dict[str, Any]) -> None:
        writer.write((json.dumps(obj) + "\n").encode())
        await writer.drain()

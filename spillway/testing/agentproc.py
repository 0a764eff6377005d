"""A real agent in a subprocess, for tests and benchmarks (simulated GPU backend).

with AgentProcess() as agent:          # python -m spillway agent --backend simulated ...
    async with agent.client() as c:
        await c.inventory()
    agent.kill(); agent.start()        # SIGKILL, then the same state dir again
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import TracebackType

import grpc

from spillway.agent.client import AgentClient
from spillway.api.v1 import agent_pb2, agent_pb2_grpc
from spillway.pki import TlsFiles, write_mtls_dir

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_TOPOLOGY = REPO_ROOT / "examples" / "topologies" / "dgx-h100.yaml"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class AgentProcess:
    def __init__(
        self,
        *,
        topology: str | Path = DEFAULT_TOPOLOGY,
        node_name: str = "sim-node-0",
        tcp: bool = False,
        extra_args: list[str] | None = None,
        workdir: str | Path | None = None,
        start_timeout: float = 60.0,
    ) -> None:
        self.topology = Path(topology)
        self.node_name = node_name
        self.extra_args = list(extra_args or [])
        self._own_dir = workdir is None
        # unix socket paths are limited to 107 bytes: keep the directory short
        self.dir = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="spw-agent-", dir="/tmp"))
        self.socket = self.dir / "agent.sock"  # admin role
        self.borrower_socket = self.dir / "borrower" / "agent.sock"  # borrower role (the agent's default)
        self.attach_socket = Path(str(self.socket) + ".attach")
        self.state_dir = self.dir / "state"
        self.log_path = self.dir / "agent.log"
        self.metrics_port = free_port()
        self.start_timeout = start_timeout
        self.endpoint = ""
        self.tls: TlsFiles | None = None
        self._server_tls: TlsFiles | None = None
        if tcp:
            self._server_tls, self.tls = write_mtls_dir(self.dir / "tls")
            self.endpoint = f"127.0.0.1:{free_port()}"
        self.proc: subprocess.Popen[bytes] | None = None

    def command(self) -> list[str]:
        cmd = [
            sys.executable,
            "-m",
            "spillway",
            "agent",
            "--backend",
            "simulated",
            "--topology",
            str(self.topology),
            "--node-name",
            self.node_name,
            "--socket",
            str(self.socket),
            "--state-dir",
            str(self.state_dir),
            "--metrics-port",
            str(self.metrics_port),
        ]
        if self.endpoint and self._server_tls:
            t = self._server_tls
            cmd += [
                "--listen",
                self.endpoint,
                "--tls-cert",
                str(t.cert),
                "--tls-key",
                str(t.key),
                "--tls-ca",
                str(t.ca),
            ]
        return cmd + self.extra_args

    def start(self) -> AgentProcess:
        if self.proc is not None and self.proc.poll() is None:
            return self
        env = dict(os.environ)
        env["PYTHONPATH"] = str(REPO_ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        log = open(self.log_path, "ab")
        try:
            self.proc = subprocess.Popen(
                self.command(), stdout=log, stderr=subprocess.STDOUT, env=env, cwd=str(REPO_ROOT)
            )
        finally:
            log.close()
        self._wait_ready()
        return self

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.start_timeout
        last = ""
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"agent exited with {self.proc.returncode}:\n{self.logs()[-4000:]}")
            if self.socket.exists() and self.attach_socket.exists() and self.borrower_socket.exists():
                try:
                    with grpc.insecure_channel(f"unix:{self.socket}") as ch:
                        agent_pb2_grpc.AgentStub(ch).GetInventory(agent_pb2.GetInventoryRequest(), timeout=2)
                    return
                except grpc.RpcError as exc:
                    last = str(exc)
            time.sleep(0.05)
        raise TimeoutError(f"agent did not answer within {self.start_timeout}s ({last}):\n{self.logs()[-4000:]}")

    def logs(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def stop(self, timeout: float = 15.0) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def kill(self) -> None:
        """SIGKILL: no shutdown code runs."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()
        self.proc = None

    def restart(self) -> AgentProcess:
        self.stop()
        return self.start()

    def signal(self, sig: int) -> None:
        if self.proc is not None:
            self.proc.send_signal(sig)

    def client(self) -> AgentClient:
        """A client with the admin role (the admin socket)."""
        return AgentClient(str(self.socket))

    def borrower_client(self) -> AgentClient:
        """A client with the borrower role (the socket borrower pods get)."""
        return AgentClient(str(self.borrower_socket))

    def tcp_client(self) -> AgentClient:
        if not self.endpoint:
            raise RuntimeError("this AgentProcess was started without tcp=True")
        return AgentClient(self.endpoint, tls=self.tls)

    def cleanup(self) -> None:
        self.stop()
        if self._own_dir:
            shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> AgentProcess:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.cleanup()

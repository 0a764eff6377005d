"""The `spillway pool` / `lease` / `gpu` commands against a real agent subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from spillway.testing.agentproc import AgentProcess

ROOT = Path(__file__).resolve().parents[1]


def spillway(*args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "spillway", *args], capture_output=True, text=True, env=env,
                          timeout=60, cwd=ROOT)


def test_lease_lifecycle_and_pool_show(agent: AgentProcess) -> None:
    sock = ["--socket", str(agent.socket)]
    r = spillway("lease", "acquire", "--bytes", "4Gi", "--holder", "cli-test", "--ttl", "90s", *sock)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].startswith("lease l-") and "4Gi" in lines[0] and "RESERVED" in lines[0]
    lease_id = lines[0].split()[1]
    token = lines[1].removeprefix("token ")
    assert len(token) == 64

    r = spillway("pool", "show", *sock)
    assert r.returncode == 0, r.stderr
    assert "SIMULATED" in r.stdout and "LENDABLE" in r.stdout and lease_id in r.stdout and "cli-test" in r.stdout

    r = spillway("pool", "show", "-o", "json", *sock)
    doc = json.loads(r.stdout)
    assert doc["simulated"] is True and len(doc["gpus"]) == 8
    assert [x["id"] for x in doc["leases"]] == [lease_id]
    assert sum(int(g["leased_bytes"]) for g in doc["gpus"]) == 4 << 30

    r = spillway("lease", "renew", lease_id, "--token", token, "--ttl", "2m", "-o", "json", *sock)
    assert r.returncode == 0 and json.loads(r.stdout)["ttl_ms"] == "120000"
    r = spillway("lease", "claim", lease_id, "--token", token, "--pod", "ns/pod-a", *sock)
    assert r.returncode == 0 and "ACTIVE" in r.stdout and "ns/pod-a" in r.stdout
    r = spillway("lease", "release", lease_id, "--token", "wrong", *sock)
    assert r.returncode == 1 and "PERMISSION_DENIED" in r.stderr and "token" in r.stderr
    r = spillway("lease", "release", lease_id, "--token", token, *sock)
    assert r.returncode == 0 and "RELEASED" in r.stdout
    r = spillway("lease", "list", *sock)
    assert r.returncode == 0 and r.stdout.strip() == "no leases"
    r = spillway("lease", "list", "--all", "-o", "json", *sock)
    assert [x["state"] for x in json.loads(r.stdout)] == ["RELEASED"]


def test_bad_quantity_shows_accepted_forms(agent: AgentProcess) -> None:
    r = spillway("lease", "acquire", "--bytes", "4GB", "--holder", "x", "--socket", str(agent.socket))
    assert r.returncode == 2
    assert "4Gi" in r.stderr and "512Mi" in r.stderr and "'4GB'" in r.stderr
    r = spillway("lease", "acquire", "--bytes", "4Gi", "--holder", "x", "--ttl", "soon", "--socket", str(agent.socket))
    assert r.returncode == 2 and "5s" in r.stderr


def test_no_room_prints_largest(agent: AgentProcess) -> None:
    r = spillway("lease", "acquire", "--bytes", "79Gi", "--holder", "x", "--socket", str(agent.socket))
    assert r.returncode == 1
    assert "RESOURCE_EXHAUSTED" in r.stderr and "largest grantable now: 77440Mi" in r.stderr


def test_gpu_set_local_and_reclaim(agent: AgentProcess) -> None:
    sock = ["--socket", str(agent.socket)]
    doc = json.loads(spillway("pool", "show", "-o", "json", *sock).stdout)
    gpu = doc["gpus"][0]["uuid"]
    r = spillway("lease", "acquire", "--bytes", "10Gi", "--holder", "x", "--gpu", gpu, "--kind", "elastic", *sock)
    assert r.returncode == 0, r.stderr
    r = spillway("gpu", "set-local", gpu, "--simulated-used", "20Gi", *sock)
    assert r.returncode == 0 and "local used 20Gi" in r.stdout
    r = spillway("gpu", "reclaim", gpu, "--bytes", "1Gi", "--deadline", "30s", *sock)
    assert r.returncode == 0 and "revoking 10Gi in 1 lease(s)" in r.stdout and "REVOKING" in r.stdout


def test_agent_unreachable_is_explained(tmp_path: Path) -> None:
    r = spillway("pool", "show", "--socket", str(tmp_path / "none.sock"))
    assert r.returncode == 1 and "is `spillway agent` running?" in r.stderr


def test_agent_refuses_bad_topology(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("gpus:\n  - {index: 0, memory: lots}\n")
    r = spillway("agent", "--backend", "simulated", "--topology", str(bad), "--socket", str(tmp_path / "a.sock"),
                 "--state-dir", str(tmp_path / "s"))
    assert r.returncode == 1 and "gpus[0]" in r.stderr and "4Gi" in r.stderr


def test_a_socket_path_too_long_for_unix_sockets_is_refused_with_the_limit(tmp_path: Path) -> None:
    deep = tmp_path / ("d" * 60) / ("e" * 60) / "agent.sock"
    r = subprocess.run([sys.executable, "-m", "spillway", "agent", "--socket", str(deep), "--state-dir",
                        str(tmp_path / "state")], capture_output=True, text=True, timeout=60, check=False,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode != 0
    assert f"--socket {deep} is too long" in r.stderr and "at most 107" in r.stderr
    assert not deep.parent.exists()  # refused before anything was created

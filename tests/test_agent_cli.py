"""The `spillway pool` / `lease` / `gpu` commands against a real agent subprocess."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

from spillway.api.v1 import agent_pb2 as pb
from spillway.cli import build_parser, walk
from spillway.testing.agentproc import AgentProcess

ROOT = Path(__file__).resolve().parents[1]


def spillway(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    full = dict(os.environ, PYTHONPATH=str(ROOT), **(env or {}))
    return subprocess.run([sys.executable, "-m", "spillway", *args], capture_output=True, text=True, env=full,
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
    assert r.returncode == 0 and json.loads(r.stdout)["ttl_ms"] == 120000
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


def test_json_and_yaml_parse_back_to_the_same_objects_with_integers_and_stable_keys(agent: AgentProcess) -> None:
    sock = ["--socket", str(agent.socket)]
    r = spillway("lease", "acquire", "--bytes", "3Gi", "--holder", "fmt", "-o", "yaml", *sock)
    assert r.returncode == 0, r.stderr
    acquired = yaml.safe_load(r.stdout)
    assert acquired["lease"]["bytes"] == 3 << 30 and len(acquired["token"]) == 64
    as_json = json.loads(spillway("pool", "show", "-o", "json", *sock).stdout)
    as_yaml = yaml.safe_load(spillway("pool", "show", "-o", "yaml", *sock).stdout)
    # Two calls, two inventories: only the capture time may differ.
    assert as_json.pop("captured_at_ms") > 0 and as_yaml.pop("captured_at_ms") > 0
    assert as_json == as_yaml
    # Integers are numbers (int64 fields too), keys in the .proto's order, every field present.
    assert list(as_json) == [f.name for f in pb.Inventory.DESCRIPTOR.fields if f.name != "captured_at_ms"] + ["leases"]
    gpu = as_json["gpus"][0]
    assert list(gpu) == [f.name for f in pb.Gpu.DESCRIPTOR.fields]
    assert isinstance(gpu["total_bytes"], int) and gpu["total_bytes"] == 85520809984  # H100 80GB, simulated
    (lease,) = as_json["leases"]
    assert list(lease) == [f.name for f in pb.Lease.DESCRIPTOR.fields]
    assert lease["id"] == acquired["lease"]["id"] and lease["bytes"] == 3 << 30 and lease["kind"] == "RESERVATION"
    # The same output twice is byte for byte the same (no reordering between runs).
    a = spillway("lease", "list", "-o", "json", *sock).stdout
    assert a == spillway("lease", "list", "-o", "json", *sock).stdout
    assert json.loads(a) == yaml.safe_load(spillway("lease", "list", "-o", "yaml", *sock).stdout) == [lease]


def test_name_and_wide_outputs(agent: AgentProcess) -> None:
    sock = ["--socket", str(agent.socket)]
    r = spillway("lease", "acquire", "--bytes", "1Gi", "--holder", "names", "-o", "name", *sock)
    assert r.returncode == 0 and r.stdout.startswith("lease/l-"), r.stdout + r.stderr
    lease_id = r.stdout.strip().removeprefix("lease/")
    assert f"lease/{lease_id}" in spillway("lease", "list", "-o", "name", *sock).stdout.split()
    gpus = spillway("pool", "show", "-o", "name", *sock).stdout.split()
    assert len(gpus) == 8 and all(g.startswith("gpu/GPU-") for g in gpus)
    wide = spillway("pool", "show", "-o", "wide", *sock).stdout
    header = next(ln for ln in wide.splitlines() if ln.startswith("IDX"))
    assert "NVLINK PEERS" in header and "UTIL" in header
    assert "CREATED" in spillway("lease", "list", "-o", "wide", *sock).stdout
    assert "NVLINK" not in spillway("pool", "show", *sock).stdout


def test_token_from_a_file_or_the_environment(agent: AgentProcess, tmp_path: Path) -> None:
    sock = ["--socket", str(agent.socket)]
    got = json.loads(spillway("lease", "acquire", "--bytes", "1Gi", "--holder", "tok", "-o", "json", *sock).stdout)
    lease_id, token = got["lease"]["id"], got["token"]
    r = spillway("lease", "renew", lease_id, *sock, env={"SPILLWAY_LEASE_TOKEN": ""})
    assert r.returncode == 2 and "--token-file" in r.stderr and "SPILLWAY_LEASE_TOKEN" in r.stderr
    empty = tmp_path / "empty"
    empty.write_text("\n")
    r = spillway("lease", "renew", lease_id, "--token-file", str(empty), *sock)
    assert r.returncode == 2 and "is empty" in r.stderr
    r = spillway("lease", "renew", lease_id, "--token-file", str(tmp_path / "missing"), *sock)
    assert r.returncode == 2 and "No such file" in r.stderr
    r = spillway("lease", "renew", lease_id, "--token", "a", "--token-file", str(empty), *sock)
    assert r.returncode == 2 and "not allowed with" in r.stderr
    tf = tmp_path / "token"
    tf.write_text(token + "\n")
    r = spillway("lease", "renew", lease_id, "--token-file", str(tf), "-o", "json", *sock)
    assert r.returncode == 0 and json.loads(r.stdout)["state"] == "RESERVED", r.stderr
    r = spillway("lease", "release", lease_id, *sock, env={"SPILLWAY_LEASE_TOKEN": "wrong"})
    assert r.returncode == 1 and "PERMISSION_DENIED" in r.stderr
    r = spillway("lease", "release", lease_id, *sock, env={"SPILLWAY_LEASE_TOKEN": token})
    assert r.returncode == 0 and "RELEASED" in r.stdout, r.stderr


def test_log_level_before_or_after_the_subcommand(tmp_path: Path) -> None:
    missing = ["--socket", str(tmp_path / "none.sock")]
    for argv in (["--log-level", "debug", "pool", "show", *missing], ["pool", "show", *missing, "--log-level=DEBUG"]):
        r = spillway(*argv)
        assert r.returncode == 1 and "level=debug" in r.stderr, (argv, r.stderr)
    r = spillway("pool", "show", *missing)
    assert "level=debug" not in r.stderr
    r = spillway("pool", "show", "--log-level", "loud", *missing)
    assert r.returncode == 2 and "invalid choice: 'loud'" in r.stderr


def test_every_flag_has_help() -> None:
    missing = [(" ".join(path), a.option_strings[0] if a.option_strings else a.dest)
               for path, p in walk(build_parser()) for a in p._actions
               if not isinstance(a, argparse._HelpAction | argparse._SubParsersAction) and not a.help]
    assert missing == [], missing


def test_bash_completion_from_the_parser(tmp_path: Path) -> None:
    script = tmp_path / "spillway.bash"
    r = spillway("completion", "bash")
    assert r.returncode == 0, r.stderr
    script.write_text(r.stdout)
    probe = """source "$1"; shift
t() { COMP_WORDS=("$@"); COMP_CWORD=$((${#COMP_WORDS[@]}-1)); COMPREPLY=(); _spillway; echo "${COMPREPLY[*]}"; }
t spillway ""; t spillway le; t spillway lease ""; t spillway lease acquire --ki; t spillway lease acquire --kind ""
t spillway --log-level w; t spillway pool show -o y; t spillway pool show --socket /x -o ""; t spillway completion ""
complete -p spillway"""
    out = subprocess.run(["bash", "-c", probe, "probe", str(script)], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].split() == ["agent", "pool", "lease", "gpu", "operator", "deviceplugin", "dra", "completion"]
    assert lines[1:9] == ["lease", "acquire renew release claim list", "--kind", "reservation elastic", "warning",
                          "yaml", "table wide json yaml name", "bash"]
    assert lines[9] == "complete -o default -F _spillway spillway"

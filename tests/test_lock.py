"""The lock files (hack/lock.sh): current with requirements*.txt, every pin of those files in
them at the same version, every entry with hashes (pip --require-hashes), the image's lock
without torch, and `make venv` / the Dockerfile installing them with hashes required."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _entries(lock: Path) -> dict[str, tuple[str, list[str]]]:
    """name -> (version, hashes) of a pip requirements file with --hash options."""
    out: dict[str, tuple[str, list[str]]] = {}
    text = re.sub(r"\\\n\s*", " ", lock.read_text())
    for line in text.splitlines():
        m = re.match(r"^([A-Za-z0-9_.\-\[\]]+)==(\S+)(.*)$", line)
        if m:
            name = re.sub(r"[-_.]+", "-", m.group(1).split("[")[0]).lower()
            out[name] = (m.group(2), re.findall(r"--hash=sha256:([0-9a-f]{64})", m.group(3)))
    return out


def _pins(path: Path) -> dict[str, str]:
    pins = {}
    for line in path.read_text().splitlines():
        m = re.match(r"^([A-Za-z0-9_.\-]+)==(\S+)", line.strip())
        if m:
            pins[re.sub(r"[-_.]+", "-", m.group(1)).lower()] = m.group(2)
    return pins


def test_locks_are_current_and_complete() -> None:
    check = subprocess.run([str(REPO / "hack" / "lock.sh"), "--check"], capture_output=True, text=True, cwd=REPO)
    assert check.returncode == 0, check.stderr
    dev, runtime = _entries(REPO / "requirements-dev.lock"), _entries(REPO / "requirements.lock")
    for lock, pins in ((dev, {**_pins(REPO / "requirements.txt"), **_pins(REPO / "requirements-dev.txt")}),
                       (runtime, {k: v for k, v in _pins(REPO / "requirements.txt").items() if k != "torch"})):
        for name, version in pins.items():
            assert name in lock and lock[name][0] == version, f"{name}=={version} not in the lock as pinned"
        bare = [n for n, (_, hashes) in lock.items() if not hashes]
        assert not bare, f"entries without hashes: {bare}"
    assert "torch" in dev and "torch" not in runtime
    assert "setuptools" in runtime, "the image builds its wheel with a hash-checked build backend"
    assert len(dev) > len(_pins(REPO / "requirements-dev.txt")) + 20, "transitive dependencies are locked too"
    # One lock serves amd64 and arm64 nodes: grpcio's manylinux wheels for both are hashed.
    assert len(runtime["grpcio"][1]) > 10
    # vLLM goes in without its dependencies: its lock holds exactly requirements-vllm.txt's pins
    vllm = _entries(REPO / "requirements-vllm.lock")
    assert {n: v for n, (v, _) in vllm.items()} == _pins(REPO / "requirements-vllm.txt")
    assert all(hashes for _, hashes in vllm.values())


def test_check_notices_a_changed_requirement(tmp_path: Path) -> None:
    for name in ("requirements.txt", "requirements-dev.txt", "requirements-vllm.txt", "requirements.lock",
                 "requirements-dev.lock", "requirements-vllm.lock"):
        shutil.copy(REPO / name, tmp_path / name)
    (tmp_path / "hack").mkdir()
    shutil.copy(REPO / "hack" / "lock.sh", tmp_path / "hack" / "lock.sh")
    script = tmp_path / "hack" / "lock.sh"
    assert subprocess.run([str(script), "--check"], capture_output=True).returncode == 0
    with (tmp_path / "requirements-dev.txt").open("a") as f:
        f.write("vllm==0.0.1\n")
    r = subprocess.run([str(script), "--check"], capture_output=True, text=True)
    assert r.returncode == 1 and "requirements-dev.lock is out of date" in r.stderr and "hack/lock.sh" in r.stderr
    assert "requirements.lock is out of date" not in r.stderr, "the runtime lock does not depend on dev pins"


def test_venv_and_image_install_with_hashes_required() -> None:
    makefile = (REPO / "Makefile").read_text()
    assert "--require-hashes -r requirements-dev.lock" in makefile
    assert "--no-deps --require-hashes -r requirements-vllm.lock" in makefile
    assert re.search(r"VENV_KEY .*requirements-dev\.lock", makefile), "a new lock makes a new venv"
    dockerfile = (REPO / "Dockerfile").read_text()
    assert "--require-hashes" in dockerfile and "-r requirements.lock" in dockerfile

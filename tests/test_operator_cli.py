"""`spillway operator` refuses bad flags with a message that says what to fix, before touching anything."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run(*args: str) -> subprocess.CompletedProcess[str]:
    env = {"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"}
    return subprocess.run([sys.executable, "-m", "spillway", "operator", *args], capture_output=True, text=True,
                          cwd=str(REPO), timeout=60, check=False, env=env)


def test_partial_tls_flags_are_refused(tmp_path: Path) -> None:
    cert = tmp_path / "c.crt"
    cert.write_text("x")
    r = run("--tls-cert", str(cert))
    assert r.returncode != 0
    assert "give all of --tls-cert, --tls-key and --tls-ca" in r.stderr


def test_resync_must_be_shorter_than_the_lease_ttl() -> None:
    r = run("--lease-ttl", "10s", "--resync-interval", "30s")
    assert r.returncode != 0
    assert "must be shorter than --lease-ttl" in r.stderr


def test_bad_duration_and_size_name_the_accepted_forms() -> None:
    r = run("--lease-ttl", "ten")
    assert r.returncode != 0 and "duration" in r.stderr and "5s" in r.stderr
    r = run("--slo-step", "lots")
    assert r.returncode != 0 and "quantity" in r.stderr


def test_a_peering_lifetime_kopf_could_not_refresh_in_time_is_refused() -> None:
    r = run("--peering", "p", "--peering-lifetime", "5s")
    assert r.returncode != 0 and "--peering-lifetime 5s is too short" in r.stderr and "at least 15s" in r.stderr

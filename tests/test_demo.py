"""`make demo` end to end: `hack/demo.py --once` starts the whole system, prints the tables, tears down."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from spillway.testing.cluster import ensure_binaries

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.cluster
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_demo_once_places_the_example_tenants(tmp_path: Path) -> None:
    ensure_binaries()
    env = dict(os.environ, PYTHONPATH=str(REPO), SPILLWAY_DEMO_DIR=str(tmp_path / "demo"))
    res = subprocess.run([sys.executable, str(REPO / "hack" / "demo.py"), "--once"], capture_output=True, text=True,
                         env=env, cwd=str(REPO), timeout=840, check=False)
    out = res.stdout
    assert res.returncode == 0, out[-4000:] + res.stderr[-4000:]
    tenants = out.split("$ kubectl get inferencetenants -A", 1)[1].split("$ kubectl", 1)[0]
    rows = [line.split() for line in tenants.strip().splitlines()[1:]]
    names = {r[1] for r in rows}
    assert {"llama-70b-chat", "sdxl", "whisper"} <= names, tenants
    phases = {r[1]: r[4] for r in rows}
    assert all(p in ("Running", "Degraded") for p in phases.values()), tenants
    assert phases["sdxl"] == "Running" and phases["whisper"] == "Running", tenants
    assert sum(p == "Running" for p in phases.values()) >= len(phases) - 1, tenants
    pools = out.split("$ kubectl get memorypools", 1)[1].split("$ ", 1)[0]
    pool_rows = [line for line in pools.strip().splitlines()[1:] if line.strip()]
    assert len(pool_rows) == 2, pools
    header = pools.strip().splitlines()[0].split()
    leased = [row.split()[header.index("LEASED")] for row in pool_rows]
    assert any(x not in ("0", "0B", "<none>") for x in leased), pools
    # The DRA driver's slices beside the pools, and the borrower's claim allocated on a lender GPU.
    slices = out.split("$ kubectl get resourceslices -o wide", 1)[1].split("$ ", 1)[0]
    assert len([line for line in slices.strip().splitlines()[1:] if "peer-hbm.spillway.dev" in line]) == 2, slices
    claims = out.split("$ kubectl get resourceclaims -A", 1)[1].split("$ ", 1)[0]
    assert re.search(r"dra-borrower-kv\s+allocated,reserved", claims), claims
    allocation = out.split("$ kubectl get resourceclaim dra-borrower-kv", 1)[1].split("$ ", 1)[0]
    assert '"consumedCapacity":{"memory":"17179869184"}' in allocation, allocation
    assert "SIMULATED" in out
    assert re.search(r"spillway pool show", out)

"""Spillway's Grafana dashboards (hack/dashboards.py -> charts/spillway/dashboards/*.json):
the committed JSON is what the code builds, the model is sound (ids, grid, datasource and
template variables), every query uses only metric names from docs/metrics.md, and every query
parses (promtool checks them as recording rules). tests/test_dashboards_live.py runs them
against a real Prometheus."""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
DASHBOARDS = REPO / "charts" / "spillway" / "dashboards"
VARIABLES = {"datasource", "cluster", "node", "gpu", "namespace", "tenant"}
# What Grafana puts in place of its own variables when it sends a query; "All" is ".*".
SUBSTITUTIONS = {"$__rate_interval": "5m", "$cluster": ".*", "$namespace": ".*", "$node": ".*", "$gpu": ".*",
                 "$tenant": ".*"}


def generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("spillway_dashboards", REPO / "hack" / "dashboards.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def dashboards() -> dict[str, dict[str, Any]]:
    return {p.name: json.loads(p.read_text()) for p in sorted(DASHBOARDS.glob("*.json"))}


def panels(board: dict[str, Any]) -> list[dict[str, Any]]:
    return [p for p in board["panels"] if p["type"] != "row"]


def queries() -> list[tuple[str, str, str]]:
    """(dashboard file, panel title, expression) for every target of every panel."""
    return [(name, p["title"], t["expr"]) for name, b in dashboards().items() for p in panels(b) for t in p["targets"]]


def concrete(expr: str) -> str:
    for var, value in SUBSTITUTIONS.items():
        expr = expr.replace(var, value)
    assert "$" not in expr, f"unknown variable left in {expr}"
    return expr


def test_committed_json_is_what_hack_dashboards_builds() -> None:
    wanted = generator().render()
    assert set(wanted) == {p.name for p in DASHBOARDS.glob("*.json")}
    for name, text in wanted.items():
        assert (DASHBOARDS / name).read_text() == text, f"{name} drifted: run python hack/dashboards.py"
    check = subprocess.run([sys.executable, str(REPO / "hack" / "dashboards.py"), "--check"], capture_output=True,
                           text=True)
    assert check.returncode == 0, check.stderr


def test_check_mode_notices_drift(tmp_path: Path) -> None:
    for p in DASHBOARDS.glob("*.json"):
        shutil.copy(p, tmp_path / p.name)
    (tmp_path / "pool-overview.json").write_text("{}\n")
    check = subprocess.run([sys.executable, str(REPO / "hack" / "dashboards.py"), "--check", "--out", str(tmp_path)],
                           capture_output=True, text=True)
    assert check.returncode == 1 and "pool-overview.json is out of date" in check.stderr


def test_the_three_dashboards_are_sound() -> None:
    boards = dashboards()
    assert {b["title"] for b in boards.values()} == {
        "Spillway / Pool overview", "Spillway / Tenants and SLOs", "Spillway / Control plane"}
    assert len({b["uid"] for b in boards.values()}) == 3
    for name, board in boards.items():
        variables = {v["name"]: v for v in board["templating"]["list"]}
        assert set(variables) == VARIABLES, name
        assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
        for var in VARIABLES - {"datasource"}:
            v = variables[var]
            assert v["type"] == "query" and v["includeAll"] and v["multi"] and v["allValue"] == ".*"
            assert v["datasource"]["uid"] == "${datasource}"
        ids = [p["id"] for p in board["panels"]]
        assert len(ids) == len(set(ids)), f"{name}: duplicate panel ids"
        cells: set[tuple[int, int]] = set()
        for p in board["panels"]:
            g = p["gridPos"]
            assert 0 <= g["x"] and g["x"] + g["w"] <= 24 and g["h"] > 0, (name, p["title"])
            area = {(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])}
            assert not area & cells, f"{name}: panel {p['title']!r} overlaps another"
            cells |= area
        for p in panels(board):
            assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, (name, p["title"])
            assert p["description"].strip(), f"{name}: panel {p['title']!r} has no description"
            assert p["targets"], (name, p["title"])
            assert [t["refId"] for t in p["targets"]] == [chr(ord("A") + i) for i in range(len(p["targets"]))]
        text = json.dumps(board)
        for var in ("$cluster", "$node"):
            assert var in text, f"{name} never uses {var}"
    # The panels: pool per node and GPU, leases by state, reclaims and revocation
    # latency; per tenant observed vs target, attainment, peer memory, phase; gRPC latency and
    # errors, reconcile latency and errors, Allocate results.
    exprs = " ".join(e for _, _, e in queries())
    for metric in ("spillway_gpu_memory_lendable_bytes", "spillway_leases", "spillway_reclaims_total",
                   "spillway_reclaim_notify_seconds_bucket", "spillway_tenant_slo_observed_seconds",
                   "spillway_tenant_slo_target_seconds", "spillway_tenant_slo_attainment_ratio",
                   "spillway_tenant_peer_memory_bytes", "spillway_operator_tenants",
                   "spillway_lease_operation_duration_seconds_bucket", "spillway_operator_reconciles_total",
                   "spillway_operator_reconcile_duration_seconds_bucket", "spillway_deviceplugin_allocations_total"):
        assert metric in exprs, f"no panel shows {metric}"


def test_queries_use_only_documented_metrics() -> None:
    documented = set(re.findall(r"^\| `(spillway_[a-z_]+)`", (REPO / "docs" / "metrics.md").read_text(), re.M))
    assert documented
    for name, title, expr in queries():
        for metric in re.findall(r"\b(spillway_[a-z_]+)\b", expr):
            family = re.sub(r"_(bucket|sum|count)$", "", metric)
            assert metric in documented or family in documented, f"{name} / {title}: {metric} is not in docs/metrics.md"


def test_every_query_parses_with_promtool(tmp_path: Path) -> None:
    promtool = shutil.which("promtool")
    assert promtool, "promtool is missing: run hack/system-deps.sh"
    found = queries()
    rules = [{"record": f"spillway:dashboard_query_{i}", "expr": concrete(expr)}
             for i, (_, _, expr) in enumerate(found)]
    for board in dashboards().values():
        for v in board["templating"]["list"]:
            if v["type"] == "query":
                m = re.fullmatch(r"label_values\((.*), (\w+)\)", v["query"]["query"])
                assert m, v["query"]["query"]
                rules.append({"record": f"spillway:variable_{len(rules)}", "expr": concrete(m.group(1))})
    path = tmp_path / "dashboard-queries.yaml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboards", "rules": rules}]}))
    r = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"SUCCESS: {len(rules)} rules found" in r.stdout
    # ...and the check can fail.
    path.write_text(yaml.safe_dump({"groups": [{"name": "d", "rules": [
        {"record": "x:y", "expr": "sum(rate(spillway_leases[5m])"}]}]}))
    assert subprocess.run([promtool, "check", "rules", str(path)], capture_output=True).returncode != 0

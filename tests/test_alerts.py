"""Spillway's alert rules (charts/spillway/rules/spillway.rules.yaml) with the real promtool:
they parse, they fire on the series they are for and stay quiet otherwise (`promtool test
rules`), they use only metric names from docs/metrics.md, and each links a runbook section
that docs/operations.md has."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
RULES = REPO / "charts" / "spillway" / "rules" / "spillway.rules.yaml"
OPERATIONS = REPO / "docs" / "operations.md"
RUNBOOK = "https://github.com/spillway/spillway/blob/main/docs/operations.md"
ALERTS = {"SpillwayPoolExhausted", "SpillwayRevocationsPilingUp", "SpillwayAgentHeartbeatLost",
          "SpillwayTenantSLOMissed", "SpillwayOperatorReconcileErrors"}


def promtool() -> str:
    path = shutil.which("promtool")
    assert path, "promtool is missing: run hack/system-deps.sh (Debian package prometheus)"
    return path


def rules() -> list[dict[str, Any]]:
    return [r for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]]


def documented_metrics() -> set[str]:
    return set(re.findall(r"^\| `(spillway_[a-z_]+)`", (REPO / "docs" / "metrics.md").read_text(), re.M))


def metric_names(expr: str) -> set[str]:
    """spillway_* names in a PromQL expression, histogram suffixes folded to the family."""
    names = set(re.findall(r"\b(spillway_[a-z_]+)\b", expr))
    return {re.sub(r"_(bucket|sum|count)$", "", n) if n.endswith(("_bucket", "_sum", "_count")) else n for n in names}


def test_promtool_checks_the_rules() -> None:
    r = subprocess.run([promtool(), "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"SUCCESS: {len(ALERTS)} rules found" in r.stdout


def test_promtool_refuses_a_broken_rule(tmp_path: Path) -> None:
    """The check above can fail: a rule with a PromQL syntax error is refused."""
    broken = tmp_path / "broken.yaml"
    broken.write_text(yaml.safe_dump({"groups": [{"name": "x", "rules": [
        {"alert": "Broken", "expr": "sum by (node (spillway_leases)"}]}]}))
    r = subprocess.run([promtool(), "check", "rules", str(broken)], capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and "parse error" in (r.stdout + r.stderr)


def test_every_alert_has_metrics_severity_and_a_runbook_section() -> None:
    found = {r["alert"] for r in rules()}
    assert found == ALERTS
    known = documented_metrics()
    headings = set(re.findall(r"^#+ (Spillway\w+)", OPERATIONS.read_text(), re.M))
    for rule in rules():
        unknown = metric_names(rule["expr"]) - known
        assert not unknown, f"{rule['alert']} uses metrics that docs/metrics.md does not list: {unknown}"
        assert rule["labels"]["severity"] in ("warning", "critical")
        assert rule["annotations"]["summary"] and rule["annotations"]["description"]
        assert rule["annotations"]["runbook_url"] == f"{RUNBOOK}#{rule['alert'].lower()}"
        assert rule["alert"] in headings, f"docs/operations.md has no runbook section for {rule['alert']}"


def _alert(name: str, labels: dict[str, str], summary: str, description: str) -> dict[str, Any]:
    severity = "critical" if name == "SpillwayAgentHeartbeatLost" else "warning"
    return {"exp_labels": {"severity": severity, **labels},
            "exp_annotations": {"summary": summary, "description": description,
                                "runbook_url": f"{RUNBOOK}#{name.lower()}"}}


def test_alerts_fire_on_their_conditions_and_only_then(tmp_path: Path) -> None:
    """One scenario, evaluated by promtool: n1's pool is exhausted and its agent stopped
    heartbeating after 5 minutes; n2 is healthy apart from holders that miss revocation
    deadlines; tenant a/llm misses its TTFT target but meets TBT; 40 % of reconciles fail."""
    series = {
        'spillway_gpu_memory_lendable_bytes{node="n1",gpu="g0",index="0",simulated="true"}': "0x30",
        'spillway_gpu_memory_lendable_bytes{node="n2",gpu="g1",index="0",simulated="true"}': "68719476736x30",
        'spillway_lease_operations_total{node="n1",method="Acquire",code="RESOURCE_EXHAUSTED"}': "0+5x30",
        'spillway_lease_operations_total{node="n2",method="Acquire",code="OK"}': "0+5x30",
        'spillway_leases{node="n1",state="REVOKING",kind="ELASTIC"}': "6x30",
        'spillway_leases{node="n2",state="ACTIVE",kind="ELASTIC"}': "6x30",
        'spillway_revocations_total{node="n2",outcome="revoked"}': "0+1x30",
        'spillway_revocations_total{node="n1",outcome="released"}': "0+1x30",
        'spillway_agent_heartbeat_timestamp_seconds{node="n1"}': "0+60x5 _x25",
        'spillway_agent_heartbeat_timestamp_seconds{node="n2"}': "0+60x30",
        'spillway_tenant_slo_observed_seconds{namespace="a",tenant="llm",slo="ttft"}': "0.9x30",
        'spillway_tenant_slo_target_seconds{namespace="a",tenant="llm",slo="ttft"}': "0.5x30",
        'spillway_tenant_slo_observed_seconds{namespace="a",tenant="llm",slo="tbt"}': "0.01x30",
        'spillway_tenant_slo_target_seconds{namespace="a",tenant="llm",slo="tbt"}': "0.05x30",
        'spillway_operator_reconciles_total{result="ok"}': "0+6x30",
        'spillway_operator_reconciles_total{result="error"}': "0+4x30",
    }
    revocations = ("On node {n} leases stay in REVOKING, or their holders miss the revocation deadline "
                   '(outcome "revoked"): the lenders\' own tenants wait for their memory.')
    firing = {
        "SpillwayPoolExhausted": [_alert(
            "SpillwayPoolExhausted", {"node": "n1"}, "Spillway pool on node n1 is exhausted",
            "Node n1 has less than 1 GiB of GPU memory left to lend and has refused Acquire calls with "
            "RESOURCE_EXHAUSTED for 10 minutes: tenants that need peer memory there fall back to host memory "
            "or wait.")],
        "SpillwayRevocationsPilingUp": [
            _alert("SpillwayRevocationsPilingUp", {"node": n}, f"Revocations are piling up on node {n}",
                   revocations.format(n=n)) for n in ("n1", "n2")],
        "SpillwayAgentHeartbeatLost": [_alert(
            "SpillwayAgentHeartbeatLost", {"node": "n1"}, "Spillway agent on node n1 stopped heartbeating",
            "The agent on node n1 last refreshed its GPU inventory 15m 0s ago. Its leases cannot be renewed or "
            "reclaimed and its MemoryPool goes stale; the operator stops placing borrowers there.")],
        "SpillwayTenantSLOMissed": [_alert(
            "SpillwayTenantSLOMissed", {"namespace": "a", "tenant": "llm", "slo": "ttft"},
            "Tenant a/llm misses its ttft SLO",
            "The observed ttft percentile of a/llm is 900ms, above its target, for 15 minutes.")],
        "SpillwayOperatorReconcileErrors": [_alert(
            "SpillwayOperatorReconcileErrors", {}, "Spillway operator reconciles fail",
            "40% of InferenceTenant reconciles ended in an error over the last 10 minutes.")],
    }
    tests: list[dict[str, Any]] = []
    for name, alerts in firing.items():
        tests.append({"eval_time": "20m", "alertname": name, "exp_alerts": alerts})
        # Not yet: every alert waits out its `for` before it fires.
        tests.append({"eval_time": "1m", "alertname": name, "exp_alerts": []})
    spec = {
        "rule_files": [str(RULES)],
        "evaluation_interval": "1m",
        "tests": [{"interval": "1m", "input_series": [{"series": s, "values": v} for s, v in series.items()],
                   "alert_rule_test": tests}],
    }
    test_file = tmp_path / "spillway.test.yaml"
    test_file.write_text(yaml.safe_dump(spec, sort_keys=False, width=1000))
    r = subprocess.run([promtool(), "test", "rules", str(test_file)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "SUCCESS" in r.stdout + r.stderr

"""Spillway's Grafana dashboards, as code.

    python hack/dashboards.py           # writes charts/spillway/dashboards/*.json
    python hack/dashboards.py --check   # exits 1 if the files differ from what this builds

Every query uses only the metric names in docs/metrics.md (a test holds that, parses each
query with promtool and runs each against a real Prometheus that scrapes a real agent).
Template variables: datasource, namespace, node, tenant (multi-value, "All" = ".*").
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
OUT_DIR = REPO / "charts" / "spillway" / "dashboards"
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
SCHEMA_VERSION = 39

NODE = 'node=~"$node"'
TENANT = 'namespace=~"$namespace", tenant=~"$tenant"'
RATE = "$__rate_interval"


@dataclass
class Query:
    expr: str
    legend: str = ""
    instant: bool = False


@dataclass
class Panel:
    title: str
    queries: list[Query]
    kind: str = "timeseries"  # timeseries, stat, table, bargauge
    unit: str = "short"
    description: str = ""
    width: int = 12
    height: int = 8
    stack: bool = False
    extra: dict[str, Any] = field(default_factory=dict)


P = Panel
Q = Query
SMALL: dict[str, Any] = {"width": 4, "height": 4}


@dataclass
class Row:
    title: str
    panels: list[Panel]


def _variable(name: str, label: str, query: str) -> dict[str, Any]:
    return {
        "name": name,
        "label": label,
        "type": "query",
        "datasource": DATASOURCE,
        "definition": query,
        "query": {"query": query, "refId": f"{name}-query", "qryType": 1},
        "refresh": 2,
        "includeAll": True,
        "multi": True,
        "allValue": ".*",
        "current": {"selected": True, "text": ["All"], "value": ["$__all"]},
        "sort": 1,
        "hide": 0,
        "options": [],
        "regex": "",
    }


def templating() -> dict[str, Any]:
    return {
        "list": [
            {
                "name": "datasource",
                "label": "Prometheus",
                "type": "datasource",
                "query": "prometheus",
                "current": {},
                "hide": 0,
                "refresh": 1,
                "regex": "",
                "options": [],
            },
            _variable("namespace", "Tenant namespace", "label_values(spillway_tenant_slo_target_seconds, namespace)"),
            _variable("tenant", "Tenant",
                      'label_values(spillway_tenant_slo_target_seconds{namespace=~"$namespace"}, tenant)'),
            _variable("node", "Node", "label_values(spillway_agent_info, node)"),
        ]
    }


def _panel_json(panel: Panel, pid: int, x: int, y: int) -> dict[str, Any]:
    targets = []
    for i, q in enumerate(panel.queries):
        target: dict[str, Any] = {
            "datasource": DATASOURCE,
            "expr": q.expr,
            "legendFormat": q.legend or "__auto",
            "refId": chr(ord("A") + i),
            "range": not q.instant,
            "instant": q.instant,
        }
        if panel.kind == "table":
            target["format"] = "table"
        targets.append(target)
    defaults: dict[str, Any] = {"unit": panel.unit}
    if panel.kind == "timeseries":
        defaults["custom"] = {
            "drawStyle": "line",
            "lineWidth": 1,
            "fillOpacity": 20 if panel.stack else 0,
            "stacking": {"mode": "normal" if panel.stack else "none", "group": "A"},
            "showPoints": "never",
            "spanNulls": False,
        }
    options: dict[str, Any] = {}
    if panel.kind == "timeseries":
        options = {
            "legend": {"displayMode": "table", "placement": "bottom", "showLegend": True,
                       "calcs": ["lastNotNull", "max"]},
            "tooltip": {"mode": "multi", "sort": "desc"},
        }
    elif panel.kind == "stat":
        options = {"reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
                   "colorMode": "value", "graphMode": "area", "textMode": "auto"}
    elif panel.kind == "bargauge":
        options = {"reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
                   "orientation": "horizontal", "displayMode": "gradient", "showUnfilled": True}
    elif panel.kind == "table":
        options = {"showHeader": True, "cellHeight": "sm"}
    out: dict[str, Any] = {
        "id": pid,
        "type": panel.kind,
        "title": panel.title,
        "description": panel.description,
        "datasource": DATASOURCE,
        "gridPos": {"h": panel.height, "w": panel.width, "x": x, "y": y},
        "targets": targets,
        "fieldConfig": {"defaults": defaults, "overrides": []},
        "options": options,
    }
    if panel.kind == "table":
        out["transformations"] = [{"id": "merge", "options": {}}]
    out.update(panel.extra)
    return out


def _layout(rows: list[Row]) -> Iterator[dict[str, Any]]:
    pid = 1
    y = 0
    for row in rows:
        yield {"id": pid, "type": "row", "title": row.title, "collapsed": False, "panels": [],
               "gridPos": {"h": 1, "w": 24, "x": 0, "y": y}}
        pid += 1
        y += 1
        x = 0
        line_height = 0
        for panel in row.panels:
            if x + panel.width > 24:
                x, y, line_height = 0, y + line_height, 0
            yield _panel_json(panel, pid, x, y)
            pid += 1
            x += panel.width
            line_height = max(line_height, panel.height)
        y += line_height


def dashboard(uid: str, title: str, description: str, rows: list[Row]) -> dict[str, Any]:
    return {
        "uid": uid,
        "title": title,
        "description": description,
        "tags": ["spillway"],
        "editable": True,
        "graphTooltip": 1,
        "schemaVersion": SCHEMA_VERSION,
        "version": 1,
        "refresh": "30s",
        "time": {"from": "now-3h", "to": "now"},
        "timepicker": {},
        "timezone": "browser",
        "fiscalYearStartMonth": 0,
        "liveNow": False,
        "annotations": {"list": []},
        "links": [{"title": "Spillway dashboards", "type": "dashboards", "tags": ["spillway"], "asDropdown": True,
                   "includeVars": True, "keepTime": True}],
        "templating": templating(),
        "panels": list(_layout(rows)),
    }


def _quantiles(metric: str, selector: str, by: str = "") -> list[Query]:
    group = f"le, {by}" if by else "le"
    prefix = "{{" + by + "}} " if by else ""
    return [
        Q(f"histogram_quantile({q}, sum by ({group}) (rate({metric}_bucket{{{selector}}}[{RATE}])))", f"{prefix}p{p}")
        for q, p in ((0.5, 50), (0.99, 99))
    ]


def pool_overview() -> dict[str, Any]:
    gpu = f"{{{NODE}}}"
    rows = [
        Row("Pool", [
            P("GPUs", [Q(f"count(spillway_gpu_memory_total_bytes{gpu})")], "stat", **SMALL),
            P("HBM total", [Q(f"sum(spillway_gpu_memory_total_bytes{gpu})")], "stat", "bytes", **SMALL),
            P("Lendable now", [Q(f"sum(spillway_gpu_memory_lendable_bytes{gpu})")], "stat", "bytes", **SMALL),
            P("Leased", [Q(f"sum(spillway_gpu_memory_leased_bytes{gpu})")], "stat", "bytes", **SMALL),
            P("Live leases", [Q(f"sum(spillway_leases{gpu})")], "stat", **SMALL),
            P("Simulated GPUs", [Q(f'count(spillway_gpu_memory_total_bytes{{{NODE}, simulated="true"}}) or vector(0)')],
                  "stat", **SMALL,
                  description="GPUs whose figures come from the simulated backend (a topology file), not NVML."),
            P("Memory by use, per node", [
                Q(f"sum by (node) (spillway_gpu_memory_headroom_bytes{gpu})", "{{node}} headroom"),
                Q(f"sum by (node) (spillway_gpu_memory_local_reserved_bytes{gpu})", "{{node}} local reserved"),
                Q(f"sum by (node) (spillway_gpu_memory_local_used_bytes{gpu})", "{{node}} local used"),
                Q(f"sum by (node) (spillway_gpu_memory_leased_bytes{gpu})", "{{node}} leased"),
                Q(f"sum by (node) (spillway_gpu_memory_lendable_bytes{gpu})", "{{node}} lendable"),
            ], unit="bytes", width=24,
                description="total = headroom + max(local reserved, local used) + leased + lendable, per GPU."),
        ]),
        Row("Per GPU", [
            P("Lendable per GPU", [Q(f"spillway_gpu_memory_lendable_bytes{gpu}", "{{node}} GPU {{index}}")],
                  "bargauge", "bytes", width=8),
            P("Leased per GPU", [Q(f"spillway_gpu_memory_leased_bytes{gpu}", "{{node}} GPU {{index}}")],
                  "bargauge", "bytes", width=8),
            P("Lent share per GPU", [Q(
                f"spillway_gpu_memory_leased_bytes{gpu} / spillway_gpu_memory_total_bytes{gpu}",
                "{{node}} GPU {{index}}")],
                "bargauge", "percentunit", width=8),
            P("GPUs", [
                Q(f"spillway_gpu_memory_total_bytes{gpu}", "total", instant=True),
                Q(f"spillway_gpu_memory_local_used_bytes{gpu}", "local used", instant=True),
                Q(f"spillway_gpu_memory_leased_bytes{gpu}", "leased", instant=True),
                Q(f"spillway_gpu_memory_lendable_bytes{gpu}", "lendable", instant=True),
            ], "table", "bytes", width=24),
        ]),
        Row("Leases", [
            P("Live leases by state and kind",
              [Q(f"sum by (state, kind) (spillway_leases{gpu})", "{{state}} {{kind}}")],
                  stack=True),
            P("Lease calls by method", [Q(
                f"sum by (method) (rate(spillway_lease_operations_total{gpu}[{RATE}]))", "{{method}}")], unit="reqps"),
            P("Lease expiries",
              [Q(f"sum by (node) (increase(spillway_lease_expiries_total{gpu}[{RATE}]))", "{{node}}")]),
            P("Peer memory held by tenants", [Q(
                f"sum by (namespace, tenant, kind) (spillway_tenant_peer_memory_bytes{{{TENANT}}})",
                "{{namespace}}/{{tenant}} {{kind}}")], unit="bytes", stack=True),
        ]),
        Row("Reclaim", [
            P("Reclaim rounds",
              [Q(f"sum by (trigger) (increase(spillway_reclaims_total{gpu}[{RATE}]))", "{{trigger}}")],
                  width=8),
            P("Revocations by outcome", [Q(
                f"sum by (outcome) (increase(spillway_revocations_total{gpu}[{RATE}]))", "{{outcome}}")], width=8,
                description="released: the holder gave the memory back in time; revoked: the deadline passed."),
            P("Revocation notify latency", _quantiles("spillway_reclaim_notify_seconds", NODE), unit="s", width=8,
                  description="From the reclaim decision to the REVOKING event on the holder's Watch stream."),
        ]),
        Row("Agents", [
            P("Agents", [Q(f"spillway_agent_info{gpu}", "", instant=True)], "table", width=12),
            P("Seconds since the last heartbeat", [Q(
                f"time() - spillway_agent_heartbeat_timestamp_seconds{gpu}", "{{node}}")], unit="s", width=12),
        ]),
    ]
    return dashboard("spillway-pool", "Spillway / Pool overview",
                     "Lendable GPU memory per node and GPU, leases, reclaims and revocations.", rows)


def tenants() -> dict[str, Any]:
    sel = f"{{{TENANT}}}"
    rows = [
        Row("Tenants", [
            P("Tenants by phase", [Q("sum by (phase) (spillway_operator_tenants)", "{{phase}}")], "bargauge", width=8),
            P("SLO attainment", [Q(f"spillway_tenant_slo_attainment_ratio{sel}", "{{namespace}}/{{tenant}} {{slo}}")],
                  "bargauge", "percentunit", width=8, description="Share of requests under the target."),
            P("Observed / target", [Q(
                f"spillway_tenant_slo_observed_seconds{sel}"
                f" / on (namespace, tenant, slo) spillway_tenant_slo_target_seconds{sel}",
                "{{namespace}}/{{tenant}} {{slo}}")], "bargauge", "percentunit", width=8,
                description="Above 100 %: the observed percentile misses the target."),
        ]),
        Row("Latency against targets", [
            P("Time to first token", [
                Q(f'spillway_tenant_slo_observed_seconds{{{TENANT}, slo="ttft"}}', "{{namespace}}/{{tenant}} observed"),
                Q(f'spillway_tenant_slo_target_seconds{{{TENANT}, slo="ttft"}}', "{{namespace}}/{{tenant}} target"),
            ], unit="s"),
            P("Time between tokens", [
                Q(f'spillway_tenant_slo_observed_seconds{{{TENANT}, slo="tbt"}}', "{{namespace}}/{{tenant}} observed"),
                Q(f'spillway_tenant_slo_target_seconds{{{TENANT}, slo="tbt"}}', "{{namespace}}/{{tenant}} target"),
            ], unit="s"),
            P("Attainment over time", [Q(
                f"spillway_tenant_slo_attainment_ratio{sel}", "{{namespace}}/{{tenant}} {{slo}}")], unit="percentunit"),
            P("Peer memory held", [Q(
                f"sum by (namespace, tenant, kind) (spillway_tenant_peer_memory_bytes{sel})",
                "{{namespace}}/{{tenant}} {{kind}}")], unit="bytes", stack=True),
        ]),
        Row("Placement", [
            P("Placement decisions", [Q(
                f"sum by (outcome) (increase(spillway_operator_placements_total[{RATE}]))", "{{outcome}}")], width=12),
            P("Lendable memory on the selected nodes", [Q(
                f"sum(spillway_gpu_memory_lendable_bytes{{{NODE}}})", "lendable")], unit="bytes", width=12),
        ]),
    ]
    return dashboard("spillway-tenants", "Spillway / Tenants and SLOs",
                     "Per tenant: observed TTFT and TBT percentiles against targets, attainment, peer memory held.",
                     rows)


def control_plane() -> dict[str, Any]:
    sel = f"{{{NODE}}}"
    rows = [
        Row("Agent gRPC", [
            P("Calls by method and code", [Q(
                f"sum by (method, code) (rate(spillway_lease_operations_total{sel}[{RATE}]))", "{{method}} {{code}}")],
                unit="reqps"),
            P("Error ratio by method", [Q(
                f'sum by (method) (rate(spillway_lease_operations_total{{{NODE}, code!="OK"}}[{RATE}]))'
                f" / sum by (method) (rate(spillway_lease_operations_total{sel}[{RATE}]))", "{{method}}")],
                unit="percentunit"),
            P("Latency by method", _quantiles("spillway_lease_operation_duration_seconds", NODE, "method"), unit="s",
                  width=24),
        ]),
        Row("Operator", [
            P("Reconciles by result", [Q(
                f"sum by (result) (rate(spillway_operator_reconciles_total[{RATE}]))", "{{result}}")], unit="ops"),
            P("Reconcile latency", _quantiles("spillway_operator_reconcile_duration_seconds", ""), unit="s"),
            P("Reconcile error ratio", [Q(
                f'sum(rate(spillway_operator_reconciles_total{{result="error"}}[{RATE}]))'
                f" / sum(rate(spillway_operator_reconciles_total[{RATE}]))", "errors")], unit="percentunit"),
            P("Tenants by phase", [Q("sum by (phase) (spillway_operator_tenants)", "{{phase}}")], stack=True),
        ]),
        Row("Device plugin", [
            P("Allocate results", [Q(
                f"sum by (result) (increase(spillway_deviceplugin_allocations_total{sel}[{RATE}]))", "{{result}}")],
              width=8),
            P("Allocate latency", _quantiles("spillway_deviceplugin_allocate_duration_seconds", NODE), unit="s",
              width=8),
            P("peer-hbm units by health", [Q(
                f"sum by (node, health) (spillway_deviceplugin_units{sel})", "{{node}} {{health}}")], width=8),
            P("Registrations with the kubelet", [Q(
                f"sum by (node, result) (increase(spillway_deviceplugin_registrations_total{sel}[{RATE}]))",
                "{{node}} {{result}}")], width=12),
            P("Agent reachable from the device plugin", [Q(
                f"spillway_deviceplugin_agent_up{sel}", "{{node}}")], width=12),
        ]),
    ]
    return dashboard("spillway-control-plane", "Spillway / Control plane",
                     "Agent gRPC latency and errors, operator reconciles, device plugin Allocate results.", rows)


DASHBOARDS = {
    "pool-overview": pool_overview,
    "tenants-slos": tenants,
    "control-plane": control_plane,
}


def render() -> dict[str, str]:
    """File name -> JSON text of every dashboard."""
    return {f"{name}.json": json.dumps(build(), indent=2, sort_keys=False) + "\n" for name, build in DASHBOARDS.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="fail if the committed JSON differs from what this builds")
    parser.add_argument("--out", type=Path, default=OUT_DIR)
    args = parser.parse_args(argv)
    wanted = render()
    if args.check:
        stale = [name for name, text in wanted.items()
                 if not (args.out / name).is_file() or (args.out / name).read_text() != text]
        extra = sorted(p.name for p in args.out.glob("*.json") if p.name not in wanted)
        for name in stale:
            print(f"{args.out / name} is out of date: run python hack/dashboards.py", file=sys.stderr)
        for name in extra:
            print(f"{args.out / name} is not built by hack/dashboards.py: remove it", file=sys.stderr)
        return 1 if stale or extra else 0
    args.out.mkdir(parents=True, exist_ok=True)
    for name, text in wanted.items():
        (args.out / name).write_text(text)
    for path in args.out.glob("*.json"):
        if path.name not in wanted:
            path.unlink()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

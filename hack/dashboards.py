"""Spillway's Grafana dashboards, as code.

    python hack/dashboards.py           # writes charts/spillway/dashboards/*.json
    python hack/dashboards.py --check   # exits 1 if the files differ from what this builds

Every query uses only the metric names in docs/metrics.md (a test holds that, parses each
query with promtool and runs each against a real Prometheus that scrapes a real agent), and
tests/test_dashboards_grafana.py renders the tables with Grafana's own code (@grafana/data)
and type-checks the JSON with @grafana/schema.

Conventions (those of NVIDIA's dcgm-exporter dashboard, grafana.com 12239, where they apply):
GPU series carry `gpu` (the index) and `UUID`, as dcgm-exporter's do, so the two join on
`UUID`; per-GPU queries aggregate `max by (node, gpu, UUID)` and legends read
"{{node}} - GPU {{gpu}}". Template variables: datasource, cluster, node, gpu, namespace, tenant
(query variables are multi-value; "All" = ".*", which also matches series without the label,
so `cluster` costs nothing where Prometheus adds no such label). Tables are built so Grafana
merges them: every query of a table keeps the same labels (an aggregation `by` them, which
also drops `__name__`), a `merge` transformation joins the rows, and `organize` names the
columns (Grafana calls each query's value `Value #<refId>`; legendFormat does not rename table
columns). Every panel has a description.
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

CLUSTER = 'cluster=~"$cluster"'
NODE = f'{CLUSTER}, node=~"$node"'
GPU = f'{NODE}, gpu=~"$gpu"'
TENANT = f'{CLUSTER}, namespace=~"$namespace", tenant=~"$tenant"'
RATE = "$__rate_interval"
# The labels that name one GPU, as dcgm-exporter names them (plus Spillway's node).
GPU_KEY = "node, gpu, UUID"
GPU_LEGEND = "{{node}} - GPU {{gpu}}"


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
    # Tables: the label columns and then one value column per query, in order, as
    # (field name in Grafana's frame, column title); fields not named here are hidden.
    columns: list[tuple[str, str]] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)


P = Panel
Q = Query
SMALL: dict[str, Any] = {"width": 4, "height": 4}


@dataclass
class Row:
    title: str
    panels: list[Panel]


def _variable(name: str, label: str, query: str, description: str) -> dict[str, Any]:
    return {
        "name": name,
        "label": label,
        "description": description,
        "type": "query",
        "datasource": DATASOURCE,
        "query": {"query": query, "refId": f"{name}-query", "qryType": 1},
        "refresh": 2,
        "includeAll": True,
        "multi": True,
        "allValue": ".*",
        "current": {"selected": True, "text": ["All"], "value": ["$__all"]},
        "sort": 3 if name == "gpu" else 1,
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
                "description": "The Prometheus that scrapes Spillway (and dcgm-exporter, for the GPU join).",
                "type": "datasource",
                "query": "prometheus",
                "hide": 0,
                "refresh": 1,
                "regex": "",
                "options": [],
            },
            _variable("cluster", "Cluster", "label_values(spillway_agent_info, cluster)",
                      "The `cluster` label your Prometheus adds (external labels or relabelling); All where "
                      "there is none."),
            _variable("node", "Node", f"label_values(spillway_agent_info{{{CLUSTER}}}, node)",
                      "Kubernetes node of the Spillway agent."),
            _variable("gpu", "GPU", f"label_values(spillway_gpu_memory_total_bytes{{{NODE}}}, gpu)",
                      "GPU index on its node (dcgm-exporter's `gpu` label)."),
            _variable("namespace", "Tenant namespace",
                      f"label_values(spillway_tenant_slo_target_seconds{{{CLUSTER}}}, namespace)",
                      "Namespace of the InferenceTenants."),
            _variable("tenant", "Tenant",
                      f'label_values(spillway_tenant_slo_target_seconds{{{CLUSTER}, namespace=~"$namespace"}}, '
                      "tenant)",
                      "InferenceTenant name."),
        ]
    }


def _table_transformations(panel: Panel) -> list[dict[str, Any]]:
    """merge (several queries) and organize: Grafana's table frames are Time, the labels, then
    `Value` (one query) or `Value #<refId>` (several); name the wanted fields, hide the rest."""
    n = len(panel.queries)
    values = ["Value"] if n == 1 else [f"Value #{chr(ord('A') + i)}" for i in range(n)]
    named = dict(panel.columns)
    stray = [f for f in named if f.startswith("Value") and f not in values]
    assert not stray, f"{panel.title}: no such value field {stray}; the frames have {values}"
    hidden = ["Time", *(v for v in values if v not in named)]
    out: list[dict[str, Any]] = []
    if n > 1:
        out.append({"id": "merge", "options": {}})
    out.append({"id": "organize", "options": {
        "excludeByName": {f: True for f in hidden},
        "indexByName": {f: i for i, f in enumerate([*named, *hidden])},
        "renameByName": named,
        "includeByName": {},
    }})
    return out


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
        out["transformations"] = _table_transformations(panel)
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
                   "includeVars": True, "keepTime": True, "icon": "external link", "tooltip": "",
                   "targetBlank": False}],
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


def _per_gpu(metric: str, selector: str = GPU) -> str:
    """One series per GPU, keyed as dcgm-exporter keys its own (`__name__` and the rest dropped)."""
    return f"max by ({GPU_KEY}) ({metric}{{{selector}}})"


SIMULATED = GPU + ', simulated="true"'
GPU_COLUMNS = [("node", "Node"), ("gpu", "GPU"), ("UUID", "UUID")]


def pool_overview() -> dict[str, Any]:
    gpu = f"{{{GPU}}}"
    node = f"{{{NODE}}}"
    rows = [
        Row("Pool", [
            P("GPUs", [Q(f"count({_per_gpu('spillway_gpu_memory_total_bytes')})")], "stat", **SMALL,
              description="GPUs in the selected nodes' pools (one per UUID)."),
            P("HBM total", [Q(f"sum({_per_gpu('spillway_gpu_memory_total_bytes')})")], "stat", "bytes", **SMALL,
              description="Memory of the selected GPUs."),
            P("Lendable now", [Q(f"sum({_per_gpu('spillway_gpu_memory_lendable_bytes')})")], "stat", "bytes",
              **SMALL, description="Memory the agents could lend now: total - headroom - max(local reserved, "
                                   "local used) - leased."),
            P("Leased", [Q(f"sum({_per_gpu('spillway_gpu_memory_leased_bytes')})")], "stat", "bytes", **SMALL,
              description="Memory lent out in live leases (RESERVATION and ELASTIC)."),
            P("Live leases", [Q(f"sum(spillway_leases{node})")], "stat", **SMALL,
              description="Leases in RESERVED, ACTIVE or REVOKING state on the selected nodes."),
            P("Simulated GPUs", [Q(f"count({_per_gpu('spillway_gpu_memory_total_bytes', SIMULATED)}) or vector(0)")],
              "stat", **SMALL,
              description="GPUs whose figures come from the simulated backend (a topology file), not NVML."),
            P("Memory by use, per node", [
                Q(f"sum by (node) (spillway_gpu_memory_headroom_bytes{gpu})", "{{node}} headroom"),
                Q(f"sum by (node) (spillway_gpu_memory_local_reserved_bytes{gpu})", "{{node}} local reserved"),
                Q(f"sum by (node) (spillway_gpu_memory_local_used_bytes{gpu})", "{{node}} local used"),
                Q(f"sum by (node) (spillway_gpu_memory_leased_bytes{gpu})", "{{node}} leased"),
                Q(f"sum by (node) (spillway_gpu_memory_lendable_bytes{gpu})", "{{node}} lendable"),
            ], unit="bytes", width=24,
                description="total = headroom + max(local reserved, local used) + leased + lendable, per GPU; "
                            "summed per node."),
        ]),
        Row("Per GPU", [
            P("Lendable per GPU", [Q(_per_gpu("spillway_gpu_memory_lendable_bytes"), GPU_LEGEND)],
              "bargauge", "bytes", width=8, description="Memory each GPU could lend now."),
            P("Leased per GPU", [Q(_per_gpu("spillway_gpu_memory_leased_bytes"), GPU_LEGEND)],
              "bargauge", "bytes", width=8, description="Memory each GPU has lent out in live leases."),
            P("Lent share per GPU", [Q(
                f"{_per_gpu('spillway_gpu_memory_leased_bytes')} / {_per_gpu('spillway_gpu_memory_total_bytes')}",
                GPU_LEGEND)],
                "bargauge", "percentunit", width=8, description="Leased memory as a share of the GPU's memory."),
            P("GPUs", [
                Q(_per_gpu("spillway_gpu_memory_total_bytes"), instant=True),
                Q(_per_gpu("spillway_gpu_memory_local_reserved_bytes"), instant=True),
                Q(_per_gpu("spillway_gpu_memory_local_used_bytes"), instant=True),
                Q(_per_gpu("spillway_gpu_memory_leased_bytes"), instant=True),
                Q(_per_gpu("spillway_gpu_memory_lendable_bytes"), instant=True),
            ], "table", "bytes", width=24, columns=[
                *GPU_COLUMNS, ("Value #A", "Total"), ("Value #B", "Local reserved"), ("Value #C", "Local used"),
                ("Value #D", "Leased"), ("Value #E", "Lendable")],
                description="One row per GPU (UUID). Join with dcgm-exporter's series on `UUID`, e.g. "
                            "`spillway_gpu_memory_leased_bytes * on (UUID) group_left DCGM_FI_DEV_FB_USED`."),
        ]),
        Row("Leases", [
            P("Live leases by state and kind",
              [Q(f"sum by (state, kind) (spillway_leases{node})", "{{state}} {{kind}}")], stack=True,
              description="RESERVATION leases back placed replicas; ELASTIC ones are grown by SLO feedback."),
            P("Lease calls by method", [Q(
                f"sum by (method) (rate(spillway_lease_operations_total{node}[{RATE}]))", "{{method}}")],
                unit="reqps", description="Agent gRPC calls per second, by method."),
            P("Lease expiries",
              [Q(f"sum by (node) (increase(spillway_lease_expiries_total{node}[{RATE}]))", "{{node}}")],
              description="Leases whose TTL ran out without a renewal (a holder that went away)."),
            P("Peer memory held by tenants", [Q(
                f"sum by (namespace, tenant, kind) (spillway_tenant_peer_memory_bytes{{{TENANT}}})",
                "{{namespace}}/{{tenant}} {{kind}}")], unit="bytes", stack=True,
                description="Peer memory each tenant holds, by lease kind (the operator's view)."),
        ]),
        Row("Reclaim", [
            P("Reclaim rounds",
              [Q(f"sum by (trigger) (increase(spillway_reclaims_total{node}[{RATE}]))", "{{trigger}}")],
              width=8, description="Rounds in which a lender took memory back (api: asked; local_growth: "
                                   "the GPU's own tenant grew)."),
            P("Revocations by outcome", [Q(
                f"sum by (outcome) (increase(spillway_revocations_total{node}[{RATE}]))", "{{outcome}}")], width=8,
                description="released: the holder gave the memory back in time; revoked: the deadline passed."),
            P("Revocation notify latency", _quantiles("spillway_reclaim_notify_seconds", NODE), unit="s", width=8,
              description="From the reclaim decision to the REVOKING event on the holder's Watch stream."),
        ]),
        Row("Agents", [
            P("Agents", [Q(f"max by (node, backend, simulated, version) (spillway_agent_info{node})",
                           instant=True)], "table", width=12,
              columns=[("node", "Node"), ("backend", "Backend"), ("simulated", "Simulated"),
                       ("version", "Version")],
              description="One row per agent: its backend (nvml or simulated) and version."),
            P("Seconds since the last heartbeat", [Q(
                f"time() - max by (node) (spillway_agent_heartbeat_timestamp_seconds{node})", "{{node}}")],
                unit="s", width=12,
                description="Age of each agent's last inventory refresh; it should stay near the refresh period."),
        ]),
    ]
    return dashboard("spillway-pool", "Spillway / Pool overview",
                     "Lendable GPU memory per node and GPU, leases, reclaims and revocations.", rows)


def tenants() -> dict[str, Any]:
    sel = f"{{{TENANT}}}"
    cluster = f"{{{CLUSTER}}}"
    rows = [
        Row("Tenants", [
            P("Tenants by phase", [Q(f"sum by (phase) (spillway_operator_tenants{cluster})", "{{phase}}")],
              "bargauge", width=8,
              description="InferenceTenants by status.phase (Pending, Running, Degraded, Failed)."),
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
            ], unit="s", description="The spec's TTFT percentile over its SLO window, against the target."),
            P("Time between tokens", [
                Q(f'spillway_tenant_slo_observed_seconds{{{TENANT}, slo="tbt"}}', "{{namespace}}/{{tenant}} observed"),
                Q(f'spillway_tenant_slo_target_seconds{{{TENANT}, slo="tbt"}}', "{{namespace}}/{{tenant}} target"),
            ], unit="s", description="The spec's inter-token latency percentile over its SLO window, against "
                                     "the target."),
            P("Attainment over time", [Q(
                f"spillway_tenant_slo_attainment_ratio{sel}", "{{namespace}}/{{tenant}} {{slo}}")], unit="percentunit",
                description="Share of requests under the target, per evaluation window."),
            P("Peer memory held", [Q(
                f"sum by (namespace, tenant, kind) (spillway_tenant_peer_memory_bytes{sel})",
                "{{namespace}}/{{tenant}} {{kind}}")], unit="bytes", stack=True,
                description="ELASTIC grows while a tenant misses its SLO and shrinks when it meets it with slack "
                            "and others want the pool."),
        ]),
        Row("Placement", [
            P("Placement decisions", [Q(
                f"sum by (outcome) (increase(spillway_operator_placements_total{cluster}[{RATE}]))", "{{outcome}}")],
                width=12, description="Per replica: placed with peer memory, placed on the fallback, or pending."),
            P("Lendable memory on the selected nodes", [Q(
                f"sum({_per_gpu('spillway_gpu_memory_lendable_bytes', NODE)})", "lendable")], unit="bytes", width=12,
                description="What the pool could still lend to a tenant that misses its SLO."),
        ]),
    ]
    return dashboard("spillway-tenants", "Spillway / Tenants and SLOs",
                     "Per tenant: observed TTFT and TBT percentiles against targets, attainment, peer memory held.",
                     rows)


def control_plane() -> dict[str, Any]:
    sel = f"{{{NODE}}}"
    cluster = f"{{{CLUSTER}}}"
    rows = [
        Row("Agent gRPC", [
            P("Calls by method and code", [Q(
                f"sum by (method, code) (rate(spillway_lease_operations_total{sel}[{RATE}]))", "{{method}} {{code}}")],
                unit="reqps", description="Agent gRPC calls per second by method and status code."),
            P("Error ratio by method", [Q(
                f'sum by (method) (rate(spillway_lease_operations_total{{{NODE}, code!="OK"}}[{RATE}]))'
                f" / sum by (method) (rate(spillway_lease_operations_total{sel}[{RATE}]))", "{{method}}")],
                unit="percentunit", description="Share of calls that did not return OK, by method."),
            P("Latency by method", _quantiles("spillway_lease_operation_duration_seconds", NODE, "method"), unit="s",
              width=24, description="Server-side gRPC latency, p50 and p99, by method."),
        ]),
        Row("Operator", [
            P("Reconciles by result", [Q(
                f"sum by (result) (rate(spillway_operator_reconciles_total{cluster}[{RATE}]))", "{{result}}")],
                unit="ops", description="InferenceTenant reconciles per second: ok, error, retry."),
            P("Reconcile latency", _quantiles("spillway_operator_reconcile_duration_seconds", CLUSTER), unit="s",
              description="Reconcile duration, p50 and p99."),
            P("Reconcile error ratio", [Q(
                f'sum(rate(spillway_operator_reconciles_total{{{CLUSTER}, result="error"}}[{RATE}]))'
                f" / sum(rate(spillway_operator_reconciles_total{cluster}[{RATE}]))", "errors")],
                unit="percentunit", description="Share of reconciles that ended in an error."),
            P("Tenants by phase", [Q(f"sum by (phase) (spillway_operator_tenants{cluster})", "{{phase}}")],
              stack=True, description="InferenceTenants by status.phase over time."),
        ]),
        Row("Device plugin", [
            P("Allocate results", [Q(
                f"sum by (result) (increase(spillway_deviceplugin_allocations_total{sel}[{RATE}]))", "{{result}}")],
              width=8, description="Allocate calls from the kubelet: reservation claimed, lease made on the spot, "
                                   "or error."),
            P("Allocate latency", _quantiles("spillway_deviceplugin_allocate_duration_seconds", NODE), unit="s",
              width=8, description="Allocate duration, p50 and p99 (the pod waits on it)."),
            P("peer-hbm units by health", [Q(
                f"sum by (node, health) (spillway_deviceplugin_units{sel})", "{{node}} {{health}}")], width=8,
                description="spillway.dev/peer-hbm units advertised to the kubelet, healthy and not."),
            P("Registrations with the kubelet", [Q(
                f"sum by (node, result) (increase(spillway_deviceplugin_registrations_total{sel}[{RATE}]))",
                "{{node}} {{result}}")], width=12,
                description="Device plugin registrations (a kubelet restart makes it register again)."),
            P("Agent reachable from the device plugin", [Q(
                f"spillway_deviceplugin_agent_up{sel}", "{{node}}")], width=12,
                description="1 while the node's agent answers the device plugin."),
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

"""The dashboards as Grafana itself sees them, with Grafana's own npm packages run by node
(tests/grafana/render.cjs; installed by hack/node-deps.sh from tests/grafana/package-lock.json):

- @grafana/schema's `Dashboard` type, compiled by TypeScript, accepts every dashboard and
  refuses a broken one;
- every table panel, fed a real Prometheus's results (a real agent with eight simulated GPUs
  scraped beside a dcgm-exporter-shaped endpoint) through @grafana/data's transformations, comes
  out as one frame with one row per GPU and named columns; the GPUs table as it was before
  (bare selectors, `merge` alone) comes out as 32 rows for 8 GPUs, and the check says so;
- a Spillway GPU series joins dcgm-exporter's on `UUID` (docs/metrics.md) one series per GPU,
  in PromQL and with Grafana's join transformation.
"""

from __future__ import annotations

import asyncio
import copy
import json
import subprocess
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from spillway.agent.client import AgentClient
from spillway.testing.agentproc import AgentProcess
from tests.fixtures_prometheus import PrometheusProcess
from tests.test_dashboards import concrete, dashboards, panels

REPO = Path(__file__).resolve().parents[1]
RENDER = REPO / "tests" / "grafana" / "render.cjs"

# The "GPUs" table as committed before this test existed: four bare selectors, `merge` only.
OLD_GPUS_TABLE: dict[str, Any] = {
    "title": "GPUs (before)",
    "transformations": [{"id": "merge", "options": {}}],
    "targets": [{"refId": r, "expr": f'spillway_gpu_memory_{m}_bytes{{node=~"$node"}}'}
                for r, m in zip("ABCD", ("total", "local_used", "leased", "lendable"), strict=True)],
}


@pytest.fixture(scope="module")
def node_modules() -> Path:
    """Grafana's packages, installed once into ~/.cache/spillway/node-<hash> (prints the directory)."""
    res = subprocess.run([str(REPO / "hack" / "node-deps.sh")], capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    return Path(res.stdout.strip().splitlines()[-1])


def render(node_modules: Path, request: dict[str, Any], tmp_path: Path) -> dict[str, Any]:
    path = tmp_path / f"request-{time.monotonic_ns()}.json"
    path.write_text(json.dumps(request))
    res = subprocess.run(["node", str(RENDER), str(node_modules), str(path)], capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-4000:]
    return dict(json.loads(res.stdout))


def test_grafana_schema_accepts_the_dashboards_and_refuses_a_broken_one(node_modules: Path, tmp_path: Path) -> None:
    boards = dashboards()
    broken = copy.deepcopy(boards["pool-overview.json"])
    broken["links"][0].pop("icon")  # a DashboardLink needs one
    panel = next(p for p in broken["panels"] if p["type"] == "table")
    panel["gridPos"]["h"] = "8"  # a number in Grafana's schema
    stat = next(p for p in broken["panels"] if p["type"] == "stat")
    stat["legendFormat"] = "{{gpu}}"  # belongs on a target, not on the panel
    out = render(node_modules, {"typecheck": {**boards, "broken.json": broken}}, tmp_path)["typecheck"]
    for name in boards:
        assert out[name] == [], f"{name}: {out[name]}"
    errors = "\n".join(out["broken.json"])
    assert "icon" in errors and "legendFormat" in errors and "'string' is not assignable to type 'number'" in errors, \
        errors


class DcgmShaped:
    """`DCGM_FI_DEV_FB_USED` (MiB) with dcgm-exporter's labels for the given GPUs: `gpu` is the
    index, the UUID is in `UUID` (what dcgm-exporter serves on :9400/metrics)."""

    def __init__(self, node: str, gpus: list[tuple[int, str]]) -> None:
        lines = ["# HELP DCGM_FI_DEV_FB_USED Framebuffer memory used (in MiB).", "# TYPE DCGM_FI_DEV_FB_USED gauge"]
        for index, uuid in gpus:
            lines.append(f'DCGM_FI_DEV_FB_USED{{gpu="{index}",UUID="{uuid}",'
                         f'pci_bus_id="00000000:{index + 0x18:02X}:00.0",device="nvidia{index}",'
                         f'modelName="NVIDIA H100 80GB HBM3",Hostname="{node}",'
                         f'DCGM_FI_DRIVER_VERSION="550.90.07"}} {1024 * (index + 1)}')
        body = ("\n".join(lines) + "\n").encode()

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                self.send_response(200)
                self.send_header("Content-Type", "text/plain; version=0.0.4")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.address = f"127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def scraped(agent: AgentProcess, prometheus: PrometheusProcess) -> Iterator[dict[str, Any]]:
    async def inventory() -> list[tuple[int, str]]:
        async with AgentClient(str(agent.socket)) as c:
            inv = await c.inventory()
            await c.acquire("2Gi", "grafana-test", gpu_uuid=inv.gpus[1].uuid, ttl_s=300)
            return [(g.index, g.uuid) for g in inv.gpus]

    gpus = asyncio.run(inventory())
    dcgm = DcgmShaped(agent.node_name, gpus)
    try:
        prometheus.add_target(f"127.0.0.1:{agent.metrics_port}", {"component": "agent"})
        prometheus.add_target(dcgm.address, {"job_name": "dcgm-exporter"})
        prometheus.wait_for_series('spillway_gpu_memory_leased_bytes', timeout=60)
        prometheus.wait_for_series('DCGM_FI_DEV_FB_USED', timeout=60)
        yield {"gpus": gpus, "node": agent.node_name}
    finally:
        dcgm.stop()


def instant(prometheus: PrometheusProcess, expr: str, at: float) -> list[dict[str, Any]]:
    url = f"{prometheus.url}/api/v1/query?" + urllib.parse.urlencode({"query": concrete(expr), "time": f"{at:.3f}"})
    with urllib.request.urlopen(url, timeout=10) as resp:
        body = json.loads(resp.read())
    assert body["status"] == "success", body
    return list(body["data"]["result"])


def table_problems(frames: list[dict[str, Any]], gpus: int) -> list[str]:
    """What a reader would see wrong in a rendered per-GPU table."""
    problems = []
    if len(frames) != 1:
        problems.append(f"{len(frames)} frames (Grafana shows one at a time)")
    for f in frames:
        rows = len(f["fields"][0]["values"]) if f["fields"] else 0
        if rows != gpus:
            problems.append(f"{rows} rows for {gpus} GPUs")
        names = [x["display"] for x in f["fields"]]
        problems += [f"column {n!r}" for n in names if n == "__name__" or n == "Time" or n.startswith("Value")]
        for x in f["fields"]:
            if any(v is None or v == "" for v in x["values"]):
                problems.append(f"column {x['display']!r} has empty cells")
                break
    return problems


def test_tables_render_one_row_per_gpu_and_join_dcgm_on_uuid(scraped: dict[str, Any], node_modules: Path,
                                                            prometheus: PrometheusProcess, tmp_path: Path) -> None:
    gpus = len(scraped["gpus"])
    assert gpus == 8
    at = time.time()
    tables = []
    for name, board in dashboards().items():
        for p in panels(board):
            if p["type"] == "table":
                tables.append({"id": f"{name} / {p['title']}", "transformations": p["transformations"],
                               "targets": [{"refId": t["refId"], "result": instant(prometheus, t["expr"], at)}
                                           for t in p["targets"]]})
    assert any(t["id"] == "pool-overview.json / GPUs" for t in tables)
    tables.append({"id": "before", "transformations": OLD_GPUS_TABLE["transformations"],
                   "targets": [{"refId": t["refId"], "result": instant(prometheus, t["expr"], at)}
                               for t in OLD_GPUS_TABLE["targets"]]})
    # Grafana's join transformation of a Spillway table query and a dcgm-exporter one, on UUID.
    join = [
        {"id": "joinByField", "options": {"byField": "UUID", "mode": "outer"}},
        {"id": "organize", "options": {"excludeByName": {"Time 1": True, "Time 2": True}, "renameByName": {
            "Value #A": "Leased", "Value #B": "FB used (MiB)"}}},
    ]
    tables.append({"id": "join", "transformations": join, "targets": [
        {"refId": "A", "result": instant(prometheus, "max by (node, gpu, UUID) (spillway_gpu_memory_leased_bytes)",
                                         at)},
        {"refId": "B", "result": instant(prometheus, "max by (Hostname, gpu, UUID) (DCGM_FI_DEV_FB_USED)", at)},
    ]})
    out = render(node_modules, {"tables": tables}, tmp_path)["tables"]

    for t in tables:
        if t["id"] in ("before", "join"):
            continue
        frames = out[t["id"]]
        wanted = gpus if "GPUs" in t["id"] else 1  # the Agents table: one agent
        assert table_problems(frames, wanted) == [], (t["id"], [[x["display"] for x in f["fields"]] for f in frames])
    gpu_table = out["pool-overview.json / GPUs"][0]
    columns = {x["display"]: x["values"] for x in gpu_table["fields"]}
    assert list(columns) == ["Node", "GPU", "UUID", "Total", "Local reserved", "Local used", "Leased", "Lendable"]
    assert sorted(columns["UUID"]) == sorted(u for _, u in scraped["gpus"])
    leased = dict(zip(columns["UUID"], columns["Leased"], strict=True))
    assert leased[scraped["gpus"][1][1]] == 2 << 30 and sum(leased.values()) == 2 << 30

    before = table_problems(out["before"], gpus)
    assert f"{4 * gpus} rows for {gpus} GPUs" in before and "column '__name__'" in before, before

    joined = out["join"]
    assert len(joined) == 1 and len(joined[0]["fields"][0]["values"]) == gpus, joined
    names = [x["display"] for x in joined[0]["fields"]]
    assert "UUID" in names and "Leased" in names and "FB used (MiB)" in names, names

    # PromQL: the documented join, one series per GPU, each carrying dcgm-exporter's labels.
    promql = instant(prometheus, "spillway_gpu_memory_leased_bytes * on (UUID) group_left (modelName, Hostname) "
                                 "(DCGM_FI_DEV_FB_USED > bool 0)", at)
    assert len(promql) == gpus, promql
    assert {r["metric"]["UUID"] for r in promql} == {u for _, u in scraped["gpus"]}
    assert all(r["metric"]["modelName"] == "NVIDIA H100 80GB HBM3" for r in promql)
    by_index = {r["metric"]["gpu"]: r["metric"]["UUID"] for r in promql}
    assert by_index == {str(i): u for i, u in scraped["gpus"]}

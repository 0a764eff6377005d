#!/usr/bin/env python3
"""`make demo`: Spillway's SLO loop, for real, on this machine (CPU only; the GPUs are simulated).

What runs, each process in a process group of its own:
- the local Kubernetes control plane (etcd, kube-apiserver, controller manager, scheduler, kwok)
  and the CRDs;
- one kwok node standing for three H100 80GB joined by NVLink (SIMULATED: no GPU is used) and
  its Spillway agent (simulated GPU backend, gRPC over TCP with mutual TLS, publishing its
  MemoryPool);
- the DRA driver (`spillway dra --publish-only`: kwok nodes have no kubelet) and the chart's
  DeviceClass, so the node's GPUs are ResourceSlice devices with consumable memory (docs/dra.md);
- the operator, with --prometheus-url: it reads each tenant's latency from Prometheus; its
  `--allocation auto` finds the DeviceClass and places replicas through ResourceClaims, which
  kube-scheduler allocates on a lender GPU;
- the tenants in hack/demo/tenants.yaml, and for each replica the operator places, one example
  model server process (examples/toy_server in its tiny configuration on CPU: its latency is
  real and measured, its model is a stand-in for the one the tenant names);
- the Debian Prometheus, scraping every model server with the `namespace` and `pod` labels the
  operator queries, and the operator's own metrics;
- a load generator (hack/demo_load.py).

Then the loop: light load until every tenant meets its SLO; the load on `chat` goes up until it
misses its SLO and the operator grows its ELASTIC peer memory (kubectl get columns, Events);
the load goes down and the operator gives the memory back. A PNG of chat's TTFT p99 against its
objective and of the peer memory it holds, from Prometheus range queries, is written and its
path printed. Then everything keeps running until Ctrl-C (`--once`: stop at once).

Ctrl-C, SIGTERM, and closing the terminal (SIGHUP) all stop everything the demo started: it
makes itself the subreaper of its process tree and signals every process group in that tree
(hack/demo_procs.py), then says how many it stopped.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
HACK = Path(__file__).resolve().parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(HACK))

from demo_chart import demo_chart  # noqa: E402
from demo_procs import Interrupted, Signals, become_subreaper, descendants, stop_tree  # noqa: E402

from spillway.testing.agentproc import free_port  # noqa: E402
from spillway.testing.cluster import wait_until  # noqa: E402
from spillway.testing.prometheus import PrometheusProcess  # noqa: E402
from spillway.testing.sandbox import Sandbox  # noqa: E402
from spillway.units import parse_duration, parse_quantity  # noqa: E402

NODE = "gpu-node-0"
NAMESPACE = "default"
LOADED = "chat"
TOPOLOGY = HACK / "demo" / "topology.yaml"
TENANTS = HACK / "demo" / "tenants.yaml"
# The example model server's tiny configuration (CPU): existing examples/toy_server flags.
TOY_ARGS = ["--device", "cpu", "--swap", "host", "--d-model", "64", "--layers", "2"]
SETTLED = ("Running", "Degraded")


class Out:
    """Prints while there is somewhere to print to: after the terminal closes, writes fail (EIO)
    and the demo must still stop everything, silently."""

    def __init__(self) -> None:
        self.ok = True

    def __call__(self, text: str) -> None:
        if not self.ok:
            return
        try:
            print(text, flush=True)
        except OSError:  # the terminal is gone (EIO) or the pipe closed
            self.ok = False
        except RuntimeError:  # a signal's note arrived in the middle of another print
            pass


out = Out()


def say(text: str) -> None:
    out(f"\n==> {text}")


class Demo:
    def __init__(self, args: argparse.Namespace, state: Path) -> None:
        self.args = args
        self.state = state
        self.sb = Sandbox(workdir=state)
        self.sb._own_cluster = True
        self.prom: PrometheusProcess | None = None
        self.servers: dict[str, tuple[subprocess.Popen[bytes], int]] = {}
        self.load: subprocess.Popen[bytes] | None = None
        self.load_file = state / "load.json"
        self.rates: dict[str, float] = {}
        self.timeline: list[dict[str, Any]] = []
        self.phases: list[tuple[float, str]] = []
        self.window_s = parse_duration(args.slo_window)
        self.slo: dict[str, Any] = {}
        self.t0 = time.time()

    # -- helpers --

    @property
    def kube(self) -> Any:
        assert self.sb.cluster is not None
        return self.sb.cluster

    def show(self, *args: str) -> str:
        text = str(self.kube.kubectl(*args).stdout)
        out(f"$ kubectl {' '.join(args)}\n{text}")
        return text

    def tenants(self) -> dict[str, dict[str, Any]]:
        items = self.kube.get_json("inferencetenants", "-n", NAMESPACE)["items"]
        return {t["metadata"]["name"]: t for t in items}

    def spawn(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        log = (self.state / "logs" / f"{name}.log")
        log.parent.mkdir(parents=True, exist_ok=True)
        with log.open("ab") as f:
            return subprocess.Popen(argv, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    cwd=str(REPO), env=env or dict(os.environ), start_new_session=True)

    def set_load(self, **rates: float) -> None:
        self.rates.update(rates)
        targets = {name: {"url": f"http://127.0.0.1:{port}", "rate": self.rates.get(name.rsplit("-", 1)[0], 0.0)}
                   for name, (_, port) in self.servers.items()}
        tmp = self.load_file.with_suffix(".tmp")
        tmp.write_text(json.dumps({"targets": targets, "prompt_words": 48, "max_tokens": 16}))
        tmp.replace(self.load_file)
        out("load: " + ", ".join(f"{t} {r:g} requests/s" for t, r in sorted(self.rates.items())))

    def record(self) -> dict[str, Any]:
        """The loaded tenant's status now, kept for the timeline."""
        t = self.tenants().get(LOADED) or {}
        st = t.get("status") or {}
        slo = st.get("slo") or {}
        row = {"t": round(time.time() - self.t0, 1), "state": slo.get("state", ""), "ttft": slo.get("ttft", ""),
               "tbt": slo.get("tbt", ""), "elasticBytes": int(st.get("elasticBytes") or 0),
               "peerMemory": st.get("peerMemory", ""), "phase": st.get("phase", "")}
        if not self.timeline or {k: v for k, v in row.items() if k != "t"} != \
                {k: v for k, v in self.timeline[-1].items() if k != "t"}:
            self.timeline.append(row)
            out(f"  t={row['t']:>6.1f}s  {LOADED}: SLO {row['state'] or '-':8} TTFT-P99 {row['ttft'] or '-':>9}  "
                f"TBT-P99 {row['tbt'] or '-':>9}  peer memory {row['peerMemory'] or '-':>6}  "
                f"ELASTIC {row['elasticBytes'] / (1 << 30):g}Gi")
        return row

    def watch(self, done: Callable[[dict[str, Any]], bool], timeout: float, what: str) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if done(self.record()):
                return True
            time.sleep(2.0)
        out(f"warning: {what} did not happen in {timeout:.0f} s; carrying on (logs: {self.state}/logs)")
        return False

    def events(self, *reasons: str) -> None:
        items = self.kube.get_json("events", "-n", NAMESPACE, "--field-selector",
                                   f"involvedObject.kind=InferenceTenant,involvedObject.name={LOADED}")["items"]
        rows = []
        for e in items:
            if reasons and e.get("reason") not in reasons:
                continue
            when = e.get("lastTimestamp") or e.get("eventTime") or e["metadata"].get("creationTimestamp") or ""
            rows.append((when, e.get("type", ""), e.get("reason", ""), e.get("message", "")))
        out(f"$ kubectl get events --field-selector involvedObject.name={LOADED}   # {', '.join(reasons)}")
        for when, kind, reason, message in sorted(rows)[-8:]:
            out(f"  {when}  {kind:7} {reason:18} {message}")

    # -- the parts --

    def start_system(self) -> None:
        say("starting the local control plane (etcd, kube-apiserver, controller manager, scheduler, kwok)")
        self.sb.start()
        say(f"adding node {NODE}: SIMULATED, 3 x H100 80GB joined by NVLink ({TOPOLOGY.relative_to(REPO)}; no GPU "
            "is used), and its Spillway agent (simulated GPU backend, gRPC over TCP + mutual TLS, MemoryPool)")
        self.sb.add_gpu_nodes([NODE], topology=TOPOLOGY)
        say("starting the DRA driver (spillway dra --publish-only: kwok nodes run no kubelet) and applying the "
            "chart's DeviceClass peer-hbm.spillway.dev: each lending GPU becomes a ResourceSlice device with "
            "consumable memory")
        self.sb.start_dra([NODE])
        say("starting Prometheus (the Debian package), scraping every second")
        self.prom = PrometheusProcess(self.state / "prometheus", new_session=True)
        self.prom.workdir.mkdir(parents=True, exist_ok=True)
        self.prom.start()
        out(f"prometheus: {self.prom.url}")
        say(f"starting the operator with --prometheus-url {self.prom.url} --slo-step {self.args.slo_step}")
        self.sb.start_operator(["--resync-interval", "3s", "--lease-ttl", "60s", "--prometheus-url", self.prom.url,
                                "--slo-step", self.args.slo_step])
        self.prom.add_target(f"127.0.0.1:{self.sb.operator_metrics_port}", {"component": "operator"})
        chosen = [x for x in self.sb.operator_log.read_text().splitlines() if "allocation " in x and "msg=" in x]
        out("operator: " + (chosen[-1].split("msg=", 1)[1].split('" ', 1)[0].strip('"') if chosen else "?"))

    def apply_tenants(self) -> None:
        docs = [d for d in yaml.safe_load_all(TENANTS.read_text()) if d]
        for d in docs:
            d["spec"]["slo"]["window"] = self.args.slo_window
            if d["metadata"]["name"] == LOADED:
                self.slo = dict(d["spec"]["slo"])
        say(f"kubectl apply -f {TENANTS.relative_to(REPO)}   (every slo.window set to {self.args.slo_window}; one "
            "tenant at a time, so the lender is in place before the borrowers ask)")
        for d in docs:
            name = d["metadata"]["name"]
            out(str(self.kube.apply(yaml.safe_dump(d), NAMESPACE).stdout).strip())

            def placed(name: str = name) -> bool:
                t = self.tenants().get(name) or {}
                return (t.get("status") or {}).get("phase") in SETTLED

            wait_until(placed, timeout=self.args.timeout, what=f"tenant {name} to be placed", interval=1.0)
        self.show("get", "inferencetenants", "-n", NAMESPACE)
        self.show("get", "pods", "-n", NAMESPACE, "-l", "spillway.dev/tenant", "-o", "wide")
        self.show("get", "memorypools")
        self.show_claims()

    def show_claims(self) -> None:
        """The tenants' ResourceClaims beside them: the lender kube-scheduler allocated, the memory consumed."""
        def allocated() -> bool:
            items = self.kube.get_json("resourceclaims", "-n", NAMESPACE)["items"]
            return all((c.get("status") or {}).get("allocation") for c in items)

        try:
            wait_until(allocated, timeout=60, what="the tenants' claims to be allocated")
        except TimeoutError as exc:
            out(f"warning: {exc}")
        result = ".status.allocation.devices.results[0]"
        self.show("get", "resourceclaims", "-A", "-o", "custom-columns=NAMESPACE:.metadata.namespace,"
                  "NAME:.metadata.name,TENANT:.metadata.labels.spillway\\.dev/tenant,"
                  f"NODE:{result}.pool,LENDER:{result}.device,CONSUMED:{result}.consumedCapacity.memory,"
                  "POD:.status.reservedFor[0].name")

    def show_dra(self) -> None:
        """The pool as kube-scheduler sees it through DRA, and the claims it allocated on it."""
        say("the same pool through DRA: the node's ResourceSlice (one device per lending GPU, consumable memory), "
            "and the claims the operator made for the borrowers' replicas")
        self.show("get", "resourceslices", "-o", "wide")
        self.show("get", "resourceslices", "-o", "jsonpath={range .items[*]}{.spec.nodeName}{range .spec.devices[*]}"
                  "{\"\\n  \"}{.attributes.index.int}{\"  \"}{.attributes.uuid.string}{\"  memory=\"}"
                  "{.capacity.memory.value}{end}{\"\\n\"}{end}")
        self.show("get", "resourceclaims", "-A")
        self.show("get", "resourceclaim", f"{LOADED}-0-peer-hbm", "-n", NAMESPACE, "-o",
                  "jsonpath={.status.allocation.devices.results}{\"\\n\"}")
        self.show("get", "resourceclaim", f"{LOADED}-0-peer-hbm", "-n", NAMESPACE, "-o",
                  "jsonpath={.spec.devices.requests[0].exactly.selectors}{\"\\n\"}")
        self.show("get", "inferencetenant", LOADED, "-n", NAMESPACE, "-o", "jsonpath={.status.placements[0]}{\"\\n\"}")
        out("(kwok nodes run no kubelet, so nothing prepares these claims: the scheduler counts their memory on "
            "the lender device, the agent holds no lease for them; SLO growth below is ELASTIC leases at the agent)")

    def start_servers(self) -> None:
        pods = self.kube.get_json("pods", "-n", NAMESPACE, "-l", "spillway.dev/tenant")["items"]
        names = sorted(p["metadata"]["name"] for p in pods)
        say(f"starting one example model server per replica ({', '.join(names)}): examples/toy_server, tiny "
            "configuration (d_model 64, 2 layers) on CPU. A stand-in for the models the tenants name; the latency "
            "it reports (vLLM's histograms) is measured")
        env = dict(os.environ, PYTHONPATH=f"{REPO}{os.pathsep}{REPO / 'examples'}", OMP_NUM_THREADS="1",
                   MKL_NUM_THREADS="1")
        for pod in names:
            port = free_port()
            proc = self.spawn(f"server-{pod}", [sys.executable, "-m", "toy_server", "--host", "127.0.0.1", "--port",
                                                str(port), "--model-name", pod.rsplit("-", 1)[0], *TOY_ARGS], env)
            self.servers[pod] = (proc, port)
        def healthy() -> bool:
            for pod, (proc, port) in self.servers.items():
                if proc.poll() is not None:
                    raise RuntimeError(f"model server for {pod} exited; see {self.state}/logs/server-{pod}.log")
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2):
                        pass
                except OSError:
                    return False
            return True

        wait_until(healthy, timeout=180, what="the model servers to answer", interval=0.5)
        assert self.prom is not None
        for pod, (_, port) in self.servers.items():
            self.prom.add_target(f"127.0.0.1:{port}", {"namespace": NAMESPACE, "pod": pod})
        out("Prometheus scrapes them with the labels the operator queries: "
            + ", ".join(f'{{namespace="{NAMESPACE}", pod="{p}"}}' for p in self.servers))
        self.set_load(**{t: self.args.base_rate for t in {p.rsplit("-", 1)[0] for p in self.servers}})
        self.load = self.spawn("load", [sys.executable, str(HACK / "demo_load.py"), "--control", str(self.load_file),
                                        "--max-in-flight", "128"])

    def loop(self) -> None:
        w = self.window_s
        say(f"light load ({self.args.base_rate:g} requests/s each): waiting for {LOADED} to meet its SLO "
            f"(p{self.slo['percentile']} TTFT <= {self.slo['ttft']}, TBT <= {self.slo['tbt']} and attainment >= "
            f"{self.slo['attainment']} over a {self.args.slo_window} window)")
        self.phases.append((time.time(), "LIGHT LOAD"))
        self.watch(lambda r: r["state"] == "Met", 6 * w + 60, f"{LOADED} meeting its SLO")
        self.show("get", "inferencetenants", "-n", NAMESPACE)

        say(f"raising the load on {LOADED} to {self.args.surge_rate:g} requests/s: more than its model server keeps "
            "up with, so requests queue and time to first token grows")
        self.phases.append((time.time(), "LOAD UP"))
        self.set_load(**{LOADED: self.args.surge_rate})
        self.watch(lambda r: r["state"] == "Missed", 4 * w + 60, f"{LOADED} missing its SLO")
        out(f"the operator grows {LOADED}'s ELASTIC peer memory by --slo-step each window while it misses:")
        limit = self.tenant_limit()
        self.watch(lambda r: r["elasticBytes"] > 0 and r["elasticBytes"] + self.request_bytes() >= limit,
                   self.args.surge_windows * (w + 4) + 30, f"{LOADED}'s peer memory reaching its limit")
        self.show("get", "inferencetenants", "-n", NAMESPACE)
        self.events("PeerMemoryGrown", "SLOMissed", "ElasticGrowFailed")
        out("(the ELASTIC memory is leased for real at the simulated agent; these CPU model servers do not use it, "
            "so their latency falls only when the load does)")

        say(f"lowering the load on {LOADED} to {self.args.base_rate:g} requests/s")
        self.phases.append((time.time(), "LOAD DOWN"))
        self.set_load(**{LOADED: self.args.base_rate})
        out(f"the operator gives ELASTIC memory back a step per window once {LOADED} meets its SLO with slack "
            "(p99 at most half the target) and others want the pool (batch-summariser runs Degraded on host memory):")
        self.watch(lambda r: r["state"] == "Met" and r["elasticBytes"] == 0,
                   self.args.surge_windows * (w + 4) + 2 * w + 60, f"{LOADED}'s ELASTIC memory going back")
        self.show("get", "inferencetenants", "-n", NAMESPACE)
        self.events("PeerMemoryShrunk")
        self.phases.append((time.time(), "END"))

    def spec(self) -> dict[str, Any]:
        return dict(self.tenants()[LOADED]["spec"])

    def tenant_limit(self) -> int:
        return int(parse_quantity(self.spec()["peerMemory"]["limit"]))

    def request_bytes(self) -> int:
        return int(parse_quantity(self.spec()["peerMemory"]["request"]))

    def chart(self) -> Path:
        assert self.prom is not None
        # Let Prometheus scrape the operator's last step (it scrapes every second), so the picture
        # ends where the tables did.
        elastic_now = self.timeline[-1]["elasticBytes"] if self.timeline else 0
        last = f'spillway_tenant_peer_memory_bytes{{namespace="{NAMESPACE}",tenant="{LOADED}",kind="ELASTIC"}}'

        def scraped() -> bool:
            assert self.prom is not None
            got = self.prom.query(last)
            return bool(got) and float(got[0]["value"][1]) == elastic_now  # type: ignore[index]

        try:
            wait_until(scraped, timeout=15, what="Prometheus to scrape the last step", interval=0.5)
        except TimeoutError as exc:
            out(f"warning: {exc}")
        time.sleep(2.0)  # and one more range-query step
        end = time.time()
        start = self.phases[0][0] - 10 if self.phases else self.t0
        step = 2.0
        window = f"{max(1, math.ceil(self.window_s))}s"
        sel = f'namespace="{NAMESPACE}",pod=~"{LOADED}-[0-9]+"'
        quantile = float(self.slo["percentile"]) / 100
        q = (f"histogram_quantile({quantile:g}, sum by (le) (rate(vllm:time_to_first_token_seconds_bucket{{{sel}}}"
             f"[{window}])))")

        def series(promql: str) -> list[tuple[float, float | None]]:
            """Prometheus's points as they are; a missing step (no sample, no traffic) is a gap."""
            assert self.prom is not None
            points = sorted((float(t), float(v)) for r in self.prom.query_range(promql, start, end, step)
                            for t, v in r["values"])  # type: ignore[union-attr]
            out_: list[tuple[float, float | None]] = []
            for t, v in points:
                if out_ and t - out_[-1][0] > 1.5 * step:
                    out_.append((t - step, None))
                out_.append((t, None if math.isnan(v) else v))
            return out_

        ttft = series(q)
        mem = f'spillway_tenant_peer_memory_bytes{{namespace="{NAMESPACE}",tenant="{LOADED}",kind="%s"}}'
        reserved = series(mem % "RESERVATION")
        elastic = series(mem % "ELASTIC")
        path = Path(self.args.png).expanduser().resolve()
        demo_chart(path, tenant=LOADED, ttft=ttft, objective=parse_duration(str(self.slo["ttft"])),
                   reserved=reserved, elastic=elastic,
                   phases=[(t, name) for t, name in self.phases if name != "END"], t0=start, t1=end,
                   note="PROMETHEUS RANGE QUERIES, 2S STEP. MODEL SERVER: EXAMPLES/TOY_SERVER, TINY CONFIGURATION, "
                        "CPU. GPUS: SIMULATED.")
        return path


def interactive(demo: Demo) -> None:
    say("the system keeps running; in another terminal:")
    out(f"  export KUBECONFIG={demo.sb.kubeconfig}\n"
        f"  kubectl get it; kubectl describe it {LOADED}; kubectl get memorypools\n"
        f"  Prometheus: {demo.prom.url if demo.prom else '-'}   logs: {demo.state}/logs, {demo.sb.workdir}\n"
        "Press Ctrl-C (or close the terminal) to stop everything.")
    while True:
        time.sleep(1.0)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--once", action="store_true", help="stop everything after the loop instead of waiting")
    parser.add_argument("--timeout", type=float, default=240.0, help="seconds to wait for the tenants to be placed")
    parser.add_argument("--slo-window", default=os.environ.get("SPILLWAY_DEMO_SLO_WINDOW", "15s"),
                        help="every tenant's SLO window: one SLO evaluation and one peer-memory step per window "
                             "(default 15s; env SPILLWAY_DEMO_SLO_WINDOW)")
    parser.add_argument("--slo-step", default="2Gi", help="the operator's --slo-step (default 2Gi)")
    parser.add_argument("--base-rate", type=float, default=1.0, help="light load, requests/s per tenant")
    parser.add_argument("--surge-rate", type=float, default=float(os.environ.get("SPILLWAY_DEMO_SURGE_RATE", 60)),
                        help="the load on chat when it goes up, requests/s (default 60)")
    parser.add_argument("--surge-windows", type=int, default=6,
                        help="at most this many SLO windows for the memory to grow (and to go back)")
    parser.add_argument("--png", default=os.environ.get("SPILLWAY_DEMO_PNG",
                                                        str(Path.home() / ".cache" / "spillway" / "demo-slo-loop.png")),
                        help="where to write the picture (default ~/.cache/spillway/demo-slo-loop.png)")
    args = parser.parse_args(argv)
    try:
        window = parse_duration(args.slo_window)
    except ValueError as exc:
        parser.error(f"--slo-window: {exc} (e.g. 15s)")
    if window < 5:
        parser.error("--slo-window must be at least 5s: Prometheus scrapes every second and rate() needs samples")

    signals = Signals(out)
    signals.install()
    subreaper = become_subreaper()
    state = Path(os.environ.get("SPILLWAY_DEMO_DIR", Path.home() / ".cache" / "spillway" / "demo"))
    shutil.rmtree(state, ignore_errors=True)
    state.mkdir(parents=True, exist_ok=True)
    demo = Demo(args, state)
    code = 0
    try:
        demo.start_system()
        demo.apply_tenants()
        demo.show_dra()
        demo.start_servers()
        demo.loop()
        out("demo-timeline: " + json.dumps({"tenant": LOADED, "timeline": demo.timeline}))
        png = demo.chart()
        say(f"picture of {LOADED}'s TTFT p99 against its objective and its peer memory: {png}")
        out("\nAll GPUs above are SIMULATED (the agent's simulated backend); the model servers are the tiny "
            "example server on CPU. The control loop, the leases and the latencies are real.")
        if not args.once:
            interactive(demo)
    except Interrupted as exc:
        say(f"{exc} received")
        code = 130
    except Exception as exc:  # a failed step: say what, then stop everything all the same
        signals.stopping = True
        out(f"error: {type(exc).__name__}: {exc}")
        out(demo.sb.logs()[-3000:])
        code = 1
    finally:
        signals.stopping = True
        say("stopping everything the demo started: the load generator, the model servers, Prometheus, the "
            "DRA driver, the operator, the agent and the control plane")
        for proc in [demo.load, *(p for p, _ in demo.servers.values())]:
            if proc is not None and proc.poll() is None:
                proc.terminate()
        if demo.prom is not None:
            demo.prom.stop()
        try:
            demo.sb.stop()
        except Exception as exc:  # whatever is left, the sweep below stops
            out(f"warning: orderly stop failed ({exc}); stopping the rest by process group")
        groups, left = stop_tree(grace=10.0)
        shutil.rmtree(state, ignore_errors=True)
        remaining = descendants(os.getpid())
        how = "as subreaper of its process tree" if subreaper else "by its process tree"
        out(f"stopped: {groups} more process group(s) found {how}; processes of the demo left: "
            f"{len(remaining) or left}")
    return code


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))

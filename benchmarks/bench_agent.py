"""Agent benchmark: Acquire+Release round trips over the unix socket against a real agent
subprocess (simulated GPUs), side by side in the same run with the same operation done as a
Kubernetes `coordination.k8s.io/v1` Lease object (create + delete) on the real kube-apiserver
(spillway.testing.cluster), plus the time from a Reclaim call to the REVOKING event in the
holder's Watch stream.

    python -m benchmarks agent            # or: make bench
    python -m benchmarks.bench_agent --quick

Both sides are driven by the same asyncio client process (grpc.aio for the agent, aiohttp
with the admin client certificate for the API server), so client overhead is comparable.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import gc
import os
import ssl
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from spillway.agent.client import AgentClient
from spillway.api.v1 import agent_pb2 as pb
from spillway.testing.agentproc import AgentProcess


@dataclass
class Result:
    name: str
    concurrency: int
    ops: int
    seconds: float
    latencies: list[float]
    errors: int = 0

    @property
    def rate(self) -> float:
        return self.ops / self.seconds if self.seconds else 0.0

    def pct(self, q: float) -> float:
        xs = sorted(self.latencies)
        return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")

    def row(self) -> str:
        return (f"| {self.name} | {self.concurrency or '-'} | {self.ops} | {self.pct(0.5) * 1000:.2f} | "
                f"{self.pct(0.99) * 1000:.2f} | {self.rate:,.0f} | {self.errors} |")


async def closed_loop(name: str, concurrency: int, total: int,
                      make_worker: Callable[[int], Awaitable[Callable[[int], Awaitable[None]]]],
                      close: Callable[[], Awaitable[None]] | None = None) -> Result:
    """`concurrency` workers, each running one operation after another, `total` in all."""
    ops = [await make_worker(i) for i in range(concurrency)]
    latencies: list[float] = []
    counter = iter(range(total))

    async def run(op: Callable[[int], Awaitable[None]]) -> None:
        for n in counter:
            t0 = time.perf_counter()
            await op(n)
            latencies.append(time.perf_counter() - t0)

    # warm-up: one op per worker, not counted
    await asyncio.gather(*(op(-1 - i) for i, op in enumerate(ops)))
    t0 = time.perf_counter()
    await asyncio.gather(*(run(op) for op in ops))
    seconds = time.perf_counter() - t0
    if close:
        await close()
    return Result(name, concurrency, len(latencies), seconds, latencies)


async def paced(name: str, rate: float, seconds: float, op: Callable[[int], Awaitable[None]]) -> Result:
    """Open loop: start an operation every 1/rate s whatever the previous ones do."""
    latencies: list[float] = []
    tasks = []

    errors = 0

    async def one(n: int) -> None:
        nonlocal errors
        t0 = time.perf_counter()
        try:
            await op(n)
        except Exception as exc:  # counted and reported, not hidden: an open loop must not stop
            errors += 1
            if errors == 1:
                print(f"  {name}: first error: {exc!r}"[:300], flush=True)
            return
        latencies.append(time.perf_counter() - t0)

    n_total = int(rate * seconds)
    start = time.perf_counter()
    for n in range(n_total):
        delay = start + n / rate - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(n)))
    await asyncio.gather(*tasks)
    return Result(name, 0, len(latencies), time.perf_counter() - start, latencies, errors)


# --- the agent ---------------------------------------------------------------------------


async def agent_level(agent: AgentProcess, concurrency: int, total: int) -> Result:
    """One client (its own channel) per worker."""
    clients: list[AgentClient] = []

    async def make(i: int) -> Callable[[int], Awaitable[None]]:
        client = AgentClient(str(agent.socket))
        clients.append(client)

        async def op(n: int) -> None:
            got = await client.acquire("64Mi", f"bench-{i}")
            await client.release(got.lease.id, got.token)

        return op

    async def close() -> None:
        for cl in clients:
            await cl.close()

    return await closed_loop("agent Acquire+Release (unix socket)", concurrency, total, make, close)


async def agent_runs(agent: AgentProcess, levels: list[int], per_level: int) -> list[Result]:
    return [await agent_level(agent, c, per_level) for c in levels]


async def agent_paced(agent: AgentProcess, rate: float, seconds: float, *, floor: bool = False) -> Result:
    """Acquire+Release paced at `rate`; with `floor`, two ListLeases calls that match nothing
    instead (the same two round trips with next to no work in the agent: the transport's floor,
    Python gRPC on both ends, measured the same way in the same run)."""
    clients = [AgentClient(str(agent.socket)) for _ in range(8)]
    for cl in clients:
        await cl.inventory()

    async def op(n: int) -> None:
        cl = clients[n % len(clients)]
        got = await cl.acquire("64Mi", "paced")
        await cl.release(got.lease.id, got.token)

    async def empty(n: int) -> None:
        cl = clients[n % len(clients)]
        await cl.leases(holder="nobody")
        await cl.leases(holder="nobody")

    name = "2 x empty ListLeases (gRPC floor)" if floor else "agent Acquire+Release"
    r = await paced(f"{name} paced at {rate:.0f}/s", rate, seconds, empty if floor else op)
    for cl in clients:
        await cl.close()
    return r


async def reclaim_notify(agent: AgentProcess, rounds: int) -> list[float]:
    out = []
    async with AgentClient(str(agent.socket)) as holder, AgentClient(str(agent.socket)) as admin:
        gpu = (await admin.inventory()).gpus[7].uuid
        for _ in range(rounds):
            got = await holder.acquire("1Gi", "holder", gpu_uuid=gpu, kind=pb.ELASTIC)
            it = holder.watch(got.lease.id, got.token)
            first = await it.__anext__()
            assert first.kind == pb.WatchEvent.SNAPSHOT
            t0 = time.perf_counter()
            await admin.reclaim(gpu, "1Gi", deadline_s=5)
            async for ev in it:
                if ev.kind == pb.WatchEvent.LEASE and ev.lease.state == pb.REVOKING:
                    out.append(time.perf_counter() - t0)
                    break
            await it.aclose()
            await holder.release(got.lease.id, got.token)
    return out


# --- the Lease object on kube-apiserver --------------------------------------------------


def _ssl_from_kubeconfig(path: Path, workdir: Path) -> tuple[str, ssl.SSLContext]:
    doc = yaml.safe_load(path.read_text())
    cluster = doc["clusters"][0]["cluster"]
    user = doc["users"][0]["user"]
    files = {}
    for key in ("certificate-authority-data", "client-certificate-data", "client-key-data"):
        p = workdir / key
        p.write_bytes(base64.b64decode(user.get(key) or cluster.get(key)))
        files[key] = p
    ctx = ssl.create_default_context(cafile=str(files["certificate-authority-data"]))
    ctx.load_cert_chain(str(files["client-certificate-data"]), str(files["client-key-data"]))
    return cluster["server"], ctx


async def lease_object_runs(server: str, ctx: ssl.SSLContext, levels: list[int], per_level: int) -> list[Result]:
    import aiohttp

    url = f"{server}/apis/coordination.k8s.io/v1/namespaces/default/leases"
    results = []
    connector = aiohttp.TCPConnector(ssl=ctx, limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:
        for c in levels:

            async def make(i: int, c: int = c) -> Callable[[int], Awaitable[None]]:
                async def op(n: int) -> None:
                    name = f"bench-{c}-{i}-{n + 1000}"
                    body: dict[str, Any] = {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                                            "metadata": {"name": name},
                                            "spec": {"holderIdentity": f"bench-{i}", "leaseDurationSeconds": 60}}
                    async with session.post(url, json=body) as r:
                        if r.status != 201:
                            raise RuntimeError(f"create Lease: HTTP {r.status}: {await r.text()}")
                    async with session.delete(f"{url}/{name}") as r:
                        if r.status != 200:
                            raise RuntimeError(f"delete Lease: HTTP {r.status}: {await r.text()}")

                return op

            results.append(await closed_loop("Lease object create+delete (kube-apiserver)", c, per_level, make))
    return results


# --- main --------------------------------------------------------------------------------


def _table(results: list[Result]) -> None:
    print("| operation | clients | ops | p50 ms | p99 ms | ops/s | errors |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in results:
        print(r.row())


async def run(args: argparse.Namespace) -> int:
    levels = [1, 8, 64]
    per = 300 if args.quick else args.ops
    # The client is a Python process too: its own full garbage collections (over the modules it
    # imported) would show up as agent latency. Freeze what exists, as the agent does at start.
    gc.collect()
    gc.freeze()
    with AgentProcess(node_name="bench") as agent:
        agent_results = await agent_runs(agent, levels, per)
        rates = [float(r) for r in args.rate.split(",")]
        secs = 2.0 if args.quick else args.paced_seconds
        pacings = [await agent_paced(agent, r, secs) for r in rates]
        floors = [await agent_paced(agent, r, secs, floor=True) for r in rates]
        notify = await reclaim_notify(agent, 50 if args.quick else args.reclaims)
    kube: list[Result] = []
    kube_note = ""
    if args.no_cluster:
        kube_note = "Lease-object comparison skipped (--no-cluster)"
    else:
        try:
            from spillway.testing.cluster import Cluster

            with Cluster() as cluster, tempfile.TemporaryDirectory(prefix="spw-bench-") as tmp:
                server, ctx = _ssl_from_kubeconfig(cluster.kubeconfig, Path(tmp))
                kube = await lease_object_runs(server, ctx, levels, max(100, per // 4))
        except Exception as exc:  # the comparison needs the control-plane binaries
            kube_note = f"Lease-object comparison not run: {exc}"
    print(f"\nmachine: {os.cpu_count()} CPUs; agent: simulated dgx-h100, SQLite WAL synchronous=NORMAL\n")
    _table([*agent_results, *pacings, *floors, *kube])
    if kube:
        print()
        for a, k in zip(agent_results, kube, strict=True):
            print(f"- {a.concurrency} clients: agent {a.rate:,.0f} ops/s vs Lease object {k.rate:,.0f} ops/s "
                  f"= {a.rate / k.rate:.1f}x")
    if kube_note:
        print(f"\n{kube_note}")
    notify.sort()
    p50 = statistics.median(notify)
    p99 = notify[min(len(notify) - 1, int(0.99 * len(notify)))]
    print(f"\nReclaim -> REVOKING in the holder's stream ({len(notify)} rounds): p50 {p50 * 1000:.2f} ms, "
          f"p99 {p99 * 1000:.2f} ms, max {notify[-1] * 1000:.2f} ms")
    for pacing, floor in zip(pacings, floors, strict=True):
        print(f"paced run: p99 {pacing.pct(0.99) * 1000:.2f} ms at {pacing.rate:.0f} ops/s achieved "
              f"(goal: p99 < 2 ms at 500/s); the same two round trips doing nothing: p50 "
              f"{floor.pct(0.5) * 1000:.2f} ms, p99 {floor.pct(0.99) * 1000:.2f} ms")
    return 0


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="bench_agent", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer operations (a smoke run)")
    parser.add_argument("--ops", type=int, default=3000, help="Acquire+Release round trips per concurrency level")
    parser.add_argument("--rate", default="100,250,500", help="paced runs: operations per second, comma-separated")
    parser.add_argument("--paced-seconds", type=float, default=5.0)
    parser.add_argument("--reclaims", type=int, default=300, help="reclaim-notification rounds")
    parser.add_argument("--no-cluster", action="store_true", help="skip the kube-apiserver Lease comparison")
    args = parser.parse_args(argv)
    with contextlib.suppress(KeyboardInterrupt):
        return asyncio.run(run(args))
    return 130


if __name__ == "__main__":
    import sys

    raise SystemExit(main(sys.argv[1:]))

"""Hostile watchers: a client opens many Watch streams (every event of the node, the admin
role's worst case: full snapshots) over a pool of many live leases and never reads them; once
the agent serves them all it stops (SIGSTOP), so its sockets fill. The agent must cut each one off once it falls
WATCH_QUEUE events behind, keep its memory bounded and its Acquire+Release latency low, and
give the memory back when the client goes.

    python -m benchmarks watchers                         # 1,000 watchers, 10,000 leases
    python -m benchmarks.bench_watchers --watchers 200 --leases 2000

Reported: the agent's RSS (VmRSS) before, at its peak while the watchers are stuck, and after
they are gone and the leases released; Acquire+Release latency before and while stuck, and the
agent's own CPU time per round trip in both phases (from /proc: what the watchers cost the
agent, whatever else the machine runs); the watchers cut off (spillway_watch_cutoffs_total).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from spillway.agent.client import AgentClient
from spillway.testing.agentproc import AgentProcess

REPO = Path(__file__).resolve().parents[1]
MiB = 1 << 20

# The hostile client: `streams` Watch calls over `channels` connections, never read; it stops
# itself (SIGSTOP) when told on stdin, once the agent serves every stream.
HOSTILE = textwrap.dedent("""
    import asyncio, os, signal, sys
    import grpc
    from spillway.api.v1 import agent_pb2 as pb, agent_pb2_grpc as pbg

    async def main(path, streams, channels):
        chans = [grpc.aio.insecure_channel("unix:" + path) for _ in range(channels)]
        calls = [pbg.AgentStub(chans[i % channels]).Watch(pb.WatchRequest()) for i in range(streams)]
        print("opened", flush=True)
        await asyncio.to_thread(sys.stdin.readline)
        os.kill(os.getpid(), signal.SIGSTOP)
        await asyncio.sleep(3600)

    asyncio.run(main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3])))
""")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time the process has used (/proc/<pid>/stat)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


class RssSampler:
    def __init__(self, pid: int, every_s: float = 0.05) -> None:
        self.pid = pid
        self.every_s = every_s
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.peak = max(self.peak, rss_bytes(self.pid))
            except FileNotFoundError:
                return
            self._stop.wait(self.every_s)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def pct(xs: list[float], q: float) -> float:
    ys = sorted(xs)
    return ys[min(len(ys) - 1, int(q * len(ys)))] if ys else float("nan")


@dataclass
class Report:
    watchers: int
    leases: int
    rss_before: int = 0
    rss_peak: int = 0
    rss_after: int = 0
    base_ms: list[float] = field(default_factory=list)
    stuck_ms: list[float] = field(default_factory=list)
    open_s: float = 0.0
    cutoffs: int = 0
    renew_max_ms: float = 0.0
    base_cpu_ms: float = 0.0  # the agent's CPU time per Acquire+Release, before the watchers
    stuck_cpu_ms: float = 0.0  # the same while they are stuck (their cut-off included)

    def lines(self) -> list[str]:
        return [
            f"watchers {self.watchers}, live leases {self.leases}; the agent served every Watch (snapshot "
            f"started) within {self.open_s:.1f} s",
            f"agent RSS: before {self.rss_before / MiB:.0f} MiB, peak {self.rss_peak / MiB:.0f} MiB, after the "
            f"watchers left and the leases were released {self.rss_after / MiB:.0f} MiB",
            f"Acquire+Release before: p50 {pct(self.base_ms, 0.5):.2f} ms, p99 {pct(self.base_ms, 0.99):.2f} ms "
            f"({len(self.base_ms)} ops)",
            f"Acquire+Release with the stuck watchers: p50 {pct(self.stuck_ms, 0.5):.2f} ms, "
            f"p99 {pct(self.stuck_ms, 0.99):.2f} ms ({len(self.stuck_ms)} ops)",
            f"agent CPU per Acquire+Release: before {self.base_cpu_ms:.2f} ms, with the stuck watchers "
            f"{self.stuck_cpu_ms:.2f} ms",
            f"watchers cut off: {self.cutoffs}; slowest renew of a bystander lease meanwhile "
            f"{self.renew_max_ms:.1f} ms",
        ]


async def _fill(c: AgentClient, n: int, concurrency: int = 16) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    todo = iter(range(n))

    async def worker() -> None:
        for i in todo:
            got = await c.acquire("16Mi", f"bulk-{i % 97}", ttl_s=3600)
            out.append((got.lease.id, got.token))

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return out


async def _churn(c: AgentClient, ops: int) -> list[float]:
    times = []
    for _ in range(ops):
        t0 = time.perf_counter()
        got = await c.acquire("16Mi", "churn")
        await c.release(got.lease.id, got.token)
        times.append((time.perf_counter() - t0) * 1000)
    return times


def _metric(agent: AgentProcess, name: str, having: str = "") -> int:
    """The sum of a counter's samples (those whose labels contain `having`) from /metrics."""
    with urllib.request.urlopen(f"http://127.0.0.1:{agent.metrics_port}/metrics", timeout=10) as r:
        text = r.read().decode()
    return int(sum(float(m.group(2)) for m in re.finditer(rf'^{name}\{{([^}}]*)\}} ([0-9.e+]+)$', text, re.M)
                   if having in m.group(1)))


async def run(agent: AgentProcess, watchers: int, leases: int, churn_ops: int = 600) -> Report:
    """Measure against a started agent (`--granularity 16Mi`, so the leases fit)."""
    assert agent.proc is not None
    pid = agent.proc.pid
    rep = Report(watchers, leases)
    async with agent.client() as c:
        held = await _fill(c, leases)
        # A bystander lease with a 4 s TTL, renewed every 0.5 s throughout: it must never miss.
        bystander = await c.acquire("16Mi", "bystander", ttl_s=4)
        renew_ms: list[float] = []
        stop = asyncio.Event()

        async def renew() -> None:
            while not stop.is_set():
                t = time.perf_counter()
                await c.renew(bystander.lease.id, bystander.token)
                renew_ms.append((time.perf_counter() - t) * 1000)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), 0.5)

        renewer = asyncio.create_task(renew())
        await _churn(c, 50)  # warm up
        cpu0 = cpu_seconds(pid)
        rep.base_ms = await _churn(c, churn_ops // 2)
        rep.base_cpu_ms = (cpu_seconds(pid) - cpu0) * 1000 / len(rep.base_ms)
        rep.rss_before = rss_bytes(pid)
        env = dict(os.environ, PYTHONPATH=str(REPO))
        opened = _metric(agent, "spillway_lease_operations_total", 'method="Watch"')
        hostile = await asyncio.create_subprocess_exec(
            sys.executable, "-c", HOSTILE, str(agent.socket), str(watchers), str(max(1, watchers // 100)),
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env)
        try:
            with RssSampler(pid) as sampler:
                t0 = time.monotonic()
                assert hostile.stdout is not None and hostile.stdin is not None
                line = await asyncio.wait_for(hostile.stdout.readline(), 600)
                assert line.strip() == b"opened", line
                while _metric(agent, "spillway_lease_operations_total", 'method="Watch"') < opened + watchers:
                    await asyncio.sleep(0.1)
                    assert time.monotonic() - t0 < 600, "the agent did not serve every Watch in 10 minutes"
                rep.open_s = time.monotonic() - t0
                hostile.stdin.write(b"stop\n")
                await hostile.stdin.drain()
                cpu0 = cpu_seconds(pid)
                rep.stuck_ms = await _churn(c, churn_ops)
                rep.stuck_cpu_ms = (cpu_seconds(pid) - cpu0) * 1000 / len(rep.stuck_ms)
                stop.set()
                await renewer
                rep.renew_max_ms = max(renew_ms, default=0.0)
                rep.cutoffs = _metric(agent, "spillway_watch_cutoffs_total")
            rep.rss_peak = sampler.peak
        finally:
            hostile.send_signal(signal.SIGKILL)
            await hostile.wait()
            stop.set()
            await renewer
        for lease_id, token in held:
            await c.release(lease_id, token)
        await c.release(bystander.lease.id, bystander.token)
        await asyncio.sleep(2.0)
        rep.rss_after = rss_bytes(pid)
    return rep


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_watchers")
    p.add_argument("--watchers", type=int, default=1000)
    p.add_argument("--leases", type=int, default=10_000)
    p.add_argument("--ops", type=int, default=1000, help="Acquire+Release round trips measured while stuck")
    args = p.parse_args(argv)
    with AgentProcess(node_name="bench-watchers", extra_args=["--granularity", "16Mi"]) as agent:
        rep = asyncio.run(run(agent, args.watchers, args.leases, args.ops))
    for line in rep.lines():
        print(line)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))

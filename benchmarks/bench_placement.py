"""Placement quality and speed: greedy planner vs the MILP optimum, and planning at scale.

- 200 random instances (up to 8 nodes x 8 GPUs, up to 40 tenants): greedy objective as a share
  of the MILP's (goals: mean >= 95%, min >= 85%); HiGHS gets a time limit per instance and the
  report says how many reached proven optimality (the rest are compared with the best found).
- 1,000 tenants on 250 nodes: planning time (goal < 1 s).

Run: `python -m benchmarks.bench_placement [--instances 200] [--time-limit 2] [--seed 1]`.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from typing import Any

from spillway.operator import milp, placement
from spillway.operator.model import GpuView, NodeView, TenantSpec

GI = 1 << 30


def make_node(
    name: str, gpus: int = 8, topology: str = "nvswitch", total_gi: int = 80, headroom_gi: int = 2
) -> NodeView:
    """A simulated node: `nvswitch` (all pairs NVLinked), `pairs` (0-1, 2-3, ...) or `pcie` (none)."""
    views = tuple(
        GpuView(
            uuid=f"GPU-{name}-{i}",
            index=i,
            name="NVIDIA H100 80GB HBM3 (simulated)",
            total=total_gi * GI,
            local_used=0,
            local_reserved=0,
            headroom=headroom_gi * GI,
            leased=0,
            lendable=(total_gi - headroom_gi) * GI,
        )
        for i in range(gpus)
    )
    links: set[frozenset[str]] = set()
    for a in range(gpus):
        for b in range(a + 1, gpus):
            if topology == "nvswitch" or (topology == "pairs" and a // 2 == b // 2):
                links.add(frozenset((views[a].uuid, views[b].uuid)))
    return NodeView(name=name, endpoint=f"{name}:50051", simulated=True, gpus=views, nvlink=frozenset(links))


def make_tenant(name: str, rng: random.Random, namespace: str = "bench") -> TenantSpec:
    kind = rng.choices(["llm", "lender", "plain"], weights=[5, 3, 2])[0]
    priority = rng.choice([0, 0, 0, 100, -100])
    replicas = rng.choice([1, 1, 1, 2])
    if kind == "llm":
        is_tight = rng.random() < 0.5
        return TenantSpec(
            namespace=namespace,
            name=name,
            uid=name,
            replicas=replicas,
            memory=rng.randrange(30, 76) * GI,
            peer_request=rng.choice([8, 12, 16, 20, 24, 32, 40]) * GI,
            peer_limit=48 * GI,
            fallback=rng.choice(["HostMemory", "HostMemory", "None"]),
            priority=priority,
            ttft_s=0.5 if is_tight else 10.0,
            tbt_s=0.05 if is_tight else 0.5,
            lending=rng.random() < 0.3,
            image="spillway/toy-server:0.1.0",
        )
    if kind == "lender":
        return TenantSpec(
            namespace=namespace,
            name=name,
            uid=name,
            replicas=replicas,
            memory=rng.randrange(4, 24) * GI,
            priority=priority,
            lending=True,
            image="spillway/toy-server:0.1.0",
        )
    return TenantSpec(
        namespace=namespace,
        name=name,
        uid=name,
        replicas=replicas,
        memory=rng.randrange(20, 70) * GI,
        priority=priority,
        lending=False,
        image="spillway/toy-server:0.1.0",
    )


def random_instance(
    rng: random.Random, max_nodes: int = 8, max_tenants: int = 40
) -> tuple[list[NodeView], list[TenantSpec]]:
    n_nodes = rng.randint(1, max_nodes)
    topology = rng.choices(["nvswitch", "pairs", "pcie"], weights=[6, 3, 1])[0]
    nodes = [make_node(f"n{i}", rng.choice([4, 8]), topology) for i in range(n_nodes)]
    gpus = sum(len(n.gpus) for n in nodes)
    # From a light load to more replicas than GPUs.
    n_tenants = max(1, min(max_tenants, int(gpus * rng.uniform(0.3, 1.2))))
    tenants = [make_tenant(f"t{i}", rng) for i in range(n_tenants)]
    return nodes, tenants


def quality(instances: int, time_limit_s: float, seed: int) -> dict[str, Any]:
    rng = random.Random(seed)
    ratios: list[float] = []
    vs_bound: list[float] = []
    optimal = 0
    worst: tuple[float, int, bool] = (2.0, -1, False)
    milp_s: list[float] = []
    sizes: list[int] = []
    for i in range(instances):
        nodes, tenants = random_instance(rng)
        sizes.append(sum(t.replicas for t in tenants))
        greedy = placement.objective(placement.plan(nodes, tenants), tenants)
        exact = milp.solve(nodes, tenants, time_limit_s=time_limit_s)
        milp_s.append(exact.seconds)
        optimal += exact.optimal
        best = max(exact.objective, greedy)  # a time-limited MILP may find less than greedy did
        ratio = greedy / best if best > 0 else 1.0
        ratios.append(ratio)
        # Against HiGHS's proven upper bound: a floor on the true ratio when not proven optimal.
        bound = max(exact.bound, best)
        vs_bound.append(greedy / bound if bound > 0 else 1.0)
        worst = min(worst, (ratio, i, exact.optimal))
    return {
        "instances": instances,
        "replicas_mean": statistics.fmean(sizes),
        "replicas_max": max(sizes),
        "mean_ratio": statistics.fmean(ratios),
        "min_ratio": worst[0],
        "worst_instance": worst[1],
        "worst_instance_proven_optimal": worst[2],
        "mean_ratio_vs_upper_bound": statistics.fmean(vs_bound),
        "min_ratio_vs_upper_bound": min(vs_bound),
        "proven_optimal": optimal,
        "milp_time_limit_s": time_limit_s,
        "milp_mean_s": statistics.fmean(milp_s),
    }


def speed(n_tenants: int = 1000, n_nodes: int = 250, seed: int = 2, repeat: int = 3) -> dict[str, Any]:
    rng = random.Random(seed)
    nodes = [make_node(f"n{i}") for i in range(n_nodes)]
    tenants = [make_tenant(f"t{i}", rng) for i in range(n_tenants)]
    times = []
    result = None
    for _ in range(repeat):
        t0 = time.perf_counter()
        result = placement.plan(nodes, tenants)
        times.append(time.perf_counter() - t0)
    assert result is not None
    return {
        "tenants": n_tenants,
        "nodes": n_nodes,
        "gpus": n_nodes * 8,
        "replicas": sum(t.replicas for t in tenants),
        "placed": len(result.assignments),
        "pending": len(result.pending),
        "best_s": min(times),
        "median_s": statistics.median(times),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--instances", type=int, default=200)
    ap.add_argument("--time-limit", type=float, default=2.0, help="HiGHS time limit per instance, seconds")
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args(argv)
    out = {"speed": speed(), "quality": quality(args.instances, args.time_limit, args.seed)}
    print(json.dumps(out, indent=2))
    q, s = out["quality"], out["speed"]
    ok = q["mean_ratio"] >= 0.95 and q["min_ratio"] >= 0.85 and s["best_s"] < 1.0
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

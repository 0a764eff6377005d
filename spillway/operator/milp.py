"""The exact placement problem as a mixed-integer linear program (SciPy `milp`, HiGHS).

Same rules and the same score as the greedy planner (`placement.objective`), for fresh
placements (no current assignments) of small instances; used to check the greedy planner's
quality in tests and in `benchmarks/bench_placement.py`.

Variables (sizes in GiB so the numbers stay well scaled):
- x[r, g] in {0, 1}: replica r runs on GPU g;
- z[r] in {0, 1}: borrower r gets all its peer memory;
- y[r, l] >= 0: GiB lent to borrower r by GPU l.
Constraints: a replica on at most one GPU; a GPU hosts at most one replica; what a GPU keeps
for its occupant plus what it lends fits its free memory; a GPU whose occupant does not lend
lends nothing; y[r, l] only when l is NVLinked to r's GPU; z[r] = 1 needs the full request;
fallback None makes z[r] equal placement. Objective: sum of weight * (placed + satisfied),
a replica that borrows nothing counting as satisfied.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, milp
from scipy.sparse import lil_matrix

from spillway.operator.model import Assignment, NodeView, Plan, ReplicaKey, TenantSpec
from spillway.operator.placement import objective, weight
from spillway.operator.pods import local_bytes

GIB = float(1 << 30)


@dataclass(frozen=True)
class MilpResult:
    plan: Plan
    objective: float  # placement.objective of `plan`
    bound: float  # HiGHS's proven upper bound on the objective (== objective when optimal)
    optimal: bool  # proven optimal within the time limit
    seconds: float
    status: str


def solve(nodes: Sequence[NodeView], tenants: Sequence[TenantSpec], *, time_limit_s: float = 10.0) -> MilpResult:
    """Place every replica of `tenants` on `nodes` optimally (or best found within the limit)."""
    t0 = time.monotonic()
    gpus = [(n, g) for n in nodes for g in n.gpus]
    gi = {g.uuid: i for i, (_, g) in enumerate(gpus)}
    room = np.array(
        [max(0, g.total - g.headroom - max(g.local_used, g.local_reserved) - g.leased) / GIB for _, g in gpus]
    )
    reps = [(t, ReplicaKey(t.namespace, t.name, r)) for t in tenants for r in range(t.replicas)]
    R, G = len(reps), len(gpus)
    mem = np.array([t.memory / GIB for t, _ in reps])
    req = np.array([t.peer_request / GIB for t, _ in reps])
    borrowers = [r for r, (t, _) in enumerate(reps) if t.borrower]
    B = len(borrowers)

    # variable layout: x (R*G), z (B), y (B*G)
    def xv(r: int, g: int) -> int:
        return r * G + g

    def zv(b: int) -> int:
        return R * G + b

    def yv(b: int, g: int) -> int:
        return R * G + B + b * G + g

    nvar = R * G + B + B * G
    lb = np.zeros(nvar)
    ub = np.ones(nvar)
    integrality = np.zeros(nvar)
    integrality[: R * G + B] = 1
    for b, r in enumerate(borrowers):
        for g in range(G):
            ub[yv(b, g)] = req[r]
    for r in range(R):
        for g in range(G):
            if mem[r] > room[g] + 1e-9:
                ub[xv(r, g)] = 0
    c = np.zeros(nvar)
    for r, (t, _) in enumerate(reps):
        w = weight(t.priority)
        for g in range(G):
            c[xv(r, g)] = -w * (1.0 if t.borrower else 2.0)
    for b, r in enumerate(borrowers):
        c[zv(b)] = -weight(reps[r][0].priority)

    # neighbours: GPUs NVLinked to each GPU (same node)
    peers: list[list[int]] = []
    for nd, gv in gpus:
        peers.append([gi[o.uuid] for o in nd.gpus if nd.nvlinked(gv.uuid, o.uuid)])

    rows: list[tuple[dict[int, float], float, float]] = []
    for r in range(R):
        rows.append(({xv(r, g): 1.0 for g in range(G)}, -np.inf, 1.0))
    for g in range(G):
        rows.append(({xv(r, g): 1.0 for r in range(R)}, -np.inf, 1.0))
        # what the GPU keeps for its occupant + what it lends <= its room
        row = {xv(r, g): mem[r] for r in range(R)}
        for b in range(B):
            row[yv(b, g)] = 1.0
        rows.append((row, -np.inf, room[g]))
        # an occupant that does not lend: the GPU lends nothing
        nl = [r for r, (t, _) in enumerate(reps) if not t.lending]
        if nl:
            row = {yv(b, g): 1.0 for b in range(B)}
            for r in nl:
                row[xv(r, g)] = room[g]
            rows.append((row, -np.inf, room[g]))
    for b, r in enumerate(borrowers):
        t = reps[r][0]
        for lender in range(G):
            # y[b, l] <= req * sum_{g NVLinked to l} x[r, g]
            row = {yv(b, lender): 1.0}
            for g in peers[lender]:
                row[xv(r, g)] = -req[r]
            rows.append((row, -np.inf, 0.0))
        # sum_l y >= req * z ; z <= placed ; fallback None: z >= placed
        row = {yv(b, g): 1.0 for g in range(G)}
        row[zv(b)] = -req[r]
        rows.append((row, 0.0, np.inf))
        row = {zv(b): 1.0}
        for g in range(G):
            row[xv(r, g)] = -1.0
        rows.append((row, -np.inf, 0.0))
        if t.fallback == "None":
            rows.append((dict(row), 0.0, np.inf))
        # never lend more than asked
        rows.append(({yv(b, g): 1.0 for g in range(G)}, -np.inf, req[r]))

    A = lil_matrix((len(rows), nvar))
    lo = np.empty(len(rows))
    hi = np.empty(len(rows))
    for i, (row, low, high) in enumerate(rows):
        for j, v in row.items():
            A[i, j] = v
        lo[i], hi[i] = low, high
    res = milp(
        c,
        constraints=LinearConstraint(A.tocsr(), lo, hi),
        integrality=integrality,
        bounds=Bounds(lb, ub),
        options={"time_limit": time_limit_s, "disp": False},
    )
    assignments: dict[ReplicaKey, Assignment] = {}
    pending: dict[ReplicaKey, str] = {}
    if res.x is not None:
        x = res.x
        bindex = {r: b for b, r in enumerate(borrowers)}
        for r, (t, key) in enumerate(reps):
            placed = [g for g in range(G) if x[xv(r, g)] > 0.5]
            if not placed:
                pending[key] = "not placed in the optimum"
                continue
            g = placed[0]
            node, gpu = gpus[g]
            lenders: tuple[tuple[str, int], ...] = ()
            if t.borrower and x[zv(bindex[r])] > 0.5:
                b = bindex[r]
                parts = [(gpus[lg][1].uuid, x[yv(b, lg)]) for lg in range(G) if x[yv(b, lg)] > 1e-6]
                total = sum(v for _, v in parts)
                out: list[tuple[str, int]] = []
                left = t.peer_request
                for i, (uuid, v) in enumerate(parts):
                    nbytes = left if i == len(parts) - 1 else min(left, round(t.peer_request * v / total))
                    out.append((uuid, nbytes))
                    left -= nbytes
                lenders = tuple(out)
            assignments[key] = Assignment(key, node.name, gpu.uuid, lenders, host_fallback=t.borrower and not lenders,
                                          keeps=local_bytes(t.memory, t.lending, gpu.total))
    else:
        for _, key in reps:
            pending[key] = f"no MILP solution: {res.message}"
    result_plan = Plan(assignments=assignments, pending=pending)
    score = objective(result_plan, tenants)
    bound = -float(getattr(res, "mip_dual_bound", np.nan) or np.nan)
    if not np.isfinite(bound):
        bound = score
    optimal = res.status == 0
    return MilpResult(
        plan=result_plan,
        objective=score,
        bound=score if optimal else max(bound, score),
        optimal=optimal,
        seconds=time.monotonic() - t0,
        status=str(res.message),
    )

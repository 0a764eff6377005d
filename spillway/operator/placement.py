"""Placement: pure functions from MemoryPool views and tenant specs to a Plan.

Each replica needs one whole GPU with room for `memory`, plus, when it borrows, lender GPU(s) on
the same node, joined to its GPU by NVLink, with spare memory for `peer_request`. Lenders are
idle GPUs and the GPUs of tenants with `lending: true` (what such a tenant keeps is not lent).

The greedy planner:
- keeps every current assignment that is still valid (a running replica never moves without
  need; one whose lenders went away gets new lenders on its own GPU's node, or falls back);
- places the rest by priority (highest first); within one priority, borrowers that can get
  their peer memory first, then lenders, then the rest, and last the borrowers that must run on
  host memory (so a GPU goes to a replica that gets all it asked for first);
- gives tight-SLO borrowers the NVLink lender with the most headroom, and packs loose ones onto
  the lender that fits best (keeping large lenders free for tight tenants);
- pairs lenders with borrowers: a lending tenant goes where borrowers already are, a tenant that
  neither lends nor borrows goes where it takes no lending capacity from them.

`objective` scores a plan; `spillway.operator.milp` maximises the same score exactly, so the
two can be compared.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace

from spillway.operator.model import Assignment, NodeView, Plan, ReplicaKey, TenantSpec
from spillway.operator.pods import local_bytes
from spillway.units import format_bytes, format_duration

# An SLO at or under these targets is "tight": it gets the lender with the most headroom.
TIGHT_TTFT_S = 1.0
TIGHT_TBT_S = 0.1
# Nodes looked at in detail per replica (after a cheap filter over all nodes).
_CANDIDATES = 6


def weight(priority: int) -> float:
    """Value of one replica of a tenant of this priority: doubles every 100 points."""
    return float(2.0 ** (max(-1000, min(1000, priority)) / 100.0))


def tight(t: TenantSpec) -> bool:
    """Does the tenant have a tight latency SLO (then it gets the lenders with most headroom)."""
    return (t.ttft_s is not None and t.ttft_s <= TIGHT_TTFT_S) or (t.tbt_s is not None and t.tbt_s <= TIGHT_TBT_S)


def replica_value(t: TenantSpec, a: Assignment) -> float:
    """What one placed replica is worth: its weight, twice when it got all the peer memory it asked for."""
    satisfied = t.peer_request == 0 or a.peer_bytes >= t.peer_request
    return weight(t.priority) * (2.0 if satisfied else 1.0)


def objective(plan: Plan, tenants: Sequence[TenantSpec]) -> float:
    """The score both planners maximise (see `replica_value`)."""
    by_key = {t.key: t for t in tenants}
    total = 0.0
    for key, a in plan.assignments.items():
        t = by_key.get(key.tenant_key)
        if t is not None:
            total += replica_value(t, a)
    return total


# -- mutable planning state -------------------------------------------------------------------


@dataclass
class _Gpu:
    uuid: str
    index: int
    node: str
    total: int
    cap: int  # total - headroom - leases that are not ours
    foreign: int  # local use not belonging to a replica we place
    occupant: ReplicaKey | None = None
    occ_mem: int = 0
    occ_lending: bool = True
    lent: int = 0
    peers: tuple[str, ...] = ()

    @property
    def lendable(self) -> int:
        if self.occupant is not None and not self.occ_lending:
            return 0
        return max(0, self.cap - self.foreign - self.occ_mem - self.lent)

    @property
    def room(self) -> int:
        """Memory a new occupant could keep here (-1 when taken)."""
        if self.occupant is not None:
            return -1
        return self.cap - self.foreign - self.lent


@dataclass
class _Node:
    view: NodeView
    gpus: dict[str, _Gpu]
    borrowers: int = 0  # placed replicas that borrow
    starved: int = 0  # placed borrowers on host fallback
    # cached aggregates, refreshed after each change
    rooms: list[tuple[int, int]] = field(default_factory=list)  # sorted (room, index) of free GPUs
    total_lendable: int = 0
    max_lendable: int = 0

    def refresh(self) -> None:
        self.rooms = sorted((g.room, g.index) for g in self.gpus.values() if g.occupant is None)
        lend = [g.lendable for g in self.gpus.values()]
        self.total_lendable = sum(lend)
        self.max_lendable = max(lend, default=0)

    def fits(self, memory: int) -> bool:
        return bool(self.rooms) and self.rooms[-1][0] >= memory


class _State:
    def __init__(self, nodes: Sequence[NodeView], current: Mapping[ReplicaKey, Assignment]) -> None:
        self.assign: dict[ReplicaKey, Assignment] = {}  # this plan's assignments (tenants passed in)
        self.tight: dict[str, bool] = {}
        self.current = set(current)  # loans of these are running: never moved by a repair
        ours_lent: dict[str, int] = {}
        ours_on: set[str] = set()
        for a in current.values():
            ours_on.add(a.gpu_uuid)
            for uuid, nbytes in a.lenders:
                ours_lent[uuid] = ours_lent.get(uuid, 0) + nbytes
        self.nodes: dict[str, _Node] = {}
        self.gpu_node: dict[str, str] = {}
        for view in nodes:
            gpus: dict[str, _Gpu] = {}
            for g in view.gpus:
                local = max(g.local_used, g.local_reserved)
                ext_leased = max(0, g.leased - ours_lent.get(g.uuid, 0))
                gpus[g.uuid] = _Gpu(
                    uuid=g.uuid,
                    index=g.index,
                    node=view.name,
                    total=g.total,
                    cap=max(0, g.total - g.headroom - ext_leased),
                    foreign=0 if g.uuid in ours_on else local,
                    peers=tuple(o.uuid for o in view.gpus if view.nvlinked(g.uuid, o.uuid)),
                )
                self.gpu_node[g.uuid] = view.name
            node = _Node(view=view, gpus=gpus)
            node.refresh()
            self.nodes[view.name] = node
        self.local = {g.uuid: max(g.local_used, g.local_reserved) for v in nodes for g in v.gpus}

    def occupy(self, node: _Node, uuid: str, key: ReplicaKey, memory: int, lending: bool) -> None:
        g = node.gpus[uuid]
        g.occupant, g.occ_mem, g.occ_lending = key, memory, lending

    def lend(self, node: _Node, lenders: Iterable[tuple[str, int]]) -> None:
        for uuid, nbytes in lenders:
            node.gpus[uuid].lent += nbytes


def _pick_lenders(
    node: _Node, host: _Gpu, need: int, is_tight: bool, exclude: Iterable[str] = ()
) -> tuple[tuple[str, int], ...] | None:
    """Lender GPUs (and bytes from each) for `need` bytes, NVLinked to `host`; None when short."""
    if need <= 0:
        return ()
    skip = set(exclude)
    cands = [g for g in (node.gpus[p] for p in host.peers) if g.uuid not in skip and g.lendable > 0]
    if not cands:
        return None
    # GPUs that already host a lending tenant lend first: an idle GPU stays whole for a replica.
    hosted = [g for g in cands if g.occupant is not None and g.lendable >= need]
    if is_tight:
        # The most headroom left after lending.
        pool = hosted or [g for g in cands if g.lendable >= need]
        if pool:
            best = max(pool, key=lambda g: (g.lendable, -g.index))
            return ((best.uuid, need),)
    else:
        fits = hosted or [g for g in cands if g.lendable >= need]
        if fits:
            # Best fit: the smallest spare that holds it, so large spares stay for tight tenants.
            best = min(fits, key=lambda g: (g.lendable, g.index))
            return ((best.uuid, need),)
    cands.sort(key=lambda g: (-g.lendable, g.index))
    out: list[tuple[str, int]] = []
    left = need
    for g in cands:
        take = min(left, g.lendable)
        out.append((g.uuid, take))
        left -= take
        if left == 0:
            return tuple(out)
    return None


def _option(
    node: _Node, t: TenantSpec, is_tight: bool, with_peer: bool
) -> tuple[float, _Gpu, tuple[tuple[str, int], ...]] | None:
    """Best (score, host GPU, lenders) on `node` for one replica of `t`; lower score is better."""
    best: tuple[float, _Gpu, tuple[tuple[str, int], ...]] | None = None
    start = bisect.bisect_left(node.rooms, (t.memory, -1))
    for room, index in node.rooms[start:]:
        host = next(g for g in node.gpus.values() if g.index == index)
        if not t.lending and host.lent > 0:
            continue  # a tenant that does not lend may not sit on a GPU that lends already
        if with_peer:
            lenders = _pick_lenders(node, host, t.peer_request, is_tight)
            if lenders is None:
                continue
            after = [node.gpus[u].lendable - b for u, b in lenders]
            if is_tight:
                score = -float(min(after)) + room * 1e-6
            else:
                score = float(sum(after)) + room * 1e-3
        else:
            lenders = ()
            score = float(room)
        if best is None or score < best[0]:
            best = (score, host, lenders)
        if not is_tight and with_peer and best is not None:
            break  # rooms are sorted: the first host that works is the best fit
    return best


def _node_order(state: _State, t: TenantSpec, mode: str) -> list[_Node]:
    """Candidate nodes for a replica, best first (cheap aggregates only)."""
    cands = [n for n in state.nodes.values() if n.fits(t.memory)]
    if mode == "peer":
        cands = [n for n in cands if n.total_lendable >= t.peer_request]
        if tight(t):
            cands.sort(key=lambda n: (-n.max_lendable, n.view.name))
        else:
            cands.sort(key=lambda n: (n.total_lendable, n.view.name))
        return cands
    if not cands:
        return []
    if mode == "lender":
        # Pair with borrowers: nodes with starved borrowers, then nodes with borrowers, then pack.
        best = min(cands, key=lambda n: (-n.starved, -n.borrowers, len(n.rooms), n.view.name))
    elif mode == "plain":
        # Neither lends nor borrows: keep away from borrowers' lenders, pack.
        best = min(cands, key=lambda n: (n.borrowers, len(n.rooms), n.view.name))
    else:  # fallback: borrower without peer memory, where it takes least lending capacity
        best = min(cands, key=lambda n: (n.total_lendable, n.view.name))
    return [best, *(n for n in cands if n is not best)]  # the rest only if the best cannot take it


def _place_one(state: _State, t: TenantSpec, key: ReplicaKey, mode: str) -> Assignment | None:
    is_tight = tight(t)
    best: tuple[float, _Node, _Gpu, tuple[tuple[str, int], ...]] | None = None
    found = 0
    for node in _node_order(state, t, mode):
        opt = _option(node, t, is_tight, with_peer=(mode == "peer"))
        if opt is None:
            continue
        if best is None or opt[0] < best[0]:
            best = (opt[0], node, opt[1], opt[2])
        found += 1
        if mode != "peer" or found >= _CANDIDATES:
            break
    if best is None:
        best = _repair(state, t, mode)
        if best is None:
            return None
    _, node, host, lenders = best
    _commit(state, node, host, t, key, lenders)
    return Assignment(key, node.view.name, host.uuid, lenders, host_fallback=(t.borrower and not lenders),
                      keeps=local_bytes(t.memory, t.lending, host.total))


def _repair(state: _State, t: TenantSpec, mode: str) -> tuple[float, _Node, _Gpu, tuple[tuple[str, int], ...]] | None:
    """No free GPU can take the replica, but one could if the memory it lends were lent by other
    GPUs of its node: move those loans (the borrowers keep their GPUs), then try again."""
    for node in state.nodes.values():
        for g in sorted(node.gpus.values(), key=lambda x: (x.lent, x.index)):
            if g.occupant is not None or g.lent == 0 or g.cap - g.foreign < t.memory:
                continue
            if _relocate_loans(state, node, g):
                opt = _option(node, t, tight(t), with_peer=(mode == "peer"))
                if opt is not None:
                    return (opt[0], node, opt[1], opt[2])
    return None


def _relocate_loans(state: _State, node: _Node, g: _Gpu) -> bool:
    """Move every loan GPU `g` makes to other lenders of the same node; False (nothing changed) if one cannot move."""
    borrowers = [
        a for a in state.assign.values() if a.node == node.view.name and any(u == g.uuid for u, _ in a.lenders)
    ]
    loans = [(a, sum(b for u, b in a.lenders if u == g.uuid)) for a in borrowers]
    if not loans or sum(b for _, b in loans) != g.lent or any(a.key in state.current for a, _ in loans):
        return False  # some of its loans are running, or belong to tenants this plan does not own
    g.lent = 0
    done: list[tuple[Assignment, tuple[tuple[str, int], ...]]] = []
    for a, nbytes in loans:
        extra = _pick_lenders(node, node.gpus[a.gpu_uuid], nbytes, state.tight.get(a.key.tenant_key, False), [g.uuid])
        if extra is None:
            for _, moved in done:  # undo
                for u, b in moved:
                    node.gpus[u].lent -= b
            g.lent = sum(b for _, b in loans)
            return False
        state.lend(node, extra)
        done.append((a, extra))
    for a, extra in done:
        merged: dict[str, int] = {}
        for u, b in [*((u, b) for u, b in a.lenders if u != g.uuid), *extra]:
            merged[u] = merged.get(u, 0) + b
        state.assign[a.key] = replace(a, lenders=tuple(merged.items()))
    node.refresh()
    return True


def _commit(
    state: _State,
    node: _Node,
    host: _Gpu,
    t: TenantSpec,
    key: ReplicaKey,
    lenders: tuple[tuple[str, int], ...],
    memory: int | None = None,
) -> None:
    state.occupy(node, host.uuid, key, t.memory if memory is None else memory, t.lending)
    state.lend(node, lenders)
    if t.borrower:
        node.borrowers += 1
        if not lenders:
            node.starved += 1
    node.refresh()


def _why_unplaced(state: _State, t: TenantSpec, need_peer: bool) -> str:
    if not state.nodes:
        return "no MemoryPool is published: is the Spillway agent running with --publish on the GPU nodes?"
    if not any(n.fits(t.memory) for n in state.nodes.values()):
        return (
            f"no node has a free GPU with room for model.memory {format_bytes(t.memory)}: "
            "add GPU nodes, lower replicas, or free GPUs"
        )
    if need_peer:
        return (
            f"no node has {format_bytes(t.peer_request)} of peer memory NVLink-connected to a free GPU and "
            "peerMemory.fallback is None: lower peerMemory.request, set fallback HostMemory, or add lender GPUs"
        )
    return (
        "the free GPUs with room already lend memory to other replicas and this tenant has lending: false; "
        "set lending: true or add GPUs"
    )


def _order(tenants: Sequence[TenantSpec]) -> list[TenantSpec]:
    return sorted(
        tenants,
        key=lambda t: (
            -t.priority,
            0 if t.borrower else 1,
            0 if tight(t) else 1,
            -t.peer_request,
            -t.memory,
            t.key,
        ),
    )


def _kept(
    state: _State,
    t: TenantSpec | None,
    a: Assignment,
    exact_only: bool = False,
) -> tuple[Assignment | None, str]:
    """Re-check a current assignment; returns the (possibly new-lender) assignment, or None + why."""
    node = state.nodes.get(a.node)
    if node is None:
        return None, f"node {a.node} has no MemoryPool any more"
    host = node.gpus.get(a.gpu_uuid)
    if host is None:
        return None, f"GPU {a.gpu_uuid} is gone from node {a.node}"
    if host.occupant is not None:
        return None, f"GPU {a.gpu_uuid} is taken by {host.occupant}"
    if t is None:
        # A tenant the caller did not pass: keep it as it is, counting what it holds: what its pod
        # says its GPU keeps (the agent's figure lags: the local reservation is set after the pod
        # is created and published seconds later), or the local use the agent shows, if more.
        state.occupy(node, host.uuid, a.key, max(a.keeps, state.local.get(host.uuid, 0)), True)
        state.lend(node, [(u, b) for u, b in a.lenders if u in node.gpus])
        node.refresh()
        return a, ""
    # What the GPU's local use shows belongs to this replica (it may use more than it declared).
    keeps = max(t.memory, state.local.get(host.uuid, 0))
    if host.room < keeps:
        return None, f"GPU {a.gpu_uuid} on {a.node} no longer has room for {format_bytes(keeps)}"
    # Same lenders if they still link and have room, else new lenders on this node.
    lenders: tuple[tuple[str, int], ...] | None = None
    if (
        t.borrower
        and a.peer_bytes == t.peer_request
        and all(
            u in node.gpus and node.view.nvlinked(host.uuid, u) and node.gpus[u].lendable >= b for u, b in a.lenders
        )
    ):
        lenders = a.lenders
    elif t.borrower and a.host_fallback and t.fallback == "HostMemory" and exact_only:
        lenders = ()  # stays on host memory for now; the upgrade pass may find it lenders
    elif exact_only:
        return None, "deferred"
    elif t.borrower:
        lenders = _pick_lenders(node, host, t.peer_request, tight(t))
    else:
        lenders = ()
    if lenders is None:
        if t.fallback == "None":
            return None, (f"its lenders on {a.node} no longer have {format_bytes(t.peer_request)} and fallback is None")
        lenders = ()
    _commit(state, node, host, t, a.key, lenders, memory=keeps)
    return Assignment(a.key, a.node, a.gpu_uuid, lenders, host_fallback=(t.borrower and not lenders),
                      keeps=local_bytes(t.memory, t.lending, host.total)), ""


def plan(
    nodes: Sequence[NodeView],
    tenants: Sequence[TenantSpec],
    current: Mapping[ReplicaKey, Assignment] | None = None,
) -> Plan:
    """Place every replica of `tenants` on `nodes`, keeping the valid `current` assignments.

    `current` may hold assignments of tenants not in `tenants`: they are kept as they are and
    count against the capacity (so a caller may plan one tenant at a time).
    """
    current = dict(current or {})
    state = _State(nodes, current)
    by_key = {t.key: t for t in tenants}
    out = state.assign
    state.tight = {t.key: tight(t) for t in tenants}
    pending: dict[ReplicaKey, str] = {}

    def cur_rank(item: tuple[ReplicaKey, Assignment]) -> tuple[int, int, ReplicaKey]:
        t = by_key.get(item[0].tenant_key)
        return (0 if t is None else 1, -(t.priority if t else 0), item[0])

    # Keep what is still valid as it is first, then re-pick lenders for those that lost theirs.
    moved: dict[ReplicaKey, str] = {}
    again: list[tuple[ReplicaKey, Assignment]] = []
    for key, old in sorted(current.items(), key=cur_rank):
        t = by_key.get(key.tenant_key)
        if t is not None and key.replica >= t.replicas:
            continue  # scaled down
        kept, why = _kept(state, t, old, exact_only=True)
        if kept is not None:
            if t is not None:
                out[key] = kept
        elif why == "deferred":
            again.append((key, old))
        else:
            moved[key] = why
    for key, old in again:
        kept, why = _kept(state, by_key.get(key.tenant_key), old)
        if kept is not None:
            out[key] = kept
        else:
            moved[key] = why

    todo = [
        (t, ReplicaKey(t.namespace, t.name, r))
        for t in _order(tenants)
        for r in range(t.replicas)
        if ReplicaKey(t.namespace, t.name, r) not in out
    ]
    # One priority level at a time: full placements first, host fallbacks last.
    i = 0
    while i < len(todo):
        level = todo[i][0].priority
        j = i
        while j < len(todo) and todo[j][0].priority == level:
            j += 1
        deferred: list[tuple[TenantSpec, ReplicaKey]] = []
        for t, key in todo[i:j]:
            if t.borrower:
                a = _place_one(state, t, key, "peer")
                if a is None:
                    deferred.append((t, key))
                    continue
            else:
                a = _place_one(state, t, key, "lender" if t.lending else "plain")
                if a is None:
                    pending[key] = _why_unplaced(state, t, False)
                    continue
            out[key] = a
        for t, key in deferred:
            if t.fallback == "None":
                pending[key] = _why_unplaced(state, t, True)
                continue
            late = _place_one(state, t, key, "fallback")
            if late is None:
                pending[key] = _why_unplaced(state, t, False)
            else:
                out[key] = late
        i = j

    # Upgrade: replicas on host fallback try again for lenders on their own node.
    for key, fb in sorted(out.items()):
        t = by_key[key.tenant_key]
        if fb.host_fallback and t.borrower:
            node = state.nodes[fb.node]
            lenders = _pick_lenders(node, node.gpus[fb.gpu_uuid], t.peer_request, tight(t))
            if lenders:
                state.lend(node, lenders)
                node.starved -= 1
                node.refresh()
                out[key] = replace(fb, lenders=lenders, host_fallback=False)
    for key, why in moved.items():
        if key in pending:
            pending[key] = f"{why}; {pending[key]}"
    return Plan(assignments=out, pending=pending)


def replan_lenders(
    nodes: Sequence[NodeView],
    tenant: TenantSpec,
    current: Mapping[ReplicaKey, Assignment],
    key: ReplicaKey,
    *,
    exclude: Iterable[str] = (),
    need: int | None = None,
) -> Assignment | None:
    """New lenders for a replica that lost peer memory (a revoked lease), on its own node.

    The replica keeps its GPU; lenders in `exclude` (the reclaiming GPU) are not used. `need`
    defaults to the tenant's request. Returns the new assignment (with `host_fallback` when no
    lender has room and the tenant allows it), or None when fallback is None and no lender has
    room (the caller then re-places the replica elsewhere or keeps it Pending).
    """
    a = current[key]
    others = {k: v for k, v in current.items() if k != key}
    state = _State(nodes, current)
    for _, v in sorted(others.items()):
        _kept(state, None, v)  # count everyone else as they are
    node = state.nodes.get(a.node)
    if node is None or a.gpu_uuid not in node.gpus:
        return None
    host = node.gpus[a.gpu_uuid]
    want = tenant.peer_request if need is None else need
    lenders = _pick_lenders(node, host, want, tight(tenant), exclude)
    if lenders is None:
        if tenant.fallback == "None":
            return None
        return replace(a, lenders=(), host_fallback=True)
    return replace(a, lenders=lenders, host_fallback=False)


def describe(a: Assignment, t: TenantSpec | None = None) -> str:
    """One line for events and logs."""
    text = f"{a.key} on {a.node} GPU {a.gpu_uuid}"
    if a.lenders:
        text += "; peer memory " + ", ".join(f"{format_bytes(b)} from {u}" for u, b in a.lenders)
    elif a.host_fallback:
        text += "; no peer memory, spills to host memory"
    if t is not None and (t.ttft_s or t.tbt_s):
        slo = []
        if t.ttft_s:
            slo.append(f"TTFT {format_duration(t.ttft_s)}")
        if t.tbt_s:
            slo.append(f"TBT {format_duration(t.tbt_s)}")
        text += " (" + ", ".join(slo) + (", tight" if tight(t) else "") + ")"
    return text

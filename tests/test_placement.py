"""Placement rules on hand-built cases, invariants with Hypothesis, and greedy vs the exact MILP."""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import replace

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from benchmarks.bench_placement import make_node, make_tenant, random_instance
from spillway.operator import milp
from spillway.operator.model import Assignment, GpuView, NodeView, Plan, ReplicaKey, TenantSpec
from spillway.operator.placement import objective, plan, replan_lenders

GI = 1 << 30
IMG = "spillway/toy-server:0.1.0"


def tenant(
    name: str,
    memory: int,
    *,
    replicas: int = 1,
    request: int = 0,
    lending: bool = True,
    fallback: str = "HostMemory",
    priority: int = 0,
    ttft: float | None = None,
) -> TenantSpec:
    return TenantSpec(
        namespace="ns",
        name=name,
        uid=name,
        replicas=replicas,
        memory=memory * GI,
        peer_request=request * GI,
        peer_limit=request * GI,
        fallback=fallback,  # type: ignore[arg-type]
        priority=priority,
        ttft_s=ttft,
        lending=lending,
        image=IMG,
    )


def key(name: str, r: int = 0) -> ReplicaKey:
    return ReplicaKey("ns", name, r)


def check_invariants(
    nodes: list[NodeView], tenants: list[TenantSpec], p: Plan, current: dict[ReplicaKey, Assignment] | None = None
) -> None:
    """No GPU hosts two replicas, no replica has two GPUs, no GPU gives more than it has,
    lenders are NVLinked on the same node, a non-lending occupant lends nothing."""
    by_t = {t.key: t for t in tenants}
    gpus = {g.uuid: (n, g) for n in nodes for g in n.gpus}
    hosts = Counter(a.gpu_uuid for a in p.assignments.values())
    assert all(c == 1 for c in hosts.values()), hosts
    assert not set(p.assignments) & set(p.pending)
    use: Counter[str] = Counter()
    ours = {a.gpu_uuid for a in (current or {}).values()}
    for k, a in p.assignments.items():
        t = by_t[k.tenant_key]
        assert k.replica < t.replicas
        node, g = gpus[a.gpu_uuid]
        assert node.name == a.node
        local = max(g.local_used, g.local_reserved)
        # On a GPU that ran one of our replicas, its local use is that replica's.
        use[a.gpu_uuid] += max(t.memory, local) if a.gpu_uuid in ours else t.memory
        for lender, nbytes in a.lenders:
            assert nbytes > 0
            assert node.nvlinked(a.gpu_uuid, lender), (a, lender)
            use[lender] += nbytes
        assert a.peer_bytes in (0, t.peer_request)
        assert a.host_fallback == (t.borrower and a.peer_bytes == 0)
        if a.host_fallback:
            assert t.fallback == "HostMemory"
    for uuid, used in use.items():
        _, g = gpus[uuid]
        foreign = 0 if uuid in ours else max(g.local_used, g.local_reserved)
        assert used <= g.total - g.headroom - g.leased - foreign, (uuid, used)
    for a in p.assignments.values():
        t = by_t[a.key.tenant_key]
        if not t.lending:
            lent = sum(b for x in p.assignments.values() for u, b in x.lenders if u == a.gpu_uuid)
            assert lent == 0
    for t in tenants:
        for r in range(t.replicas):
            assert (key(t.name, r) if t.namespace == "ns" else ReplicaKey(t.namespace, t.name, r)) in (
                set(p.assignments) | set(p.pending)
            )


# -- hand-built rules -----------------------------------------------------------------------


def test_borrower_gets_gpu_and_nvlinked_lender() -> None:
    nodes = [make_node("a", 2)]
    ts = [tenant("llm", 60, request=20)]
    p = plan(nodes, ts)
    a = p.assignments[key("llm")]
    assert a.peer_bytes == 20 * GI and not a.host_fallback
    assert a.lenders[0][0] != a.gpu_uuid
    check_invariants(nodes, ts, p)


def test_no_nvlink_means_no_lender() -> None:
    nodes = [make_node("p", 4, topology="pcie")]
    ts = [tenant("llm", 60, request=20), tenant("strict", 60, request=20, fallback="None")]
    p = plan(nodes, ts)
    assert p.assignments[key("llm")].host_fallback
    assert "fallback is None" in p.pending[key("strict")]
    assert "peerMemory.request" in p.pending[key("strict")]


def test_pairs_topology_lends_only_within_the_pair() -> None:
    nodes = [make_node("q", 4, topology="pairs")]
    ts = [tenant("llm", 60, replicas=2, request=20, lending=False)]
    p = plan(nodes, ts)
    check_invariants(nodes, ts, p)
    for a in p.assignments.values():
        assert not a.host_fallback
        me = int(a.gpu_uuid.rsplit("-", 1)[1])
        assert int(a.lenders[0][0].rsplit("-", 1)[1]) // 2 == me // 2


def test_lenders_pair_with_borrowers_on_the_same_node() -> None:
    # Two nodes; the borrowers' node is where lending tenants go.
    nodes = [make_node("a", 4), make_node("b", 4)]
    ts = [
        tenant("llm", 70, replicas=2, request=30, lending=False, priority=100),
        tenant("sdxl", 16, replicas=2, lending=True),
    ]
    p = plan(nodes, ts)
    check_invariants(nodes, ts, p)
    llm_nodes = {p.assignments[key("llm", r)].node for r in range(2)}
    sdxl_nodes = {p.assignments[key("sdxl", r)].node for r in range(2)}
    assert llm_nodes & sdxl_nodes


def test_lender_gpu_of_a_lending_tenant_is_used_before_an_idle_gpu() -> None:
    nodes = [make_node("a", 3)]
    ts = [tenant("sdxl", 16, lending=True, priority=100), tenant("llm", 60, request=20, lending=False)]
    p = plan(nodes, ts)
    sdxl = p.assignments[key("sdxl")]
    llm = p.assignments[key("llm")]
    assert llm.lenders == ((sdxl.gpu_uuid, 20 * GI),)


def test_non_lending_tenant_gpu_never_lends() -> None:
    nodes = [make_node("a", 2)]
    ts = [tenant("plain", 20, lending=False, priority=100), tenant("llm", 60, request=20)]
    p = plan(nodes, ts)
    # The only other GPU belongs to a tenant that does not lend.
    assert p.assignments[key("llm")].host_fallback
    check_invariants(nodes, ts, p)


def test_tight_gets_most_headroom_loose_is_packed() -> None:
    # One node, 4 GPUs: two lending tenants of different sizes leave 60Gi and 30Gi spare.
    nodes = [make_node("a", 4, headroom_gi=0)]
    ts = [
        tenant("big-spare", 20, lending=True, priority=200),
        tenant("small-spare", 50, lending=True, priority=200),
        tenant("tight", 40, request=10, ttft=0.3, lending=False, priority=100),
        tenant("loose", 40, request=10, ttft=30.0, lending=False, priority=100),
    ]
    p = plan(nodes, ts)
    check_invariants(nodes, ts, p)
    big = p.assignments[key("big-spare")].gpu_uuid
    small = p.assignments[key("small-spare")].gpu_uuid
    assert p.assignments[key("tight")].lenders == ((big, 10 * GI),)
    assert p.assignments[key("loose")].lenders == ((small, 10 * GI),)


def test_higher_priority_first_when_gpus_run_out() -> None:
    nodes = [make_node("a", 2)]
    ts = [tenant("low", 30, replicas=2, priority=-10), tenant("high", 30, replicas=2, priority=10)]
    p = plan(nodes, ts)
    assert {k.name for k in p.assignments} == {"high"}
    assert all("no node has a free GPU" in why for why in p.pending.values())


def test_memory_that_fits_no_gpu_is_pending_with_reason() -> None:
    nodes = [make_node("a", 2, total_gi=40)]
    p = plan(nodes, [tenant("huge", 60)])
    assert "model.memory 60Gi" in p.pending[key("huge")]


def test_no_pools_says_to_start_agents() -> None:
    p = plan([], [tenant("x", 10)])
    assert "--publish" in p.pending[key("x")]


def test_fallback_deferred_so_full_placements_win_the_gpus() -> None:
    # 2 GPUs, pcie: a borrower would only get host fallback; a lender gets its all -> lender first.
    nodes = [make_node("p", 1, topology="pcie")]
    ts = [tenant("llm", 40, request=10), tenant("sdxl", 10)]
    p = plan(nodes, ts)
    assert key("sdxl") in p.assignments and key("llm") in p.pending


def test_stable_keeps_current_assignments() -> None:
    nodes = [make_node("a", 8), make_node("b", 8)]
    ts = [tenant("llm", 60, replicas=2, request=20), tenant("sdxl", 16, replicas=3)]
    first = plan(nodes, ts)
    # Replan with the same inputs and the first plan as current: nothing moves.
    second = plan(nodes, ts, first.assignments)
    assert second.assignments == first.assignments
    # Add a tenant: the running replicas stay where they are.
    more = [*ts, tenant("whisper", 10, replicas=2)]
    third = plan(nodes, more, first.assignments)
    for k, a in first.assignments.items():
        assert third.assignments[k] == a
    check_invariants(nodes, more, third)


def test_current_replica_moves_only_when_its_node_is_gone() -> None:
    nodes = [make_node("a", 4), make_node("b", 4)]
    ts = [tenant("llm", 60, request=20)]
    first = plan(nodes, ts)
    node = first.assignments[key("llm")].node
    rest = [n for n in nodes if n.name != node]
    again = plan(rest, ts, first.assignments)
    assert again.assignments[key("llm")].node != node


def test_lost_lender_gets_a_new_lender_on_the_same_gpu() -> None:
    nodes = [make_node("a", 4)]
    ts = [tenant("llm", 60, request=20)]
    first = plan(nodes, ts)
    a = first.assignments[key("llm")]
    lender = a.lenders[0][0]
    # The lender GPU is now fully used locally (its own tenant needs it).
    shrunk = [
        replace(
            nodes[0],
            gpus=tuple(replace(g, local_used=g.total - g.headroom) if g.uuid == lender else g for g in nodes[0].gpus),
        )
    ]
    again = plan(shrunk, ts, first.assignments)
    b = again.assignments[key("llm")]
    assert b.gpu_uuid == a.gpu_uuid and b.peer_bytes == 20 * GI and lender not in dict(b.lenders)


def test_scale_down_drops_extra_replicas() -> None:
    nodes = [make_node("a", 4)]
    ts = [tenant("x", 10, replicas=3)]
    first = plan(nodes, ts)
    smaller = [replace(ts[0], replicas=1)]
    p = plan(nodes, smaller, first.assignments)
    assert set(p.assignments) == {key("x", 0)}
    assert p.assignments[key("x", 0)] == first.assignments[key("x", 0)]


def test_one_tenant_at_a_time_counts_the_others() -> None:
    """The operator plans one tenant with everyone's current assignments."""
    nodes = [make_node("a", 2)]
    p1 = plan(nodes, [tenant("first", 30)])
    p2 = plan(nodes, [tenant("second", 30)], p1.assignments)
    p3 = plan(nodes, [tenant("third", 30)], {**p1.assignments, **p2.assignments})
    assert p1.assignments[key("first")].gpu_uuid != p2.assignments[key("second")].gpu_uuid
    assert key("third") in p3.pending
    # Others' assignments are counted, not returned.
    assert set(p2.assignments) == {key("second")}


def test_pool_leases_that_are_not_ours_are_respected() -> None:
    node = make_node("a", 2)
    # GPU 1 has 70Gi leased to someone else: only 6Gi spare.
    node = replace(node, gpus=(node.gpus[0], replace(node.gpus[1], leased=70 * GI, lendable=6 * GI)))
    p = plan([node], [tenant("llm", 60, request=20)])
    a = p.assignments[key("llm")]
    assert a.host_fallback


def test_replan_lenders_after_revocation() -> None:
    nodes = [make_node("a", 4)]
    ts = [tenant("llm", 60, request=20)]
    first = plan(nodes, ts)
    a = first.assignments[key("llm")]
    revoked = a.lenders[0][0]
    b = replan_lenders(nodes, ts[0], first.assignments, key("llm"), exclude=[revoked])
    assert b is not None and b.gpu_uuid == a.gpu_uuid and revoked not in dict(b.lenders)
    assert b.peer_bytes == 20 * GI
    # Nowhere else to go: HostMemory falls back, None gives None.
    two = [make_node("b", 2)]
    p = plan(two, ts)
    only = p.assignments[key("llm")].lenders[0][0]
    fb = replan_lenders(two, ts[0], p.assignments, key("llm"), exclude=[only])
    assert fb is not None and fb.host_fallback and fb.lenders == ()
    strict = replace(ts[0], fallback="None")
    assert replan_lenders(two, strict, p.assignments, key("llm"), exclude=[only]) is None


def test_objective_counts_priority_and_peer_memory() -> None:
    ts = [tenant("a", 10, request=5), tenant("b", 10, priority=100)]
    full = Plan(
        {key("a"): Assignment(key("a"), "n", "g0", (("g1", 5 * GI),)), key("b"): Assignment(key("b"), "n", "g1")}
    )
    fallback = Plan({key("a"): Assignment(key("a"), "n", "g0", (), True), key("b"): Assignment(key("b"), "n", "g1")})
    assert objective(full, ts) == 2 + 4
    assert objective(fallback, ts) == 1 + 4


# -- invariants (Hypothesis) ----------------------------------------------------------------


@st.composite
def instances(draw: st.DrawFn) -> tuple[list[NodeView], list[TenantSpec], dict[ReplicaKey, Assignment]]:
    seed = draw(st.integers(0, 2**32 - 1))
    rng = random.Random(seed)
    nodes, tenants = random_instance(rng, max_nodes=4, max_tenants=20)
    # Some GPUs already busy with things we do not manage.
    busy = draw(st.lists(st.tuples(st.integers(0, 100), st.integers(0, 80)), max_size=4))
    gpus = [(i, j) for i, n in enumerate(nodes) for j in range(len(n.gpus))]
    for pick, used in busy:
        i, j = gpus[pick % len(gpus)]
        n = nodes[i]
        g = n.gpus[j]
        nodes[i] = replace(
            n, gpus=tuple(replace(x, local_used=min(used * GI, x.total - x.headroom)) if x is g else x for x in n.gpus)
        )
    current: dict[ReplicaKey, Assignment] = {}
    if draw(st.booleans()):
        current = dict(plan(nodes, tenants[: len(tenants) // 2]).assignments)
    return nodes, tenants, current


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(instances())
def test_plans_never_overcommit(inst: tuple[list[NodeView], list[TenantSpec], dict[ReplicaKey, Assignment]]) -> None:
    nodes, tenants, current = inst
    p = plan(nodes, tenants, current)
    check_invariants(nodes, tenants, p, current)
    # Re-planning from the plan moves nothing (stability). With GPUs busy before we came, local
    # use is read as our replicas' on re-plan, which may only free room (more placements).
    again = plan(nodes, tenants, p.assignments)
    for k, a in p.assignments.items():
        b = again.assignments[k]
        assert (b.node, b.gpu_uuid) == (a.node, a.gpu_uuid)
        assert b.lenders == a.lenders or a.host_fallback
    if not any(g.local_used for n in nodes for g in n.gpus):
        assert again.assignments == p.assignments


# -- greedy vs MILP ---------------------------------------------------------------------------


@pytest.mark.slow
def test_greedy_close_to_milp_on_small_instances() -> None:
    rng = random.Random(7)
    ratios = []
    for _ in range(12):
        nodes, tenants = random_instance(rng, max_nodes=3, max_tenants=16)
        greedy = plan(nodes, tenants)
        check_invariants(nodes, tenants, greedy)
        exact = milp.solve(nodes, tenants, time_limit_s=5.0)
        check_invariants(nodes, tenants, exact.plan)
        g = objective(greedy, tenants)
        # The MILP is an upper bound on every plan (when proven optimal).
        if exact.optimal:
            assert g <= exact.objective + 1e-9
        ratios.append(g / max(exact.objective, g))
    assert min(ratios) >= 0.85, ratios
    assert sum(ratios) / len(ratios) >= 0.95, ratios


def test_milp_beats_a_bad_greedy_choice() -> None:
    """The MILP sees what a myopic order misses (and proves it)."""
    nodes = [make_node("a", 2, headroom_gi=0)]
    ts = [tenant("lender", 10, lending=True), tenant("llm", 60, request=60, lending=False)]
    exact = milp.solve(nodes, ts, time_limit_s=5.0)
    assert exact.optimal
    assert exact.objective == objective(plan(nodes, ts), ts) == 4.0
    assert exact.plan.assignments[key("llm")].lenders == ((exact.plan.assignments[key("lender")].gpu_uuid, 60 * GI),)


def test_speed_1000_tenants_on_250_nodes() -> None:
    import time

    rng = random.Random(3)
    nodes = [make_node(f"n{i}") for i in range(250)]
    tenants = [make_tenant(f"t{i}", rng) for i in range(1000)]
    t0 = time.perf_counter()
    p = plan(nodes, tenants)
    took = time.perf_counter() - t0
    assert len(p.assignments) + len(p.pending) == sum(t.replicas for t in tenants)
    assert took < 3.0, took  # the goal is < 1 s (benchmark); generous here for a loaded machine


def test_invalid_gpu_view_is_not_planned_on() -> None:
    gpu = GpuView("GPU-z", 0, "x", 10 * GI, 0, 0, 0, 0, 10 * GI)
    node = NodeView("z", "", True, (gpu,))
    p = plan([node], [tenant("big", 20)])
    assert key("big") in p.pending


def test_repair_moves_fresh_loans_so_a_non_lending_tenant_fits() -> None:
    # 4 GPUs, all NVLinked. The borrower's loan sits on an idle GPU; two big lenders fill two GPUs;
    # the last tenant does not lend, and the only free GPU lends: its loan moves to the lenders.
    nodes = [make_node("a", 4, headroom_gi=0)]
    ts = [
        tenant("llm", 40, request=30, lending=False, priority=100),
        tenant("sdxl", 55, replicas=2, lending=True, priority=50),
        tenant("plain", 40, lending=False, priority=0),
    ]
    p = plan(nodes, ts)
    check_invariants(nodes, ts, p)
    assert not p.pending
    llm = p.assignments[key("llm")]
    sdxl = {p.assignments[key("sdxl", r)].gpu_uuid for r in range(2)}
    assert {u for u, _ in llm.lenders} <= sdxl and llm.peer_bytes == 30 * GI
    # Running loans are never moved by a repair: with llm running, plain stays pending.
    first = plan(nodes, ts[:1])
    later = plan(nodes, ts, first.assignments)
    assert later.assignments[key("llm")] == first.assignments[key("llm")]
    assert key("plain") in later.pending


def test_a_model_placed_by_an_earlier_plan_counts_before_the_agent_shows_it() -> None:
    """The operator plans one tenant at a time. A replica placed a moment ago keeps its model's
    memory on its GPU, but the agent's published pool does not show that yet (the local reservation
    is set after the pod is created). Its assignment carries what it keeps, so a later plan does
    not lend that memory away (the agent would reclaim those leases once the reservation lands)."""
    nodes = [make_node("a", 2)]  # both GPUs NVLinked, 80Gi each, 2Gi headroom, nothing in use yet
    first = tenant("llm", 60, request=8)
    p1 = plan(nodes, [first])
    a = p1.assignments[key("llm")]
    assert a.keeps == 60 * GI
    hungry = tenant("rag", 10, request=30)  # needs 30Gi from the GPU that hosts the 60Gi model
    p2 = plan(nodes, [hungry], current=dict(p1.assignments))
    b = p2.assignments[key("rag")]
    assert b.gpu_uuid != a.gpu_uuid
    from_first = sum(n for u, n in b.lenders if u == a.gpu_uuid)
    assert 60 * GI + from_first <= (80 - 2) * GI, b  # the model and the loans fit under the headroom
    assert b.host_fallback and not b.lenders  # 18Gi left there: not enough, so it spills to host memory


def test_a_tenant_that_does_not_lend_keeps_its_whole_gpu_in_later_plans() -> None:
    nodes = [make_node("a", 2)]
    p1 = plan(nodes, [tenant("private", 20, lending=False)])
    a = p1.assignments[key("private")]
    assert a.keeps == 80 * GI
    p2 = plan(nodes, [tenant("llm", 10, request=8)], current=dict(p1.assignments))
    b = p2.assignments[key("llm")]
    assert all(u != a.gpu_uuid for u, _ in b.lenders) and b.host_fallback

"""No input crashes the agent: random and adversarial requests from outside, over both real
sockets (admin and borrower), and raw bytes to every method, get a proper status code (never
INTERNAL or UNKNOWN); every refused call leaves the pool exactly as it was; the accounting
identity holds throughout. The outcomes are tallied (printed with -s; docs/BENCHMARKS.md)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from spillway.api.v1 import agent_pb2 as pb
from spillway.api.v1 import agent_pb2_grpc as pb_grpc
from spillway.testing.agentproc import AgentProcess

ALLOWED = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND,
           grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.RESOURCE_EXHAUSTED,
           grpc.StatusCode.FAILED_PRECONDITION}
METHODS = ("GetInventory", "Acquire", "Renew", "Release", "Claim", "ListLeases", "Reclaim", "SetGpuLocal")

# Adversarial strings: huge digit runs (the quadratic parse), long ids, control characters,
# non-ASCII, digits that are not ASCII (isdigit() is true for a superscript one that int()
# rejects: a page_token of one was INTERNAL), quantities at the edges.
unicode_digits = st.sampled_from(["\u00b9", "\u0663", "\uff11\uff12", "1\u00b2", "\u0661Gi", "\u2155"])
huge = st.sampled_from([700_000, 100_000, 4_301, 257, 129, 65]).map(lambda n: "9" * n)
sizes = st.one_of(st.text(max_size=30), st.integers(-(10**20), 10**25).map(str), huge, unicode_digits,
                  st.sampled_from(["1Gi", "64Mi", "0", "-1", "1.5Gi", "9999999Ei", " 2Gi ", ".5Mi", "1e9", "Gi",
                                   "1" + "0" * 63, "0." + "0" * 62 + "1", "NaN", "Infinity", "\x00", "1Gi\n"]))
texts = st.one_of(st.text(max_size=60), st.text(max_size=3000), huge, unicode_digits,
                  st.sampled_from(["", " ", "\x00" * 10, "é" * 200, "l-" + "0" * 16, "GPU-", "a" * 65, "k" * 257]))
ints32 = st.integers(-(2**31), 2**31 - 1)
ints64 = st.integers(-(2**63), 2**63 - 1)


class Stubs:
    def __init__(self, agent: AgentProcess) -> None:
        self.admin_ch = grpc.insecure_channel(f"unix:{agent.socket}")
        self.borrower_ch = grpc.insecure_channel(f"unix:{agent.borrower_socket}")
        self.admin = pb_grpc.AgentStub(self.admin_ch)
        self.borrower = pb_grpc.AgentStub(self.borrower_ch)
        self.tally: Counter[tuple[str, str]] = Counter()

    def close(self) -> None:
        self.admin_ch.close()
        self.borrower_ch.close()


@pytest.fixture(scope="module")
def stubs() -> Iterator[Stubs]:
    with AgentProcess(node_name="fuzz") as agent:
        s = Stubs(agent)
        try:
            yield s
        finally:
            total = sum(s.tally.values())
            print(f"\nfuzz: {total} calls; outcomes: " + ", ".join(
                f"{m} {c}: {n}" for (m, c), n in sorted(s.tally.items())))
            s.close()
            logs = agent.logs()
            assert "Traceback" not in logs and "Exception deserializing" not in logs, logs[-3000:]


def state(s: Stubs) -> tuple[Any, ...]:
    """The pool as the admin sees it: each GPU's accounting and every lease (ended ones too)."""
    inv = s.admin.GetInventory(pb.GetInventoryRequest(), timeout=30)
    gpus = tuple((g.uuid, g.leased_bytes, g.lendable_bytes, g.headroom_bytes, g.local_reserved_bytes,
                  g.local_used_bytes) for g in inv.gpus)
    for g in inv.gpus:
        local = min(max(g.local_reserved_bytes, g.local_used_bytes), g.total_bytes - g.leased_bytes)
        assert g.leased_bytes + g.lendable_bytes + g.headroom_bytes + local == g.total_bytes
    leases, token = [], ""
    while True:
        page = s.admin.ListLeases(pb.ListLeasesRequest(include_ended=True, page_token=token), timeout=30)
        leases += [x.SerializeToString(deterministic=True) for x in page.leases]
        token = page.next_page_token
        if not token:
            return gpus, tuple(leases)


def call(s: Stubs, name: str, fn: Callable[..., Any], req: Any) -> tuple[grpc.StatusCode, Any]:
    """Make one call; a refused one must leave the pool as it was. A lease it grants is
    released at once (so nothing expires on its own between two checks)."""
    before = state(s)
    try:
        resp = fn(req, timeout=30)
        code = grpc.StatusCode.OK
    except grpc.RpcError as exc:
        resp, code = None, exc.code()
    s.tally[(name, code.name)] += 1
    assert code in ALLOWED, (name, code, req if len(str(req)) < 500 else str(req)[:500])
    if code != grpc.StatusCode.OK:
        assert state(s) == before, (name, code)
    elif isinstance(resp, pb.AcquireResponse):
        s.admin.Release(pb.ReleaseRequest(lease_id=resp.lease.id, token=resp.token), timeout=30)
    return code, resp


def requests(size: str, holder: str, kind: int, gpu: str, near: str, ttl: int, prio: int, key: str, lease_id: str,
             token: str, flag: bool) -> list[tuple[str, Any]]:
    return [
        ("Acquire", pb.AcquireRequest(size=size, holder=holder, kind=kind,  # type: ignore[arg-type]
                                      gpu_uuid=gpu, near_gpu_uuid=near,
                                      ttl_ms=ttl, priority=prio, idempotency_key=key, pod=holder)),
        ("Renew", pb.RenewRequest(lease_id=lease_id, token=token, ttl_ms=ttl)),
        ("Release", pb.ReleaseRequest(lease_id=lease_id, token=token)),
        ("Claim", pb.ClaimRequest(lease_id=lease_id, token=token, holder=holder, pod=key)),
        ("ListLeases", pb.ListLeasesRequest(holder=holder, include_ended=flag, gpu_uuid=gpu, page_token=key,
                                            page_size=abs(prio) % 2000)),
        ("Reclaim", pb.ReclaimRequest(gpu_uuid=gpu, size=size, reason=holder, deadline_ms=ttl)),
        ("SetGpuLocal", pb.SetGpuLocalRequest(gpu_uuid=gpu, reserved=size) if flag
         else pb.SetGpuLocalRequest(gpu_uuid=gpu, simulated_used=size)),
    ]


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(size=sizes, holder=texts, kind=st.integers(-3, 5), gpu=texts, near=texts, ttl=ints64, prio=ints32, key=texts,
       lease_id=texts, token=texts, flag=st.booleans(), borrower=st.booleans())
def test_random_requests_get_proper_codes(stubs: Stubs, size: str, holder: str, kind: int, gpu: str, near: str,
                                          ttl: int, prio: int, key: str, lease_id: str, token: str, flag: bool,
                                          borrower: bool) -> None:
    stub = stubs.borrower if borrower else stubs.admin
    for name, req in requests(size, holder, kind, gpu, near, ttl, prio, key, lease_id, token, flag):
        code, _ = call(stubs, name, getattr(stub, name), req)
        if borrower and name in ("ListLeases", "Reclaim", "SetGpuLocal"):
            # refused for the role (or, over 1 MiB, by gRPC's message limit before any handler)
            assert code in (grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.RESOURCE_EXHAUSTED)


def test_random_requests_on_the_agents_own_gpus(stubs: Stubs) -> None:
    """The same calls aimed at the agent's own (simulated) GPU UUIDs and leases, so they get past the
    NOT_FOUND checks."""
    inv = stubs.admin.GetInventory(pb.GetInventoryRequest(), timeout=30)
    gpus = [g.uuid for g in inv.gpus]

    @settings(max_examples=120, deadline=None)
    @given(size=sizes, gpu=st.sampled_from(gpus), ttl=ints64, prio=ints32, kind=st.integers(-1, 3),
           bad_token=st.booleans(), flag=st.booleans(), borrower=st.booleans())
    def run(size: str, gpu: str, ttl: int, prio: int, kind: int, bad_token: bool, flag: bool, borrower: bool) -> None:
        stub = stubs.borrower if borrower else stubs.admin
        try:
            got = stub.Acquire(pb.AcquireRequest(size=size, holder="f", kind=kind,  # type: ignore[arg-type]
                                                 gpu_uuid=gpu,
                                                 ttl_ms=600_000, priority=prio), timeout=30)
        except grpc.RpcError as exc:
            assert exc.code() in ALLOWED
            got = None
        if got is not None:
            token = "x" if bad_token else got.token
            # valid TTLs long enough that the lease cannot expire between two checks
            rttl = ttl if ttl < 0 or ttl > 600_000 else 600_000
            call(stubs, "Renew", stub.Renew, pb.RenewRequest(lease_id=got.lease.id, token=token, ttl_ms=rttl))
            call(stubs, "Claim", stub.Claim, pb.ClaimRequest(lease_id=got.lease.id, token=token))
            call(stubs, "Release", stub.Release, pb.ReleaseRequest(lease_id=got.lease.id, token=got.token))
        call(stubs, "Reclaim", stub.Reclaim, pb.ReclaimRequest(gpu_uuid=gpu, size=size, deadline_ms=ttl))
        call(stubs, "SetGpuLocal", stub.SetGpuLocal, pb.SetGpuLocalRequest(gpu_uuid=gpu, reserved=size) if flag
             else pb.SetGpuLocalRequest(gpu_uuid=gpu, simulated_used=size))

    run()


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(raw=st.one_of(st.binary(max_size=2000), st.sampled_from([b"\xff" * 8, b"\x0a\xff\xff\xff\xff\x0f",
                                                                 b"\x12\x05\xc3\x28abc", bytes(range(256))])),
       method=st.sampled_from(METHODS), borrower=st.booleans())
def test_raw_bytes_on_every_method_and_socket(stubs: Stubs, raw: bytes, method: str, borrower: bool) -> None:
    ch = stubs.borrower_ch if borrower else stubs.admin_ch
    fn = ch.unary_unary(f"/spillway.v1.Agent/{method}")
    call(stubs, f"raw {method}", fn, raw)
    stream = ch.unary_stream("/spillway.v1.Agent/Watch")
    try:
        it = stream(raw, timeout=5)
        next(it)
        it.cancel()
        wcode = grpc.StatusCode.OK
    except grpc.RpcError as exc:
        wcode = exc.code()
    stubs.tally[("raw Watch", wcode.name)] += 1
    assert wcode in ALLOWED, wcode

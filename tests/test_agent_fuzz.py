"""No input crashes the agent: random requests over a real socket get a proper status code
(never INTERNAL or UNKNOWN), and the agent keeps answering with its accounting intact."""

from __future__ import annotations

from collections.abc import Iterator

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

sizes = st.one_of(st.text(max_size=30), st.integers(-(10**20), 10**25).map(str),
                  st.sampled_from(["1Gi", "64Mi", "0", "-1", "1.5Gi", "9999999Ei", " 2Gi ", ".5Mi", "1e9", "Gi"]))
texts = st.text(max_size=60)
ints32 = st.integers(-(2**31), 2**31 - 1)
ints64 = st.integers(-(2**63), 2**63 - 1)


@pytest.fixture(scope="module")
def stub() -> Iterator[pb_grpc.AgentStub]:
    with AgentProcess(node_name="fuzz") as agent, grpc.insecure_channel(f"unix:{agent.socket}") as ch:
        yield pb_grpc.AgentStub(ch)


def call(fn: object, req: object) -> grpc.StatusCode:
    try:
        fn(req, timeout=30)  # type: ignore[operator]
        return grpc.StatusCode.OK
    except grpc.RpcError as exc:
        return exc.code()  # type: ignore[no-any-return]


def accounting_ok(stub: pb_grpc.AgentStub) -> None:
    inv = stub.GetInventory(pb.GetInventoryRequest(), timeout=30)
    for g in inv.gpus:
        local = min(max(g.local_reserved_bytes, g.local_used_bytes), g.total_bytes - g.leased_bytes)
        assert g.leased_bytes + g.lendable_bytes + g.headroom_bytes + local == g.total_bytes


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(size=sizes, holder=texts, kind=st.integers(-3, 5), gpu=texts, near=texts, ttl=ints64, prio=ints32, key=texts,
       lease_id=texts, token=texts, flag=st.booleans())
def test_random_requests_get_proper_codes(stub: pb_grpc.AgentStub, size: str, holder: str, kind: int, gpu: str,
                                          near: str, ttl: int, prio: int, key: str, lease_id: str, token: str,
                                          flag: bool) -> None:
    codes = [
        call(stub.Acquire, pb.AcquireRequest(size=size, holder=holder, kind=kind, gpu_uuid=gpu, near_gpu_uuid=near,
                                             ttl_ms=ttl, priority=prio, idempotency_key=key, pod=holder)),
        call(stub.Renew, pb.RenewRequest(lease_id=lease_id, token=token, ttl_ms=ttl)),
        call(stub.Release, pb.ReleaseRequest(lease_id=lease_id, token=token)),
        call(stub.Claim, pb.ClaimRequest(lease_id=lease_id, token=token, holder=holder, pod=key)),
        call(stub.ListLeases, pb.ListLeasesRequest(holder=holder, include_ended=flag, gpu_uuid=gpu)),
        call(stub.Reclaim, pb.ReclaimRequest(gpu_uuid=gpu, size=size, reason=holder, deadline_ms=ttl)),
        call(stub.SetGpuLocal, pb.SetGpuLocalRequest(gpu_uuid=gpu, reserved=size) if flag
             else pb.SetGpuLocalRequest(gpu_uuid=gpu, simulated_used=size)),
    ]
    assert set(codes) <= ALLOWED, codes
    accounting_ok(stub)


def test_random_requests_on_the_agents_own_gpus(stub: pb_grpc.AgentStub) -> None:
    """The same calls aimed at the agent's own (simulated) GPU UUIDs and leases, so they get past the
    NOT_FOUND checks."""
    inv = stub.GetInventory(pb.GetInventoryRequest(), timeout=30)
    gpus = [g.uuid for g in inv.gpus]

    @settings(max_examples=150, deadline=None)
    @given(size=sizes, gpu=st.sampled_from(gpus), ttl=ints64, prio=ints32, kind=st.integers(-1, 3),
           bad_token=st.booleans(), flag=st.booleans())
    def run(size: str, gpu: str, ttl: int, prio: int, kind: int, bad_token: bool, flag: bool) -> None:
        codes = []
        try:
            got = stub.Acquire(pb.AcquireRequest(size=size, holder="f", kind=kind, gpu_uuid=gpu, ttl_ms=ttl,
                                                 priority=prio), timeout=30)
            token = "x" if bad_token else got.token
            codes.append(call(stub.Renew, pb.RenewRequest(lease_id=got.lease.id, token=token, ttl_ms=ttl)))
            codes.append(call(stub.Claim, pb.ClaimRequest(lease_id=got.lease.id, token=token)))
            codes.append(call(stub.Release, pb.ReleaseRequest(lease_id=got.lease.id, token=got.token)))
        except grpc.RpcError as exc:
            codes.append(exc.code())
        codes.append(call(stub.Reclaim, pb.ReclaimRequest(gpu_uuid=gpu, size=size, deadline_ms=ttl)))
        codes.append(call(stub.SetGpuLocal, pb.SetGpuLocalRequest(gpu_uuid=gpu, reserved=size) if flag
                          else pb.SetGpuLocalRequest(gpu_uuid=gpu, simulated_used=size)))
        assert set(codes) <= ALLOWED, codes
        accounting_ok(stub)

    run()

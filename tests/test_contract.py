"""The contract between Spillway's processes (`spillway.contract`) holds its literal wire values:
changing one changes what running agents, device plugins, operators and borrower pods of other
versions read, so it must fail here on purpose. It also has one home: no other module under
spillway/ spells one of these values again, and the CRDs and the chart agree with it."""

from __future__ import annotations

import ast
from pathlib import Path

import yaml

from spillway import contract as c

ROOT = Path(__file__).resolve().parents[1]

WIRE = {
    "GROUP": "spillway.dev",
    "VERSION": "v1alpha1",
    "GROUP_VERSION": "spillway.dev/v1alpha1",
    "TENANT_KIND": "InferenceTenant",
    "TENANT_PLURAL": "inferencetenants",
    "POOL_KIND": "MemoryPool",
    "POOL_PLURAL": "memorypools",
    "PEER_HBM_RESOURCE": "spillway.dev/peer-hbm",
    "PEER_HBM_UNIT": 1 << 30,
    "GPU_RESOURCE": "nvidia.com/gpu",
    "LABEL_TENANT": "spillway.dev/tenant",
    "LABEL_REPLICA": "spillway.dev/replica",
    "LABEL_MANAGED_BY": "app.kubernetes.io/managed-by",
    "MANAGED_BY": "spillway-operator",
    "ANN_RESERVATION": "spillway.dev/reservation",
    "ANN_TOKEN": "spillway.dev/reservation-token",
    "ANN_NODE": "spillway.dev/reservation-node",
    "ANN_LENDERS": "spillway.dev/lender-gpus",
    "ANN_PEER_BYTES": "spillway.dev/lender-bytes",
    "ANN_GPU": "spillway.dev/gpu",
    "ANN_FALLBACK": "spillway.dev/fallback",
    "FALLBACK_HOST_MEMORY": "HostMemory",
    "ANN_TENANT_UID": "spillway.dev/tenant-uid",
    "ANN_LOCAL": "spillway.dev/local-reserved",
    "ANN_ELASTIC": "spillway.dev/elastic-leases",
    "ANN_ALLOCATION": "spillway.dev/allocation",
    "ANN_POOL_LOCAL": "spillway.dev/operator-local-reserved",
    "LIST_SEPARATOR": ",",
    "HOLDER_PREFIX": "tenant:",
    "ENV_LEASE_ID": "SPILLWAY_LEASE_ID",
    "ENV_LEASE_TOKEN": "SPILLWAY_LEASE_TOKEN",
    "ENV_AGENT_SOCKET": "SPILLWAY_AGENT_SOCKET",
    "ENV_LENDER_GPUS": "SPILLWAY_LENDER_GPUS",
    "DEFAULT_AGENT_SOCKET": "/run/spillway/agent.sock",
    "TRAILER_LARGEST_GRANTABLE": "spillway-largest-grantable-bytes",
    "TIME_FORMAT": "%Y-%m-%dT%H:%M:%SZ",
    "ALLOCATION_DRA": "dra",
    "ALLOCATION_DEVICEPLUGIN": "deviceplugin",
    "ALLOCATION_AUTO": "auto",
    "POD_CLAIM_REF": "peer-memory",
}


def test_the_wire_values_are_as_released() -> None:
    names = {k for k, v in vars(c).items() if k.isupper() and isinstance(v, str | int)}
    assert names == set(WIRE), "a contract name was added or removed: add its wire value to WIRE"
    for name, value in WIRE.items():
        assert getattr(c, name) == value, name


def test_encodings() -> None:
    assert c.join_list(["l-1", "l-2"]) == "l-1,l-2" and c.join_list([]) == ""
    assert c.split_list("l-1,,l-3") == ["l-1", "", "l-3"] and c.split_list("") == [] and c.split_list(None) == []
    assert c.holder_name("ns", "llm", 3) == "tenant:ns/llm/3"
    assert c.parse_holder("tenant:ns/llm/3") == ("ns", "llm", 3)
    for bad in ("tenant:ns/llm", "tenant:ns/llm/x", "tenant:/llm/0", "device-plugin:ns/p", "tenant:a/b/1/2"):
        assert c.parse_holder(bad) is None, bad
    assert c.format_time(0) == "1970-01-01T00:00:00Z"
    assert c.format_time(1_700_000_000.9) == "2023-11-14T22:13:20Z"


def _string_literals(path: Path) -> set[str]:
    """Every string constant in a module that is not a docstring."""
    tree = ast.parse(path.read_text(), str(path))
    docstrings = {id(n.value) for n in ast.walk(tree) if isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant)}
    return {n.value for n in ast.walk(tree)
            if isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in docstrings}


def test_no_other_module_spells_a_contract_value() -> None:
    # Values that are also plain words elsewhere (the spec's fallback enum, kopf's reporting
    # component, nvidia's resource in the simulated clusters, the allocation modes that are also
    # subcommands) are left out.
    shared = {v for k, v in WIRE.items() if isinstance(v, str) and k not in (
        "FALLBACK_HOST_MEMORY", "LIST_SEPARATOR", "GPU_RESOURCE", "MANAGED_BY", "LABEL_MANAGED_BY",
        "ALLOCATION_DRA", "ALLOCATION_DEVICEPLUGIN", "ALLOCATION_AUTO")}
    found = []
    for path in sorted((ROOT / "spillway").rglob("*.py")):
        rel = path.relative_to(ROOT)
        if rel.parts[1] in ("api", "testing") or path.name == "contract.py":
            continue
        found += [f"{rel}: {v!r}" for v in sorted(_string_literals(path) & shared)]
    assert found == [], "import these from spillway.contract instead"


def test_the_crds_and_the_chart_agree() -> None:
    for kind, plural in ((c.TENANT_KIND, c.TENANT_PLURAL), (c.POOL_KIND, c.POOL_PLURAL)):
        for base in (ROOT / "crds", ROOT / "charts" / "spillway" / "crds"):
            doc = yaml.safe_load((base / f"{kind.lower()}.yaml").read_text())
            assert doc["metadata"]["name"] == f"{plural}.{c.GROUP}"
            assert doc["spec"]["group"] == c.GROUP
            assert (doc["spec"]["names"]["kind"], doc["spec"]["names"]["plural"]) == (kind, plural)
            assert c.VERSION in [v["name"] for v in doc["spec"]["versions"]]
    daemonset = (ROOT / "charts" / "spillway" / "templates" / "daemonset.yaml").read_text()
    assert f"/{Path(c.DEFAULT_AGENT_SOCKET).name}" in daemonset

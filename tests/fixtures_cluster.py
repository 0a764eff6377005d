"""Pytest wiring for the local control plane (spillway.testing.cluster).

Fixtures:
- `cluster` (session): a running Cluster; the binaries are built first if not cached.
- `k8s_namespace` (function): a fresh namespace, ready for pods, deleted afterwards.
- `kwok_nodes` (function): `kwok_nodes(capacity, labels=None, allocatable=None, prefix="node")`
  adds a uniquely named fake node and returns its name; the nodes go away after the test.

A failing test that used the cluster gets the tails of the component logs in its report.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Generator, Iterator, Mapping
from typing import Any

import pytest

from spillway.testing.cluster import Cluster, ensure_binaries

_CLUSTER = pytest.StashKey[Cluster]()

AddNode = Callable[..., str]


@pytest.fixture(scope="session")
def cluster(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    bin_dir = ensure_binaries()
    c = Cluster(tmp_path_factory.mktemp("cluster"), bin_dir)
    c.start()
    request.config.stash[_CLUSTER] = c
    try:
        yield c
    finally:
        c.stop()
        del request.config.stash[_CLUSTER]


@pytest.fixture
def k8s_namespace(cluster: Cluster) -> Iterator[str]:
    name = cluster.create_namespace(f"t-{uuid.uuid4().hex[:8]}")
    yield name
    cluster.kubectl("delete", "namespace", name, "--wait=false", "--ignore-not-found", check=False)


@pytest.fixture
def kwok_nodes(cluster: Cluster) -> Iterator[AddNode]:
    names: list[str] = []

    def add(
        capacity: Mapping[str, str],
        labels: Mapping[str, str] | None = None,
        allocatable: Mapping[str, str] | None = None,
        prefix: str = "node",
        **kwargs: Any,
    ) -> str:
        name = f"{prefix}-{uuid.uuid4().hex[:6]}"
        cluster.add_node(name, capacity, labels, allocatable, **kwargs)
        names.append(name)
        return name

    yield add
    if names:
        cluster.kubectl("delete", "node", *names, "--wait=false", "--ignore-not-found", check=False)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Generator[None, Any, None]:
    outcome = yield
    report: pytest.TestReport = outcome.get_result()
    if report.failed and "cluster" in getattr(item, "fixturenames", ()):
        c = item.config.stash.get(_CLUSTER, None)
        if c is not None:
            report.sections.append(("control-plane logs", c.dump_logs()))

"""Shared pytest wiring. Fixture modules live beside this file; each component adds its own."""

import pytest

pytest_plugins: list[str] = [
    "tests.fixtures_cluster",
    "tests.fixtures_prometheus",
    "tests.fixtures_agent",
    "tests.fixtures_deviceplugin",
]

# The longest files start first. `make test` runs two workers with `--dist loadfile` (a file's
# tests stay on one worker); in collection order the 225 s operator cluster file started late
# and kept one worker busy after the other had run dry. Per-file sums from `--durations=0` on
# the 2-core VM (2026-11-30): operator cluster 225 s, demo 177 s, chart 105 s, the next 38 s.
LONGEST_FIRST = ("test_operator_cluster.py", "test_demo.py", "test_chart.py")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the rest keep their order

"""Shared pytest wiring. Fixture modules live beside this file; each component adds its own."""

pytest_plugins: list[str] = [
    "tests.fixtures_cluster",
    "tests.fixtures_prometheus",
    "tests.fixtures_agent",
    "tests.fixtures_deviceplugin",
]

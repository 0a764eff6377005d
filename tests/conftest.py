"""Shared pytest wiring. Fixture modules live beside this file; each component adds its own."""

pytest_plugins: list[str] = ["tests.fixtures_cluster"]

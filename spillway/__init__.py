"""Spillway: lend idle GPU memory (HBM) to the inference tenants that need it."""

__version__ = "0.1.0"

"""Test support: a real local Kubernetes control plane (cluster) and its certificates (pki)."""

"""Test support: a real local Kubernetes control plane (cluster) and its certificates (pki),
and a real node agent in a subprocess on simulated GPUs (agentproc)."""

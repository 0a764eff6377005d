"""Test support: a real local Kubernetes control plane (cluster), a real node agent in a
subprocess on simulated GPUs (agentproc), and a whole local Spillway on kwok GPU nodes
(sandbox: cluster, CRDs, agents, operator). Certificates come from spillway.pki."""

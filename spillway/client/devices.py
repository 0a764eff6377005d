"""Find a GPU by UUID among the CUDA devices this process sees, whatever the numbering.

Inside a container `CUDA_VISIBLE_DEVICES` (or the device nodes mounted by the device plugin)
renumbers GPUs, so index 0 here may be any physical GPU. The agent names lenders by the UUID
NVML reports ("GPU-8c3e..."); torch reports the same UUID without the prefix.
"""

from __future__ import annotations

import torch


def normalize_uuid(uuid: str) -> str:
    """ "GPU-8C3E..." and "8c3e..." name the same GPU."""
    u = uuid.strip().lower()
    return u[4:] if u.startswith("gpu-") else u


def cuda_available() -> bool:
    return bool(torch.cuda.is_available()) and torch.cuda.device_count() > 0


def visible_gpu_uuids() -> list[str]:
    """UUIDs ("GPU-...") of the CUDA devices this process sees, by CUDA index."""
    if not cuda_available():
        return []
    return [f"GPU-{torch.cuda.get_device_properties(i).uuid}" for i in range(torch.cuda.device_count())]


def find_cuda_device(uuid: str) -> torch.device | None:
    """The torch device of the GPU with this UUID, or None when this process cannot see it."""
    want = normalize_uuid(uuid)
    for i, u in enumerate(visible_gpu_uuids()):
        if normalize_uuid(u) == want:
            return torch.device("cuda", i)
    return None

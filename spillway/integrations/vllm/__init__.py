"""Spillway for vLLM: an out-of-tree offloading spec for vLLM's OffloadingConnector that keeps
offloaded KV chunks in the pod's lease of lent HBM. Switch it on with configuration:

    vllm serve MODEL --kv-transfer-config '{"kv_connector": "OffloadingConnector", "kv_role": "kv_both",
        "kv_connector_extra_config": {"spec_name": "SpillwayOffloadingSpec",
                                      "spec_module_path": "spillway.integrations.vllm"}}'

Importing this package checks the installed vLLM first and refuses one outside SUPPORTED_VLLM
(vLLM's offloading API is experimental and changes between minor releases). See docs/client.md.
"""

from spillway.integrations.vllm.version import SUPPORTED_VLLM, UnsupportedVllm, check_vllm_version

check_vllm_version()

from spillway.integrations.vllm.manager import SlotLoadStoreSpec, SpillwayOffloadingManager  # noqa: E402
from spillway.integrations.vllm.spec import SpillwayOffloadingSpec  # noqa: E402
from spillway.integrations.vllm.worker import SpillwayOffloadingWorker  # noqa: E402

__all__ = [
    "SUPPORTED_VLLM",
    "SlotLoadStoreSpec",
    "SpillwayOffloadingManager",
    "SpillwayOffloadingSpec",
    "SpillwayOffloadingWorker",
    "UnsupportedVllm",
    "check_vllm_version",
]

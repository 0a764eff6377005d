"""Which vLLM releases the offloading spec supports. vLLM calls its offloading API experimental
(it was reworked between 0.25 and 0.26), so the range is the minor series we test against."""

from __future__ import annotations

from importlib import metadata

from packaging.specifiers import SpecifierSet
from packaging.version import InvalidVersion, Version

SUPPORTED_VLLM = ">=0.33.0,<0.34"

# vLLM releases whose OffloadingConnector accepts a failed transfer (TransferResult.success
# False). None does yet: 0.33's connector asserts that every job succeeded
# (vllm/distributed/kv_transfer/kv_connector/v1/offloading/worker.py; vllm-project/vllm#52838),
# so a failed job would stop the engine. Until one does, a job that spans a revocation is
# reported as done (its bytes are right: the slot store moved them before or after the copy)
# and the scheduler's manager drops the keys instead, so vLLM recomputes.
_ACCEPTS_FAILED_TRANSFERS: SpecifierSet | None = None


class UnsupportedVllm(ImportError):
    """The installed vLLM is not one the Spillway offloading spec supports."""


def installed_vllm() -> str:
    try:
        return metadata.version("vllm")
    except metadata.PackageNotFoundError as exc:
        raise UnsupportedVllm(
            f"vLLM is not installed; spillway.integrations.vllm needs vllm{SUPPORTED_VLLM} "
            "(pip install 'spillway[vllm]')"
        ) from exc


def check_vllm_version(version: str | None = None) -> Version:
    """Refuse a vLLM outside SUPPORTED_VLLM with a message that names the range."""
    found = installed_vllm() if version is None else version
    try:
        v = Version(found)
    except InvalidVersion as exc:
        raise UnsupportedVllm(f"cannot read the vLLM version {found!r}; supported: vllm{SUPPORTED_VLLM}") from exc
    if v.base_version not in SpecifierSet(SUPPORTED_VLLM):
        raise UnsupportedVllm(
            f"vLLM {found} is not supported by spillway.integrations.vllm: it implements vLLM's experimental "
            f"offloading API (vllm.v1.kv_offload) as of vllm{SUPPORTED_VLLM}; install a vLLM in that range "
            "or a Spillway release made for your vLLM"
        )
    return v


def accepts_failed_transfers(version: Version) -> bool:
    """Whether this vLLM's OffloadingConnector survives a TransferResult with success=False."""
    return _ACCEPTS_FAILED_TRANSFERS is not None and version.base_version in _ACCEPTS_FAILED_TRANSFERS

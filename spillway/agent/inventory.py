"""GPU inventory: what GPUs a node has, their memory and their peer links.

One small interface (`InventoryBackend`) with two implementations: `NvmlBackend` reads a
real NVIDIA driver through nvidia-ml-py; `SimulatedBackend` reads the same facts from a
topology YAML (examples/topologies/) so everything but the CUDA data path runs without a
GPU. Simulated data always says so (`simulated=True`, logged at start, a metric label).

The translation from NVML values to these facts is in pure functions (`p2p_status_name`,
`local_used_bytes`, `nvlink_peers`) so it can be checked with plain values.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

import yaml

from spillway.units import QuantityError, parse_quantity

# P2P status names, as in spillway.v1.P2PStatus (the proto enum uses the same names).
P2P_OK = "P2P_OK"
P2P_NAMES = (
    "P2P_OK",
    "P2P_NOT_SUPPORTED",
    "P2P_CHIPSET_NOT_SUPPORTED",
    "P2P_GPU_NOT_SUPPORTED",
    "P2P_TOPOLOGY_NOT_SUPPORTED",
    "P2P_DISABLED_BY_REGKEY",
    "P2P_UNKNOWN",
)

# Namespace of simulated GPU UUIDs: uuid5(namespace, "<node>/<index>") is stable per node.
_SIM_NAMESPACE = uuid.UUID("5b1f7e2a-4c0e-4d8e-9a57-5f1a1c0de0a1")


class InventoryError(RuntimeError):
    """The inventory cannot be read (bad topology file, NVML failure)."""


@dataclass(frozen=True)
class ProcessFacts:
    pid: int
    used_bytes: int


@dataclass(frozen=True)
class GpuFacts:
    uuid: str
    index: int
    name: str
    total_bytes: int
    used_bytes: int  # as the driver reports it (borrowers included)
    utilization_gpu_percent: int = 0
    utilization_memory_percent: int = 0
    processes: tuple[ProcessFacts, ...] = ()
    # The device node is /dev/nvidia<minor>; NVML's index can differ from it. -1: unknown.
    minor: int = -1


@dataclass(frozen=True)
class LinkFacts:
    gpu_a: str
    gpu_b: str
    nvlink: bool
    nvlink_count: int
    p2p_read: str = P2P_OK
    p2p_write: str = P2P_OK


@dataclass(frozen=True)
class InventoryFacts:
    node_name: str
    backend: str
    simulated: bool
    gpus: tuple[GpuFacts, ...]
    links: tuple[LinkFacts, ...]
    driver_version: str = ""


class InventoryBackend(Protocol):
    name: str
    simulated: bool

    def read(self) -> InventoryFacts:
        """The node's GPUs now. Raises InventoryError when it cannot."""
        ...

    def reload(self) -> None:
        """Re-read configuration (SIGHUP). The simulated backend re-reads its topology's local use."""
        ...

    def set_simulated_used(self, gpu_uuid: str, used_bytes: int) -> None:
        """Set a simulated GPU's local use. Only the simulated backend supports it."""
        ...

    def close(self) -> None: ...


# --- pure helpers ----------------------------------------------------------------------


def simulated_uuid(node_name: str, index: int) -> str:
    """Deterministic per node and index, so two simulated nodes never share a UUID."""
    return f"GPU-{uuid.uuid5(_SIM_NAMESPACE, f'{node_name}/{index}')}"


def p2p_status_name(code: int) -> str:
    """NVML's nvmlGpuP2PStatus_t value -> the proto's P2PStatus name."""
    table = {0: "P2P_OK", 1: "P2P_CHIPSET_NOT_SUPPORTED", 2: "P2P_GPU_NOT_SUPPORTED",
             3: "P2P_TOPOLOGY_NOT_SUPPORTED", 4: "P2P_DISABLED_BY_REGKEY", 5: "P2P_NOT_SUPPORTED"}
    return table.get(code, "P2P_UNKNOWN")


def local_used_bytes(used_bytes: int, processes: Iterable[ProcessFacts], borrower_pids: Iterable[int]) -> int:
    """Memory used by the GPU's own tenants: the driver's figure less the borrowers' processes."""
    pids = set(borrower_pids)
    borrowed = sum(p.used_bytes for p in processes if p.pid in pids)
    return max(0, used_bytes - borrowed)


def nvlink_peers(remote_bus_ids: Sequence[str | None], bus_id_to_uuid: Mapping[str, str]) -> dict[str, int]:
    """Active NVLink links of one GPU (the remote PCI bus id of each active link, None for an
    inactive one) -> {peer GPU UUID: direct link count}. Links to something that is not a
    GPU of this node (an NVSwitch) are counted under the key "switch"."""
    out: dict[str, int] = {}
    for bus in remote_bus_ids:
        if bus is None:
            continue
        key = bus_id_to_uuid.get(_norm_bus(bus), "switch")
        out[key] = out.get(key, 0) + 1
    return out


def _norm_bus(bus: str) -> str:
    """PCI bus ids come as '00000000:1B:00.0' or '0000:1b:00.0': compare on the last three parts."""
    parts = bus.strip().lower().split(":")
    return ":".join(parts[-2:]) if len(parts) >= 2 else bus.lower()


# --- simulated -------------------------------------------------------------------------


@dataclass
class _SimGpu:
    index: int
    name: str
    total: int
    used: int
    minor: int
    processes: list[ProcessFacts] = field(default_factory=list)


def _parse_topology(path: Path) -> tuple[str, list[_SimGpu], list[list[int]], int, str]:
    try:
        doc: Any = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise InventoryError(f"cannot read topology file {path}: {exc}") from exc
    if not isinstance(doc, dict) or not isinstance(doc.get("gpus"), list) or not doc["gpus"]:
        raise InventoryError(f"topology file {path}: needs a non-empty `gpus:` list (see examples/topologies/)")
    gpus: list[_SimGpu] = []
    for i, g in enumerate(doc["gpus"]):
        if not isinstance(g, dict) or "memory" not in g:
            raise InventoryError(f"topology file {path}: gpus[{i}] needs at least `memory:` (a quantity like 80Gi)")
        try:
            total = parse_quantity(str(g["memory"]))
            used = parse_quantity(str(g.get("localUsed", 0)), allow_zero=True)
        except QuantityError as exc:
            raise InventoryError(f"topology file {path}: gpus[{i}]: {exc}") from exc
        if used > total:
            raise InventoryError(f"topology file {path}: gpus[{i}] localUsed {g.get('localUsed')} exceeds memory")
        index = _topology_int(path, i, g, "index", i)
        gpus.append(_SimGpu(index=index, name=str(g.get("name", "Simulated GPU")), total=total, used=used,
                            minor=_topology_int(path, i, g, "minor", index)))
    if sorted(g.index for g in gpus) != list(range(len(gpus))):
        raise InventoryError(f"topology file {path}: GPU indexes must be 0..{len(gpus) - 1}, each once")
    minors = [g.minor for g in gpus]
    if len(set(minors)) != len(minors):
        raise InventoryError(f"topology file {path}: GPU minor numbers {minors} repeat; each GPU has its own "
                             "/dev/nvidia<minor>")
    nv = doc.get("nvlink") or {}
    groups = [list(map(int, grp)) for grp in (nv.get("groups") or [])]
    for grp in groups:
        for idx in grp:
            if not 0 <= idx < len(gpus):
                raise InventoryError(f"topology file {path}: nvlink group names GPU index {idx}, which does not exist")
    links = int(nv.get("linksPerGpu", 0) or 0)
    pcie = str(doc.get("pcieP2P", "OK")).upper()
    pcie = pcie if pcie.startswith("P2P_") else f"P2P_{pcie}"
    if pcie not in P2P_NAMES:
        raise InventoryError(f"topology file {path}: pcieP2P {doc.get('pcieP2P')!r}: use one of "
                             f"{', '.join(n.removeprefix('P2P_') for n in P2P_NAMES)}")
    return str(doc.get("driverVersion", "simulated")), gpus, groups, links, pcie


def _topology_int(path: Path, i: int, g: Mapping[str, Any], key: str, default: int) -> int:
    value = g.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise InventoryError(f"topology file {path}: gpus[{i}] `{key}: {value!r}` must be a whole number >= 0")
    return value


class SimulatedBackend:
    """GPUs described by a topology YAML. Local use comes from the file (re-read on SIGHUP
    via `reload`) and can be changed at run time with `set_simulated_used`."""

    name = "simulated"
    simulated = True

    def __init__(self, topology: Path, node_name: str) -> None:
        self.topology = Path(topology)
        self.node_name = node_name
        self._lock = threading.Lock()
        self.driver_version, self._gpus, groups, links_per_gpu, pcie = _parse_topology(self.topology)
        self._uuids = [simulated_uuid(node_name, g.index) for g in sorted(self._gpus, key=lambda g: g.index)]
        self._links = self._build_links(groups, links_per_gpu, pcie)

    def _build_links(self, groups: list[list[int]], links_per_gpu: int, pcie: str) -> tuple[LinkFacts, ...]:
        group_of: dict[int, set[int]] = {}
        for grp in groups:
            for idx in grp:
                group_of.setdefault(idx, set()).update(grp)
        out = []
        n = len(self._uuids)
        for a in range(n):
            for b in range(a + 1, n):
                nv = b in group_of.get(a, set())
                status = P2P_OK if nv else pcie
                out.append(LinkFacts(self._uuids[a], self._uuids[b], nv, links_per_gpu if nv else 0, status, status))
        return tuple(out)

    def read(self) -> InventoryFacts:
        with self._lock:
            gpus = tuple(
                GpuFacts(uuid=self._uuids[g.index], index=g.index, name=g.name, total_bytes=g.total,
                         used_bytes=g.used + sum(p.used_bytes for p in g.processes),
                         utilization_gpu_percent=0,
                         utilization_memory_percent=int(100 * g.used // g.total) if g.total else 0,
                         processes=tuple(g.processes), minor=g.minor)
                for g in sorted(self._gpus, key=lambda g: g.index)
            )
        return InventoryFacts(self.node_name, self.name, True, gpus, self._links, self.driver_version)

    def reload(self) -> None:
        _, gpus, _, _, _ = _parse_topology(self.topology)
        with self._lock:
            by_index = {g.index: g for g in gpus}
            for g in self._gpus:
                if g.index in by_index:
                    g.used = by_index[g.index].used

    def _gpu(self, gpu_uuid: str) -> _SimGpu:
        for g in self._gpus:
            if self._uuids[g.index] == gpu_uuid:
                return g
        raise KeyError(gpu_uuid)

    def set_simulated_used(self, gpu_uuid: str, used_bytes: int) -> None:
        with self._lock:
            g = self._gpu(gpu_uuid)
            if used_bytes > g.total:
                raise ValueError(f"simulated use {used_bytes} exceeds the GPU's {g.total} bytes")
            g.used = used_bytes

    def set_simulated_process(self, gpu_uuid: str, pid: int, used_bytes: int) -> None:
        """Simulate a process (a borrower, say) using memory on a GPU; 0 bytes removes it."""
        with self._lock:
            g = self._gpu(gpu_uuid)
            g.processes = [p for p in g.processes if p.pid != pid]
            if used_bytes:
                g.processes.append(ProcessFacts(pid, used_bytes))

    def close(self) -> None:
        return None


# --- NVML ------------------------------------------------------------------------------


class NvmlBackend:
    """A real NVIDIA driver through nvidia-ml-py (pynvml)."""

    name = "nvml"
    simulated = False

    def __init__(self, node_name: str) -> None:
        try:
            import pynvml
        except ImportError as exc:  # pragma: no cover - a dependency of the package
            raise InventoryError("nvidia-ml-py is not installed: pip install nvidia-ml-py") from exc
        self._nv = pynvml
        self.node_name = node_name
        try:
            pynvml.nvmlInit()
        except pynvml.NVMLError as exc:
            raise InventoryError(f"NVML init failed ({exc}): is the NVIDIA driver loaded and the GPU visible "
                                 "to this container? Use --backend simulated on machines without a GPU") from exc
        self._static: InventoryFacts | None = None

    def _handles(self) -> list[Any]:
        nv = self._nv
        return [nv.nvmlDeviceGetHandleByIndex(i) for i in range(nv.nvmlDeviceGetCount())]

    def _links(self, handles: list[Any], uuids: list[str]) -> tuple[LinkFacts, ...]:
        nv = self._nv
        bus_to_uuid: dict[str, str] = {}
        for h, u in zip(handles, uuids, strict=True):
            bus_to_uuid[_norm_bus(_text(nv.nvmlDeviceGetPciInfo(h).busId))] = u
        peers: list[dict[str, int]] = []
        for h in handles:
            remote: list[str | None] = []
            for link in range(getattr(nv, "NVML_NVLINK_MAX_LINKS", 18)):
                try:
                    if nv.nvmlDeviceGetNvLinkState(h, link) != nv.NVML_FEATURE_ENABLED:
                        remote.append(None)
                        continue
                    remote.append(_text(nv.nvmlDeviceGetNvLinkRemotePciInfo(h, link).busId))
                except nv.NVMLError:
                    remote.append(None)
            peers.append(nvlink_peers(remote, bus_to_uuid))
        out = []
        for a in range(len(handles)):
            for b in range(a + 1, len(handles)):
                read = self._p2p(handles[a], handles[b], nv.NVML_P2P_CAPS_INDEX_READ)
                write = self._p2p(handles[a], handles[b], nv.NVML_P2P_CAPS_INDEX_WRITE)
                nvl = self._p2p(handles[a], handles[b], nv.NVML_P2P_CAPS_INDEX_NVLINK) == P2P_OK
                count = peers[a].get(uuids[b], 0) or (peers[a].get("switch", 0) if nvl else 0)
                out.append(LinkFacts(uuids[a], uuids[b], nvl, count, read, write))
        return tuple(out)

    def _p2p(self, a: Any, b: Any, index: int) -> str:
        try:
            return p2p_status_name(int(self._nv.nvmlDeviceGetP2PStatus(a, b, index)))
        except self._nv.NVMLError:
            return "P2P_UNKNOWN"

    def read(self) -> InventoryFacts:
        nv = self._nv
        try:
            handles = self._handles()
            uuids = [_text(nv.nvmlDeviceGetUUID(h)) for h in handles]
            if self._static is None:
                self._static = InventoryFacts(self.node_name, self.name, False, (), self._links(handles, uuids),
                                              _text(nv.nvmlSystemGetDriverVersion()))
            gpus = []
            for i, (h, u) in enumerate(zip(handles, uuids, strict=True)):
                mem = nv.nvmlDeviceGetMemoryInfo(h)
                try:
                    util = nv.nvmlDeviceGetUtilizationRates(h)
                    ug, um = int(util.gpu), int(util.memory)
                except nv.NVMLError:
                    ug = um = 0
                procs = []
                try:
                    for p in nv.nvmlDeviceGetComputeRunningProcesses(h):
                        procs.append(ProcessFacts(int(p.pid), int(p.usedGpuMemory or 0)))
                except nv.NVMLError:
                    pass
                gpus.append(GpuFacts(uuid=u, index=i, name=_text(nv.nvmlDeviceGetName(h)), total_bytes=int(mem.total),
                                     used_bytes=int(mem.used), utilization_gpu_percent=ug,
                                     utilization_memory_percent=um, processes=tuple(procs),
                                     minor=self._minor(h)))
        except nv.NVMLError as exc:
            raise InventoryError(f"NVML read failed: {exc}") from exc
        return replace(self._static, gpus=tuple(gpus))

    def _minor(self, handle: Any) -> int:
        """The GPU's device node minor number (/dev/nvidia<minor>); -1 where NVML cannot tell."""
        try:
            return int(self._nv.nvmlDeviceGetMinorNumber(handle))
        except self._nv.NVMLError:
            return -1

    def reload(self) -> None:
        self._static = None

    def set_simulated_used(self, gpu_uuid: str, used_bytes: int) -> None:
        raise ValueError("simulated_used applies only to the simulated backend; this agent reads a real GPU (nvml)")

    def close(self) -> None:
        try:
            self._nv.nvmlShutdown()
        except self._nv.NVMLError:
            pass


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def nvidia_gpu_present() -> bool:
    """True when NVML initialises and sees at least one GPU (gates the GPU tests)."""
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            return int(pynvml.nvmlDeviceGetCount()) > 0
        finally:
            pynvml.nvmlShutdown()
    except Exception:
        return False

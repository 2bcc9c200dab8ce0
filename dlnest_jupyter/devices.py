"""What the machine has: GPUs from NVML (or simulated ones), CPU and memory from psutil.

Simulated GPUs (``DLNEST_SIMULATED_GPUS=16384,16384``, MiB per device) make every scheduling behaviour
testable and demonstrable without a GPU: their memory use is what the ledger reserves, plus an optional
external load (``DLNEST_SIMULATED_GPU_USED=2048,0``); tasks placed on them run on the CPU."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from .errors import DLNestError

SIMULATED = "DLNEST_SIMULATED_GPUS"
SIMULATED_USED = "DLNEST_SIMULATED_GPU_USED"


@dataclass
class GPU:
    index: int
    uuid: str
    name: str
    total_mb: int
    used_mb: int  #: as the driver reports it (all processes, ours and others)
    utilization: int | None = None
    simulated: bool = False
    process_mb: dict[int, int] = field(default_factory=dict)  #: pid -> MiB used on this device

    def as_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in ("index", "uuid", "name", "total_mb", "used_mb", "utilization",
                                              "simulated")}


def _mib_list(var: str, count: int | None = None) -> list[int]:
    raw = os.environ.get(var, "")
    try:
        values = [int(v) for v in raw.split(",")] if raw.strip() else []
    except ValueError:
        values = [-1]
    if any(v < 0 for v in values) or (count is not None and values and len(values) != count):
        raise DLNestError(f"{var} must be comma-separated MiB values, one per device (e.g. 16384,16384); "
                          f"got {raw!r}")
    return values


def _simulated() -> list[GPU]:
    totals = _mib_list(SIMULATED)
    used = _mib_list(SIMULATED_USED, len(totals)) or [0] * len(totals)
    return [GPU(i, f"SIM-{i}", f"Simulated GPU {i}", total, min(u, total), 0, True)
            for i, (total, u) in enumerate(zip(totals, used))]


_nvml_ready: bool | None = None


def _nvml() -> Any | None:
    """The pynvml module, initialised once; None when there is no NVIDIA driver."""
    global _nvml_ready
    import pynvml

    if _nvml_ready is None:
        try:
            pynvml.nvmlInit()
            _nvml_ready = True
        except pynvml.NVMLError:  # LibraryNotFound (no driver), DriverNotLoaded, ...
            _nvml_ready = False
    return pynvml if _nvml_ready else None


def gpus() -> list[GPU]:
    """The GPUs tasks can be placed on (simulated ones when ``DLNEST_SIMULATED_GPUS`` is set)."""
    if os.environ.get(SIMULATED) is not None:
        return _simulated()
    nvml = _nvml()
    if nvml is None:
        return []
    found = []
    for i in range(nvml.nvmlDeviceGetCount()):
        h = nvml.nvmlDeviceGetHandleByIndex(i)
        mem = nvml.nvmlDeviceGetMemoryInfo(h)
        try:
            util = nvml.nvmlDeviceGetUtilizationRates(h).gpu
        except nvml.NVMLError:
            util = None
        procs = {}
        try:
            for p in nvml.nvmlDeviceGetComputeRunningProcesses(h):
                procs[p.pid] = (p.usedGpuMemory or 0) // 2**20
        except nvml.NVMLError:
            pass
        name = nvml.nvmlDeviceGetName(h)
        found.append(GPU(i, nvml.nvmlDeviceGetUUID(h), name.decode() if isinstance(name, bytes) else name,
                         mem.total // 2**20, mem.used // 2**20, util, False, procs))
    return found


def host() -> dict[str, Any]:
    """CPU and RAM figures for the GPU listing."""
    import psutil

    vm = psutil.virtual_memory()
    return {"cpus": psutil.cpu_count(), "cpu_percent": psutil.cpu_percent(interval=None),
            "ram_total_mb": vm.total // 2**20, "ram_used_mb": (vm.total - vm.available) // 2**20}


def no_gpu_message() -> str:
    return (f"no GPU available: this machine has no NVIDIA driver; use --cpu to run on the CPU (or set "
            f"{SIMULATED}=16384,16384 to simulate two 16 GiB GPUs)")

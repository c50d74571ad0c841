"""GPU time through NVML (`nvidia-ml-py`), when there is a driver: allocated and used GPU-seconds.

`gpu.used.seconds` integrates each of the workload's GPUs' utilisation (the fraction of the
last sample period a kernel was running, as NVML reports it) over time, so a GPU kept busy
half the time for an hour is 1800 GPU-seconds. A workload's GPUs are the devices it was given
(indices or UUIDs, like CUDA_VISIBLE_DEVICES) or else those running any of its processes.
Both GPU metrics carry the `gpu_model` label.
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any, Protocol

from .domain import Integral

log = logging.getLogger("tollgate.meter")
HUNDRED = Decimal(100)


class GpuUnavailable(Exception):
    """No NVML here: the message says why (no package, no driver, no device)."""


@dataclass(frozen=True)
class GpuSample:
    """One device at one instant."""

    index: int
    uuid: str
    model: str
    utilisation: int  # percent of the last sample period a kernel ran
    pids: frozenset[int] = frozenset()

    def named(self, names: Collection[str]) -> bool:
        return str(self.index) in names or self.uuid in names


class GpuProvider(Protocol):
    """Reads every GPU of the host (NVML, or a fake in tests)."""

    def sample(self) -> list[GpuSample]:
        """All devices, now."""

    def close(self) -> None:
        """Release the library."""


class Nvml:
    """The real provider: NVIDIA's management library through `pynvml`."""

    def __init__(self, nvml: Any) -> None:
        self._nvml = nvml
        self._handles = [
            nvml.nvmlDeviceGetHandleByIndex(i) for i in range(nvml.nvmlDeviceGetCount())
        ]
        if not self._handles:
            nvml.nvmlShutdown()
            raise GpuUnavailable("NVML sees no GPU on this host")

    @classmethod
    def open(cls) -> Nvml:
        try:
            import pynvml  # type: ignore[import-not-found, unused-ignore]
        except ImportError:
            raise GpuUnavailable(
                "the nvidia-ml-py package is not installed (pip install nvidia-ml-py)"
            ) from None
        try:
            pynvml.nvmlInit()
            return cls(pynvml)
        except pynvml.NVMLError as exc:
            raise GpuUnavailable(
                f"NVML cannot start: {exc} (is the NVIDIA driver loaded?)"
            ) from None

    def sample(self) -> list[GpuSample]:
        nvml, out = self._nvml, []
        for index, handle in enumerate(self._handles):
            try:
                name = nvml.nvmlDeviceGetName(handle)
                uuid = nvml.nvmlDeviceGetUUID(handle)
                util = nvml.nvmlDeviceGetUtilizationRates(handle).gpu
                procs = nvml.nvmlDeviceGetComputeRunningProcesses(handle)
            except nvml.NVMLError as exc:
                log.debug("GPU %d unreadable this time: %s", index, exc)
                continue
            out.append(
                GpuSample(
                    index=index,
                    uuid=uuid.decode() if isinstance(uuid, bytes) else str(uuid),
                    model=name.decode() if isinstance(name, bytes) else str(name),
                    utilisation=int(util),
                    pids=frozenset(int(p.pid) for p in procs),
                )
            )
        return out

    def close(self) -> None:
        self._nvml.nvmlShutdown()


def open_gpus() -> GpuProvider | None:
    """NVML if it works here, else None after saying why once."""
    try:
        return Nvml.open()
    except GpuUnavailable as exc:
        log.info("GPU time is not metered: %s", exc)
        return None


@dataclass
class GpuMeter:
    """One workload's GPU-seconds, integrated over time."""

    devices: Sequence[str] = ()
    model: str | None = None
    used: Integral = field(default_factory=Integral)

    def observe(self, samples: Sequence[GpuSample], at: float, pids: Collection[int]) -> Decimal:
        """Take one reading at `at` (seconds); return the used GPU-seconds so far."""
        if self.devices:
            mine = [s for s in samples if s.named(self.devices)]
        else:
            mine = [s for s in samples if s.pids & set(pids)]
        if self.model is None and mine:
            self.model = mine[0].model
        busy = sum((Decimal(s.utilisation) / HUNDRED for s in mine), Decimal(0))
        return self.used.add(at, busy)

    def labels(self) -> dict[str, str]:
        return {"gpu_model": self.model} if self.model else {}

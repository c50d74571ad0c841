"""GPU time: the NVML provider over a hand-written fake library, and the per-workload meter."""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal

import pytest

from services.meter.gpu import GpuMeter, GpuSample, GpuUnavailable, Nvml

H100 = "NVIDIA H100 80GB HBM3"


class FakeNvmlError(Exception):
    pass


@dataclass
class Util:
    gpu: int


@dataclass
class Proc:
    pid: int


class FakeNvml:
    """The parts of pynvml the provider uses; device 1 fails to answer once."""

    NVMLError = FakeNvmlError

    def __init__(self, devices: int) -> None:
        self.count = devices
        self.flaky = True
        self.shut = False

    def nvmlDeviceGetCount(self) -> int:
        return self.count

    def nvmlDeviceGetHandleByIndex(self, i: int) -> int:
        return i

    def nvmlDeviceGetName(self, h: int) -> bytes:
        return H100.encode()  # older drivers answer bytes

    def nvmlDeviceGetUUID(self, h: int) -> str:
        return f"GPU-{h}"

    def nvmlDeviceGetUtilizationRates(self, h: int) -> Util:
        if h == 1 and self.flaky:
            self.flaky = False
            raise FakeNvmlError("GPU is lost")
        return Util(30 * (h + 1))

    def nvmlDeviceGetComputeRunningProcesses(self, h: int) -> list[Proc]:
        return [Proc(100 + h)]

    def nvmlShutdown(self) -> None:
        self.shut = True


def test_the_provider_reads_every_device_and_skips_one_that_does_not_answer() -> None:
    lib = FakeNvml(2)
    nvml = Nvml(lib)
    assert nvml.sample() == [GpuSample(0, "GPU-0", H100, 30, frozenset({100}))]
    assert [s.utilisation for s in nvml.sample()] == [30, 60]
    nvml.close()
    assert lib.shut


def test_a_host_without_gpus_is_said_to_have_none() -> None:
    lib = FakeNvml(0)
    with pytest.raises(GpuUnavailable, match="no GPU"):
        Nvml(lib)
    assert lib.shut


def test_without_a_driver_or_package_nvml_is_unavailable_with_the_reason() -> None:
    with pytest.raises(GpuUnavailable, match=r"nvidia-ml-py|NVML"):
        Nvml.open()  # this machine has no NVIDIA GPU


SAMPLES = [GpuSample(0, "GPU-0", "A100", 40, frozenset({7})),
           GpuSample(1, "GPU-1", "H100", 100, frozenset({8, 9}))]  # fmt: skip


def test_gpu_seconds_are_utilisation_integrated_over_time_on_the_workloads_devices() -> None:
    by_index = GpuMeter(devices=["1"])
    assert by_index.observe(SAMPLES, 0.0, []) == 0
    assert by_index.observe(SAMPLES, 10.0, []) == 10  # busy all the time for 10 s
    assert by_index.labels() == {"gpu_model": "H100"}
    by_uuid = GpuMeter(devices=["GPU-0", "GPU-1"])
    by_uuid.observe(SAMPLES, 0.0, [])
    assert by_uuid.observe(SAMPLES, 10.0, []) == 14  # 0.4 + 1.0 GPUs busy


def test_without_named_devices_a_workloads_gpus_are_those_running_its_processes() -> None:
    meter = GpuMeter()
    meter.observe(SAMPLES, 0.0, [7])
    assert meter.observe(SAMPLES, 5.0, [7, 1234]) == Decimal(2)
    assert meter.labels() == {"gpu_model": "A100"}
    idle = GpuMeter(model="L4")
    assert idle.observe(SAMPLES, 0.0, [55]) == 0 and idle.labels() == {"gpu_model": "L4"}

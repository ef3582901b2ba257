"""Energy meters: cumulative hardware energy counters read around a measurement window.

- :class:`NvmlEnergyMeter`: the GPU's total-energy counter through NVML
  (``nvmlDeviceGetTotalEnergyConsumption``, millijoules since driver load; nvidia-ml-py).
- :class:`PowercapEnergyMeter`: Linux powercap / RAPL package counters
  (``<root>/intel-rapl:N/energy_uj``, microjoules, wrapping at ``max_energy_range_uj``); the
  whole CPU package, so other processes on the socket are counted too.
- :class:`UnavailableEnergyMeter`: no counter; every reading says "not available", never 0.

A window lasts at least ``min_time_s`` (one second by default): the workload is repeated
until the time is reached, and the device is synchronized at both ends so that queued GPU
work is inside the window.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from kernel_moe.bench.timing import synchronize

logger = logging.getLogger("kernel_moe")

NOT_AVAILABLE = "not available"
DEFAULT_POWERCAP_ROOT = "/sys/class/powercap"


@dataclass(frozen=True)
class EnergyReading:
    """Energy of one measurement window. ``joules`` is None when no counter exists."""

    joules: float | None
    seconds: float
    iterations: int
    method: str

    @property
    def value(self) -> float | None:
        return self.joules

    @property
    def available(self) -> bool:
        return self.joules is not None

    @property
    def joules_per_call(self) -> float | None:
        if self.joules is None or self.iterations == 0:
            return None
        return self.joules / self.iterations

    @property
    def watts(self) -> float | None:
        if self.joules is None or self.seconds <= 0:
            return None
        return self.joules / self.seconds

    def __str__(self) -> str:
        if self.joules is None:
            return NOT_AVAILABLE
        return f"{self.joules:.3f} J in {self.seconds:.2f} s ({self.iterations} calls, {self.method})"

    def to_dict(self) -> dict:
        return {"joules": self.joules, "seconds": self.seconds, "iterations": self.iterations, "method": self.method}


class EnergyMeter(ABC):
    """A cumulative energy counter: :meth:`snapshot` reads it, :meth:`joules_between` turns two
    snapshots into joules (undoing wraparound where the counter has one)."""

    method: str = NOT_AVAILABLE

    @property
    def available(self) -> bool:
        return True

    @abstractmethod
    def snapshot(self) -> object:
        """The counter's raw state now."""

    @abstractmethod
    def joules_between(self, start: object, end: object) -> float:
        """Joules spent between two snapshots."""

    def measure(
        self,
        fn: Callable[[], object],
        min_time_s: float = 1.0,
        device: torch.device | str | None = None,
    ) -> EnergyReading:
        """Run ``fn`` repeatedly for at least ``min_time_s`` seconds and return the energy used.

        The device is synchronized before the first reading and before the last; calls run in
        growing batches so the window is checked without a sync after every call.
        """
        if min_time_s <= 0:
            raise ValueError(f"min_time_s={min_time_s!r}; allowed: a number > 0")
        sync = functools.partial(synchronize, torch.device("cpu" if device is None else device))
        sync()
        start = self.snapshot()
        t0 = time.perf_counter()
        iterations, batch = 0, 1
        while True:
            for _ in range(batch):
                fn()
            iterations += batch
            sync()
            elapsed = time.perf_counter() - t0
            if elapsed >= min_time_s:
                break
            remaining = math.ceil(iterations * (min_time_s - elapsed) / max(elapsed, 1e-9))
            batch = max(1, min(batch * 2, remaining))
        end = self.snapshot()
        return EnergyReading(self.joules_between(start, end), elapsed, iterations, self.method)


class UnavailableEnergyMeter(EnergyMeter):
    """No energy counter on this machine: readings are None and print as "not available"."""

    method = NOT_AVAILABLE

    def __init__(self, reason: str = "no energy counter found") -> None:
        self.reason = reason

    @property
    def available(self) -> bool:
        return False

    def snapshot(self) -> object:
        raise RuntimeError(f"energy counter not available: {self.reason}")

    def joules_between(self, start: object, end: object) -> float:
        raise RuntimeError(f"energy counter not available: {self.reason}")

    def measure(self, fn, min_time_s: float = 1.0, device=None) -> EnergyReading:
        """Does not run ``fn``: there is nothing to measure."""
        return EnergyReading(None, 0.0, 0, NOT_AVAILABLE)


class NvmlEnergyMeter(EnergyMeter):
    """GPU total-energy counter via NVML (millijoules, monotonic since the driver loaded)."""

    method = "nvml"

    def __init__(self, device: torch.device | str | int = 0) -> None:
        import pynvml  # nvidia-ml-py; ImportError when absent

        dev = torch.device("cuda", device) if isinstance(device, int) else torch.device(device)
        index = dev.index if dev.index is not None else torch.cuda.current_device()
        pynvml.nvmlInit()
        self._nvml = pynvml
        self._handle = self._find_handle(pynvml, index)
        self.snapshot()  # raises NVMLError (e.g. NotSupported) when the counter is missing

    @staticmethod
    def _find_handle(pynvml, index: int):
        """NVML numbers GPUs ignoring CUDA_VISIBLE_DEVICES: match by UUID first."""
        uuid = getattr(torch.cuda.get_device_properties(index), "uuid", None)
        if uuid is not None:
            text = str(uuid)
            candidate = text if text.startswith("GPU-") else f"GPU-{text}"
            try:
                return pynvml.nvmlDeviceGetHandleByUUID(candidate)
            except pynvml.NVMLError:
                logger.debug("NVML has no GPU with UUID %s; falling back to index %d", candidate, index)
        return pynvml.nvmlDeviceGetHandleByIndex(index)

    def snapshot(self) -> int:
        return int(self._nvml.nvmlDeviceGetTotalEnergyConsumption(self._handle))

    def joules_between(self, start: object, end: object) -> float:
        return (int(end) - int(start)) / 1e3


class PowercapEnergyMeter(EnergyMeter):
    """Sum of the top-level RAPL package zones under a powercap root (microjoules)."""

    method = "powercap"

    def __init__(self, root: str | os.PathLike | None = None) -> None:
        self.root = Path(root if root is not None else DEFAULT_POWERCAP_ROOT)
        zones = []
        if self.root.is_dir():
            for zone in sorted(self.root.iterdir()):
                # top-level packages only ("intel-rapl:0"); sub-zones ("intel-rapl:0:0") are parts of them
                if zone.name.startswith("intel-rapl:") and zone.name.count(":") == 1:
                    if (zone / "energy_uj").is_file():
                        zones.append(zone)
        if not zones:
            raise FileNotFoundError(f"no intel-rapl:N/energy_uj under {self.root}")
        self.zones = zones
        self.max_range_uj = [self._read_optional_int(z / "max_energy_range_uj") for z in zones]
        self.snapshot()  # raises PermissionError when the counters are root-only

    @staticmethod
    def _read_optional_int(path: Path) -> int | None:
        try:
            return int(path.read_text().strip())
        except (OSError, ValueError):
            return None

    def snapshot(self) -> list[int]:
        """Raw counters in microjoules, one per zone."""
        return [int((z / "energy_uj").read_text().strip()) for z in self.zones]

    def joules_between(self, start: object, end: object) -> float:
        """Undoes at most one wraparound per zone (windows are seconds, ranges are kilojoules)."""
        total_uj = 0
        for s, e, m in zip(start, end, self.max_range_uj, strict=True):
            if e >= s:
                total_uj += e - s
            elif m is not None:
                total_uj += e + m - s
            else:
                raise RuntimeError("powercap counter went backwards and max_energy_range_uj is unreadable")
        return total_uj / 1e6


def detect_energy_meter(
    device: torch.device | str | None = None, powercap_root: str | os.PathLike | None = None
) -> EnergyMeter:
    """The best energy counter for work on ``device``, else :class:`UnavailableEnergyMeter`.

    CUDA work is measured with NVML only (a CPU package counter would miss the GPU); CPU work
    with powercap. ``powercap_root`` defaults to ``$KERNEL_MOE_POWERCAP_ROOT`` or
    ``/sys/class/powercap``.
    """
    dev = torch.device(device) if device is not None else torch.device("cpu")
    if dev.type == "cuda":
        try:
            return NvmlEnergyMeter(dev)
        except Exception as exc:  # ImportError, NVMLError_*: any failure means no counter
            logger.info("energy: NVML counter not available (%s)", exc)
            return UnavailableEnergyMeter(f"NVML: {exc}")
    if dev.type == "cpu":
        root = powercap_root if powercap_root is not None else os.environ.get("KERNEL_MOE_POWERCAP_ROOT")
        try:
            return PowercapEnergyMeter(root)
        except (OSError, ValueError) as exc:
            logger.info("energy: powercap counter not available (%s)", exc)
            return UnavailableEnergyMeter(f"powercap: {exc}")
    return UnavailableEnergyMeter(f"no energy counter for device type {dev.type!r}")

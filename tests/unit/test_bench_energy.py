"""Energy meters of kernel_moe.bench.energy, with simulated counters."""

from __future__ import annotations

import sys
import types

import pytest
import torch

from kernel_moe.bench.energy import (
    NOT_AVAILABLE,
    EnergyReading,
    NvmlEnergyMeter,
    PowercapEnergyMeter,
    UnavailableEnergyMeter,
    detect_energy_meter,
)


@pytest.fixture
def no_nvml(monkeypatch):
    """Make ``import pynvml`` fail as on a machine without nvidia-ml-py."""
    monkeypatch.setitem(sys.modules, "pynvml", None)


def _zone(root, name, energy_uj, max_uj=None):
    z = root / name
    z.mkdir()
    (z / "energy_uj").write_text(f"{energy_uj}\n")
    if max_uj is not None:
        (z / "max_energy_range_uj").write_text(f"{max_uj}\n")
    return z


def test_no_counter_is_not_available_never_zero(tmp_path, no_nvml, monkeypatch):
    monkeypatch.delenv("KERNEL_MOE_POWERCAP_ROOT", raising=False)
    meter = detect_energy_meter("cpu", powercap_root=tmp_path)  # an empty powercap root
    assert isinstance(meter, UnavailableEnergyMeter)
    assert not meter.available
    calls = []
    reading = meter.measure(lambda: calls.append(1), min_time_s=1.0)
    assert reading.value is None and reading.joules is None and reading.joules_per_call is None
    assert reading.value != 0
    assert str(reading) == NOT_AVAILABLE == "not available"
    assert calls == []  # nothing is run when there is nothing to measure


def test_cuda_without_nvml_is_not_available(no_nvml):
    meter = detect_energy_meter("cuda")
    assert isinstance(meter, UnavailableEnergyMeter)
    assert "NVML" in meter.reason
    with pytest.raises(ImportError):
        NvmlEnergyMeter("cuda")


def test_env_var_points_at_the_powercap_root(tmp_path, monkeypatch):
    _zone(tmp_path, "intel-rapl:0", 5, 100)
    monkeypatch.setenv("KERNEL_MOE_POWERCAP_ROOT", str(tmp_path))
    assert isinstance(detect_energy_meter("cpu"), PowercapEnergyMeter)


def test_powercap_sums_packages_and_skips_subzones(tmp_path):
    _zone(tmp_path, "intel-rapl:0", 1_000_000, 10**12)
    _zone(tmp_path, "intel-rapl:1", 2_000_000, 10**12)
    _zone(tmp_path, "intel-rapl:0:0", 7_000_000, 10**12)  # a part of package 0: not added again
    (tmp_path / "intel-rapl-mmio:0").mkdir()
    meter = PowercapEnergyMeter(tmp_path)
    assert [z.name for z in meter.zones] == ["intel-rapl:0", "intel-rapl:1"]
    assert meter.snapshot() == [1_000_000, 2_000_000]
    assert meter.joules_between([1_000_000, 2_000_000], [1_500_000, 2_250_000]) == pytest.approx(0.75)


def test_powercap_wraparound(tmp_path):
    max_uj = 262_143_328_850
    _zone(tmp_path, "intel-rapl:0", max_uj - 100, max_uj)
    meter = PowercapEnergyMeter(tmp_path)
    assert meter.joules_between([max_uj - 100], [50]) == pytest.approx(150e-6)
    _zone(tmp_path, "intel-rapl:1", 0)  # no max_energy_range_uj: a wrap cannot be undone
    meter = PowercapEnergyMeter(tmp_path)
    with pytest.raises(RuntimeError, match="max_energy_range_uj"):
        meter.joules_between([10, 10], [20, 5])


def test_measure_window_repeats_until_min_time(tmp_path):
    zone = _zone(tmp_path, "intel-rapl:0", 0, 10**12)
    meter = PowercapEnergyMeter(tmp_path)
    state = {"uj": 0, "calls": 0}

    def workload():  # every call "spends" 0.25 J on the simulated counter
        state["uj"] += 250_000
        state["calls"] += 1
        (zone / "energy_uj").write_text(str(state["uj"]))

    reading = meter.measure(workload, min_time_s=0.05)
    assert isinstance(reading, EnergyReading)
    assert reading.seconds >= 0.05
    assert reading.iterations == state["calls"] >= 1
    assert reading.joules == pytest.approx(0.25 * reading.iterations)
    assert reading.joules_per_call == pytest.approx(0.25)
    assert reading.method == "powercap"
    assert "J" in str(reading)
    with pytest.raises(ValueError, match="min_time_s"):
        meter.measure(workload, min_time_s=0)


def test_reading_round_trips_through_dict():
    r = EnergyReading(1.5, 1.2, 30, "nvml")
    assert EnergyReading(**r.to_dict()) == r
    assert r.watts == pytest.approx(1.25)


@pytest.fixture
def fake_nvml(monkeypatch):
    """A stand-in pynvml whose energy counter the test drives, and a GPU with a known UUID."""
    fake = types.ModuleType("pynvml")

    class NVMLError(Exception):
        pass

    state = {"mj": 1_000, "supported": True}

    def total_energy(handle):
        if not state["supported"]:
            raise NVMLError("Not Supported")
        return state["mj"]

    fake.NVMLError = NVMLError
    fake.nvmlInit = lambda: None
    fake.nvmlDeviceGetHandleByUUID = lambda uuid: ("uuid", uuid)
    fake.nvmlDeviceGetHandleByIndex = lambda index: ("index", index)
    fake.nvmlDeviceGetTotalEnergyConsumption = total_energy
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: types.SimpleNamespace(uuid="1234-abcd"))
    return state


def test_nvml_counter_in_millijoules(fake_nvml):
    meter = detect_energy_meter("cuda:0")
    assert isinstance(meter, NvmlEnergyMeter) and meter.available
    assert meter._handle == ("uuid", "GPU-1234-abcd")  # matched by UUID, not by NVML's own index
    assert meter.joules_between(1_000, 3_500) == pytest.approx(2.5)

    def workload():
        fake_nvml["mj"] += 40

    reading = meter.measure(workload, min_time_s=0.02)  # no device: no CUDA sync needed here
    assert reading.method == "nvml" and reading.joules == pytest.approx(0.04 * reading.iterations)


def test_nvml_without_the_energy_counter_is_not_available(fake_nvml):
    fake_nvml["supported"] = False
    meter = detect_energy_meter("cuda:0")
    assert isinstance(meter, UnavailableEnergyMeter)
    assert str(meter.measure(lambda: None)) == "not available"

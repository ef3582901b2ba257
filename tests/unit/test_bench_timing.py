"""Sampling of kernel_moe.bench.timing on CPU, and its CUDA-event path with simulated events."""

from __future__ import annotations

import pytest
import torch

from kernel_moe.bench import timing
from kernel_moe.bench.device import measure_device_peaks
from kernel_moe.bench.settings import Timing

CUDA = torch.device("cuda")


class FakeEvent:
    """A CUDA event whose clock advances 2 ms per recorded call; counts host syncs."""

    clock_ms = 0.0
    syncs = 0

    def __init__(self, enable_timing: bool = False) -> None:
        assert enable_timing
        self.at = None

    def record(self) -> None:
        FakeEvent.clock_ms += 1.0
        self.at = FakeEvent.clock_ms

    def synchronize(self) -> None:
        FakeEvent.syncs += 1

    def elapsed_time(self, end: FakeEvent) -> float:
        return end.at - self.at


@pytest.fixture
def fake_cuda(monkeypatch):
    FakeEvent.clock_ms, FakeEvent.syncs = 0.0, 0
    monkeypatch.setattr(torch.cuda, "Event", FakeEvent)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)


def test_cpu_sampling_respects_the_sample_bounds():
    cpu, calls = torch.device("cpu"), []
    samples = timing.sample_block(lambda: calls.append(1), cpu, Timing(min_time_s=0.0, min_samples=4))
    assert len(samples) == len(calls) == 4 and all(s >= 0 for s in samples)
    rounds = timing.sample_interleaved([lambda: None] * 3, cpu, Timing(min_time_s=0, min_samples=2))
    assert [len(r) for r in rounds] == [2, 2, 2]
    capped = timing.sample_block(lambda: None, cpu, Timing(min_time_s=10.0, min_samples=1, max_samples=3))
    assert len(capped) == 3


def test_cuda_events_time_each_call(fake_cuda):
    assert timing.time_call(lambda: None, CUDA) == pytest.approx(1e-3)
    samples = timing.sample_block(lambda: None, CUDA, Timing(min_time_s=0.0, min_samples=130, max_samples=130))
    assert samples == [pytest.approx(1e-3)] * 130
    assert FakeEvent.syncs == 1 + 2  # time_call's, then one every 64 calls in flight


def test_device_peaks_use_the_fastest_call():
    peaks = measure_device_peaks("cpu", size=64, repeats=2)
    assert peaks.matmul_tflops > 0 and peaks.copy_gbps > 0 and peaks.source == "measured"

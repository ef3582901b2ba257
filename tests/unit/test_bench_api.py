"""The benchmark API of the plan (seeds/004) as written, and what a benchmark prints: its
summary, without the PyTorch profiler's C++ log lines of the CPU peak-memory measurement."""

from __future__ import annotations

import os

import pytest
import torch

from kernel_moe.bench import MoEBenchmark
from kernel_moe.bench.memory import measure_peak_memory, without_profiler_log_lines
from kernel_moe.bench.models import NaiveMoE
from kernel_moe.bench.settings import BenchSettings, Measurements, Timing

PROFILER_WORDS = ("profiler_start", "profiler_stop")
PROFILER_LINE = b"USDT:2026-01-01 00:00:00 1:1 SyncActivityProfilerHandler.cpp:52] profiler_start\n"


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """One torch thread: steady small timed runs on a CPU shared with other jobs."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def test_plan_api_as_written(capfd):
    """``MoEBenchmark(model=..., batch_sizes=[...], sequence_lengths=[...])``, ``run()`` and
    ``print_summary()`` exactly as the plan writes them, with default settings (every variant,
    memory on), on a tiny hand-written Mixtral-style block and small shapes."""
    mixtral_model = NaiveMoE(32, 48, 4, 2)

    benchmark = MoEBenchmark(model=mixtral_model, batch_sizes=[1, 2], sequence_lengths=[8])
    results = benchmark.run()
    results.print_summary()

    out, err = capfd.readouterr()
    variants = ("original", "optimized", "optimized+compiled")
    assert [(c.variant, c.batch_size) for c in results.cases] == [(v, b) for b in (1, 2) for v in variants]
    assert all(c.ok for c in results.cases), [c.error for c in results.cases]
    assert all(c.memory.method == "torch_profiler" for c in results.cases)
    assert out == results.summary()
    for word in PROFILER_WORDS:
        assert word not in out and word not in err


def test_memory_measurement_prints_no_profiler_lines(capfd):
    """The profiler's start / stop lines are written by C++ to the stderr file descriptor:
    ``capfd`` sees them unless the measurement keeps them out."""
    settings = BenchSettings(
        timing=Timing(min_time_s=0.0, min_samples=2, warmup=0),
        measurements=Measurements(energy=False),
        progress=False,
    )
    results = MoEBenchmark(NaiveMoE(32, 48, 4, 2), [1], [4], variants=["original"], settings=settings).run()
    results.print_summary()
    print("after the summary")

    out, err = capfd.readouterr()
    assert results.cases[0].memory.peak_bytes > 0
    assert out == results.summary() + "after the summary\n"
    for word in PROFILER_WORDS:
        assert word not in out and word not in err


def test_only_profiler_lines_are_dropped(capfd):
    """Everything else written to the file descriptors while the profiler starts or stops
    reaches them afterwards, in order; what the measured call prints is never caught."""
    with without_profiler_log_lines():
        os.write(1, b"stdout\n" + PROFILER_LINE.replace(b"start", b"stop"))
        os.write(2, b"stderr before\n" + PROFILER_LINE + b"stderr after\n")
    measure_peak_memory(lambda: os.write(2, b"from the measured call\n"), "cpu")
    out, err = capfd.readouterr()
    assert out == "stdout\n"
    assert err == "stderr before\nstderr after\nfrom the measured call\n"


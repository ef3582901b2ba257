"""Benchmark harness: compare MoE implementations side by side (speed, memory, energy,
expert utilization) and render the results as tables, JSON, markdown and plots.

Entry points: :class:`MoEBenchmark` for one model, :func:`run_preset` for the named sweeps,
and ``python -m kernel_moe bench`` (:func:`kernel_moe.bench.cli.main`). How a benchmark runs
(timing, measurements, inputs) is one :class:`BenchSettings` value.
"""

from kernel_moe.bench.energy import EnergyMeter, EnergyReading, detect_energy_meter
from kernel_moe.bench.memory import MemoryReading, measure_peak_memory
from kernel_moe.bench.models import (
    DenseFFN,
    NaiveMoE,
    ParamCount,
    count_parameters,
    dense_same_active,
    dense_same_total,
)
from kernel_moe.bench.presets import PRESETS, run_preset
from kernel_moe.bench.results import BenchmarkResults, CaseResult
from kernel_moe.bench.runner import MoEBenchmark
from kernel_moe.bench.settings import BenchSettings, Inputs, Measurements, Timing
from kernel_moe.bench.stats import LatencySummary, LoadBalance
from kernel_moe.bench.variants import VariantUnavailable

__all__ = [
    "PRESETS",
    "BenchSettings",
    "BenchmarkResults",
    "CaseResult",
    "DenseFFN",
    "EnergyMeter",
    "EnergyReading",
    "Inputs",
    "LatencySummary",
    "LoadBalance",
    "Measurements",
    "MemoryReading",
    "MoEBenchmark",
    "NaiveMoE",
    "ParamCount",
    "Timing",
    "VariantUnavailable",
    "count_parameters",
    "dense_same_active",
    "dense_same_total",
    "detect_energy_meter",
    "measure_peak_memory",
    "run_preset",
]

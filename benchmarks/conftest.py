"""pytest-benchmark setup shared by the suites in this folder.

- Every benchmark is stamped (``benchmark.extra_info``) with the device name, dtype, tokens,
  variant, and its speedup over the "original" variant of the same case (measured in the same
  process), so a ``--benchmark-json`` file is readable on its own.
- ``--benchmark-save`` / ``--benchmark-autosave`` store runs under
  ``benchmarks/results/<device>/`` unless ``--benchmark-storage`` says otherwise.
- On CUDA the timed function ends with ``torch.cuda.synchronize()`` so that the host timer
  of pytest-benchmark covers the GPU work.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from presets import apply_thread_setting, bench_device

from kernel_moe.bench.device import device_name, device_slug
from kernel_moe.bench.variants import VariantUnavailable

RESULTS_DIR = Path(__file__).parent / "results"
DEFAULT_STORAGE = "file://./.benchmarks"


def pytest_configure(config: pytest.Config) -> None:
    """Point pytest-benchmark's storage at benchmarks/results/<device>/ when runs are saved or
    compared and no storage was given (this runs before the plugin reads the option: its own
    pytest_configure is trylast), and apply ``$KERNEL_MOE_BENCH_THREADS``."""
    apply_thread_setting()
    option = config.option
    stores = any(getattr(option, name, None) for name in ("benchmark_save", "benchmark_autosave", "benchmark_compare"))
    if stores and getattr(option, "benchmark_storage", None) == DEFAULT_STORAGE:
        option.benchmark_storage = f"file://{RESULTS_DIR / device_slug(bench_device())}"


@pytest.fixture(scope="session")
def device() -> torch.device:
    return bench_device()


@pytest.fixture(scope="session")
def original_medians() -> dict[str, float]:
    """Median seconds of the "original" variant per case key, filled as the suites run."""
    return {}


def _synced(fn: Callable[[], object], dev: torch.device) -> Callable[[], object]:
    if dev.type != "cuda":
        return fn

    def call():
        fn()
        torch.cuda.synchronize(dev)

    return call


def _inline_median(fn: Callable[[], object], repeats: int = 7) -> float:
    fn()
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples)


@pytest.fixture
def measure(benchmark, device, original_medians):
    """``measure(key, variant, fn, tokens, original_fn, **info)``: benchmark ``fn`` and stamp
    extra_info, including ``speedup_vs_original`` (original median / this median)."""

    def run(key: str, variant: str, fn, tokens: int, original_fn, **info) -> None:
        call = _synced(fn, device)
        benchmark.group = key
        benchmark.extra_info.update(
            device=str(device),
            device_name=device_name(device),
            torch=torch.__version__,
            variant=variant,
            tokens=tokens,
            **info,
        )
        benchmark(call)
        stats = getattr(benchmark, "stats", None)
        if stats is None:  # --benchmark-disable: the function ran once, nothing was timed
            return
        median = stats.stats.median
        if variant == "original":
            original_medians[key] = median
        reference = original_medians.get(key)
        source = "pytest-benchmark"
        if reference is None:  # the original case was deselected: time it here, same process
            reference = _inline_median(_synced(original_fn, device))
            original_medians[key] = reference
            source = "inline median of 7"
        benchmark.extra_info.update(
            speedup_vs_original=reference / median,
            original_median_s=reference,
            original_source=source,
            tokens_per_s=tokens / median,
        )

    return run


@pytest.fixture
def measure_variant(measure):
    """``measure_variant(key, bench, build, variant, (batch, seq), **info)``: time
    ``build(variant)`` (the suite's cached ``bench.build_variant``) on
    ``bench.make_inputs(batch, seq)`` with :func:`measure`, against ``build("original")`` on
    the same inputs; a variant that cannot be built here skips the test."""

    def run(key: str, bench, build, variant: str, batch_seq: tuple[int, int], /, **info) -> None:
        try:
            module = build(variant)
        except VariantUnavailable as exc:
            pytest.skip(str(exc))
        inputs = bench.make_inputs(*batch_seq)
        dtype = str(bench.dtype).replace("torch.", "")
        original = bench.make_call(build("original"), inputs)
        tokens = batch_seq[0] * batch_seq[1]
        measure(key, variant, bench.make_call(module, inputs), tokens, original, dtype=dtype, **info)

    return run

"""Shapes and token counts of the pytest-benchmark suites in this folder.

Legend: H hidden size, E experts, K top-k, I expert intermediate size, T tokens per call.

The layer shapes are those of the ``fair`` and ``three_way`` presets of
``python -m kernel_moe bench``, so both tools measure the same layers. Token counts depend
on the device and can be overridden with ``KERNEL_MOE_BENCH_TOKENS=128,512``.
"""

from __future__ import annotations

import os

import torch

from kernel_moe.bench.presets import FAIR_SHAPE, THREE_WAY_SHAPES, MoEShape

LAYER_SHAPES: tuple[MoEShape, ...] = (FAIR_SHAPE, *THREE_WAY_SHAPES)
LAYER_VARIANTS = ("original", "optimized", "dense_same_active", "dense_same_total")
HF_VARIANTS = ("original", "optimized", "eager", "grouped_mm")

CPU_TOKENS = (128, 512)
CUDA_TOKENS = (1024, 8192)
HF_SEQUENCE_LENGTH = 64

TOKENS_ENV = "KERNEL_MOE_BENCH_TOKENS"
DEVICE_ENV = "KERNEL_MOE_BENCH_DEVICE"
COMPILE_ENV = "KERNEL_MOE_BENCH_COMPILE"
THREADS_ENV = "KERNEL_MOE_BENCH_THREADS"


def apply_thread_setting() -> None:
    """``torch.set_num_threads($KERNEL_MOE_BENCH_THREADS)`` when set (1 is steadiest on a shared CPU)."""
    text = os.environ.get(THREADS_ENV, "").strip()
    if not text:
        return
    if not text.isdigit() or int(text) < 1:
        raise ValueError(f"{THREADS_ENV}={text!r}; allowed: an int >= 1")
    torch.set_num_threads(int(text))


def bench_device() -> torch.device:
    """``$KERNEL_MOE_BENCH_DEVICE``, else CUDA when available, else CPU."""
    from kernel_moe.bench.device import resolve_device

    return resolve_device(os.environ.get(DEVICE_ENV) or None)


def token_counts(device: torch.device) -> tuple[int, ...]:
    """Tokens per call to sweep: ``$KERNEL_MOE_BENCH_TOKENS`` (comma-separated) or the device default."""
    text = os.environ.get(TOKENS_ENV, "").strip()
    if not text:
        return CUDA_TOKENS if device.type == "cuda" else CPU_TOKENS
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError as exc:
        raise ValueError(f"{TOKENS_ENV}={text!r}; allowed: comma-separated ints >= 1") from exc
    if not values or any(v < 1 for v in values):
        raise ValueError(f"{TOKENS_ENV}={text!r}; allowed: comma-separated ints >= 1")
    return values


def with_compiled(variants: tuple[str, ...]) -> tuple[str, ...]:
    """Add optimized+compiled when ``$KERNEL_MOE_BENCH_COMPILE=1`` (compilation is slow on CPU)."""
    if os.environ.get(COMPILE_ENV, "") == "1":
        return (*variants, "optimized+compiled")
    return variants

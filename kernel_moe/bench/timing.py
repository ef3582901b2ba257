"""Latency of calls: CUDA events on a GPU, ``time.perf_counter`` on a CPU.

- :func:`time_call`: seconds of one call.
- :func:`sample_block`: per-call latencies of one callable sampled back to back.
- :func:`sample_interleaved`: per-call latencies of several callables sampled round-robin.

How long to sample is a :class:`~kernel_moe.bench.settings.Timing` (``min_time_s``,
``min_samples``, ``max_samples``).
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from kernel_moe.bench.settings import Timing

Call = Callable[[], object]


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (a no-op on a CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _recorded(call: Call) -> tuple[torch.cuda.Event, torch.cuda.Event]:
    """CUDA events recorded on the current stream before and after one call."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    call()
    end.record()
    return start, end


def time_call(call: Call, device: torch.device) -> float:
    """Seconds of one call: CUDA events on a GPU, perf_counter on a CPU."""
    if device.type == "cuda":
        start, end = _recorded(call)
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    t0 = time.perf_counter()
    call()
    return time.perf_counter() - t0


def sample_block(call: Call, device: torch.device, timing: Timing) -> list[float]:
    """Per-call latencies of one callable sampled back to back. On CUDA the events of many
    calls are in flight at once (the host syncs every 64 calls), so launch gaps are hidden
    as they are in a real model."""
    synchronize(device)
    t_start = time.perf_counter()
    if device.type != "cuda":
        samples: list[float] = []
        while not timing.enough(len(samples), time.perf_counter() - t_start, timing.min_time_s):
            samples.append(time_call(call, device))
        return samples
    events = []
    while not timing.enough(len(events), time.perf_counter() - t_start, timing.min_time_s):
        events.append(_recorded(call))
        if len(events) % 64 == 0:
            events[-1][1].synchronize()
    synchronize(device)
    return [st.elapsed_time(en) / 1e3 for st, en in events]


def sample_interleaved(calls: list[Call], device: torch.device, timing: Timing) -> list[list[float]]:
    """Per-call latencies of several callables sampled round-robin, one call each per round,
    so that load from other processes on a shared machine hits every callable alike."""
    samples: list[list[float]] = [[] for _ in calls]
    t_start = time.perf_counter()
    budget = timing.min_time_s * len(calls)
    while not timing.enough(min(len(s) for s in samples), time.perf_counter() - t_start, budget):
        for call, out in zip(calls, samples, strict=True):
            out.append(time_call(call, device))
    return samples

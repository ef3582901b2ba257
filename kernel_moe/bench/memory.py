"""Peak memory of one call.

- CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``: everything the
  caching allocator handed out, weights and inputs included.
- CPU: the PyTorch profiler with ``profile_memory=True`` records every tensor allocation and
  free made during the call with its size and time; the running sum of those events gives the
  transient peak, to which the bytes already resident (weights, buffers, inputs) are added so
  that the figure means the same as on CUDA. This counts tensor bytes exactly, where the
  process's resident set size would also move with the allocator's caching, page faults and
  everything else in the process (and a sampling thread can miss a short peak).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass

import torch

logger = logging.getLogger("kernel_moe")

NOT_AVAILABLE = "not available"


@dataclass(frozen=True)
class MemoryReading:
    """Peak memory of one call, in bytes. ``peak_bytes`` is None when it could not be measured."""

    peak_bytes: int | None
    resident_bytes: int
    transient_peak_bytes: int | None
    method: str

    def __str__(self) -> str:
        if self.peak_bytes is None:
            return NOT_AVAILABLE
        return f"{self.peak_bytes / 2**20:.2f} MiB"

    def to_dict(self) -> dict:
        return asdict(self)


def tensor_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes of the distinct storages behind ``tensors`` (shared storages counted once)."""
    seen: set[int] = set()
    total = 0
    for t in tensors:
        if not isinstance(t, torch.Tensor) or t.device.type == "meta":
            continue
        storage = t.untyped_storage()
        key = storage.data_ptr()
        if key in seen and key != 0:
            continue
        seen.add(key)
        total += storage.nbytes()
    return total


def module_bytes(module: torch.nn.Module) -> int:
    """Bytes of a module's parameters and buffers."""
    return tensor_bytes([*module.parameters(), *module.buffers()])


def _profiled_transient_peak(fn: Callable[[], object]) -> int:
    """Peak of (bytes allocated - bytes freed) on CPU during ``fn()``, from profiler events."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [
        (e.start_ns(), e.nbytes())
        for e in prof.profiler.kineto_results.events()
        if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU
    ]
    events.sort(key=lambda item: item[0])
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak


def measure_peak_memory(
    fn: Callable[[], object],
    device: torch.device | str,
    resident_bytes: int = 0,
) -> MemoryReading:
    """Peak memory of one call of ``fn`` on ``device``.

    ``resident_bytes`` (CPU only) is what the call's inputs and the model already hold; on CUDA
    the allocator's own count of live bytes before the call is used instead.
    """
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        before = torch.cuda.memory_allocated(dev)
        fn()
        torch.cuda.synchronize(dev)
        peak = torch.cuda.max_memory_allocated(dev)
        return MemoryReading(peak, before, peak - before, "cuda_max_memory_allocated")
    if dev.type == "cpu":
        try:
            transient = _profiled_transient_peak(fn)
        except (AttributeError, RuntimeError) as exc:
            logger.info("memory: profiler memory events unavailable (%s)", exc)
            return MemoryReading(None, resident_bytes, None, NOT_AVAILABLE)
        return MemoryReading(resident_bytes + transient, resident_bytes, transient, "torch_profiler")
    return MemoryReading(None, resident_bytes, None, NOT_AVAILABLE)

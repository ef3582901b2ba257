"""Peak memory of one call.

- CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``: everything the
  caching allocator handed out, weights and inputs included.
- CPU: the PyTorch profiler with ``profile_memory=True`` records every tensor allocation and
  free made during the call with its size and time; the running sum of those events gives the
  transient peak, to which the bytes already resident (weights, buffers, inputs) are added so
  that the figure means the same as on CUDA. This counts tensor bytes exactly, where the
  process's resident set size would also move with the allocator's caching, page faults and
  everything else in the process (and a sampling thread can miss a short peak).

Starting and stopping the profiler makes its C++ side (Kineto) write a ``profiler_start`` /
``profiler_stop`` log line straight to the process's stderr file descriptor, once per
measurement. Those two calls run with file descriptors 1 and 2 pointed at temporary files;
afterwards everything they caught except those lines is written back where it was going.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
import tempfile
from collections.abc import Callable, Iterable, Iterator
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


# Kineto's own log lines for a profiler start / stop, e.g.
# "USDT:2026-12-02 08:12:46 14481:14481 SyncActivityProfilerHandler.cpp:52] profiler_start"
PROFILER_LOG_LINE = re.compile(rb"^[A-Z]+:[^\n]*\.cpp:\d+\] profiler_(start|stop)\r?\n?$")


def _flush_python_streams() -> None:
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(AttributeError, OSError, ValueError):
            stream.flush()


def _write_all(fd: int, data: bytes) -> None:
    while data:
        data = data[os.write(fd, data) :]


@contextlib.contextmanager
def without_profiler_log_lines() -> Iterator[None]:
    """Run the body with file descriptors 1 and 2 caught in temporary files, then write what
    was caught back to them, less the profiler's start / stop log lines (see the module
    docstring). A descriptor that is not open is left alone."""
    _flush_python_streams()
    caught: list[tuple[int, int, object]] = []  # (fd, saved copy, temporary file)
    try:
        for fd in (1, 2):
            tmp = tempfile.TemporaryFile()
            try:
                saved = os.dup(fd)
            except OSError:
                tmp.close()
                continue
            caught.append((fd, saved, tmp))
            os.dup2(tmp.fileno(), fd)
        yield
    finally:
        _flush_python_streams()
        for fd, saved, tmp in caught:
            os.dup2(saved, fd)
            os.close(saved)
            tmp.seek(0)
            kept = [line for line in tmp.read().splitlines(keepends=True) if not PROFILER_LOG_LINE.match(line)]
            tmp.close()
            _write_all(fd, b"".join(kept))


def _profiled_transient_peak(fn: Callable[[], object]) -> int:
    """Peak of (bytes allocated - bytes freed) on CPU during ``fn()``, from profiler events.
    Only the profiler's start and stop run with the output caught: ``fn``'s own output is
    untouched."""
    from torch.profiler import ProfilerActivity, profile

    prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
    with without_profiler_log_lines():
        prof.__enter__()
    try:
        fn()
    finally:
        with without_profiler_log_lines():
            prof.__exit__(None, None, None)  # torch's profile ignores the exception
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

"""What machine a benchmark ran on, and that machine's measured ceilings.

:func:`measure_device_peaks` times a large matmul and a large copy on the device itself, so
that achieved TFLOP/s and GB/s are reported next to what the same device really reaches, and
any figure above them can be rejected as a measurement error.
"""

from __future__ import annotations

import os
import platform
import re
from dataclasses import asdict, dataclass

import torch

from kernel_moe.bench.timing import time_call


def resolve_device(device: torch.device | str | None) -> torch.device:
    """``device`` as a torch.device; None means CUDA when available, else CPU."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={str(dev)!r} but CUDA is not available; allowed: 'cpu' or None")
    return dev


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def device_name(device: torch.device | str) -> str:
    """Human-readable name: the GPU's name, or the CPU model with the torch thread count."""
    dev = torch.device(device)
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    threads = torch.get_num_threads()
    return f"{_cpu_name()} ({threads} thread{'s' if threads != 1 else ''})"


def device_slug(device: torch.device | str) -> str:
    """A folder-safe name for per-device results, e.g. 'nvidia-h100-80gb-hbm3' or 'cpu-amd-epyc-2t'."""
    dev = torch.device(device)
    if dev.type == "cuda":
        text = torch.cuda.get_device_name(dev)
    else:
        text = f"cpu {_cpu_name()} {torch.get_num_threads()}t"
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "unknown"


def environment(device: torch.device | str) -> dict:
    """Versions and machine facts stamped on every result."""
    info = {
        "device": str(torch.device(device)),
        "device_name": device_name(device),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }
    for module in ("triton", "transformers"):
        try:
            info[module] = __import__(module).__version__
        except ImportError:
            info[module] = None
    import kernel_moe

    info["kernel_moe"] = getattr(kernel_moe, "__version__", None)
    if torch.device(device).type == "cuda":
        info["cuda"] = torch.version.cuda
    return info


@dataclass(frozen=True)
class DevicePeaks:
    """Measured ceilings of a device: dense matmul TFLOP/s and copy GB/s (read + write)."""

    matmul_tflops: float
    copy_gbps: float
    dtype: str
    source: str

    def to_dict(self) -> dict:
        return asdict(self)


def _timed(fn, device: torch.device, repeats: int) -> float:
    """Fastest seconds per call of ``fn`` after one warm-up (a ceiling is the best rate seen)."""
    fn()
    return min(time_call(fn, device) for _ in range(repeats))


def measure_device_peaks(
    device: torch.device | str, dtype: torch.dtype | None = None, size: int | None = None, repeats: int = 10
) -> DevicePeaks:
    """Time a square matmul and a large copy on ``device``.

    Defaults: bf16 8192^3 matmul and a 1 GiB copy on CUDA; fp32 1024^3 and 64 MiB on CPU.
    """
    dev = torch.device(device)
    if dtype is None:
        dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    n = size or (8192 if dev.type == "cuda" else 1024)
    a = torch.randn(n, n, device=dev, dtype=dtype)
    b = torch.randn(n, n, device=dev, dtype=dtype)
    mm_s = _timed(lambda: torch.mm(a, b), dev, repeats)
    copy_bytes = (2**30) if dev.type == "cuda" else (2**26)
    src = torch.empty(copy_bytes // 4, device=dev, dtype=torch.float32).fill_(1.0)
    dst = torch.empty_like(src)
    copy_s = _timed(lambda: dst.copy_(src), dev, repeats)
    return DevicePeaks(
        matmul_tflops=2 * n**3 / mm_s / 1e12,
        copy_gbps=2 * copy_bytes / copy_s / 1e9,
        dtype=str(dtype).replace("torch.", ""),
        source="measured",
    )

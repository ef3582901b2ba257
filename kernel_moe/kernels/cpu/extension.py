"""The native CPU kernels (C++): built on first use by torch's C++ extension builder, cached, loaded.

- ``grouped_matvec.cpp`` multiplies each expert's few token rows with its weights, reading every
  weight row once at close to memory bandwidth: the CPU experts op's decode and small batches;
- ``quant_matvec.cpp`` does the same over int8 / fp8 / int4 weights, converted in registers;
- ``matvec_experts.cpp`` runs the whole forward of decode and small batches on those two (gather,
  projections, activation, weighted combine), its jobs on the OpenMP team PyTorch's last op left
  awake (``omp_team.h``) or on a pool of its own whose idle threads sleep (``pool.h``);
- ``fused_experts.cpp`` runs the whole forward of larger batches (gather, GEMMs on
  ``bf16_gemm.cpp`` for bf16, activation, weighted combine) as tasks of one expert's rows, run
  concurrently, one thread each, into a buffer kept between calls (``workspace.h``).

``kernels.h`` declares them and ``bindings.cpp`` makes the Python module. The build needs a C++
compiler and ninja and takes about a minute on two cores; the result is cached by torch
(``TORCH_EXTENSIONS_DIR``, default ``~/.cache/torch_extensions``) under a name that includes a
hash of the sources (and their folder), the compiler flags, the torch version and the CPU's
feature flags, since it is compiled for this CPU (``-march=native``). ``python -m kernel_moe build`` compiles it ahead of time.

``KERNEL_MOE_CPU_EXTENSION``: ``auto`` (default) builds or loads it on first use and falls
back to the PyTorch path, with one warning, when that fails; ``off`` never uses it;
``require`` raises when it cannot be built (CI uses this so that a broken build fails).
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import threading
from pathlib import Path
from types import ModuleType

import torch

logger = logging.getLogger("kernel_moe")

ENV = "KERNEL_MOE_CPU_EXTENSION"
SETTINGS = ("auto", "off", "require")
SOURCES = tuple(Path(__file__).with_name(name)
                for name in ("bindings.cpp", "grouped_matvec.cpp", "quant_matvec.cpp", "int4_bf16_matvec.cpp",
                             "bf16_gemm.cpp", "fused_experts.cpp", "matvec_experts.cpp"))
HEADERS = tuple(Path(__file__).with_name(name)
                for name in ("kernels.h", "pool.h", "quant_rows.h", "bf16_gemm.h", "experts_common.h",
                             "workspace.h", "omp_team.h"))
# hot loops aligned to 64 bytes: where a streaming loop lands relative to the instruction fetch
# blocks moved the same matrix-vector code by 10-15% from one build to the next (measured)
CFLAGS = ("-O3", "-march=native", "-fopenmp", "-falign-functions=64", "-falign-loops=64")

_lock = threading.Lock()
_UNTRIED = object()
_module: ModuleType | None | object = _UNTRIED  # the built module, None after a failed build
_failure = ""  # why the build failed


def extension_setting() -> str:
    """The validated value of ``KERNEL_MOE_CPU_EXTENSION`` (default ``auto``)."""
    value = os.environ.get(ENV, "auto").strip().lower()
    if value not in SETTINGS:
        raise ValueError(f"{ENV}={value!r} is not a valid setting; allowed: {', '.join(SETTINGS)}")
    return value


def cpu_extension() -> ModuleType | None:
    """The compiled module, or None when it is switched off or cannot be built here (the
    build is tried once per process)."""
    global _module, _failure
    setting = extension_setting()
    if setting == "off":
        return None
    if _module is _UNTRIED:
        with _lock:
            if _module is _UNTRIED:
                try:
                    _module = _build()
                except Exception as exc:  # no compiler, no ninja, unsupported platform, ...
                    _module = None
                    _failure = f"{type(exc).__name__}: {exc}".strip()[:2000]
                    if setting != "require":
                        logger.warning("kernel_moe: native CPU kernels unavailable, using the PyTorch path (%s)",
                                       _failure.splitlines()[0])
    if _module is None and setting == "require":
        raise RuntimeError(f"{ENV}=require but the CPU extension failed to build: {_failure}")
    return _module


def extension_status() -> str:
    """One line for ``python -m kernel_moe env``: loaded, off, or why it failed (builds if needed)."""
    if extension_setting() == "off":
        return f"off ({ENV}=off)"
    try:
        module = cpu_extension()
    except RuntimeError as exc:
        return f"failed: {exc}"
    if module is None:
        return f"unavailable: {_failure.splitlines()[0]}"
    return f"loaded ({module.__file__})"


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _build() -> ModuleType:
    from torch.utils.cpp_extension import load

    text = b"".join(path.read_bytes() for path in (*SOURCES, *HEADERS))
    # the sources' folder too: the build files name the source paths, so two checkouts sharing one
    # build folder would rebuild it for each other on every load
    key = hashlib.sha1(text + " ".join(CFLAGS).encode() + torch.__version__.encode()
                       + _cpu_flags().encode() + str(SOURCES[0].parent).encode()).hexdigest()[:12]
    logger.info("kernel_moe: loading the native CPU kernels (compiled once per machine, about a minute)")
    return load(
        name=f"kernel_moe_cpu_{key}",
        sources=[str(path) for path in SOURCES],
        extra_cflags=list(CFLAGS),
        extra_ldflags=["-fopenmp"],
        verbose=False,
    )


__all__ = ["ENV", "SETTINGS", "cpu_extension", "extension_setting", "extension_status"]

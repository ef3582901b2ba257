"""The expert computation's backends, peers under one contract (:mod:`kernel_moe.kernels.contract`),
and the one selector that picks a backend for a call.

- ``kernels/cpu``: the native CPU kernels (C++, compiled on first use) and the CPU strategy
  code around them; a PyTorch path runs where the kernels cannot be built, and on any device.
- ``kernels/triton``: the Triton kernels (CUDA; CPU tensors through Triton's interpreter).

Backend names (``KernelConfig.backend`` and the ops' ``backend`` argument): "auto" (Triton on
CUDA when triton is installed, the CPU backend otherwise), "triton", "cpu". "torch" is the
deprecated name of "cpu".

Importing this package imports neither triton nor a compiled extension.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import os
import warnings
from typing import Any

import torch

from kernel_moe.errors import UnsupportedInputError
from kernel_moe.kernels.contract import ExpertsBackend

BACKENDS = ("auto", "triton", "cpu")
DEPRECATED_BACKENDS = {"torch": "cpu"}
_TRUE = ("1", "true", "on")


@functools.cache
def triton_available() -> bool:
    """True when the triton package can be imported (it is not imported here; cached, since the
    lookup searches the file system)."""
    return importlib.util.find_spec("triton") is not None


def triton_interpreter_enabled() -> bool:
    """True when ``TRITON_INTERPRET`` is set the way triton reads it (1, true or on, any case):
    Triton kernels then run on CPU tensors through the interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in _TRUE


def canonical_backend(requested: str) -> str:
    """The backend name with deprecated aliases resolved (warns once for "torch"); raises
    ValueError naming the allowed names for anything else."""
    if requested in DEPRECATED_BACKENDS:
        new = DEPRECATED_BACKENDS[requested]
        warnings.warn(f"backend={requested!r} is deprecated; use backend={new!r}", DeprecationWarning, stacklevel=3)
        return new
    if requested not in BACKENDS:
        raise UnsupportedInputError(f"backend={requested!r} is not supported; allowed: {', '.join(BACKENDS)}")
    return requested


def resolve_backend(requested: str, device: torch.device) -> str:
    """The backend that runs a call on ``device``: "triton" or "cpu".

    "auto" picks Triton on CUDA when triton is installed, the CPU backend otherwise. "triton" on a
    CPU tensor needs TRITON_INTERPRET=1 (set before triton is imported) and raises a clear error
    otherwise.
    """
    requested = canonical_backend(requested) if requested not in ("auto", "cpu", "triton") else requested
    if requested == "cpu":
        return "cpu"
    if requested == "auto":
        return "triton" if device.type == "cuda" and triton_available() else "cpu"
    if not triton_available():
        raise UnsupportedInputError("backend='triton' needs the triton package, which is not installed")
    if device.type == "cpu" and not triton_interpreter_enabled():
        raise UnsupportedInputError(
            "backend='triton' on CPU tensors needs TRITON_INTERPRET=1 in the environment before triton is "
            "imported; use backend='cpu' or 'auto' for the CPU path"
        )
    if device.type not in ("cpu", "cuda"):
        raise UnsupportedInputError(f"backend='triton' does not support device {device.type!r}; allowed: cuda, cpu")
    return "triton"


_BACKEND_MODULES = {"cpu": "kernel_moe.kernels.cpu.backend", "triton": "kernel_moe.kernels.triton.backend"}
_backends: dict[str, ExpertsBackend] = {}


def select_backend(requested: str, device: torch.device) -> ExpertsBackend:
    """The backend object for a call (see :func:`resolve_backend`); imported on first use."""
    name = resolve_backend(requested, device)
    backend = _backends.get(name)
    if backend is None:
        backend = _backends[name] = importlib.import_module(_BACKEND_MODULES[name]).BACKEND
    return backend


# deprecated names kept for one release: the Triton entry points lived at this package's top level
_LAZY = {
    "topk_gating": "kernel_moe.kernels.triton.routing",
    "align_by_expert": "kernel_moe.kernels.triton.routing",
    "AlignedRouting": "kernel_moe.kernels.triton.routing",
    "fused_experts_triton": "kernel_moe.kernels.triton.forward",
    "moe_up_projection": "kernel_moe.kernels.triton.forward",
    "moe_down_projection": "kernel_moe.kernels.triton.forward",
    "fused_experts_backward_triton": "kernel_moe.kernels.triton.backward",
    "default_backward_config": "kernel_moe.kernels.triton.backward",
    "config_file_name": "kernel_moe.kernels.triton.tile_configs",
    "default_kernel_config": "kernel_moe.kernels.triton.tile_configs",
    "get_kernel_config": "kernel_moe.kernels.triton.tile_configs",
    "validate_kernel_config": "kernel_moe.kernels.triton.tile_configs",
}

__all__ = [
    "BACKENDS",
    "canonical_backend",
    "resolve_backend",
    "select_backend",
    "triton_available",
    "triton_interpreter_enabled",
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'kernel_moe.kernels' has no attribute {name!r}")
    target = {"config_file_name": "tile_config_file_name", "default_kernel_config": "default_tile_config",
              "get_kernel_config": "get_tile_config", "validate_kernel_config": "validate_tile_config"}.get(name, name)
    value = getattr(importlib.import_module(module), target)
    globals()[name] = value
    return value

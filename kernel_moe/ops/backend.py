"""Which implementation runs an op for a given tensor: the Triton kernels or the PyTorch path."""

from __future__ import annotations

import functools
import importlib.util
import os

import torch

from kernel_moe.errors import UnsupportedInputError


@functools.cache
def triton_available() -> bool:
    """True when the triton package can be imported (it is never imported here; cached, since
    the lookup searches the file system)."""
    return importlib.util.find_spec("triton") is not None


def triton_interpreter_enabled() -> bool:
    """True when TRITON_INTERPRET=1, so Triton kernels run on CPU tensors."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def resolve_backend(requested: str, device: torch.device) -> str:
    """Map a requested backend ("auto" | "triton" | "torch") to "triton" or "torch" for a device.

    "auto" picks the Triton kernels on CUDA when triton is installed and the PyTorch path
    otherwise. "triton" on a CPU tensor needs TRITON_INTERPRET=1 (set before triton is
    imported) and raises a clear error otherwise.
    """
    if requested == "torch":
        return "torch"
    if requested == "auto":
        return "triton" if device.type == "cuda" and triton_available() else "torch"
    if requested != "triton":
        raise UnsupportedInputError(f"backend={requested!r} is not supported; allowed: auto, triton, torch")
    if not triton_available():
        raise UnsupportedInputError("backend='triton' needs the triton package, which is not installed")
    if device.type == "cpu" and not triton_interpreter_enabled():
        raise UnsupportedInputError(
            "backend='triton' on CPU tensors needs TRITON_INTERPRET=1 in the environment before triton is "
            "imported; use backend='torch' or 'auto' for the CPU path"
        )
    if device.type not in ("cpu", "cuda"):
        raise UnsupportedInputError(f"backend='triton' does not support device {device.type!r}; allowed: cuda, cpu")
    return "triton"

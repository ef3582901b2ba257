"""Which implementation runs an op for a given tensor: the Triton kernels or the PyTorch path,
and whether a call may skip the custom-op dispatcher."""

from __future__ import annotations

import functools
import importlib.util
import os

import torch
from torch import nn
from torch.utils._python_dispatch import _get_current_dispatch_mode

from kernel_moe.errors import UnsupportedInputError

_PLAIN_TENSOR_TYPES = (torch.Tensor, nn.Parameter)


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


def direct_call_allowed(*tensors: torch.Tensor | None) -> bool:
    """True when an op's implementation may run without the ``torch.library`` dispatcher.

    The dispatcher (tens of microseconds a call on CPU) is what graph capture, fake
    tensors and autograd need. Plain eager inference needs none of it: no compile or
    trace in progress, no dispatch mode or functorch transform active, only plain tensors,
    and none of them needing a gradient.
    """
    if torch.compiler.is_compiling() or torch.jit.is_tracing() or _get_current_dispatch_mode() is not None:
        return False
    if torch._C._functorch.peek_interpreter_stack() is not None:
        return False
    grad = torch.is_grad_enabled()
    for t in tensors:
        if t is None:
            continue
        if type(t) not in _PLAIN_TENSOR_TYPES or (grad and t.requires_grad):
            return False
    return True

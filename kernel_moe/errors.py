"""Exception types raised by kernel_moe.

Every user-facing error names the offending field or input, the value received and what
is allowed, so that a misconfiguration never turns into silently wrong numbers.
"""

from __future__ import annotations


class KernelMoEError(Exception):
    """Base class of every error raised by kernel_moe."""


class UnsupportedModuleError(KernelMoEError):
    """A module cannot be swapped (raised by ``optimize(strict=True)``)."""


class UnsupportedInputError(KernelMoEError, ValueError):
    """An input tensor or argument has a shape, dtype or device the op does not accept."""

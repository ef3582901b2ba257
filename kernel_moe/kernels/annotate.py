"""Named profiler ranges for the stages of an MoE layer's forward and backward.

``with stage(UP): ...`` opens a ``torch.profiler.record_function`` range named
"kernel_moe.up" while a PyTorch profiler runs, and nothing otherwise: without a profiler
:func:`stage` reads one Python flag and returns one shared no-op context (a decode call of the
optimized layer opens six ranges: one per stage). Under ``torch.compile`` it returns a no-op
context too, so the ranges never break a graph (Dynamo would drop them anyway); inside the custom ops, which the
compiler does not trace, they still open at run time.

``python -m kernel_moe profile`` (:mod:`kernel_moe.bench.profile`) reads these ranges to tell
where a layer's time goes; anyone profiling a model with ``torch.profiler`` sees them in the
trace. The stages (``STAGE_RANGES`` maps each range name to its stage key):

- ``router``: router logits; ``gating``: scores, top-k, renormalisation, capacity;
- ``dispatch``: sorting slots by expert, gathering token rows;
- ``up``: up-projection with the activation; ``down``: down-projection;
- ``combine``: routing-weight scaling and the sum over each token's experts;
- ``fused``: one native call doing gather, up-projection, activation, down-projection and
  combine (the CPU backend's fused forward), which cannot be split from outside.
"""

from __future__ import annotations

import contextlib

import torch
import torch.autograd.profiler as _autograd_profiler
from torch.autograd.profiler import record_function

ROUTER = "kernel_moe.router"
GATING = "kernel_moe.gating"
DISPATCH = "kernel_moe.dispatch"
UP = "kernel_moe.up"
DOWN = "kernel_moe.down"
COMBINE = "kernel_moe.combine"
FUSED = "kernel_moe.experts_fused"

STAGE_RANGES = {ROUTER: "router", GATING: "gating", DISPATCH: "dispatch", UP: "up", DOWN: "down",
                COMBINE: "combine", FUSED: "fused"}

_NO_RANGE = contextlib.nullcontext()
_dynamo_compiling = torch.compiler.is_dynamo_compiling


def stage(name: str) -> contextlib.AbstractContextManager:
    """A profiler range named ``name`` while a PyTorch profiler runs (and nothing is being
    compiled); otherwise a shared no-op context.

    Without a profiler this reads ``torch.autograd.profiler._is_profiler_enabled``, the Python
    flag that torch's profilers (``torch.profiler.profile``, ``emit_nvtx``, ``emit_itt``) set
    while they run, for such fast checks; asking the C++ side instead cost about 2% of a small
    layer's decode call, side by side. Dynamo stops at the first check, so a compiled graph
    holds no guard on the flag (starting a profiler recompiles nothing).
    """
    if _dynamo_compiling():  # False in eager; Dynamo reads it as True while tracing
        return contextlib.nullcontext()  # a fresh one: Dynamo traces its creation, not a global object
    if not _autograd_profiler._is_profiler_enabled:
        return _NO_RANGE
    return record_function(name)


__all__ = ["COMBINE", "DISPATCH", "DOWN", "FUSED", "GATING", "ROUTER", "STAGE_RANGES", "UP", "stage"]

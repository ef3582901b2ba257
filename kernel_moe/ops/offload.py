"""``kernel_moe::offloaded_experts``: the experts of an offloaded layer as one custom op, so that a
model with offloaded experts compiles whole (``torch.compile(fullgraph=True)``).

An offloaded layer decides on the host which experts to copy into its slots (it reads the routed
ids), which a compiled graph cannot trace; the op hides that: the graph sees one node with output
shape ``x.shape``. The layer registers a runner, ``(x [T, H], weights [T, K], ids [T, K]) -> [T, H]``,
and passes its handle (an int) to the op. Inference only: the op has no backward (the layer raises
before a call that autograd would record).

Legend: T tokens, H hidden, K top-k.
"""

from __future__ import annotations

import itertools
import weakref
from collections.abc import Callable

import torch
from torch import Tensor

from kernel_moe.errors import KernelMoEError

Runner = Callable[[Tensor, Tensor, Tensor], Tensor]
_RUNNERS: dict[int, Callable[[], Runner | None]] = {}  # handle -> weak reference to the runner
_NEXT = itertools.count(1)


def register_runner(runner: Runner) -> int:
    """A handle for ``runner`` (a bound method, held weakly: the layer owns it)."""
    handle = next(_NEXT)
    _RUNNERS[handle] = weakref.WeakMethod(runner)
    weakref.finalize(runner.__self__, _RUNNERS.pop, handle, None)
    return handle


@torch.library.custom_op("kernel_moe::offloaded_experts", mutates_args=())
def offloaded_experts(x: Tensor, topk_weights: Tensor, topk_ids: Tensor, handle: int) -> Tensor:
    """x [T, H], topk_weights / topk_ids [T, K], the handle of an offloaded layer's runner -> [T, H]."""
    ref = _RUNNERS.get(handle)
    runner = ref() if ref is not None else None
    if runner is None:
        raise KernelMoEError(f"kernel_moe::offloaded_experts: no offloaded layer has handle {handle} (it was freed)")
    return runner(x, topk_weights, topk_ids)


@offloaded_experts.register_fake
def _offloaded_experts_fake(x, topk_weights, topk_ids, handle):
    return x.new_empty(x.shape)


__all__ = ["offloaded_experts", "register_runner"]

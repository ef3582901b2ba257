"""Where the time of one MoE layer call goes: the profiler's events of a call, attributed to stages.

The stages (:data:`STAGES`, in the order of a forward): router logits, gating (scores, top-k,
renormalisation, capacity), dispatch / sort, up-projection with the activation,
down-projection, the CPU backend's fused call (gather, up, activation, down and combine in one
native call, which cannot be split from outside), combine, shared expert, and "other" so that
the stages add up to the call.

How a call's events are attributed:

- Ranges that our layers and kernels open (:mod:`kernel_moe.kernels.annotate`) name their
  stage; everything inside them belongs to it, unless a nested range names another.
- :func:`module_ranges` opens a range around the block's sub-modules by role: the router
  module (``gate`` / ``router``), the experts (``experts``: one stacked module, or each expert
  of a ``ModuleList`` and that expert's up / down ``Linear`` children) and the shared expert
  (``shared_expert*``). In the original block, matrix products inside the router module are
  the router and the rest of it is gating; an expert's up / down ``Linear`` is the up / down
  projection and its other ops (activation, gating product) the up stage; the shared expert is
  its own stage.
- The original block's other ops are attributed by op, in call order: matrix products
  alternate up / down; index_add / scatter_add (and output buffers) are combine; where /
  nonzero / one_hot / sort / bincount start a dispatch; other ops belong to the phase they
  follow (gating before the first dispatch, up after an up-projection, combine after a
  down-projection). In the optimized layer, ops outside our ranges are "other" (the layer's
  own overhead), except those following a shared-expert module (its gate and sum).

On CPU a stage's time is the wall time of its events (each event's own time, less its
children's); on CUDA it is the device time of the kernels its events launched, and "other"
holds the launch gaps.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.autograd.profiler import record_function

from kernel_moe.kernels.annotate import STAGE_RANGES

STAGES: tuple[tuple[str, str], ...] = (
    ("router", "router (logits)"),
    ("gating", "gating (scores, top-k, renorm, capacity)"),
    ("dispatch", "dispatch / sort"),
    ("up", "up-projection + activation"),
    ("down", "down-projection"),
    ("fused", "experts, fused up+act+down+combine"),
    ("combine", "combine"),
    ("shared", "shared expert"),
    ("other", "other"),
)
STAGE_KEYS = tuple(k for k, _ in STAGES)
STAGE_LABELS = dict(STAGES)

STEP_RANGE = "kernel_moe.profile.step"
MODULE_RANGE = "kernel_moe.module."  # + role

MATMUL_OPS = frozenset({"aten::linear", "aten::matmul", "aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm",
                        "aten::_grouped_mm", "aten::einsum"})
COMBINE_OPS = frozenset({"aten::index_add_", "aten::index_add", "aten::scatter_add_", "aten::scatter_add",
                         "aten::index_put_", "aten::scatter_reduce_"})
BUFFER_OPS = frozenset({"aten::zeros_like", "aten::zeros", "aten::new_zeros", "aten::empty_like"})
DISPATCH_OPS = frozenset({"aten::where", "aten::nonzero", "aten::one_hot", "aten::argsort", "aten::sort",
                          "aten::bincount", "aten::histc", "aten::_unique2", "aten::masked_select", "aten::argwhere",
                          "aten::eq", "aten::greater", "aten::gt", "aten::item"})
# the stage that follows each phase's ops
_PHASE_STAGE = {"route": "gating", "dispatch": "dispatch", "up": "up", "down": "combine", "combine": "combine",
                "shared": "shared"}
# module roles whose whole range is one stage
_FIXED_ROLES = {"up_proj": "up", "down_proj": "down", "shared": "shared"}
_DOWN_NAMES = ("down", "w2", "fc2", "wo")
# the phase after a module range ends
_PHASE_AFTER = {"router": "route", "up_proj": "up", "down_proj": "down", "expert": "combine", "shared": "shared"}


# ---------------------------------------------------------------------------------- module ranges
def module_roles(block: nn.Module) -> list[tuple[nn.Module, str]]:
    """(module, role) for the block's sub-modules that :func:`module_ranges` marks: "router",
    "experts" (stacked), "expert" (one of a ModuleList) with its "up_proj" / "down_proj"
    Linear children, "shared"."""
    roles: list[tuple[nn.Module, str]] = []
    for name, child in block.named_children():
        low = name.lower()
        if low in ("gate", "router") or low.endswith("router"):
            roles.append((child, "router"))
        elif low.startswith("shared_expert"):
            roles.append((child, "shared"))
        elif low == "experts" and isinstance(child, nn.ModuleList):
            for expert in child:
                roles.append((expert, "expert"))
                for sub_name, sub in expert.named_children():
                    if isinstance(sub, nn.Linear):
                        down = any(d in sub_name.lower() for d in _DOWN_NAMES)
                        roles.append((sub, "down_proj" if down else "up_proj"))
        elif low == "experts":
            roles.append((child, "experts"))
    return roles


@contextlib.contextmanager
def module_ranges(block: nn.Module) -> Iterator[None]:
    """Open a profiler range named "kernel_moe.module.<role>" around each call of the block's
    sub-modules (:func:`module_roles`) while the body runs; the hooks are removed after."""
    handles = []

    def hooks(role: str):
        open_ranges: list[record_function] = []

        def before(_module, _args):
            rf = record_function(MODULE_RANGE + role)
            rf.__enter__()
            open_ranges.append(rf)

        def after(_module, _args, _output):
            if open_ranges:
                open_ranges.pop().__exit__(None, None, None)

        return before, after

    try:
        for module, role in module_roles(block):
            before, after = hooks(role)
            handles.append(module.register_forward_pre_hook(before))
            handles.append(module.register_forward_hook(after))
        yield
    finally:
        for h in handles:
            h.remove()


# ---------------------------------------------------------------------------------- attribution
@dataclass
class _Walk:
    """The state of attributing one step's events: the phase of the original block's op
    sequence, whether loose ops are classified, and the seconds gathered per stage."""

    classify_ops: bool
    device_time: bool
    phase: str = "route"
    seconds: dict[str, float] = field(default_factory=lambda: dict.fromkeys(STAGE_KEYS, 0.0))


def _op_stage(name: str, walk: _Walk, context: str) -> str:
    """The stage of an op outside our stage ranges, in ``context`` (a module role or "block")."""
    if context == "router":
        return "router" if name in MATMUL_OPS else "gating"
    if not walk.classify_ops:
        return "shared" if walk.phase == "shared" else "other"
    if name in MATMUL_OPS:
        if walk.phase == "route" and context == "block":
            return "router"  # a router computed in the block itself
        walk.phase = "down" if walk.phase == "up" else "up"
        return walk.phase
    if name in COMBINE_OPS:
        walk.phase = "combine"
        return "combine"
    if name in BUFFER_OPS:
        return "combine"
    if name in DISPATCH_OPS:
        walk.phase = "dispatch"
        return "dispatch"
    stage = _PHASE_STAGE[walk.phase]
    if walk.phase == "down":
        walk.phase = "combine"
    return stage


def _own_time(ev, walk: _Walk) -> float:
    """Seconds of ``ev`` itself: wall time less its children's on CPU, its kernels on a device."""
    if walk.device_time:
        return sum(k.duration for k in getattr(ev, "kernels", ())) * 1e-6
    children = sum(c.time_range.elapsed_us() for c in ev.cpu_children)
    return max(0.0, ev.time_range.elapsed_us() - children) * 1e-6


def _visit(ev, walk: _Walk, stage: str | None, context: str) -> None:
    """Attribute ``ev`` and its children. ``stage``: the fixed stage of the enclosing range or
    op (None: classify); ``context``: the innermost module role ("block" when none)."""
    name = ev.name
    if name in STAGE_RANGES:
        stage = STAGE_RANGES[name]
    elif name.startswith(MODULE_RANGE):
        context = name[len(MODULE_RANGE):]
        stage = _FIXED_ROLES.get(context, "up" if context == "expert" else None)
    elif stage is None:  # an op: its children (the ops it calls) go with it
        stage = _op_stage(name, walk, context)
    walk.seconds[stage or "other"] += _own_time(ev, walk)
    for child in sorted(ev.cpu_children, key=lambda c: c.time_range.start):
        _visit(child, walk, stage, context)
    if name.startswith(MODULE_RANGE):
        walk.phase = _PHASE_AFTER.get(context, walk.phase)


def attribute_step(step, classify_ops: bool, device_time: bool = False) -> dict[str, float]:
    """Seconds per stage of one step range (an event named :data:`STEP_RANGE`); "other" takes
    the rest, so the stages add up to the step's wall time."""
    walk = _Walk(classify_ops, device_time)
    for child in sorted(step.cpu_children, key=lambda c: c.time_range.start):
        _visit(child, walk, None, "block")
    total = step.time_range.elapsed_us() * 1e-6
    if device_time:
        walk.seconds["other"] = 0.0
    walk.seconds["other"] += max(0.0, total - sum(walk.seconds.values()))
    return walk.seconds


def step_events(prof) -> list:
    """The step ranges of a finished ``torch.profiler.profile``, in call order."""
    steps = [e for e in prof.events() if e.name == STEP_RANGE and e.device_type == torch.autograd.DeviceType.CPU]
    return sorted(steps, key=lambda e: e.time_range.start)


__all__ = ["STAGES", "STAGE_KEYS", "STAGE_LABELS", "STEP_RANGE", "attribute_step", "module_ranges",
           "module_roles", "step_events"]

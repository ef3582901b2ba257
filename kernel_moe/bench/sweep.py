"""Parameter sweeps of the optimized MoE layer: top-k, capacity factor and number of experts
against throughput, expert utilization and dropped tokens (``python -m kernel_moe profile --sweep``).

The bench presets already draw throughput against tokens per call, the routed share of every
expert and the break-even with a dense FFN against the number of experts; none varies k or the
capacity factor, and none counts dropped tokens. Here each point is a hand-written MoE (the
bench's :class:`~kernel_moe.bench.models.NaiveMoE`, seeded) swapped by ``kernel_moe.optimize``
with a :class:`~kernel_moe.config.KernelConfig` carrying the point's capacity factor:

- top-k in :data:`SWEEP_TOP_K` and experts in :data:`SWEEP_EXPERTS`, at capacity factor
  :data:`SWEEP_FIXED_CAPACITY` (each expert takes its share of a balanced load, so that the
  imbalance shows as dropped slots);
- capacity factor in :data:`SWEEP_CAPACITY` (None: dropless) at the base shape.

Per point: throughput (tokens / median time of a call; on a CPU the points of one parameter are
timed round-robin, one call each per round), the load of the experts after capacity
(kept slots per expert, as max / mean and min / mean: 1 is balanced) and the share of
token-expert slots dropped.

Legend: H hidden, I expert intermediate, E experts, K top-k, T tokens, C capacity per expert.
"""

from __future__ import annotations

import os
import statistics
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from kernel_moe.bench.calls import InputMaker, make_call
from kernel_moe.bench.models import NaiveMoE
from kernel_moe.bench.presets import MoEShape
from kernel_moe.bench.settings import BenchSettings, Inputs, Timing
from kernel_moe.bench.stats import LoadBalance
from kernel_moe.bench.timing import sample_block, sample_interleaved
from kernel_moe.bench.variants import VariantBuilder
from kernel_moe.config import KernelConfig
from kernel_moe.routing.capacity import expert_capacity

SWEEP_BASE = MoEShape(hidden=256, intermediate=512, num_experts=8, top_k=2)
SWEEP_TOP_K = (1, 2, 4)
SWEEP_CAPACITY = (None, 0.5, 1.0, 1.25, 1.5, 2.0)
SWEEP_EXPERTS = (4, 8, 16, 32)
SWEEP_FIXED_CAPACITY = 1.0
PARAMETERS = (("top_k", "top-k"), ("capacity_factor", "capacity factor"), ("num_experts", "number of experts"))


@dataclass(frozen=True)
class SweepPoint:
    """One measured point: which parameter it varies, the shape, and what was measured."""

    parameter: str
    shape: MoEShape
    capacity_factor: float | None
    tokens: int
    median_s: float
    kept_E: tuple[int, ...]  # slots each expert computed (after capacity)
    dropped: int  # token-expert slots dropped

    @property
    def value(self):
        return self.capacity_factor if self.parameter == "capacity_factor" else getattr(self.shape, self.parameter)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.median_s

    @property
    def dropped_share(self) -> float:
        return self.dropped / (self.tokens * self.shape.top_k)

    @property
    def load(self) -> LoadBalance:
        return LoadBalance.from_counts(self.kept_E)

    @property
    def min_over_mean(self) -> float:
        mean = sum(self.kept_E) / len(self.kept_E)
        return min(self.kept_E) / mean if mean else 0.0

    def to_dict(self) -> dict:
        return {"parameter": self.parameter, "value": self.value, "shape": asdict(self.shape),
                "capacity_factor": self.capacity_factor, "tokens": self.tokens, "median_s": self.median_s,
                "tokens_per_s": self.tokens_per_s, "kept_per_expert": list(self.kept_E), "dropped": self.dropped,
                "dropped_share": self.dropped_share, "load": self.load.to_dict()}


def sweep_points() -> list[tuple[str, MoEShape, float | None]]:
    """(parameter, shape, capacity factor) of every point, in order."""
    base = SWEEP_BASE
    points = [("top_k", MoEShape(base.hidden, base.intermediate, base.num_experts, k), SWEEP_FIXED_CAPACITY)
              for k in SWEEP_TOP_K]
    points += [("capacity_factor", base, cf) for cf in SWEEP_CAPACITY]
    points += [("num_experts", MoEShape(base.hidden, base.intermediate, e, base.top_k), SWEEP_FIXED_CAPACITY)
               for e in SWEEP_EXPERTS]
    return points


def _prepare(point: tuple[str, MoEShape, float | None], tokens: int, device: torch.device, dtype: torch.dtype,
             timing: Timing) -> tuple:
    """The optimized layer of one point and its call on seeded inputs, warmed up."""
    _, shape, cf = point
    torch.manual_seed(0)
    block = NaiveMoE(shape.hidden, shape.intermediate, shape.num_experts, shape.top_k)
    settings = BenchSettings(optimize_config=KernelConfig.for_moe(capacity_factor=cf), progress=False)
    layer = VariantBuilder(block, device, dtype, settings, shape.label).build("optimized", "optimized").eager_module
    if not hasattr(layer, "dropped_tokens"):
        raise ValueError(f"sweep point {shape.label}: kernel_moe.optimize did not swap the block")
    inputs = InputMaker(block, Inputs(kind="hidden", hidden_size=shape.hidden), device, dtype).make(1, tokens)
    call = make_call(layer, inputs)
    for _ in range(1 + timing.warmup):
        call()
    return layer, call


def _routed(point: tuple[str, MoEShape, float | None], tokens: int, layer, call, median_s: float) -> SweepPoint:
    """The point's expert load after capacity and dropped slots, from one tracked call."""
    parameter, shape, cf = point
    layer.reset_routing_counts()
    layer.track_routing(True)
    try:
        call()
    finally:
        layer.track_routing(False)
    routed = layer.routing_counts.tolist()
    dropped = 0 if layer.dropped_tokens is None or cf is None else int(layer.dropped_tokens)
    kept = routed
    if cf is not None:
        capacity = expert_capacity(tokens, shape.top_k, shape.num_experts, cf)
        kept = [min(n, capacity) for n in routed]
    return SweepPoint(parameter, shape, cf, tokens, median_s, tuple(kept), dropped)


def run_sweep(tokens: int, device: torch.device, dtype: torch.dtype, timing: Timing) -> list[SweepPoint]:
    """Measure every point of :func:`sweep_points` at ``tokens`` tokens per call (torch threads:
    ``timing.num_threads`` when given). On a CPU the points of one swept parameter are timed
    round-robin, one call each per round, so that load from other processes hits them alike."""
    previous = torch.get_num_threads()
    if timing.num_threads is not None:
        torch.set_num_threads(timing.num_threads)
    measured: list[SweepPoint] = []
    try:
        for parameter, _ in PARAMETERS:
            points = [p for p in sweep_points() if p[0] == parameter]
            prepared = [_prepare(p, tokens, device, dtype, timing) for p in points]
            calls = [call for _, call in prepared]
            if device.type == "cuda":
                samples = [sample_block(call, device, timing) for call in calls]
            else:
                samples = sample_interleaved(calls, device, timing)
            measured += [_routed(p, tokens, layer, call, statistics.median(times))
                         for p, (layer, call), times in zip(points, prepared, samples, strict=True)]
            del prepared, calls
        return measured
    finally:
        torch.set_num_threads(previous)


def _value_text(point: SweepPoint) -> str:
    if point.parameter == "capacity_factor" and point.capacity_factor is None:
        return "dropless"
    return f"{point.value:g}"


def sweep_markdown(points: list[SweepPoint], command: str | None = None, facts: list[str] | None = None) -> str:
    """One table per swept parameter: throughput, load balance after capacity, dropped slots."""
    parts = ["## Parameter sweeps of the optimized MoE layer", ""]
    if command:
        parts += ["```", command, "```", ""]
    parts += [f"- {f}" for f in facts or []]
    base = SWEEP_BASE
    parts += [f"- base: {base.label}; the top-k and expert sweeps run at capacity factor {SWEEP_FIXED_CAPACITY:g}",
              "- load: slots each expert computed after capacity; max / mean and min / mean (1 = balanced), "
              "CV = standard deviation / mean", ""]
    for parameter, title in PARAMETERS:
        rows = [p for p in points if p.parameter == parameter]
        if not rows:
            continue
        parts += [f"### {title}", "", "| value | shape | ms / call | tokens/s | load max/mean | load min/mean | CV | "
                  "dropped slots |", "|---:|---|---:|---:|---:|---:|---:|---:|"]
        for p in rows:
            load = p.load
            parts.append(f"| {_value_text(p)} | {p.shape.label} | {p.median_s * 1e3:.3f} | {p.tokens_per_s:,.0f} | "
                         f"{load.max_over_mean or 0:.2f} | {p.min_over_mean:.2f} | {load.cv or 0:.2f} | "
                         f"{p.dropped} ({p.dropped_share:.1%}) |")
        parts.append("")
    return "\n".join(parts)


def plot_sweep(points: list[SweepPoint], path: str | os.PathLike, title: str = "") -> str:
    """A 3 x 3 grid: columns top-k, capacity factor, experts; rows throughput, expert load,
    dropped share."""
    from matplotlib.ticker import FuncFormatter

    from kernel_moe.bench.plots import _compact, _figure

    fig = _figure(12.0, 8.6)
    grid = fig.add_gridspec(3, len(PARAMETERS))
    for col, (parameter, label) in enumerate(PARAMETERS):
        rows = [p for p in points if p.parameter == parameter]
        xs = list(range(len(rows)))
        axes = [fig.add_subplot(grid[r, col]) for r in range(3)]

        def line(ax, values, **style):
            """The points, a dropless one apart (not joined to the capacity factors)."""
            apart = [i for i, p in enumerate(rows) if p.parameter == "capacity_factor" and p.capacity_factor is None]
            joined = [i for i in xs if i not in apart]
            ax.plot(joined, [values[i] for i in joined], **style)
            style.pop("label", None)
            ax.plot(apart, [values[i] for i in apart], linestyle="none", **style)

        line(axes[0], [p.tokens_per_s for p in rows], marker="o", color="#4c72b0")
        axes[0].yaxis.set_major_formatter(FuncFormatter(_compact))
        axes[0].set_ylim(0, max(p.tokens_per_s for p in rows) * 1.1)
        fixed = f"\n(capacity factor {SWEEP_FIXED_CAPACITY:g})" if parameter != "capacity_factor" else "\n"
        axes[0].set_title(label + fixed, fontsize=10)
        line(axes[1], [p.load.max_over_mean or 0.0 for p in rows], marker="^", color="#dd8452", label="busiest")
        line(axes[1], [p.min_over_mean for p in rows], marker="v", color="#55a868", label="idlest")
        axes[1].axhline(1.0, color="black", linewidth=0.8, linestyle="--")
        axes[1].set_ylim(0, max(max(p.load.max_over_mean or 0.0 for p in rows), 1.0) * 1.1)
        axes[1].legend(fontsize=7, loc="best")
        dropped = [p.dropped_share * 100 for p in rows]
        line(axes[2], dropped, marker="s", color="#c44e52")
        axes[2].yaxis.set_major_formatter(FuncFormatter(lambda v, _pos: f"{v:g}%"))
        axes[2].set_ylim(bottom=0, top=max(5.0, max(dropped) * 1.15))
        axes[2].set_xlabel(label)
        for ax in axes:
            ax.set_xticks(xs)
            ax.set_xticklabels([_value_text(p) for p in rows], fontsize=8)
            ax.grid(True, alpha=0.3)
        if col == 0:
            for ax, ylabel in zip(axes, ("throughput (tokens/s)", "expert load / mean load\n(after capacity)",
                                         "token-expert slots dropped"), strict=True):
                ax.set_ylabel(ylabel, fontsize=9)
    fig.suptitle(title or f"Optimized MoE layer: parameter sweeps around {SWEEP_BASE.label}", fontsize=11)
    fig.savefig(Path(path))
    return os.fspath(path)


__all__ = ["SWEEP_BASE", "SweepPoint", "plot_sweep", "run_sweep", "sweep_markdown", "sweep_points"]

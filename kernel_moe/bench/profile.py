"""Where the time of one MoE layer goes: each stage of a forward call, original vs optimized, from
the PyTorch profiler, checked against the same calls timed without it.

:func:`profile_layer` builds the two variants of one MoE block (the block as given and
``kernel_moe.optimize`` applied, each a copy), and for each token count:

1. warms both up, then, for each variant in turn, times calls without the profiler and runs a
   short profiler session (``session`` calls, each inside a step range, with the block's
   sub-modules marked: :func:`~kernel_moe.bench.stages.module_ranges`), until ``steps`` calls
   are profiled. Profiled and unprofiled calls thus alternate in short runs, so load from
   other processes on a shared machine hits both alike;
2. attributes every profiled call to stages (:mod:`kernel_moe.bench.stages`) and keeps the
   fastest half of the calls by total time (:func:`fastest_half`); a stage's time is its mean
   over them;
3. checks that those calls' mean total, which the stages add up to, lies within
   ``tolerance`` of the median of the fastest half of the unprofiled calls (the same
   selection, see :func:`fastest_half`): the profiler's own cost (about a
   microsecond per recorded op on a CPU) stays inside that for layers whose call takes
   milliseconds; decode-sized calls of a few hundred microseconds do not pass;
4. measures the peak memory of one call (:func:`~kernel_moe.bench.memory.measure_peak_memory`).

Legend: T tokens per call, H hidden size.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.autograd.profiler import record_function

from kernel_moe.bench.calls import InputMaker, infer_hidden_size, make_call
from kernel_moe.bench.device import environment, resolve_device
from kernel_moe.bench.memory import MemoryReading, measure_peak_memory, module_bytes, tensor_bytes, \
    without_profiler_log_lines
from kernel_moe.bench.settings import BenchSettings, Inputs
from kernel_moe.bench.stages import STAGE_KEYS, STEP_RANGE, attribute_step, module_ranges, step_events
from kernel_moe.bench.timing import synchronize, time_call
from kernel_moe.bench.variants import Variant, VariantBuilder

VARIANTS = ("original", "optimized")
DEFAULT_TOLERANCE = 0.10


def _fail(name: str, value: object, allowed: str) -> None:
    raise ValueError(f"ProfileSettings.{name}={value!r}; allowed: {allowed}")


@dataclass(frozen=True)
class ProfileSettings:
    """How :func:`profile_layer` measures.

    Args:
        steps: profiled calls per variant and token count.
        session: profiled calls per profiler session (each session also runs one call first
            that is not counted: the first call under a fresh profiler runs cold). Short sessions
            interleave profiled and unprofiled calls finely, which is what keeps the check
            steady on a machine shared with other work.
        unprofiled: calls timed without the profiler per profiled call, right before each session.
        warmup: calls of each variant before any measurement.
        threads: torch CPU threads during the run (None: leave as is; 1 is steadiest on a CPU
            shared with other work).
        tolerance: the largest relative gap allowed between the profiled calls' mean total and
            the unprofiled median.
        memory: measure the peak memory of one call per variant.
        seed: seed of the inputs.
    """

    steps: int = 20
    session: int = 1
    unprofiled: int = 2
    warmup: int = 3
    threads: int | None = None
    tolerance: float = DEFAULT_TOLERANCE
    memory: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        for name, low in (("steps", 1), ("session", 1), ("unprofiled", 1), ("warmup", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                _fail(name, value, f"an int >= {low}")
        if self.threads is not None and (isinstance(self.threads, bool) or not isinstance(self.threads, int)
                                         or self.threads < 1):
            _fail("threads", self.threads, "None or an int >= 1")
        if isinstance(self.tolerance, bool) or not isinstance(self.tolerance, (int, float)) or not (
                0 < self.tolerance < 1):
            _fail("tolerance", self.tolerance, "a number in (0, 1)")
        if not isinstance(self.memory, bool):
            _fail("memory", self.memory, "True or False")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            _fail("seed", self.seed, "an int")


@dataclass
class StageCase:
    """One variant of one block at one token count: seconds per call by stage and the check."""

    group: str
    variant: str
    tokens: int
    stages_s: dict[str, float]  # mean seconds per call of the kept profiled calls, every stage key
    profiled_s: float  # their mean total (the stages add up to it)
    measured_s: float  # median of the fastest half of the unprofiled calls
    steps: int  # profiled calls kept
    samples: int  # unprofiled calls timed
    memory: MemoryReading | None = None

    @property
    def gap(self) -> float:
        """profiled / measured - 1: the profiler's cost (and drift) relative to the real time."""
        return self.profiled_s / self.measured_s - 1.0

    def share(self, stage: str) -> float:
        return self.stages_s[stage] / self.profiled_s if self.profiled_s > 0 else 0.0

    @property
    def experts_path(self) -> str:
        """How the experts ran: as the fused native call, or split into up / down stages."""
        if self.stages_s["fused"] > 0:
            return "fused native call"
        return "split: up / down" if self.stages_s["up"] + self.stages_s["down"] > 0 else "-"

    def to_dict(self) -> dict:
        return {
            "group": self.group, "variant": self.variant, "tokens": self.tokens, "stages_s": dict(self.stages_s),
            "profiled_s": self.profiled_s, "measured_s": self.measured_s, "gap": self.gap, "steps": self.steps,
            "samples": self.samples, "experts_path": self.experts_path,
            "memory": None if self.memory is None else self.memory.to_dict(),
        }


@dataclass
class ProfileResults:
    """The cases of one or more profiled blocks, the environment, notes and the check's bound."""

    cases: list[StageCase] = field(default_factory=list)
    metadata: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    tolerance: float = DEFAULT_TOLERANCE

    def extend(self, other: ProfileResults) -> None:
        self.cases += other.cases
        self.notes += other.notes
        groups = {**self.metadata.get("groups", {}), **other.metadata.get("groups", {})}
        self.metadata = {**other.metadata, **self.metadata, "groups": groups}

    def groups(self) -> list[str]:
        return list(dict.fromkeys(c.group for c in self.cases))

    def tokens(self, group: str) -> list[int]:
        return sorted({c.tokens for c in self.cases if c.group == group})

    def case(self, group: str, variant: str, tokens: int) -> StageCase | None:
        return next((c for c in self.cases if (c.group, c.variant, c.tokens) == (group, variant, tokens)), None)

    @property
    def check_passed(self) -> bool:
        """Every case's profiled total within ``tolerance`` of its unprofiled median."""
        return all(abs(c.gap) <= self.tolerance for c in self.cases)

    def check_lines(self) -> list[str]:
        """One line per case: the stages' sum, the unprofiled time, their gap, ok / FAILED."""
        lines = []
        for c in self.cases:
            verdict = "ok" if abs(c.gap) <= self.tolerance else "FAILED"
            lines.append(f"{c.group} / {c.variant} / {c.tokens} tokens: stages add up to {c.profiled_s * 1e3:.3f} ms,"
                         f" measured without the profiler {c.measured_s * 1e3:.3f} ms (median of the fastest half of"
                         f" {c.samples} calls):"
                         f" {c.gap:+.1%} [{verdict}, bound {self.tolerance:.0%}]")
        return lines

    def to_dict(self) -> dict:
        return {"metadata": self.metadata, "tolerance": self.tolerance, "check_passed": self.check_passed,
                "cases": [c.to_dict() for c in self.cases], "notes": list(self.notes)}

    def to_markdown(self, command: str | None = None) -> str:
        from kernel_moe.bench.profile_report import profile_markdown

        return profile_markdown(self, command)

    def plot(self, path) -> str:
        """Write the stage chart PNG to ``path``; returns it (needs matplotlib)."""
        from kernel_moe.bench.profile_report import plot_stages

        return plot_stages(self, path)


# ---------------------------------------------------------------------------------- measuring
def _profiled_calls(call: Callable[[], object], variant: Variant, device: torch.device, n: int) -> list:
    """``n`` calls in one profiler session, each inside a step range, the block's sub-modules
    marked, after one uncounted call; returns (seconds per stage, total seconds) per call."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    prof = torch.profiler.profile(activities=activities)
    with module_ranges(variant.eager_module):
        with without_profiler_log_lines():
            prof.__enter__()
        try:
            call()
            synchronize(device)
            for _ in range(n):
                with record_function(STEP_RANGE):
                    call()
                    synchronize(device)
        finally:
            with without_profiler_log_lines():
                prof.__exit__(None, None, None)
    classify, device_time = variant.name == "original", device.type == "cuda"
    return [(attribute_step(ev, classify, device_time), ev.time_range.elapsed_us() * 1e-6)
            for ev in step_events(prof)]


def _timed(call: Callable[[], object], device: torch.device, n: int) -> list[float]:
    """Seconds of ``n`` calls without the profiler."""
    synchronize(device)
    return [time_call(call, device) for _ in range(n)]


def fastest_half(values: list, key: Callable = float) -> list:
    """The faster half of ``values`` by ``key`` (at least one). On a machine shared with other
    work, calls are now and then slowed several-fold by other processes (the times split into
    a fast and a slow group); the fastest half of the calls stands for the layer itself."""
    ordered = sorted(values, key=key)
    return ordered[: max(1, (len(ordered) + 1) // 2)]


def _case(group: str, variant: str, tokens: int, steps: list, samples: list[float]) -> StageCase:
    kept = fastest_half(steps, key=lambda s: s[1])
    stages = {k: statistics.fmean(s[0][k] for s in kept) for k in STAGE_KEYS}
    return StageCase(group, variant, tokens, stages, statistics.fmean(s[1] for s in kept),
                     statistics.median(fastest_half(samples)), len(kept), len(samples))


def _hidden_size(block: nn.Module) -> int | None:
    """H of the block's inputs: what the bench reads from the block (attributes, config, first
    Linear), else a ``hidden_dim`` / ``hidden_size`` of a sub-module (transformers routers and
    stacked experts hold one)."""
    found = infer_hidden_size(block)
    for module in block.modules():
        for attr in ("hidden_dim", "hidden_size"):
            value = getattr(module, attr, None)
            if found is None and isinstance(value, int) and not isinstance(value, bool) and value > 0:
                found = value
    return found


class _Layer:
    """One block's variants, inputs and calls on one device."""

    def __init__(self, block: nn.Module, device: torch.device, dtype: torch.dtype, settings: ProfileSettings,
                 group: str) -> None:
        builder = VariantBuilder(block, device, dtype, BenchSettings(progress=False), group)
        self.variants = [builder.build(v, v) for v in VARIANTS]
        hidden = _hidden_size(block)
        self.inputs = InputMaker(block, Inputs(kind="hidden", hidden_size=hidden, seed=settings.seed), device, dtype)
        self.device, self.settings, self.group = device, settings, group

    def measure(self, tokens: int) -> list[StageCase]:
        """Both variants at ``tokens`` tokens: warm-up; then, for each variant in turn, timed
        calls without the profiler followed by a profiler session, until ``steps`` calls are
        profiled (so that load from other processes hits both kinds of call alike); then the
        peak memory."""
        s, dev = self.settings, self.device
        inputs = self.inputs.make(1, tokens)
        calls = [make_call(v.run_module, inputs) for v in self.variants]
        for call in calls:
            for _ in range(1 + s.warmup):
                call()
        samples: list[list[float]] = [[] for _ in calls]
        steps: list[list] = [[] for _ in calls]
        done = 0
        while done < s.steps:
            n = min(s.session, s.steps - done)
            for i, (variant, call) in enumerate(zip(self.variants, calls, strict=True)):
                samples[i] += _timed(call, dev, s.unprofiled * n)
                steps[i] += _profiled_calls(call, variant, dev, n)
            done += n
        cases = [_case(self.group, v.name, tokens, steps[i], samples[i]) for i, v in enumerate(self.variants)]
        if s.memory:
            for case, variant, call in zip(cases, self.variants, calls, strict=True):
                resident = module_bytes(variant.eager_module) + tensor_bytes(inputs.values())
                case.memory = measure_peak_memory(call, dev, resident)
        return cases


def profile_layer(
    block: nn.Module,
    tokens: Sequence[int],
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    settings: ProfileSettings | None = None,
    name: str | None = None,
) -> ProfileResults:
    """Profile one MoE block (a module taking hidden states [B, S, H]) at each token count:
    original vs optimized, seconds per stage, the check against unprofiled timing, peak memory.

    The block itself is not changed (each variant is a deep copy). Raises ValueError for bad
    arguments, :class:`~kernel_moe.bench.variants.VariantUnavailable` when a variant cannot be
    built.
    """
    if not isinstance(block, nn.Module):
        raise ValueError(f"block={type(block).__name__}; allowed: an nn.Module")
    toks = list(tokens)
    if not toks or any(isinstance(t, bool) or not isinstance(t, int) or t < 1 for t in toks):
        raise ValueError(f"tokens={toks!r}; allowed: a non-empty list of ints >= 1")
    settings = ProfileSettings() if settings is None else settings
    if not isinstance(settings, ProfileSettings):
        raise ValueError(f"settings={settings!r}; allowed: None or a ProfileSettings")
    dev = resolve_device(device)
    dtype = dtype or next((p.dtype for p in block.parameters() if p.is_floating_point()), torch.float32)
    group = name or type(block).__name__
    previous = torch.get_num_threads()
    if settings.threads is not None:
        torch.set_num_threads(settings.threads)
    try:
        layer = _Layer(block, dev, dtype, settings, group)
        results = ProfileResults(tolerance=settings.tolerance)
        for t in toks:
            results.cases += layer.measure(t)
        results.metadata.update(environment(dev))
    finally:
        torch.set_num_threads(previous)
    results.metadata.update(
        dtype=str(dtype).replace("torch.", ""), steps=settings.steps, session=settings.session,
        unprofiled=settings.unprofiled,
        timer="cuda_events" if dev.type == "cuda" else "perf_counter",
        stage_time="device (kernels)" if dev.type == "cuda" else "wall (CPU)",
        groups={group: {"block": type(block).__name__,
                        "optimized": layer.variants[1].info.get("report", "")}},
    )
    if layer.variants[1].info.get("swapped") == 0:
        results.notes.append(f"{group}: kernel_moe.optimize swapped nothing; 'optimized' is the original block")
    return results


__all__ = ["ProfileResults", "ProfileSettings", "StageCase", "fastest_half", "profile_layer"]

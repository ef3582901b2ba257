"""How a benchmark runs, as one frozen value: :class:`BenchSettings` holds the timing, the
optional measurements, the inputs, how the optimized and compiled variants are built, and how
the results group is labelled. Every value validates itself on construction and raises
``ValueError`` naming the field, the value and what is allowed.

What to measure (the model, the sweep, the variants, the baselines) and where (device, dtype)
stay direct arguments of :class:`~kernel_moe.bench.runner.MoEBenchmark`; everything else is
passed whole::

    settings = BenchSettings(timing=Timing(min_time_s=0.2), measurements=Measurements(energy=False))
    MoEBenchmark(model, batch_sizes=[1, 8], sequence_lengths=[512], settings=settings)

Keywords that ``MoEBenchmark`` and ``run_preset`` took before these values existed still work,
as deprecated aliases: they are applied to the settings with a DeprecationWarning saying where
each one moved (:data:`MOVED_KEYWORDS`).
"""

from __future__ import annotations

import dataclasses
import functools
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

INPUT_KINDS = ("auto", "ids", "hidden")


def _fail(owner: str, name: str, value: object, allowed: str) -> None:
    raise ValueError(f"{owner}.{name}={value!r}; allowed: {allowed}")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclass(frozen=True)
class Timing:
    """How each case is timed.

    Args:
        warmup: calls after the first (timed separately as ``first_call_s``) before sampling.
        min_time_s: sample each case for at least this long (and at least ``min_samples`` calls).
        min_samples, max_samples: bounds on the number of timed calls per case.
        interleave: sample the variants of a shape round-robin (None: on CPU, where other
            processes share the cores; on CUDA each variant is timed back to back).
        num_threads: torch intra-op threads during the run (restored after). On a CPU shared
            with other busy processes, 1 avoids OpenMP barrier stalls that can make a
            multi-threaded call hundreds of times slower than usual.
    """

    warmup: int = 3
    min_time_s: float = 0.5
    min_samples: int = 5
    max_samples: int = 10_000
    interleave: bool | None = None
    num_threads: int | None = None

    def __post_init__(self) -> None:
        if not _is_int(self.warmup) or self.warmup < 0:
            _fail("Timing", "warmup", self.warmup, "an int >= 0")
        if not _is_number(self.min_time_s) or not self.min_time_s >= 0:
            _fail("Timing", "min_time_s", self.min_time_s, "a number >= 0")
        if not _is_int(self.min_samples) or self.min_samples < 1:
            _fail("Timing", "min_samples", self.min_samples, "an int >= 1")
        if not _is_int(self.max_samples) or self.max_samples < self.min_samples:
            _fail("Timing", "max_samples", self.max_samples, f"an int >= min_samples ({self.min_samples})")
        if self.interleave is not None and not isinstance(self.interleave, bool):
            _fail("Timing", "interleave", self.interleave, "None, True or False")
        if self.num_threads is not None and (not _is_int(self.num_threads) or self.num_threads < 1):
            _fail("Timing", "num_threads", self.num_threads, "None or an int >= 1")

    def enough(self, n: int, elapsed_s: float, budget_s: float) -> bool:
        """Whether ``n`` samples taken over ``elapsed_s`` seconds end the sampling."""
        return n >= self.max_samples or (n >= self.min_samples and elapsed_s >= budget_s)


@dataclass(frozen=True)
class Measurements:
    """Which measurements besides time each case gets.

    Args:
        memory: peak memory of one call.
        energy: energy per call over a window of at least ``energy_window_s`` seconds (the
            workload repeats until then), read from ``energy_meter`` (None: detected).
        routing: per-expert routing counts of the routed layers.
        check_outputs: compare the output of every equivalent variant with the original's.
    """

    memory: bool = True
    energy: bool = True
    energy_window_s: float = 1.0
    energy_meter: Any = None  # an EnergyMeter; None detects NVML / powercap
    routing: bool = True
    check_outputs: bool = True

    def __post_init__(self) -> None:
        for name in ("memory", "energy", "routing", "check_outputs"):
            if not isinstance(getattr(self, name), bool):
                _fail("Measurements", name, getattr(self, name), "True or False")
        if not _is_number(self.energy_window_s) or not self.energy_window_s > 0:
            _fail("Measurements", "energy_window_s", self.energy_window_s, "a number > 0")


@dataclass(frozen=True)
class Inputs:
    """The forward inputs of every case.

    Args:
        kind: "auto" (token ids when the model has an input embedding, else hidden states),
            "ids" or "hidden".
        hidden_size: H of hidden-state inputs (None: read from the model).
        seed: seed of the inputs (each shape draws its own from it).
    """

    kind: str = "auto"
    hidden_size: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if self.kind not in INPUT_KINDS:
            _fail("Inputs", "kind", self.kind, ", ".join(INPUT_KINDS))
        if self.hidden_size is not None and (not _is_int(self.hidden_size) or self.hidden_size < 1):
            _fail("Inputs", "hidden_size", self.hidden_size, "None or an int >= 1")
        if not _is_int(self.seed):
            _fail("Inputs", "seed", self.seed, "an int")


@dataclass(frozen=True)
class BenchSettings:
    """Everything about how a benchmark runs besides what it measures and where.

    Args:
        timing, measurements, inputs: see :class:`Timing`, :class:`Measurements`, :class:`Inputs`.
        optimize_config: passed to ``kernel_moe.optimize`` (None: its default).
        compile_kwargs: passed to ``torch.compile``.
        name: the group name of these cases in the results (None: the model's class name).
        annotations: JSON-serializable facts about this group (e.g. its MoE shape), stored in
            ``results.metadata["groups"][name]``.
        progress: show a tqdm progress bar when tqdm is installed.
    """

    timing: Timing = field(default_factory=Timing)
    measurements: Measurements = field(default_factory=Measurements)
    inputs: Inputs = field(default_factory=Inputs)
    optimize_config: Any = None
    compile_kwargs: Mapping[str, Any] = field(default_factory=dict)
    name: str | None = None
    annotations: Mapping[str, Any] = field(default_factory=dict)
    progress: bool = True

    def __post_init__(self) -> None:
        for name, kind in (("timing", Timing), ("measurements", Measurements), ("inputs", Inputs)):
            if not isinstance(getattr(self, name), kind):
                _fail("BenchSettings", name, getattr(self, name), f"a {kind.__name__}")
        for name in ("compile_kwargs", "annotations"):
            value = getattr(self, name)
            if not isinstance(value, Mapping):
                _fail("BenchSettings", name, value, "a dict")
            object.__setattr__(self, name, dict(value))  # a copy: the caller's dict may change later
        if self.name is not None and (not isinstance(self.name, str) or not self.name):
            _fail("BenchSettings", "name", self.name, "None or a non-empty str")
        if not isinstance(self.progress, bool):
            _fail("BenchSettings", "progress", self.progress, "True or False")


# keyword of the flat signature -> (part of BenchSettings, its field); None: BenchSettings' own
MOVED_KEYWORDS: dict[str, tuple[str | None, str]] = {
    "warmup": ("timing", "warmup"),
    "min_time_s": ("timing", "min_time_s"),
    "min_samples": ("timing", "min_samples"),
    "max_samples": ("timing", "max_samples"),
    "interleave": ("timing", "interleave"),
    "num_threads": ("timing", "num_threads"),
    "measure_memory": ("measurements", "memory"),
    "measure_energy": ("measurements", "energy"),
    "energy_window_s": ("measurements", "energy_window_s"),
    "energy_meter": ("measurements", "energy_meter"),
    "track_routing": ("measurements", "routing"),
    "check_outputs": ("measurements", "check_outputs"),
    "input_kind": ("inputs", "kind"),
    "hidden_size": ("inputs", "hidden_size"),
    "seed": ("inputs", "seed"),
    "optimize_config": (None, "optimize_config"),
    "compile_kwargs": (None, "compile_kwargs"),
    "name": (None, "name"),
    "annotations": (None, "annotations"),
    "progress": (None, "progress"),
}
_PART_CLASSES = {"timing": "Timing", "measurements": "Measurements", "inputs": "Inputs"}


def moved_keyword_hint(keyword: str) -> str:
    """Where a keyword of the flat signature lives now, as code."""
    part, name = MOVED_KEYWORDS[keyword]
    if part is None:
        return f"settings=BenchSettings({name}=...)"
    return f"settings=BenchSettings({part}={_PART_CLASSES[part]}({name}=...))"


def with_moved(settings: BenchSettings, moved: Mapping[str, Any]) -> BenchSettings:
    """``settings`` with the flat-signature keywords in ``moved`` applied to their new places."""
    parts: dict[str, dict[str, Any]] = {}
    own: dict[str, Any] = {}
    for keyword, value in moved.items():
        part, name = MOVED_KEYWORDS[keyword]
        (own if part is None else parts.setdefault(part, {}))[name] = value
    for part, fields in parts.items():
        own[part] = dataclasses.replace(getattr(settings, part), **fields)
    return dataclasses.replace(settings, **own)


def accepts_moved_keywords(default: Callable[[], BenchSettings]) -> Callable[[Callable], Callable]:
    """Keep the flat signature's keywords working as deprecated aliases: each one found is applied
    to ``settings`` (or to ``default()`` when none is given) with a DeprecationWarning saying
    where it lives now. Every other argument reaches the function as given, and
    ``inspect.signature`` shows the function's own signature."""

    def decorate(fn: Callable) -> Callable:
        label = fn.__qualname__.removesuffix(".__init__")

        @functools.wraps(fn)
        def translated(*args, **kwargs):
            moved = {k: kwargs.pop(k) for k in list(kwargs) if k in MOVED_KEYWORDS}
            if moved:
                where = "; ".join(f"{k}: {moved_keyword_hint(k)}" for k in moved)
                warnings.warn(f"{label}({', '.join(moved)}=...) is deprecated; use {where}", DeprecationWarning,
                              stacklevel=2)
                kwargs["settings"] = with_moved(kwargs.get("settings") or default(), moved)
            return fn(*args, **kwargs)

        return translated

    return decorate

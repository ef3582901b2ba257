"""Named benchmark sweeps, sized to run in about a minute each on a 2-core CPU by default.

Legend: H hidden size, E experts, K top-k, I expert intermediate size, T tokens per call.

- ``three_way``: a dense MLP with the same TOTAL parameters vs the naive MoE vs the optimized
  MoE, for several expert counts and sizes.
- ``fair``: the MoE (H 384, 8 experts of I 768, top-2) vs a dense FFN with the same ACTIVE
  parameters (I 1536) and one with the same TOTAL parameters (I 6144).
- ``break_even``: E from 4 to 64, two expert sizes, top-1 and top-2: the routing overhead
  (MoE time / dense-same-active time - 1) and whether the MoE beats the dense FFN of equal
  total parameters, measured and by the simple model k/E * (1 + overhead) < 1.
- ``hf``: tiny random-weight transformers Mixtral and Qwen2-MoE built from their config
  classes: original vs optimized vs optimized+compiled, with the "eager" and "grouped_mm"
  experts implementations as baselines.

``tokens`` scales every preset (tokens per forward call; several values make a sweep). The
module presets take hidden states [1, T, H]; ``hf`` takes token ids in sequences of 64, so T is
rounded down to a multiple of 64 (at least one sequence).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, replace

import torch

from kernel_moe.bench.models import NaiveMoE, dense_same_active, dense_same_total
from kernel_moe.bench.results import BenchmarkResults
from kernel_moe.bench.runner import MoEBenchmark
from kernel_moe.bench.settings import BenchSettings, Timing, accepts_moved_keywords

logger = logging.getLogger("kernel_moe")


@dataclass(frozen=True)
class MoEShape:
    """One MoE layer shape: hidden H, expert intermediate I, E experts, top-K."""

    hidden: int
    intermediate: int
    num_experts: int
    top_k: int

    @property
    def label(self) -> str:
        return f"H{self.hidden} E{self.num_experts} I{self.intermediate} top{self.top_k}"


THREE_WAY_SHAPES = (
    MoEShape(256, 256, 8, 2),
    MoEShape(256, 128, 16, 2),
    MoEShape(256, 64, 32, 4),
)
FAIR_SHAPE = MoEShape(384, 768, 8, 2)
BREAK_EVEN_EXPERTS = (4, 8, 16, 32, 64)
BREAK_EVEN_INTERMEDIATE = (64, 256)
BREAK_EVEN_TOP_K = (1, 2)
BREAK_EVEN_HIDDEN = 256


# presets sample each case for less time than a single MoEBenchmark does by default
PRESET_SETTINGS = BenchSettings(timing=Timing(warmup=2, min_time_s=0.2))


@dataclass(frozen=True)
class PresetOptions:
    """What every benchmark of a preset run shares: the token counts, where to run, whether
    to add the compiled variant, and the settings of each benchmark."""

    tokens: tuple[int, ...]
    device: torch.device | str | None = None
    dtype: torch.dtype | None = None
    compile: bool = False
    settings: BenchSettings = PRESET_SETTINGS

    @property
    def seed(self) -> int:
        """Seed of the preset's models and of their inputs."""
        return self.settings.inputs.seed

    def settings_for(self, name: str, annotations: dict | None = None, measure_memory: bool = True) -> BenchSettings:
        """The settings of one group: its name and annotations, memory off when asked."""
        measurements = self.settings.measurements
        if not measure_memory:
            measurements = replace(measurements, memory=False)
        annotations = {**self.settings.annotations, **(annotations or {})}
        return replace(self.settings, name=name, annotations=annotations, measurements=measurements)


@dataclass(frozen=True)
class Preset:
    """A named sweep: ``build`` yields the benchmarks one at a time (so only one group's models
    are alive at once), ``analyze`` adds derived tables to the combined results."""

    name: str
    description: str
    default_tokens: tuple[int, ...]
    build: Callable[[PresetOptions], Iterator[MoEBenchmark]]
    analyze: Callable[[BenchmarkResults], None] | None = None


def _moe(shape: MoEShape, seed: int) -> NaiveMoE:
    torch.manual_seed(seed)
    return NaiveMoE(shape.hidden, shape.intermediate, shape.num_experts, shape.top_k)


def _moe_variants(opts: PresetOptions) -> tuple[str, ...]:
    return ("original", "optimized", "optimized+compiled") if opts.compile else ("original", "optimized")


def _dense_factory(kind: str, shape: MoEShape, seed: int) -> Callable[[], torch.nn.Module]:
    build = dense_same_active if kind == "active" else dense_same_total

    def factory() -> torch.nn.Module:
        torch.manual_seed(seed)
        return build(shape.hidden, shape.intermediate, shape.num_experts, shape.top_k)

    factory.__name__ = f"dense_same_{kind}"
    return factory


def _module_bench(
    shape: MoEShape, opts: PresetOptions, dense: Sequence[str], measure_memory: bool = True
) -> MoEBenchmark:
    baselines = [(f"dense_same_{kind}", _dense_factory(kind, shape, opts.seed)) for kind in dense]
    return MoEBenchmark(
        _moe(shape, opts.seed),
        batch_sizes=[1],
        sequence_lengths=list(opts.tokens),
        variants=_moe_variants(opts),
        baselines=baselines,
        device=opts.device,
        dtype=opts.dtype,
        settings=opts.settings_for(shape.label, {"shape": asdict(shape)}, measure_memory),
    )


def _build_three_way(opts: PresetOptions) -> Iterator[MoEBenchmark]:
    for shape in THREE_WAY_SHAPES:
        yield _module_bench(shape, opts, dense=("total",))


def _build_fair(opts: PresetOptions) -> Iterator[MoEBenchmark]:
    yield _module_bench(FAIR_SHAPE, opts, dense=("active", "total"))


def _build_break_even(opts: PresetOptions) -> Iterator[MoEBenchmark]:
    """Memory is not measured here: 20 shapes x 4 variants, and the question is time."""
    for inter in BREAK_EVEN_INTERMEDIATE:
        for k in BREAK_EVEN_TOP_K:
            for e in BREAK_EVEN_EXPERTS:
                yield _module_bench(MoEShape(BREAK_EVEN_HIDDEN, inter, e, k), opts, ("active", "total"), False)


def analyze_break_even(results: BenchmarkResults) -> None:
    """Add a "break_even" table: per MoE shape, token count and MoE variant, the routing
    overhead r = t_moe / t_dense_active - 1, the simple model's ratio k/E * (1 + r) (dense time
    assumed linear in the intermediate size) and the measured t_moe / t_dense_total; the MoE
    beats the dense FFN of equal total parameters when the ratio is below 1."""
    rows = []
    groups = results.metadata.get("groups", {})
    for group in results.groups():
        if "shape" not in groups.get(group, {}):
            continue
        shape = MoEShape(**groups[group]["shape"])
        cases = {(c.variant, c.tokens): c for c in results.select(group=group) if c.ok}
        for (variant, tokens), c in cases.items():
            if variant.startswith("dense"):
                continue
            active, total = cases.get(("dense_same_active", tokens)), cases.get(("dense_same_total", tokens))
            if active is None or total is None:
                continue
            t_moe, t_act, t_tot = c.latency.median_s, active.latency.median_s, total.latency.median_s
            overhead = t_moe / t_act - 1.0
            k_over_e = shape.top_k / shape.num_experts
            model_ratio = k_over_e * (1.0 + overhead)
            measured = t_moe / t_tot
            rows.append(
                {
                    "E": shape.num_experts,
                    "I": shape.intermediate,
                    "k": shape.top_k,
                    "tokens": tokens,
                    "moe_variant": variant,
                    "k/E": k_over_e,
                    "routing_overhead": overhead,
                    "dense_scaling": t_act / t_tot,
                    "model_ratio": model_ratio,
                    "measured_ratio": measured,
                    "model_says_moe_wins": model_ratio < 1.0,
                    "moe_wins": measured < 1.0,
                }
            )
    results.derived["break_even"] = rows
    if rows:
        results.notes.append(
            "break_even: routing_overhead = t_moe / t_dense_same_active - 1; model_ratio = k/E * (1 + overhead) "
            "assumes dense time linear in the intermediate size (dense_scaling = t_active / t_total shows how far "
            "from k/E it really is); measured_ratio = t_moe / t_dense_same_total; the MoE wins below 1."
        )


def tiny_hf_models(seed: int = 0) -> list[tuple[str, torch.nn.Module]]:
    """Tiny random-weight Mixtral and Qwen2-MoE (2 layers, H 128, 8 experts, top-2)."""
    from transformers import MixtralConfig, MixtralForCausalLM, Qwen2MoeConfig, Qwen2MoeForCausalLM

    common = dict(vocab_size=1024, hidden_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    torch.manual_seed(seed)
    mixtral = MixtralForCausalLM(
        MixtralConfig(intermediate_size=256, num_local_experts=8, num_experts_per_tok=2, **common)
    )
    torch.manual_seed(seed)
    qwen = Qwen2MoeForCausalLM(
        Qwen2MoeConfig(
            intermediate_size=256,
            moe_intermediate_size=128,
            shared_expert_intermediate_size=256,
            num_experts=8,
            num_experts_per_tok=2,
            **common,
        )
    )
    return [("mixtral-tiny", mixtral.eval()), ("qwen2moe-tiny", qwen.eval())]


HF_SEQUENCE_LENGTH = 64


def _build_hf(opts: PresetOptions) -> Iterator[MoEBenchmark]:
    try:
        models = tiny_hf_models(opts.seed)
    except ImportError as exc:
        raise ValueError(f"preset 'hf' needs transformers: {exc}") from exc
    batches = sorted({max(1, t // HF_SEQUENCE_LENGTH) for t in opts.tokens})
    for name, model in models:
        yield MoEBenchmark(
            model,
            batch_sizes=batches,
            sequence_lengths=[HF_SEQUENCE_LENGTH],
            variants=("original", "optimized", "optimized+compiled"),
            baselines=["eager", "grouped_mm"],
            device=opts.device,
            dtype=opts.dtype,
            settings=opts.settings_for(name),
        )


PRESETS: dict[str, Preset] = {
    "three_way": Preset(
        "three_way",
        "dense MLP with the same total parameters vs naive MoE vs optimized MoE",
        (128, 512),
        _build_three_way,
    ),
    "fair": Preset(
        "fair",
        "MoE H384 8x768 top-2 vs dense with the same active (1536) and total (6144) parameters",
        (256, 1024),
        _build_fair,
    ),
    "break_even": Preset(
        "break_even",
        "routing overhead and MoE vs dense-same-total for E in 4..64, I in {64, 256}, top-1/top-2",
        (256,),
        _build_break_even,
        analyze_break_even,
    ),
    "hf": Preset(
        "hf",
        "tiny transformers Mixtral / Qwen2-MoE: original vs optimized vs optimized+compiled, eager and grouped_mm",
        (128,),
        _build_hf,
    ),
}


@accepts_moved_keywords(lambda: PRESET_SETTINGS)
def run_preset(
    name: str,
    tokens: Sequence[int] | None = None,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    compile: bool = False,
    settings: BenchSettings | None = None,
) -> BenchmarkResults:
    """Run a named preset and return its combined results (preset name in the metadata).

    ``compile`` adds the optimized+compiled variant to the module presets (``hf`` always has it);
    ``settings`` applies to every benchmark of the preset (default :data:`PRESET_SETTINGS`:
    2 warm-up calls and 0.2 s of samples per case; see :class:`MoEBenchmark`); the preset names
    each group and adds its annotations.
    """
    if name not in PRESETS:
        raise ValueError(f"preset={name!r}; allowed: {', '.join(PRESETS)}")
    preset = PRESETS[name]
    toks = tuple(tokens) if tokens else preset.default_tokens
    if any(not isinstance(t, int) or t < 1 for t in toks):
        raise ValueError(f"tokens={list(toks)!r}; allowed: ints >= 1")
    if settings is not None and not isinstance(settings, BenchSettings):
        raise ValueError(f"settings={settings!r}; allowed: None or a BenchSettings")
    opts = PresetOptions(toks, device, dtype, compile, PRESET_SETTINGS if settings is None else settings)
    results = BenchmarkResults()
    for bench in preset.build(opts):
        results.extend(bench.run())
    if preset.analyze is not None:
        preset.analyze(results)
    results.metadata.update(preset=name, preset_description=preset.description, tokens=list(toks))
    return results

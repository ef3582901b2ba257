"""MoEBenchmark: measure one model's implementations side by side over a sweep of input shapes.

Legend: B batch size, S sequence length, T = B*S tokens, H hidden size, E experts, K top-k.

The variants (``original``, ``compiled``, ``optimized``, ``optimized+compiled`` and the
baselines) are described in :mod:`kernel_moe.bench.variants`; how each case is timed, what
else is measured and which inputs it gets, in :mod:`kernel_moe.bench.settings`.

All variants are built first and measured shape by shape, so drift of a shared machine hits
every variant of a shape alike. A variant that cannot be built is recorded in
``results.skipped`` with the reason; a case that fails records its error and the sweep goes on.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Sequence

import torch
import torch.nn as nn

from kernel_moe.bench import calls as _calls
from kernel_moe.bench.calls import first_tensor
from kernel_moe.bench.device import environment, resolve_device
from kernel_moe.bench.energy import detect_energy_meter
from kernel_moe.bench.memory import measure_peak_memory, module_bytes, tensor_bytes
from kernel_moe.bench.models import count_parameters
from kernel_moe.bench.results import BenchmarkResults, CaseResult, LayerRouting, fill_ratios
from kernel_moe.bench.settings import BenchSettings, accepts_moved_keywords
from kernel_moe.bench.stats import LatencySummary
from kernel_moe.bench.timing import sample_block, sample_interleaved, synchronize
from kernel_moe.bench.variants import (
    BUILTIN_VARIANTS,
    DEFAULT_VARIANTS,
    Variant,
    VariantBuilder,
    VariantUnavailable,
    check_baselines,
    check_variants,
)

logger = logging.getLogger("kernel_moe")

# Relative L2 error above which a variant that should compute the same function is flagged.
EQUIVALENCE_RTOL = {torch.float32: 1e-4, torch.float64: 1e-8}
EQUIVALENCE_RTOL_LOW_PRECISION = 2e-2


def _positive_ints(name: str, values: Sequence[int]) -> list[int]:
    out = list(values)
    if not out or any(not isinstance(v, int) or isinstance(v, bool) or v < 1 for v in out):
        raise ValueError(f"MoEBenchmark.{name}={out!r}; allowed: a non-empty list of ints >= 1")
    return out


def _routed_layers(module: nn.Module) -> list[tuple[str, nn.Module]]:
    """Modules exposing the routing-tracking interface of ``kernel_moe.layers.FusedMoE``."""
    return [
        (name, m)
        for name, m in module.named_modules()
        if callable(getattr(m, "track_routing", None)) and isinstance(getattr(m, "routing_counts", None), torch.Tensor)
    ]


def _matmul_param_stats(module: nn.Module, active_params: int) -> tuple[int, int]:
    """(active, total) parameters that take part in matmuls: embeddings excluded unless the
    same tensor is also a Linear weight (a tied LM head)."""
    linear_ids = {id(m.weight) for m in module.modules() if isinstance(m, nn.Linear)}
    emb = {id(m.weight): m.weight.numel() for m in module.modules() if isinstance(m, nn.Embedding)}
    lookup_only = sum(n for pid, n in emb.items() if pid not in linear_ids)
    total = sum(p.numel() for p in module.parameters()) - lookup_only
    return max(active_params - lookup_only, 0), max(total, 0)


class MoEBenchmark:
    """Side-by-side benchmark of a model's implementations over batch sizes x sequence lengths.

    Args:
        model: an ``nn.Module``: a transformers model (called with ``input_ids``) or a plain
            module taking hidden states ``[B, S, H]``.
        batch_sizes, sequence_lengths: the sweep; every pair is one case per variant.
        baselines: extra variants: experts-implementation names or ``(name, factory)`` pairs.
        variants: built-in variants to measure (see :mod:`kernel_moe.bench.variants`).
        dtype, device: where and in what precision to run (default: the model's dtype; CUDA
            when available, else CPU).
        settings: a :class:`~kernel_moe.bench.settings.BenchSettings`: timing, optional
            measurements, inputs, how variants are built, the group's name and annotations,
            the progress bar (default: ``BenchSettings()``).

    Example (a plain call measures original, optimized and optimized+compiled)::

        benchmark = MoEBenchmark(model=mixtral_model, batch_sizes=[1, 8, 32, 128],
                                 sequence_lengths=[512, 2048, 8192])
        results = benchmark.run()
        results.print_summary()
    """

    @accepts_moved_keywords(BenchSettings)
    def __init__(
        self,
        model: nn.Module,
        batch_sizes: Sequence[int] = (1, 8, 32),
        sequence_lengths: Sequence[int] = (128, 512),
        baselines: Sequence[str | tuple[str, Callable]] = (),
        variants: Sequence[str] = DEFAULT_VARIANTS,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        settings: BenchSettings | None = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise ValueError(f"MoEBenchmark.model={type(model).__name__}; allowed: an nn.Module")
        settings = BenchSettings() if settings is None else settings
        if not isinstance(settings, BenchSettings):
            raise ValueError(f"MoEBenchmark.settings={settings!r}; allowed: None or a BenchSettings")
        self.model, self.settings = model, settings
        self.batch_sizes = _positive_ints("batch_sizes", batch_sizes)
        self.sequence_lengths = _positive_ints("sequence_lengths", sequence_lengths)
        self.variants = check_variants(variants)
        self.baselines = check_baselines(baselines)
        self.device = resolve_device(device)
        self.dtype = dtype or next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
        self.name = settings.name or type(model).__name__
        self._inputs = _calls.InputMaker(model, settings.inputs, self.device, self.dtype)
        self._builder = VariantBuilder(model, self.device, self.dtype, settings, self.name)
        interleave = settings.timing.interleave
        self.interleave = self.device.type != "cuda" if interleave is None else interleave

    @property
    def input_kind(self) -> str:
        """"ids" or "hidden": the kind of inputs the cases get (resolved from "auto")."""
        return self._inputs.kind

    @property
    def hidden_size(self) -> int | None:
        """H of hidden-state inputs (given, or read from the model)."""
        return self._inputs.hidden_size

    # ------------------------------------------------------------------ variants, inputs, calls
    def build_variant(self, name: str) -> Callable:
        """The callable that is timed for ``name`` (a built-in variant or a configured baseline).
        Raises :class:`VariantUnavailable` when it cannot be built here."""
        specs = {**{v: v for v in BUILTIN_VARIANTS}, **dict(self.baselines)}
        if name not in specs:
            raise ValueError(f"variant={name!r}; allowed: {', '.join(specs)}")
        return self._builder.build(name, specs[name]).run_module

    def make_inputs(self, batch: int, seq: int) -> dict:
        """Seeded forward inputs for one shape: ``{"input_ids": [B, S]}`` or ``{"x": [B, S, H]}``."""
        return self._inputs.make(batch, seq)

    make_call = staticmethod(_calls.make_call)

    def _sync(self) -> None:
        synchronize(self.device)

    # ------------------------------------------------------------------ measurements
    def _routing(self, variant: Variant, inputs: dict, tokens: int) -> list[LayerRouting]:
        layers = _routed_layers(variant.eager_module)
        if not layers:
            return []
        for _, m in layers:
            m.reset_routing_counts()
            m.track_routing(True)
        try:
            self.make_call(variant.eager_module, inputs)()
            self._sync()
        finally:
            for _, m in layers:
                m.track_routing(False)
        out = []
        for layer_name, m in layers:
            counts = m.routing_counts.detach().cpu().tolist()
            k = getattr(m, "top_k", None)
            expected = tokens * k if isinstance(k, int) else None
            out.append(LayerRouting.from_counts(layer_name or "<model>", counts, expected))
            m.reset_routing_counts()
        return out

    def _fail(self, case: CaseResult, exc: Exception) -> None:
        logger.warning(
            "bench: %s / %s at B=%d S=%d failed: %s", self.name, case.variant, case.batch_size, case.seq_len, exc
        )
        case.error = f"{type(exc).__name__}: {exc}"
        case.latency = None

    def _warm(self, variant: Variant, case: CaseResult, inputs: dict) -> Callable[[], object] | None:
        """First call (timed: includes compilation), warm-up calls and the work estimates.
        Returns the call to time, or None when the variant failed (error recorded)."""
        call = self.make_call(variant.run_module, inputs)
        try:
            self._sync()
            t0 = time.perf_counter()
            output = call()
            self._sync()
            case.first_call_s = time.perf_counter() - t0
            for _ in range(self.settings.timing.warmup):
                call()
            out_tensor = first_tensor(output)
            matmul_active, matmul_total = _matmul_param_stats(variant.eager_module, case.params.active)
            case.flops_estimate = 2.0 * matmul_active * case.tokens
            elt = torch.empty((), dtype=self.dtype).element_size()
            io_bytes = tensor_bytes(inputs.values()) + (0 if out_tensor is None else tensor_bytes([out_tensor]))
            case.bytes_estimate = float(matmul_total * elt + io_bytes)
        except Exception as exc:  # one failing variant must not end the sweep; the error is reported
            self._fail(case, exc)
            return None
        return call

    def _measure_extras(self, variant: Variant, case: CaseResult, call, inputs: dict, meter) -> None:
        """Peak memory, energy and routing counts of one warmed-up case."""
        try:
            measure = self.settings.measurements
            if measure.memory:
                resident = module_bytes(variant.eager_module) + tensor_bytes(inputs.values())
                case.memory = measure_peak_memory(call, self.device, resident)
            if measure.energy and meter is not None:
                case.energy = meter.measure(call, measure.energy_window_s, self.device)
            if measure.routing:
                case.routing = self._routing(variant, inputs, case.tokens)
        except Exception as exc:
            self._fail(case, exc)

    def _measure_shape(self, variants: list[Variant], batch: int, seq: int, meter, bar) -> list[CaseResult]:
        """All variants at one input shape: warm every variant, time them (round-robin when
        interleaving), then the memory / energy / routing passes."""
        inputs = self.make_inputs(batch, seq)
        cases = [
            CaseResult(self.name, v.name, batch, seq, batch * seq, count_parameters(v.eager_module)) for v in variants
        ]
        calls = [self._warm(v, c, inputs) for v, c in zip(variants, cases, strict=True)]
        live = [i for i, call in enumerate(calls) if call is not None]
        timing = self.settings.timing
        try:
            if self.interleave and live:
                sampled = sample_interleaved([calls[i] for i in live], self.device, timing)
                for i, samples in zip(live, sampled, strict=True):
                    cases[i].latency = LatencySummary.from_samples(samples)
            else:
                for i in live:
                    cases[i].latency = LatencySummary.from_samples(sample_block(calls[i], self.device, timing))
        except Exception as exc:
            for i in live:
                if cases[i].latency is None:
                    self._fail(cases[i], exc)
        for i, (v, c) in enumerate(zip(variants, cases, strict=True)):
            if c.ok:
                self._measure_extras(v, c, calls[i], inputs, meter)
            bar.update(1)
        return cases

    def _check_equivalence(self, variants: list[Variant], results: BenchmarkResults) -> None:
        """Relative L2 error of each equivalent variant's output against the original's, on the
        first shape; a variant above the dtype's bound gets a note (its speed is suspect)."""
        ref = next((v for v in variants if v.name == "original"), None)
        if ref is None:
            return
        inputs = self.make_inputs(self.batch_sizes[0], self.sequence_lengths[0])
        try:
            expected = first_tensor(self.make_call(ref.run_module, inputs)())
        except Exception as exc:
            logger.warning("bench: original output check failed: %s", exc)
            return
        bound = EQUIVALENCE_RTOL.get(self.dtype, EQUIVALENCE_RTOL_LOW_PRECISION)
        for v in variants:
            if v is ref or not v.equivalent or expected is None:
                continue
            try:
                got = first_tensor(self.make_call(v.run_module, inputs)())
            except Exception as exc:
                v.info["output_check"] = f"failed to run: {type(exc).__name__}: {exc}"
                continue
            if got is None or got.shape != expected.shape:
                v.info["output_check"] = "output shape differs from original"
                results.notes.append(f"{self.name} / {v.name}: output shape differs from the original's")
                continue
            diff = torch.linalg.vector_norm(got.double() - expected.double())
            err = (diff / torch.linalg.vector_norm(expected.double()).clamp_min(1e-30)).item()
            v.info["output_rel_l2_error"] = err
            if not err <= bound:
                results.notes.append(
                    f"{self.name} / {v.name}: output differs from the original's "
                    f"(relative L2 error {err:.2e} > {bound:.0e})"
                )

    # ------------------------------------------------------------------ run
    def run(self) -> BenchmarkResults:
        """Measure every variant at every (batch size, sequence length); returns the results."""
        threads = self.settings.timing.num_threads
        if threads is None:
            return self._run()
        previous = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            return self._run()
        finally:
            torch.set_num_threads(previous)

    def _run(self) -> BenchmarkResults:
        results = BenchmarkResults()
        results.metadata.update(environment(self.device))
        results.metadata.update(
            dtype=str(self.dtype).replace("torch.", ""),
            timer=("cuda_events" if self.device.type == "cuda" else "perf_counter")
            + (", interleaved" if self.interleave else ""),
            warmup=self.settings.timing.warmup,
            min_time_s=self.settings.timing.min_time_s,
            input_kind=self.input_kind,
        )
        measure = self.settings.measurements
        meter = measure.energy_meter
        if meter is None:
            meter = detect_energy_meter(self.device) if measure.energy else None
        results.metadata["energy_method"] = meter.method if meter is not None else "off"

        variants: list[Variant] = []
        for name, spec in [(v, v) for v in self.variants] + self.baselines:
            try:
                variants.append(self._builder.build(name, spec))
            except VariantUnavailable as exc:
                logger.info("bench: %s / %s skipped: %s", self.name, name, exc)
                results.skipped.append({"group": self.name, "variant": name, "reason": str(exc)})
        shapes = [(b, s) for b in self.batch_sizes for s in self.sequence_lengths]
        with _progress(len(shapes) * len(variants), self.name, self.settings.progress) as bar:
            for batch, seq in shapes:
                results.cases.extend(self._measure_shape(variants, batch, seq, meter, bar))
        fill_ratios(results.cases)
        # after the sweep, so that the first call of each compiled variant (first_call_s) includes compilation
        if measure.check_outputs:
            self._check_equivalence(variants, results)
        group = {**self.settings.annotations, "variants": {v.name: v.info for v in variants}}
        results.metadata["groups"] = {self.name: group}
        return results


class _NullBar:
    def update(self, n: int = 1) -> None:
        """No progress display."""


@contextlib.contextmanager
def _progress(total: int, desc: str, enabled: bool):
    """A tqdm bar on stderr when tqdm is installed and ``enabled``; otherwise silent."""
    bar = None
    if enabled:
        try:
            from tqdm.auto import tqdm

            bar = tqdm(total=total, desc=desc, unit="case", leave=False)
        except ImportError:
            bar = None
    try:
        yield bar if bar is not None else _NullBar()
    finally:
        if bar is not None:
            bar.close()

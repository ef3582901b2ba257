"""MoEBenchmark: measure one model's implementations side by side over a sweep of input shapes.

Legend: B batch size, S sequence length, T = B*S tokens, H hidden size, E experts, K top-k.

Variants (each built from a deep copy of the model, so the caller's model is never touched):

- ``original``: the model as given.
- ``compiled``: ``torch.compile`` of the original.
- ``optimized``: ``kernel_moe.optimize`` applied.
- ``optimized+compiled``: ``kernel_moe.optimize`` then ``torch.compile``.
- baselines: a string names a transformers experts implementation (``"eager"``,
  ``"grouped_mm"``, ``"batched_mm"``) set with ``model.set_experts_implementation``; a
  ``(name, factory)`` pair builds any module, ``factory()`` or ``factory(copy_of_model)``.

All variants are built first and measured shape by shape, so drift of a shared machine hits
every variant of a shape alike. A variant that cannot be built is recorded in
``results.skipped`` with the reason; a case that fails records its error and the sweep goes on.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import logging
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from kernel_moe.bench.device import environment, resolve_device
from kernel_moe.bench.energy import EnergyMeter, detect_energy_meter
from kernel_moe.bench.introspect import (
    first_tensor,
    hidden_size_of,
    input_embedding,
    matmul_param_stats,
    routed_layers,
)
from kernel_moe.bench.memory import measure_peak_memory, module_bytes, tensor_bytes
from kernel_moe.bench.models import count_parameters
from kernel_moe.bench.results import BenchmarkResults, CaseResult, LayerRouting, fill_ratios
from kernel_moe.bench.stats import LatencySummary

logger = logging.getLogger("kernel_moe")

DEFAULT_VARIANTS = ("original", "optimized", "optimized+compiled")
BUILTIN_VARIANTS = ("original", "compiled", "optimized", "optimized+compiled")
EXPERTS_IMPLEMENTATIONS = ("eager", "grouped_mm", "batched_mm")
INPUT_KINDS = ("auto", "ids", "hidden")
# Relative L2 error above which a variant that should compute the same function is flagged.
EQUIVALENCE_RTOL = {torch.float32: 1e-4, torch.float64: 1e-8}
EQUIVALENCE_RTOL_LOW_PRECISION = 2e-2


class _Holder(nn.Module):
    """A parent for the model, so that a model which is itself an MoE block can be swapped."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model


class VariantUnavailable(Exception):
    """A variant cannot be built on this model or installation (the message says why)."""


@dataclass
class _Variant:
    name: str
    run_module: Callable  # what is timed (may be a torch.compile wrapper)
    eager_module: nn.Module  # the module underneath (used for routing counts and parameters)
    equivalent: bool  # computes the original's function (checked against it)
    info: dict = field(default_factory=dict)


def _positive_ints(name: str, values: Iterable[int]) -> list[int]:
    out = list(values)
    if not out or any(not isinstance(v, int) or isinstance(v, bool) or v < 1 for v in out):
        raise ValueError(f"MoEBenchmark.{name}={out!r}; allowed: a non-empty list of ints >= 1")
    return out


class MoEBenchmark:
    """Side-by-side benchmark of a model's implementations over batch sizes x sequence lengths.

    Args:
        model: an ``nn.Module``: a transformers model (called with ``input_ids``) or a plain
            module taking hidden states ``[B, S, H]``.
        batch_sizes, sequence_lengths: the sweep; every pair is one case per variant.
        baselines: extra variants: experts-implementation names or ``(name, factory)`` pairs.
        variants: built-in variants to measure (see module docstring).
        dtype, device: where and in what precision to run (default: the model's dtype; CUDA
            when available, else CPU).
        warmup: calls after the first (timed separately as ``first_call_s``) before sampling.
        min_time_s: sample each case for at least this long (and at least ``min_samples`` calls).
        input_kind: "auto" (token ids when the model has an input embedding, else hidden
            states), "ids" or "hidden".
        name: the group name of these cases in the results (default: the model's class name).
        annotations: JSON-serializable facts about this group (e.g. its MoE shape), stored in
            ``results.metadata["groups"][name]``.
        optimize_config: passed to ``kernel_moe.optimize``.
        compile_kwargs: passed to ``torch.compile``.
        measure_memory, measure_energy, track_routing: turn the optional measurements off.
        energy_window_s: minimum length of an energy window (the workload repeats until then).
        check_outputs: compare the output of every equivalent variant with the original's.
        interleave: sample the variants of a shape round-robin (default: on CPU, where other
            processes share the cores; on CUDA each variant is timed back to back).
        num_threads: torch intra-op threads during the run (restored after). On a CPU shared
            with other busy processes, 1 avoids OpenMP barrier stalls that can make a
            multi-threaded call hundreds of times slower than usual.
        progress: show a tqdm progress bar when tqdm is installed.
    """

    def __init__(
        self,
        model: nn.Module,
        batch_sizes: Sequence[int] = (1, 8, 32),
        sequence_lengths: Sequence[int] = (128, 512),
        baselines: Sequence[str | tuple[str, Callable]] = (),
        variants: Sequence[str] = DEFAULT_VARIANTS,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        warmup: int = 3,
        min_time_s: float = 0.5,
        min_samples: int = 5,
        max_samples: int = 10_000,
        input_kind: str = "auto",
        hidden_size: int | None = None,
        name: str | None = None,
        annotations: dict | None = None,
        optimize_config=None,
        compile_kwargs: dict | None = None,
        measure_memory: bool = True,
        measure_energy: bool = True,
        energy_window_s: float = 1.0,
        energy_meter: EnergyMeter | None = None,
        track_routing: bool = True,
        check_outputs: bool = True,
        interleave: bool | None = None,
        num_threads: int | None = None,
        progress: bool = True,
        seed: int = 0,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise ValueError(f"MoEBenchmark.model={type(model).__name__}; allowed: an nn.Module")
        self.model = model
        self.batch_sizes = _positive_ints("batch_sizes", batch_sizes)
        self.sequence_lengths = _positive_ints("sequence_lengths", sequence_lengths)
        for v in variants:
            if v not in BUILTIN_VARIANTS:
                raise ValueError(f"MoEBenchmark.variants has {v!r}; allowed: {', '.join(BUILTIN_VARIANTS)}")
        self.variants = list(dict.fromkeys(variants))
        self.baselines = self._check_baselines(baselines)
        if input_kind not in INPUT_KINDS:
            raise ValueError(f"MoEBenchmark.input_kind={input_kind!r}; allowed: {', '.join(INPUT_KINDS)}")
        if warmup < 0 or min_samples < 1 or max_samples < min_samples:
            raise ValueError(
                f"MoEBenchmark warmup={warmup!r}, min_samples={min_samples!r}, max_samples={max_samples!r}; "
                "allowed: warmup >= 0, 1 <= min_samples <= max_samples"
            )
        if min_time_s < 0 or energy_window_s <= 0:
            raise ValueError(
                f"MoEBenchmark min_time_s={min_time_s!r}, energy_window_s={energy_window_s!r}; "
                "allowed: min_time_s >= 0, energy_window_s > 0"
            )
        self.device = resolve_device(device)
        self.dtype = dtype or next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
        self.warmup, self.min_time_s = warmup, min_time_s
        self.min_samples, self.max_samples = min_samples, max_samples
        self.input_kind = self._resolve_input_kind(input_kind)
        self.hidden_size = hidden_size or hidden_size_of(model)
        if self.input_kind == "hidden" and self.hidden_size is None:
            raise ValueError("MoEBenchmark.hidden_size=None and it cannot be inferred; allowed: an int >= 1")
        self.name = name or type(model).__name__
        self.annotations = dict(annotations or {})
        self.optimize_config = optimize_config
        self.compile_kwargs = dict(compile_kwargs or {})
        self.measure_memory, self.measure_energy = measure_memory, measure_energy
        self.energy_window_s = energy_window_s
        self._energy_meter = energy_meter
        self.track_routing, self.check_outputs = track_routing, check_outputs
        self.interleave = self.device.type != "cuda" if interleave is None else bool(interleave)
        if num_threads is not None and (not isinstance(num_threads, int) or num_threads < 1):
            raise ValueError(f"MoEBenchmark.num_threads={num_threads!r}; allowed: None or an int >= 1")
        self.num_threads = num_threads
        self.progress, self.seed = progress, seed

    # ------------------------------------------------------------------ configuration
    @staticmethod
    def _check_baselines(baselines) -> list[tuple[str, str | Callable]]:
        out = []
        for b in baselines:
            if isinstance(b, str):
                if b not in EXPERTS_IMPLEMENTATIONS and b not in BUILTIN_VARIANTS:
                    allowed = ", ".join((*EXPERTS_IMPLEMENTATIONS, *BUILTIN_VARIANTS))
                    raise ValueError(f"MoEBenchmark.baselines has {b!r}; allowed: {allowed} or (name, factory)")
                out.append((b, b))
            elif isinstance(b, tuple) and len(b) == 2 and isinstance(b[0], str) and callable(b[1]):
                out.append((b[0], b[1]))
            else:
                raise ValueError(
                    f"MoEBenchmark.baselines has {b!r}; allowed: an experts implementation name or (name, factory)"
                )
        return out

    def _resolve_input_kind(self, kind: str) -> str:
        if kind != "auto":
            return kind
        return "ids" if input_embedding(self.model) is not None else "hidden"

    # ------------------------------------------------------------------ variants
    def _copy(self) -> nn.Module:
        return copy.deepcopy(self.model).to(device=self.device, dtype=self.dtype).eval()

    def _compile(self, module: nn.Module) -> Callable:
        return torch.compile(module, **self.compile_kwargs)

    def _optimized(self) -> tuple[nn.Module, dict]:
        try:
            import kernel_moe
        except ImportError as exc:  # pragma: no cover - the package is importable by construction
            raise VariantUnavailable(f"kernel_moe cannot be imported: {exc}") from exc
        optimize = getattr(kernel_moe, "optimize", None)
        if optimize is None:
            raise VariantUnavailable("kernel_moe.optimize is not available in this installation")
        # optimize() swaps modules inside a parent; a holder makes a bare MoE block swappable too
        holder = _Holder(self._copy())
        report = optimize(holder, self.optimize_config)
        module = holder.model
        swapped = getattr(report, "swapped", None)
        info = {"swapped": len(swapped) if swapped is not None else None, "report": str(report)}
        if swapped is not None and len(swapped) == 0:
            logger.warning("bench: kernel_moe.optimize swapped no module of %s", self.name)
        return module.eval(), info

    def build_variant(self, name: str) -> Callable:
        """The callable that is timed for ``name`` (a built-in variant or a configured baseline).
        Raises :class:`VariantUnavailable` when it cannot be built here."""
        specs = {**{v: v for v in BUILTIN_VARIANTS}, **dict(self.baselines)}
        if name not in specs:
            raise ValueError(f"variant={name!r}; allowed: {', '.join(specs)}")
        return self._build(name, specs[name]).run_module

    def _build(self, name: str, spec: str | Callable) -> _Variant:
        if spec == "original":
            m = self._copy()
            return _Variant(name, m, m, True)
        if spec == "compiled":
            m = self._copy()
            return _Variant(name, self._compile(m), m, True)
        if spec == "optimized":
            m, info = self._optimized()
            return _Variant(name, m, m, True, info)
        if spec == "optimized+compiled":
            m, info = self._optimized()
            return _Variant(name, self._compile(m), m, True, info)
        if isinstance(spec, str):
            m = self._copy()
            setter = getattr(m, "set_experts_implementation", None)
            if not callable(setter):
                raise VariantUnavailable(f"{type(m).__name__} has no set_experts_implementation()")
            try:
                setter(spec)
            except (ValueError, ImportError, NotImplementedError) as exc:
                raise VariantUnavailable(f"set_experts_implementation({spec!r}) failed: {exc}") from exc
            return _Variant(name, m, m, True, {"experts_implementation": spec})
        params = [
            p
            for p in inspect.signature(spec).parameters.values()
            if p.default is inspect.Parameter.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
        ]
        built = spec(self._copy()) if params else spec()
        if not isinstance(built, nn.Module):
            raise VariantUnavailable(f"factory for {name!r} returned {type(built).__name__}, not an nn.Module")
        built = built.to(device=self.device, dtype=self.dtype).eval()
        return _Variant(name, built, built, False, {"factory": getattr(spec, "__name__", repr(spec))})

    # ------------------------------------------------------------------ inputs and calls
    def make_inputs(self, batch: int, seq: int) -> dict:
        """Seeded forward inputs for one shape: ``{"input_ids": [B, S]}`` or ``{"x": [B, S, H]}``."""
        gen = torch.Generator().manual_seed(self.seed + 1_000_003 * batch + seq)
        if self.input_kind == "ids":
            emb = input_embedding(self.model)
            config = getattr(self.model, "config", None)
            vocab = emb.num_embeddings if emb is not None else getattr(config, "vocab_size", None)
            if not vocab:
                raise ValueError("MoEBenchmark.input_kind='ids' but the model has no input embedding / vocab_size")
            ids_BS = torch.randint(0, vocab, (batch, seq), generator=gen).to(self.device)
            kwargs = {"input_ids": ids_BS}
            forward = inspect.signature(self.model.forward).parameters
            if "use_cache" in forward:
                kwargs["use_cache"] = False
            return kwargs
        x_BSH = torch.randn(batch, seq, self.hidden_size, generator=gen).to(device=self.device, dtype=self.dtype)
        return {"x": x_BSH}

    @staticmethod
    def make_call(module: Callable, inputs: dict) -> Callable[[], object]:
        """A no-argument closure running ``module`` on ``inputs`` under ``torch.no_grad()``."""
        if "x" in inputs:
            x = inputs["x"]

            def call():
                with torch.no_grad():
                    return module(x)

        else:

            def call():
                with torch.no_grad():
                    return module(**inputs)

        return call

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _enough(self, n: int, elapsed: float, budget_s: float) -> bool:
        return n >= self.max_samples or (n >= self.min_samples and elapsed >= budget_s)

    def _time_one(self, call: Callable[[], object]) -> float:
        """Seconds of one call: CUDA events on GPU, perf_counter on CPU."""
        if self.device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            call()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3
        t0 = time.perf_counter()
        call()
        return time.perf_counter() - t0

    def _time_block(self, call: Callable[[], object]) -> list[float]:
        """Per-call latencies of one variant sampled back to back. On CUDA the events of many
        calls are in flight at once (the host syncs every 64 calls), so launch gaps are hidden
        as they are in a real model."""
        self._sync()
        t_start = time.perf_counter()
        if self.device.type != "cuda":
            samples: list[float] = []
            while not self._enough(len(samples), time.perf_counter() - t_start, self.min_time_s):
                samples.append(self._time_one(call))
            return samples
        events = []
        while not self._enough(len(events), time.perf_counter() - t_start, self.min_time_s):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            call()
            end.record()
            events.append((start, end))
            if len(events) % 64 == 0:
                end.synchronize()
        self._sync()
        return [st.elapsed_time(en) / 1e3 for st, en in events]

    def _time_interleaved(self, calls: list[Callable[[], object]]) -> list[list[float]]:
        """Per-call latencies of several variants sampled round-robin, one call each per round,
        so that load from other processes on a shared machine hits every variant alike."""
        samples: list[list[float]] = [[] for _ in calls]
        t_start = time.perf_counter()
        budget = self.min_time_s * len(calls)
        while not self._enough(min(len(s) for s in samples), time.perf_counter() - t_start, budget):
            for call, out in zip(calls, samples, strict=True):
                out.append(self._time_one(call))
        return samples

    # ------------------------------------------------------------------ measurements
    def _routing(self, variant: _Variant, inputs: dict, tokens: int) -> list[LayerRouting]:
        layers = routed_layers(variant.eager_module)
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

    def _warm(self, variant: _Variant, case: CaseResult, inputs: dict) -> Callable[[], object] | None:
        """First call (timed: includes compilation), warm-up calls and the work estimates.
        Returns the call to time, or None when the variant failed (error recorded)."""
        call = self.make_call(variant.run_module, inputs)
        try:
            self._sync()
            t0 = time.perf_counter()
            output = call()
            self._sync()
            case.first_call_s = time.perf_counter() - t0
            for _ in range(self.warmup):
                call()
            out_tensor = first_tensor(output)
            matmul_active, matmul_total = matmul_param_stats(variant.eager_module, case.params.active)
            case.flops_estimate = 2.0 * matmul_active * case.tokens
            elt = torch.empty((), dtype=self.dtype).element_size()
            io_bytes = tensor_bytes(inputs.values()) + (0 if out_tensor is None else tensor_bytes([out_tensor]))
            case.bytes_estimate = float(matmul_total * elt + io_bytes)
        except Exception as exc:  # one failing variant must not end the sweep; the error is reported
            self._fail(case, exc)
            return None
        return call

    def _measure_extras(self, variant: _Variant, case: CaseResult, call, inputs: dict, meter) -> None:
        """Peak memory, energy and routing counts of one warmed-up case."""
        try:
            if self.measure_memory:
                resident = module_bytes(variant.eager_module) + tensor_bytes(inputs.values())
                case.memory = measure_peak_memory(call, self.device, resident)
            if self.measure_energy and meter is not None:
                case.energy = meter.measure(call, self.energy_window_s, self.device)
            if self.track_routing:
                case.routing = self._routing(variant, inputs, case.tokens)
        except Exception as exc:
            self._fail(case, exc)

    def _measure_shape(self, variants: list[_Variant], batch: int, seq: int, meter, bar) -> list[CaseResult]:
        """All variants at one input shape: warm every variant, time them (round-robin when
        interleaving), then the memory / energy / routing passes."""
        inputs = self.make_inputs(batch, seq)
        cases = [
            CaseResult(self.name, v.name, batch, seq, batch * seq, count_parameters(v.eager_module)) for v in variants
        ]
        calls = [self._warm(v, c, inputs) for v, c in zip(variants, cases, strict=True)]
        live = [i for i, call in enumerate(calls) if call is not None]
        try:
            if self.interleave:
                for i, samples in zip(live, self._time_interleaved([calls[i] for i in live]), strict=True):
                    cases[i].latency = LatencySummary.from_samples(samples)
            else:
                for i in live:
                    cases[i].latency = LatencySummary.from_samples(self._time_block(calls[i]))
        except Exception as exc:
            for i in live:
                if cases[i].latency is None:
                    self._fail(cases[i], exc)
        for i, (v, c) in enumerate(zip(variants, cases, strict=True)):
            if c.ok:
                self._measure_extras(v, c, calls[i], inputs, meter)
            bar.update(1)
        return cases

    def _check_equivalence(self, variants: list[_Variant], results: BenchmarkResults) -> None:
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
        if self.num_threads is None:
            return self._run()
        previous = torch.get_num_threads()
        torch.set_num_threads(self.num_threads)
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
            warmup=self.warmup,
            min_time_s=self.min_time_s,
            input_kind=self.input_kind,
        )
        meter = self._energy_meter
        if meter is None:
            meter = detect_energy_meter(self.device) if self.measure_energy else None
        results.metadata["energy_method"] = meter.method if meter is not None else "off"

        variants: list[_Variant] = []
        for name, spec in [(v, v) for v in self.variants] + self.baselines:
            try:
                variants.append(self._build(name, spec))
            except VariantUnavailable as exc:
                logger.info("bench: %s / %s skipped: %s", self.name, name, exc)
                results.skipped.append({"group": self.name, "variant": name, "reason": str(exc)})
        shapes = [(b, s) for b in self.batch_sizes for s in self.sequence_lengths]
        with _progress(len(shapes) * len(variants), self.name, self.progress) as bar:
            for batch, seq in shapes:
                results.cases.extend(self._measure_shape(variants, batch, seq, meter, bar))
        fill_ratios(results.cases)
        # after the sweep, so that the first call of each compiled variant (first_call_s) includes compilation
        if self.check_outputs:
            self._check_equivalence(variants, results)
        results.metadata["groups"] = {self.name: {**self.annotations, "variants": {v.name: v.info for v in variants}}}
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

"""MoEBenchmark end to end on tiny CPU models: numbers, ratios, routing counts, memory."""

from __future__ import annotations

import dataclasses
import inspect
import math
import re

import pytest
import torch
from torch import nn

from helpers import tiny_mixtral_config
from kernel_moe.bench.energy import EnergyMeter, UnavailableEnergyMeter
from kernel_moe.bench.memory import measure_peak_memory, module_bytes
from kernel_moe.bench.models import DenseFFN, NaiveMoE, count_parameters
from kernel_moe.bench.runner import MoEBenchmark
from kernel_moe.bench.settings import MOVED_KEYWORDS, BenchSettings, Inputs, Measurements, Timing, moved_keyword_hint

H, I, E, K = 32, 48, 4, 2
BATCHES, SEQS = [1, 3], [8]
# two samples per case, no warm-up, no memory or energy: for tests of what is built and run
QUICK = BenchSettings(
    timing=Timing(min_time_s=0.0, min_samples=2, warmup=0),
    measurements=Measurements(memory=False, energy=False),
    progress=False,
)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """One torch thread: on a CPU shared with other jobs, OpenMP barriers can stall for whole
    scheduler slices and make these small timed runs many times slower."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


class CountingMeter(EnergyMeter):
    """A simulated counter that gains 0.5 J per workload call."""

    method = "fake"

    def __init__(self) -> None:
        self.microjoules = 0

    def snapshot(self) -> int:
        return self.microjoules

    def joules_between(self, start, end) -> float:
        return (end - start) / 1e6

    def wrap(self, fn):
        def call():
            self.microjoules += 500_000
            return fn()

        return call

    def measure(self, fn, min_time_s=1.0, device=None):
        return super().measure(self.wrap(fn), min_time_s, device)


class Broken(nn.Module):
    def forward(self, x):
        raise RuntimeError("this baseline always fails")


@pytest.fixture(scope="module")
def results():
    torch.manual_seed(0)
    model = NaiveMoE(H, I, E, K)
    bench = MoEBenchmark(
        model,
        batch_sizes=BATCHES,
        sequence_lengths=SEQS,
        variants=("original", "optimized"),
        baselines=[("dense_same_active", lambda: DenseFFN(H, K * I)), ("broken", lambda: Broken())],
        settings=BenchSettings(
            timing=Timing(warmup=1, min_time_s=0.0, min_samples=3),
            measurements=Measurements(energy_meter=CountingMeter(), energy_window_s=0.005),
            progress=False,
        ),
    )
    return bench.run()


def test_every_variant_and_shape_is_measured(results):
    assert [(c.variant, c.batch_size, c.seq_len) for c in results.cases] == [
        (v, b, s) for b in BATCHES for s in SEQS for v in ("original", "optimized", "dense_same_active", "broken")
    ]
    assert results.skipped == []
    info = results.metadata["groups"]["NaiveMoE"]["variants"]
    assert info["optimized"]["swapped"] == 1
    assert info["optimized"]["output_rel_l2_error"] <= 1e-5


def test_numbers_are_positive_and_consistent(results):
    for c in results.cases:
        if c.variant == "broken":
            continue
        lat = c.latency
        assert c.ok and lat.n >= 3
        assert 0 < lat.p10_s <= lat.median_s <= lat.p90_s
        assert lat.mean_s > 0 and lat.stdev_s >= 0
        assert c.first_call_s > 0
        assert c.tokens == c.batch_size * c.seq_len
        assert c.tokens_per_s > 0
        assert c.tokens_per_s * lat.median_s == pytest.approx(c.tokens, rel=1e-9)
        assert c.memory.peak_bytes >= c.memory.resident_bytes > 0
        assert c.memory.peak_bytes == c.memory.resident_bytes + c.memory.transient_peak_bytes
        assert c.flops_estimate > 0 and c.bytes_estimate > 0


def test_ratios_against_original(results):
    by = {(c.variant, c.batch_size): c for c in results.cases}
    for b in BATCHES:
        orig = by[("original", b)]
        assert orig.speedup_vs_original == pytest.approx(1.0)
        assert orig.memory_vs_original == pytest.approx(1.0)
        for v in ("optimized", "dense_same_active"):
            c = by[(v, b)]
            assert c.speedup_vs_original == pytest.approx(orig.latency.median_s / c.latency.median_s)
            assert c.memory_vs_original == pytest.approx(c.memory.peak_bytes / orig.memory.peak_bytes)
            assert c.energy_vs_original == pytest.approx(c.energy_j_per_token / orig.energy_j_per_token)


def test_energy_per_token_consistent_with_the_window(results):
    for c in results.cases:
        if not c.ok:
            continue
        e = c.energy
        assert e.method == "fake" and e.iterations >= 1 and e.seconds >= 0.005
        assert e.joules == pytest.approx(0.5 * e.iterations)
        assert c.energy_j_per_token * c.tokens * e.iterations == pytest.approx(e.joules)


def test_failing_variant_is_reported_and_sweep_continues(results):
    broken = [c for c in results.cases if c.variant == "broken"]
    assert len(broken) == len(BATCHES) * len(SEQS)
    for c in broken:
        assert not c.ok and "always fails" in c.error
        assert c.tokens_per_s is None and c.speedup_vs_original is None


def test_routing_counts_sum_to_tokens_times_k(results):
    by = {(c.variant, c.batch_size): c for c in results.cases}
    for b in BATCHES:
        for v in ("original", "optimized"):
            (layer,) = by[(v, b)].routing
            assert len(layer.counts) == E
            assert sum(layer.counts) == layer.expected_total == b * SEQS[0] * K
            assert layer.balance.total == sum(layer.counts)
            assert 0.0 <= layer.balance.gini <= (E - 1) / E
        # the swapped layer routes exactly like the hand-written block it replaced
        assert by[("original", b)].routing[0].counts == by[("optimized", b)].routing[0].counts
        assert by[("dense_same_active", b)].routing == []


def test_parameter_counts_per_variant(results):
    by = {c.variant: c for c in results.cases}
    moe = count_parameters(NaiveMoE(H, I, E, K))
    assert by["original"].params == moe == by["optimized"].params
    assert by["dense_same_active"].params.total == moe.active - H * E


def test_no_energy_counter_reads_not_available():
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    r = MoEBenchmark(
        DenseFFN(H, I),
        batch_sizes=[2],
        sequence_lengths=[4],
        variants=("original",),
        settings=BenchSettings(
            timing=Timing(min_time_s=0.0, min_samples=2, warmup=0, num_threads=1),
            measurements=Measurements(memory=False, energy_meter=UnavailableEnergyMeter()),
            progress=False,
        ),
    ).run()
    assert r.metadata["torch_threads"] == 1 and torch.get_num_threads() == threads
    (c,) = r.cases
    assert c.energy is not None and c.energy.joules is None
    assert c.energy_j_per_token is None
    assert str(c.energy) == "not available"
    assert r.metadata["energy_method"] == "not available"
    assert "not available" in r.summary()


def test_input_kind_auto_detection():
    assert MoEBenchmark(NaiveMoE(H, I, E, K)).input_kind == "hidden"
    lm = nn.Sequential()
    lm.embed = nn.Embedding(50, H)
    lm.get_input_embeddings = lambda: lm.embed
    assert MoEBenchmark(lm).input_kind == "ids"


def test_transformers_model_with_experts_baselines():
    transformers = pytest.importorskip("transformers")
    cfg = tiny_mixtral_config(vocab_size=64, intermediate_size=24, num_hidden_layers=1, num_attention_heads=2,
                              num_key_value_heads=1)
    torch.manual_seed(0)
    model = transformers.MixtralForCausalLM(cfg)
    r = MoEBenchmark(
        model,
        batch_sizes=[2],
        sequence_lengths=[5],
        variants=("original", "optimized"),
        baselines=["eager", "grouped_mm"],
        settings=QUICK,
    ).run()
    assert r.metadata["input_kind"] == "ids"
    assert [c.variant for c in r.cases] == ["original", "optimized", "eager", "grouped_mm"]
    assert all(c.ok for c in r.cases), [c.error for c in r.cases]
    info = r.metadata["groups"]["MixtralForCausalLM"]["variants"]
    assert info["eager"]["experts_implementation"] == "eager"
    for v in ("optimized", "eager", "grouped_mm"):
        assert info[v]["output_rel_l2_error"] <= 1e-4
    (layer,) = next(c for c in r.cases if c.variant == "optimized").routing
    assert layer.layer == "model.layers.0.mlp" and sum(layer.counts) == 10 * 2


def test_unsupported_experts_implementation_is_skipped_with_reason():
    r = MoEBenchmark(
        DenseFFN(H, I),
        batch_sizes=[1],
        sequence_lengths=[2],
        variants=("original",),
        baselines=["eager"],
        settings=QUICK,
    ).run()
    assert [c.variant for c in r.cases] == ["original"]
    (skip,) = r.skipped
    assert skip["variant"] == "eager" and "set_experts_implementation" in skip["reason"]


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(batch_sizes=[0]), "batch_sizes"),
        (dict(sequence_lengths=[]), "sequence_lengths"),
        (dict(variants=["fastest"]), "variants"),
        (dict(baselines=[42]), "baselines"),
        (dict(settings={"warmup": 1}), "settings"),
        (dict(settings=BenchSettings(inputs=Inputs(kind="hidden"))), "hidden_size"),
        pytest.param(
            dict(device="cuda:0"), "device", marks=pytest.mark.skipif(torch.cuda.is_available(), reason="has CUDA")
        ),
    ],
)
def test_invalid_arguments_raise(kwargs, field):
    model = NaiveMoE(H, I, E, K) if field != "hidden_size" else nn.Sequential(nn.ReLU())
    with pytest.raises(ValueError, match=field):
        MoEBenchmark(model, **kwargs)


@pytest.mark.parametrize(
    "build, field",
    [
        (lambda: Timing(warmup=-1), "Timing.warmup"),
        (lambda: Timing(min_time_s=-1), "Timing.min_time_s"),
        (lambda: Timing(min_samples=0), "Timing.min_samples"),
        (lambda: Timing(min_samples=5, max_samples=4), "Timing.max_samples"),
        (lambda: Timing(num_threads=0), "Timing.num_threads"),
        (lambda: Measurements(energy_window_s=0), "Measurements.energy_window_s"),
        (lambda: Measurements(memory="yes"), "Measurements.memory"),
        (lambda: Inputs(kind="tokens"), "Inputs.kind"),
        (lambda: Inputs(hidden_size=0), "Inputs.hidden_size"),
        (lambda: BenchSettings(timing=Measurements()), "BenchSettings.timing"),
        (lambda: BenchSettings(name=""), "BenchSettings.name"),
        (lambda: BenchSettings(annotations=["shape"]), "BenchSettings.annotations"),
    ],
)
def test_invalid_settings_raise_naming_the_field(build, field):
    with pytest.raises(ValueError, match=re.escape(field) + "="):
        build()


EXAMPLE_VALUES = {"interleave": True, "num_threads": 1, "measure_memory": False, "measure_energy": False,
                  "energy_window_s": 2.0, "energy_meter": None, "track_routing": False, "check_outputs": False,
                  "input_kind": "hidden", "hidden_size": H, "seed": 3, "optimize_config": None,
                  "compile_kwargs": {"mode": "default"}, "name": "flat", "annotations": {"a": 1},
                  "progress": False, "warmup": 1, "min_time_s": 0.1, "min_samples": 2, "max_samples": 9}


@pytest.mark.parametrize("keyword", sorted(MOVED_KEYWORDS))
def test_moved_keywords_are_deprecated_aliases(keyword):
    """Every keyword of the flat signature that moved into BenchSettings still works, with a
    DeprecationWarning naming where it lives now; the signature users see is the real one."""
    value = EXAMPLE_VALUES[keyword]
    with pytest.warns(DeprecationWarning, match=re.escape(moved_keyword_hint(keyword))):
        bench = MoEBenchmark(NaiveMoE(H, I, E, K), **{keyword: value})
    part, field = MOVED_KEYWORDS[keyword]
    owner = bench.settings if part is None else getattr(bench.settings, part)
    assert getattr(owner, field) == value
    params = list(inspect.signature(MoEBenchmark).parameters)
    assert params == [
        "model", "batch_sizes", "sequence_lengths", "baselines", "variants", "dtype", "device", "settings"
    ]


def test_settings_are_frozen_copies():
    annotations = {"shape": "E4"}
    settings = BenchSettings(annotations=annotations)
    annotations["shape"] = "changed"
    assert settings.annotations == {"shape": "E4"}
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.timing = Timing()


def test_cpu_peak_memory_counts_tensor_allocations():
    def work():
        a = torch.ones(2**18)  # 1 MiB
        b = torch.ones(2**19)  # 2 MiB, while a is alive: 3 MiB live
        del a
        c = torch.ones(2**17)  # 0.5 MiB after 1 MiB was freed: still 3 MiB at most
        return b[0] + c[0]

    r = measure_peak_memory(work, "cpu", resident_bytes=1000)
    assert r.method == "torch_profiler"
    assert 3 * 2**20 <= r.transient_peak_bytes < 3 * 2**20 + 4096
    assert r.peak_bytes == r.transient_peak_bytes + 1000
    assert math.isclose(r.peak_bytes / 2**20, float(str(r).split()[0]), abs_tol=0.01)
    assert module_bytes(DenseFFN(H, I)) == 3 * H * I * 4

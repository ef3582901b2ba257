"""BenchmarkResults: JSON / markdown round trip, ratios, break-even analysis and plots."""

from __future__ import annotations

import json
import sys

import pytest

from kernel_moe.bench.energy import EnergyReading
from kernel_moe.bench.memory import MemoryReading
from kernel_moe.bench.models import ParamCount
from kernel_moe.bench.presets import analyze_break_even
from kernel_moe.bench.results import BenchmarkResults, CaseResult, LayerRouting, fill_ratios
from kernel_moe.bench.stats import LatencySummary

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _case(group, variant, tokens, median_s, peak=None, joules=None, counts=None, error=None):
    c = CaseResult(group, variant, 1, tokens, tokens, ParamCount(1000, 250))
    if error is not None:
        c.error = error
        return c
    c.latency = LatencySummary(median_s, median_s * 0.9, median_s * 1.2, median_s, median_s * 0.1, 5)
    c.first_call_s = median_s * 3
    c.memory = MemoryReading(peak, 100, None if peak is None else peak - 100, "torch_profiler")
    c.energy = EnergyReading(joules, 1.0 if joules else 0.0, 10 if joules else 0, "fake" if joules else "not available")
    c.flops_estimate, c.bytes_estimate = 2.0 * 250 * tokens, 4000.0
    if counts is not None:
        c.routing = [LayerRouting.from_counts("layers.0.mlp", counts, tokens * 2)]
    return c


@pytest.fixture
def results():
    shape = {"hidden": 16, "intermediate": 8, "num_experts": 4, "top_k": 2}
    r = BenchmarkResults(
        cases=[
            _case("g", "original", 64, 0.010, peak=4000, joules=2.0, counts=[32, 32, 32, 32]),
            _case("g", "optimized", 64, 0.004, peak=3000, joules=0.5, counts=[60, 20, 28, 20]),
            _case("g", "dense_same_active", 64, 0.002, peak=1000),
            _case("g", "dense_same_total", 64, 0.005, peak=2000),
            _case("g", "original", 256, 0.030, peak=6000, counts=[64, 128, 192, 128]),
            _case("g", "optimized", 256, 0.010, peak=5000, counts=[128, 128, 128, 128]),
            _case("g", "dense_same_active", 256, 0.006, peak=1500),
            _case("g", "dense_same_total", 256, 0.024, peak=3000),
            _case("g", "broken", 256, 0.0, error="RuntimeError: boom | bad\nshape"),
        ],
        metadata={"device": "cpu", "device_name": "test cpu", "dtype": "float32", "groups": {"g": {"shape": shape}}},
        skipped=[{"group": "g", "variant": "optimized+compiled", "reason": "no compiler"}],
    )
    fill_ratios(r.cases)
    analyze_break_even(r)
    return r


def test_ratios(results):
    opt64 = results.select("g", "optimized")[0]
    assert opt64.speedup_vs_original == pytest.approx(2.5)
    assert opt64.memory_vs_original == pytest.approx(0.75)
    assert opt64.energy_vs_original == pytest.approx(0.25)
    assert results.select("g", "dense_same_active")[0].energy_vs_original is None  # no counter there
    assert results.select("g", "broken")[0].speedup_vs_original is None


def test_break_even_analysis_by_hand(results):
    rows = {(r["tokens"], r["moe_variant"]): r for r in results.derived["break_even"]}
    assert set(rows) == {(64, "original"), (64, "optimized"), (256, "original"), (256, "optimized")}
    r = rows[(64, "optimized")]
    assert r["k/E"] == pytest.approx(0.5)
    assert r["routing_overhead"] == pytest.approx(0.004 / 0.002 - 1)
    assert r["model_ratio"] == pytest.approx(0.5 * 2.0)
    assert r["measured_ratio"] == pytest.approx(0.004 / 0.005)
    assert r["dense_scaling"] == pytest.approx(0.002 / 0.005)
    assert r["moe_wins"] is True and r["model_says_moe_wins"] is False
    r = rows[(256, "original")]
    assert r["measured_ratio"] == pytest.approx(0.030 / 0.024) and r["moe_wins"] is False


def test_json_round_trip(results, tmp_path):
    path = results.to_json(tmp_path / "r.json")
    text = (tmp_path / "r.json").read_text()
    assert "NaN" not in text and "Infinity" not in text
    back = BenchmarkResults.from_json(path)
    assert back.to_dict() == results.to_dict()
    assert json.loads(text)["cases"][0]["tokens_per_s"] == pytest.approx(64 / 0.010)
    assert back.cases[1].routing[0].counts == [60, 20, 28, 20]
    assert back.to_markdown() == results.to_markdown()
    with pytest.raises(ValueError, match="schema_version"):
        BenchmarkResults.from_dict({**results.to_dict(), "schema_version": 99})


def test_markdown_and_summary(results):
    md = results.to_markdown()
    header = next(line for line in md.splitlines() if line.startswith("| group"))
    table = [line for line in md.splitlines() if line.startswith("| g |")]
    assert len(table) == len(results.cases)
    assert all(line.replace("\\|", "").count("|") == header.count("|") for line in table)
    assert "| g | optimized | 1 x 64 | 16,000 |" in md
    assert "2.50x" in md and "not available" in md
    assert "RuntimeError: boom \\| bad shape" in md  # one line, the pipe escaped
    assert "### break_even" in md and "### Skipped" in md and "no compiler" in md
    text = results.summary()
    assert "test cpu" in text and "optimized+compiled: no compiler" in text
    # worst routing layer of optimized @64: max/mean 60/32 = 1.875; gini of sorted (20, 20, 28, 60):
    # 2 * (20 + 40 + 84 + 240) / (4 * 128) - 5/4 = 0.25
    assert "1.88 / 0.25" in text


def test_extend_merges_groups_and_recomputes_ratios(results):
    other = BenchmarkResults(
        cases=[_case("h", "original", 8, 0.002), _case("h", "optimized", 8, 0.001)],
        metadata={"device": "cpu", "groups": {"h": {"variants": {}}}},
    )
    results.extend(other)
    assert set(results.metadata["groups"]) == {"g", "h"}
    assert results.select("h", "optimized")[0].speedup_vs_original == pytest.approx(2.0)


def test_plots_are_written(results, tmp_path):
    pytest.importorskip("matplotlib")
    paths = results.plot(tmp_path / "plots", peak_tflops=0.01, peak_gbps=50.0)
    names = sorted(p.rsplit("/", 1)[-1] for p in paths)
    assert names == ["break_even.png", "roofline.png", "speedup.png", "throughput.png", "utilization.png"]
    for p in paths:
        with open(p, "rb") as f:
            head = f.read(8)
        assert head == PNG_MAGIC


def test_plot_without_matplotlib_names_the_extra(results, tmp_path, monkeypatch):
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(ImportError, match=r"kernel_moe\[plot\]"):
        results.plot(tmp_path)

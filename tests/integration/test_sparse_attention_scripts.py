"""examples/sparse_attention_lm.py --smoke, benchmarks/bench_sparse_attention.py and
benchmarks/bench_handwritten_switchhead.py run end to end
(in a subprocess, as a user runs them) and report every model / variant."""

from __future__ import annotations

import json

import pytest

from helpers import run_script

pytestmark = pytest.mark.slow


def test_example_smoke(tmp_path):
    out = tmp_path / "lm.json"
    run_script(["examples/sparse_attention_lm.py", "--smoke", "--json", str(out)])
    rows = json.loads(out.read_text())
    assert [r["name"].split(" (")[0] for r in rows] == ["dense MHA", "MoA, equal compute", "MoA, equal params",
                                                       "SwitchHead"]
    assert all(r["tokens_per_s"] > 0 and len(r["curve"]) >= 2 for r in rows)


def test_benchmark_small_shape(tmp_path):
    out = tmp_path / "bench.json"
    run_script(["benchmarks/bench_sparse_attention.py", "--shapes", "small", "--min-time", "0", "--json", str(out)])
    row = json.loads(out.read_text())["rows"][0]
    assert set(row["median_ms"]) == {"ours", "dense MHA", "naive loop"}
    assert row["active_heads"] == row["top_k"] * row["heads_per_expert"]


def test_handwritten_switchhead_benchmark(tmp_path):
    out = tmp_path / "switchhead.json"
    run_script(["benchmarks/bench_handwritten_switchhead.py", "--shapes", "small", "--min-time", "0", "--json", str(out)])
    row = json.loads(out.read_text())["rows"][0]
    assert set(row["median_ms"]) == {f"{v}, {m}" for v in ("original", "swapped") for m in ("no mask", "padding mask")}
    assert row["optimize_s"] > 0 and all(r > 0 for r in row["speedup"].values())

"""``python -m kernel_moe bench``: the CLI writes JSON, markdown and plots and prints a summary."""

from __future__ import annotations

import importlib.util
import json
import re

import pytest

from kernel_moe.bench.cli import main
from kernel_moe.bench.presets import FAIR_SHAPE, PRESET_SETTINGS, PRESETS, run_preset
from kernel_moe.bench.results import BenchmarkResults
from kernel_moe.bench.settings import with_moved


def test_fair_preset_end_to_end(tmp_path, capsys):
    out = tmp_path / "fair"
    argv = ["bench", "--preset", "fair", "--tokens", "8", "--out", str(out)]
    argv += ["--min-time", "0", "--warmup", "0", "--no-energy", "--no-progress", "--threads", "1"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    for variant in ("original", "optimized", "dense_same_active", "dense_same_total"):
        assert variant in printed
    assert FAIR_SHAPE.label in printed and "wrote:" in printed

    data = json.loads((out / "results.json").read_text())
    assert data["metadata"]["preset"] == "fair" and data["metadata"]["tokens"] == [8]
    results = BenchmarkResults.from_json(out / "results.json")
    assert all(c.ok for c in results.cases), [c.error for c in results.cases]
    by = {c.variant: c for c in results.cases}
    h, i, e, k = FAIR_SHAPE.hidden, FAIR_SHAPE.intermediate, FAIR_SHAPE.num_experts, FAIR_SHAPE.top_k
    assert by["dense_same_active"].params.total == 3 * h * (k * i) == by["original"].params.active - h * e
    assert by["dense_same_total"].params.total == 3 * h * (e * i) == by["original"].params.total - h * e
    assert (out / "results.md").read_text() == results.to_markdown()
    if importlib.util.find_spec("matplotlib") is not None:
        assert (out / "speedup.png").stat().st_size > 0 and (out / "utilization.png").stat().st_size > 0


def test_word_bench_is_optional_and_bad_preset_fails(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--preset", "nope", "--out", str(tmp_path)])
    assert exc.value.code == 2
    assert "invalid choice" in capsys.readouterr().err


def test_presets_are_registered_with_defaults():
    assert set(PRESETS) == {"three_way", "fair", "break_even", "hf"}
    for p in PRESETS.values():
        assert p.description and p.default_tokens and all(t >= 1 for t in p.default_tokens)
    with pytest.raises(ValueError, match="preset="):
        run_preset("nope")
    with pytest.raises(ValueError, match="tokens="):
        run_preset("fair", tokens=[0])


def test_run_preset_takes_settings_whole():
    """run_preset's timing and measurement keywords live in BenchSettings now; the old ones are
    deprecated aliases applied on top of the preset's own settings."""
    with pytest.warns(DeprecationWarning, match=re.escape("settings=BenchSettings(timing=Timing(warmup=...))")):
        with pytest.raises(ValueError, match="preset='no_such'"):
            run_preset("no_such", warmup=0)
    moved = with_moved(PRESET_SETTINGS, {"warmup": 0, "measure_energy": False})
    assert moved.timing.warmup == 0 and moved.timing.min_time_s == PRESET_SETTINGS.timing.min_time_s
    assert moved.measurements.energy is False
    with pytest.raises(ValueError, match="settings="):
        run_preset("fair", settings={"warmup": 0})

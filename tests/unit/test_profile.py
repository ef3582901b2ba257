"""``python -m kernel_moe profile``: the stages of one MoE layer add up to the time measured without
the profiler within 10%, the report and chart are written, and ``--sweep`` draws top-k, capacity
factor and number of experts against throughput, expert load and dropped tokens."""

from __future__ import annotations

import json

import pytest
import torch

from kernel_moe.__main__ import main
from kernel_moe.bench import profile_cli
from kernel_moe.bench.models import NaiveMoE
from kernel_moe.bench.profile import ProfileSettings, fastest_half, profile_layer
from kernel_moe.bench.stages import STAGE_KEYS
from kernel_moe.kernels import cpu as cpu_kernels

# a small layer whose call takes about 20 ms on one thread: the profiler's cost (about 1 us per
# recorded op, a few hundred ops) stays well inside 10% of it; the whole profile takes seconds
SHAPE = dict(hidden=512, intermediate=1024, num_experts=4, top_k=2)
TOKENS = 256


@pytest.fixture(scope="module")
def results():
    torch.manual_seed(0)
    block = NaiveMoE(**SHAPE)
    return profile_layer(block, [TOKENS], settings=ProfileSettings(steps=16, session=1, unprofiled=1, threads=1),
                         name="small")


def test_the_stages_add_up_to_the_time_measured_without_the_profiler(results):
    assert [(c.variant, c.tokens) for c in results.cases] == [("original", TOKENS), ("optimized", TOKENS)]
    for case in results.cases:
        assert set(case.stages_s) == set(STAGE_KEYS)
        assert sum(case.stages_s.values()) == pytest.approx(case.profiled_s, rel=1e-9)
        assert abs(case.gap) <= 0.10, results.check_lines()
    assert results.check_passed


def test_every_stage_of_the_original_is_found_by_module_and_op(results):
    original = results.case("small", "original", TOKENS)
    for key in ("router", "gating", "dispatch", "up", "down", "combine"):
        assert original.stages_s[key] > 0, key
    assert original.stages_s["fused"] == 0
    # the experts' GEMMs are where the time goes
    assert original.share("up") + original.share("down") > 0.5


def test_the_optimized_layer_reports_its_own_ranges(results):
    optimized = results.case("small", "optimized", TOKENS)
    for key in ("router", "gating", "dispatch"):
        assert optimized.stages_s[key] > 0, key
    if cpu_kernels.extension_setting() != "off" and cpu_kernels.cpu_extension() is not None:
        assert optimized.experts_path == "fused native call"
        assert optimized.stages_s["up"] == optimized.stages_s["down"] == 0
    else:
        assert optimized.stages_s["up"] > 0 and optimized.stages_s["down"] > 0


def test_peak_memory_is_measured_per_variant(results):
    for case in results.cases:
        assert case.memory is not None and case.memory.peak_bytes > case.memory.resident_bytes > 0


def test_markdown_summary_has_the_stage_table_the_check_and_the_command(results):
    text = results.to_markdown("python -m kernel_moe profile --preset fair")
    assert "python -m kernel_moe profile --preset fair" in text
    assert "| router (logits) |" in text and "| down-projection |" in text
    assert "experts, fused up+act+down+combine" in text or "| up-projection + activation |" in text
    assert "peak memory" in text and "within 10% (passed)" in text


def test_the_chart_is_a_png(results, tmp_path):
    pytest.importorskip("matplotlib")
    path = results.plot(tmp_path / "profile.png")
    assert open(path, "rb").read(8) == b"\x89PNG\r\n\x1a\n"


def test_results_serialise_to_json(results):
    data = json.loads(json.dumps(results.to_dict()))
    assert data["check_passed"] is True
    assert {c["variant"] for c in data["cases"]} == {"original", "optimized"}


def test_fastest_half():
    assert fastest_half([5.0, 1.0, 9.0, 2.0]) == [1.0, 2.0]
    assert fastest_half([3.0, 1.0, 2.0]) == [1.0, 2.0]
    assert fastest_half([7.0]) == [7.0]


@pytest.mark.parametrize("field, value", [("steps", 0), ("session", 0), ("unprofiled", 0), ("threads", 0),
                                          ("tolerance", 1.5), ("memory", 1)])
def test_settings_reject_bad_values_naming_the_field(field, value):
    with pytest.raises(ValueError, match=f"ProfileSettings.{field}="):
        ProfileSettings(**{field: value})


def test_profile_layer_rejects_bad_tokens():
    with pytest.raises(ValueError, match="tokens="):
        profile_layer(NaiveMoE(8, 8, 2, 1), [0])


def test_cli_profiles_a_preset_and_prints_the_check(tmp_path, monkeypatch, capsys):
    presets = profile_cli.profile_presets()
    small = profile_cli.ProfilePreset("small", (TOKENS,), lambda seed: [("small", NaiveMoE(**SHAPE))])
    monkeypatch.setattr(profile_cli, "profile_presets", lambda: {**presets, "fair": small})
    code = main(["profile", "--preset", "fair", "--threads", "1", "--steps", "4", "--unprofiled", "1", "--no-plots",
                 "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert "router (logits)" in out and "check: the stages add up" in out
    assert code == (0 if "within 10%: passed" in out else 1)
    assert (tmp_path / "profile.md").exists() and (tmp_path / "profile.json").exists()
    assert "python -m kernel_moe profile --preset fair" in (tmp_path / "profile.md").read_text()


def test_cli_sweep_draws_k_capacity_and_experts(tmp_path, capsys, monkeypatch):
    pytest.importorskip("matplotlib")
    from kernel_moe.bench import sweep
    from kernel_moe.bench.presets import MoEShape

    # fewer, smaller points than the real sweep: the same code, in seconds
    monkeypatch.setattr(sweep, "SWEEP_BASE", MoEShape(hidden=32, intermediate=64, num_experts=8, top_k=2))
    monkeypatch.setattr(sweep, "SWEEP_TOP_K", (1, 2))
    monkeypatch.setattr(sweep, "SWEEP_CAPACITY", (None, 0.5, 2.0))
    monkeypatch.setattr(sweep, "SWEEP_EXPERTS", (4, 8))
    code = main(["profile", "--sweep", "--tokens", "64", "--threads", "1", "--min-time", "0", "--out",
                 str(tmp_path)])
    assert code == 0
    points = json.loads((tmp_path / "sweep.json").read_text())
    by = {(p["parameter"], p["value"]): p for p in points}
    assert {p["parameter"] for p in points} == {"top_k", "capacity_factor", "num_experts"}
    assert by[("capacity_factor", None)]["dropped"] == 0  # dropless
    assert by[("capacity_factor", 0.5)]["dropped"] > 0  # half the balanced capacity must drop slots
    assert by[("capacity_factor", 0.5)]["dropped"] >= by[("capacity_factor", 2.0)]["dropped"]
    for p in points:
        assert p["tokens_per_s"] > 0 and sum(p["kept_per_expert"]) + p["dropped"] == 64 * p["shape"]["top_k"]
    assert open(tmp_path / "sweep.png", "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    text = (tmp_path / "sweep.md").read_text()
    assert "### top-k" in text and "### capacity factor" in text and "### number of experts" in text
    assert "### capacity factor" in capsys.readouterr().out


def test_cli_reports_bad_arguments_with_exit_status_2(tmp_path, capsys):
    assert main(["profile", "--preset", "fair", "--tokens", "0", "--out", str(tmp_path)]) == 2
    assert "error: tokens=[0]" in capsys.readouterr().err

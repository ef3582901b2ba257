"""The numbered examples run end to end: each ``examples/00N_*.py --smoke`` in a fresh process
(as a user runs it) exits 0 and prints its key result, and writes files only under ``--out``.

The five took 12-39 s each (131 s in all, 46 s of CPU time) on a shared 2-core CPU at load
average about 10; the timeout is far above that because the machine running the suite may be
shared (and a first run may compile the native CPU kernels).
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"
TIMEOUT_S = 300

# script -> lines its smoke run must print (a line containing each string)
EXPECTED = {
    "000_energy_mlp_vs_moe.py": ["MoE, kernel_moe + torch.compile", "energy per input",
                                 "break-even crossover (smallest n where the MoE is faster"],
    "001_router_block_profile.py": ["dropped (index -1, weight 0)", "expert_utilization_k2_cf1.5.png",
                                    "MoEBenchmark: one expert at a time"],
    "002_fair_moe_vs_dense.py": ["swapped 1 module(s)", "verdict on validation loss:",
                                 "specialization by token class"],
    "003_routing_strategies.py": ["routing of ffns.0 is collapsing", "collapse detected: yes; recovered: yes"],
    "004_plan_snippets.py": ["expert_indices [2, 16, 2]", "not provided by kernel_moe", "dropped slots (capacity 1.25)",
                             "optimized+compiled"],
}


def _run(script: str, out: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))  # this checkout's kernel_moe
    return subprocess.run([sys.executable, str(EXAMPLES / script), "--smoke", "--out", str(out)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=TIMEOUT_S)


def test_every_numbered_example_is_tested():
    assert sorted(p.name for p in EXAMPLES.glob("0[0-9][0-9]_*.py")) == sorted(EXPECTED)


@pytest.mark.parametrize("script", sorted(EXPECTED))
def test_example_smoke_run(script, tmp_path):
    out = tmp_path / "out"
    result = _run(script, out)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    for expected in EXPECTED[script]:
        assert expected in result.stdout, f"{expected!r} not printed by {script}:\n{result.stdout[-4000:]}"
    assert "profiler_start" not in output, f"the PyTorch profiler's log lines leaked into {script}'s output"
    written = sorted(p.name for p in out.rglob("*") if p.is_file()) if out.exists() else []
    if script.startswith("001"):
        assert {"expert_utilization_k2_cf1.5.png", "throughput.png"} <= set(written), written
    else:
        assert written == [], written


def test_missing_matplotlib_skips_figures_with_a_message(monkeypatch, capsys):
    spec = importlib.util.spec_from_file_location("examples_common", EXAMPLES / "_common.py")
    common = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(common)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # import fails as when matplotlib is absent
    assert common.new_figure(4, 3) is None
    assert "pip install 'kernel_moe[plot]'" in capsys.readouterr().out

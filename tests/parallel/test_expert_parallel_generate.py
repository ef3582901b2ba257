"""A tiny transformers Qwen3-MoE optimized with expert parallelism over 2 gloo ranks generates
exactly what the single-process model generates, in both dispatch modes: the example
``examples/expert_parallel.py`` run under torchrun (it compares on every rank and exits 1 on a
difference)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")
ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_torchrun_example_generates_the_single_process_tokens():
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           str(ROOT / "examples" / "expert_parallel.py"), "--mode", "both", "--new-tokens", "8"]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-4000:]
    for mode in ("exact", "padded"):
        assert f"{mode}: all ranks generate the same tokens as the single-process model" in out, out[-4000:]
    assert out.count("; same tokens as the single-process model") == 4, out[-4000:]

"""The user-facing demo runs end to end on a small batch and reports OK."""

from __future__ import annotations

import io

import pytest
import torch

from kernel_moe.demo import run_demo


@pytest.mark.slow
def test_run_demo_reports_ok():
    torch._dynamo.reset()
    out = io.StringIO()
    result = run_demo(batch=1, seq=8, out=out)
    text = out.getvalue()
    assert result["ok"] is True
    assert "equivalence (fp32, atol/rtol 1e-4): OK" in text
    assert "MISMATCH" not in text
    swapped = result["report"]["swapped"]
    assert len(swapped) == 2 and all(r["new_class"] == "FusedMoE" for r in swapped)
    assert result["speedup"] > 0 and result["speedup_compiled"] > 0
    for label in ("original", "optimized", "optimized+compiled"):
        assert label in text
    torch._dynamo.reset()

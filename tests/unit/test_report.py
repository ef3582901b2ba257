"""OptimizeReport: records, to_dict(), the text table, and what optimize() puts in it."""

from __future__ import annotations

import json

from torch import nn

import kernel_moe
from helpers import TopKMoE, TwoBlockModel
from kernel_moe.report import OptimizeReport, SkipRecord, SwapRecord


def _report() -> OptimizeReport:
    return OptimizeReport(
        swapped=[
            SwapRecord("layers.0.mlp", "SparseBlock", "FusedMoE", 8, 2, 1234567, "softmax>top2>renorm"),
            SwapRecord("layers.10.mlp", "SparseBlock", "FusedMoE", 16, 4, 12, ""),
        ],
        skipped=[SkipRecord("layers.1.mlp", "WeirdBlock", "expert has 4 Linear layers")],
        already_optimized=["layers.2.mlp"],
    )


def test_to_dict_holds_every_field_and_is_json_serializable():
    d = _report().to_dict()
    assert set(d) == {"swapped", "skipped", "already_optimized"}
    assert d["swapped"][0] == {
        "name": "layers.0.mlp", "original_class": "SparseBlock", "new_class": "FusedMoE", "num_experts": 8,
        "top_k": 2, "parameters": 1234567, "details": "softmax>top2>renorm",
    }
    assert d["skipped"] == [{"name": "layers.1.mlp", "module_class": "WeirdBlock",
                             "reason": "expert has 4 Linear layers"}]
    assert d["already_optimized"] == ["layers.2.mlp"]
    assert json.loads(json.dumps(d)) == d


def test_str_is_an_aligned_table_with_every_record():
    report = _report()
    text = str(report)
    lines = text.splitlines()
    assert lines[0] == report.summary()
    assert "swapped 2" in lines[0] and "skipped 1" in lines[0] and "already optimized 1" in lines[0]
    for needle in ("layers.0.mlp", "layers.10.mlp", "SparseBlock", "FusedMoE", "1,234,567", "softmax>top2>renorm",
                   "layers.1.mlp", "WeirdBlock", "expert has 4 Linear layers", "layers.2.mlp"):
        assert needle in text, needle
    header = next(line for line in lines if line.strip().startswith("module") and "experts" in line)
    rows = [line for line in lines if "SparseBlock" in line]
    assert len(rows) == 2
    # Columns line up: "original" column starts at the same offset in the header and each row.
    col = header.index("original")
    for row in rows:
        assert row[col:].startswith("SparseBlock"), row
    col = header.index("experts")
    assert rows[0][col:].startswith("8 ") and rows[1][col:].startswith("16")


def test_empty_report_is_only_the_summary():
    report = OptimizeReport()
    assert report.num_swapped == 0
    assert str(report) == report.summary()
    assert report.to_dict() == {"swapped": [], "skipped": [], "already_optimized": []}


class _Holder(nn.Module):
    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.pre = nn.Linear(16, 16)
        self.moe = block

    def forward(self, x):
        return self.moe(self.pre(x))


class _AuxLossMoE(TopKMoE):
    """Returns (output, scalar aux loss): a return value the fused layer does not reproduce."""

    def forward(self, x):
        out = super().forward(x)
        return out, out.pow(2).mean()


def test_report_of_optimize_describes_each_swap():
    model = TwoBlockModel(hidden=16, inter=24, num_experts=4, top_k=2).eval()
    params = [sum(p.numel() for p in b.parameters()) for b in model.blocks]
    report = kernel_moe.optimize(model, return_report=True)[1]
    assert [r.name for r in report.swapped] == ["blocks.0", "blocks.1"]
    for rec, n in zip(report.swapped, params):
        assert rec.original_class == "TopKMoE"
        assert rec.new_class == "FusedMoE"
        assert (rec.num_experts, rec.top_k) == (4, 2)
        assert rec.parameters == n
        assert "top2" in rec.details and "silu" in rec.details and "4x[16->24]" in rec.details
    assert report.skipped == [] and report.already_optimized == []
    text = str(report)
    assert "blocks.0" in text and "TopKMoE" in text and f"{params[0]:,}" in text


def test_report_of_optimize_lists_skips_with_reasons():
    model = _Holder(_AuxLossMoE(hidden=16)).eval()
    report = kernel_moe.optimize(model, return_report=True)[1]
    assert report.swapped == []
    assert len(report.skipped) == 1
    rec = report.skipped[0]
    assert (rec.name, rec.module_class) == ("moe", "_AuxLossMoE")
    assert "output 1 (shape [], float32) matches none of" in rec.reason  # names the output it cannot reproduce
    assert "moe" in str(report) and rec.reason in str(report)
    assert json.loads(json.dumps(report.to_dict()))["skipped"][0]["reason"] == rec.reason


def test_second_report_lists_already_optimized():
    model = TwoBlockModel().eval()
    kernel_moe.optimize(model)
    again = kernel_moe.optimize(model, return_report=True)[1]
    assert again.swapped == [] and again.skipped == []
    assert again.already_optimized == ["blocks.0", "blocks.1"]
    assert "already optimized: blocks.0, blocks.1" in str(again)

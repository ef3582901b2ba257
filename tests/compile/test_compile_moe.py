"""torch.compile(fullgraph=True) of optimized models: one graph, no breaks, eager numbers,
at most one recompilation when the number of tokens changes, and a compiled training step."""

from __future__ import annotations

import copy

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

import kernel_moe
from helpers import GRAD_TOL, TwoBlockModel, assert_fp32_close

H = 16


pytestmark = pytest.mark.usefixtures("fresh_dynamo")


def _models(bias: bool = False):
    torch.manual_seed(0)
    model = TwoBlockModel(hidden=H, inter=24, num_experts=4, top_k=2, bias=bias).eval()
    original = copy.deepcopy(model)
    assert kernel_moe.optimize(model, return_report=True)[1].num_swapped == 2
    return model, original


def _x(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "grad"])
def test_explain_reports_one_graph_and_no_breaks(grad):
    model, _ = _models()
    with torch.set_grad_enabled(grad):
        explained = torch._dynamo.explain(model)(_x(2, 7, H))
    assert explained.graph_break_count == 0, explained.break_reasons
    assert explained.graph_count == 1
    ops = [str(n.target) for g in explained.graphs for n in g.graph.nodes if n.op == "call_function"]
    assert any("kernel_moe.fused_experts" in op for op in ops), ops


def test_original_model_does_break_the_graph():
    """The check above can fail: the hand-written per-expert loop is not capturable whole."""
    _, original = _models()
    with torch.no_grad():
        explained = torch._dynamo.explain(original)(_x(2, 7, H))
    assert explained.graph_break_count > 0


def test_inductor_matches_eager_and_recompiles_at_most_once():
    model, original = _models()
    counter = CompileCounterWithBackend("inductor")
    compiled = torch.compile(model, backend=counter, fullgraph=True)
    with torch.no_grad():
        for T in (7, 13, 29, 50):
            x = _x(1, T, H, seed=T)
            assert_fp32_close(compiled(x), original(x))
    assert 1 <= counter.frame_count <= 2, counter.frame_count


def test_dynamic_compile_serves_every_batch_and_sequence_from_one_graph():
    """With dynamic=True nothing in the fused layers specializes on the token count."""
    model, original = _models(bias=True)
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, backend=counter, fullgraph=True, dynamic=True)
    with torch.no_grad():
        for shape in ((2, 5, H), (3, 5, H), (3, 11, H), (4, 9, H), (7, H)):
            x = _x(*shape)
            assert_fp32_close(compiled(x), original(x))
    # One graph per input rank (dynamo may also record an empty frame, which holds no op).
    graphs = [g for g in counter.graphs if any(n.op == "call_function" for n in g.graph.nodes)]
    assert len(graphs) == 2, [len(g.graph.nodes) for g in counter.graphs]


def test_compiled_training_step_matches_eager_gradients():
    model, original = _models(bias=True)
    model.train()
    original.train()
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, backend=counter, fullgraph=True)
    for step, T in enumerate((6, 10)):
        x = _x(2, T, H, seed=step)
        g = _x(2, T, H, seed=100 + step)
        model.zero_grad()
        original.zero_grad()
        (compiled(x) * g).sum().backward()
        (original(x) * g).sum().backward()
        for (name, p), (name_ref, p_ref) in zip(model.named_parameters(), original.named_parameters()):
            assert name == name_ref
            assert p.grad is not None, name
            torch.testing.assert_close(p.grad, p_ref.grad, **GRAD_TOL, msg=name)
    assert counter.frame_count <= 2

"""The routing functions compile with torch.compile(fullgraph=True) into a single graph."""

from __future__ import annotations

import torch
from torch._dynamo.testing import CompileCounterWithBackend

from kernel_moe.routing.capacity import apply_capacity, expert_capacity
from kernel_moe.routing.expert_choice import expert_choice_route, expert_choice_to_slots
from kernel_moe.routing.losses import load_balancing_loss, router_z_loss
from kernel_moe.routing.topk import TopKRouting, route


def _assert_same(compiled, eager):
    assert len(compiled) == len(eager)
    for c, e in zip(compiled, eager):
        assert c.dtype == e.dtype and c.shape == e.shape
        assert torch.equal(c, e)


def test_apply_capacity_and_expert_choice_compile_with_inductor_without_graph_breaks():
    torch._dynamo.reset()
    torch.manual_seed(0)
    T, E, K = 24, 6, 2
    logits_TE = torch.randn(T, E)
    weights_TK, ids_TK = route(logits_TE, TopKRouting(E, K))
    capacity = expert_capacity(T, K, E, 1.0)

    for priority in ("score", "position"):
        explained = torch._dynamo.explain(apply_capacity)(weights_TK, ids_TK, E, capacity, priority)
        assert explained.graph_break_count == 0 and explained.graph_count == 1
    explained = torch._dynamo.explain(expert_choice_route)(logits_TE, 4)
    assert explained.graph_break_count == 0 and explained.graph_count == 1

    counter = CompileCounterWithBackend("inductor")
    compiled_capacity = torch.compile(apply_capacity, backend=counter, fullgraph=True)
    result = compiled_capacity(weights_TK, ids_TK, E, capacity, "score")
    assert counter.frame_count == 1
    _assert_same(result, apply_capacity(weights_TK, ids_TK, E, capacity, "score"))
    assert int(result[3]) > 0  # the case does drop slots

    counter = CompileCounterWithBackend("inductor")
    compiled_choice = torch.compile(expert_choice_route, backend=counter, fullgraph=True)
    _assert_same(compiled_choice(logits_TE, 4), expert_choice_route(logits_TE, 4))
    assert counter.frame_count == 1


def test_routing_pipeline_is_one_graph_under_dynamic_shapes():
    """Capacity from a symbolic T, losses and Expert Choice slots: one frame for every T."""
    torch._dynamo.reset()
    E, K = 4, 2
    spec = TopKRouting(E, K)

    def pipeline(logits_TE):
        T = logits_TE.shape[0]
        weights_TK, ids_TK = route(logits_TE, spec)
        kept_TK, _, dropped_TK, num_dropped = apply_capacity(weights_TK, ids_TK, E, expert_capacity(T, K, E, 1.25))
        aux = load_balancing_loss(torch.softmax(logits_TE, dim=-1), ids_TK, E) + router_z_loss(logits_TE)
        ec_weights_EC, ec_tokens_EC = expert_choice_route(logits_TE, expert_capacity(T, 1, E, 2.0))
        slot_weights_TE, slot_ids_TE = expert_choice_to_slots(ec_weights_EC, ec_tokens_EC, T)
        return kept_TK, dropped_TK, num_dropped, aux, slot_weights_TE, slot_ids_TE

    counter = CompileCounterWithBackend("eager")
    compiled = torch.compile(pipeline, backend=counter, fullgraph=True, dynamic=True)
    for T in (7, 10, 33):
        logits_TE = torch.randn(T, E, generator=torch.Generator().manual_seed(T))
        result, expected = compiled(logits_TE), pipeline(logits_TE)
        for c, e in zip(result, expected):
            torch.testing.assert_close(c, e, atol=1e-6, rtol=1e-6)
    assert counter.frame_count == 1

"""Attribution of a profiled call to stages (kernel_moe.bench.stages), on hand-built event trees
whose times are known, and the sub-module roles the profiler marks."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from kernel_moe.bench.models import NaiveMoE
from kernel_moe.bench.stages import MODULE_RANGE, STAGE_KEYS, STEP_RANGE, attribute_step, module_roles
from kernel_moe.kernels.annotate import COMBINE, DISPATCH, DOWN, FUSED, GATING, ROUTER, UP


class _Clock:
    """Builds events one after the other: ``ev(name, self_us, children)`` lasts its own time
    plus its children's, which start after a first slice of its own time."""

    def __init__(self) -> None:
        self.t = 0.0

    def ev(self, name: str, self_us: float = 1.0, children=(), kernels_us=()):
        start = self.t
        self.t += self_us / 2
        kids = [c() for c in children]
        self.t += self_us / 2
        return SimpleNamespace(name=name, cpu_children=kids, time_range=_Range(start, self.t),
                               kernels=[SimpleNamespace(duration=k) for k in kernels_us])


class _Range:
    def __init__(self, start: float, end: float) -> None:
        self.start, self.end = start, end

    def elapsed_us(self) -> float:
        return self.end - self.start


def _tree(spec, clock: _Clock):
    """spec: (name, self_us, [child specs]) -> a thunk building the event when called in order."""
    name, self_us, children = spec
    return lambda: clock.ev(name, self_us, [_tree(c, clock) for c in children])


def _attribute(children, classify: bool, step_self_us: float = 2.0) -> dict[str, float]:
    clock = _Clock()
    step = _tree((STEP_RANGE, step_self_us, children), clock)()
    seconds = attribute_step(step, classify)
    assert sum(seconds.values()) == pytest.approx(step.time_range.elapsed_us() * 1e-6)
    assert set(seconds) == set(STAGE_KEYS)
    return {k: round(v * 1e6, 6) for k, v in seconds.items() if v}


def test_our_ranges_name_their_stage_and_the_rest_is_other():
    linear = ("aten::linear", 3.0, [("aten::mm", 2.0, [])])
    got = _attribute([
        (ROUTER, 1.0, [linear]),
        (GATING, 1.0, [("aten::softmax", 2.0, []), ("aten::topk", 2.0, [])]),
        ("aten::reshape", 1.0, []),
        (DISPATCH, 1.0, [("aten::sort", 4.0, [])]),
        (FUSED, 10.0, []),
    ], classify=False)
    assert got == {"router": 6.0, "gating": 5.0, "dispatch": 5.0, "fused": 10.0, "other": 3.0}


def test_a_nested_range_takes_its_own_time_from_the_enclosing_one():
    got = _attribute([(DOWN, 2.0, [("aten::mm", 5.0, []), (COMBINE, 1.0, [("aten::index_add_", 3.0, [])])])],
                     classify=False)
    assert got == {"down": 7.0, "combine": 4.0, "other": 2.0}


def test_the_hand_written_block_is_attributed_by_sub_module_and_by_op():
    """NaiveMoE's sequence: gate Linear, softmax / top-k / renormalisation, output buffer, then per
    expert: where, gather, the expert MLP (gate_proj, up_proj, activation, down_proj), the
    routing weight, scale, index_add."""
    linear = ("aten::linear", 2.0, [("aten::matmul", 1.0, [("aten::mm", 3.0, [])])])  # 6 us
    expert_loop = [
        ("aten::where", 1.0, []), ("aten::index", 2.0, []),
        (MODULE_RANGE + "expert", 1.0, [
            (MODULE_RANGE + "up_proj", 0.5, [linear]), ("aten::silu", 1.0, []),
            (MODULE_RANGE + "up_proj", 0.5, [linear]), ("aten::mul", 1.0, []),
            (MODULE_RANGE + "down_proj", 0.5, [linear]),
        ]),
        ("aten::index", 1.0, []), ("aten::mul", 1.0, []), ("aten::index_add_", 2.0, []),
    ]
    got = _attribute([
        (MODULE_RANGE + "router", 1.0, [linear]),
        ("aten::_to_copy", 1.0, []), ("aten::softmax", 1.0, []), ("aten::topk", 2.0, []), ("aten::sum", 1.0, []),
        ("aten::div", 1.0, []), ("aten::zeros_like", 1.0, []),
        *expert_loop, *expert_loop,
    ], classify=True)
    # per expert: the expert module's own time, activation and product are "up" with its up / gate
    # Linear (hook 0.5 + 6 each); after the expert, weight, scale and index_add are "combine"
    assert got == {"router": 6.0, "gating": 6.0, "dispatch": 2 * 3.0, "up": 2 * (1 + 1 + 1 + 2 * 6.5),
                   "down": 2 * 6.5, "combine": 1.0 + 2 * 4.0, "other": 1.0 + 2.0}


def test_stacked_experts_alternate_up_and_down_by_matrix_product():
    """transformers' eager experts: buffer, one_hot mask, then per expert: where, gather, the
    gate_up GEMM, chunk, activation, product, the down GEMM, the weight, scale, index_add."""
    per_expert = [("aten::where", 1.0, []), ("aten::index", 1.0, []), ("aten::linear", 4.0, []),
                  ("aten::chunk", 1.0, []), ("aten::silu", 1.0, []), ("aten::mul", 1.0, []),
                  ("aten::linear", 3.0, []), ("aten::index", 1.0, []), ("aten::mul", 1.0, []),
                  ("aten::index_add_", 1.0, [])]
    got = _attribute([
        (MODULE_RANGE + "router", 1.0, [("aten::linear", 2.0, []), ("aten::softmax", 1.0, []),
                                        ("aten::topk", 1.0, [])]),
        (MODULE_RANGE + "experts", 2.0, [("aten::zeros_like", 1.0, []), ("aten::one_hot", 1.0, []),
                                         ("aten::permute", 1.0, []), *per_expert, *per_expert]),
    ], classify=True)
    # the module ranges' own time (hooks, Python) is "other"
    assert got == {"router": 2.0, "gating": 2.0, "dispatch": 2.0 + 2 * 2.0, "up": 2 * 7.0, "down": 2 * 3.0,
                   "combine": 1.0 + 2 * 3.0, "other": 1.0 + 2.0 + 2.0}


def test_a_shared_expert_and_what_follows_it_are_their_own_stage():
    got = _attribute([
        (MODULE_RANGE + "shared", 1.0, [("aten::linear", 5.0, [])]),
        (FUSED, 6.0, []),
        (MODULE_RANGE + "shared", 1.0, [("aten::linear", 1.0, [])]),
        ("aten::sigmoid", 1.0, []), ("aten::mul", 1.0, []), ("aten::add", 1.0, []),
    ], classify=False)
    assert got == {"shared": 11.0, "fused": 6.0, "other": 2.0}


def test_on_a_device_stages_take_their_kernels_time_and_other_the_gaps():
    clock = _Clock()
    up = lambda: clock.ev(UP, 5.0, kernels_us=(30.0,))  # noqa: E731
    down = lambda: clock.ev(DOWN, 5.0, kernels_us=(10.0, 5.0))  # noqa: E731
    step = clock.ev(STEP_RANGE, 50.0, [up, down])
    seconds = {k: round(v * 1e6, 6) for k, v in attribute_step(step, False, device_time=True).items() if v}
    assert seconds == {"up": 30.0, "down": 15.0, "other": 15.0}


def test_module_roles_of_a_hand_written_block():
    block = NaiveMoE(8, 16, 3, 2)
    roles = [(role, module) for module, role in module_roles(block)]
    assert roles[0] == ("router", block.gate)
    assert [r for r, _ in roles].count("expert") == 3
    assert [m for r, m in roles if r == "down_proj"] == [e.down_proj for e in block.experts]
    assert [m for r, m in roles if r == "up_proj"] == [p for e in block.experts for p in (e.gate_proj, e.up_proj)]


def test_module_roles_of_a_transformers_block_with_a_shared_expert():
    transformers = pytest.importorskip("transformers")
    config = transformers.Qwen2MoeConfig(hidden_size=16, intermediate_size=32, moe_intermediate_size=8,
                                         shared_expert_intermediate_size=16, num_experts=4, num_experts_per_tok=2,
                                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                                         vocab_size=32)
    torch.manual_seed(0)
    block = transformers.Qwen2MoeForCausalLM(config).model.layers[0].mlp
    roles = {role: module for module, role in module_roles(block)}
    assert roles["router"] is block.gate and roles["experts"] is block.experts
    assert [m for m, r in module_roles(block) if r == "shared"] == [block.shared_expert, block.shared_expert_gate]

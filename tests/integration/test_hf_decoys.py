"""Decoys for the recognition of the newer transformers families: a real tiny block with one part
changed so that it looks the same (same classes, attributes and declared numbers) but computes
something else. Each must be left unfused (skipped, with a reason), and the optimized model must
still give the original's outputs: recognition proposes, only the computation decides.

The blocks these decoys imitate are fused whole in tests/integration/test_hf_families.py.
"""

from __future__ import annotations

import copy
import types
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import kernel_moe
from kernel_moe import FusedMoE

pytest.importorskip("transformers")

from tests.integration.hf_tiny import (  # noqa: E402
    build_tiny_model,
    first_tensor,
    forward_module,
    moe_model_types,
    tiny_inputs,
)

FP32 = dict(atol=1e-5, rtol=1e-5)


def _build(model_type: str, **overrides):
    if model_type not in moe_model_types():
        pytest.skip(f"{model_type} is not in this transformers")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = build_tiny_model(model_type, seed=23, **overrides)
    try:
        model.set_experts_implementation("eager")  # the decoys change what the eager loop calls
    except Exception:  # noqa: BLE001 - models without the experts interface loop in eager anyway
        pass
    return model


def _blocks(model, cls_suffix: str) -> list[str]:
    return [n for n, m in model.named_modules() if type(m).__name__.endswith(cls_suffix)]


def assert_decoys_left_alone(model, decoys: list[str]) -> None:
    """optimize() fuses none of ``decoys`` (each named in the report's skips), and the model's
    output equals the decoy model's own."""
    assert decoys
    original = copy.deepcopy(model)
    report = kernel_moe.optimize(model, return_report=True)[1]
    skipped = {r.name: r.reason for r in report.skipped}
    for name in decoys:
        assert not isinstance(model.get_submodule(name), FusedMoE), name
        assert skipped.get(name), f"{name} is not in the report's skips: {skipped}"
    for batch, seq in ((2, 9), (1, 3)):
        inputs = tiny_inputs(model, batch=batch, seq=seq, seed=seq)
        with torch.no_grad():
            out = first_tensor(forward_module(model)(**inputs))
            ref = first_tensor(forward_module(original)(**inputs))
        torch.testing.assert_close(out, ref, **FP32)


class _ScaledSoftcap(nn.Module):
    """Declares ``softcap`` but caps at twice it."""

    def __init__(self, softcap: float) -> None:
        super().__init__()
        self.softcap = softcap

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x / (2 * self.softcap)) * 2 * self.softcap


class _LeakyRelu2(nn.Module):
    """relu(x)^2 plus a small linear leak: close to relu^2, but not it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(x).square() + 0.05 * x


class _PowSoftplus(nn.Module):
    """softplus(x)^0.6, where the real router takes softplus(x)^0.5."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.softplus(x).pow(0.6)


class _Doubled(nn.Module):
    """An 'identity' expert that doubles its input."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 2 * x


def test_swiglu_clamped_below_its_declared_limit_is_skipped():
    model = _build("hy_v4")
    names = _blocks(model, "MoE")
    for name in names:
        experts = model.get_submodule(name).experts

        def half_limit_gate(self, gate_up: torch.Tensor) -> torch.Tensor:
            gate, up = gate_up.chunk(2, dim=-1)
            lim = self.swiglu_limit / 2
            return F.silu(gate.clamp(max=lim)) * up.clamp(min=-lim, max=lim)

        experts._apply_gate = types.MethodType(half_limit_gate, experts)
    assert_decoys_left_alone(model, names)


def test_softcap_other_than_the_declared_one_is_skipped():
    model = _build("inkling2_text")
    names = [n for n in _blocks(model, "MoE") + _blocks(model, "SparseMoeBlock") if hasattr(model.get_submodule(n),
                                                                                           "experts")]
    for name in names:
        act_fn = model.get_submodule(name).experts.act_fn
        act_fn.up_softcap = _ScaledSoftcap(act_fn.up_softcap.softcap)
    assert_decoys_left_alone(model, names)


def test_activation_close_to_relu_squared_is_skipped():
    model = _build("nemotron_h")
    names = _blocks(model, "MoE")
    for name in names:
        model.get_submodule(name).experts.act_fn = _LeakyRelu2()
    assert_decoys_left_alone(model, names)


def test_router_scoring_close_to_sqrt_softplus_is_skipped():
    model = _build("deepseek_v4")
    names = [n for n in _blocks(model, "SparseMoeBlock") if not model.get_submodule(n).is_hash]
    for name in names:
        model.get_submodule(name).gate.score_fn = _PowSoftplus()
    assert_decoys_left_alone(model, names)


def test_hash_router_reading_another_row_of_its_table_is_skipped():
    model = _build("deepseek_v4")
    names = [n for n in _blocks(model, "SparseMoeBlock") if model.get_submodule(n).is_hash]
    for name in names:
        gate = model.get_submodule(name).gate

        def shifted_forward(self, hidden_states: torch.Tensor, input_ids: torch.Tensor):
            flat = hidden_states.reshape(-1, self.hidden_dim)
            logits = F.linear(flat, self.weight)
            scores = self.score_fn(logits)
            ids_T = (input_ids.reshape(-1) + 1) % self.tid2eid.shape[0]  # the next token's row
            indices = self.tid2eid[ids_T].long()
            weights = scores.gather(1, indices)
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
            return logits, weights * self.routed_scaling_factor, indices

        gate.forward = types.MethodType(shifted_forward, gate)
    assert_decoys_left_alone(model, names)


def test_identity_experts_that_scale_their_input_are_skipped():
    model = _build("longcat_flash")
    names = _blocks(model, "MoE")
    for name in names:
        model.get_submodule(name).experts.identity_expert = _Doubled()
    assert_decoys_left_alone(model, names)


def test_capacity_that_keeps_the_last_tokens_is_skipped():
    model = _build("switch_transformers")
    names = _blocks(model, "SparseMLP")
    for name in names:
        router = model.get_submodule(name).router

        def last_first_forward(self, hidden_states: torch.Tensor):
            logits = self.classifier(hidden_states.to(self.dtype))
            probs = F.softmax(logits, dim=-1, dtype=self.dtype).to(hidden_states.dtype)
            onehot = F.one_hot(probs.argmax(dim=-1), num_classes=self.num_experts)  # [B, S, E]
            priority = onehot.flip(-2).cumsum(dim=-2).flip(-2)  # counted from the end of the sequence
            return onehot * (priority <= self.expert_capacity), probs.max(dim=-1).values.unsqueeze(-1), logits

        router.forward = types.MethodType(last_first_forward, router)
    # a probe long enough to overflow the capacity is what tells the two orders apart
    assert_decoys_left_alone(model, names)


def test_input_scaling_by_the_root_of_the_score_is_skipped():
    model = _build("llama4_text")
    names = _blocks(model, "TextMoe")
    for name in names:
        router = model.get_submodule(name).router

        def root_forward(self, hidden_states: torch.Tensor):
            logits = F.linear(hidden_states, self.weight)
            top, ids = torch.topk(logits, self.top_k, dim=1)
            scores = torch.full_like(logits, float("-inf")).scatter_(1, ids, top).sigmoid().sqrt()
            return scores, logits

        router.forward = types.MethodType(root_forward, router)
    assert_decoys_left_alone(model, names)


class _NormThenScale(nn.Module):
    """MuseSpark's post-expert norm with its order swapped: RMS-normalise, then scale by 1 + w (the
    same weight and eps; the real one scales first)."""

    def __init__(self, weight: nn.Parameter, eps: float) -> None:
        super().__init__()
        self.weight, self.eps = weight, eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x.float()
        return (y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + self.eps) * (1.0 + self.weight)).type_as(x)


def test_post_expert_norm_that_scales_after_normalising_is_skipped():
    """Neither the block nor its experts module alone is fused: the op's norm scales first."""
    model = _build("muse_spark_text")
    blocks = _blocks(model, "SparkMoE")
    for name in blocks:
        experts = model.get_submodule(name).experts
        norm = experts.post_expert_norm
        experts.post_expert_norm = _NormThenScale(norm.weight, norm.eps)
    assert_decoys_left_alone(model, blocks + [f"{n}.experts" for n in blocks])


def test_block_normalising_the_experts_output_instead_of_their_input_is_skipped():
    """The same children in the same order, but pre_expert_norm applied after the experts."""
    model = _build("muse_spark_text")
    blocks = _blocks(model, "SparkMoE")
    for name in blocks:
        block = model.get_submodule(name)

        def norm_after(self, hidden_states: torch.Tensor) -> torch.Tensor:
            shape = hidden_states.shape
            _, weights, ids = self.gate(hidden_states)
            x = self.pre_expert_proj(hidden_states.view(-1, shape[-1]))
            x = self.pre_expert_norm(self.experts(x, ids, weights))
            return self.post_expert_proj(x).view(*shape)

        block.forward = types.MethodType(norm_after, block)
    assert_decoys_left_alone(model, blocks)


def test_router_scaling_its_logits_by_another_factor_is_skipped():
    """A router declaring output_multiplier m but scaling its logits by m squared."""
    model = _build("muse_spark_text")
    blocks = _blocks(model, "SparkMoE")
    for name in blocks:
        gate = model.get_submodule(name).gate
        plain = type(gate).forward

        def squared(self, hidden_states: torch.Tensor, plain=plain):
            m = self.output_multiplier
            self.output_multiplier = m * m
            try:
                return plain(self, hidden_states)
            finally:
                self.output_multiplier = m

        gate.forward = types.MethodType(squared, gate)
    assert_decoys_left_alone(model, blocks)


def test_block_normalising_only_its_shared_expert_is_skipped():
    """A.X-K1's block with its post_mlp_layernorm applied to the shared expert's output alone
    (neither the block output nor the routed output)."""
    model = _build("axk1")
    blocks = _blocks(model, "AXK1MoE")
    for name in blocks:
        block = model.get_submodule(name)

        def norm_shared(self, hidden_states: torch.Tensor) -> torch.Tensor:
            shape = hidden_states.shape
            _, weights, ids = self.gate(hidden_states)
            routed = self.experts(hidden_states.view(-1, shape[-1]), ids, weights).view(*shape)
            return routed + self.post_mlp_layernorm(self.shared_experts(hidden_states))

        block.forward = types.MethodType(norm_shared, block)
    assert_decoys_left_alone(model, blocks)


def test_sparsemixer_at_another_threshold_than_the_declared_one_is_skipped():
    """A Phi-3.5-MoE router declaring router_jitter_noise eps but masking at 3 * eps (wide enough
    for the probe's tokens to show it)."""
    from transformers.models.phimoe import modeling_phimoe

    model = _build("phimoe", router_jitter_noise=0.1)
    blocks = _blocks(model, "SparseMoeBlock")
    for name in blocks:
        router = model.get_submodule(name).router

        def wider(self, hidden_states: torch.Tensor):
            logits = F.linear(hidden_states, self.weight)
            weights, ids = modeling_phimoe.sparsemixer(logits, jitter_eps=3 * self.router_jitter_noise,
                                                       training=self.training, top_k=self.top_k)
            return logits, weights, ids

        router.forward = types.MethodType(wider, router)
    assert_decoys_left_alone(model, blocks)


def test_nllb_moe_experts_that_ignore_their_router_are_skipped_with_that_reason():
    """transformers' NLLB-MoE container runs expert_0 and expert_1 by the values of the top-1 mask,
    whatever expert the router chose: the report says so (not the padding_mask argument)."""
    model = _build("nllb-moe")
    blocks = _blocks(model, "SparseMLP")
    report = kernel_moe.optimize(copy.deepcopy(model), return_report=True)[1]
    reasons = {r.name: r.reason for r in report.skipped}
    for name in blocks:
        assert "does not run the experts its router chooses" in reasons[name], reasons.get(name)
    assert_decoys_left_alone(model, blocks)


def test_shared_experts_weighted_apart_from_the_routed_ones_are_skipped():
    """An Inkling router renormalising its shared ids' scores among themselves (the real one
    divides the chosen and the shared scores by one sum)."""
    model = _build("inkling_text", n_shared_experts=2)
    blocks = _blocks(model, "InklingMoE")
    for name in blocks:
        gate = model.get_submodule(name).gate

        def apart(self, hidden_states: torch.Tensor):
            logits = F.linear(hidden_states.reshape(-1, self.hidden_dim).float(), self.weight.float())
            scores = logits.sigmoid()
            routed, shared = scores[:, : self.num_experts], scores[:, self.num_experts:]
            ids = torch.topk(routed + self.e_score_correction_bias, self.top_k, dim=-1, sorted=False)[1]
            chosen = routed.gather(-1, ids)
            scale = self.route_scale * self.global_scale
            return (logits[:, : self.num_experts], chosen / chosen.sum(-1, keepdim=True) * scale, ids,
                    shared / shared.sum(-1, keepdim=True) * scale)

        gate.forward = types.MethodType(apart, gate)
    assert_decoys_left_alone(model, blocks)


def test_zaya_mlp_router_is_named_as_the_blocker():
    """Zaya scores its experts with an MLP (over a state carried between layers): the block is
    skipped saying so, and its experts module alone is swapped."""
    model = _build("zaya")
    blocks = _blocks(model, "SparseMoeBlock")
    report = kernel_moe.optimize(copy.deepcopy(model), return_report=True)[1]
    reasons = {r.name: r.reason for r in report.skipped}
    for name in blocks:
        assert "computes the logits with an MLP" in reasons[name], reasons.get(name)
    assert {r.name for r in report.swapped} == {f"{n}.experts" for n in blocks}

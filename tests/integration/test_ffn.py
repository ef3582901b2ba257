"""Dense FFNs (opt-in with KernelConfig.for_ffn / swap_ffn=True): Linear -> act -> Linear (also as
an nn.Sequential), SwiGLU gate/up/down like transformers' LlamaMLP, with and without biases.

Swapped FFNs compute what the originals compute (fp32), keep state_dict and Parameters,
restore exactly, compile with fullgraph=True without graph breaks and train with equal
gradients; FFNs with dropout train through the original module; for_moe() leaves FFNs alone;
filter_fn(module, fqn) decides what may be swapped.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_same_grads, assert_same_state, param_ids, snapshot_state
from torch import nn

import kernel_moe
from kernel_moe import KernelConfig
from kernel_moe.layers import FusedFFN

H, I = 24, 40
FFN_TOL = dict(atol=1e-5, rtol=1e-5)


class TwoLayer(nn.Module):
    """fc1 -> activation (functional) -> fc2."""

    def __init__(self, act: str = "relu", bias: bool = True) -> None:
        super().__init__()
        self.fc1 = nn.Linear(H, I, bias=bias)
        self.fc2 = nn.Linear(I, H, bias=bias)
        self.act = act

    def forward(self, x):
        h = self.fc1(x)
        h = F.relu(h) if self.act == "relu" else F.gelu(h, approximate="tanh")
        return self.fc2(h)


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)), registered up-first so the gate is found by computation."""

    def __init__(self, bias: bool = False) -> None:
        super().__init__()
        self.up_proj = nn.Linear(H, I, bias=bias)
        self.gate_proj = nn.Linear(H, I, bias=bias)
        self.down_proj = nn.Linear(I, H, bias=bias)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def _llama_mlp(bias: bool) -> nn.Module:
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaMLP

    cfg = LlamaConfig(hidden_size=H, intermediate_size=I, num_attention_heads=4, num_key_value_heads=2, mlp_bias=bias,
                      hidden_act="silu")
    return LlamaMLP(cfg)


FFNS = {
    "sequential_gelu": lambda: nn.Sequential(nn.Linear(H, I), nn.GELU(), nn.Linear(I, H)),
    "sequential_silu_nobias": lambda: nn.Sequential(nn.Linear(H, I, bias=False), nn.SiLU(), nn.Linear(I, H, bias=False)),
    "two_layer_relu_bias": lambda: TwoLayer("relu"),
    "two_layer_gelu_tanh": lambda: TwoLayer("gelu_tanh", bias=False),
    "swiglu": lambda: SwiGLU(),
    "swiglu_bias": lambda: SwiGLU(bias=True),
    "llama_mlp": lambda: _llama_mlp(False),
    "llama_mlp_bias": lambda: _llama_mlp(True),
}


class Holder(nn.Module):
    """A residual layer around an FFN, so that the FFN is a child that can be swapped in place."""

    def __init__(self, ffn: nn.Module) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(H)
        self.ffn = ffn

    def forward(self, x):
        return x + self.ffn(self.norm(x))


def _holder(name: str, seed: int = 0) -> Holder:
    if name.startswith("llama"):
        pytest.importorskip("transformers")
    torch.manual_seed(seed)
    return Holder(FFNS[name]()).eval()


def _x(*shape, seed: int = 1) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _rel_close(out: torch.Tensor, ref: torch.Tensor) -> None:
    """fp32 within 1e-5 relative to the output scale (the op accumulates in another order)."""
    scale = ref.abs().max().item() if ref.numel() else 1.0
    torch.testing.assert_close(out, ref, atol=1e-5 * max(scale, 1.0), rtol=1e-5)


@pytest.mark.parametrize("name", list(FFNS))
def test_ffn_is_swapped_and_computes_the_same(name):
    model = _holder(name)
    original = copy.deepcopy(model)
    report = kernel_moe.optimize(model, KernelConfig.for_ffn(), return_report=True)[1]
    assert [r.name for r in report.swapped] == ["ffn"], report
    assert isinstance(model.ffn, FusedFFN)
    assert report.skipped == []
    for shape in ((2, 7, H), (1, H), (0, H), (5, H)):
        x = _x(*shape)
        with torch.no_grad():
            _rel_close(model(x), original(x))


@pytest.mark.parametrize("name", ["sequential_gelu", "swiglu", "llama_mlp"])
def test_for_moe_leaves_dense_ffns_alone(name):
    model = _holder(name)
    report = kernel_moe.optimize(model, KernelConfig.for_moe(), return_report=True)[1]
    assert report.swapped == [] and report.skipped == []
    assert not isinstance(model.ffn, FusedFFN)
    report = kernel_moe.optimize(model, return_report=True)[1]  # the default config is for_moe()
    assert report.swapped == []


@pytest.mark.parametrize("name", ["two_layer_relu_bias", "swiglu_bias", "llama_mlp"])
def test_state_dict_parameters_and_restore(name):
    model = _holder(name)
    snap = snapshot_state(model)
    ids = param_ids(model)
    ffn = model.ffn
    x = _x(3, 5, H)
    with torch.no_grad():
        before = model(x)
    kernel_moe.optimize(model, KernelConfig.for_ffn())
    assert isinstance(model.ffn, FusedFFN)
    assert_same_state(model, snap)
    assert param_ids(model) == ids
    assert kernel_moe.restore(model) is model
    assert model.ffn is ffn
    assert_same_state(model, snap)
    assert param_ids(model) == ids
    with torch.no_grad():
        assert torch.equal(model(x), before)


@pytest.mark.parametrize("name", ["sequential_gelu", "swiglu", "llama_mlp_bias"])
def test_compiles_fullgraph_without_graph_breaks(name):
    torch._dynamo.reset()
    model = _holder(name)
    original = copy.deepcopy(model)
    kernel_moe.optimize(model, KernelConfig.for_ffn())
    x = _x(2, 6, H)
    with torch.no_grad():
        explained = torch._dynamo.explain(model)(x)
        assert explained.graph_break_count == 0, explained.break_reasons
        assert explained.graph_count == 1
        out = torch.compile(model, fullgraph=True, backend="aot_eager")(x)
        _rel_close(out, original(x))
    torch._dynamo.reset()


@pytest.mark.parametrize("name", list(FFNS))
def test_training_gradients_equal_the_original(name):
    model = _holder(name).train()
    original = copy.deepcopy(model)
    kernel_moe.optimize(model, KernelConfig.for_ffn())
    assert model.ffn.spec.training_fallback is None
    x = _x(4, 3, H, seed=2)
    target = _x(4, 3, H, seed=3)
    loss = F.mse_loss(model(x), target)
    loss_ref = F.mse_loss(original(x), target)
    torch.testing.assert_close(loss, loss_ref, atol=1e-6, rtol=1e-5)
    loss.backward()
    loss_ref.backward()
    assert_same_grads(model, original)


def test_dropout_trains_through_the_original_and_the_report_says_so():
    torch.manual_seed(0)
    model = Holder(nn.Sequential(nn.Linear(H, I), nn.GELU(), nn.Dropout(0.25), nn.Linear(I, H))).eval()
    original = copy.deepcopy(model)
    report = kernel_moe.optimize(model, KernelConfig.for_ffn(), return_report=True)[1]
    assert isinstance(model.ffn, FusedFFN)
    assert model.ffn.spec.training_fallback is not None
    assert "training runs the original" in report.swapped[0].details
    assert "stochastic" in report.swapped[0].details
    x = _x(3, 4, H)
    with torch.no_grad():
        _rel_close(model(x), original(x))  # eval: the fused path, dropout off
    model.train()
    original.train()
    torch.manual_seed(5)
    out = model(x)
    torch.manual_seed(5)
    ref = original(x)
    assert torch.equal(out, ref)  # training: the original module, the same dropout draws
    out.sum().backward()
    assert model.ffn.original[0].weight.grad is not None


def test_filter_fn_gets_module_and_fqn_and_selects_what_is_swapped():
    torch.manual_seed(0)

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.first = Holder(SwiGLU())
            self.second = Holder(nn.Sequential(nn.Linear(H, I), nn.ReLU(), nn.Linear(I, H)))
            self.head = nn.Linear(H, 3)

        def forward(self, x):
            return self.head(self.second(self.first(x)))

    model = Net().eval()
    original = copy.deepcopy(model)
    seen = []

    def only_second(module: nn.Module, fqn: str) -> bool:
        seen.append((fqn, type(module).__name__))
        return not fqn.startswith("first")

    report = kernel_moe.optimize(model, KernelConfig.for_ffn(), filter_fn=only_second, return_report=True)[1]
    assert [r.name for r in report.swapped] == ["second.ffn"]
    assert isinstance(model.second.ffn, FusedFFN) and isinstance(model.first.ffn, SwiGLU)
    assert ("first.ffn", "SwiGLU") in seen and ("second.ffn", "Sequential") in seen
    x = _x(2, 3, H)
    with torch.no_grad():
        _rel_close(model(x), original(x))


def test_whole_llama_model_swaps_every_mlp_and_keeps_logits():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=H, intermediate_size=I, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    original = copy.deepcopy(model)
    report = kernel_moe.optimize(model, KernelConfig.for_ffn(), return_report=True)[1]
    assert [r.name for r in report.swapped] == ["model.layers.0.mlp", "model.layers.1.mlp"]
    assert report.skipped == []
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        out, ref = model(ids).logits, original(ids).logits
    _rel_close(out, ref)

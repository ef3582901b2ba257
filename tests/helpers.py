"""Helpers shared by the core tests: op inputs, comparisons, tiny MoE models, state checks.

Legend: T tokens, H hidden, E experts, K top-k, I intermediate, N up features (2*I gated, else I).
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from kernel_moe.kernels.cpu import extension as cpu_kernels
from kernel_moe.kernels.contract import Activation
from kernel_moe.reference.moe import naive_moe_experts

FP32_TOL = dict(atol=1e-5, rtol=1e-5)
GRAD_TOL = dict(atol=1e-4, rtol=1e-4)
LOW_TOL = dict(atol=2e-2, rtol=2e-2)
MIN_SQNR_DB = 30.0


# --- comparisons -------------------------------------------------------------------------


def sqnr_db(out: torch.Tensor, ref: torch.Tensor) -> float:
    """Signal-to-quantisation-noise ratio of ``out`` against ``ref``, in dB (inf when equal)."""
    ref = ref.double()
    noise = (out.double() - ref).pow(2).sum().item()
    signal = ref.pow(2).sum().item()
    if noise == 0.0:
        return math.inf
    return 10.0 * math.log10(signal / noise)


def assert_fp32_close(out: torch.Tensor, ref: torch.Tensor, **tol) -> None:
    """fp32 outputs against the reference: atol/rtol 1e-5 unless told otherwise."""
    assert out.shape == ref.shape, (tuple(out.shape), tuple(ref.shape))
    assert out.dtype == ref.dtype, (out.dtype, ref.dtype)
    torch.testing.assert_close(out, ref, **{**FP32_TOL, **tol})


def assert_low_precision_close(out: torch.Tensor, ref_fp32: torch.Tensor, min_sqnr: float = MIN_SQNR_DB) -> None:
    """bf16/fp16 outputs against an fp32 reference of the same inputs: 2e-2 and an SQNR floor."""
    assert out.shape == ref_fp32.shape, (tuple(out.shape), tuple(ref_fp32.shape))
    assert ref_fp32.dtype == torch.float32
    torch.testing.assert_close(out.float(), ref_fp32, **LOW_TOL)
    if ref_fp32.numel():
        snr = sqnr_db(out, ref_fp32)
        assert snr >= min_sqnr, f"SQNR {snr:.1f} dB < {min_sqnr} dB"


def assert_bf16_matches_fp32_reference(module: nn.Module, reference: nn.Module, x: torch.Tensor) -> None:
    """``module`` in bf16 on bf16 ``x`` returns bf16 within the low-precision tolerance of
    ``reference`` (the same bf16-rounded weights, in fp32) on ``x`` in fp32."""
    with torch.no_grad():
        out = module(x)
        ref = reference(x.float())
    assert out.dtype == torch.bfloat16
    assert_low_precision_close(out, ref)


# --- op inputs ---------------------------------------------------------------------------


def op_inputs(
    T: int,
    H: int,
    I: int,
    E: int,
    K: int,
    *,
    glu: str = "concat",
    bias: bool = False,
    dtype: torch.dtype = torch.float32,
    routing: str = "random",
    seed: int = 0,
) -> dict:
    """Random inputs of ``kernel_moe::fused_experts`` with outputs of order one.

    ``routing``: "random" (top-k of random logits: distinct experts per token), "one" (every
    token to experts 0..K-1), "few" (only experts 0 and E-1 ever chosen, K <= 2).
    Routing weights are fp32 (what the routers produce); everything else is in ``dtype``.
    """
    g = torch.Generator().manual_seed(seed)
    N = 2 * I if glu != "none" else I
    x_TH = torch.randn(T, H, generator=g)
    if routing == "random":
        logits_TE = torch.randn(T, E, generator=g)
        weights_TK, ids_TK = torch.softmax(logits_TE, dim=-1).topk(K, dim=-1)
    elif routing == "one":
        ids_TK = torch.arange(K).expand(T, K).clone()
        weights_TK = torch.rand(T, K, generator=g) + 0.1
    elif routing == "few":
        assert K <= 2
        ids_TK = torch.tensor([0, E - 1][:K]).expand(T, K).clone()
        weights_TK = torch.rand(T, K, generator=g) + 0.1
    else:
        raise ValueError(routing)
    w_up_ENH = torch.randn(E, N, H, generator=g) / math.sqrt(H)
    w_down_EHI = torch.randn(E, H, I, generator=g) / math.sqrt(I)
    b_up_EN = torch.randn(E, N, generator=g) * 0.1 if bias else None
    b_down_EH = torch.randn(E, H, generator=g) * 0.1 if bias else None

    def cast(t):
        return None if t is None else t.to(dtype)

    return dict(
        x=cast(x_TH),
        topk_weights=weights_TK.contiguous(),
        topk_ids=ids_TK.contiguous(),
        w_up=cast(w_up_ENH),
        w_down=cast(w_down_EHI),
        b_up=cast(b_up_EN),
        b_down=cast(b_down_EH),
    )


def as_fp32(inputs: dict) -> dict:
    """The same inputs with every floating tensor upcast to fp32 (for a reference)."""
    return {k: (v.float() if isinstance(v, torch.Tensor) and v.is_floating_point() else v) for k, v in inputs.items()}


def limit_for(glu: str, limit: float = 7.0) -> float:
    """A clamp limit for a gated layout (clamping gate and up); none (inf) for glu='none'."""
    return limit if glu != "none" else math.inf


def run_op(inputs: dict, activation: str = "silu", glu: str = "concat", alpha: float = 1.702,
           limit: float = math.inf, backend: str = "auto") -> torch.Tensor:
    """``torch.ops.kernel_moe.fused_experts`` on a dict from :func:`op_inputs` (optional entries
    ``expert_map``, ``softcaps`` (gate, up) and ``scale_inputs`` are passed too)."""
    i = inputs
    gate_cap, up_cap = i.get("softcaps", (math.inf, math.inf))
    return torch.ops.kernel_moe.fused_experts(
        i["x"], i["topk_weights"], i["topk_ids"], i["w_up"], i["w_down"], i["b_up"], i["b_down"], i.get("expert_map"),
        i.get("w_up_scale"), i.get("w_down_scale"), activation, glu, alpha, limit, gate_cap, up_cap,
        i.get("scale_inputs", False), i.get("weight_format", "full"), backend,
    )


def run_reference(inputs: dict, activation: str = "silu", glu: str = "concat", alpha: float = 1.702,
                  limit: float = math.inf) -> torch.Tensor:
    """The truth: ``naive_moe_experts`` on the same inputs (with ``scale_inputs``: the sum over
    slots of the reference on the weight-scaled input, each slot alone with weight 1)."""
    i = inputs
    act = Activation(activation, glu, alpha, limit, *i.get("softcaps", (math.inf, math.inf)))
    if not i.get("scale_inputs", False):
        return naive_moe_experts(i["x"], i["topk_weights"], i["topk_ids"], i["w_up"], i["w_down"], i["b_up"],
                                 i["b_down"], act)
    ones = torch.ones_like(i["topk_weights"][:, :1])
    slots = [naive_moe_experts(i["x"] * i["topk_weights"][:, j : j + 1].to(i["x"].dtype), ones,
                               i["topk_ids"][:, j : j + 1], i["w_up"], i["w_down"], i["b_up"], i["b_down"], act)
             for j in range(i["topk_ids"].shape[1])]
    return torch.stack([s.float() for s in slots]).sum(0).to(i["x"].dtype)


# --- tiny hand-written MoE models ----------------------------------------------------------


class SwiGLUExpert(nn.Module):
    """Mixtral-style expert: w2(silu(w1 x) * w3 x)."""

    def __init__(self, hidden: int, inter: int, bias: bool = False) -> None:
        super().__init__()
        self.w1 = nn.Linear(hidden, inter, bias=bias)
        self.w3 = nn.Linear(hidden, inter, bias=bias)
        self.w2 = nn.Linear(inter, hidden, bias=bias)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TopKMoE(nn.Module):
    """A hand-written sparse MoE block: gate Linear, softmax, top-k, optional renorm, per-expert loop.

    Accepts [..., H] inputs and returns the same shape.
    """

    def __init__(self, hidden: int = 16, inter: int = 24, num_experts: int = 4, top_k: int = 2,
                 renormalize: bool = True, bias: bool = False) -> None:
        super().__init__()
        self.top_k = top_k
        self.renormalize = renormalize
        self.gate = nn.Linear(hidden, num_experts, bias=False)
        self.experts = nn.ModuleList(SwiGLUExpert(hidden, inter, bias) for _ in range(num_experts))

    def forward(self, x):
        shape = x.shape
        x_TH = x.reshape(-1, shape[-1])
        probs_TE = torch.softmax(self.gate(x_TH).float(), dim=-1)
        weights_TK, ids_TK = probs_TE.topk(self.top_k, dim=-1)
        if self.renormalize:
            weights_TK = weights_TK / weights_TK.sum(dim=-1, keepdim=True)
        weights_TK = weights_TK.to(x.dtype)
        out_TH = torch.zeros_like(x_TH)
        for e, expert in enumerate(self.experts):
            tok, slot = torch.where(ids_TK == e)
            if tok.numel():
                out_TH.index_add_(0, tok, expert(x_TH[tok]) * weights_TK[tok, slot, None])
        return out_TH.reshape(shape)


class MoEHolder(nn.Module):
    """A model whose only child ``moe`` is the block under test, so that it can be swapped in place."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.moe = block

    def forward(self, x):
        return self.moe(x)


class TwoBlockModel(nn.Module):
    """in_proj -> [LayerNorm -> MoE + residual] x 2 -> out_proj: two swappable blocks."""

    def __init__(self, hidden: int = 16, inter: int = 24, num_experts: int = 4, top_k: int = 2,
                 bias: bool = False) -> None:
        super().__init__()
        self.in_proj = nn.Linear(hidden, hidden)
        self.norms = nn.ModuleList(nn.LayerNorm(hidden) for _ in range(2))
        self.blocks = nn.ModuleList(TopKMoE(hidden, inter, num_experts, top_k, bias=bias) for _ in range(2))
        self.out_proj = nn.Linear(hidden, hidden)

    def forward(self, x):
        h = self.in_proj(x)
        for norm, block in zip(self.norms, self.blocks):
            h = h + block(norm(h))
        return self.out_proj(h)


def tiny_mixtral_config(**overrides):
    """A tiny transformers MixtralConfig (random weights, no download)."""
    from transformers import MixtralConfig

    kwargs = dict(
        vocab_size=96, hidden_size=32, intermediate_size=40, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=128,
        pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )
    kwargs.update(overrides)
    cfg = MixtralConfig(**kwargs)
    cfg._attn_implementation = "eager"
    return cfg


def decoder_kwargs(model: nn.Module, hidden: torch.Tensor) -> dict:
    """Keyword arguments of a transformers decoder layer of ``model`` for hidden states [B, T, H]."""
    B, T = hidden.shape[:2]
    position_ids = torch.arange(T).unsqueeze(0).expand(B, T)
    return dict(attention_mask=None, position_ids=position_ids,
                position_embeddings=model.model.rotary_emb(hidden, position_ids))


def assert_one_graph(module: nn.Module, *args, **kwargs) -> None:
    """``module(*args, **kwargs)`` traces as one graph without breaks."""
    explained = torch._dynamo.explain(module)(*args, **kwargs)
    assert explained.graph_break_count == 0, explained.break_reasons
    assert explained.graph_count == 1


def assert_compiles_whole_and_matches(layer: nn.Module, layer_ref: nn.Module, hidden: torch.Tensor, kwargs: dict,
                                      **tol) -> None:
    """``layer`` traces as one graph and, compiled with fullgraph=True (aot_eager), gives what
    ``layer_ref`` gives on the same inputs within ``tol`` (first outputs of tuples compared)."""
    with torch.no_grad():
        assert_one_graph(layer, hidden, **kwargs)
        out = torch.compile(layer, fullgraph=True, backend="aot_eager")(hidden, **kwargs)
        ref = layer_ref(hidden, **kwargs)
    out = out[0] if isinstance(out, tuple) else out
    ref = ref[0] if isinstance(ref, tuple) else ref
    torch.testing.assert_close(out, ref, **tol)


# --- model state ---------------------------------------------------------------------------


def snapshot_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Ordered copies of every state_dict entry."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same_state(model: nn.Module, snapshot: dict[str, torch.Tensor]) -> None:
    """state_dict keys (in order), dtypes, shapes and values equal to the snapshot."""
    state = model.state_dict()
    assert list(state.keys()) == list(snapshot.keys())
    for k, v in state.items():
        ref = snapshot[k]
        assert v.dtype == ref.dtype and v.shape == ref.shape, k
        assert torch.equal(v, ref), k


def assert_same_grads(model: nn.Module, original: nn.Module, **tol) -> None:
    """Every parameter of ``model`` has a gradient equal (within ``tol``, default GRAD_TOL) to
    that of the same-named parameter of ``original``."""
    ref_params = dict(original.named_parameters())
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        torch.testing.assert_close(p.grad, ref_params[name].grad, **(tol or GRAD_TOL), msg=name)


def param_ids(model: nn.Module) -> dict[str, int]:
    """Parameter name -> id() of the Parameter object."""
    return {name: id(p) for name, p in model.named_parameters()}


def parameter_storage_bytes(model: nn.Module, extra: tuple[torch.Tensor, ...] = ()) -> int:
    """Bytes of the distinct storages behind the model's parameters (and ``extra`` tensors)."""
    seen: dict[int, int] = {}
    for t in [p for p in model.parameters()] + list(extra):
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


def stacked_tensors(model: nn.Module) -> tuple[torch.Tensor, ...]:
    """Every stacked weight a fused layer keeps for re-pointed per-expert Parameters."""
    out = []
    for m in model.modules():
        out.extend(getattr(m, "_stacked_weights", {}).values())
    return tuple(out)


# --- native CPU extension --------------------------------------------------------------


def simulate_cpu_extension_build(monkeypatch, build) -> None:
    """Forget this process's build of the native CPU extension and let ``build()`` stand for
    the next one (raise to simulate a machine without a compiler)."""
    monkeypatch.setattr(cpu_kernels, "_module", cpu_kernels._UNTRIED)
    monkeypatch.setattr(cpu_kernels, "_failure", "")
    monkeypatch.setattr(cpu_kernels, "_build", build)


def no_compiler():
    raise OSError("no C++ compiler found")


REPO = Path(__file__).resolve().parents[1]


def run_script(args: list[str], timeout: float = 600) -> str:
    """stdout of ``python ARGS`` run from the repository root, as a user runs a benchmark or an
    example (one thread, the checkout on the path); fails the test with its stderr's tail."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout

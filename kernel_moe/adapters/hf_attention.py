"""Recognizes transformers attention layers whose queries come from a mixture of attention heads
(JetMoE's ``JetMoeAttention`` with its ``JetMoeMoA``) and proves the swap at the attention layer.

The MoA block itself cannot be called (its ``forward`` raises; the attention layer calls its
``map`` and ``reduce`` around the attention), so it is recognized and proven as part of its
attention layer: structure first (an ``experts`` child with ``map`` / ``reduce``, stacked query and
output projections [E, F, D] / [E, D, F], a Linear router, an output bias; a ``kv_proj`` Linear
D -> 2F), then computation: the original layer and :class:`FusedMoAAttention` run on seeded
probes (hidden states, rotary cos/sin, no mask and a causal padding mask) in eval and train mode,
and their outputs and gradients must agree within the dtype tolerance. The attention function is
the one the model's module calls, looked up in its own module namespace per call.
"""

from __future__ import annotations

import dataclasses
import sys

import torch
from torch import nn

from kernel_moe.adapters.base import Skip
from kernel_moe.adapters.probe import PROBE_SEED, mismatch, probe_gradients, probe_input, train_mode
from kernel_moe.config import KernelConfig
from kernel_moe.layers.moa_attention import BIAS, MoAAttentionSpec

PROBE_BATCH = 2


def _resolver(module_name: str):
    """attention(layer) for layers whose original class lives in ``module_name``."""
    def attention(layer: nn.Module):
        namespace = sys.modules[module_name]
        return namespace.ALL_ATTENTION_FUNCTIONS.get_interface(layer.config._attn_implementation,
                                                               namespace.eager_attention_forward)
    return attention


def _stacked(module: nn.Module, path: str) -> torch.Tensor | None:
    try:
        t = module.get_parameter(path)
    except AttributeError:
        return None
    return t if t.dim() == 3 else None


def moa_attention_spec(module: nn.Module) -> MoAAttentionSpec | None:
    """The spec of an MoA attention layer judged by structure alone (None when it is not one)."""
    experts = getattr(module, "experts", None)
    kv = getattr(module, "kv_proj", None)
    if not (isinstance(experts, nn.Module) and callable(getattr(experts, "map", None))
            and callable(getattr(experts, "reduce", None)) and isinstance(kv, nn.Linear)):
        return None
    namespace = sys.modules.get(type(module).__module__)
    if not (hasattr(namespace, "ALL_ATTENTION_FUNCTIONS") and hasattr(namespace, "eager_attention_forward")
            and hasattr(getattr(module, "config", None), "_attn_implementation")):
        return None
    w_q, w_o = _stacked(module, "experts.input_linear.weight"), _stacked(module, "experts.output_linear.weight")
    router = getattr(getattr(experts, "router", None), "layer", None)
    top_k, head_dim = getattr(module, "top_k", None), getattr(module, "head_dim", None)
    if w_q is None or w_o is None or not isinstance(router, nn.Linear) or not isinstance(top_k, int):
        return None
    E, F_, D = w_q.shape
    bias = getattr(experts, "bias", None)
    if (tuple(w_o.shape) != (E, D, F_) or tuple(router.weight.shape) != (E, D) or router.bias is not None
            or (kv.in_features, kv.out_features) != (D, 2 * F_) or kv.bias is not None
            or not isinstance(head_dim, int) or F_ % head_dim or not 1 <= top_k <= E
            or not isinstance(bias, nn.Parameter) or tuple(bias.shape) != (D,)):
        return None
    return MoAAttentionSpec(hidden=D, head_dim=head_dim, num_kv_heads=F_ // head_dim,
                            attention=_resolver(type(module).__module__), num_experts=E, top_k=top_k)


class _Call(nn.Module):
    """An attention layer called the way its decoder layer calls it, on fixed mask and rotary
    embeddings: forward(hidden [B, T, D]) -> its outputs."""

    def __init__(self, attention: nn.Module, mask: torch.Tensor | None, cos: torch.Tensor, sin: torch.Tensor):
        super().__init__()
        self.attention, self.mask, self.cos, self.sin = attention, mask, cos, sin

    def forward(self, hidden: torch.Tensor):
        return self.attention(hidden, self.mask, (self.cos, self.sin))


def _probes(spec: MoAAttentionSpec, tokens: int, like: torch.Tensor) -> list[tuple[torch.Tensor, ...]]:
    """(hidden [B, T, D], mask [B, 1, T, T] additive or None, cos, sin [B, T, d]) probes: no mask, and
    a causal mask with left padding in the first sequence."""
    B, T, d = PROBE_BATCH, tokens, spec.head_dim
    x = probe_input((B, T, spec.hidden), like)
    freqs = probe_input((d // 2,), like, PROBE_SEED + 1).float().abs()
    angles = torch.arange(T, dtype=torch.float32, device=like.device)[:, None] * freqs
    emb = torch.cat((angles, angles), dim=-1).expand(B, T, d).to(like)
    keep = torch.ones(B, T, dtype=torch.bool, device=like.device)
    keep[0, : T // 3] = False
    allowed = keep[:, None, None, :] & torch.ones(T, T, dtype=torch.bool, device=like.device).tril()
    allowed = allowed | torch.eye(T, dtype=torch.bool, device=like.device)
    mask = torch.zeros(B, 1, T, T, dtype=like.dtype, device=like.device).masked_fill(~allowed,
                                                                                    torch.finfo(like.dtype).min)
    return [(x, None, emb.cos(), emb.sin()), (x, mask, emb.cos(), emb.sin())]


def outputs_differ(ours: object, ref: object) -> str | None:
    """None when every tensor output agrees (a None where the original has None)."""
    if isinstance(ref, torch.Tensor):
        return mismatch(ours, ref)
    if not isinstance(ours, tuple) or len(ours) != len(ref):
        return f"returns {type(ours).__name__} where the original returns a {len(ref)}-tuple"
    for i, (a, b) in enumerate(zip(ours, ref)):
        if a is None and b is None:
            continue
        why = mismatch(a, b) if isinstance(b, torch.Tensor) else "an output is None in one only"
        if why is not None:
            return f"output {i}: {why}"
    return None


def run_probe(module: nn.Module, x: torch.Tensor, training: bool) -> object:
    """module(x) without gradients, in train or eval mode, the global RNG forked and seeded."""
    with torch.no_grad(), train_mode(module, training), torch.random.fork_rng(devices=[]):
        torch.manual_seed(PROBE_SEED)
        return module(x)


def gradients_differ(original: nn.Module, layer: nn.Module, x: torch.Tensor, training: bool) -> str | None:
    """None when ``layer`` gives the gradients ``original`` gives (x and every parameter that
    requires grad, shared by both), else which one differs."""
    params = [(n, p) for n, p in original.named_parameters() if p.requires_grad and p.is_floating_point()]
    tensors = [p for _, p in params]
    ref = probe_gradients(original, (x,), tensors, training)
    ours = probe_gradients(layer, (x,), tensors, training)
    for name, a, b in zip(["hidden states"] + [n for n, _ in params], ours, ref):
        why = mismatch(a, b) if b.abs().max().item() > 0 else (None if a.abs().max().item() == 0 else "not zero")
        if why is not None:
            return f"gradient of {name}: {why}"
    return None


def prove_moa_attention(module: nn.Module, spec: MoAAttentionSpec, config: KernelConfig) -> MoAAttentionSpec | Skip:
    """The spec with its fallbacks when :class:`FusedMoAAttention` computes what ``module``
    computes on the probes (outputs in eval mode; training-mode outputs and gradients decide the
    fallbacks), else why not."""
    if not config.verify:
        return spec
    like = module.get_parameter(BIAS)
    if like.device.type == "meta":
        return Skip("parameters are on the meta device, so equivalence cannot be verified")
    plain = KernelConfig(backend=config.backend, deterministic=config.deterministic)
    layer = spec.build(module, plain)
    training = gradient = None
    for x, mask, cos, sin in _probes(spec, max(config.verify_tokens, 4), like):
        original, ours = _Call(module, mask, cos, sin), _Call(layer, mask, cos, sin)
        try:
            why = outputs_differ(run_probe(ours, x, False), run_probe(original, x, False))
        except Exception as exc:  # the original cannot run on a probe: not provable
            return Skip(f"the attention layer failed on a probe input ({type(exc).__name__}: {str(exc)[:160]})")
        if why is not None:
            return Skip(f"not proven equivalent: {why}")
        if training is None:
            first, second = run_probe(original, x, True), run_probe(original, x, True)
            if outputs_differ(first, second) is not None:
                training = "its training-mode forward is stochastic (attention dropout)"
            else:
                why = outputs_differ(run_probe(ours, x, True), first)
                training = None if why is None else f"training-mode forward differs: {why}"
        for mode in (False, True) if training is None else (False,):
            gradient = gradient or gradients_differ(original, ours, x, mode)
    layer.training = module.training
    return dataclasses.replace(spec, training_fallback=training, gradient_fallback=gradient)


@dataclasses.dataclass(frozen=True)
class ProvenMoAAttentionSpec(MoAAttentionSpec):
    """An MoA attention spec that proves itself at its attention layer (the manager asks
    ``prove`` instead of running its block probe)."""

    def prove(self, module: nn.Module, config: KernelConfig) -> MoAAttentionSpec | Skip:
        return prove_moa_attention(module, self, config)


class MoAAttentionAdapter:
    """transformers attention layers with MoA queries (JetMoE)."""

    name = "transformers-moa-attention"

    def candidates(self, module: nn.Module, config: KernelConfig) -> list[MoAAttentionSpec] | Skip | None:
        spec = moa_attention_spec(module)
        if spec is None:
            return None
        if config.num_experts is not None and config.num_experts != spec.num_experts:
            return Skip(f"module has num_experts={spec.num_experts}, config expects num_experts={config.num_experts}")
        return [ProvenMoAAttentionSpec(**{f.name: getattr(spec, f.name) for f in dataclasses.fields(spec)})]


__all__ = ["MoAAttentionAdapter", "gradients_differ", "moa_attention_spec", "outputs_differ", "prove_moa_attention",
           "run_probe"]

"""Small self-contained modules for side-by-side comparisons, and parameter counting.

Legend: T tokens, H hidden size, E experts, K experts per token (top-k), I expert
intermediate size.

- :class:`DenseFFN` is the dense baseline an MoE is compared with; :class:`DenseMHA` the dense
  attention a sparse-expert attention layer is compared with.
- :class:`NaiveMoE` is the hand-written MoE that ``kernel_moe.optimize`` swaps: a gate
  ``nn.Linear`` plus an ``nn.ModuleList`` of expert MLPs, softmax -> top-k -> renormalize and
  a Python loop over the experts.
- :func:`count_parameters` counts total and per-token active parameters of any model.
- :func:`dense_same_active` / :func:`dense_same_total` build the two fair dense baselines of
  an MoE shape.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from fractions import Fraction

import torch
import torch.nn as nn
import torch.nn.functional as F

logger = logging.getLogger("kernel_moe")

ACTIVATIONS = {"silu": F.silu, "gelu": F.gelu, "relu": F.relu}


def _check_positive(cls: str, **fields: int) -> None:
    for name, value in fields.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{cls}.{name}={value!r}; allowed: an int >= 1")


def _activation_fn(cls: str, activation: str):
    if activation not in ACTIVATIONS:
        raise ValueError(f"{cls}.activation={activation!r}; allowed: {', '.join(ACTIVATIONS)}")
    return ACTIVATIONS[activation]


class DenseFFN(nn.Module):
    """A dense feed-forward block [..., H] -> [..., H] (SwiGLU-style when ``gated``).

    Gated: ``down(act(gate(x)) * up(x))``; otherwise ``down(act(up(x)))``. No biases, like the
    experts of :class:`NaiveMoE`, so that parameter counts compare one to one.
    """

    def __init__(self, hidden: int, intermediate: int, activation: str = "silu", gated: bool = True) -> None:
        super().__init__()
        _check_positive("DenseFFN", hidden=hidden, intermediate=intermediate)
        self.hidden_size = hidden
        self.intermediate_size = intermediate
        self.activation = activation
        self.gated = gated
        self.act_fn = _activation_fn("DenseFFN", activation)
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False) if gated else None
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate_proj is not None:
            return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))
        return self.down_proj(self.act_fn(self.up_proj(x)))


class DenseMHA(nn.Module):
    """Causal multi-head attention [B, T, D] -> [B, T, D] with ``heads`` heads of ``head_dim``: one
    fused q/k/v projection, ``scaled_dot_product_attention``, the output projection; no biases."""

    def __init__(self, d_model: int, heads: int, head_dim: int) -> None:
        super().__init__()
        self.heads, self.head_dim = heads, head_dim
        self.qkv = nn.Linear(d_model, 3 * heads * head_dim, bias=False)
        self.out = nn.Linear(heads * head_dim, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        return self.out(F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, T, -1))


class NaiveMoE(nn.Module):
    """A hand-written sparse MoE block [..., H] -> [..., H].

    Routing: ``gate`` logits [T, E] -> softmax (fp32) -> top-k -> renormalize to sum 1. Each
    expert is a :class:`DenseFFN` (``gate_proj`` / ``up_proj`` / ``down_proj``) applied to the
    tokens routed to it, one expert at a time in a Python loop.

    Routing tracking mirrors ``kernel_moe.layers.FusedMoE``: after ``track_routing(True)``
    every forward adds the number of (token, slot) pairs sent to each expert to
    ``routing_counts`` [E] (int64), so the original and the swapped module can be compared.
    """

    def __init__(
        self,
        hidden: int,
        intermediate: int,
        num_experts: int,
        top_k: int,
        gated: bool = True,
        activation: str = "silu",
    ) -> None:
        super().__init__()
        _check_positive("NaiveMoE", hidden=hidden, intermediate=intermediate, num_experts=num_experts, top_k=top_k)
        if top_k > num_experts:
            raise ValueError(f"NaiveMoE.top_k={top_k!r}; allowed: an int in [1, num_experts={num_experts}]")
        self.hidden_size = hidden
        self.intermediate_size = intermediate
        self.num_experts = num_experts
        self.top_k = top_k
        self.gated = gated
        self.activation = activation
        self.gate = nn.Linear(hidden, num_experts, bias=False)
        self.experts = nn.ModuleList(DenseFFN(hidden, intermediate, activation, gated) for _ in range(num_experts))
        self._tracking = False
        self.register_buffer("routing_counts", torch.zeros(num_experts, dtype=torch.int64), persistent=False)

    def route(self, x_TH: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Routing weights [T, K] (dtype of x) and expert ids [T, K] (int64)."""
        probs_TE = torch.softmax(self.gate(x_TH).float(), dim=-1)
        weights_TK, ids_TK = torch.topk(probs_TE, self.top_k, dim=-1)
        weights_TK = weights_TK / weights_TK.sum(dim=-1, keepdim=True)
        return weights_TK.to(x_TH.dtype), ids_TK

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x_TH = x.reshape(-1, shape[-1])
        weights_TK, ids_TK = self.route(x_TH)
        if self._tracking:
            self.routing_counts += torch.bincount(ids_TK.reshape(-1), minlength=self.num_experts)
        out_TH = torch.zeros_like(x_TH)
        for e, expert in enumerate(self.experts):
            tok_M, slot_M = torch.where(ids_TK == e)
            if tok_M.numel() == 0:
                continue
            y_MH = expert(x_TH[tok_M]) * weights_TK[tok_M, slot_M].unsqueeze(-1)
            out_TH.index_add_(0, tok_M, y_MH)
        return out_TH.reshape(shape)

    def track_routing(self, enabled: bool = True) -> None:
        """Start (or stop) accumulating per-expert slot counts in ``routing_counts``."""
        self._tracking = bool(enabled)

    def reset_routing_counts(self) -> None:
        """Zero ``routing_counts``."""
        self.routing_counts.zero_()


@dataclass(frozen=True)
class ParamCount:
    """Parameters of a model: ``total`` stored, ``active`` used per token."""

    total: int
    active: int

    @property
    def active_fraction(self) -> float:
        return self.active / self.total if self.total else 0.0


def _int_attr(obj, *names: str) -> int | None:
    for name in names:
        value = getattr(obj, name, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


_TOPK_NAMES = ("top_k", "num_experts_per_tok", "experts_per_token", "moe_topk")


def _config_top_k(module: nn.Module) -> int | None:
    config = getattr(module, "config", None)
    if config is None:
        return None
    k = _int_attr(config, *_TOPK_NAMES)
    if k is None and hasattr(config, "get_text_config"):
        k = _int_attr(config.get_text_config(), *_TOPK_NAMES)
    return k


def _is_fused_moe(module: nn.Module) -> bool:
    try:
        from kernel_moe.layers import FusedMoE
    except ImportError:
        return False
    return isinstance(module, FusedMoE)


def _expert_params_stacked(module: nn.Module, num_experts: int) -> list[nn.Parameter]:
    """Parameters of a module stacking E experts along dim 0: 3-D weights [E, ., .] and
    2-D biases [E, .] (a 2-D parameter not named like a bias, e.g. a router [E, H], is dense)."""
    found = []
    for name, p in module.named_parameters(recurse=True):
        if p.dim() >= 1 and p.shape[0] == num_experts:
            leaf = name.rsplit(".", 1)[-1]
            if p.dim() == 3 or (p.dim() == 2 and "bias" in leaf):
                found.append(p)
    return found


def _moe_expert_fraction(
    module: nn.Module, ancestors: list[nn.Module]
) -> tuple[list[nn.Parameter], Fraction] | None:
    """If ``module`` holds routed experts, return (expert parameters, fraction used per token)."""
    if _is_fused_moe(module):
        E, K = int(module.num_experts), int(module.top_k)
        params = _expert_params_stacked(module, E)
        for child in module.children():  # experts adopted from a hand-written block stay a ModuleList
            if isinstance(child, nn.ModuleList) and len(child) == E:
                params += list(child.parameters())
        return params, Fraction(K, E)
    experts = getattr(module, "experts", None)
    if isinstance(experts, nn.ModuleList) and len(experts) > 0:
        k = _int_attr(module, *_TOPK_NAMES)
        gate = getattr(module, "gate", None) or getattr(module, "router", None)
        if k is None and gate is not None:
            k = _int_attr(gate, *_TOPK_NAMES)
        if k is None:
            for anc in reversed(ancestors):
                k = _config_top_k(anc)
                if k is not None:
                    break
        if k is not None and k <= len(experts):
            return [p for p in experts.parameters()], Fraction(k, len(experts))
        return None
    E = _int_attr(module, "num_experts", "num_local_experts", "n_routed_experts")
    if E is None or not any(p.dim() == 3 for p in module.parameters(recurse=False)):
        return None
    k = _int_attr(module, *_TOPK_NAMES)
    if k is None and ancestors:
        parent = ancestors[-1]
        k = _int_attr(parent, *_TOPK_NAMES)
        for sibling in ("gate", "router"):
            if k is None and isinstance(getattr(parent, sibling, None), nn.Module):
                k = _int_attr(getattr(parent, sibling), *_TOPK_NAMES)
    if k is None:
        for anc in reversed([*ancestors, module]):
            k = _config_top_k(anc)
            if k is not None:
                break
    if k is None or k > E:
        logger.debug(
            "count_parameters: %s has %d stacked experts but no top_k; counted dense", type(module).__name__, E
        )
        return None
    return _expert_params_stacked(module, E), Fraction(k, E)


def count_parameters(model: nn.Module) -> ParamCount:
    """Total and per-token active parameters of any model.

    Routed experts are recognized structurally: a ``kernel_moe.layers.FusedMoE``; a module
    with an ``nn.ModuleList`` ``experts`` and a ``top_k`` (on itself, its ``gate`` / ``router``
    or a config above it); or a transformers ``*Experts`` module with 3-D ``[E, ., .]``
    parameters and ``num_experts_per_tok`` in the model config. Only K of E experts count as
    active (every expert assumed the same size, as in all these layouts). Everything else,
    routers, shared experts, attention and embeddings included, counts as active. Shared
    (tied) parameters are counted once.
    """
    fraction: dict[int, Fraction] = {}
    numel: dict[int, int] = {}
    for p in model.parameters():
        numel[id(p)] = p.numel()

    def visit(module: nn.Module, ancestors: list[nn.Module]) -> None:
        found = _moe_expert_fraction(module, ancestors)
        if found is not None:
            params, frac = found
            for p in params:
                fraction.setdefault(id(p), frac)
        for child in module.children():
            visit(child, [*ancestors, module])

    visit(model, [])
    total = sum(numel.values())
    active = sum(fraction.get(pid, Fraction(1)) * n for pid, n in numel.items())
    return ParamCount(total=total, active=int(active))


def moe_param_count(hidden: int, intermediate: int, num_experts: int, top_k: int, gated: bool = True) -> ParamCount:
    """Closed-form :class:`ParamCount` of a :class:`NaiveMoE` shape (router included)."""
    per_expert = (3 if gated else 2) * hidden * intermediate
    router = hidden * num_experts
    return ParamCount(total=router + num_experts * per_expert, active=router + top_k * per_expert)


def dense_same_active(
    hidden: int, intermediate: int, num_experts: int, top_k: int, gated: bool = True, activation: str = "silu"
) -> DenseFFN:
    """Dense FFN with the expert parameters an MoE token uses: intermediate = K * I."""
    _check_positive("dense_same_active", num_experts=num_experts, top_k=top_k)
    return DenseFFN(hidden, top_k * intermediate, activation, gated)


def dense_same_total(
    hidden: int, intermediate: int, num_experts: int, top_k: int, gated: bool = True, activation: str = "silu"
) -> DenseFFN:
    """Dense FFN with all the expert parameters an MoE stores: intermediate = E * I."""
    _check_positive("dense_same_total", num_experts=num_experts, top_k=top_k)
    return DenseFFN(hidden, num_experts * intermediate, activation, gated)

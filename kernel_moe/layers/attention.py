"""SparseExpertAttention: attention whose heads are routed experts (MoA and SwitchHead).

Two variants of conditional computation in attention, each token routed over attention experts:

- ``"moa"`` (mixture of attention heads, Zhang et al. 2022; JetMoE's ``JetMoeMoA``): an expert is
  ``h = num_heads_per_expert`` heads with its own query projection ``w_q[e]`` [h*d, D] and output
  projection ``w_o[e]`` [D, h*d]; keys and values are shared (``kv_proj``: h heads, head j of
  every expert attends with shared head j). A token picks ``top_k`` experts by a softmax over
  its top-k router logits, so it runs top_k*h query heads; its output is
  ``sum_k g_k * attn_k @ w_o[e_k]^T (+ bias)``.
- ``"switchhead"`` (Csordás et al. 2024): ``h = num_heads_per_expert`` heads with dense query and
  key projections; each head's value and output projections are mixtures of ``num_experts``
  experts chosen by sigmoid top-k gates, the value side gated by the source token and the output
  side by the destination token: ``v_h(s) = sum_k gs_k(s) x_s @ w_v[h, e_k]^T`` and
  ``out(t) = sum_h sum_k gd_k(t) attn_h(t) @ w_o[h, e_k]^T``.

How the expert projections run. The experts op fuses ``up -> activation -> down`` per slot;
the contract's activations are pointwise, and an attention expert has attention across tokens
between its two projections, so no single call can hold it. The op's two halves run instead,
as ``kernel_moe::expert_projection`` (:mod:`kernel_moe.kernels.projection`): the gather half
(sorted slots, token rows gathered by expert, one GEMM per expert; a Triton grouped GEMM on the
"triton" backend) computes the query (MoA) or value (SwitchHead) projection of every slot,
``scaled_dot_product_attention`` runs all active heads at once, and the combine half (routing
weight and sum over slots in one scatter-add) computes the output projection. In MoA the query and output projections are exactly an
expert's up and down pair with attention in place of the activation.

Masks: ``causal`` and a padding mask ``attention_mask`` [B, T] (1 keep, 0 pad). A padded
position is never attended to, and its own output is 0 (its query attends to itself only,
so no softmax row is empty).

Legend: B batch, T sequence, N = B*T tokens, D d_model, E experts, K top-k, h heads of an
expert (MoA) or heads (SwitchHead), d head dim, F = h*d.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from kernel_moe.config import KernelConfig
from kernel_moe.ops.projection import run_projection
from kernel_moe.routing.balancing import expert_counts
from kernel_moe.routing.capacity import apply_capacity, expert_capacity as capacity_of
from kernel_moe.routing.jitter import jitter_input
from kernel_moe.routing.losses import load_balancing_loss, router_z_loss
from kernel_moe.routing.topk import TopKRouting, route

VARIANTS = ("moa", "switchhead")
OPTIONS = ("head_dim", "bias", "config")


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary(x_BHTd: torch.Tensor, cos_BTd: torch.Tensor, sin_BTd: torch.Tensor) -> torch.Tensor:
    """Rotary position embedding (rotate-half layout) of [B, heads, T, d] with cos/sin [B, T, d]."""
    return x_BHTd * cos_BTd.unsqueeze(1) + rotate_half(x_BHTd) * sin_BTd.unsqueeze(1)


def padding_attention_mask(keep_BT: torch.Tensor, causal: bool) -> torch.Tensor:
    """[B, T] keep flags -> boolean attention mask [B, 1, T, T]: real keys (and, when causal, not
    later ones); a padded query attends to itself only, so that no row is empty."""
    T = keep_BT.shape[1]
    allowed = keep_BT[:, None, None, :].expand(-1, 1, T, T)
    eye = torch.eye(T, dtype=torch.bool, device=keep_BT.device)
    if causal:
        allowed = allowed & torch.ones(T, T, dtype=torch.bool, device=keep_BT.device).tril()
    return allowed | eye


def attend(q_BHTd: torch.Tensor, k_BHTd: torch.Tensor, v_BHTd: torch.Tensor, masking: tuple) -> torch.Tensor:
    """scaled_dot_product_attention of q [B, Hq, T, d] over k, v [B, Hkv, T, d] (query head i reads
    key/value head i // (Hq / Hkv)). ``masking`` = (causal, boolean mask [B, 1, T, T] | None,
    rotary (cos, sin) | None); the mask, when given, already holds causality."""
    causal, mask, position_embeddings = masking
    if position_embeddings is not None:
        cos, sin = position_embeddings
        q_BHTd, k_BHTd = apply_rotary(q_BHTd, cos, sin), apply_rotary(k_BHTd, cos, sin)
    is_causal = mask is None and causal and q_BHTd.shape[2] > 1
    return F.scaled_dot_product_attention(q_BHTd, k_BHTd, v_BHTd, attn_mask=mask, is_causal=is_causal,
                                          enable_gqa=q_BHTd.shape[1] != k_BHTd.shape[1])


def moa_attend(q_NKF: torch.Tensor, k_BTF: torch.Tensor, v_BTF: torch.Tensor, heads: int,
               masking: tuple) -> torch.Tensor:
    """MoA's attention: each slot's query [N, K, F] (h heads) over the shared keys and values
    [B, T, F] (h heads, head j of every expert reads shared head j) -> [N, K, F]."""
    B, T, F_ = k_BTF.shape
    K, h, d = q_NKF.shape[1], heads, F_ // heads
    # query heads ordered (head j, slot k), so that GQA maps them to shared head j
    q_BHTd = q_NKF.view(B, T, K, h, d).permute(0, 3, 2, 1, 4).reshape(B, h * K, T, d)
    k_BHTd = k_BTF.view(B, T, h, d).transpose(1, 2)
    v_BHTd = v_BTF.view(B, T, h, d).transpose(1, 2)
    o_BHTd = attend(q_BHTd, k_BHTd, v_BHTd, masking)
    return o_BHTd.view(B, h, K, T, d).permute(0, 3, 2, 1, 4).reshape(B * T, K, F_)


def _check(name: str, value: object, ok: bool, allowed: str) -> None:
    if not ok:
        raise ValueError(f"SparseExpertAttention.{name}={value!r} is invalid; allowed: {allowed}")


def _positive_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _expert_weight(E: int, out_features: int, in_features: int) -> nn.Parameter:
    """[E, out, in], each expert initialised like an nn.Linear (uniform, bound 1/sqrt(in))."""
    bound = 1.0 / math.sqrt(in_features)
    return nn.Parameter(torch.empty(E, out_features, in_features).uniform_(-bound, bound))


class SparseExpertAttention(nn.Module):
    """Attention over routed attention experts (see the module docstring for the two variants).

    - ``d_model``: model width D; ``num_experts``: E experts (MoA) or experts per head
      (SwitchHead); ``num_heads_per_expert``: h heads per expert (MoA) or heads (SwitchHead).
    - ``expert_capacity``: at most this many slots per expert per call (None: dropless, unless
      ``config.capacity_factor`` sets one); dropped slots contribute nothing.
    - ``top_k``: experts per token (MoA) or per token and head (SwitchHead).
    - ``causal``: causal masking. Options: ``head_dim`` (default ``D // (top_k * h)`` for MoA, so
      the active heads span D, ``D // h`` for SwitchHead), ``bias`` (output bias, default True for
      MoA, False for SwitchHead), ``config`` (a :class:`KernelConfig`: ``load_balancing``
      "auxiliary_loss" sets ``aux_loss`` in training, "dynamic" (MoA) keeps an ``expert_bias``
      selection bias for ``kernel_moe.training.update_expert_biases``; ``capacity_factor``,
      ``min_capacity``, ``capacity_priority``; ``router_jitter``).

    ``forward(hidden_states [B, T, D], attention_mask [B, T] | None = None,
    position_embeddings (cos, sin) [B, T, d] | None = None) -> [B, T, D]``.
    """

    def __init__(self, d_model: int, num_experts: int, num_heads_per_expert: int, expert_capacity: int | None = None,
                 top_k: int = 2, variant: str = "moa", causal: bool = True, **options) -> None:
        super().__init__()
        _check("d_model", d_model, _positive_int(d_model), "an int >= 1")
        _check("num_experts", num_experts, _positive_int(num_experts), "an int >= 1")
        _check("num_heads_per_expert", num_heads_per_expert, _positive_int(num_heads_per_expert), "an int >= 1")
        _check("top_k", top_k, _positive_int(top_k) and top_k <= num_experts, f"an int in [1, {num_experts}]")
        _check("variant", variant, variant in VARIANTS, ", ".join(VARIANTS))
        _check("expert_capacity", expert_capacity, expert_capacity is None or _positive_int(expert_capacity),
               "None (dropless) or an int >= 1")
        _check("causal", causal, isinstance(causal, bool), "True or False")
        unknown = sorted(set(options) - set(OPTIONS))
        _check("options", unknown, not unknown, ", ".join(OPTIONS))
        moa = variant == "moa"
        h = num_heads_per_expert
        head_dim = options.get("head_dim") or d_model // (top_k * h if moa else h)
        _check("head_dim", head_dim, _positive_int(head_dim), "an int >= 1 (d_model too small for the default)")
        config = options.get("config") or KernelConfig.for_moe()
        _check("config", config, isinstance(config, KernelConfig), "a KernelConfig or None")
        self._check_config(config, moa)
        self.d_model, self.num_experts, self.num_heads, self.top_k = d_model, num_experts, h, top_k
        self.head_dim, self.variant, self.causal = head_dim, variant, causal
        self.expert_capacity, self.kernel_config = expert_capacity, config
        F_ = h * head_dim
        if moa:
            self.routing = TopKRouting(num_experts, top_k, "softmax", order="topk_then_score")
            self.router = nn.Linear(d_model, num_experts, bias=False)
            self.w_q = _expert_weight(num_experts, F_, d_model)  # [E, F, D]
            self.w_o = _expert_weight(num_experts, d_model, F_)  # [E, D, F]
            self.kv_proj = nn.Linear(d_model, 2 * F_, bias=False)
        else:
            self.routing = TopKRouting(num_experts, top_k, "sigmoid")
            self.q_proj = nn.Linear(d_model, F_, bias=False)
            self.k_proj = nn.Linear(d_model, F_, bias=False)
            self.source_router = nn.Linear(d_model, h * num_experts, bias=False)
            self.destination_router = nn.Linear(d_model, h * num_experts, bias=False)
            self.w_v = _expert_weight(h * num_experts, head_dim, d_model)  # [h*E, d, D]
            self.w_o = _expert_weight(h * num_experts, d_model, head_dim)  # [h*E, D, d]
        self.bias = nn.Parameter(torch.zeros(d_model)) if options.get("bias", moa) else None
        self.aux_loss: torch.Tensor | None = None
        self.dropped_tokens: torch.Tensor | None = None
        self.randomly_routed = None
        self._track_routing = False
        n_ids = num_experts if moa else h * num_experts
        self.register_buffer("routing_counts", torch.zeros(n_ids, dtype=torch.int64), persistent=False)
        if config.load_balancing == "dynamic":
            self.register_buffer("expert_bias", torch.zeros(num_experts, dtype=torch.float32))
            self.register_buffer("load_counts", torch.zeros(num_experts, dtype=torch.int64), persistent=False)

    @staticmethod
    def _check_config(config: KernelConfig, moa: bool) -> None:
        if config.routing != "token_choice":
            raise ValueError(f"SparseExpertAttention: config.routing={config.routing!r} is not supported; allowed: "
                             "'token_choice'")
        if config.random_routing:
            raise ValueError(f"SparseExpertAttention: config.random_routing={config.random_routing!r} is not "
                             "supported; allowed: 0")
        if config.load_balancing == "dynamic" and not moa:
            raise ValueError("SparseExpertAttention: config.load_balancing='dynamic' applies to variant='moa'; "
                             "allowed for 'switchhead': 'none', 'auxiliary_loss'")

    def track_routing(self, enabled: bool = True) -> None:
        """Accumulate per-expert slot counts into ``routing_counts`` on every forward."""
        self._track_routing = enabled

    def reset_routing_counts(self) -> None:
        self.routing_counts.zero_()

    def _route(self, logits_RE: torch.Tensor, tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Router logits [R, E] (R = N rows, or N*h for SwitchHead) -> (weights [N, S], ids [N, S])
        with S slots per token (ids in the stacked id space, -1 for a capacity-dropped slot), and
        the config's balancing and capacity applied."""
        cfg, E = self.kernel_config, self.num_experts
        bias_E = self.expert_bias if cfg.load_balancing == "dynamic" else None
        weights_RK, ids_RK = route(logits_RE, self.routing, bias_E)
        if self.training and cfg.load_balancing == "auxiliary_loss":
            probs_RE = torch.softmax(logits_RE.float(), dim=-1)
            loss = cfg.aux_loss_weight * load_balancing_loss(probs_RE, ids_RK, E) + (
                cfg.z_loss_weight * router_z_loss(logits_RE))
            self.aux_loss = loss if self.aux_loss is None else self.aux_loss + loss  # SwitchHead: two routers
        if self.training and cfg.load_balancing == "dynamic":
            self.load_counts += expert_counts(ids_RK, E)
        per_token = 1 if self.variant == "moa" else self.num_heads  # routed rows per token
        if per_token > 1:  # head j's experts are ids j*E .. j*E + E-1 of the stacked weights
            ids_RK = ids_RK + torch.arange(per_token, device=ids_RK.device).repeat(tokens).unsqueeze(1) * E
        ids_NS = ids_RK.reshape(tokens, per_token * self.top_k)
        weights_NS = weights_RK.reshape(tokens, per_token * self.top_k)
        n_ids = E * per_token
        if self._track_routing:
            self.routing_counts += expert_counts(ids_NS, n_ids)
        capacity = self.expert_capacity
        if capacity is None and cfg.capacity_factor is not None:
            capacity = capacity_of(tokens, self.top_k, E, cfg.capacity_factor, cfg.min_capacity)
        if capacity is not None:
            weights_NS, ids_NS, dropped_NS, dropped = apply_capacity(
                weights_NS, ids_NS, n_ids, capacity, cfg.capacity_priority)
            self.dropped_tokens = dropped if self.dropped_tokens is None else self.dropped_tokens + dropped
            ids_NS = ids_NS.masked_fill(dropped_NS, -1)  # a dropped slot: no work, no output
        return weights_NS, ids_NS

    def _router_input(self, x_ND: torch.Tensor) -> torch.Tensor:
        eps = self.kernel_config.router_jitter
        return jitter_input(x_ND, eps, self.training) if eps > 0 else x_ND

    def _moa(self, x_BTD: torch.Tensor, mask, position_embeddings) -> torch.Tensor:
        B, T, D = x_BTD.shape
        x_ND = x_BTD.reshape(B * T, D)
        weights_NK, ids_NK = self._route(self.router(self._router_input(x_ND)), B * T)
        q_NKF = run_projection(x_ND, None, ids_NK, self.w_q, backend=self.kernel_config.backend)
        k_BTF, v_BTF = self.kv_proj(x_BTD).chunk(2, dim=-1)
        o_NKF = moa_attend(q_NKF, k_BTF, v_BTF, self.num_heads, (self.causal, mask, position_embeddings))
        return run_projection(o_NKF, weights_NK, ids_NK, self.w_o, backend=self.kernel_config.backend)

    def _switchhead(self, x_BTD: torch.Tensor, mask, position_embeddings) -> torch.Tensor:
        B, T, D = x_BTD.shape
        h, d, K, E = self.num_heads, self.head_dim, self.top_k, self.num_experts
        N = B * T
        x_ND = x_BTD.reshape(N, D)
        router_in = self._router_input(x_ND)
        ws_NS, ids_s_NS = self._route(self.source_router(router_in).view(N * h, E), N)
        v_NSd = run_projection(x_ND, None, ids_s_NS, self.w_v, backend=self.kernel_config.backend)
        v_Nhd = (v_NSd.view(N, h, K, d) * ws_NS.view(N, h, K, 1).to(v_NSd.dtype)).sum(2)
        q_BHTd = self.q_proj(x_BTD).view(B, T, h, d).transpose(1, 2)
        k_BHTd = self.k_proj(x_BTD).view(B, T, h, d).transpose(1, 2)
        v_BHTd = v_Nhd.view(B, T, h, d).transpose(1, 2)
        o_BHTd = attend(q_BHTd, k_BHTd, v_BHTd, (self.causal, mask, position_embeddings))
        wd_NS, ids_d_NS = self._route(self.destination_router(router_in).view(N * h, E), N)
        o_NSd = o_BHTd.transpose(1, 2).reshape(N, h, 1, d).expand(N, h, K, d).reshape(N, h * K, d)
        return run_projection(o_NSd, wd_NS, ids_d_NS, self.w_o, backend=self.kernel_config.backend)

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        if hidden_states.dim() != 3 or hidden_states.shape[-1] != self.d_model:
            raise ValueError(f"SparseExpertAttention: hidden_states must be [B, T, d_model={self.d_model}], got "
                             f"{tuple(hidden_states.shape)}")
        B, T, D = hidden_states.shape
        mask = keep_N1 = None
        if attention_mask is not None:
            if tuple(attention_mask.shape) != (B, T):
                raise ValueError(f"SparseExpertAttention: attention_mask must be [B={B}, T={T}] (1 keep, 0 pad), "
                                 f"got {tuple(attention_mask.shape)}")
            keep_BT = attention_mask.bool()
            mask = padding_attention_mask(keep_BT, self.causal)
            keep_N1 = keep_BT.reshape(B * T, 1)
        self.aux_loss = self.dropped_tokens = None  # set again by this call's routing
        run = self._moa if self.variant == "moa" else self._switchhead
        out_ND = run(hidden_states, mask, position_embeddings)
        if self.bias is not None:
            out_ND = out_ND + self.bias
        if keep_N1 is not None:
            out_ND = out_ND * keep_N1.to(out_ND.dtype)
        return out_ND.view(B, T, D)

    def extra_repr(self) -> str:
        return (f"variant={self.variant}, d_model={self.d_model}, experts={self.num_experts}, heads="
                f"{self.num_heads}, head_dim={self.head_dim}, top_k={self.top_k}, causal={self.causal}, "
                f"capacity={self.expert_capacity}")


__all__ = ["SparseExpertAttention", "apply_rotary", "attend", "moa_attend", "padding_attention_mask", "rotate_half"]

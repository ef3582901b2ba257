"""FusedMoE: the module swapped in for a recognized MoE block.

It adopts the original block's children under the same names (so ``state_dict`` keys and
Parameter objects are unchanged), and its forward is router -> ``route`` ->
``kernel_moe::fused_experts`` (+ shared expert): no host syncs and no Python loop over
experts, so ``torch.compile(fullgraph=True)`` captures it whole.

Routing features of the user's :class:`~kernel_moe.config.KernelConfig` apply on top of the
proven routing of the original block (so they change its outputs on purpose), read from the
config the layer is built with:

- ``routing``: "token_choice" (each token picks k experts) or "expert_choice" (each expert
  picks its top ceil(capacity_factor * T * k / E) tokens, k of the original routing and
  capacity_factor 1.0 by default: the compute of token choice).
- ``capacity_factor`` / ``min_capacity`` / ``capacity_priority``: token-choice capacity;
  dropped slots contribute zero and are counted in ``FusedMoE.dropped_tokens``.
- ``load_balancing``: "auxiliary_loss" sets ``FusedMoE.aux_loss`` in training;
  "dynamic" keeps a per-expert selection bias ``expert_bias`` updated from the load.
- ``router_jitter``: multiplicative noise on the router input in training.
- ``random_routing``: in training, with probability p a token's last slot goes to a random
  expert it did not choose (counted in ``FusedMoE.randomly_routed``).

Legend: T tokens, H hidden, E experts, K top-k.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kernel_moe.config import KernelConfig
from kernel_moe.layers.base import SwappedLayer
from kernel_moe.layers.experts import run_experts
from kernel_moe.layers.expert_parallel import parallel_experts
from kernel_moe.layers.spec import MoESpec
from kernel_moe.layers.weights import get_attr_path
from kernel_moe.kernels import resolve_backend
from kernel_moe.kernels.annotate import GATING, ROUTER, stage
from kernel_moe.ops.gating import gate
from kernel_moe.routing.balancing import expert_counts
from kernel_moe.routing.capacity import apply_capacity, expert_capacity
from kernel_moe.routing.expert_choice import expert_choice_route
from kernel_moe.routing.jitter import jitter_input
from kernel_moe.routing.extras import routing_extra
from kernel_moe.routing.random_routing import random_routing
from kernel_moe.routing.losses import load_balancing_loss, router_z_loss
from kernel_moe.routing.topk import SCORINGS, route, routing_weights, shared_weights


def routing_features(config: KernelConfig) -> str:
    """The routing features ``config`` asks for on top of the proven routing, for reports ("" when
    none): expert choice, capacity, load balancing, router jitter."""
    parts = []
    if config.routing != "token_choice":
        parts.append(config.routing)
    if config.capacity_factor is not None:
        parts.append(f"capacity x{config.capacity_factor:g}")
    if config.load_balancing != "none":
        parts.append(config.load_balancing)
    if config.router_jitter:
        parts.append(f"jitter {config.router_jitter:g}")
    if config.random_routing:
        parts.append(f"random routing p={config.random_routing:g}")
    return ", ".join(parts)


class FusedMoE(SwappedLayer):
    """A routed-experts block: router, routing, the fused experts op, shared expert.

    ``original`` is kept (unregistered) for :func:`kernel_moe.restore` and for training
    steps the fused path does not reproduce (``spec.training_fallback``). The routing features
    of ``config`` (see the module docstring) apply on top of the spec's routing; "dynamic"
    balancing adds a persistent ``expert_bias`` [E] and a ``load_counts`` [E] accumulator (call
    kernel_moe.training.update_expert_biases). Raises ValueError when a feature cannot apply to
    this block.
    """

    def __init__(self, original: nn.Module, spec: MoESpec, config: KernelConfig | None = None) -> None:
        super().__init__(original, spec, config)
        self._check_features()
        self.num_experts = spec.num_experts
        self.top_k = spec.top_k
        self.hidden_size = spec.input_hidden()
        self._track_routing = False
        self.aux_loss: torch.Tensor | None = None
        self.dropped_tokens: torch.Tensor | None = None
        self.randomly_routed: torch.Tensor | None = None
        device = get_attr_path(self, spec.router.weight).device
        self.register_buffer("routing_counts", torch.zeros(self.num_experts, dtype=torch.int64, device=device),
                             persistent=False)
        if self.kernel_config.load_balancing == "dynamic" and not hasattr(self, "expert_bias"):
            self.register_buffer("expert_bias", torch.zeros(self.num_experts, dtype=torch.float32, device=device))
            self.register_buffer("load_counts", torch.zeros(self.num_experts, dtype=torch.int64, device=device),
                                 persistent=False)
        self._bind_weights()
        self._use_gating_op = self._gating_op_applies()

    def _check_features(self) -> None:
        """Raise ValueError when the config's routing features cannot apply to this block."""
        if self.kernel_config.routing != "expert_choice":
            return
        if self.kernel_config.random_routing:
            raise ValueError("random_routing applies to token-choice routing; with routing='expert_choice' "
                             "every expert already gets its tokens")
        if self.spec.router.routing.order != "score_then_topk":
            raise ValueError("routing='expert_choice' needs a router that scores all experts (score_then_topk)")
        if self.spec.router.id_table is not None or self.spec.capacity is not None or self.spec.shared_weighted:
            raise ValueError("routing='expert_choice' cannot apply to a block that routes by a table of token ids, "
                             "has its own expert capacity or weighs its shared experts by the router")
        if self.spec.num_experts != self.spec.experts.num_experts:
            raise ValueError("routing='expert_choice' cannot route to experts without weights (identity or zero "
                             "experts)")
        if self.spec.router.routing.scoring not in SCORINGS:
            raise ValueError(f"routing='expert_choice' scores by {', '.join(SCORINGS)}, not the block's "
                             f"{self.spec.router.routing.scoring}")
        choice = [e.describe() for e in self.spec.returned_extras() if e.needs_choice]
        if choice:
            raise ValueError(f"routing='expert_choice' cannot reproduce what the block returns from each token's "
                             f"top-k choice ({', '.join(choice)})")

    def __getstate__(self) -> dict:
        """``copy.deepcopy`` and pickling leave out ``aux_loss``: the last training forward's loss
        belongs to that forward's autograd graph, which neither can copy (a copy has run no
        forward yet, so its ``aux_loss`` is None)."""
        state = super().__getstate__()
        state["aux_loss"] = None
        return state

    def _gating_op_applies(self) -> bool:
        """True when routing runs as the fused gating kernel: the Triton backend on this device
        and a routing the kernel computes (no groups, no selection bias, fp32 scores)."""
        r = self.spec.router
        routing = r.routing
        if r.selection_bias is not None or r.id_table is not None or self.kernel_config.load_balancing == "dynamic":
            return False
        if routing.shared_ids or r.weight_scale is not None:
            return False
        if routing.num_groups != 1 or routing.score_dtype != "float32" or routing.scoring not in SCORINGS:
            return False
        try:
            return resolve_backend(self.backend, self.routing_counts.device) == "triton"
        except ValueError:
            return False

    def _apply(self, fn, recurse: bool = True):
        result = super()._apply(fn, recurse)
        self._use_gating_op = self._gating_op_applies()
        return result

    def _weight_sources(self) -> list:
        return self.experts_spec().sources()

    def track_routing(self, enabled: bool = True) -> None:
        """Accumulate per-expert slot counts into ``routing_counts`` on every forward."""
        self._track_routing = enabled

    def reset_routing_counts(self) -> None:
        self.routing_counts.zero_()

    def router_logits(self, x_TH: torch.Tensor) -> torch.Tensor:
        """[T, H] -> [T, E], in the router weight's dtype (fp32 when ``fp32_logits``)."""
        r = self.spec.router
        w_EH = get_attr_path(self, r.weight)
        if r.flat:  # [E * H] -> its [E, H] view
            w_EH = w_EH.view(-1, self.hidden_size)
        w_EH = w_EH.t() if r.transposed else w_EH
        b_E = get_attr_path(self, r.bias) if r.bias is not None else None
        if r.fp32_logits:
            logits_TE = F.linear(x_TH.float(), w_EH.float(), None if b_E is None else b_E.float())
        else:  # a router kept in another dtype than the block (fp32 under bf16) computes in its own
            logits_TE = F.linear(x_TH.to(w_EH.dtype), w_EH, None if b_E is None else b_E.to(w_EH.dtype))
        return logits_TE * r.logit_scale if r.logit_scale != 1.0 else logits_TE

    def _experts(self, x_TH: torch.Tensor, weights_TK: torch.Tensor, ids_TK: torch.Tensor) -> torch.Tensor:
        if self.expert_parallel is not None:
            return parallel_experts(self, x_TH, weights_TK, ids_TK)
        return run_experts(self, self.spec.experts, x_TH, weights_TK, ids_TK, self.backend, self.deterministic,
                           self.spec.scale_inputs)

    def _chain(self, paths: tuple[str, ...], x: torch.Tensor) -> torch.Tensor:
        """``x`` through the block's modules at ``paths``, in order (``spec.expert_input`` / ``expert_output``)."""
        for path in paths:
            x = self.get_submodule(path)(x)
        return x

    def _shared_weights(self, logits_TG: torch.Tensor, ids_TK: torch.Tensor, x_TH: torch.Tensor) -> torch.Tensor:
        """The weights [T, S] of the shared experts the router weighs (``spec.shared_weighted``), in x's dtype."""
        r = self.spec.router
        weights_TS = shared_weights(logits_TG, ids_TK, r.routing)
        if r.weight_scale is not None:
            weights_TS = weights_TS * get_attr_path(self, r.weight_scale)
        return weights_TS.to(x_TH.dtype)

    def _identity_experts(self, x_TH: torch.Tensor, weights_TK: torch.Tensor, ids_TK: torch.Tensor) -> torch.Tensor:
        """What the routed ids in [E, G) add as identity experts: each token times the sum of its
        weights on them, in x's dtype. Dropped slots (id -1) add nothing."""
        identity_TK = ids_TK >= self.spec.experts.num_experts
        w_T1 = (weights_TK * identity_TK.to(weights_TK.dtype)).sum(dim=-1, keepdim=True)
        return x_TH * w_T1.to(x_TH.dtype)

    def _expert_choice(self, x_TH: torch.Tensor, logits_TE: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Each expert takes its top-C tokens: (output [T, H], expert id of each of the E*C slots)."""
        cfg, E = self.kernel_config, self.num_experts
        T = x_TH.shape[0]
        C = expert_capacity(T, self.top_k, E, cfg.capacity_factor or 1.0, cfg.min_capacity)
        with stage(GATING):
            weights_EC, tok_EC = expert_choice_route(logits_TE, C, self.spec.router.routing.scoring)
        tok_S = tok_EC.reshape(-1)
        ids_S1 = torch.arange(E, device=x_TH.device).repeat_interleave(C).unsqueeze(-1)
        y_SH = self._experts(x_TH.index_select(0, tok_S), weights_EC.reshape(-1, 1), ids_S1)
        out_TH = torch.zeros_like(x_TH).index_add_(0, tok_S, y_SH)
        return out_TH, ids_S1

    def _token_ids(self, args: tuple, kwargs: dict) -> torch.Tensor | None:
        """The token ids [B, S] the block takes besides its hidden states (``spec.token_ids``), from
        the call's extra arguments; a TypeError for arguments the original block does not take."""
        name = self.spec.token_ids.name if self.spec.token_ids is not None else None
        extra = dict(zip([name], args)) if name is not None and len(args) <= 1 else {}
        if len(args) > len(extra) or set(kwargs) - {name} or (name in extra and name in kwargs):
            raise TypeError(f"{type(self).__name__}.forward() takes hidden_states"
                            + (f" and {name}" if name else "") + f", got {len(args)} more positional arguments "
                            f"and keywords {sorted(kwargs)}")
        return extra.get(name, kwargs.get(name)) if name is not None else None

    def _block_capacity(self, weights_TK: torch.Tensor, ids_TK: torch.Tensor,
                        sequences: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The block's own capacity (``spec.capacity``): (weights with dropped slots zeroed, dropped
        [T, K] bool). Per sequence, every (sequence, expert) pair counts as its own expert."""
        capacity = self.spec.capacity
        T = ids_TK.shape[0]
        groups = max(sequences, 1) if capacity.per_sequence else 1
        sequence_T = torch.arange(T, device=ids_TK.device) // max(T // groups, 1)
        keyed_TK = ids_TK + (sequence_T * self.num_experts).unsqueeze(-1)
        weights_TK, _, dropped_TK, _ = apply_capacity(weights_TK, keyed_TK, groups * self.num_experts,
                                                      capacity.slots, "position")
        return weights_TK, dropped_TK

    def _gating(self, logits_TE: torch.Tensor, token_ids: torch.Tensor | None,
                sequences: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Each token's k experts and weights (the proven routing, then the config's features):
        (weights [T, K], ids [T, K], the ids the op runs [T, K]: -1 for slots dropped by a capacity)."""
        spec, cfg = self.spec, self.kernel_config
        if spec.router.id_table is not None:  # hash routing: a table gives each token id its experts
            if token_ids is None:
                raise ValueError(f"this block routes by a table of token ids: pass {spec.token_ids.name}")
            table = get_attr_path(self, spec.router.id_table)
            ids_TK = table.index_select(0, token_ids.reshape(-1).to(torch.long)).to(torch.long)
            weights_TK = routing_weights(logits_TE, ids_TK, spec.router.routing)
        else:
            sel_bias = get_attr_path(self, spec.router.selection_bias) if spec.router.selection_bias else None
            if cfg.load_balancing == "dynamic":
                sel_bias = self.expert_bias if sel_bias is None else sel_bias + self.expert_bias
            if self._use_gating_op:
                weights_TK, ids_TK = gate(logits_TE, spec.router.routing, self.backend)
            else:
                weights_TK, ids_TK = route(logits_TE, spec.router.routing, sel_bias)
        if spec.router.weight_scale is not None:
            weights_TK = weights_TK * get_attr_path(self, spec.router.weight_scale)
        if self.training and cfg.random_routing > 0:
            weights_TK, ids_TK, self.randomly_routed = random_routing(
                logits_TE, weights_TK, ids_TK, spec.router.routing, cfg.random_routing)
        run_ids_TK = ids_TK
        if spec.capacity is not None:
            weights_TK, dropped_TK = self._block_capacity(weights_TK, ids_TK, sequences)
            run_ids_TK = run_ids_TK.masked_fill(dropped_TK, -1)  # a dropped slot: no work (the contract's rule)
        if cfg.capacity_factor is not None:
            T, K = ids_TK.shape
            capacity = expert_capacity(T, K, self.num_experts, cfg.capacity_factor, cfg.min_capacity)
            weights_TK, ids_TK, dropped_TK, self.dropped_tokens = apply_capacity(
                weights_TK, ids_TK, self.num_experts, capacity, cfg.capacity_priority)
            run_ids_TK = run_ids_TK.masked_fill(dropped_TK, -1)
        return weights_TK, ids_TK, run_ids_TK

    def _token_choice(self, x_TH: torch.Tensor, logits_TE: torch.Tensor, token_ids: torch.Tensor | None,
                      sequences: int):
        """Each token's k experts (the proven routing, then the config's features) through the op:
        (routed output [T, H], weights [T, K], ids [T, K]); ``sequences``: B of a [B, S, H] input."""
        spec = self.spec
        with stage(GATING):
            weights_TK, ids_TK, run_ids_TK = self._gating(logits_TE, token_ids, sequences)
        out_TH = self._experts(x_TH, weights_TK, run_ids_TK)
        if spec.weightless == "identity" and self.num_experts > spec.experts.num_experts:
            out_TH = out_TH + self._identity_experts(x_TH, weights_TK, run_ids_TK)
        return out_TH, weights_TK, ids_TK

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        if self.spec.passthrough and set(kwargs) & set(self.spec.passthrough):  # not what was proven
            return self.original(hidden_states, *args, **kwargs)
        token_ids = self._token_ids(args, kwargs)
        if self.runs_original(hidden_states):
            return self.original(hidden_states, *args, **kwargs)
        spec, cfg = self.spec, self.kernel_config
        x_TH = hidden_states.reshape(-1, self.hidden_size)
        if self.training and spec.input_jitter > 0:
            x_TH = jitter_input(x_TH, spec.input_jitter, True)
        router_in = jitter_input(x_TH, cfg.router_jitter, self.training) if cfg.router_jitter > 0 else x_TH
        with stage(ROUTER):
            logits_TE = self.router_logits(router_in)
        experts_in = self._chain(spec.expert_input, x_TH) if spec.expert_input else x_TH
        if cfg.routing == "expert_choice":
            (out_TH, ids_TK), weights_TK = self._expert_choice(experts_in, logits_TE), None
        else:
            sequences = hidden_states.shape[0] if hidden_states.dim() == 3 else 1
            out_TH, weights_TK, ids_TK = self._token_choice(experts_in, logits_TE, token_ids, sequences)
        if spec.routed_scale != 1.0:
            out_TH = out_TH * spec.routed_scale
        if spec.expert_output:
            out_TH = self._chain(spec.expert_output, out_TH)
        if self._track_routing:
            self.routing_counts += expert_counts(ids_TK, self.num_experts)
        if self.training and cfg.load_balancing == "auxiliary_loss":
            probs_TE = torch.softmax(logits_TE[..., : self.num_experts].float(), dim=-1)
            self.aux_loss = cfg.aux_loss_weight * load_balancing_loss(probs_TE, ids_TK, self.num_experts) + (
                cfg.z_loss_weight * router_z_loss(logits_TE))
        if self.training and cfg.load_balancing == "dynamic":
            self.load_counts += expert_counts(ids_TK, self.num_experts)
        if spec.shared_weighted:
            shared_TH = get_attr_path(self, spec.shared_expert)(x_TH, self._shared_weights(logits_TE, ids_TK, x_TH))
            out_TH = out_TH + shared_TH
        elif spec.shared_expert is not None:
            shared_TH = get_attr_path(self, spec.shared_expert)(x_TH)
            if spec.shared_gate is not None:
                shared_TH = torch.sigmoid(get_attr_path(self, spec.shared_gate)(x_TH)) * shared_TH
            if spec.shared_scale != 1.0:
                shared_TH = shared_TH * spec.shared_scale
            out_TH = out_TH + shared_TH
        if spec.output_bias is not None:
            out_TH = out_TH + get_attr_path(self, spec.output_bias)
        if spec.block_output:
            out_TH = self._chain(spec.block_output, out_TH)
        return self._returned(out_TH, hidden_states, (logits_TE, weights_TK, ids_TK))

    def _returned(self, out_TH: torch.Tensor, hidden_states: torch.Tensor, routing: tuple):
        """What the original block returns: the output (shaped like the input, as tokens, or
        flattened) and the extras of the spec, computed from ``routing`` (logits [T, E], weights
        [T, K], ids [T, K]); flattened outputs flatten every extra of two or more dims."""
        spec = self.spec
        out = out_TH.reshape(hidden_states.shape) if spec.output_shape == "input" else out_TH
        extras = [routing_extra(e, *routing) for e in spec.returned_extras()]
        if spec.output_shape == "flat":
            out = out.flatten()
            extras = [t.flatten() if t.dim() > 1 else t for t in extras]
        return (out, *extras) if extras else out

    def features(self) -> str:
        return routing_features(self.kernel_config)

    def extra_repr(self) -> str:
        extra = self.features()
        return super().extra_repr() + (f", {extra}" if extra else "")

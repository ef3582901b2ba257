"""Descriptions of what a swapped layer computes, produced by the adapters.

A spec names tensors by attribute path relative to the swapped module (the new layer
adopts the original module's children under the same names, so the paths and the
``state_dict`` keys stay the same).

Three kinds of swap, one spec class each: :class:`MoESpec` (a whole block: router, experts,
shared expert), :class:`ExpertsModuleSpec` (an experts module swapped alone, routing given by
its caller) and :class:`FFNSpec` (a dense FFN). Each kind says what differs between them (the
layer that computes it, the arguments its forward is probed with, what of it a config can
contradict, what it can return), so that the manager treats them alike.

Legend: T tokens, H hidden, E experts, K top-k, N up features, I intermediate.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import nn

from kernel_moe.kernels.contract import Activation
from kernel_moe.layers.weights import WeightSource, get_attr_path
from kernel_moe.routing.extras import RoutingExtra
from kernel_moe.routing.topk import TopKRouting

if TYPE_CHECKING:
    from kernel_moe.config import KernelConfig

RETURNS = ("tensor", "tensor_logits", "tensor_weights")
WEIGHTLESS = ("zero", "identity")
OUTPUT_SHAPES = ("input", "tokens", "flat")
"""How a block shapes what it returns: like its input, as tokens [T, H] (router outputs [T, E] /
[T, K]), or flattened to 1-D (every returned tensor). A returns kind names a flattened shape with
a suffix: "tensor_logits@flat" is (output [T*H], router logits [T*E])."""

Draw = Callable[[tuple[int, ...], int], torch.Tensor]
"""(shape, seed offset) -> a seeded probe tensor of the module's dtype and device."""


@dataclass(frozen=True)
class PostNorm:
    """A norm of each expert output before its routing weight (MuseSpark's post-expert norm): the
    output is scaled by ``offset + weight`` [H] (``weight`` a path; offset 1.0 for a weight stored
    as the deviation from 1), then RMS-normalised with ``eps`` (the op's ``post_norm``)."""

    weight: str
    offset: float = 0.0
    eps: float = 1e-6

    def scale(self, layer: nn.Module) -> torch.Tensor:
        """The scale [H] the op takes (differentiable: the weight's gradient flows through it)."""
        w_H = get_attr_path(layer, self.weight)
        return w_H + self.offset if self.offset != 0.0 else w_H

    def describe(self) -> str:
        return "post-norm" + (f"(1+w, eps={self.eps:g})" if self.offset == 1.0 else f"(eps={self.eps:g})")


@dataclass(frozen=True)
class ExpertsSpec:
    """Routed experts: up [E, N, H], down [E, H, I], optional biases, the activation, and an
    optional norm of each expert's output (:class:`PostNorm`)."""

    num_experts: int
    hidden: int
    intermediate: int
    up: WeightSource
    down: WeightSource
    up_bias: WeightSource | None = None
    down_bias: WeightSource | None = None
    activation: Activation = Activation()
    post_norm: PostNorm | None = None

    def sources(self) -> list[WeightSource]:
        """The weight sources a layer binds (biases only where present)."""
        return [s for s in (self.up, self.down, self.up_bias, self.down_bias) if s is not None]

    def describe(self) -> str:
        return (f"{self.num_experts}x[{self.hidden}->{self.intermediate}] {self.activation.describe()}"
                + (" +bias" if self.up_bias else "") + (f" {self.post_norm.describe()}" if self.post_norm else ""))


@dataclass(frozen=True)
class LinearRouter:
    """A linear router: logits [T, E] = x @ weight.T (+ bias), in fp32 when ``fp32_logits``, which
    ``routing`` turns into top-k weights and expert ids.

    ``selection_bias`` is the path of a per-expert bias added to the scores for selection only.
    ``id_table`` is the path of an int [V, K] tensor giving the experts of each token id (hash
    routing, DeepSeek-V4): it replaces the top-k choice, and ``routing`` weighs the table's experts.
    ``transposed``: the weight is stored [H, E] (a raw Parameter used as ``x @ weight``).
    ``flat``: the weight is stored flat, [E * H] (so that it shards over many ranks), and read as
    its [E, H] view (no copy).
    ``logit_scale``: a factor the router multiplies its logits by before routing (MuseSpark's
    ``output_multiplier``). ``weight_scale``: the path of a tensor (a learnable scalar, Inkling's
    ``global_scale``) the routing weights are multiplied by.
    """

    weight: str
    routing: TopKRouting
    bias: str | None = None
    selection_bias: str | None = None
    fp32_logits: bool = False
    id_table: str | None = None
    transposed: bool = False
    flat: bool = False
    logit_scale: float = 1.0
    weight_scale: str | None = None


@dataclass(frozen=True)
class BlockCapacity:
    """A capacity the block imposes itself (Switch Transformers' router): each expert takes at most
    ``slots`` slots in each sequence of a [B, S, H] input (``per_sequence``) or in the whole call,
    admitted in position order (slot t * K + j); later slots are dropped: no output, no gradient."""

    slots: int
    per_sequence: bool = True

    def probe_tokens(self, num_ids: int, top_k: int) -> int:
        """Tokens per sequence a probe needs for every expert to overflow on average (twice its
        capacity), so that which slots are dropped shows in the outputs."""
        return -(-2 * self.slots * num_ids // top_k)


@dataclass(frozen=True)
class TokenIds:
    """A forward argument of token ids [B, S] a block takes besides its hidden states (its name:
    callers pass it by keyword); the probe draws ids in [0, ``vocab``)."""

    name: str
    vocab: int = 32


class SwapSpec:
    """What every kind of spec answers (mixed into the three spec dataclasses, which all hold
    ``experts``, ``training_fallback`` and ``gradient_fallback``)."""

    experts: ExpertsSpec
    training_fallback: str | None
    gradient_fallback: str | None

    num_experts = 1
    top_k = 1

    def layer_class(self) -> type[nn.Module]:
        """The SwappedLayer subclass that computes this kind of spec."""
        raise NotImplementedError

    def build(self, original: nn.Module, config: KernelConfig | None = None) -> nn.Module:
        """The layer computing this spec, adopting ``original``'s children, with everything it
        needs from ``config`` (backend, determinism, routing features)."""
        return self.layer_class()(original, self, config)

    def input_hidden(self) -> int:
        """H of the module's input (the experts' unless the spec says otherwise)."""
        return self.experts.hidden

    def probe_args(self, tokens: int, draw: Draw) -> list[tuple]:
        """Argument tuples for the module's forward, the likeliest first: [1, T, H] tokens, then [T, H]."""
        H = self.input_hidden()
        return [(draw((1, tokens, H), 0),), (draw((tokens, H), 0),)]

    def unexpected(self, config: KernelConfig) -> str | None:
        """How the module contradicts what ``config`` says to expect (None when it does not)."""
        return None

    def returning(self, kind: str) -> SwapSpec | None:
        """This spec for a module whose forward returns ``kind`` (one of :data:`RETURNS`, with an
        ``@tokens`` or ``@flat`` suffix when the outputs are reshaped, see :data:`OUTPUT_SHAPES`),
        or None when the layer cannot return that."""
        return self if kind == "tensor" else None

    def with_fallbacks(self, training: str | None, gradient: str | None) -> SwapSpec:
        """This spec with the reasons (None: none) to run the original in training, and whenever
        autograd records the call."""
        return dataclasses.replace(self, training_fallback=training, gradient_fallback=gradient)  # type: ignore

    def fallback_notes(self) -> list[str]:
        """What the report says about the fallbacks to the original module."""
        notes = []
        if self.training_fallback:
            notes.append(f"training runs the original ({self.training_fallback})")
        if self.gradient_fallback:
            notes.append(f"calls that need gradients run the original ({self.gradient_fallback})")
        return notes

    def _unexpected_experts(self, config: KernelConfig) -> str | None:
        if config.num_experts is not None and config.num_experts != self.num_experts:
            return f"module has num_experts={self.num_experts}, config expects num_experts={config.num_experts}"
        return None


@dataclass(frozen=True)
class MoESpec(SwapSpec):
    """A whole MoE block: router + routed experts (+ optional shared expert).

    - ``shared_expert``: path of a module applied to every token and added to the output.
    - ``shared_gate``: path of a Linear(H, 1) whose sigmoid scales the shared expert.
    - ``shared_weighted``: the shared expert module takes per-token weights too,
      ``shared_expert(x, weights [T, S])``: those of the router's shared ids (``routing.shared_ids``).
    - ``output_bias``: path of a bias [H] the block adds to its output.
    - ``input_jitter``: Mixtral-style multiplicative input noise in training.
    - ``returns``: what the block's forward returns, one of :data:`RETURNS`: "tensor" (the
      output), "tensor_logits" (output, router logits [T, E]) or "tensor_weights" (output,
      top-k routing weights [T, K], as GPT-OSS blocks do); a shorthand for the two ``extras``
      below that hand-built specs use.
    - ``extras``: the outputs the block returns after its output, in order (each a
      :class:`~kernel_moe.routing.extras.RoutingExtra`: logits, top-k weights or ids, per-expert
      counts, an auxiliary loss); the forward returns ``(output, *extras)`` when there are any.
    - ``output_shape``: one of :data:`OUTPUT_SHAPES`: the output shaped like the input, as
      tokens [T, H] (Llama 4), or every returned tensor flattened to 1-D (Ernie 4.5 VL).
    - ``capacity``: the block's own expert capacity (:class:`BlockCapacity`), proven on a probe
      long enough to overflow it.
    - ``token_ids``: a token-ids argument the block's forward takes (see :class:`TokenIds`): used
      by a hash-routing router (``router.id_table``), else proven to change nothing.
    - ``scale_inputs``: the routing weights scale each expert's input instead of its output
      (Llama 4: ``sum_j expert_j(w_j * x)``), passed to the op as ``StackedExperts.scale_inputs``.
    - ``routed_scale``: a factor the block multiplies the routed experts' output by, after the
      op (the OpenAI privacy filter multiplies by k what its router divided by k).
    - ``shared_scale``: a factor the block multiplies the shared expert's output by before adding
      it (a block averaging its shared MLP with the k routed ones: 1 / (k + 1), the routed output
      then scaled by k / (k + 1)).
    - ``weightless``: what a routed id in [E, G) computes when the router scores G ids but only E
      experts hold weights: "zero" (nothing: a dropped slot of the op) or "identity" (the token
      times its routing weight, added outside the op; LongCat-Flash's zero-computation experts).
    - ``passthrough``: keyword-only arguments (with defaults) of the original's forward that the
      fused layer does not compute with: it was proven without them, and a call that gives one
      runs the original module.
    - ``expert_input`` / ``expert_output``: paths of the block's modules applied in order to the
      tokens before the routed experts and to their output after them (MuseSpark's projection to
      and from a narrower expert width, and its norm); the router and the shared expert see the
      block's own input. ``block_hidden``: H of the block's input when it differs from the experts'.
      ``block_output``: paths of modules applied in order to the block's whole output, after the
      shared expert and the output bias (A.X-K1's norm of the block output).
    - ``training_fallback``: a reason to run the original module in training mode (dropout or
      noise the fused layer does not reproduce); None when the fused path is exact in training too.
    - ``gradient_fallback``: a reason to run the original module whenever autograd records the
      call (its gradients differ from the fused backward's: a custom autograd Function, a
      detached router or routing weight); None when the fused backward is proven too.
    """

    router: LinearRouter
    experts: ExpertsSpec
    shared_expert: str | None = None
    shared_gate: str | None = None
    output_bias: str | None = None
    input_jitter: float = 0.0
    returns: str = "tensor"
    training_fallback: str | None = None
    gradient_fallback: str | None = None
    notes: tuple[str, ...] = field(default=())
    output_shape: str = "input"
    token_ids: TokenIds | None = None
    capacity: BlockCapacity | None = None
    scale_inputs: bool = False
    weightless: str = "zero"
    routed_scale: float = 1.0
    shared_scale: float = 1.0
    passthrough: tuple[str, ...] = ()
    extras: tuple[RoutingExtra, ...] = ()
    expert_input: tuple[str, ...] = ()
    expert_output: tuple[str, ...] = ()
    block_hidden: int | None = None
    block_output: tuple[str, ...] = ()
    shared_weighted: bool = False

    def __post_init__(self) -> None:
        if self.returns not in RETURNS:
            raise ValueError(f"MoESpec.returns={self.returns!r}; allowed: {', '.join(RETURNS)}")
        if self.returns != "tensor" and self.extras:
            raise ValueError(f"MoESpec.returns={self.returns!r} with extras={self.extras!r}: give the extra "
                             "outputs once, as extras (returns='tensor')")
        if self.output_shape not in OUTPUT_SHAPES:
            raise ValueError(f"MoESpec.output_shape={self.output_shape!r}; allowed: {', '.join(OUTPUT_SHAPES)}")
        if self.weightless not in WEIGHTLESS:
            raise ValueError(f"MoESpec.weightless={self.weightless!r}; allowed: {', '.join(WEIGHTLESS)}")

    @property
    def top_k(self) -> int:  # type: ignore[override]
        return self.router.routing.top_k

    def input_hidden(self) -> int:
        return self.block_hidden or self.experts.hidden

    @property
    def num_experts(self) -> int:  # type: ignore[override]
        """G, the ids the router chooses from (E, or more when some experts hold no weights)."""
        return self.router.routing.num_experts

    def layer_class(self) -> type[nn.Module]:
        from kernel_moe.layers.moe import FusedMoE  # that module imports this one

        return FusedMoE

    def unexpected(self, config: KernelConfig) -> str | None:
        why = self._unexpected_experts(config)
        if why is None and config.top_k is not None and config.top_k != self.top_k:
            why = f"module routes top_k={self.top_k}, config expects top_k={config.top_k}"
        return why

    def probe_args(self, tokens: int, draw: Draw) -> list[tuple]:
        """With a capacity: two sequences long enough to overflow it ([2, S, H]); with a token-ids
        argument: the tokens and ids in [0, vocab) (drawn from the probe's seeded values); else as
        every spec."""
        if self.token_ids is None and self.capacity is None:
            return super().probe_args(tokens, draw)
        shape = (1, tokens)
        if self.capacity is not None:
            shape = (2, max(tokens, self.capacity.probe_tokens(self.num_experts, self.top_k)))
        x = draw((*shape, self.input_hidden()), 0)
        if self.token_ids is None:
            return [(x,)]
        return [(x, (draw(shape, 9).double().abs() * 1e6).long() % self.token_ids.vocab)]

    def returning(self, kind: str) -> MoESpec | None:
        returns, _, shape = kind.partition("@")
        if returns not in RETURNS or (shape or "input") not in OUTPUT_SHAPES:
            return None
        return dataclasses.replace(self, returns=returns, output_shape=shape or "input")

    def with_fallbacks(self, training: str | None, gradient: str | None) -> MoESpec:
        """As every spec; SparseMixer routing always runs the original in training, whatever one
        probe showed: there it samples its experts and has its own backward (the probe may draw no
        token whose sample can differ)."""
        if training is None and self.router.routing.scoring == "sparsemixer":
            training = "SparseMixer samples its experts in training (Gumbel) and has its own backward"
        return dataclasses.replace(self, training_fallback=training, gradient_fallback=gradient)

    def returned_extras(self) -> tuple[RoutingExtra, ...]:
        """The outputs the forward returns after the output (``returns`` spelled as ``extras``)."""
        shorthand = {"tensor_logits": (RoutingExtra("logits"),), "tensor_weights": (RoutingExtra("weights"),)}
        return shorthand.get(self.returns, self.extras)

    def describe(self) -> str:
        parts = [self.router.routing.describe(), self.experts.describe()]
        if self.router.id_table is not None:
            parts[0] = f"experts by token id ({self.router.id_table}) weighted {parts[0]}"
        if self.router.logit_scale != 1.0:
            parts[0] = f"logits x{self.router.logit_scale:.4g}>{parts[0]}"
        if self.scale_inputs:
            parts.insert(1, "weights scale the inputs")
        if self.routed_scale != 1.0:
            parts.insert(1, f"routed output x{self.routed_scale:g}")
        if self.capacity is not None:
            scope = "per sequence" if self.capacity.per_sequence else "per call"
            parts.insert(1, f"capacity {self.capacity.slots} {scope} (position order)")
        extra = self.num_experts - self.experts.num_experts
        if extra > 0:
            parts.insert(1, f"+{extra} {self.weightless} experts")
        if self.expert_input or self.expert_output:
            parts.insert(1, f"experts between {'>'.join(self.expert_input) or '-'} and "
                            f"{'>'.join(self.expert_output) or '-'}")
        if self.router.weight_scale:
            parts[0] += f">x{self.router.weight_scale}"
        if self.shared_expert:
            scaled = f" x{self.shared_scale:g}" if self.shared_scale != 1.0 else ""
            parts.append("shared" + ("(gated)" if self.shared_gate else "") + ("(weighted)" if self.shared_weighted
                                                                                else "") + scaled)
        if self.output_bias:
            parts.append("+output bias")
        if self.block_output:
            parts.append(f"then {'>'.join(self.block_output)}")
        if self.extras:
            parts.append("returns (output, " + ", ".join(e.describe() for e in self.extras) + ")")
        return ", ".join(parts)


@dataclass(frozen=True)
class FFNSpec(SwapSpec):
    """A dense FFN: the experts computation with one expert (up [1, N, H] with gate and up
    concatenated when gated, down [1, H, I]) applied to every token with weight 1."""

    experts: ExpertsSpec
    training_fallback: str | None = None
    gradient_fallback: str | None = None

    @property
    def hidden(self) -> int:
        return self.experts.hidden

    def layer_class(self) -> type[nn.Module]:
        from kernel_moe.layers.ffn import FusedFFN  # that module imports this one

        return FusedFFN

    def describe(self) -> str:
        ex = self.experts
        return f"dense [{ex.hidden}->{ex.intermediate}] {ex.activation.describe()}" + (" +bias" if ex.up_bias else "")


@dataclass(frozen=True)
class ExpertsModuleSpec(SwapSpec):
    """An experts module swapped alone, called as ``experts(hidden_states, top_k_index,
    top_k_weights)`` (the transformers experts interface) when its block's router is not fused."""

    experts: ExpertsSpec
    training_fallback: str | None = None
    gradient_fallback: str | None = None

    top_k = 0

    @property
    def num_experts(self) -> int:  # type: ignore[override]
        return self.experts.num_experts

    def layer_class(self) -> type[nn.Module]:
        from kernel_moe.layers.experts import FusedExperts  # that module imports this one

        return FusedExperts

    def probe_args(self, tokens: int, draw: Draw) -> list[tuple]:
        """Tokens [T, H] with a softmax top-2 routing: ids [T, K] and weights [T, K] in x's dtype."""
        H, E = self.experts.hidden, self.num_experts
        x_TH = draw((tokens, H), 0)
        scores_TE = draw((tokens, E), 1).float().softmax(dim=-1)
        weights_TK, ids_TK = scores_TE.topk(min(2, E), dim=-1)
        return [(x_TH, ids_TK, weights_TK.to(x_TH.dtype))]

    def unexpected(self, config: KernelConfig) -> str | None:
        return self._unexpected_experts(config)

    def describe(self) -> str:
        return "experts only: " + self.experts.describe()


RouterSpec = LinearRouter  # deprecated alias (renamed: it is a linear router, weight path + top-k routing)
ExpertsOnlySpec = ExpertsModuleSpec  # deprecated alias (renamed: it swaps an experts module alone)

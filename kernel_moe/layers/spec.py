"""Descriptions of what a swapped layer computes, produced by the adapters.

A spec names tensors by attribute path relative to the swapped module (the new layer
adopts the original module's children under the same names, so the paths and the
``state_dict`` keys stay the same).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from kernel_moe.kernels.contract import Activation
from kernel_moe.layers.weights import WeightSource
from kernel_moe.routing.topk import TopKRouting

RETURNS = ("tensor", "tensor_logits", "tensor_weights")


@dataclass(frozen=True)
class ExpertsSpec:
    """Routed experts: up [E, N, H], down [E, H, I], optional biases, and the activation."""

    num_experts: int
    hidden: int
    intermediate: int
    up: WeightSource
    down: WeightSource
    up_bias: WeightSource | None = None
    down_bias: WeightSource | None = None
    activation: Activation = Activation()

    def sources(self) -> list[WeightSource]:
        """The weight sources a layer binds (biases only where present)."""
        return [s for s in (self.up, self.down, self.up_bias, self.down_bias) if s is not None]

    def describe(self) -> str:
        return (f"{self.num_experts}x[{self.hidden}->{self.intermediate}] {self.activation.describe()}"
                + (" +bias" if self.up_bias else ""))


@dataclass(frozen=True)
class LinearRouter:
    """A linear router: logits [T, E] = x @ weight.T (+ bias), in fp32 when ``fp32_logits``, which
    ``routing`` turns into top-k weights and expert ids.

    ``selection_bias`` is the path of a per-expert bias added to the scores for selection only.
    """

    weight: str
    routing: TopKRouting
    bias: str | None = None
    selection_bias: str | None = None
    fp32_logits: bool = False


@dataclass(frozen=True)
class MoESpec:
    """A whole MoE block: router + routed experts (+ optional shared expert).

    - ``shared_expert``: path of a module applied to every token and added to the output.
    - ``shared_gate``: path of a Linear(H, 1) whose sigmoid scales the shared expert.
    - ``output_bias``: path of a bias [H] the block adds to its output.
    - ``input_jitter``: Mixtral-style multiplicative input noise in training.
    - ``returns``: what the block's forward returns, one of :data:`RETURNS`: "tensor" (the
      output), "tensor_logits" (output, router logits [T, E]) or "tensor_weights" (output,
      top-k routing weights [T, K], as GPT-OSS blocks do).
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

    def __post_init__(self) -> None:
        if self.returns not in RETURNS:
            raise ValueError(f"MoESpec.returns={self.returns!r}; allowed: {', '.join(RETURNS)}")

    @property
    def top_k(self) -> int:
        return self.router.routing.top_k

    @property
    def num_experts(self) -> int:
        return self.experts.num_experts

    def describe(self) -> str:
        parts = [self.router.routing.describe(), self.experts.describe()]
        if self.shared_expert:
            parts.append("shared" + ("(gated)" if self.shared_gate else ""))
        if self.output_bias:
            parts.append("+output bias")
        return ", ".join(parts)


@dataclass(frozen=True)
class FFNSpec:
    """A dense FFN: the experts computation with one expert (up [1, N, H] with gate and up
    concatenated when gated, down [1, H, I]) applied to every token with weight 1."""

    experts: ExpertsSpec
    training_fallback: str | None = None
    gradient_fallback: str | None = None

    @property
    def hidden(self) -> int:
        return self.experts.hidden

    def describe(self) -> str:
        ex = self.experts
        return f"dense [{ex.hidden}->{ex.intermediate}] {ex.activation.describe()}" + (" +bias" if ex.up_bias else "")


@dataclass(frozen=True)
class ExpertsModuleSpec:
    """An experts module swapped alone, called as ``experts(hidden_states, top_k_index,
    top_k_weights)`` (the transformers experts interface) when its block's router is not fused."""

    experts: ExpertsSpec
    training_fallback: str | None = None
    gradient_fallback: str | None = None

    @property
    def num_experts(self) -> int:
        return self.experts.num_experts

    def describe(self) -> str:
        return "experts only: " + self.experts.describe()


RouterSpec = LinearRouter  # deprecated alias (renamed: it is a linear router, weight path + top-k routing)
ExpertsOnlySpec = ExpertsModuleSpec  # deprecated alias (renamed: it swaps an experts module alone)

"""Expert parallelism of a swapped layer: keep this rank's contiguous share of the experts,
release the rest, and run the routed experts through the all-to-all token exchange.

:func:`shard_layer` is applied by ``optimize()`` after the layer was proven equivalent on the full
experts. The layer's expert Parameters are replaced by their local share (stacked 3-D weights:
one new Parameter [L, ...]; per-expert weights: the Parameters of the other experts are removed),
so each rank holds 1 / world of the expert parameters; the router and the shared expert stay
replicated. ``state_dict`` keys are unchanged, the expert tensors are the local share; loading a
full (unsharded) checkpoint takes this rank's share of it. ``restore()`` is not possible afterwards.

Legend: T tokens, H hidden, K top-k, E experts in all, L = E / W experts on this rank, R rows
received.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.distributed as dist
from torch import Tensor, nn

from kernel_moe.errors import KernelMoEError
from kernel_moe.kernels.contract import StackedExperts
from kernel_moe.layers.spec import ExpertsSpec
from kernel_moe.layers.weights import ExpertListWeight, StackedWeight, WeightSource, get_attr_path
from kernel_moe.ops.experts import run_experts
from kernel_moe.parallel.expert_parallel import (
    ExpertShard,
    check_equal_tokens,
    exact_exchange,
    padded_exchange,
)


@dataclass(frozen=True)
class ExpertParallel:
    """How a layer is sharded: this rank's share, the group, the dispatch mode ("exact" or
    "padded") and its capacity factor, and the spec of the local experts (L of them)."""

    shard: ExpertShard
    group: dist.ProcessGroup
    mode: str
    capacity_factor: float
    experts: ExpertsSpec

    def describe(self) -> str:
        s = self.shard
        mode = self.mode if self.mode == "exact" else f"padded x{self.capacity_factor:g}"
        return (f"expert parallel ({mode}): experts {s.first}-{s.first + s.local - 1} of {s.num_experts} on rank "
                f"{s.rank} of {s.world}")


def _owner(layer: nn.Module, path: str) -> tuple[nn.Module, str]:
    owner_path, _, name = path.rpartition(".")
    return (get_attr_path(layer, owner_path) if owner_path else layer), name


def _shard_source(layer: nn.Module, source: WeightSource, shard: ExpertShard) -> WeightSource:
    """Keep experts [first, first + L) of ``source`` on ``layer``; the source naming them."""
    held = slice(shard.first, shard.first + shard.local)
    if isinstance(source, StackedWeight):
        owner, name = _owner(layer, source.path)
        full = getattr(owner, name)  # [E, ...]
        local = full.detach()[held].clone()
        if name in owner._parameters:
            setattr(owner, name, nn.Parameter(local, requires_grad=full.requires_grad))
        else:
            owner._buffers[name] = local
        return source
    for expert in source.parts[: shard.first] + source.parts[shard.first + shard.local:]:
        for path in expert:
            owner, name = _owner(layer, path)
            delattr(owner, name)
    return ExpertListWeight(parts=source.parts[held], key=source.key)


def shard_layer(layer: nn.Module, group: dist.ProcessGroup, mode: str, capacity_factor: float) -> str:
    """Shard ``layer``'s experts over ``group`` in place; returns the report's note. Raises
    ValueError when the experts do not split evenly, KernelMoEError when the layer must keep
    running its original module (which needs all the experts)."""
    spec = layer.spec
    if spec.training_fallback or spec.gradient_fallback:
        raise KernelMoEError("its original module must keep running in training or under autograd "
                             f"({spec.training_fallback or spec.gradient_fallback}) and needs all the experts")
    ex = spec.experts
    if getattr(spec, "scale_inputs", False):
        raise KernelMoEError("its routing weights scale the experts' inputs, which the exchange (weights applied "
                             "on the way back) does not do")
    if getattr(spec, "num_experts", ex.num_experts) != ex.num_experts:
        raise KernelMoEError(f"its router chooses among {spec.num_experts} ids of which {ex.num_experts} are experts "
                             "with weights (weightless experts are not exchanged)")
    shard = ExpertShard(dist.get_rank(group), dist.get_world_size(group), ex.num_experts)
    sources = {name: getattr(ex, name) for name in ("up", "down", "up_bias", "down_bias")}
    local = {name: _shard_source(layer, s, shard) if s is not None else None for name, s in sources.items()}
    layer._stacked_weights.clear()
    layer.expert_parallel = ExpertParallel(shard, group, mode, capacity_factor,
                                           replace(ex, num_experts=shard.local, **local))
    layer._bind_weights()
    device = layer.expert_parallel.experts.down.get(layer).device
    layer.register_buffer("expert_parallel_map", shard.expert_map(device), persistent=False)  # [E]
    layer.expert_parallel_dropped = None
    layer._register_load_state_dict_pre_hook(_shard_on_load, with_module=True)
    return layer.expert_parallel.describe()


def _shard_on_load(layer: nn.Module, state_dict: dict, prefix: str, *args) -> None:
    """load_state_dict of a full (unsharded) checkpoint: take this rank's share of each expert tensor."""
    ep: ExpertParallel = layer.expert_parallel
    shard, ex = ep.shard, layer.spec.experts
    held = slice(shard.first, shard.first + shard.local)
    for source in (ex.up, ex.down, ex.up_bias, ex.down_bias):
        if isinstance(source, StackedWeight):
            key = prefix + source.path
            if key in state_dict and state_dict[key].shape[0] == shard.num_experts != shard.local:
                state_dict[key] = state_dict[key][held]
        elif isinstance(source, ExpertListWeight):
            for expert in source.parts[: shard.first] + source.parts[shard.first + shard.local:]:
                for path in expert:
                    state_dict.pop(prefix + path, None)


def local_experts(layer: nn.Module, ep: ExpertParallel) -> StackedExperts:
    """The op's value type for this rank's experts, with the map from global expert ids."""
    ex = ep.experts
    return StackedExperts(
        ex.up.get(layer), ex.down.get(layer),
        ex.up_bias.get(layer) if ex.up_bias is not None else None,
        ex.down_bias.get(layer) if ex.down_bias is not None else None,
        ex.activation, expert_map=layer.expert_parallel_map,
        post_norm=ex.post_norm.scale(layer) if ex.post_norm is not None else None,
        post_norm_eps=ex.post_norm.eps if ex.post_norm is not None else 1e-6,
    )


def parallel_experts(layer: nn.Module, x_TH: Tensor, weights_TK: Tensor, ids_TK: Tensor) -> Tensor:
    """The routed experts of ``layer`` over its group: [T, H] -> [T, H]. Each rank's slots travel to
    the ranks holding their experts, run there with the fused op, and come back to be weighted."""
    ep: ExpertParallel = layer.expert_parallel
    experts = local_experts(layer, ep)

    def experts_fn(rows_RH: Tensor, ids_R1: Tensor) -> Tensor:
        ones_R1 = rows_RH.new_ones(ids_R1.shape)
        return run_experts(rows_RH, ones_R1, ids_R1, experts, layer.backend, layer.deterministic)

    if ep.mode == "exact":
        return exact_exchange(x_TH, weights_TK, ids_TK, experts_fn, ep.shard, ep.group)
    if not torch.compiler.is_compiling():
        check_equal_tokens(x_TH.shape[0], ep.shard, ep.group, x_TH.device)
    out_TH, layer.expert_parallel_dropped = padded_exchange(x_TH, weights_TK, ids_TK, experts_fn, ep.shard, ep.group,
                                                            ep.capacity_factor)
    return out_TH


__all__ = ["ExpertParallel", "local_experts", "parallel_experts", "shard_layer"]

"""Adapters for transformers (v5) MoE blocks and their stacked experts modules.

The recognition lives in three modules, one concern each: :mod:`~kernel_moe.adapters.hf_experts`
(the experts' weight layout and activation), :mod:`~kernel_moe.adapters.hf_blocks` (the parts of
a block) and :mod:`~kernel_moe.adapters.hf_routing` (how the router routes). The adapters here
combine them into candidate specs; the manager proves the candidates on the whole module.

Legend: T tokens, H hidden, E experts, K top-k.
"""

from __future__ import annotations

import dataclasses
import inspect
import itertools

import torch
from torch import nn

from kernel_moe.adapters.base import Skip
from kernel_moe.adapters.handwritten_parts import declared_capacity
from kernel_moe.adapters.hf_blocks import BlockParts, RouterPlace, block_parts
from kernel_moe.adapters.hf_experts import (
    declared_hidden,
    experts_specs,
    is_stacked_experts,
    list_experts_specs,
    packed_experts_specs,
    split_experts_specs,
)
from kernel_moe.adapters.probe import eval_mode, probe_input
from kernel_moe.adapters.hf_routing import (
    ObservedRouting,
    RouterReading,
    find_top_k,
    hint_objects,
    observe_router,
    prune_by_router,
    router_readings,
)
from kernel_moe.config import KernelConfig
from kernel_moe.adapters.structure import int_attr
from kernel_moe.layers.spec import BlockCapacity, ExpertsModuleSpec, ExpertsSpec, LinearRouter, MoESpec, TokenIds


def _block_experts(module: nn.Module, parts: BlockParts) -> list[ExpertsSpec] | Skip:
    """Candidate ExpertsSpecs of the block's experts (stacked module or split weights)."""
    if parts.split is not None:
        return split_experts_specs(module, parts.split, parts.hidden)
    if parts.layout == "packed":
        return packed_experts_specs(module, parts.experts, parts.num_experts, parts.hidden)
    if parts.layout == "list":
        return list_experts_specs(module, parts.experts[0], parts.hidden)
    name = parts.experts[0]
    return experts_specs(module.get_submodule(name), name, parts.hidden, parts.routed_ids)


def _weights_placements(module: nn.Module, parts: BlockParts) -> list[bool]:
    """Where the block may apply the routing weights (``MoESpec.scale_inputs``): to the experts'
    outputs when its experts module takes them (``forward(hidden, top_k_index, top_k_weights)``);
    when it takes the hidden states alone, the block scales their inputs or their outputs itself."""
    if parts.layout != "stacked" or _takes_routing(module.get_submodule(parts.experts[0])):
        return [False]
    return [True, False]


def _block_specs(parts: BlockParts, ex_specs: list[ExpertsSpec], readings: list[RouterReading],
                 like: torch.Tensor, jitter: float, placements: list[bool]) -> list[MoESpec]:
    """Every combination of output bias, experts reading, router reading and routing-weight
    placement, most likely first. In low precision the router may compute in fp32 or in the
    block's dtype, and score in fp32 or (as some routers do) in the logits' dtype: each is a
    candidate."""
    low_precision = like.dtype not in (torch.float32, torch.float64)
    precisions = [(False, "float32"), (False, "input"), (True, "float32")] if low_precision else [(False, "float32")]
    specs = []
    weightless = ["identity", "zero"] if parts.routed_ids and not parts.shared_weighted else ["zero"]
    undone: list[MoESpec] = []
    for out_bias, experts, reading, scale_inputs, extra, (fp32, score_dtype) in itertools.product(
            [*parts.output_biases, None], ex_specs, readings, placements, weightless, precisions):
        router = LinearRouter(weight=parts.router.path + ".weight", bias=reading.logits_bias,
                              routing=dataclasses.replace(reading.routing, score_dtype=score_dtype),
                              selection_bias=reading.selection_bias, fp32_logits=fp32, flat=parts.router.flat,
                              logit_scale=reading.logit_scale, weight_scale=reading.weight_scale)
        spec = MoESpec(router=router, experts=experts, shared_expert=parts.shared, shared_gate=parts.shared_gate,
                       output_bias=out_bias, input_jitter=jitter, scale_inputs=scale_inputs, weightless=extra,
                       shared_weighted=parts.shared_weighted)
        specs.append(spec)
        if reading.routing.scaling != 1.0:  # a block that undoes its router's scaling on the routed output
            undone.append(dataclasses.replace(spec, routed_scale=1.0 / reading.routing.scaling))
        if parts.shared is not None:  # the shared MLP averaged with the k routed experts (OLMo-core)
            k = reading.routing.top_k
            undone.append(dataclasses.replace(spec, routed_scale=k / (k + 1), shared_scale=1.0 / (k + 1)))
    return specs + undone


class TransformersMoEAdapter:
    """Adapter for transformers MoE blocks with 3-D stacked expert weights."""

    name = "transformers"

    def candidates(self, module: nn.Module, config: KernelConfig) -> list[MoESpec] | Skip | None:
        if not config.swap_moe:
            return None
        parts = block_parts(module)
        if parts is None or isinstance(parts, Skip):
            return parts
        quantized = quantized_storage(module)
        if quantized is not None:
            return quantized
        chains = expert_chains(module, parts) if parts.extra else ((), (), parts.hidden)
        if chains is None:
            return Skip(f"block also computes {', '.join(parts.extra)} (besides router, experts and shared expert), "
                        "which the fused layer does not")
        if parts.layout == "packed":
            capacity = declared_capacity(module.get_submodule(parts.experts_children[0]))
            if capacity is not None:
                return Skip(f"experts drop the tokens beyond a capacity ({capacity}) that grows with the call's "
                            "token count, which the fused layer does not reproduce")
        ex_specs = _block_experts(module, dataclasses.replace(parts, hidden=chains[2]))
        if isinstance(ex_specs, Skip):
            return ex_specs
        like = ex_specs[0].down.get(module)
        on_meta = like.device.type == "meta"  # nothing can run: candidates from the attributes alone
        unfollowed = None if on_meta or parts.layout != "list" else experts_not_following(module, parts, like)
        if unfollowed is not None:
            return unfollowed
        k = find_top_k(module, parts, like, observe=not on_meta)
        if k is None:
            return Skip("top-k not found on the router, block or config, nor in the router's outputs")
        readings = router_readings(module, parts, k)
        if not on_meta:
            readings, _ = prune_by_router(module, parts, readings, like)
        if not readings:
            router = module.get_submodule(parts.router.owner)
            return Skip(f"router {type(router).__name__} computes a routing none of the supported variants reproduce "
                        "(softmax/sigmoid scores, top-k before or after scoring, group-limited top-k, selection bias, "
                        "renormalisation, scaling)")
        jitter = getattr(module, "jitter_noise", 0.0)
        jitter = float(jitter) if isinstance(jitter, (int, float)) else 0.0
        specs = _block_specs(parts, ex_specs, readings, like, jitter, _weights_placements(module, parts))
        if parts.extra:
            specs = [dataclasses.replace(s, block_hidden=parts.hidden, **where) for where in _chain_placements(
                chains, parts) for s in specs]
        specs = _with_token_ids(module, parts, k, specs)
        return specs if isinstance(specs, Skip) else _with_capacity(module, parts, k, specs)


def experts_not_following(module: nn.Module, parts: BlockParts, like: torch.Tensor) -> Skip | None:
    """Why a block's container of expert modules does not run the experts its router chooses (an
    expert given more rows than slots chose it on a probe), or None. Found by running the router
    and the block on the same tokens and counting each expert module's rows."""
    x_TH = probe_input((PROBE_TOKENS, parts.hidden), like, seed=13)
    seen = observe_router(module, parts, x_TH)
    if not seen:
        return None
    chosen_E = torch.bincount(seen[0].ids_TK.reshape(-1).long().clamp(min=0), minlength=parts.num_ids)
    container = module.get_submodule(parts.experts[0])
    items = [(n, c) for n, c in container.named_children() if any(True for _ in c.parameters())]
    rows = dict.fromkeys(range(len(items)), 0)
    hooks = [c.register_forward_hook(lambda m, args, out, e=e: rows.__setitem__(e, rows[e] + args[0].shape[0]))
             for e, (_, c) in enumerate(items)]
    try:
        with torch.no_grad(), eval_mode(module), torch.random.fork_rng(devices=[]):
            module(x_TH.unsqueeze(0))
    except Exception:
        return None
    finally:
        for hook in hooks:
            hook.remove()
    extra = [(items[e][0], n, int(chosen_E[e])) for e, n in rows.items() if e < len(chosen_E) and n > chosen_E[e]]
    if not extra:
        return None
    name, n, _ = extra[0]
    return Skip(f"its experts container {parts.experts[0]} does not run the experts its router chooses: on a probe "
                f"of {PROBE_TOKENS} tokens {name} ran on {n} rows, more than the router gave it (the container picks "
                "experts by the values of the router's mask, not by their index)")


def _width_after(child: nn.Module, width: int) -> int | None:
    """The feature width after ``child`` on inputs of ``width`` features: a Linear reading ``width``,
    or a module whose parameters are all [width] vectors (a norm); None for anything else."""
    if isinstance(child, nn.Linear):
        return child.out_features if child.in_features == width else None
    params = list(child.parameters())
    return width if params and all(p.dim() == 1 and p.numel() == width for p in params) else None


def expert_chains(module: nn.Module, parts: BlockParts) -> tuple[tuple[str, ...], tuple[str, ...], int] | None:
    """(modules before the experts, modules after them, the experts' width) of a block whose extra
    children are Linear layers and norms around its experts: those registered before the experts
    child take the tokens from H to the experts' width, those after take the experts' output back
    to H (MuseSpark: a projection and a norm before, a projection after). The order is a reading of
    the registration order, proven like every candidate; None when the extras do not chain so."""
    if parts.layout != "stacked":
        return None
    names = [n for n, _ in module.named_children()]
    at = names.index(parts.experts[0])
    before = tuple(n for n in names[:at] if n in parts.extra)
    after = tuple(n for n in names[at + 1:] if n in parts.extra)
    width: int | None = parts.hidden
    for name in before:
        width = _width_after(module.get_submodule(name), width) if width is not None else None
    inner = width
    for name in after:
        width = _width_after(module.get_submodule(name), width) if width is not None else None
    if inner is None or width != parts.hidden:
        return None
    return before, after, inner


def _chain_placements(chains: tuple[tuple[str, ...], tuple[str, ...], int], parts: BlockParts) -> list[dict]:
    """Where the modules after the experts may apply, most likely first: to the routed experts'
    output (``MoESpec.expert_output``), or, when they keep the width H and nothing comes before the
    experts, to the block's whole output after the shared expert (``block_output``: A.X-K1's norm
    of the block output); the probe decides."""
    before, after, inner = chains
    routed = dict(expert_input=before, expert_output=after)
    if before or inner != parts.hidden:
        return [routed]
    whole = dict(block_output=after)
    return [whole, routed] if parts.shared is not None else [routed, whole]


PROBE_TOKENS = 16
MAX_CAPACITY_PROBE = 4096
"""The most tokens per sequence a probe may take to overflow a block's own expert capacity."""


def _with_capacity(module: nn.Module, parts: BlockParts, k: int, specs: list[MoESpec]) -> list[MoESpec] | Skip:
    """The specs of a block whose router declares an ``expert_capacity``: each with that capacity
    per sequence, then per call (position order; the probe, two sequences long enough to overflow
    it, decides). A capacity too large for a probe to overflow is a Skip: which tokens it drops
    could not be shown."""
    slots = int_attr(hint_objects(module, parts), ("expert_capacity",), 0)
    if slots is None:
        return specs
    need = BlockCapacity(slots).probe_tokens(parts.num_ids, k)
    if need > MAX_CAPACITY_PROBE:
        return Skip(f"its router drops tokens beyond an expert capacity ({slots}); a probe showing which needs "
                    f"{need} tokens per sequence, more than {MAX_CAPACITY_PROBE}")
    return [dataclasses.replace(s, capacity=BlockCapacity(slots, per_sequence)) for per_sequence in (True, False)
            for s in specs]


def _with_token_ids(module: nn.Module, parts: BlockParts, k: int, specs: list[MoESpec]) -> list[MoESpec] | Skip:
    """The specs of a block whose forward also takes token ids (an optional parameter named like
    ``*ids``): when the router holds an int [V, k] table, it routes by ``table[ids]`` (hash
    routing: the table's experts, weighed by each reading's scores) and the probe draws ids in
    [0, V); otherwise the ids are passed through and the proof shows they change nothing. Keyword-only
    parameters with defaults (a loss scale) are proven at their defaults: a call that gives one runs
    the original block (``MoESpec.passthrough``). A block taking any other argument besides its
    hidden states is a Skip: the fused layer takes none."""
    try:
        params = [p for p in list(inspect.signature(module.forward).parameters.values())[1:]
                  if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    except (TypeError, ValueError):
        params = []
    optional = tuple(p.name for p in params if p.kind == p.KEYWORD_ONLY and p.default is not inspect.Parameter.empty)
    params = [p for p in params if p.name not in optional]
    specs = [dataclasses.replace(s, passthrough=optional) for s in specs] if optional else specs
    if not params:
        return specs
    if len(params) > 1 or not params[0].name.endswith("ids") or params[0].default is inspect.Parameter.empty:
        return Skip(f"forward takes {', '.join(p.name for p in params)} besides the hidden states, which the fused "
                    "layer does not take")
    owner = module.get_submodule(parts.router.owner)
    tables = [(n, t) for n, t in owner.named_buffers() if not t.is_floating_point() and t.dtype != torch.bool
              and t.dim() == 2 and t.shape[1] == k]
    if not tables:
        return [dataclasses.replace(s, token_ids=TokenIds(params[0].name)) for s in specs]
    name, table = tables[0]
    path = f"{parts.router.owner}.{name}"
    by_table = []
    for s in specs:  # the table chooses: selection biases, groups and top-k order do not apply
        r = s.router.routing
        if s.router.selection_bias is None and r.num_groups == 1 and r.order == "score_then_topk":
            by_table.append(dataclasses.replace(s, router=dataclasses.replace(s.router, id_table=path),
                                                token_ids=TokenIds(params[0].name, int(table.shape[0]))))
    return list(dict.fromkeys(by_table))


def quantized_storage(module: nn.Module) -> Skip | None:
    """Why a module holding weights that transformers loaded quantized (fp8 with block scales,
    MXFP4 blocks, int8: weight matrices of one byte per element, or packed ``qweight``s) is not swapped,
    or None. Their computation is not weight-only dequantization on our grid: the fine-grained
    FP8 experts quantize the activations too, and MXFP4's e2m1 values are not a uniform 4-bit grid;
    loading the model without its quantization config (or dequantized) makes it swappable."""
    for name, t in [*module.named_parameters(), *module.named_buffers()]:
        one_byte = t.dtype in (torch.uint8, torch.int8) or (t.is_floating_point() and t.element_size() == 1)
        if t.dim() >= 2 and (one_byte or "qweight" in name):  # id tables (int64) are not weights
            return Skip(f"{name} is stored as {t.dtype} ({type(module).__name__}: weights quantized by transformers); "
                        "its computation (fp8 activation quantization with block scales, or MXFP4 e2m1 blocks) is not "
                        "the weight-only formats of quantize_experts; load the model unquantized (or dequantized) "
                        "to swap it")
    return None


def _takes_routing(module: nn.Module) -> bool:
    """Whether ``module.forward`` takes (hidden_states, top_k_index, top_k_weights)."""
    try:
        params = list(inspect.signature(module.forward).parameters.values())
    except (TypeError, ValueError):
        return True
    if any(p.kind == p.VAR_POSITIONAL for p in params):
        return True
    return len([p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]) >= 3


class TransformersExpertsAdapter:
    """Adapter for a stacked experts module on its own (``forward(hidden, top_k_index,
    top_k_weights)``), used when its block was not swapped whole."""

    name = "transformers-experts"

    def candidates(self, module: nn.Module, config: KernelConfig) -> list[ExpertsModuleSpec] | Skip | None:
        if not config.swap_moe or not is_stacked_experts(module):
            return None
        quantized = quantized_storage(module)
        if quantized is not None:
            return quantized
        if not _takes_routing(module):
            sig = ", ".join(inspect.signature(module.forward).parameters)
            return Skip(f"experts forward({sig}) does not take (hidden_states, top_k_index, top_k_weights): "
                        "the routing weights are applied elsewhere")
        specs = experts_specs(module, "", declared_hidden(module))
        if isinstance(specs, Skip):
            return specs
        return [ExpertsModuleSpec(experts=s) for s in specs]


RoutingCandidate = RouterReading  # deprecated alias: one reading of a block's router
RouterObservation = ObservedRouting  # deprecated alias: what the router returned on a probe
routing_candidates = router_readings  # deprecated alias

__all__ = [
    "BlockParts",
    "ObservedRouting",
    "RouterPlace",
    "RouterReading",
    "TransformersExpertsAdapter",
    "TransformersMoEAdapter",
    "block_parts",
    "declared_hidden",
    "experts_specs",
    "is_stacked_experts",
    "observe_router",
    "prune_by_router",
    "router_readings",
    "split_experts_specs",
]

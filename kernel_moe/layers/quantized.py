"""Quantized experts of a swapped layer: weight-only int8 / fp8 / int4, applied by ``optimize()``
when ``KernelConfig.quantize_experts`` asks for it.

The layer gets a child ``quantized_experts`` holding four buffers, its ``state_dict`` keys:

- ``<layer>.quantized_experts.up_weight`` / ``up_scale``: up-projection [E, N, H] (int4:
  [E, N, H / 2]) and its scales ([E, N] per row, or [E, N, H / group]);
- ``<layer>.quantized_experts.down_weight`` / ``down_scale``: down-projection [E, H, I] likewise.

With hot experts (``KernelConfig.quantize_hot_experts``: the experts that calibration batches
routed to most stay in full precision) the four buffers hold the cold experts only, and
``hot_up_weight`` [n, N, H] / ``hot_down_weight`` [n, H, I] (the model's dtype), ``hot_ids`` /
``cold_ids`` (the expert ids of each set) and ``hot_map`` / ``cold_map`` [E] (each expert's row
in its set, -1 in the other) are added. The layer then makes two calls of the experts op, one per
set, each with its expert map (an expert the map does not hold is a dropped slot of that call),
and adds them: every slot is computed exactly once.

The full-precision expert weights are released (their Parameters removed from their modules), so
memory really drops; biases, router and shared expert stay as they were. Saving and loading a
quantized model round-trips; loading a full-precision checkpoint into it quantizes the expert
weights on load. ``restore()`` needs the original weights: with ``quantize_keep_original=True``
they are kept (no memory saved) and ``restore()`` is exact, otherwise it raises.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from kernel_moe.config import INT4_GROUP_SIZES
from kernel_moe.errors import KernelMoEError
from kernel_moe.kernels.contract import StackedExperts
from kernel_moe.kernels.quantization import QuantizedTensor, check_format, quantize
from kernel_moe.layers.spec import ExpertsSpec
from kernel_moe.layers.weights import get_attr_path


class HotExperts(NamedTuple):
    """Experts kept in full precision: their ids [n] and their weights [n, N, H] / [n, H, I]."""

    ids: torch.Tensor
    up: torch.Tensor
    down: torch.Tensor


class QuantizedExperts(nn.Module):
    """The quantized up and down projections of E experts, or of the cold ones beside the hot
    experts' full-precision weights (buffers, see the module docstring)."""

    def __init__(self, up: QuantizedTensor, down: QuantizedTensor, hot: HotExperts | None = None,
                 num_experts: int | None = None) -> None:
        super().__init__()
        self.format = up.format
        self.register_buffer("up_weight", up.data)
        self.register_buffer("up_scale", up.scale)
        self.register_buffer("down_weight", down.data)
        self.register_buffer("down_scale", down.scale)
        self.has_hot = hot is not None
        if hot is not None:
            E = num_experts
            cold = torch.tensor([e for e in range(E) if e not in set(hot.ids.tolist())], dtype=torch.int64)
            self.register_buffer("hot_up_weight", hot.up)
            self.register_buffer("hot_down_weight", hot.down)
            self.register_buffer("hot_ids", hot.ids.to(torch.int64))
            self.register_buffer("cold_ids", cold)
            self.register_buffer("hot_map", _expert_map(hot.ids, E))
            self.register_buffer("cold_map", _expert_map(cold, E))

    def nbytes(self) -> int:
        """Bytes of the expert weights and scales (the id maps are not counted)."""
        held = [b for name, b in self.named_buffers() if name.endswith(("weight", "scale"))]
        return sum(b.numel() * b.element_size() for b in held)

    def _apply(self, fn, recurse: bool = True):
        """``.to()`` / ``.cuda()`` move the buffers to the device asked for but keep the dtypes the
        format decides (``.half()`` or ``.to(torch.bfloat16)`` of the model would otherwise cast fp8
        weights and fp32 scales, losing precision); the hot experts' weights follow the model."""
        for name, buf in self._buffers.items():
            if buf is None:
                continue
            moved = fn(buf)
            self._buffers[name] = moved if name.startswith("hot_") and buf.is_floating_point() else buf.to(moved.device)
        return self

    def group_size(self) -> int | None:
        """Input features per scale (None: one scale per row)."""
        if self.up_scale.dim() == 2:
            return None
        return self.up_weight.shape[-1] * (2 if self.format == "int4" else 1) // self.up_scale.shape[-1]

    def extra_repr(self) -> str:
        group = self.group_size()
        text = f"{self.format}, " + ("row scales" if group is None else f"groups of {group}")
        if self.has_hot:
            text += f", experts {self.hot_ids.tolist()} kept in full precision"
        return text


def _expert_map(ids: torch.Tensor, num_experts: int) -> torch.Tensor:
    """[E] int32: the row of each expert id in ``ids``, -1 for the ids it does not hold."""
    out = torch.full((num_experts,), -1, dtype=torch.int32)
    out[ids.long()] = torch.arange(ids.numel(), dtype=torch.int32)
    return out


def stacked_quantized(layer: nn.Module, ex: ExpertsSpec, scale_inputs: bool = False) -> list[StackedExperts]:
    """The op's value types for a layer whose experts are quantized (biases stay full
    precision): one call, or two with hot experts (the hot set in full precision, the cold set
    quantized, each with its expert map; their outputs add up)."""
    q: QuantizedExperts = layer.quantized_experts
    b_up = ex.up_bias.get(layer) if ex.up_bias is not None else None
    b_down = ex.down_bias.get(layer) if ex.down_bias is not None else None
    if not q.has_hot:
        return [StackedExperts(q.up_weight, q.down_weight, b_up, b_down, ex.activation, q.format,
                               scale_inputs=scale_inputs, w_up_scale=q.up_scale, w_down_scale=q.down_scale)]

    def rows(bias: torch.Tensor | None, ids: torch.Tensor) -> torch.Tensor | None:
        return None if bias is None else bias[ids]

    return [
        StackedExperts(q.hot_up_weight, q.hot_down_weight, rows(b_up, q.hot_ids), rows(b_down, q.hot_ids),
                       ex.activation, expert_map=q.hot_map, scale_inputs=scale_inputs),
        StackedExperts(q.up_weight, q.down_weight, rows(b_up, q.cold_ids), rows(b_down, q.cold_ids), ex.activation,
                       q.format, expert_map=q.cold_map, scale_inputs=scale_inputs, w_up_scale=q.up_scale,
                       w_down_scale=q.down_scale),
    ]


def _full_bytes(ex: ExpertsSpec, layer: nn.Module) -> int:
    return sum(w.numel() * w.element_size() for w in (ex.up.get(layer), ex.down.get(layer)))


def check_quantizable(layer: nn.Module, fmt: str, group_size: int | None, keep_original: bool) -> int | None:
    """The group size quantization of this layer's experts will use (int4's default 128); raises
    KernelMoEError when it cannot apply: the layer must keep running its original module
    (stochastic training, custom backward) whose weights would be released, or the groups do not
    divide its dimensions."""
    group_size = 128 if fmt == "int4" and group_size is None else group_size
    check_format(fmt, group_size)
    spec = layer.spec
    if not keep_original and (spec.training_fallback or spec.gradient_fallback):
        raise KernelMoEError("its original module must keep running in training or under autograd "
                             f"({spec.training_fallback or spec.gradient_fallback}), and quantization would release "
                             "its weights; pass quantize_keep_original=True to keep them")
    ex = spec.experts
    if group_size is not None and (ex.hidden % group_size or ex.intermediate % group_size):
        fitting = [str(g) for g in INT4_GROUP_SIZES if not ex.hidden % g and not ex.intermediate % g]
        raise KernelMoEError(f"groups of {group_size} input features do not divide H={ex.hidden} and "
                             f"I={ex.intermediate}; allowed group sizes here: {', '.join(fitting) or 'none'}")
    return group_size


def quantize_layer(layer: nn.Module, fmt: str, group_size: int | None, keep_original: bool,
                   hot_ids: torch.Tensor | None = None) -> str:
    """Quantize the experts of a swapped layer in place (all of them, or all but ``hot_ids``, which
    stay in full precision); returns the report's note. Raises KernelMoEError as
    :func:`check_quantizable` does."""
    group_size = check_quantizable(layer, fmt, group_size, keep_original)
    ex = layer.spec.experts
    before = _full_bytes(ex, layer)
    with torch.no_grad():
        w_up, w_down = ex.up.get(layer)[: ex.num_experts], ex.down.get(layer)  # without rows of weightless experts
        hot = None
        if hot_ids is not None:
            hot_ids = hot_ids.to(device=w_up.device, dtype=torch.int64).sort().values
            cold = torch.ones(w_up.shape[0], dtype=torch.bool, device=w_up.device)
            cold[hot_ids] = False
            hot = HotExperts(hot_ids.cpu(), w_up[hot_ids].clone(), w_down[hot_ids].clone())
            w_up, w_down = w_up[cold], w_down[cold]
        up = quantize(w_up, fmt, group_size)
        down = quantize(w_down, fmt, group_size)
    layer.quantized_experts = QuantizedExperts(up, down, hot, ex.num_experts).to(up.data.device)
    layer.original_released = not keep_original
    if not keep_original:
        release_sources(layer, [ex.up, ex.down])
    layer._register_load_state_dict_pre_hook(_quantize_on_load, with_module=True)
    after = layer.quantized_experts.nbytes()
    return (f"experts {layer.quantized_experts.extra_repr()}: {before / 2**20:.2f} MiB -> {after / 2**20:.2f} MiB "
            f"({after / before:.2f}x)")


def release_sources(layer: nn.Module, sources: list) -> None:
    """Remove the weights of ``sources`` (Parameters and stacked storage) from the layer: the
    layer stops binding them, and their memory is freed."""
    layer.released_sources = (*layer.released_sources, *sources)
    for source in sources:
        for path in source.paths():
            owner_path, _, name = path.rpartition(".")
            owner = get_attr_path(layer, owner_path) if owner_path else layer
            delattr(owner, name)
        layer._stacked_weights.pop(getattr(source, "key", None), None)


def _quantize_on_load(module: nn.Module, state_dict: dict, prefix: str, *args) -> None:
    """load_state_dict of a full-precision checkpoint into a quantized layer: the released expert
    weights found in ``state_dict`` are quantized into its buffers' entries (and removed)."""
    q: QuantizedExperts = module.quantized_experts
    ex = module.spec.experts
    for source, name in ((ex.up, "up"), (ex.down, "down")):
        keys = [prefix + p for p in source.paths()]
        if not all(k in state_dict for k in keys) or not module.original_released:
            continue
        full = source.assemble(lambda p: state_dict.pop(prefix + p))[: ex.num_experts]
        if q.has_hot:
            hot_ids = state_dict.get(f"{prefix}quantized_experts.hot_ids", q.hot_ids).to(full.device)
            cold_ids = state_dict.get(f"{prefix}quantized_experts.cold_ids", q.cold_ids).to(full.device)
            state_dict[f"{prefix}quantized_experts.hot_{name}_weight"] = full[hot_ids].to(q.hot_up_weight.dtype)
            full = full[cold_ids]
        with torch.no_grad():
            packed = quantize(full, q.format, q.group_size())
        state_dict[f"{prefix}quantized_experts.{name}_weight"] = packed.data
        state_dict[f"{prefix}quantized_experts.{name}_scale"] = packed.scale


__all__ = ["HotExperts", "QuantizedExperts", "check_quantizable", "quantize_layer", "release_sources", "stacked_quantized"]

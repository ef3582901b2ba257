"""Quantized experts of a swapped layer: weight-only int8 / fp8 / int4, applied by ``optimize()``
when ``KernelConfig.quantize_experts`` asks for it.

The layer gets a child ``quantized_experts`` holding four buffers, its ``state_dict`` keys:

- ``<layer>.quantized_experts.up_weight`` / ``up_scale``: up-projection [E, N, H] (int4:
  [E, N, H / 2]) and its scales ([E, N] per row, or [E, N, H / group]);
- ``<layer>.quantized_experts.down_weight`` / ``down_scale``: down-projection [E, H, I] likewise.

The full-precision expert weights are released (their Parameters removed from their modules), so
memory really drops; biases, router and shared expert stay as they were. Saving and loading a
quantized model round-trips; loading a full-precision checkpoint into it quantizes the expert
weights on load. ``restore()`` needs the original weights: with ``quantize_keep_original=True``
they are kept (no memory saved) and ``restore()`` is exact, otherwise it raises.
"""

from __future__ import annotations

import torch
from torch import nn

from kernel_moe.errors import KernelMoEError
from kernel_moe.kernels.contract import StackedExperts
from kernel_moe.kernels.quantization import QuantizedTensor, check_format, quantize
from kernel_moe.layers.spec import ExpertsSpec
from kernel_moe.layers.weights import get_attr_path


class QuantizedExperts(nn.Module):
    """The quantized up and down projections of E experts (buffers, see the module docstring)."""

    def __init__(self, up: QuantizedTensor, down: QuantizedTensor) -> None:
        super().__init__()
        self.format = up.format
        self.register_buffer("up_weight", up.data)
        self.register_buffer("up_scale", up.scale)
        self.register_buffer("down_weight", down.data)
        self.register_buffer("down_scale", down.scale)

    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers())

    def _apply(self, fn, recurse: bool = True):
        """``.to()`` / ``.cuda()`` move the buffers to the device asked for but keep their dtypes:
        the format decides them (``.half()`` or ``.to(torch.bfloat16)`` of the model would
        otherwise cast fp8 weights and fp32 scales, losing precision)."""
        for name, buf in self._buffers.items():
            if buf is not None:
                self._buffers[name] = buf.to(fn(buf.new_empty(0)).device)
        return self

    def group_size(self) -> int | None:
        """Input features per scale (None: one scale per row)."""
        if self.up_scale.dim() == 2:
            return None
        return self.up_weight.shape[-1] * (2 if self.format == "int4" else 1) // self.up_scale.shape[-1]

    def extra_repr(self) -> str:
        group = self.group_size()
        return f"{self.format}, " + ("row scales" if group is None else f"groups of {group}")


def stacked_quantized(layer: nn.Module, ex: ExpertsSpec, scale_inputs: bool = False) -> StackedExperts:
    """The op's value type for a layer whose experts are quantized (biases stay full precision);
    ``scale_inputs`` as in :func:`~kernel_moe.layers.experts.stacked_experts`."""
    q: QuantizedExperts = layer.quantized_experts
    return StackedExperts(
        q.up_weight, q.down_weight,
        ex.up_bias.get(layer) if ex.up_bias is not None else None,
        ex.down_bias.get(layer) if ex.down_bias is not None else None,
        ex.activation, q.format, scale_inputs=scale_inputs, w_up_scale=q.up_scale, w_down_scale=q.down_scale,
    )


def _full_bytes(ex: ExpertsSpec, layer: nn.Module) -> int:
    return sum(w.numel() * w.element_size() for w in (ex.up.get(layer), ex.down.get(layer)))


def quantize_layer(layer: nn.Module, fmt: str, group_size: int | None, keep_original: bool) -> str:
    """Quantize the experts of a swapped layer in place; returns the report's note. Raises
    KernelMoEError when the layer must keep running its original module (stochastic training,
    custom backward) and the original weights would be released."""
    group_size = 128 if fmt == "int4" and group_size is None else group_size
    check_format(fmt, group_size)
    spec = layer.spec
    if not keep_original and (spec.training_fallback or spec.gradient_fallback):
        raise KernelMoEError("its original module must keep running in training or under autograd "
                             f"({spec.training_fallback or spec.gradient_fallback}), and quantization would release "
                             "its weights; pass quantize_keep_original=True to keep them")
    ex = spec.experts
    if group_size is not None and (ex.hidden % group_size or ex.intermediate % group_size):
        raise KernelMoEError(f"groups of {group_size} input features do not divide H={ex.hidden} and "
                             f"I={ex.intermediate}; allowed group sizes here: "
                             + (", ".join(str(g) for g in (32, 64, 128) if not ex.hidden % g and not ex.intermediate % g)
                                or "none"))
    before = _full_bytes(ex, layer)
    with torch.no_grad():
        up = quantize(ex.up.get(layer)[: ex.num_experts], fmt, group_size)  # without rows of weightless experts
        down = quantize(ex.down.get(layer), fmt, group_size)
    layer.quantized_experts = QuantizedExperts(up, down)
    layer.original_released = not keep_original
    if not keep_original:
        _release(layer, ex)
    layer._register_load_state_dict_pre_hook(_quantize_on_load, with_module=True)
    after = layer.quantized_experts.nbytes()
    return (f"experts {layer.quantized_experts.extra_repr()}: {before / 2**20:.2f} MiB -> {after / 2**20:.2f} MiB "
            f"({after / before:.2f}x)")


def _release(layer: nn.Module, ex: ExpertsSpec) -> None:
    """Remove the full-precision expert weights (Parameters and stacked storage) from the layer."""
    for source in (ex.up, ex.down):
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
        with torch.no_grad():
            packed = quantize(full, q.format, q.group_size())
        state_dict[f"{prefix}quantized_experts.{name}_weight"] = packed.data
        state_dict[f"{prefix}quantized_experts.{name}_scale"] = packed.scale


__all__ = ["QuantizedExperts", "quantize_layer", "stacked_quantized"]

"""Attention masks of hand-written attention modules, read the way the proof found the module reads them.

A hand-written MoA / SwitchHead module may take a mask as the argument after ``x``. Its kind is
the mask's dtype class and shape form, both known from metadata alone (no host sync):

- dtype class: ``bool``, ``int`` (integer flags, 1 / 0) or ``float`` (an additive bias);
- shape form: ``keys`` [B, T] (a padding mask over the keys), ``square`` [T, T], ``batched``
  [B, T, T] or ``heads`` [B, 1, T, T] (query x key).

A reading says what the module does with it: ``keep`` (nonzero = may attend), ``block`` (nonzero =
may not attend) or ``add`` (added to the attention scores). The proof (adapters/attention_proof.py)
finds the reading of each kind the module accepts; a swapped layer runs a call fused only when its
mask is of a proven kind, and :func:`attention_bias` turns it into a ``scaled_dot_product_attention``
mask that also holds causality.

Legend: B batch, T sequence.
"""

from __future__ import annotations

import inspect

import torch
from torch import nn

DTYPE_CLASSES = ("bool", "int", "float")
SHAPES = ("keys", "square", "batched", "heads")
READINGS = {"bool": ("keep", "block"), "int": ("keep", "block"), "float": ("add",)}
DESCRIBED = {"keep": "nonzero attends", "block": "nonzero is masked out", "add": "added to the scores"}
SHAPE_TEXT = {"keys": "[B, T]", "square": "[T, T]", "batched": "[B, T, T]", "heads": "[B, 1, T, T]"}


def mask_kind(mask: torch.Tensor, B: int, T: int) -> str | None:
    """'<dtype class> <shape form>' of a mask for a call on x [B, T, D], or None when its shape fits no
    form, or fits two (a 2-D mask when B == T: such calls run the original module)."""
    if mask.dtype == torch.bool:
        dtype = "bool"
    elif mask.is_floating_point():
        dtype = "float"
    elif not mask.is_complex():
        dtype = "int"
    else:
        return None
    if B == T and mask.dim() == 2:
        return None  # [B, T] or [T, T]: the shape cannot tell a key mask from a query x key one
    forms = {(B, T): "keys", (T, T): "square", (B, T, T): "batched", (B, 1, T, T): "heads"}
    shape = forms.get(tuple(mask.shape))
    return None if shape is None else f"{dtype} {shape}"


def describe_masks(masks: tuple[tuple[str, str], ...]) -> str:
    """'masks bool [B, T] (nonzero attends), ...' for the report ('' when none is proven)."""
    if not masks:
        return ""
    parts = []
    for kind, reading in masks:
        dtype, shape = kind.split()
        parts.append(f"{dtype} {SHAPE_TEXT[shape]} ({DESCRIBED[reading]})")
    return "proven masks: " + ", ".join(parts)


def _query_key(mask: torch.Tensor, shape: str) -> torch.Tensor:
    """The mask as [B or 1, 1, T or 1, T] (broadcast over heads, and over queries for a key mask)."""
    if shape == "keys":
        return mask[:, None, None, :]
    if shape == "square":
        return mask[None, None]
    return mask[:, None] if shape == "batched" else mask


def attention_bias(mask: torch.Tensor, kind: str, reading: str, causal: bool, dtype: torch.dtype) -> torch.Tensor:
    """The ``scaled_dot_product_attention`` mask [B or 1, 1, T or 1, T] for ``mask`` of ``kind``
    read as ``reading``, with the causal mask folded in: boolean (True attends) for ``keep`` /
    ``block``, additive in ``dtype`` for ``add``."""
    m = _query_key(mask, kind.split()[1])
    T = mask.shape[-1]
    tril = torch.ones(T, T, dtype=torch.bool, device=mask.device).tril()
    if reading == "add":
        bias = m.to(dtype)
        return torch.where(tril, bias, float("-inf")) if causal else bias
    allowed = m.bool() if reading == "keep" else ~m.bool()
    return allowed & tril if causal else allowed


def mask_parameter(module: nn.Module) -> str | None:
    """The name of the argument after ``x`` of ``module.forward`` (None when it takes none)."""
    try:
        params = list(inspect.signature(module.forward).parameters.values())
    except (TypeError, ValueError):
        return None
    plain = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return plain[1].name if len(plain) >= 2 else None


def call_mask(args: tuple, kwargs: dict, name: str | None) -> tuple[bool, torch.Tensor | None]:
    """(understood, mask) of a call's arguments after x: no argument, or just the mask (by
    position or by its name ``name``), which may be None. Anything else is not understood."""
    if not args and not kwargs:
        return True, None
    if len(args) == 1 and not kwargs:
        mask = args[0]
    elif not args and name is not None and set(kwargs) == {name}:
        mask = kwargs[name]
    else:
        return False, None
    return (mask is None or isinstance(mask, torch.Tensor)), mask


def fused_mask(spec, x: torch.Tensor, args: tuple, kwargs: dict) -> tuple[bool, torch.Tensor | None]:
    """(fused, sdpa mask | None) for a call of a hand-written attention layer with ``spec`` (its
    ``mask_arg``, proven ``masks`` and ``causal``): fused is False when the call must run the original."""
    understood, mask = call_mask(args, kwargs, spec.mask_arg)
    if not understood or x.dim() != 3:
        return False, None
    if mask is None:
        return True, None
    kind = mask_kind(mask, x.shape[0], x.shape[1])
    reading = dict(spec.masks).get(kind)
    if reading is None or mask.device != x.device:
        return False, None
    return True, attention_bias(mask, kind, reading, spec.causal, x.dtype)


__all__ = ["DTYPE_CLASSES", "READINGS", "SHAPES", "SHAPE_TEXT", "attention_bias", "call_mask", "describe_masks",
           "fused_mask", "mask_kind", "mask_parameter"]

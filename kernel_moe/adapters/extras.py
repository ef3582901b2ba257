"""Blocks that return a tuple: the output, then extras computed from the routing.

Each extra output is identified by computation, never by name: the proven layer's routing
(logits, top-k weights and ids) on the probe gives every value a :class:`RoutingExtra` can
take (logits, probabilities, weights, ids, per-expert counts in the original's dtype), and the
first that equals the original's output is it. A scalar is fitted as an auxiliary loss
``balance * LB + z * Z`` (Switch load balancing, router z-loss): the coefficients are read off
as many probes as there are terms and must then hold on the other probes (other tokens, other
token counts). The whole tuple is finally proven on every probe; what cannot be reproduced is
named (index, shape, dtype) in the reason.

Legend: T tokens, E experts, K top-k.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
from torch import nn

from kernel_moe.adapters.base import Skip
from kernel_moe.adapters.probe import first_match, mismatch, outputs_mismatch, returns_kind, run_module
from kernel_moe.layers.spec import MoESpec
from kernel_moe.routing.extras import RoutingExtra, routing_extra

PROBES = 3
"""Probe inputs an extra is identified on: the proof's own and two more (other seeds and sizes)."""

CATALOGUE = (RoutingExtra("logits"), RoutingExtra("weights"), RoutingExtra("ids"))
"""The routing of a call, as extras: what every other extra is computed from."""

LOSS_TERMS = (("balance",), ("top1",), ("z",), ("balance", "z"), ("top1", "z"))
"""The auxiliary-loss models fitted in turn, fewest terms first."""

Routing = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def _tensor_candidates(dtype: torch.dtype) -> list[RoutingExtra]:
    """Every extra that is not a loss, in the original's dtype."""
    kinds = [RoutingExtra(k, dtype) for k in ("logits", "probs", "weights", "ids")]
    return kinds + [RoutingExtra("counts", dtype, per=p) for p in ("none", "slots", "tokens")]


def _shown(value: torch.Tensor, flat: bool) -> torch.Tensor:
    return value.flatten() if flat and value.dim() > 1 else value


def _term(name: str, routing: Routing) -> float:
    """One loss term with coefficient 1 on one call's routing: "balance" (f over all slots), "top1"
    (f over the first choices) or "z"."""
    extra = RoutingExtra("loss", z=1.0) if name == "z" else RoutingExtra("loss", balance=1.0, top1=name == "top1")
    return routing_extra(extra, *routing).double().item()


def _fit_loss(refs: list[torch.Tensor], routings: list[Routing]) -> RoutingExtra | None:
    """The first loss model whose coefficients, read off the first probes (one per term), give
    every probe's value within the fp32 tolerance; None when none does."""
    values = torch.tensor([r.double().item() for r in refs], dtype=torch.float64)
    tolerance = 1e-5 if refs[0].dtype in (torch.float32, torch.float64) else 2e-2
    if not torch.isfinite(values).all() or (values == 0).all():
        return None
    for terms in LOSS_TERMS:
        basis = torch.tensor([[_term(t, r) for t in terms] for r in routings], dtype=torch.float64)
        m = len(terms)
        try:
            coefs = torch.linalg.solve(basis[:m], values[:m])
        except RuntimeError:  # a singular basis on these probes
            continue
        if not torch.isfinite(coefs).all():
            continue
        err = ((basis @ coefs - values).abs() / values.abs().clamp_min(1e-30)).max().item()
        if err <= tolerance:
            named = {t: float(c) for t, c in zip(terms, coefs)}
            balance = named.get("balance", named.get("top1", 0.0))
            return RoutingExtra("loss", refs[0].dtype, balance=balance, top1="top1" in named, z=named.get("z", 0.0))
    return None


def identify_extra(index: int, refs: list[torch.Tensor], routings: list[Routing], flat: bool) -> RoutingExtra | Skip:
    """The extra that the original's output ``index`` is on every probe (``refs``, one per probe,
    with the proven layer's ``routings``); a Skip naming the output when none is."""
    ref = refs[0]
    for extra in _tensor_candidates(ref.dtype):
        if all(mismatch(_shown(routing_extra(extra, *r), flat), v) is None for r, v in zip(routings, refs)):
            return extra
    if ref.dim() == 0 and ref.is_floating_point():
        loss = _fit_loss(refs, routings)
        if loss is not None:
            return loss
    return Skip(f"output {index} (shape {list(ref.shape)}, {str(ref.dtype).replace('torch.', '')}) matches none of "
                "the router logits or probabilities, top-k weights or ids, per-expert counts, or a load-balancing "
                "/ z-loss with constant coefficients on the probes")


def prove_tuple(specs: list[MoESpec], ref: tuple, probes: list[tuple], build: Callable[[MoESpec], nn.Module],
                original: nn.Module) -> tuple[MoESpec, nn.Module] | Skip:
    """The first candidate whose output is ``ref[0]`` with the extras the original returns after
    it, proven on every probe argument tuple (``probes[0]`` gave ``ref``), and its layer built
    on the first; or why there is none."""
    if not all(isinstance(s, MoESpec) for s in specs):
        return Skip("forward returns tuple that the fused layer cannot reproduce (only whole MoE blocks return extras)")
    x = probes[0][0]
    shape = returns_kind(ref[0], x) if ref else None
    if shape is None:
        first = type(ref[0]).__name__ if ref else "nothing"
        return Skip(f"forward returns a tuple whose first item ({first}) is not the block's output")
    for i, item in enumerate(ref[1:], 1):
        if not isinstance(item, torch.Tensor):
            return Skip(f"forward returns a tuple whose output {i} is {type(item).__name__}, not a tensor")
    candidates = [s.returning(shape) for s in specs]
    match = first_match([c for c in candidates if c is not None], build, ref[0], probes[0])
    if match.candidate is None:
        return Skip("not proven equivalent: " + match.reason(400))
    spec = match.candidate
    catalogue = build(dataclasses.replace(spec, returns="tensor", extras=CATALOGUE, output_shape="tokens"))
    routings = [run_module(catalogue, *args)[1:] for args in probes]
    refs = [ref] + [run_module(original, *args) for args in probes[1:]]
    flat = spec.output_shape == "flat"
    extras = []
    for i in range(1, len(ref)):
        if any(not isinstance(r, tuple) or len(r) != len(ref) or not isinstance(r[i], torch.Tensor) for r in refs):
            return Skip(f"forward returns tuples of other lengths or kinds on other probes (output {i})")
        found = identify_extra(i, [r[i] for r in refs], routings, flat)
        if isinstance(found, Skip):
            return found
        extras.append(found)
    final = dataclasses.replace(spec, returns="tensor", extras=tuple(extras))
    layer = build(final)
    for args, expected in zip(probes, refs):
        why = outputs_mismatch(run_module(layer, *args), expected)
        if why is not None:
            return Skip(f"the extras found do not reproduce the tuple on every probe: {why}")
    return final, layer


__all__ = ["CATALOGUE", "PROBES", "identify_extra", "prove_tuple"]

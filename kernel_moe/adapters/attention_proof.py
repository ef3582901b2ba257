"""The proof by computation of a hand-written attention module (MoA or SwitchHead): which of its
candidate specs computes what the module computes, without a mask and with each kind of mask.

1. ``forward(x)``: the original and each candidate run on a seeded probe ``x [2, T, D]`` in eval
   mode; the first that agrees is checked in train mode (a stochastic or different training forward
   sets the training fallback) and for the gradients of x and every parameter (the gradient fallback).
2. ``forward(x, mask)``, when the forward takes an argument after x: every mask kind
   (:mod:`kernel_moe.layers.attention_masks`: bool / int / float, [B, T] / [T, T] / [B, T, T] /
   [B, 1, T, T]) is tried with each reading on a seeded probe mask drawn for that reading (no query
   without a visible key, so no softmax row is empty). A kind the original accepts and a reading
   reproduces in eval mode, train mode and gradients (the mask's too, when it is floating) is
   proven; the layer runs calls with a mask of another kind through the original, and the report
   says why for the kinds the original accepted but no reading reproduced.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from kernel_moe.adapters.base import Skip
from kernel_moe.adapters.hf_attention import outputs_differ
from kernel_moe.adapters.probe import PROBE_SEED, gradients_mismatch, probe_input, train_mode
from kernel_moe.config import KernelConfig
from kernel_moe.layers.attention_masks import DTYPE_CLASSES, READINGS, SHAPE_TEXT, SHAPES, mask_parameter

PROBE_BATCH = 2


def run_call(module: nn.Module, args: tuple, training: bool) -> object:
    """module(*args) without gradients, in train or eval mode, the global RNG forked and seeded."""
    with torch.no_grad(), train_mode(module, training), torch.random.fork_rng(devices=[]):
        torch.manual_seed(PROBE_SEED)
        return module(*args)


def probe_mask(kind: str, reading: str, B: int, T: int, like: torch.Tensor) -> torch.Tensor:
    """A seeded mask of ``kind`` that, read as ``reading``, lets every query see itself (full
    masks) or key 0 (key masks) and hides some keys: padding at the end of sequence 0 and a hole in
    the last sequence (key masks), a random pattern (full masks), random finite scores (``add``)."""
    dtype, shape = kind.split()
    gen = torch.Generator(device="cpu").manual_seed(PROBE_SEED + 7)
    if shape == "keys":
        allowed = torch.ones(B, T, dtype=torch.bool)
        allowed[0, T - T // 3:] = False
        allowed[-1, T // 2] = False
    else:
        size = {"square": (T, T), "batched": (B, T, T), "heads": (B, 1, T, T)}[shape]
        allowed = (torch.rand(size, generator=gen) > 0.4) | torch.eye(T, dtype=torch.bool)
    if dtype == "float":
        scores = torch.randn(allowed.shape, generator=gen) * 0.5
        return scores.masked_fill(~allowed, torch.finfo(like.dtype).min).to(device=like.device, dtype=like.dtype)
    flags = allowed if reading == "keep" else ~allowed
    return (flags if dtype == "bool" else flags.long()).to(like.device)


def _differs(module: nn.Module, layer: nn.Module, args: tuple, training_fallback: str | None) -> str | None:
    """Why ``layer`` does not compute what ``module`` computes on ``args`` (eval and train outputs,
    gradients of the floating inputs and of every parameter), None when it does."""
    why = outputs_differ(run_call(layer, args, False), run_call(module, args, False))
    params = [(n, p) for n, p in module.named_parameters() if p.requires_grad and p.is_floating_point()]
    modes = (False,) if training_fallback else (False, True)
    if why is None and training_fallback is None:
        why = outputs_differ(run_call(layer, args, True), run_call(module, args, True))
        why = None if why is None else f"training-mode forward differs: {why}"
    for mode in modes:
        why = why or gradients_mismatch(module, layer, args, params, mode)
    return why


def _first_proven(module: nn.Module, specs: tuple, x: torch.Tensor, config: KernelConfig):
    """(the first spec reproducing module(x) in eval mode, its layer), or why none did."""
    try:
        ref = run_call(module, (x,), False)
    except Exception as exc:
        return f"the original forward failed on a probe input ({type(exc).__name__}: {str(exc)[:160]})"
    failures = []
    for spec in specs:
        layer = spec.build(module, config)
        try:
            why = outputs_differ(run_call(layer, (x,), False), ref)
        except Exception as exc:  # a reading whose shapes do not fit the module's
            why = f"{type(exc).__name__}: {str(exc)[:120]}"
        if why is None:
            return spec, layer
        failures.append(why)
    return (f"not proven equivalent: none of {len(specs)} candidate readings reproduces its output on the probe ("
            + "; ".join(list(dict.fromkeys(failures))[:3]) + ")")


def prove_masks(module: nn.Module, spec, x: torch.Tensor, config: KernelConfig):
    """``spec`` with the mask kinds the module's forward(x, mask) is proven for, and a note on the
    kinds the original accepts that no reading reproduces."""
    name = mask_parameter(module)
    if name is None:
        return spec
    spec = dataclasses.replace(spec, mask_arg=name)
    B, T = x.shape[0], x.shape[1]
    proven, unproven = [], []
    for dtype in DTYPE_CLASSES:
        for shape in SHAPES:
            kind, accepted, failures = f"{dtype} {shape}", False, []
            if dtype == "int" and shape != "keys":
                continue  # integer flags come as padding masks
            for reading in READINGS[dtype]:
                args = (x, probe_mask(kind, reading, B, T, x))
                try:
                    run_call(module, args, False)
                except Exception:  # the original does not take this kind of mask
                    continue
                accepted = True
                layer = dataclasses.replace(spec, masks=((kind, reading),)).build(module, config)
                try:
                    why = _differs(module, layer, args, spec.training_fallback)
                except Exception as exc:  # e.g. a backward the original cannot run with this mask
                    why = f"{type(exc).__name__}: {str(exc)[:120]}"
                if why is None:
                    proven.append((kind, reading))
                    break
                failures.append(f"read as {reading}: {why}")
            else:
                if accepted:
                    unproven.append(f"{dtype} {SHAPE_TEXT[shape]} ({failures[0][:80]})")
    note = "other masks run the original" + (": not proven " + ", ".join(unproven) if unproven else "")
    return dataclasses.replace(spec, masks=tuple(proven), mask_note=note[:600])


def prove_attention_candidates(module: nn.Module, specs: tuple, hidden: int, config: KernelConfig, what: str):
    """The first of ``specs`` (candidates of a hand-written ``what`` module, D = ``hidden``) whose
    layer computes what ``module`` computes, with its fallbacks and proven masks; else a Skip saying why."""
    if not config.verify:
        return Skip(f"a hand-written {what} has readings only computation can choose between (verify=False)")
    like = next(module.parameters())
    if like.device.type == "meta":
        return Skip("parameters are on the meta device, so equivalence cannot be verified")
    x = probe_input((PROBE_BATCH, max(config.verify_tokens, 4), hidden), like)
    plain = KernelConfig(backend=config.backend, deterministic=config.deterministic)
    found = _first_proven(module, specs, x, plain)
    if isinstance(found, str):
        return Skip(found[:420])
    spec, layer = found
    first, second = run_call(module, (x,), True), run_call(module, (x,), True)
    training = None if outputs_differ(first, second) is None else "its training-mode forward is stochastic"
    if training is None:
        why = outputs_differ(run_call(layer, (x,), True), first)
        training = None if why is None else f"training-mode forward differs: {why}"
    params = [(n, p) for n, p in module.named_parameters() if p.requires_grad and p.is_floating_point()]
    gradient = None
    for mode in (False, True) if training is None else (False,):
        gradient = gradient or gradients_mismatch(module, layer, (x,), params, mode)
    spec = dataclasses.replace(spec, training_fallback=training, gradient_fallback=gradient)
    return prove_masks(module, spec, x, plain)


__all__ = ["probe_mask", "prove_attention_candidates", "prove_masks", "run_call"]

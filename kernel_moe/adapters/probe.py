"""Proof by computation: run the original module and a candidate on the same probe input.

Every swap is preceded by a probe: a seeded random input of the module's dtype and device,
evaluated without gradients and in eval mode (dropout off), on the original module and on
the candidate. The candidate is accepted only when the outputs agree within the dtype's
tolerance; the first candidate that agrees wins (:func:`first_match`, the one loop that both
the adapters and the manager run).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

from kernel_moe.kernels.activations import POINTWISE_KINDS, pointwise

PROBE_SEED = 20240611
POINTWISE = ("silu", "gelu", "gelu_tanh", "relu")


def probe_input(shape: tuple[int, ...], like: torch.Tensor, seed: int = PROBE_SEED) -> torch.Tensor:
    """A seeded standard-normal tensor with the dtype and device of ``like``."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    return torch.randn(shape, generator=gen, dtype=torch.float32).to(device=like.device, dtype=like.dtype)


CHUNK = 1 << 18  # values compared at a time: the float64 copies (2 MiB each) stay small beside a gradient


def _error_terms(out: torch.Tensor, ref: torch.Tensor) -> tuple[bool, float, float, float, float]:
    """(ref all finite, max |ref|, max |out - ref|, sum (out - ref)^2, sum ref^2) in float64, read
    ``CHUNK`` values at a time so that no full float64 copy of a large tensor is ever made."""
    finite, scale, worst, sq_err, sq_ref = True, 0.0, 0.0, 0.0, 0.0
    for a, b in zip(out.reshape(-1).split(CHUNK), ref.reshape(-1).split(CHUNK)):
        a, b = a.double(), b.double()
        finite = finite and bool(torch.isfinite(b).all())
        d = (a - b).abs_()
        scale = max(scale, b.abs().max().item() if b.numel() else 0.0)
        part = d.max().item() if d.numel() else 0.0
        worst = part if math.isnan(part) or part > worst else worst  # a NaN difference stays NaN: no match
        sq_err += d.square_().sum().item()
        sq_ref += b.square().sum().item()
    return finite, scale, worst, sq_err, sq_ref


def mismatch(out: torch.Tensor, ref: torch.Tensor) -> str | None:
    """None when ``out`` matches ``ref`` within the dtype tolerance, else a short description."""
    if not isinstance(out, torch.Tensor) or out.shape != ref.shape:
        return f"shape {getattr(out, 'shape', type(out).__name__)} != {tuple(ref.shape)}"
    if not ref.is_floating_point() or not out.is_floating_point():  # ids, counts: exactly equal
        same = out.dtype == ref.dtype and torch.equal(out, ref)
        return None if same else f"{out.dtype} values differ from the original's {ref.dtype} values"
    finite, scale, worst, sq_err, sq_ref = _error_terms(out, ref)
    if not finite:
        return "reference output has non-finite values on the probe"
    if scale == 0.0:
        return "reference output is all zeros on the probe, so equivalence cannot be shown"
    if ref.dtype in (torch.float32, torch.float64):
        err = worst / scale
        return None if err <= 1e-4 else f"max relative error {err:.2e} > 1e-4"
    err = math.sqrt(sq_err) / math.sqrt(sq_ref)
    return None if err <= 2e-2 else f"relative error {err:.2e} > 2e-2"


def returns_kind(ref: object, x: torch.Tensor) -> str | None:
    """How a block shapes its output tensor ``ref`` for the input ``x`` (see ``MoESpec.output_shape``):
    "tensor" (shaped like the input), "tensor@tokens" ([T, H] for an input of another shape) or
    "tensor@flat" (flattened to 1-D); None when ``ref`` is none of these. Extra outputs of a block
    returning a tuple are identified by :mod:`kernel_moe.adapters.extras`."""
    H = x.shape[-1] if x.dim() else 0
    T = x.numel() // H if H else 0
    shapes = {(T * H,): "@flat", (T, H): "@tokens", tuple(x.shape): ""}  # the input's own shape wins
    if not isinstance(ref, torch.Tensor) or tuple(ref.shape) not in shapes:
        return None
    return "tensor" + shapes[tuple(ref.shape)]


def outputs_mismatch(out: object, ref: object) -> str | None:
    """:func:`mismatch` over every tensor of a (possibly tuple) output; None when all agree."""
    if isinstance(ref, torch.Tensor):
        return mismatch(out[0] if isinstance(out, tuple) else out, ref)  # type: ignore[arg-type]
    if not isinstance(out, tuple) or len(out) != len(ref):  # type: ignore[arg-type]
        return f"returns {type(out).__name__} where the original returns {len(ref)} values"  # type: ignore[arg-type]
    for i, (a, b) in enumerate(zip(out, ref)):  # type: ignore[arg-type]
        why = mismatch(a, b)
        if why is not None:
            return why if i == 0 else f"output {i}: {why}"
    return None


@contextlib.contextmanager
def train_mode(module: nn.Module, training: bool) -> Iterator[None]:
    """Temporarily set a module and its descendants to train or eval mode, then restore each flag."""
    flags = [(m, m.training) for m in module.modules()]
    module.train(training)
    try:
        yield
    finally:
        for m, flag in flags:
            m.training = flag


def eval_mode(module: nn.Module) -> contextlib.AbstractContextManager[None]:
    """Temporarily put a module and its descendants in eval mode, then restore each flag."""
    return train_mode(module, False)


def _float_tensors(out: object) -> list[torch.Tensor]:
    """The floating tensors among the outputs, in order (integer outputs carry no gradient)."""
    items = out if isinstance(out, (tuple, list)) else (out,)
    return [t for t in items if isinstance(t, torch.Tensor) and t.is_floating_point()]


SEPARATE_BYTES = 1 << 24  # a parameter this large gets a gradient pass of its own (see gradients_mismatch)


def _gradients(module: nn.Module, args: tuple, wrt_params: list[nn.Parameter], training: bool,
               with_inputs: bool) -> list[torch.Tensor | None]:
    """Gradients (None where nothing flows) of a seeded random projection of every floating output
    of ``module(*args)`` with respect to the floating inputs (when ``with_inputs``) and
    ``wrt_params``; nothing else's gradient is computed. The inputs require grad either way, so
    every pass records the same graph."""
    inputs = [a.detach().clone().requires_grad_() if a.is_floating_point() else a for a in args]
    wrt = ([a for a in inputs if a.requires_grad] if with_inputs else []) + list(wrt_params)
    with torch.enable_grad(), train_mode(module, training), torch.random.fork_rng(devices=[]):
        torch.manual_seed(PROBE_SEED)
        outs = [(i, t) for i, t in enumerate(_float_tensors(module(*inputs))) if t.requires_grad]
        if not outs or not wrt:
            return [None] * len(wrt)
        cotangents = [probe_input(tuple(t.shape), t, seed=PROBE_SEED + 2 + i) for i, t in outs]
        grads = torch.autograd.grad([t for _, t in outs], wrt, cotangents, allow_unused=True)
    return [None if g is None else g.detach() for g in grads]


def probe_gradients(
    module: nn.Module, args: tuple, params: list[nn.Parameter], training: bool
) -> list[torch.Tensor]:
    """Gradients of a seeded random projection of every floating output of ``module(*args)``
    with respect to the floating inputs and ``params``, in train or eval mode (zeros where
    nothing flows). Each output's projection is seeded by its position among the floating
    outputs, so an output that carries no gradient in one module but does in another shifts
    nothing. The global RNG is forked and seeded, so stochastic layers draw alike."""
    grads = _gradients(module, args, params, training, with_inputs=True)
    n_inputs = len(grads) - len(params)
    like = [a for a in args if a.is_floating_point()][:n_inputs] + list(params)
    return [torch.zeros_like(w) if g is None else g for g, w in zip(grads, like)]


def _abs_max(t: torch.Tensor | None) -> float:
    """max |t| read ``CHUNK`` values at a time (0 for None, NaN when t holds a NaN)."""
    if t is None:
        return 0.0
    worst = 0.0
    for c in t.reshape(-1).split(CHUNK):
        part = c.abs().max().item() if c.numel() else 0.0
        worst = part if math.isnan(part) or part > worst else worst
    return worst


def _gradient_passes(n_inputs: int, params: list[tuple[str, nn.Parameter]]) -> list[tuple[bool, list[int]]]:
    """The passes of :func:`gradients_mismatch` in compare order: (whether the inputs' gradients are
    taken, indices into ``params``). A parameter of ``SEPARATE_BYTES`` or more has a pass of its own,
    so at most one large gradient per module is held at a time; the others share a pass."""
    passes: list[tuple[bool, list[int]]] = [(n_inputs > 0, [])]
    for i, (_, p) in enumerate(params):
        if p.numel() * p.element_size() >= SEPARATE_BYTES:
            passes.append((False, [i]))
            passes.append((False, []))
        else:
            passes[-1][1].append(i)
    return [(inputs, idx) for inputs, idx in passes if inputs or idx]


def _one_mismatch(name: str, a: torch.Tensor | None, b: torch.Tensor | None) -> str | None:
    """The verdict of :func:`gradients_mismatch` on one gradient (None: nothing flows, a zero)."""
    if not _abs_max(b) > 0:
        if _abs_max(a) > 0:
            return f"gradient of {name} is zero in the original but not in the fused layer"
        return None
    why = mismatch(torch.zeros_like(b) if a is None else a, b)
    return None if why is None else f"gradient of {name}: {why}"


def gradients_mismatch(
    module: nn.Module, layer: nn.Module, args: tuple, params: list[tuple[str, nn.Parameter]], training: bool
) -> str | None:
    """None when ``layer`` gives the gradients ``module`` gives (inputs and ``params``, shared by
    both) within the dtype tolerance of :func:`mismatch`, else which gradient differs and how. A
    gradient that is zero in the original must be zero in the layer too.

    Memory: the gradients are taken in passes (:func:`_gradient_passes`), each restricted by
    ``torch.autograd.grad`` to its own tensors, the original's first (its graph freed when its
    backward returns), then the layer's; each gradient is freed once compared. A large MoE layer's
    proof so holds about two copies of its largest expert weight, not two of every weight."""
    n_inputs = sum(1 for a in args if isinstance(a, torch.Tensor) and a.is_floating_point())
    for with_inputs, idx in _gradient_passes(n_inputs, params):
        tensors = [params[i][1] for i in idx]
        names = ([f"input {i}" for i in range(n_inputs)] if with_inputs else []) + [
            f"parameter {params[i][0]}" for i in idx]
        ref = _gradients(module, args, tensors, training, with_inputs)
        ours = _gradients(layer, args, tensors, training, with_inputs)
        for k, name in enumerate(names):
            why = _one_mismatch(name, ours[k], ref[k])
            ours[k] = ref[k] = None  # freed as soon as compared
            if why is not None:
                return why
    return None


def run_module(module: nn.Module, *args: torch.Tensor) -> object:
    """module(*args) without gradients, in eval mode."""
    with torch.no_grad(), eval_mode(module):
        return module(*args)


def identify_activation(fn: Callable[[torch.Tensor], torch.Tensor]) -> str | None:
    """Name of the pointwise activation that ``fn`` computes (silu, gelu, gelu_tanh, relu, relu2), or None."""
    x = torch.linspace(-6.0, 6.0, 97, dtype=torch.float64)
    try:
        with torch.no_grad():
            y = fn(x)
    except Exception:
        return None
    if not isinstance(y, torch.Tensor) or y.shape != x.shape:
        return None
    for name in POINTWISE_KINDS:
        if torch.allclose(y.double(), pointwise(x, name), atol=1e-6, rtol=1e-6):
            return name
    return None


def leaf_activations(module: nn.Module) -> list[str]:
    """Activations computed by the module's parameter-free leaf modules (Dropout aside: calling it
    would draw from the global RNG), in module order; other leaves are passed over."""
    names = []
    for m in module.modules():
        if next(m.children(), None) is not None or isinstance(m, nn.Dropout) or any(True for _ in m.parameters()):
            continue
        name = identify_activation(m)
        if name is not None:
            names.append(name)
    return names


def run_reference(module: nn.Module, arg_options: list[tuple]) -> tuple[tuple, object] | str:
    """(args, module(*args)) for the first argument tuple the module accepts (no gradients, eval
    mode), else the error of the last attempt."""
    error = "no probe arguments"
    for args in arg_options:
        try:
            return args, run_module(module, *args)
        except Exception as exc:
            error = f"{type(exc).__name__}: {exc}"
    return error


@dataclass(frozen=True)
class Match:
    """The outcome of :func:`first_match`: the first candidate that agrees and the module built
    from it (both None when none agrees), and why each rejected candidate failed."""

    candidate: object | None
    module: nn.Module | None
    failures: tuple[str, ...]

    def reason(self, limit: int) -> str:
        """The distinct failures, joined and cut to ``limit`` characters."""
        return "; ".join(dict.fromkeys(self.failures))[:limit]


def first_match(candidates: list, build: Callable[[object], nn.Module], ref: object, args: tuple) -> Match:
    """The one probe loop: build each candidate in order and run it on ``args`` (no gradients,
    eval mode); the first whose every output agrees with ``ref`` (the original's output on the
    same ``args``) within the dtype tolerance is the match."""
    failures = []
    for cand in candidates:
        try:
            mod = build(cand)
            out = run_module(mod, *args)
        except Exception as exc:  # a candidate that cannot run is simply not a match
            failures.append(f"{type(exc).__name__}: {exc}")
            continue
        why = outputs_mismatch(out, ref)
        if why is None:
            return Match(cand, mod, tuple(failures))
        failures.append(why)
    return Match(None, None, tuple(failures))


__all__ = [
    "Match",
    "eval_mode",
    "first_match",
    "gradients_mismatch",
    "identify_activation",
    "leaf_activations",
    "mismatch",
    "outputs_mismatch",
    "probe_gradients",
    "probe_input",
    "returns_kind",
    "run_module",
    "run_reference",
    "train_mode",
]

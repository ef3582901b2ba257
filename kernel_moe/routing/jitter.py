"""Multiplicative jitter noise for the router during training.

Legend: T tokens, H hidden size, E experts.

Switch Transformer multiplies the router *input* (the token representation fed to the
router only) by noise drawn from U(1 - eps, 1 + eps) while training, to explore expert
choices; its experts still see the clean tokens. Mixtral (as written in transformers)
multiplies the hidden states before the router and then feeds the same jittered states to
the experts. :func:`jitter_input` is that operation on any input; :func:`jitter_logits` is
the same noise applied to the router logits instead, a cheaper variant (E draws per token
instead of H) that perturbs the scores rather than the features. Where the jittered tensor
goes is the caller's choice.

Both are the identity (the same tensor is returned) when not training or when eps == 0.
The noise is drawn with ``generator`` when given, otherwise from the global RNG, so
``torch.manual_seed`` or a seeded ``torch.Generator`` on the tensor's device makes it
reproducible.
"""

from __future__ import annotations


import torch


def _multiplicative_noise(
    x: torch.Tensor,
    eps: float,
    training: bool,
    generator: torch.Generator | None,
    name: str,
) -> torch.Tensor:
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 <= eps < 1:  # also rejects NaN, inf
        raise ValueError(f"{name}: eps={eps!r} must be a number in [0, 1)")
    if not x.dtype.is_floating_point:
        raise ValueError(f"{name}: input dtype {x.dtype} must be floating point")
    if not training or eps == 0:
        return x
    noise_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    noise = torch.empty(x.shape, dtype=noise_dtype, device=x.device).uniform_(
        1.0 - eps, 1.0 + eps, generator=generator
    )
    return (x.to(noise_dtype) * noise).to(x.dtype)


def jitter_logits(
    logits_TE: torch.Tensor,
    eps: float,
    training: bool,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Router logits [T, E] times U(1 - eps, 1 + eps) noise drawn per element, when training.

    The logits-space variant of Switch Transformer's router jitter (which scales the router
    input; see :func:`jitter_input`). The noise is drawn and applied in fp32 (fp64 for fp64
    input) and the result cast back to the input dtype; gradients flow through the product.
    """
    return _multiplicative_noise(logits_TE, eps, training, generator, "jitter_logits")


def jitter_input(
    x_TH: torch.Tensor,
    eps: float,
    training: bool,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Tokens [T, H] (any shape) times U(1 - eps, 1 + eps) noise drawn per element, when training.

    Switch Transformer applies it to the router input only; Mixtral-style models pass the
    jittered tokens to both the router and the experts. Noise in fp32 (fp64 for fp64 input),
    result in the input dtype.
    """
    return _multiplicative_noise(x_TH, eps, training, generator, "jitter_input")

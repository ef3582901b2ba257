"""``kernel_moe::fused_experts``: the expert computation of the contract
(:mod:`kernel_moe.kernels.contract`) as one custom op, with its backward
``kernel_moe::fused_experts_backward`` (also opaque to the compiler).

Python passes a call whole (x, routing, a :class:`StackedExperts`); the op schemas below are the
only place its fields are spelled out, because ``torch.library`` needs flat arguments. The
output shape [T, H] depends only on the input shapes, so ``torch.compile(fullgraph=True)`` keeps
the op in the graph and CUDA graphs can capture it. The backward recomputes intermediates
instead of saving them, and returns gradients of x, the routing weights (so the router trains),
the expert weights and biases.

Legend: T tokens, H hidden, E experts, G routed ids, K top-k, N up features, I intermediate.
"""

from __future__ import annotations

import functools
from typing import Optional

import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import _get_current_dispatch_mode

from kernel_moe.errors import UnsupportedInputError
from kernel_moe.kernels import post_norm as post_norm_path
from kernel_moe.kernels import scaled_inputs, select_backend
from kernel_moe.kernels.contract import Activation, StackedExperts, local_ids, validate_call

_PLAIN_TENSOR_TYPES = (Tensor, nn.Parameter)


@functools.lru_cache(maxsize=256)
def activation_of(fields: tuple) -> Activation:
    """The Activation value of the schema's activation fields (kind, glu, alpha, limit,
    gate_softcap, up_softcap), cached: validated once; an invalid one raises UnsupportedInputError."""
    try:
        return Activation(*fields)
    except ValueError as exc:
        raise UnsupportedInputError(str(exc)) from None


def _flat(experts: StackedExperts) -> tuple:
    """The schema's arguments between topk_ids and backend, in schema order."""
    act = experts.activation
    return (experts.w_up, experts.w_down, experts.b_up, experts.b_down, experts.expert_map, experts.w_up_scale,
            experts.w_down_scale, act.kind, act.glu, act.alpha, act.limit, act.gate_softcap, act.up_softcap,
            experts.scale_inputs, experts.weight_format)


def _unflat(args: tuple, post_norm: Optional[Tensor] = None, post_norm_eps: float = 1e-6) -> StackedExperts:
    """The StackedExperts of the schema's arguments between topk_ids and backend (see :func:`_flat`)
    and of the post-expert norm's (the schema's last two: appended, so older calls stay valid)."""
    w_up, w_down, b_up, b_down, expert_map, up_scale, down_scale = args[:7]
    return StackedExperts(w_up, w_down, b_up, b_down, activation_of(tuple(args[7:13])), args[14], expert_map,
                          bool(args[13]), up_scale, down_scale, post_norm, float(post_norm_eps))


def _forward(x: Tensor, weights: Optional[Tensor], ids: Optional[Tensor], experts: StackedExperts, backend: str,
             deterministic: bool) -> Tensor:
    validate_call(x, weights, ids, experts)
    chosen = select_backend(backend, x.device)
    if ids is None:
        if experts.post_norm is not None:
            return post_norm_path.forward(chosen, x, None, None, experts, deterministic)
        return chosen.forward(x, None, None, experts, deterministic)
    ids = local_ids(ids, experts)
    if experts.post_norm is not None:
        return post_norm_path.forward(chosen, x, weights, ids, experts, deterministic)
    if experts.scale_inputs:
        return scaled_inputs.forward(chosen, x, weights, ids, experts, deterministic)
    return chosen.forward(x, weights, ids, experts, deterministic)


@torch.library.custom_op("kernel_moe::fused_experts", mutates_args=())
def fused_experts(
    x: Tensor,
    topk_weights: Optional[Tensor],
    topk_ids: Optional[Tensor],
    w_up: Tensor,
    w_down: Tensor,
    b_up: Optional[Tensor],
    b_down: Optional[Tensor],
    expert_map: Optional[Tensor],
    w_up_scale: Optional[Tensor],
    w_down_scale: Optional[Tensor],
    activation: str,
    glu: str,
    alpha: float,
    limit: float,
    gate_softcap: float,
    up_softcap: float,
    scale_inputs: bool,
    weight_format: str,
    backend: str,
    deterministic: bool = True,
    post_norm: Optional[Tensor] = None,
    post_norm_eps: float = 1e-6,
) -> Tensor:
    """Routed experts: x [T, H], topk_weights / topk_ids [T, K] (both None: a dense call with E = 1),
    w_up [E, N, H], w_down [E, H, I], b_up [E, N] | None, b_down [E, H] | None, expert_map [G] | None,
    the weight scales of a quantized format, the activation's fields, whether the weights scale the
    inputs, the weight format, the post-expert norm's scale [H] | None and epsilon -> [T, H] in x's
    dtype.
    ``deterministic`` selects a fixed reduction order on the Triton backend (the CPU backend always
    has one)."""
    experts = _unflat((w_up, w_down, b_up, b_down, expert_map, w_up_scale, w_down_scale, activation, glu, alpha,
                       limit, gate_softcap, up_softcap, scale_inputs, weight_format), post_norm, post_norm_eps)
    return _forward(x, topk_weights, topk_ids, experts, backend, deterministic)


@fused_experts.register_fake
def _fused_experts_fake(x, topk_weights, topk_ids, w_up, w_down, b_up, b_down, expert_map, w_up_scale, w_down_scale,
                        activation, glu, alpha, limit, gate_softcap, up_softcap, scale_inputs, weight_format, backend,
                        deterministic=True, post_norm=None, post_norm_eps=1e-6):
    experts = _unflat((w_up, w_down, b_up, b_down, expert_map, w_up_scale, w_down_scale, activation, glu, alpha,
                       limit, gate_softcap, up_softcap, scale_inputs, weight_format), post_norm, post_norm_eps)
    validate_call(x, topk_weights, topk_ids, experts)
    return x.new_empty(x.shape)


def direct_call_allowed(*tensors: Optional[Tensor]) -> bool:
    """True when a call may run the op's implementation without the ``torch.library`` dispatcher.

    The dispatcher (tens of microseconds a call on CPU) is what graph capture, fake tensors and
    autograd need. Plain eager inference needs none of it: no compile or trace in progress, no
    dispatch mode or functorch transform active, only plain tensors, and none needing a gradient.
    """
    if torch.compiler.is_compiling() or torch.jit.is_tracing() or _get_current_dispatch_mode() is not None:
        return False
    if torch._C._functorch.peek_interpreter_stack() is not None:
        return False
    grad = torch.is_grad_enabled()
    for t in tensors:
        if t is None:
            continue
        if type(t) not in _PLAIN_TENSOR_TYPES or (grad and t.requires_grad):
            return False
    return True


def run_experts(x_TH: Tensor, weights_TK: Optional[Tensor], ids_TK: Optional[Tensor], experts: StackedExperts,
                backend: str, deterministic: bool = True) -> Tensor:
    """One call of the expert computation: ``kernel_moe::fused_experts``, or in plain eager
    inference its implementation directly (same checks, same result, without the dispatcher's
    cost; see :func:`direct_call_allowed`)."""
    if direct_call_allowed(x_TH, weights_TK, *experts[:4], experts.post_norm):
        return _forward(x_TH, weights_TK, ids_TK, experts, backend, deterministic)
    return torch.ops.kernel_moe.fused_experts(x_TH, weights_TK, ids_TK, *_flat(experts), backend, deterministic,
                                              experts.post_norm, experts.post_norm_eps)


@torch.library.custom_op("kernel_moe::fused_experts_backward", mutates_args=())
def fused_experts_backward(
    grad_out: Tensor,
    x: Tensor,
    topk_weights: Optional[Tensor],
    topk_ids: Optional[Tensor],
    w_up: Tensor,
    w_down: Tensor,
    b_up: Optional[Tensor],
    b_down: Optional[Tensor],
    expert_map: Optional[Tensor],
    w_up_scale: Optional[Tensor],
    w_down_scale: Optional[Tensor],
    activation: str,
    glu: str,
    alpha: float,
    limit: float,
    gate_softcap: float,
    up_softcap: float,
    scale_inputs: bool,
    weight_format: str,
    backend: str,
    post_norm: Optional[Tensor] = None,
    post_norm_eps: float = 1e-6,
    w_up_grad: bool = True,
    w_down_grad: bool = True,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Gradients of fused_experts: (grad_x, grad_topk_weights or [0] for a dense call, grad_w_up,
    grad_w_down, grad_b_up or [0], grad_b_down or [0], grad_post_norm or [0]); quantized weights
    are frozen, and a weight whose ``w_*_grad`` is False is not asked for: their gradients are [0]
    (never allocated; the post-norm path computes them and drops them)."""
    experts = _unflat((w_up, w_down, b_up, b_down, expert_map, w_up_scale, w_down_scale, activation, glu, alpha,
                       limit, gate_softcap, up_softcap, scale_inputs, weight_format), post_norm, post_norm_eps)
    chosen = select_backend(backend, x.device)
    wanted = (w_up_grad, w_down_grad)
    if post_norm is not None:
        ids = None if topk_ids is None else local_ids(topk_ids, experts)
        g = post_norm_path.backward(chosen, grad_out, x, topk_weights, ids, experts)
        g = g._replace(w_up=None if not w_up_grad else g.w_up, w_down=None if not w_down_grad else g.w_down)
    elif topk_ids is None:
        g = chosen.backward(grad_out, x, None, None, experts, wanted)
    elif experts.scale_inputs:
        g = scaled_inputs.backward(chosen, grad_out, x, topk_weights, local_ids(topk_ids, experts), experts, wanted)
    else:
        g = chosen.backward(grad_out, x, topk_weights, local_ids(topk_ids, experts), experts, wanted)
    def given(t: Optional[Tensor]) -> Tensor:
        return x.new_empty(0) if t is None else t  # a fresh empty each: outputs may not alias

    return (g.x, given(g.topk_weights), given(g.w_up), given(g.w_down), given(g.b_up), given(g.b_down),
            given(g.post_norm))


@fused_experts_backward.register_fake
def _fused_experts_backward_fake(grad_out, x, topk_weights, topk_ids, w_up, w_down, b_up, b_down, expert_map,
                                 w_up_scale, w_down_scale, activation, glu, alpha, limit, gate_softcap, up_softcap,
                                 scale_inputs, weight_format, backend, post_norm=None, post_norm_eps=1e-6,
                                 w_up_grad=True, w_down_grad=True):
    def like(t: Optional[Tensor]) -> Tensor:
        return x.new_empty(0) if t is None else t.new_empty(t.shape)

    frozen = weight_format != "full"
    return (like(x), like(topk_weights), like(None if frozen or not w_up_grad else w_up),
            like(None if frozen or not w_down_grad else w_down), like(b_up), like(b_down), like(post_norm))


def _setup_context(ctx, inputs, output) -> None:
    post_norm = inputs[20] if len(inputs) > 20 else None
    ctx.save_for_backward(*inputs[:10], post_norm)  # x, routing, weights, biases, expert map, scales, norm
    ctx.args = inputs[10:19]  # activation fields, scale_inputs, weight_format, backend
    ctx.post_norm_eps = inputs[21] if len(inputs) > 21 else 1e-6
    ctx.frozen = inputs[17] != "full"  # quantized weights take no gradient


def _gradient_wanted(ctx, index: int, t: Tensor) -> bool:
    """Whether the backward now running needs the gradient of input ``index`` (``t``): it requires
    grad, and (in eager autograd) the engine will run the node it flows into; a
    ``torch.autograd.grad`` restricted to other tensors leaves it out, so a probe of the input
    gradients allocates no weight gradient."""
    if ctx.frozen or not ctx.needs_input_grad[index]:
        return False
    if torch.compiler.is_compiling():
        return True
    try:
        return bool(torch._C._will_engine_execute_node(torch.autograd.graph.get_gradient_edge(t).node))
    except (RuntimeError, AttributeError):  # not inside an engine run (traced backward): assume needed
        return True


def _backward(ctx, grad_out):
    x, topk_weights, topk_ids, w_up, w_down, b_up, b_down = ctx.saved_tensors[:7]
    post_norm = ctx.saved_tensors[10]
    wanted = (_gradient_wanted(ctx, 3, w_up), _gradient_wanted(ctx, 4, w_down))
    g_x, g_w, g_up, g_down, g_bup, g_bdown, g_norm = torch.ops.kernel_moe.fused_experts_backward(
        grad_out.contiguous(), *ctx.saved_tensors[:10], *ctx.args, post_norm, ctx.post_norm_eps, *wanted)
    g_up = g_up if wanted[0] else None
    g_down = g_down if wanted[1] else None
    return (g_x, None if topk_weights is None else g_w, None, g_up, g_down, None if b_up is None else g_bup,
            None if b_down is None else g_bdown) + (None,) * 13 + (None if post_norm is None else g_norm, None)


fused_experts.register_autograd(_backward, setup_context=_setup_context)


__all__ = ["activation_of", "direct_call_allowed", "fused_experts", "fused_experts_backward", "run_experts"]

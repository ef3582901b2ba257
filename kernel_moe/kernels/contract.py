"""The experts contract: one value type for a call of the expert computation, the rules every
backend keeps, and the one validator of a call's inputs.

Legend: T tokens, H hidden, E experts held (local), G expert ids routed to (global), K top-k,
N up features (2*I gated, else I), I intermediate.

A call computes ``out[t] = sum_j w[t, j] * expert_{id[t, j]}(x[t])`` with
``expert_e(x) = act(x @ w_up[e]^T + b_up[e]) @ w_down[e]^T + b_down[e]``, accumulated in fp32 and
returned in x's dtype. The rules, the same on every backend (``kernels/cpu``, ``kernels/triton``):

- **Dropped slots.** An expert id outside [0, G) marks a dropped slot (capacity overflow, an
  expert held on another rank): it contributes nothing to the output (not even a NaN), its
  routing-weight gradient is 0, and it adds nothing to any expert's gradient.
- **Expert map.** With ``expert_map`` [G] (int), id g runs local expert ``expert_map[g]``; an
  entry of -1 (or any value outside [0, E)) drops the slot. Without it, G = E and ids are local.
  :func:`local_ids` applies it, so backends only ever see local ids.
- **Where the weights apply.** ``out[t] = sum_j w[t, j] * expert(x[t])``; with ``scale_inputs``
  (Llama 4) ``out[t] = sum_j expert(w[t, j] * x[t])`` instead.
- **Post-expert norm.** With ``post_norm`` s [H], each expert output is normalised before its
  routing weight: ``expert(x)`` becomes ``z * rsqrt(mean(z ** 2) + post_norm_eps)`` with
  ``z = s * expert(x)`` (scaled, then RMS-normalised, in fp32; MuseSpark). ``kernels/post_norm.py``
  computes it over any backend; a dropped slot still contributes nothing.
- **Dense calls.** Routing ``None`` means one expert (E == 1) and weight 1 for every token: the
  dense FFN is this op with E = 1, not a second computation.
- **Shapes only.** The output shape depends on the input shapes alone, and nothing outside a
  backend's own code may read tensor data on the host.

Backends implement :class:`ExpertsBackend`; ``kernels.select_backend`` chooses one per call.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple, Optional, Protocol

import torch
from torch import Tensor

from kernel_moe.errors import UnsupportedInputError

ACTIVATION_KINDS = ("silu", "gelu", "gelu_tanh", "relu", "relu2", "gpt_oss")
GLU_LAYOUTS = ("none", "concat", "interleaved")
WEIGHT_FORMATS = ("full", "int8", "fp8", "int4")
# the stored dtype of each quantized format (see kernels/quantization.py for the layouts)
QUANTIZED_DTYPES = {"int8": torch.int8, "fp8": torch.float8_e4m3fn, "int4": torch.uint8}
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
ID_DTYPES = (torch.int32, torch.int64)


@dataclass(frozen=True)
class Activation:
    """What an expert applies between its projections.

    - ``kind``: silu, gelu, gelu_tanh, relu, relu2 (``relu(x) ** 2``), or gpt_oss (GPT-OSS's
      SwiGLU: ``(up + 1) * gate * sigmoid(alpha * gate)``; gated layouts only).
    - ``glu``: "none" (act of all N = I features), "concat" (``[gate | up]``, act(gate) * up) or
      "interleaved" (``g0, u0, g1, u1, ...``).
    - ``limit`` (gated only): ``gate = min(gate, limit)`` and ``up = clamp(up, -limit, limit)``
      before the activation (GPT-OSS, clamped SwiGLU); inf clamps nothing.
    - ``gate_softcap`` / ``up_softcap`` (gated silu only): softcapped SwiGLU,
      ``cap(gate, a) * sigmoid(gate) * cap(up, b)`` with ``cap(v, c) = c * tanh(v / c)``; inf is
      no cap (plain SwiGLU).
    """

    kind: str = "silu"
    glu: str = "concat"
    alpha: float = 1.702
    limit: float = math.inf
    gate_softcap: float = math.inf
    up_softcap: float = math.inf

    def __post_init__(self) -> None:
        if self.kind not in ACTIVATION_KINDS:
            raise ValueError(f"activation={self.kind!r} is not supported; allowed: {', '.join(ACTIVATION_KINDS)}")
        if self.glu not in GLU_LAYOUTS:
            raise ValueError(f"glu={self.glu!r} is not supported; allowed: {', '.join(GLU_LAYOUTS)}")
        if self.kind == "gpt_oss" and self.glu == "none":
            raise ValueError("activation='gpt_oss' needs a gated layout (glu='concat' or 'interleaved'), got "
                             "glu='none'")
        for name in ("alpha", "limit", "gate_softcap", "up_softcap"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
                raise ValueError(f"activation {name}={value!r} must be a number")
        for name in ("limit", "gate_softcap", "up_softcap"):
            if getattr(self, name) <= 0:
                raise ValueError(f"activation {name}={getattr(self, name)!r} must be > 0 (inf: none)")
        if not self.gated and self.limit != math.inf:
            raise ValueError(f"activation limit={self.limit!r} needs a gated layout (it clamps gate and up)")
        if self.softcapped and not (self.gated and self.kind == "silu"):
            raise ValueError(f"softcaps (gate_softcap={self.gate_softcap!r}, up_softcap={self.up_softcap!r}) are "
                             f"defined for a gated silu only, not activation={self.kind!r} with glu={self.glu!r}")

    @property
    def gated(self) -> bool:
        return self.glu != "none"

    @property
    def softcapped(self) -> bool:
        return self.gate_softcap != math.inf or self.up_softcap != math.inf

    def up_features(self, intermediate: int) -> int:
        """N for an intermediate size I."""
        return 2 * intermediate if self.gated else intermediate

    def describe(self) -> str:
        if not self.gated:
            return self.kind
        extra = f", alpha={self.alpha:g}, limit={self.limit:g}" if self.kind == "gpt_oss" else (
            f", limit={self.limit:g}" if self.limit != math.inf else "")
        if self.softcapped:
            extra += f", softcaps={self.gate_softcap:g}/{self.up_softcap:g}"
        return f"{self.kind}-glu({self.glu}{extra})"


class StackedExperts(NamedTuple):
    """The experts of one call: stacked weights (views, never copies), biases, the activation,
    the weight format (with its scales) and the expert-id map. Built per forward by the layer (cheap: a tuple of
    references), passed whole through Python; only the custom-op schema spells it out."""

    w_up: Tensor  # [E, N, H], any strides
    w_down: Tensor  # [E, H, I], any strides
    b_up: Optional[Tensor] = None  # [E, N]
    b_down: Optional[Tensor] = None  # [E, H]
    activation: Activation = Activation()
    weight_format: str = "full"
    expert_map: Optional[Tensor] = None  # [G] int: local expert of each routed id, -1 = not held
    scale_inputs: bool = False  # routing weights scale each expert's input instead of its output
    w_up_scale: Optional[Tensor] = None  # quantized formats: [E, N] per row, or [E, N, H / group]
    w_down_scale: Optional[Tensor] = None  # [E, H] or [E, H, I / group]
    post_norm: Optional[Tensor] = None  # [H]: scale of each expert output before its RMS norm (None: no norm)
    post_norm_eps: float = 1e-6  # the norm's epsilon (with post_norm only)

    @property
    def quantized(self) -> bool:
        return self.weight_format != "full"

    @property
    def num_experts(self) -> int:
        """E, the experts held."""
        return self.w_up.shape[0]

    @property
    def num_ids(self) -> int:
        """G, the size of the id space routing chooses from."""
        return self.expert_map.shape[0] if self.expert_map is not None else self.w_up.shape[0]


class ExpertsGrads(NamedTuple):
    """Gradients of a call: x [T, H], routing weights [T, K] (None for a dense call), the
    weights [E, N, H] / [E, H, I] (None for quantized, frozen weights), the biases (None where
    there is none) and the post-expert norm's scale [H] (None without one)."""

    x: Tensor
    topk_weights: Optional[Tensor]
    w_up: Optional[Tensor]
    w_down: Optional[Tensor]
    b_up: Optional[Tensor]
    b_down: Optional[Tensor]
    post_norm: Optional[Tensor] = None


class ExpertsBackend(Protocol):
    """A peer implementation of the contract. ``ids_TK`` are local (see :func:`local_ids`);
    routing None is a dense call. ``weight_grads`` says which of (w_up, w_down) the caller needs a
    gradient of; the others' come back None (so a probe of input gradients allocates none)."""

    name: str

    def forward(self, x_TH: Tensor, weights_TK: Optional[Tensor], ids_TK: Optional[Tensor],
                experts: StackedExperts, deterministic: bool) -> Tensor: ...

    def backward(self, grad_TH: Tensor, x_TH: Tensor, weights_TK: Optional[Tensor], ids_TK: Optional[Tensor],
                 experts: StackedExperts, weight_grads: tuple[bool, bool] = (True, True)) -> ExpertsGrads: ...


def local_ids(ids_TK: Tensor, experts: StackedExperts) -> Tensor:
    """Routed ids [T, K] -> local expert ids [T, K] through ``experts.expert_map`` (dropped slots:
    -1); without a map the ids are returned as they are (already local)."""
    mapping = experts.expert_map
    if mapping is None:
        return ids_TK
    G = mapping.shape[0]
    routed = (ids_TK >= 0) & (ids_TK < G)
    local = mapping.to(ids_TK.dtype).index_select(0, ids_TK.clamp(0, max(G - 1, 0)).reshape(-1)).view(ids_TK.shape)
    held = routed & (local >= 0) & (local < experts.num_experts)
    return torch.where(held, local, torch.full_like(local, -1))


def validate_call(x_TH: Tensor, weights_TK: Optional[Tensor], ids_TK: Optional[Tensor],
                  experts: StackedExperts) -> None:
    """The one check of a call's inputs, from metadata only (no tensor data is read): shapes,
    dtypes, devices, the activation and the weight format. Raises UnsupportedInputError naming
    the input, what it is and what is allowed."""
    if not isinstance(experts.activation, Activation):
        raise UnsupportedInputError(f"activation must be an Activation, got {type(experts.activation).__name__}")
    if experts.weight_format not in WEIGHT_FORMATS:
        raise UnsupportedInputError(f"weight_format={experts.weight_format!r} is not supported; allowed: "
                                    f"{', '.join(WEIGHT_FORMATS)}")
    if x_TH.dim() != 2:
        raise UnsupportedInputError(f"x must be 2-D [T, H], got shape {tuple(x_TH.shape)}")
    if x_TH.dtype not in FLOAT_DTYPES:
        raise UnsupportedInputError(f"x dtype {x_TH.dtype} is not supported; allowed: float32, bfloat16, float16, "
                                    "float64")
    E, N, H = _check_weights(x_TH.shape[1], experts)
    for name, t, shape in (("b_up", experts.b_up, (E, N)), ("b_down", experts.b_down, (E, H))):
        if t is not None and t.dtype not in FLOAT_DTYPES:
            raise UnsupportedInputError(f"{name} dtype {t.dtype} is not supported; allowed: float32, bfloat16, "
                                        "float16, float64")
        if t is not None and tuple(t.shape) != shape:
            raise UnsupportedInputError(f"{name} must be [{', '.join(map(str, shape))}], got {tuple(t.shape)}")
    _check_routing(x_TH.shape[0], weights_TK, ids_TK, experts)
    _check_post_norm(H, experts)
    for name, t in (("topk_weights", weights_TK), ("topk_ids", ids_TK), *zip(StackedExperts._fields, experts)):
        if isinstance(t, Tensor) and t.device != x_TH.device:
            raise UnsupportedInputError(f"{name} is on {t.device} but x is on {x_TH.device}; all inputs must share a "
                                        "device")


def _check_weights(H: int, experts: StackedExperts) -> tuple[int, int, int]:
    """Shapes and dtypes of the stacked weights (and scales): (E, N, H)."""
    w_up, w_down, fmt = experts.w_up, experts.w_down, experts.weight_format
    if w_up.dim() != 3 or w_down.dim() != 3:
        raise UnsupportedInputError(
            f"w_up and w_down must be 3-D [E, N, H] and [E, H, I], got {tuple(w_up.shape)} and {tuple(w_down.shape)}")
    want = QUANTIZED_DTYPES.get(fmt)
    for name, t in (("w_up", w_up), ("w_down", w_down)):
        if want is None and t.dtype not in FLOAT_DTYPES:
            raise UnsupportedInputError(f"{name} dtype {t.dtype} is not supported; allowed: float32, bfloat16, "
                                        "float16, float64")
        if want is not None and (t.dtype != want or t.stride(-1) != 1):
            raise UnsupportedInputError(f"{name} of weight_format={fmt!r} must be {want} with unit stride along its "
                                        f"input features, got {t.dtype} with strides {t.stride()}")
    packing = 2 if fmt == "int4" else 1  # int4 holds two input features per byte
    E, N, H_w = w_up.shape[0], w_up.shape[1], w_up.shape[2] * packing
    if H_w != H:
        raise UnsupportedInputError(f"w_up is [E, N, H={H_w}] but x has H={H}")
    activation = experts.activation
    if activation.gated and N % 2 != 0:
        raise UnsupportedInputError(f"w_up has N={N} features, not even, but glu={activation.glu!r} needs "
                                    "[gate, up] pairs")
    I = N // 2 if activation.gated else N
    if (w_down.shape[0], w_down.shape[1], w_down.shape[2] * packing) != (E, H, I):
        raise UnsupportedInputError(f"w_down must be [E={E}, H={H}, I={I}], got {tuple(w_down.shape)}"
                                    + (" (int4: two per byte)" if packing == 2 else ""))
    if want is not None:
        _check_scale("w_up_scale", experts.w_up_scale, (E, N), H, fmt)
        _check_scale("w_down_scale", experts.w_down_scale, (E, H), I, fmt)
    elif experts.w_up_scale is not None or experts.w_down_scale is not None:
        raise UnsupportedInputError("weight scales are given but weight_format='full'")
    return E, N, H


def _check_scale(name: str, scale: Optional[Tensor], rows: tuple[int, int], K: int, fmt: str) -> None:
    """A quantized weight's scale: float32 [E, N] (one per row; int8, fp8) or [E, N, G] with G
    dividing K (groups of K / G input features; int4 always)."""
    if scale is None or scale.dtype != torch.float32:
        raise UnsupportedInputError(f"weight_format={fmt!r} needs {name} as float32, got "
                                    f"{None if scale is None else scale.dtype}")
    per_row = scale.dim() == 2 and fmt != "int4"
    grouped = scale.dim() == 3 and scale.shape[-1] > 0 and K % scale.shape[-1] == 0
    if tuple(scale.shape[:2]) != rows or not (per_row or grouped):
        shapes = f"[{rows[0]}, {rows[1]}, K / group]" + ("" if fmt == "int4" else f" or [{rows[0]}, {rows[1]}]")
        raise UnsupportedInputError(f"{name} of weight_format={fmt!r} must be {shapes} with the group dividing "
                                    f"K={K}, got {tuple(scale.shape)}")


def _check_post_norm(H: int, experts: StackedExperts) -> None:
    """The post-expert norm: a floating [H] scale and an epsilon >= 0; not with input scaling."""
    s, eps = experts.post_norm, experts.post_norm_eps
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not math.isfinite(eps) or eps < 0:
        raise UnsupportedInputError(f"post_norm_eps={eps!r} must be a finite number >= 0")
    if s is None:
        return
    if s.dtype not in FLOAT_DTYPES or tuple(s.shape) != (H,):
        raise UnsupportedInputError(f"post_norm must be a floating [H={H}] tensor, got {s.dtype} {tuple(s.shape)}")
    if experts.scale_inputs:
        raise UnsupportedInputError("post_norm with scale_inputs is not supported: the norm of an expert output "
                                    "is defined for routing weights that scale outputs")


def _check_routing(T: int, weights_TK: Optional[Tensor], ids_TK: Optional[Tensor], experts: StackedExperts) -> None:
    mapping = experts.expert_map
    if (weights_TK is None) != (ids_TK is None):
        raise UnsupportedInputError("topk_weights and topk_ids must both be given, or both be None (a dense call)")
    if ids_TK is None:
        E = experts.num_experts
        if E != 1 or mapping is not None or experts.scale_inputs:
            raise UnsupportedInputError(f"a dense call (no routing) needs one expert, no expert map and no input "
                                        f"scaling, got E={E}" + (" and an expert map" if mapping is not None else "")
                                        + (" and scale_inputs" if experts.scale_inputs else ""))
    else:
        if ids_TK.dim() != 2 or ids_TK.shape[0] != T:
            raise UnsupportedInputError(f"topk_ids must be [T={T}, K], got shape {tuple(ids_TK.shape)}")
        if ids_TK.dtype not in ID_DTYPES:
            raise UnsupportedInputError(f"topk_ids dtype {ids_TK.dtype} is not supported; allowed: int32, int64")
        if weights_TK.shape != ids_TK.shape:
            raise UnsupportedInputError(f"topk_weights shape {tuple(weights_TK.shape)} must equal topk_ids shape "
                                        f"{tuple(ids_TK.shape)}")
        if not weights_TK.is_floating_point():
            raise UnsupportedInputError(f"topk_weights dtype {weights_TK.dtype} must be floating point")
    if mapping is not None and (mapping.dim() != 1 or mapping.dtype not in ID_DTYPES):
        raise UnsupportedInputError(f"expert_map must be a 1-D int32/int64 tensor [G], got {mapping.dtype} "
                                    f"{tuple(mapping.shape)}")


__all__ = [
    "ACTIVATION_KINDS",
    "Activation",
    "ExpertsBackend",
    "ExpertsGrads",
    "GLU_LAYOUTS",
    "StackedExperts",
    "WEIGHT_FORMATS",
    "local_ids",
    "validate_call",
]

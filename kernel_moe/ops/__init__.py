"""torch.library custom ops of kernel_moe (namespace ``kernel_moe::``): schemas, fake
implementations and autograd; what runs inside them is a backend of ``kernel_moe.kernels``.

Importing this package registers the ops; it never initialises CUDA or imports triton.
"""

from kernel_moe.kernels import resolve_backend, triton_available, triton_interpreter_enabled
from kernel_moe.ops import ffn as _ffn  # noqa: F401  (registers the kernel_moe::fused_ffn alias)
from kernel_moe.ops.experts import fused_experts, fused_experts_backward, run_experts
from kernel_moe.ops.gating import gate, topk_gating
from kernel_moe.ops.offload import offloaded_experts
from kernel_moe.ops.projection import expert_projection, expert_projection_backward, run_projection

__all__ = [
    "fused_experts",
    "expert_projection",
    "expert_projection_backward",
    "fused_experts_backward",
    "gate",
    "offloaded_experts",
    "resolve_backend",
    "run_experts",
    "run_projection",
    "topk_gating",
    "triton_available",
    "triton_interpreter_enabled",
]

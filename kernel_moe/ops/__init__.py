"""torch.library custom ops of kernel_moe (namespace ``kernel_moe::``).

Importing this package registers the ops; it never initialises CUDA or imports triton.
"""

from kernel_moe.ops.backend import resolve_backend, triton_available, triton_interpreter_enabled
from kernel_moe.ops.experts import fused_experts, fused_experts_backward
from kernel_moe.ops.ffn import fused_ffn, fused_ffn_backward
from kernel_moe.ops.gating import topk_gating

__all__ = [
    "fused_experts",
    "fused_experts_backward",
    "fused_ffn",
    "fused_ffn_backward",
    "resolve_backend",
    "topk_gating",
    "triton_available",
    "triton_interpreter_enabled",
]

"""The CPU backend of the experts contract.

- ``extension.py`` builds and loads the native C++ kernels (compiled on first use, cached):
  ``grouped_matvec.cpp`` for decode and small batches (``quant_matvec.cpp`` for quantized
  experts), ``fused_experts.cpp`` for batches;
  ``kernels.h`` declares them, ``bindings.cpp`` makes the Python module.
- ``forward.py`` chooses, per call, how the routed experts run on CPU (native kernels, strided
  batched GEMMs, per-expert GEMMs in chunks) and ``backward.py`` computes the gradients;
  ``mlp.py`` is one expert's MLP forward and backward in PyTorch.
- ``backend.py`` binds them as the backend object the selector returns.

The PyTorch paths run on any device; the native kernels on CPU tensors only.
"""

from kernel_moe.kernels.cpu.extension import ENV, SETTINGS, cpu_extension, extension_setting, extension_status

__all__ = ["ENV", "SETTINGS", "cpu_extension", "extension_setting", "extension_status"]

"""The Triton backend of the experts contract (:mod:`kernel_moe.kernels.contract`): fused MoE
kernels for CUDA, run on CPU tensors through Triton's interpreter (``TRITON_INTERPRET=1``).

Modules (each imports triton, except ``tile_configs``; this package itself imports nothing):

- ``common``: the ``@triton.jit`` helpers forward and backward share (grouped program ids, the
  fp32-accumulating dot, activations, the rows of a block of the aligned layout) and the
  launch utilities (dtype maps, the TF32 switch, the launch device, the tuned-table device key).
- ``routing``: the fused top-k gating kernel (:func:`~.routing.topk_gating`) and the
  expert-aligned slot layout (:func:`~.routing.align_by_expert`).
- ``forward``: grouped up- and down-projection kernels and the reduction over K;
  :func:`~.forward.fused_experts_triton`.
- ``backward``: the gradient kernels; :func:`~.backward.fused_experts_backward_triton`.
- ``projection``: one expert projection (the gather or combine half of the experts op) and its
  gradients, for attention experts (``kernel_moe::expert_projection``).
- ``tile_configs``: block sizes of every kernel (tuned JSON tables in ``configs/`` and a
  heuristic default).
- ``backend``: ``BACKEND``, the object ``kernels.select_backend`` returns for "triton".

Data path of a call (no permuted copy of the tokens, no host synchronisation): ids [T, K] ->
``align_by_expert`` (slots sorted by expert, each run padded to a block) -> up-projection
(tokens gathered in the A-load, activation in the epilogue) -> down-projection (routing
weight in the epilogue) -> reduction over K in a fixed order. The backward recomputes the
up-projection on the same layout.
"""

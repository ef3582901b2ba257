"""OLMo-core's MoE blocks as they ship, optimized and checked on CPU; run by test_thirdparty.py in a
subprocess with TRITON_INTERPRET=1 (set before triton is imported).

Why the subprocess and the two shims, all outside the code under test:

- olmo_core's dropless and capacity MoEs move tokens with Triton kernels (olmo_core/kernels/moe.py,
  called from olmo_core/ops/moe.py); there is no CPU path, so on a machine without a GPU they run
  only in Triton's interpreter. Those kernels are autotuned, and Triton's autotuner asks the active
  GPU driver for its benchmarker (triton/runtime/autotuner.py ``do_bench``), which fails with
  "0 active drivers" without a GPU: each olmo_core autotuner gets a wall-clock timer instead. The
  candidate configurations differ in block size only, so the choice changes no value.
- ``import olmo_core.nn.moe`` imports the whole package, whose data and checkpoint I/O imports
  ``cached_path`` (with Google Cloud and S3 clients), ``requests`` and ``bettermap`` at import time.
  They are not installed beside the lock and the MoE layers never call them: while olmo_core is
  imported, each one that is missing is an empty placeholder module, removed again afterwards.

Prints one JSON object: per configuration, what the report said and what was checked.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import sys
import time
import types

import torch
from torch import nn

IO_MODULES = ("cached_path", "cached_path.schemes", "requests", "requests.adapters", "bettermap")


class _Anything(type):
    """A placeholder class whose attributes are placeholder classes (``requests.exceptions.X``)."""

    def __getattr__(cls, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return _Anything(name, (Exception,), {})


class _Placeholder(types.ModuleType):
    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return _Anything(name, (Exception,), {})


def import_olmo_moe():
    """olmo_core.nn.moe and FeedForwardConfig, with placeholders for the missing I/O modules."""
    placed = []
    for name in IO_MODULES:
        top = name.split(".")[0]
        if top in sys.modules or importlib.util.find_spec(top) is None:
            module = _Placeholder(name)
            module.__path__ = []
            sys.modules.setdefault(name, module)
            placed.append(name)
    try:
        import olmo_core.nn.moe as moe
        from olmo_core.nn.feed_forward import FeedForwardConfig
        import olmo_core.kernels.moe as kernels
    finally:
        for name in placed:
            if isinstance(sys.modules.get(name), _Placeholder):
                del sys.modules[name]
    from triton.runtime.autotuner import Autotuner

    def wall_clock(kernel_call, quantiles):
        start = time.perf_counter()
        kernel_call()
        elapsed = time.perf_counter() - start
        return [elapsed for _ in quantiles]

    for value in vars(kernels).values():
        if isinstance(value, Autotuner):
            value.do_bench = wall_clock
    return moe, FeedForwardConfig


CONFIGS = {
    "dropless-softmax": dict(name="dropless", gating="softmax"),
    "dropless-sigmoid": dict(name="dropless", gating="sigmoid"),
    "dropless-softmax-shared": dict(name="dropless", gating="softmax", shared=True),
    "dropless-sigmoid-shared": dict(name="dropless", gating="sigmoid", shared=True),
    "dropless-softmax-l1-normalized": dict(name="dropless", gating="softmax", normalize=1.0),
    "dropless-sigmoid-bias-gamma": dict(name="dropless", gating="sigmoid", bias_gamma=1e-3),
    "capacity-softmax": dict(name="default", gating="softmax"),
    "capacity-sigmoid-shared": dict(name="default", gating="sigmoid", shared=True),
}
H = 32


def build(moe, FeedForwardConfig, name, gating, shared=False, normalize=None, bias_gamma=None):
    router = moe.MoERouterConfig(top_k=2, gating_function=gating, normalize_expert_weights=normalize,
                                 bias_gamma=bias_gamma)
    cfg = moe.MoEConfig(name=name, num_experts=6, hidden_size=48, router=router, z_loss_weight=1e-3,
                        capacity_factor=1.25 if name == "default" else None,
                        shared_mlp=FeedForwardConfig(hidden_size=40, bias=False) if shared else None)
    torch.manual_seed(0)
    block = cfg.build(H)
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0, 0.1)
    return block


def _close(a: torch.Tensor, b: torch.Tensor, tol: float) -> bool:
    return torch.allclose(a, b, atol=tol, rtol=tol)


def check(moe, FeedForwardConfig, label: str, kwargs: dict) -> dict:
    import kernel_moe
    from kernel_moe import FusedMoE, KernelConfig

    block = build(moe, FeedForwardConfig, **kwargs)
    original = copy.deepcopy(block)
    model = nn.Sequential(nn.LayerNorm(H), block)
    _, report = kernel_moe.optimize(model, KernelConfig.for_moe(), return_report=True)
    result = {"swapped": isinstance(model[1], FusedMoE), "records": len(report.swapped) + len(report.skipped),
              "details": report.swapped[0].details if report.swapped else None,
              "reason": report.skipped[0].reason if report.skipped else None}
    if not result["swapped"]:
        return result
    layer = model[1]
    spec = layer.spec
    result["views"] = spec.router.flat
    x = torch.randn(3, 5, H, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        result["eval_fp32"] = _close(layer(x), original(x), 1e-5)
    # eval-mode gradients (inputs and every parameter), fused vs original
    xs = [x.clone().requires_grad_() for _ in range(2)]
    cot = torch.randn(3, 5, H, generator=torch.Generator().manual_seed(2))
    (layer(xs[0]) * cot).sum().backward()
    (original(xs[1]) * cot).sum().backward()
    ours = dict(layer.named_parameters())
    result["eval_grads"] = _close(xs[0].grad, xs[1].grad, 1e-4) and all(
        _close(ours[n].grad, p.grad, 1e-4) for n, p in original.named_parameters())
    # training: the original runs, keeps its aux losses and its routing counts
    layer.train()
    original.train()
    before = layer.router.batch_size_per_expert.clone()
    with torch.no_grad():
        result["train_fp32"] = _close(layer(x), original(x), 1e-5)
    out = layer(x.clone().requires_grad_())
    result["train_state_updated"] = bool((layer.router.batch_size_per_expert != before).any()) or out is None
    result["training_fallback"] = spec.training_fallback
    result["gradient_fallback"] = spec.gradient_fallback
    return result


def main() -> None:
    moe, FeedForwardConfig = import_olmo_moe()
    print(json.dumps({label: check(moe, FeedForwardConfig, label, kwargs) for label, kwargs in CONFIGS.items()}))


if __name__ == "__main__":
    main()

"""The demo: a small Mixtral-style model with random weights, optimized, compiled, checked, timed.

Run with ``python -m kernel_moe demo``. Uses transformers' Mixtral when transformers is
installed (the ``hf`` extra), else an equivalent plain-PyTorch model.
"""

from __future__ import annotations

import copy
import statistics
import sys
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from kernel_moe.config import KernelConfig
from kernel_moe.manager import UnifiedManager


class _Expert(nn.Module):
    def __init__(self, hidden: int, inter: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(hidden, inter, bias=False)
        self.w3 = nn.Linear(hidden, inter, bias=False)
        self.w2 = nn.Linear(inter, hidden, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class PlainMixtralBlock(nn.Module):
    """A Mixtral-style sparse MoE block written as tutorials do (per-expert loop)."""

    def __init__(self, hidden: int, inter: int, num_experts: int, top_k: int) -> None:
        super().__init__()
        self.top_k = top_k
        self.gate = nn.Linear(hidden, num_experts, bias=False)
        self.experts = nn.ModuleList(_Expert(hidden, inter) for _ in range(num_experts))

    def forward(self, x):
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        probs = self.gate(x).float().softmax(dim=-1)
        weights, ids = probs.topk(self.top_k, dim=-1)
        weights = (weights / weights.sum(dim=-1, keepdim=True)).to(x.dtype)
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            tok, slot = torch.where(ids == e)
            if tok.numel():
                out.index_add_(0, tok, expert(x[tok]) * weights[tok, slot, None])
        return out.reshape(shape)


class PlainMixtralLM(nn.Module):
    """Embedding -> [norm -> MoE block + residual] x layers -> LM head (attention omitted)."""

    def __init__(self, vocab: int, hidden: int, inter: int, layers: int, num_experts: int, top_k: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, hidden)
        self.norms = nn.ModuleList(nn.LayerNorm(hidden) for _ in range(layers))
        self.blocks = nn.ModuleList(PlainMixtralBlock(hidden, inter, num_experts, top_k) for _ in range(layers))
        self.head = nn.Linear(hidden, vocab, bias=False)

    def forward(self, input_ids):
        h = self.embed(input_ids)
        for norm, block in zip(self.norms, self.blocks):
            h = h + block(norm(h))
        return self.head(h)


def build_model(hidden=256, inter=512, layers=2, num_experts=8, top_k=2, vocab=512, seed=0) -> tuple[nn.Module, str]:
    torch.manual_seed(seed)
    try:
        from transformers import MixtralConfig, MixtralForCausalLM
    except ImportError:
        return PlainMixtralLM(vocab, hidden, inter, layers, num_experts, top_k).eval(), "plain PyTorch Mixtral-style"
    cfg = MixtralConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, num_local_experts=num_experts,
        num_experts_per_tok=top_k, max_position_embeddings=1024,
    )
    cfg._attn_implementation = "sdpa"
    model = MixtralForCausalLM(cfg).eval()
    impl = getattr(model.config, "_experts_implementation", None) or "eager"
    return model, f"transformers MixtralForCausalLM (experts implementation: {impl})"


def _median_time(fn: Callable[[], object], min_time: float = 1.0, min_reps: int = 5) -> float:
    fn()
    samples: list[float] = []
    start = time.perf_counter()
    while len(samples) < min_reps or time.perf_counter() - start < min_time:
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples)


def _logits(out):
    return out.logits if hasattr(out, "logits") else out


def run_demo(batch: int = 4, seq: int = 256, out=sys.stdout) -> dict:
    """Build, optimize, compile, check and time; prints a short report and returns the figures."""
    model, kind = build_model()
    original = copy.deepcopy(model)
    ids = torch.randint(0, 512, (batch, seq), generator=torch.Generator().manual_seed(1))
    manager = UnifiedManager(KernelConfig.for_moe(top_k=2))
    report = manager.optimize(model)
    print(f"model: {kind}, {batch}x{seq} tokens", file=out)
    print(report, file=out)
    compiled = torch.compile(model, fullgraph=True)
    with torch.no_grad():
        ref = _logits(original(ids))
        got_eager = _logits(model(ids))
        got_compiled = _logits(compiled(ids))
        err_eager = (got_eager - ref).abs().max().item()
        err_compiled = (got_compiled - ref).abs().max().item()
        ok = torch.allclose(got_eager, ref, atol=1e-4, rtol=1e-4) and torch.allclose(
            got_compiled, ref, atol=1e-4, rtol=1e-4)
        print(f"\nequivalence (fp32, atol/rtol 1e-4): {'OK' if ok else 'MISMATCH'} "
              f"(max |diff| eager {err_eager:.2e}, compiled {err_compiled:.2e})", file=out)
        t_orig = _median_time(lambda: original(ids))
        t_opt = _median_time(lambda: model(ids))
        t_comp = _median_time(lambda: compiled(ids))
    print(f"\nmedian forward time, same run ({torch.get_num_threads()} CPU threads):", file=out)
    print(f"  original            {t_orig * 1e3:9.2f} ms   1.00x", file=out)
    print(f"  optimized           {t_opt * 1e3:9.2f} ms   {t_orig / t_opt:.2f}x", file=out)
    print(f"  optimized+compiled  {t_comp * 1e3:9.2f} ms   {t_orig / t_comp:.2f}x", file=out)
    if not ok:
        raise SystemExit("demo failed: the optimized model does not match the original")
    return {"ok": ok, "speedup": t_orig / t_opt, "speedup_compiled": t_orig / t_comp, "report": report.to_dict()}

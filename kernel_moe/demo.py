"""The demo: a small Mixtral-style model with random weights, optimized, compiled, checked, timed.

Run with ``python -m kernel_moe demo``. Uses transformers' Mixtral when transformers is
installed (the ``hf`` extra), else an equivalent plain-PyTorch model.
"""

from __future__ import annotations

import collections
import copy
import random
import statistics
import sys
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

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


class KernelOpCounter(TorchDispatchMode):
    """Counts calls of ``kernel_moe::`` custom ops while active. A dispatch mode sends even plain
    eager inference through the dispatcher, so every call of our ops is seen."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "kernel_moe":
            self.calls[f"kernel_moe::{func.__name__.split('.')[0]}"] += 1
        return func(*args, **(kwargs or {}))


def kernel_op_calls(fn: Callable[[], object]) -> dict[str, int]:
    """How many times each ``kernel_moe::`` custom op ran during one ``fn()``."""
    with KernelOpCounter() as counter:
        fn()
    return dict(counter.calls)


def timed_rounds(fns: dict[str, Callable[[], object]], rounds: int = 7,
                 min_time: float = 0.15) -> dict[str, list[float]]:
    """Median seconds per call of each fn in each of ``rounds`` rounds. Every round runs all the
    fns, in a fresh random order, for at least ``min_time`` each: load from other processes on a
    shared machine falls on neighbouring measurements alike, so per-round ratios are steadier
    than ratios of whole-run medians."""
    order = list(fns)
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    rng = random.Random(0)
    for _ in range(rounds):
        rng.shuffle(order)
        for name in order:
            samples: list[float] = []
            start = time.perf_counter()
            while len(samples) < 3 or time.perf_counter() - start < min_time:
                t0 = time.perf_counter()
                fns[name]()
                samples.append(time.perf_counter() - t0)
            times[name].append(statistics.median(samples))
    return times


def median_ratio(slow: list[float], fast: list[float]) -> float:
    """The median over rounds of slow / fast (a speedup when ``slow`` is the reference)."""
    return statistics.median(s / f for s, f in zip(slow, fast))


def _logits(out):
    return out.logits if hasattr(out, "logits") else out


def run_demo(batch: int = 4, seq: int = 256, out=sys.stdout, rounds: int = 7) -> dict:
    """Build, optimize, compile, check and time; prints a short report and returns the figures:
    ``ok`` (eager and compiled outputs match the original), ``kernel_op_calls`` (our custom ops
    run by one optimized forward, counted), ``speedup`` / ``speedup_compiled`` (median over
    ``rounds`` interleaved rounds of original time / optimized time) and the report."""
    model, kind = build_model()
    original = copy.deepcopy(model)
    ids = torch.randint(0, 512, (batch, seq), generator=torch.Generator().manual_seed(1))
    manager = UnifiedManager(KernelConfig.for_moe(top_k=2))
    model = manager.optimize(model)
    report = manager.report
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
        op_calls = kernel_op_calls(lambda: model(ids))
        print("custom ops in one optimized forward: "
              + (", ".join(f"{name} x{n}" for name, n in sorted(op_calls.items())) or "none"), file=out)
        times = timed_rounds({"original": lambda: original(ids), "optimized": lambda: model(ids),
                              "optimized+compiled": lambda: compiled(ids)}, rounds=rounds)
    speedups = {name: median_ratio(times["original"], t) for name, t in times.items()}
    print(f"\nmedian forward time over {rounds} interleaved rounds ({torch.get_num_threads()} CPU threads), "
          "speedup = median of per-round ratios:", file=out)
    for name, t in times.items():
        print(f"  {name:<19} {statistics.median(t) * 1e3:9.2f} ms   {speedups[name]:.2f}x", file=out)
    if not ok:
        raise SystemExit("demo failed: the optimized model does not match the original")
    return {"ok": ok, "kernel_op_calls": op_calls, "speedup": speedups["optimized"],
            "speedup_compiled": speedups["optimized+compiled"], "report": report.to_dict()}

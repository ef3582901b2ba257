"""Pieces shared by the CPU benchmarks of real-size MoE layers: the layer shapes, the machine's
read bandwidth measured in the run, prepared routings, random weights without a second copy,
and interleaved timing with a fresh routing per call.

Legend: T tokens, H hidden size, I expert intermediate size, E experts, K experts per token.

Why these pieces: a real-size layer's experts do not fit in the caches, so decode is judged by
the distinct active expert bytes read per second as a fraction of the read bandwidth the
machine shows *in the same run* (a shared machine's bandwidth moves from hour to hour). Every
timed call routes a different top-k (cycled from prepared routings) so that a call does not
find the experts of the previous call in the cache, as in a real model where each token picks
its own experts.
"""

from __future__ import annotations

import math
import random
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

READ_BYTES = 2**30  # each read-bandwidth kernel reads 1 GiB once per repetition
READ_REPS = 5
ROUTINGS = 16  # prepared routings cycled over the calls


@dataclass(frozen=True)
class LayerShape:
    """One MoE layer's size: hidden H, expert intermediate I, experts E, top-k K."""

    name: str
    hidden: int
    intermediate: int
    experts: int
    top_k: int
    note: str

    def expert_bytes(self, dtype: torch.dtype) -> int:
        """Bytes of one expert's weights (gate, up and down projections)."""
        return 3 * self.hidden * self.intermediate * torch.empty((), dtype=dtype).element_size()

    def with_experts(self, experts: int) -> LayerShape:
        """The same layer holding ``experts`` experts (a smaller copy for a smaller machine)."""
        if not 1 <= self.top_k <= experts:
            raise ValueError(f"experts={experts} for layer {self.name!r}; allowed: an int >= top_k={self.top_k}")
        return LayerShape(self.name, self.hidden, self.intermediate, experts, self.top_k,
                          f"{self.note}; {experts} experts held")


REAL_SIZE_LAYERS = {
    "mixtral": LayerShape("mixtral", 4096, 14336, 8, 2, "Mixtral-8x7B size"),
    "qwen3": LayerShape("qwen3", 2048, 768, 128, 8, "Qwen3-30B-A3B size"),
    # DeepSeek-V3 has 256 routed experts of this size per layer; 64 of them keep one copy at 5.6 GB
    # (bf16), as on a machine that holds a quarter of the experts (expert parallelism over 4)
    "deepseek": LayerShape("deepseek", 7168, 2048, 64, 8, "DeepSeek-V3 expert size, 64 of its 256 experts"),
}


def _best_rate(fn: Callable[[], object], nbytes: int) -> float:
    """Bytes per second of the fastest of READ_REPS calls of ``fn`` (which reads ``nbytes``)."""
    fn()
    best = math.inf
    for _ in range(READ_REPS):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return nbytes / best


def read_rates(nbytes: int = READ_BYTES) -> dict[str, float]:
    """The machine's read bandwidth now, in bytes per second, by three kernels that each read
    ``nbytes`` (1 GiB: far beyond the caches) once, best of 5 each: ``fp32_sum`` (``sum()`` of
    fp32), ``bf16_sum`` (``sum()`` of bf16, fp32 accumulation) and ``bf16_gemv`` (a [R, 4096]
    bf16 matrix times a vector: the read pattern of a dense layer at decode). Each is a lower
    bound of what the memory can deliver, so ``best`` (their maximum) is the bound a layer's
    rate is judged against."""
    if nbytes < 2**15 or nbytes % 2**13:
        raise ValueError(f"nbytes={nbytes}; allowed: a multiple of 8192, at least 32768")
    rates = {}
    x = torch.ones(nbytes // 4)
    rates["fp32_sum"] = _best_rate(x.sum, nbytes)
    del x
    x = torch.ones(nbytes // 2, dtype=torch.bfloat16)
    rates["bf16_sum"] = _best_rate(x.sum, nbytes)
    w_RC = x.view(-1, 4096)
    v_C = torch.ones(4096, dtype=torch.bfloat16)
    rates["bf16_gemv"] = _best_rate(lambda: torch.mv(w_RC, v_C), nbytes)
    del x, w_RC
    rates["best"] = max(rates.values())
    return rates


def prepared_routings(T: int, shape: LayerShape, dtype: torch.dtype, seed: int = 0) -> list:
    """ROUTINGS random top-k routings [(weights_TK in ``dtype``, ids_TK int64)], softmax
    probabilities of random logits, renormalised over the K chosen experts."""
    g = torch.Generator().manual_seed(seed * 100_003 + T)
    out = []
    for _ in range(ROUTINGS):
        w_TK, ids_TK = torch.softmax(torch.randn(T, shape.experts, generator=g), -1).topk(shape.top_k, -1)
        out.append(((w_TK / w_TK.sum(-1, keepdim=True)).to(dtype), ids_TK))
    return out


def mean_distinct_experts(routings: list) -> float:
    """Mean number of distinct experts a call of these routings reads."""
    return statistics.mean(len(torch.unique(ids)) for _, ids in routings)


def fill_random_(module: nn.Module, seed: int, std: float = 0.02) -> nn.Module:
    """Fill every parameter of ``module`` in place with N(0, std) (in its own dtype, 4M values
    at a time, so no fp32 copy of a large weight is ever made)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            for block in p.view(-1).split(2**22):
                block.copy_(torch.randn(block.numel(), generator=g).mul_(std))
    return module


def materialize(build: Callable[[], nn.Module], dtype: torch.dtype, seed: int) -> nn.Module:
    """``build()`` run on the meta device, then given uninitialised CPU storage in ``dtype``
    and random weights: a large module is allocated once, in its final dtype. Its parameters do
    not require grad (inference; optimize() would otherwise also prove the weights' gradients,
    holding two gradient-sized copies of the largest expert weight at once)."""
    with torch.device("meta"):
        module = build()
    module = module.to(dtype).to_empty(device="cpu")
    return fill_random_(module, seed).eval().requires_grad_(False)


def available_memory_bytes() -> int | None:
    """MemAvailable of /proc/meminfo in bytes (None where that file does not exist)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def time_cycled(calls: dict[str, Callable[[int], object]], min_time: float, min_reps: int) -> dict[str, float]:
    """Median seconds per call of each ``calls[name](i)`` (``i`` counts that name's calls, so a
    call can pick routing ``i % ROUTINGS``). Calls are interleaved, in a freshly shuffled order
    every round, so that load from other processes hits every implementation alike; one
    untimed call each first. Stops after ``min_reps`` rounds once ``min_time`` seconds passed."""
    counts = dict.fromkeys(calls, 0)
    with torch.no_grad():
        for name, fn in calls.items():
            fn(0)
            counts[name] = 1
        samples: dict[str, list[float]] = {name: [] for name in calls}
        order = list(calls)
        rng = random.Random(0)
        start = time.perf_counter()
        while min(len(s) for s in samples.values()) < min_reps or time.perf_counter() - start < min_time:
            rng.shuffle(order)
            for name in order:
                t0 = time.perf_counter()
                calls[name](counts[name])
                samples[name].append(time.perf_counter() - t0)
                counts[name] += 1
    return {name: statistics.median(s) for name, s in samples.items()}

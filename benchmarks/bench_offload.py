"""Expert offloading on CPU: eviction policies on routing traces, decode tokens/s and hit rate
against slot count (prefetch on and off), and peak resident memory of a model whose experts are
four times the slots' RAM.

    python benchmarks/bench_offload.py eviction [--tokens 4000] [--layers 8]
    python benchmarks/bench_offload.py speed [--layers 3] [--tokens 48] [--slots 8 16 32 64 128] [--repeats 3]
    python benchmarks/bench_offload.py memory

Routing traces come from real-size random routers (Qwen3-30B-A3B size: H 2048, I 768, E 128, top-8,
bf16) applied to a synthetic hidden-state stream ``x_t = mu + z_t``, ``z_t = a z_(t-1) +
sqrt(1 - a^2) eps_t`` (a = 0.6): the shared mean ``mu`` skews expert popularity and the AR(1) part
gives consecutive tokens related routing. Random weights: no real model's routing statistics.

``speed`` stacks ``--layers`` transformers Qwen3-MoE sparse blocks (residual + RMSNorm between), swaps
them, and decodes one token at a time: first with every expert in RAM, then offloaded to a file
(``offload_experts="disk"``) at each slot count, prefetch on and off. The file was just written, so
its pages sit in the kernel's page cache: the figures are the cost of copying experts into slots,
not of a disk. ``memory`` runs in a subprocess and reads VmHWM from /proc (reset after the model is
built) around a greedy ``generate()`` of a Qwen3-MoE model; it checks the tokens against the model
before offloading.
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import gc
import json
import math
import os
import subprocess
import sys
import time

import torch
from torch import nn

import kernel_moe
from kernel_moe import KernelConfig
from kernel_moe.layers.offload import OffloadedExperts, link_prefetch, offload_layer, offload_stats
from kernel_moe.layers.slot_cache import SlotCache
from kernel_moe.routing.topk import TopKRouting, route

H, I, E, K = 2048, 768, 128, 8
AR, MEAN = 0.6, 1.0


def hidden_stream(tokens: int, hidden: int, seed: int = 0, mean: float = MEAN) -> torch.Tensor:
    """[tokens, hidden] fp32: a shared mean (scaled by ``mean``) plus an AR(1) process (see the module docstring)."""
    g = torch.Generator().manual_seed(seed)
    mu = torch.randn(hidden, generator=g) * mean
    z = torch.randn(hidden, generator=g)
    out = torch.empty(tokens, hidden)
    for t in range(tokens):
        z = AR * z + math.sqrt(1 - AR * AR) * torch.randn(hidden, generator=g)
        out[t] = mu + z
    return out


def record_traces(tokens: int, layers: int, mean: float = MEAN) -> list[list[list[int]]]:
    """Per layer, the expert ids each decode step routes to (softmax top-8 of a random router)."""
    x_TH = hidden_stream(tokens, H, mean=mean)
    routing = TopKRouting(num_experts=E, top_k=K, scoring="softmax", renormalize=True)
    traces = []
    for layer in range(layers):
        w_EH = torch.randn(E, H, generator=torch.Generator().manual_seed(100 + layer)) / math.sqrt(H)
        _, ids_TK = route(x_TH @ w_EH.T, routing)
        traces.append(ids_TK.tolist())
    return traces


def replay(trace: list[list[int]], slots: int, policy: str, decay: float) -> float:
    """Hit rate of a slot cache over a trace (one step per token)."""
    cache = SlotCache(E, slots, policy, decay)
    hits = needed = 0
    for ids in trace:
        distinct = sorted(set(ids))
        needed += len(distinct)
        hits += sum(cache.resident(e) for e in distinct)
        cache.plan(distinct)
    return hits / needed


def bench_eviction(args) -> dict:
    traces = record_traces(args.tokens, args.layers, args.skew)
    counts = torch.bincount(torch.tensor(traces[0]).reshape(-1), minlength=E).sort(descending=True).values
    top = counts[: E // 8].sum().item() / counts.sum().item()
    print(f"traces: {args.layers} layers x {args.tokens} tokens, top-8 of {E}, skew {args.skew}; the 16 most used "
          "experts of layer 0 "
          f"take {top:.0%} of its slots")
    policies = [("lru", 0.0)] + [("frequency", d) for d in (0.8, 0.9, 0.95, 0.99, 0.999)]
    rows = {}
    print("slots  " + "  ".join(f"{p}{'' if p == 'lru' else f'({d})':>8}" for p, d in policies))
    for slots in args.slots:
        rates = [sum(replay(tr, slots, p, d or 1.0) for tr in traces) / len(traces) for p, d in policies]
        rows[slots] = {f"{p}({d})" if p != "lru" else p: r for (p, d), r in zip(policies, rates)}
        print(f"{slots:5d}  " + "  ".join(f"{r:17.1%}" for r in rates))
    return {"top16_share": top, "hit_rate": rows}


class Stack(nn.Module):
    """``layers`` x [RMSNorm -> Qwen3-MoE sparse block + residual] at real size (bf16)."""

    def __init__(self, layers: int) -> None:
        super().__init__()
        from transformers import Qwen3MoeConfig
        from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeRMSNorm, Qwen3MoeSparseMoeBlock

        cfg = Qwen3MoeConfig(hidden_size=H, moe_intermediate_size=I, num_experts=E, num_experts_per_tok=K,
                             norm_topk_prob=True)
        default = torch.get_default_dtype()
        torch.set_default_dtype(torch.bfloat16)  # built in bf16: no fp32 copy of the experts ever exists
        try:
            self.norms = nn.ModuleList(Qwen3MoeRMSNorm(H) for _ in range(layers))
            self.blocks = nn.ModuleList(Qwen3MoeSparseMoeBlock(cfg) for _ in range(layers))
        finally:
            torch.set_default_dtype(default)
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for b in self.blocks:
                b.gate.weight.normal_(0, 1 / math.sqrt(H), generator=g)
                b.experts.gate_up_proj.normal_(0, 1 / math.sqrt(H), generator=g)
                b.experts.down_proj.normal_(0, 1 / math.sqrt(I), generator=g)
        self.eval()

    def forward(self, h):
        for norm, block in zip(self.norms, self.blocks):
            h = h + block(norm(h))
        return h


def _decode(model: nn.Module, x_NH: torch.Tensor, warmup: int) -> tuple[float, float]:
    """(tokens per second, CPU seconds per token of all the process's threads) of one-token steps
    over x_NH after ``warmup`` steps. CPU time is the steadier figure on a loaded machine (it
    counts the work, including the copies' kernel time, not the waits for a core)."""
    with torch.no_grad():
        for t in range(warmup):
            model(x_NH[t].view(1, 1, -1))
        for s in offload_stats(model).values():
            s.reset()
        start, cpu = time.perf_counter(), time.process_time()
        for t in range(warmup, x_NH.shape[0]):
            model(x_NH[t].view(1, 1, -1))
        n = x_NH.shape[0] - warmup
        return n / (time.perf_counter() - start), (time.process_time() - cpu) / n


def _reslot(model: Stack, config: KernelConfig) -> None:
    """Give every offloaded block fresh slots over the same store (no file rewritten)."""
    for block in model.blocks:
        old = block.offloaded_experts
        block.offloaded_experts = OffloadedExperts(old.store, min(config.expert_slots, E), torch.device("cpu"), config,
                                                   old.how)
    link_prefetch(list(model.blocks))
    gc.collect()


def bench_speed(args) -> dict:
    """Decode tokens/s: every expert in RAM against the offloaded copy of the same model at each slot
    count, prefetch off and on, interleaved and repeated (best of ``--repeats``: the machine is shared)."""
    torch.manual_seed(0)
    in_ram = kernel_moe.optimize(Stack(args.layers), KernelConfig.for_moe(verify=False))  # proven in the tests
    model = copy.deepcopy(in_ram)
    x_NH = (hidden_stream(args.warmup + args.tokens, H, seed=7) * 0.5).to(torch.bfloat16)
    base = KernelConfig.for_moe(offload_experts="disk", expert_slots=max(args.slots))
    for i, block in enumerate(model.blocks):
        offload_layer(block, base, f"blocks.{i}")
    gc.collect()
    best: dict[str, float] = {}  # key -> best tokens/s
    cpu: dict[str, float] = {}  # key -> least CPU seconds per token
    stats: dict[str, dict] = {}

    def keep(key: str, measured: tuple[float, float]) -> None:
        best[key] = max(best.get(key, 0.0), measured[0])
        cpu[key] = min(cpu.get(key, math.inf), measured[1])

    for _ in range(args.repeats):
        keep("in_ram", _decode(in_ram, x_NH, args.warmup))
        for slots in args.slots:
            for prefetch in (False, True):
                key = f"{slots}/{'on' if prefetch else 'off'}"
                _reslot(model, base.replace(expert_slots=slots, offload_prefetch=prefetch))
                keep(key, _decode(model, x_NH, args.warmup))
                stats[key] = offload_stats(model)["total"].to_dict()
    print(f"all experts in RAM: {best['in_ram']:.2f} tokens/s, {cpu['in_ram'] * 1e3:.0f} CPU ms/token "
          f"(best of {args.repeats})")
    print("slots  prefetch  tokens/s  vs RAM  CPU ms/token  vs RAM  hit rate  prefetch acc.  prediction acc.  "
          "MiB moved/token")
    for key, s in stats.items():
        slots, prefetch = key.split("/")
        print(f"{int(slots):5d}  {prefetch:8s}  {best[key]:8.2f}  {best[key] / best['in_ram']:6.2f}  "
              f"{cpu[key] * 1e3:12.0f}  {cpu[key] / cpu['in_ram']:6.2f}  {s['hit_rate']:8.1%}  "
              f"{s['prefetch_accuracy']:13.1%}  {s['prediction_accuracy']:15.1%}  {s['bytes_per_token'] / 2**20:15.1f}")
    return {"tokens_per_s": best, "cpu_s_per_token": cpu, "stats": stats}


def _status(field: str) -> int:
    """A VmHWM / VmRSS line of /proc/self/status in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def _trim() -> None:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


def memory_child(scale: int) -> dict:
    """Build a Qwen3-MoE model, offload with a quarter of the experts in slots, and measure peak RSS
    over a greedy generate() against the slots + non-expert weights (above the process's RSS
    before the model existed)."""
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    torch.manual_seed(0)
    tiny = Qwen3MoeForCausalLM(Qwen3MoeConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                              num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                                              moe_intermediate_size=32, num_experts=4, num_experts_per_tok=2))
    tiny = kernel_moe.optimize(tiny.eval(), KernelConfig.for_moe(offload_experts="disk", expert_slots=1))
    with torch.no_grad():  # warm the code paths (native kernels, prefetch thread) before the baseline
        tiny.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=3, do_sample=False)
    del tiny
    _trim()
    baseline = _status("VmRSS")
    cfg = Qwen3MoeConfig(vocab_size=512, hidden_size=256 * scale, intermediate_size=512, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=64, moe_intermediate_size=256 * scale,
                         num_experts=32, num_experts_per_tok=4, max_position_embeddings=256)
    model = Qwen3MoeForCausalLM(cfg).eval()
    expert_bytes = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if ".experts." in n)
    other_bytes = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if ".experts." not in n)
    prompt = torch.randint(0, 512, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = model.generate(prompt, max_new_tokens=24, do_sample=False)
    model = kernel_moe.optimize(model, KernelConfig.for_moe(offload_experts="disk", expert_slots=8))
    slot_bytes = sum(m.offloaded_experts.nbytes() for m in model.modules()
                     if getattr(m, "offloaded_experts", None) is not None)
    _trim()
    after_offload = _status("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    with torch.no_grad():
        got = model.generate(prompt, max_new_tokens=24, do_sample=False)
    peak = _status("VmHWM") - baseline
    allowed = 1.1 * (slot_bytes + other_bytes)
    stats = offload_stats(model)["total"]
    return {"expert_bytes": expert_bytes, "slot_bytes": slot_bytes, "non_expert_bytes": other_bytes,
            "baseline_rss": baseline, "rss_after_offload": after_offload - baseline, "peak_rss": peak,
            "allowed": allowed, "within": peak <= allowed, "same_tokens": bool(torch.equal(got, want)),
            "hit_rate": stats.hit_rate, "bytes_per_token": stats.bytes_per_token}


def bench_memory(args) -> dict:
    code = ("import json, sys; sys.path.insert(0, 'benchmarks'); import bench_offload as b; "
            f"print('RESULT', json.dumps(b.memory_child({args.scale})))")
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=1200)
    line = next((ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if line is None:
        raise RuntimeError(out.stdout[-2000:] + out.stderr[-4000:])
    r = json.loads(line[len("RESULT "):])
    mib = lambda b: f"{b / 2**20:.0f} MiB"  # noqa: E731
    print(f"experts {mib(r['expert_bytes'])} = {r['expert_bytes'] / r['slot_bytes']:.1f}x the slots "
          f"({mib(r['slot_bytes'])}); non-expert weights {mib(r['non_expert_bytes'])}")
    print(f"RSS above the baseline: after offload {mib(r['rss_after_offload'])}, peak during generate "
          f"{mib(r['peak_rss'])}, allowed {mib(r['allowed'])} (slots + non-expert + 10%): "
          f"{'within' if r['within'] else 'OVER'}; same tokens: {r['same_tokens']}; hit rate {r['hit_rate']:.1%}")
    return r


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=("eviction", "speed", "memory"))
    parser.add_argument("--tokens", type=int, default=None)
    parser.add_argument("--warmup", type=int, default=24)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--layers", type=int, default=None)
    parser.add_argument("--slots", type=int, nargs="+", default=None)
    parser.add_argument("--skew", type=float, default=MEAN, help="eviction: scale of the shared mean")
    parser.add_argument("--scale", type=int, default=4, help="memory: H = I = 256 * scale")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, load average {os.getloadavg()}")
    if args.what == "eviction":
        args.tokens, args.layers = args.tokens or 4000, args.layers or 8
        args.slots = args.slots or [8, 16, 24, 32, 48, 64, 96]
        result = bench_eviction(args)
    elif args.what == "speed":
        args.tokens, args.layers = args.tokens or 48, args.layers or 3
        args.slots = args.slots or [8, 16, 32, 64, 128]
        result = bench_speed(args)
    else:
        result = bench_memory(args)
    print(f"load average after: {os.getloadavg()}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()

"""CPU benchmark of end-to-end generation: tokens per second of ``generate()`` (greedy) on a
real-size two-layer Qwen3-MoE-shaped model (random weights), ours against transformers' eager
and grouped_mm experts implementations, in one process.

    python benchmarks/bench_cpu_generate.py [--new-tokens 32] [--prompt 16] [--rounds 3] [--vocab 32768]
        [--compile] [--no-verify] [--json OUT] [--smoke]

Model (``transformers.Qwen3MoeConfig``, bf16): hidden 2048, 128 experts of intermediate 768,
top-8 (normalised), 2 decoder layers, 32 query / 4 key-value heads of 128, vocabulary reduced
from Qwen3's 151936 to ``--vocab`` (32768 by default: the embedding and LM head are then 0.27 GB
instead of 1.2 GB and the layers' experts, 2.4 GB, dominate as they do per layer in the real
model). One copy of the weights: the transformers model switches implementation with
``set_experts_implementation``, and ours is a copy of the model sharing every Parameter, swapped
by ``kernel_moe.optimize`` (then ``torch.compile`` of its forward with ``--compile``).

Each round runs every implementation (in a shuffled order) once: ``generate`` of N new tokens
from the same prompt (batch 1, greedy, no early stop), with a streamer that clocks each token as
``generate`` hands it over. Reported medians: ``tok/s`` = N / the call's time (prefill included),
``decode tok/s`` = 1 / the median time between successive new tokens (one decode step each: the
prefill's time never enters it), ``prefill ms`` = the time to the first new token.

``no_moe`` is the same model with every MoE block replaced by one that returns zeros: the time of
everything else in a decode step (attention, norms, the output projection, ``generate`` itself).
No MoE implementation can make a step faster than that, so grouped_mm's step time over no_moe's is
the largest decode speedup over grouped_mm that any MoE implementation can give in this model
(printed as the bound). Whether each implementation's tokens equal eager's is printed (bf16
rounding can flip a near-tie of random weights; the first differing step is printed then).
"""

from __future__ import annotations

import argparse
import copy
import json
import random
import statistics
import time

import torch

import kernel_moe

IMPLS = ["eager", "grouped_mm", "ours"]


def build_model(vocab: int, smoke: bool):
    """The two-layer Qwen3-MoE-shaped causal LM in bf16, random weights (initializer_range 0.02)."""
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    if smoke:
        sizes = dict(hidden_size=64, moe_intermediate_size=32, intermediate_size=128, num_experts=16,
                     num_experts_per_tok=4, num_attention_heads=4, num_key_value_heads=2, head_dim=16)
    else:
        sizes = dict(hidden_size=2048, moe_intermediate_size=768, intermediate_size=6144, num_experts=128,
                     num_experts_per_tok=8, num_attention_heads=32, num_key_value_heads=4, head_dim=128)
    config = Qwen3MoeConfig(vocab_size=vocab, num_hidden_layers=2, norm_topk_prob=True, tie_word_embeddings=False,
                            max_position_embeddings=4096, **sizes)
    torch.manual_seed(0)
    model = Qwen3MoeForCausalLM._from_config(config, dtype=torch.bfloat16, experts_implementation="eager")
    # inference: without grad, optimize() proves outputs and input gradients only (with grad it would
    # also hold the original's and the fused layer's gradients of the largest expert weight)
    return model.eval().requires_grad_(False)


def ours_model(model, compile_forward: bool, verify: bool = True):
    """A copy of ``model`` sharing every Parameter and buffer, its MoE blocks swapped by optimize()."""
    shared = {id(t): t for t in (*model.parameters(), *model.buffers())}
    ours = copy.deepcopy(model, memo=shared)
    manager = kernel_moe.UnifiedManager(kernel_moe.KernelConfig.for_moe(top_k=model.config.num_experts_per_tok,
                                                                          verify=verify))
    ours = manager.optimize(ours)
    swapped = sum(isinstance(m, (kernel_moe.FusedMoE, kernel_moe.FusedExperts)) for m in ours.modules())
    if swapped != model.config.num_hidden_layers:
        raise RuntimeError(f"optimize() swapped {swapped} MoE modules, expected {model.config.num_hidden_layers}")
    if compile_forward:
        ours.forward = torch.compile(ours.forward, dynamic=True)
    return ours


class _ZeroMoE(torch.nn.Module):
    """Stands in for an MoE block in the no_moe model: zeros of the block's output shape."""

    def forward(self, hidden_states, *args, **kwargs):
        return torch.zeros_like(hidden_states)


def no_moe_model(model):
    """A copy of ``model`` sharing every Parameter and buffer, its MoE blocks replaced by zeros."""
    shared = {id(t): t for t in (*model.parameters(), *model.buffers())}
    bare = copy.deepcopy(model, memo=shared)
    for layer in bare.model.layers:
        layer.mlp = _ZeroMoE()
    return bare


class StepClock:
    """A ``generate`` streamer that records when each batch of tokens is handed over: the prompt
    first, then every new token."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def put(self, value) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass

    def steps(self) -> list[float]:
        """Seconds between successive new tokens (the decode steps; the prefill is not one)."""
        return [b - a for a, b in zip(self.times[1:], self.times[2:])]


def _generate(model, prompt, new_tokens: int, streamer=None):
    return model.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                          pad_token_id=0, eos_token_id=None, streamer=streamer)


def _runner(model, variant, impl: str):
    """generate(prompt, n, streamer) with ``impl``: transformers' model set to eager / grouped_mm, or
    ``variant`` (ours, or the no_moe model)."""
    def run(prompt, n, streamer=None):
        if impl in ("eager", "grouped_mm"):
            model.set_experts_implementation(impl)
            return _generate(model, prompt, n, streamer)
        return _generate(variant, prompt, n, streamer)
    return run


def first_difference(a: torch.Tensor, b: torch.Tensor) -> int | None:
    """Index of the first generated position where ``a`` and ``b`` differ (None when equal)."""
    diff = (a != b).flatten().nonzero()
    return None if diff.numel() == 0 else int(diff[0])


def measure(runners: dict, prompt, new_tokens: int, rounds: int) -> tuple[dict, dict]:
    """({impl: {"total": [s per call], "prefill": [s per call], "steps": [s per decode step]}},
    {impl: generated ids of the warm-up call})."""
    samples = {k: {"total": [], "prefill": [], "steps": []} for k in runners}
    tokens = {}
    with torch.no_grad():
        for name, run in runners.items():
            tokens[name] = run(prompt, new_tokens)[:, prompt.shape[1]:]  # warm-up (and compile)
        order = list(runners)
        rng = random.Random(0)
        for _ in range(rounds):
            rng.shuffle(order)
            for name in order:
                clock = StepClock()
                t0 = time.perf_counter()
                runners[name](prompt, new_tokens, clock)
                samples[name]["total"].append(time.perf_counter() - t0)
                samples[name]["prefill"].append(clock.times[1] - t0)
                samples[name]["steps"].extend(clock.steps())
    return samples, tokens


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--prompt", type=int, default=16, help="prompt length (random token ids)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--vocab", type=int, help="vocabulary size (default 32768; 512 with --smoke)")
    ap.add_argument("--compile", action="store_true", help="torch.compile our model's forward")
    ap.add_argument("--no-verify", action="store_true",
                    help="optimize() without its proof by computation (which briefly holds a copy of one layer's experts)")
    ap.add_argument("--smoke", action="store_true", help="a tiny model of the same shape family (tests)")
    ap.add_argument("--json", help="write the figures to this path")
    args = ap.parse_args(argv)
    args.vocab = args.vocab or (512 if args.smoke else 32768)
    for field in ("new_tokens", "prompt", "rounds", "vocab"):
        if getattr(args, field) < (2 if field == "new_tokens" else 1):
            raise SystemExit(f"--{field.replace('_', '-')} {getattr(args, field)}: allowed: an int >= "
                             f"{2 if field == 'new_tokens' else 1}")
    model = build_model(args.vocab, args.smoke)
    ours = ours_model(model, args.compile, verify=not args.no_verify)
    cfg = model.config
    print(f"Qwen3-MoE-shaped model, 2 layers, hidden {cfg.hidden_size}, {cfg.num_experts} experts of "
          f"{cfg.moe_intermediate_size}, top-{cfg.num_experts_per_tok}, vocab {cfg.vocab_size}, bf16, "
          f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f} M parameters; {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}; prompt {args.prompt}, {args.new_tokens} new tokens, greedy, "
          f"medians of {args.rounds} rounds" + ("; ours compiled" if args.compile else ""))
    prompt = torch.randint(1, cfg.vocab_size, (1, args.prompt), generator=torch.Generator().manual_seed(0))
    variants = {"ours": ours, "no_moe": no_moe_model(model)}
    runners = {impl: _runner(model, variants.get(impl), impl) for impl in (*IMPLS, "no_moe")}
    samples, tokens = measure(runners, prompt, args.new_tokens, args.rounds)
    rows = {}
    for name in runners:
        step = statistics.median(samples[name]["steps"])
        diff = None if name == "no_moe" else first_difference(tokens[name], tokens["eager"])
        rows[name] = {"seconds_n": statistics.median(samples[name]["total"]),
                      "seconds_prefill": statistics.median(samples[name]["prefill"]),
                      "seconds_per_step": step, "decode_tokens_per_s": 1.0 / step}
        rows[name]["tokens_per_s"] = args.new_tokens / rows[name]["seconds_n"]
        if name != "no_moe":
            rows[name].update(tokens_equal_eager=diff is None, first_difference=diff)
    print(f"{'impl':11} | {'tok/s':>8} {'decode tok/s':>12} {'step ms':>8} {'prefill ms':>10} | tokens = eager")
    for name, r in rows.items():
        same = ("n/a (no MoE)" if name == "no_moe" else
                "yes" if r["tokens_equal_eager"] else f"no (from step {r['first_difference']})")
        print(f"{name:11} | {r['tokens_per_s']:8.2f} {r['decode_tokens_per_s']:12.2f} {r['seconds_per_step'] * 1e3:8.2f} "
              f"{r['seconds_prefill'] * 1e3:10.1f} | {same}")
    for ref in ("eager", "grouped_mm"):
        ratio = rows["ours"]["decode_tokens_per_s"] / rows[ref]["decode_tokens_per_s"]
        rows["ours"][f"decode_speedup_over_{ref}"] = ratio
        print(f"ours decode tokens/s / {ref}: {ratio:.2f}x")
    outside = rows["no_moe"]["seconds_per_step"]
    bound = rows["grouped_mm"]["seconds_per_step"] / outside
    rows["ours"]["moe_share_of_step"] = 1.0 - outside / rows["ours"]["seconds_per_step"]
    rows["grouped_mm"]["moe_share_of_step"] = 1.0 - outside / rows["grouped_mm"]["seconds_per_step"]
    rows["no_moe"]["bound_over_grouped_mm"] = bound
    print(f"outside the MoE blocks: {outside * 1e3:.2f} ms per step; the MoE blocks take "
          f"{rows['ours']['moe_share_of_step']:.0%} of ours, {rows['grouped_mm']['moe_share_of_step']:.0%} of "
          f"grouped_mm's; bound on any MoE's decode speedup over grouped_mm here: {bound:.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"threads": torch.get_num_threads(), "vocab": cfg.vocab_size, "new_tokens": args.new_tokens,
                       "prompt": args.prompt, "compiled": args.compile, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

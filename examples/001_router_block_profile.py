"""001: a top-k router with capacity factor and jitter, a transformer block whose feed-forward is
an MoE, expert-utilization plots and profiling, on kernel_moe.

    python examples/001_router_block_profile.py [--out DIR]   # full: 76 s
    python examples/001_router_block_profile.py --smoke       # tiny sizes: 39 s
    (times measured on a shared 2-core CPU at load average 8-12; an idle one is faster)

The user's project builds a router (top-k selection, capacity factor, optional jitter), expert
FFNs, an MoE layer combining them, a transformer block that uses the MoE as its feed-forward,
and then benchmarks, plots expert utilization (k=2, capacity factor 1.5) and profiles memory
and time. The same workflow on kernel_moe:

1. the router: ``kernel_moe.moe.OptimizedTopKGating(num_experts=8, top_k=2, capacity_factor=1.5,
   jitter_noise=...)`` returns ``(expert_indices, expert_weights)``; slots over an expert's
   capacity ``ceil(1.5 * T * k / E)`` come back as index -1 (dropped); jitter acts in training only;
2. the block: pre-norm self-attention, then ``kernel_moe.moe.AuxLossFreeMoE(experts=..., gating=...,
   load_balancing="auxiliary_loss")`` as the feed-forward (the fused experts op, trainable);
   two such blocks form a tiny language model, trained briefly on the synthetic ``ClassLM`` task
   of ``_common.py`` so that the router has learnt something to plot;
3. expert utilization: token slots each expert was routed (wanted) and kept under capacity factor
   1.5, for the untrained router of step 1 on skewed inputs (capacity clips the busy experts) and
   for each trained block on validation tokens: ``expert_utilization_k2_cf1.5.png`` in ``--out``;
4. profiling: ``torch.profiler`` on the block (which ops take the time: attention, the
   ``kernel_moe::fused_experts`` op, routing), then ``kernel_moe.bench.MoEBenchmark`` on the block:
   the one-expert-at-a-time definition (``kernel_moe.restore``) vs kernel_moe's fused layer vs
   fused + ``torch.compile``, median time and peak memory, with its charts
   (``throughput.png``, ``speedup.png``) in ``--out``.

Per-stage times of the MoE layer itself (router, gating, dispatch, up, down, combine) come from
``python -m kernel_moe profile`` (``kernel_moe/bench/profile.py``), which is being added on the
``profiler`` branch; until that is merged this example reports MoEBenchmark's time and memory
figures and torch.profiler's per-op table (it prints the command once the profiler is present).
"""

from __future__ import annotations

import copy
import importlib.util
import math

import torch
from torch import nn

import kernel_moe
from kernel_moe import training
from kernel_moe.bench import BenchSettings, Measurements, MoEBenchmark, Timing, count_parameters
from kernel_moe.bench.memory import without_profiler_log_lines
from kernel_moe.moe import AuxLossFreeMoE, OptimizedTopKGating

from _common import ClassLM, Clock, new_figure, parser, print_table, save_figure, section, setup, train, val_loss

TOP_K, CAPACITY_FACTOR, JITTER = 2, 1.5, 0.01


class Expert(nn.Module):
    """One expert: a feed-forward network with a configurable activation."""

    def __init__(self, hidden: int, inter: int, activation: type[nn.Module] = nn.GELU) -> None:
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(hidden, inter), activation(), nn.Linear(inter, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


def moe_feed_forward(hidden: int, inter: int, num_experts: int) -> AuxLossFreeMoE:
    gating = OptimizedTopKGating(num_experts=num_experts, top_k=TOP_K, capacity_factor=CAPACITY_FACTOR,
                                 jitter_noise=JITTER)
    experts = nn.ModuleList(Expert(hidden, inter) for _ in range(num_experts))
    return AuxLossFreeMoE(experts=experts, gating=gating, load_balancing="auxiliary_loss")


class MoEBlock(nn.Module):
    """x' = x + SelfAttention(norm(x));  y = x' + MoE(norm(x'))  (causal attention)."""

    def __init__(self, hidden: int, heads: int, inter: int, num_experts: int) -> None:
        super().__init__()
        self.hidden_size = hidden
        self.norm1, self.norm2 = nn.LayerNorm(hidden), nn.LayerNorm(hidden)
        self.attn = nn.MultiheadAttention(hidden, heads, batch_first=True)
        self.moe = moe_feed_forward(hidden, inter, num_experts)

    def attend(self, x: torch.Tensor) -> torch.Tensor:
        """x + SelfAttention(norm(x)): the input of the MoE's norm."""
        h = self.norm1(x)
        mask = torch.ones(x.shape[1], x.shape[1], dtype=torch.bool, device=x.device).triu(1)
        return x + self.attn(h, h, h, attn_mask=mask, need_weights=False)[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.attend(x)
        return x + self.moe(self.norm2(x))


class MoETransformer(nn.Module):
    def __init__(self, vocab: int, hidden: int, heads: int, inter: int, num_experts: int, layers: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, hidden)
        self.blocks = nn.ModuleList(MoEBlock(hidden, heads, inter, num_experts) for _ in range(layers))
        self.norm, self.head = nn.LayerNorm(hidden), nn.Linear(hidden, vocab, bias=False)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        h = self.embed(input_ids)
        for block in self.blocks:
            h = block(h)
        return self.head(self.norm(h))


# ---------------------------------------------------------------- 1. the router, 3. utilization
@torch.no_grad()
def usage(gating: OptimizedTopKGating, hidden_states: torch.Tensor, title: str) -> dict:
    """Token slots per expert that ``gating`` routes (wanted: the same router without capacity) and
    keeps (with its capacity), on ``hidden_states`` [..., H]."""
    dropless = OptimizedTopKGating(gating.num_experts, gating.top_k, hidden_size=hidden_states.shape[-1])
    dropless.load_state_dict(gating.state_dict())
    wanted_ids, _ = dropless(hidden_states)
    kept_ids, _ = gating.eval()(hidden_states)
    E, T = gating.num_experts, hidden_states.numel() // hidden_states.shape[-1]
    return {"title": title, "wanted": torch.bincount(wanted_ids.flatten(), minlength=E).tolist(),
            "kept": torch.bincount(kept_ids[kept_ids >= 0], minlength=E).tolist(),
            "capacity": math.ceil(gating.capacity_factor * T * gating.top_k / E), "tokens": T}


def router_demo(hidden: int, num_experts: int, tokens: int) -> dict:
    gating = OptimizedTopKGating(num_experts=num_experts, top_k=TOP_K, capacity_factor=CAPACITY_FACTOR,
                                 jitter_noise=0.1, hidden_size=hidden)
    # hidden states sharing a common direction (as real ones do), so that some experts are wanted more
    hidden_states = torch.randn(tokens, hidden) + 0.8 * torch.randn(hidden)
    gating.eval()
    expert_indices, expert_weights = gating(hidden_states)
    row = usage(gating, hidden_states, f"untrained router, {tokens} skewed inputs")
    print(f"gating(hidden_states [{tokens}, {hidden}]) -> expert_indices {list(expert_indices.shape)} "
          f"{expert_indices.dtype}, expert_weights {list(expert_weights.shape)}")
    print(f"capacity per expert ceil({CAPACITY_FACTOR} * {tokens} * {TOP_K} / {num_experts}) = {row['capacity']}; "
          f"routed per expert {row['wanted']}, kept {row['kept']}: "
          f"{int((expert_indices == -1).sum())} of {tokens * TOP_K} slots dropped (index -1, weight 0)")
    again, _ = gating(hidden_states)
    gating.train()
    jittered, _ = gating(hidden_states)
    changed = lambda a, b: float((a.sort(-1).values != b.sort(-1).values).any(-1).float().mean())  # noqa: E731
    print(f"jitter 0.1: tokens whose experts change between two calls: eval {100 * changed(expert_indices, again):.0f}%, "
          f"train {100 * changed(expert_indices, jittered):.0f}% (multiplicative noise on the router input)")
    return row


@torch.no_grad()
def block_usage(model: MoETransformer, ids: torch.Tensor) -> list[dict]:
    """:func:`usage` of each block's router on one forward of ``ids``."""
    model.eval()
    rows, h = [], model.embed(ids)
    for i, block in enumerate(model.blocks):
        mixed = block.attend(h)
        moe_in = block.norm2(mixed)
        rows.append(usage(block.moe.gating, moe_in, f"trained block {i}, {ids.numel()} validation tokens"))
        h = mixed + block.moe(moe_in)
    return rows


def plot_utilization(rows: list[dict], path) -> None:
    fig = new_figure(4.4 * len(rows), 3.6)
    if fig is None:
        return
    for i, row in enumerate(rows):
        ax = fig.add_subplot(1, len(rows), i + 1)
        experts = range(len(row["wanted"]))
        ax.bar(experts, row["wanted"], color="#c9d6ea", label="routed (wanted)")
        ax.bar(experts, row["kept"], width=0.55, color="#4c72b0", label="kept")
        ax.axhline(row["capacity"], color="#c44e52", linestyle="--", label=f"capacity ({row['capacity']})")
        ax.axhline(row["tokens"] * TOP_K / len(row["wanted"]), color="gray", linewidth=1, label="uniform share")
        ax.set_ylim(0, 1.3 * max(*row["wanted"], row["capacity"]))  # room for the legend above the bars
        ax.set_xticks(list(experts))
        ax.set_xlabel("expert")
        ax.set_ylabel("token slots")
        dropped = sum(row["wanted"]) - sum(row["kept"])
        ax.set_title(f"{row['title']}\n{dropped} of {sum(row['wanted'])} slots dropped", fontsize=9)
        ax.legend(fontsize=7)
    fig.suptitle(f"Expert utilization, k={TOP_K}, capacity factor {CAPACITY_FACTOR}", fontsize=11)
    save_figure(fig, path)


# ---------------------------------------------------------------- 4. profiling
@torch.no_grad()
def op_profile(block: nn.Module, x: torch.Tensor, calls: int) -> None:
    """torch.profiler over a few calls of the block: the operators with the most self CPU time."""
    block.eval()
    block(x)
    prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
    with without_profiler_log_lines():  # the profiler's own start / stop log lines, not ours to show
        prof.start()
    for _ in range(calls):
        block(x)
    with without_profiler_log_lines():
        prof.stop()
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events)
    print_table(["operator", "self CPU ms per call", "share"], [
        [e.key, f"{e.self_cpu_time_total / calls / 1e3:.3f}", f"{100 * e.self_cpu_time_total / total:.0f}%"]
        for e in events[:8]])


def benchmark(block: nn.Module, batch_sizes: list[int], seq_lens: list[int], min_time_s: float, out) -> None:
    """MoEBenchmark with the loop definition as "original" (kernel_moe.restore of the block)."""
    definition = kernel_moe.restore(copy.deepcopy(block)).eval()
    settings = BenchSettings(timing=Timing(warmup=2, min_time_s=min_time_s, num_threads=torch.get_num_threads()),
                             measurements=Measurements(energy=False, routing=False), name="MoE block",
                             progress=False)
    results = MoEBenchmark(model=definition, batch_sizes=batch_sizes, sequence_lengths=seq_lens,
                           settings=settings).run()
    rows = []
    for c in results.cases:
        if not c.ok:
            rows.append([c.variant, f"{c.batch_size} x {c.seq_len}", "error", c.error[:50], "-", "-"])
            continue
        peak = "-" if c.memory is None or c.memory.peak_bytes is None else f"{c.memory.peak_bytes / 2**20:.1f}"
        rows.append([c.variant, f"{c.batch_size} x {c.seq_len}", f"{c.latency.median_s * 1e3:.2f}",
                     f"{c.speedup_vs_original:.2f}x", f"{c.tokens_per_s:,.0f}", peak])
    print_table(["variant", "B x S", "median ms", "speedup", "tokens/s", "peak MiB"], rows)
    for note in results.notes:
        print(f"note: {note}")
    try:
        for path in results.plot(out):
            print(f"figure: {path}")
    except ImportError as exc:
        print(exc)


def main(argv=None) -> int:
    ap = parser(__doc__)
    args = ap.parse_args(argv)
    out = setup(args, "001_router_block_profile")
    clock = Clock()
    smoke = args.smoke
    hidden, heads, inter, num_experts, layers = (32, 2, 32, 8, 2) if smoke else (64, 4, 128, 8, 2)
    per_class, seq, batch, steps = (16, 17, 8, 15) if smoke else (64, 33, 16, 150)

    section("1. the router: OptimizedTopKGating(num_experts=8, top_k=2, capacity_factor=1.5, jitter_noise=0.1)")
    router_row = router_demo(hidden, num_experts, 256)

    section(f"2. the block: attention + AuxLossFreeMoE feed-forward ({layers} blocks, trained {steps} steps)")
    task = ClassLM(per_class)
    data, val = task.sample(512, seq, seed=1), task.sample(64, seq, seed=2)
    torch.manual_seed(args.seed)
    model = MoETransformer(task.vocab, hidden, heads, inter, num_experts, layers)
    params = count_parameters(model)
    print(f"parameters: {params.total:,} total, {params.active:,} active per token (top-{TOP_K} of {num_experts})")
    print(f"block 0's feed-forward: {model.blocks[0].moe.extra_repr()}")
    losses = []
    train(model, data, steps, batch, 3e-3, seed=args.seed, on_step=lambda step, loss: losses.append(loss))
    print(f"train loss {losses[0]:.3f} -> {losses[-1]:.3f}; validation loss {val_loss(model, val):.3f} "
          f"(the task's floor {task.entropy_floor():.3f}); Switch aux loss in the last step "
          f"{training.aux_loss(model).item():.4f}")

    section(f"3. expert utilization, k={TOP_K}, capacity factor {CAPACITY_FACTOR} (validation tokens)")
    rows = block_usage(model, val)
    print_table(["router", "routed per expert (wanted)", "kept per expert", "capacity", "dropped"], [
        [r["title"], r["wanted"], r["kept"], r["capacity"], sum(r["wanted"]) - sum(r["kept"])]
        for r in [router_row, *rows]])
    plot_utilization([router_row, *rows], out / f"expert_utilization_k{TOP_K}_cf{CAPACITY_FACTOR}.png")

    section("4. profiling the block")
    block = model.blocks[0]
    with torch.no_grad():
        x = model.embed(val)  # block 0's input
    print(f"torch.profiler, {x.shape[0]} x {x.shape[1]} tokens, eval:")
    op_profile(block, x, calls=3 if smoke else 10)
    print("\nMoEBenchmark: one expert at a time (kernel_moe.restore) vs fused vs fused + torch.compile:")
    batch_sizes, seq_lens = ([1, 4], [16]) if smoke else ([1, 8], [32, 128])
    benchmark(block, batch_sizes, seq_lens, 0.05 if smoke else 0.3, out)
    if importlib.util.find_spec("kernel_moe.bench.profile") is not None:
        print("per-stage times of the MoE layer: python -m kernel_moe profile --help")
    clock.done()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Train a small causal LM with dense attention and with SparseExpertAttention, side by side.

    python examples/sparse_attention_lm.py [--steps 300] [--threads 1] [--plot docs/images/sparse_attention_lm.png]
    python examples/sparse_attention_lm.py --smoke        # a few steps, no plot: checks that it runs

Synthetic data: every sequence repeats a random segment of ``period`` tokens, so every token after
the first period is predictable by attending ``period`` positions back (learned position
embeddings): a task only attention can solve. Validation loss is taken over those predictable
positions. Models (2 layers, d_model 64, the same dense SwiGLU FFN; only attention differs):

- dense MHA: 4 heads of 16;
- MoA at equal compute: 8 experts of 2 heads, top-2: 4 active query heads of 16, like dense
  (key/value heads are shared: 2), with 2.3x the attention parameters;
- MoA at equal parameters: 3 experts of 2 heads, top-2: the dense attention's parameter count
  (+2%) and its 4 active query heads;
- SwitchHead: 2 heads of 16, 4 value/output experts per head, sigmoid top-2.

Reports validation loss curves, training tokens/s (forward + backward + optimizer step, eager) and
the peak memory of one training step (PyTorch profiler's tensor bytes, weights and inputs
included), and writes the figure.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F
from torch import nn

from kernel_moe import SparseExpertAttention
from kernel_moe.bench.memory import measure_peak_memory, module_bytes
from kernel_moe.bench.models import DenseMHA

D, HEAD_DIM, LAYERS, VOCAB = 64, 16, 2, 64


class Block(nn.Module):
    def __init__(self, attention: nn.Module) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(D), nn.LayerNorm(D)
        self.attention = attention
        self.gate_up = nn.Linear(D, 4 * D, bias=False)
        self.down = nn.Linear(2 * D, D, bias=False)

    def forward(self, x):
        x = x + self.attention(self.norm1(x))
        gate, up = self.gate_up(self.norm2(x)).chunk(2, dim=-1)
        return x + self.down(F.silu(gate) * up)


class TinyLM(nn.Module):
    def __init__(self, make_attention, seq: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, D)
        self.position = nn.Parameter(torch.randn(seq, D) * 0.02)
        self.blocks = nn.ModuleList(Block(make_attention()) for _ in range(LAYERS))
        self.norm = nn.LayerNorm(D)
        self.head = nn.Linear(D, VOCAB, bias=False)

    def forward(self, ids):
        x = self.embed(ids) + self.position[: ids.shape[1]]
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))


MODELS = {
    "dense MHA (4 heads)": lambda: DenseMHA(D, 4, HEAD_DIM),
    "MoA, equal compute (8 experts x 2 heads, top-2)":
        lambda: SparseExpertAttention(D, 8, 2, top_k=2, variant="moa", head_dim=HEAD_DIM),
    "MoA, equal params (3 experts x 2 heads, top-2)":
        lambda: SparseExpertAttention(D, 3, 2, top_k=2, variant="moa", head_dim=HEAD_DIM),
    "SwitchHead (2 heads x 4 experts, top-2)":
        lambda: SparseExpertAttention(D, 4, 2, top_k=2, variant="switchhead", head_dim=HEAD_DIM),
}


def batch(n: int, seq: int, period: int, gen: torch.Generator) -> torch.Tensor:
    """[n, seq] token ids: a random segment of ``period`` tokens, repeated."""
    segment = torch.randint(0, VOCAB, (n, period), generator=gen)
    return segment.repeat(1, seq // period + 1)[:, :seq]


def loss_of(model: nn.Module, ids: torch.Tensor, period: int) -> torch.Tensor:
    """Next-token loss over the predictable positions (after the first period)."""
    logits = model(ids[:, :-1])[:, period - 1:]
    return F.cross_entropy(logits.reshape(-1, VOCAB), ids[:, period:].reshape(-1))


def attention_params(model: TinyLM) -> int:
    return sum(p.numel() for b in model.blocks for p in b.attention.parameters())


def train(name: str, args) -> dict:
    torch.manual_seed(0)
    model = TinyLM(MODELS[name], args.seq)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr)
    gen, val_gen = torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)
    val = batch(64, args.seq, args.period, val_gen)
    curve, train_time = [], 0.0

    def step(ids):
        loss = loss_of(model, ids, args.period)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss

    for i in range(args.steps + 1):
        if i % args.eval_every == 0 or i == args.steps:
            with torch.no_grad():
                curve.append((i, loss_of(model.eval(), val, args.period).item()))
            model.train()
        if i == args.steps:
            break
        ids = batch(args.batch, args.seq, args.period, gen)
        start = time.perf_counter()
        step(ids)
        train_time += time.perf_counter() - start
    ids = batch(args.batch, args.seq, args.period, gen)
    memory = measure_peak_memory(lambda: step(ids), "cpu", module_bytes(model) + 2 * module_bytes(model))
    return {"name": name, "curve": curve, "final_val_loss": curve[-1][1],
            "tokens_per_s": args.steps * args.batch * (args.seq - 1) / max(train_time, 1e-9),
            "peak_step_MiB": None if memory.peak_bytes is None else memory.peak_bytes / 2**20,
            "attention_params": attention_params(model), "params": sum(p.numel() for p in model.parameters())}


def plot(results: list[dict], path: str, args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(15, 4.2), gridspec_kw={"width_ratios": [2, 1, 1]})
    for r in results:
        steps, losses = zip(*r["curve"])
        ax1.plot(steps, losses, label=f"{r['name']} ({r['attention_params'] / 1e3:.1f}k attn params)")
    ax1.set(xlabel="training step", ylabel="validation loss (predictable tokens)", yscale="log",
            title=f"Repeated-segment LM, d_model {D}, {LAYERS} layers, period {args.period}")
    ax1.legend(fontsize=8, loc="lower left")
    names = [r["name"].split(" (")[0] for r in results]
    ax2.barh(names, [r["tokens_per_s"] for r in results], color="tab:blue")
    ax2.set(xlabel="training tokens/s (CPU, eager)", title="throughput")
    ax3.barh(names, [r["peak_step_MiB"] or 0 for r in results], color="tab:orange")
    ax3.set(xlabel="peak MiB of one training step", title="memory")
    for ax in (ax2, ax3):
        ax.invert_yaxis()
        ax.tick_params(axis="y", labelsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=32)
    parser.add_argument("--period", type=int, default=8)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--eval-every", type=int, default=25)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--plot", default=None, help="write the figure (PNG) here")
    parser.add_argument("--json", default=None, help="write the results (JSON) here")
    parser.add_argument("--smoke", action="store_true", help="a few steps, to check that it runs")
    args = parser.parse_args()
    if args.smoke:
        args.steps, args.eval_every, args.batch = 4, 2, 4
    torch.set_num_threads(args.threads)
    results = [train(name, args) for name in MODELS]
    print(f"{'model':50s} {'attn params':>11s} {'params':>8s} {'val loss':>9s} {'tokens/s':>9s} {'peak MiB':>9s}")
    for r in results:
        mib = "n/a" if r["peak_step_MiB"] is None else f"{r['peak_step_MiB']:.1f}"
        print(f"{r['name']:50s} {r['attention_params']:11,d} {r['params']:8,d} {r['final_val_loss']:9.4f} "
              f"{r['tokens_per_s']:9.0f} {mib:>9s}")
    if args.plot:
        plot(results, args.plot, args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()

"""Train a small MoE language model against a dense model with the same active parameters.

    python examples/train_moe.py [--steps 300] [--balancing none auxiliary_loss dynamic] [--threads 1]

Synthetic data: token sequences from a fixed random bigram model with a few dominant token
clusters (so an unbalanced router is the natural outcome). The MoE blocks are written as a
tutorial would (gate Linear + ModuleList of SwiGLU experts); ``kernel_moe.optimize`` swaps them
for fused layers with the requested load balancing. Reports validation loss, training
tokens/s and the expert-load coefficient of variation (CV) over training.
"""

from __future__ import annotations

import argparse
import copy
import time

import torch
import torch.nn.functional as F
from torch import nn

import kernel_moe
from kernel_moe import training
from kernel_moe.routing.balancing import expert_load_stats


class Expert(nn.Module):
    def __init__(self, hidden: int, inter: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden, inter, bias=False)
        self.up_proj = nn.Linear(hidden, inter, bias=False)
        self.down_proj = nn.Linear(inter, hidden, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class MoEBlock(nn.Module):
    def __init__(self, hidden: int, inter: int, num_experts: int, top_k: int) -> None:
        super().__init__()
        self.top_k = top_k
        self.router = nn.Linear(hidden, num_experts, bias=False)
        self.experts = nn.ModuleList(Expert(hidden, inter) for _ in range(num_experts))

    def forward(self, x):
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        weights, ids = self.router(x).softmax(dim=-1).topk(self.top_k, dim=-1)
        weights = weights / weights.sum(dim=-1, keepdim=True)
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            tok, slot = torch.where(ids == e)
            out.index_add_(0, tok, expert(x[tok]) * weights[tok, slot, None])
        return out.reshape(shape)


class TinyLM(nn.Module):
    def __init__(self, vocab: int, hidden: int, layers: int, ffn) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, hidden)
        self.norms = nn.ModuleList(nn.LayerNorm(hidden) for _ in range(layers))
        self.ffns = nn.ModuleList(ffn() for _ in range(layers))
        self.head = nn.Linear(hidden, vocab, bias=False)

    def forward(self, ids):
        h = self.embed(ids)
        for norm, ffn in zip(self.norms, self.ffns):
            h = h + ffn(norm(h))
        return self.head(h)


def make_data(vocab: int, n_seq: int, seq: int, seed: int) -> torch.Tensor:
    """Sequences from a random bigram model whose next-token mass sits in a few clusters."""
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(vocab, vocab, generator=gen) * 2.0
    hot = torch.randperm(vocab, generator=gen)[: vocab // 8]
    logits[:, hot] += 3.0
    probs = logits.softmax(dim=-1)
    data = torch.empty(n_seq, seq, dtype=torch.long)
    data[:, 0] = torch.randint(0, vocab, (n_seq,), generator=gen)
    for t in range(1, seq):
        data[:, t] = torch.multinomial(probs[data[:, t - 1]], 1, generator=gen).squeeze(-1)
    return data


def run(model: nn.Module, train: torch.Tensor, val: torch.Tensor, steps: int, batch: int, lr: float,
        log_every: int, name: str) -> dict:
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    fused = training.fused_layers(model)
    for layer in fused:
        layer.track_routing(True)
    gen = torch.Generator().manual_seed(0)
    tokens = 0
    cvs = []
    start = time.perf_counter()
    for step in range(1, steps + 1):
        idx = torch.randint(0, train.shape[0], (batch,), generator=gen)
        seqs = train[idx]
        logits = model(seqs[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), seqs[:, 1:].reshape(-1))
        loss = loss + training.aux_loss(model)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        training.update_expert_biases(model)
        tokens += seqs[:, :-1].numel()
        if fused and step % log_every == 0:
            counts = torch.stack([layer.routing_counts for layer in fused]).sum(dim=0)
            cv = float(expert_load_stats(counts)["cv"])
            cvs.append(cv)
            for layer in fused:
                layer.reset_routing_counts()
            print(f"  [{name}] step {step:4d}  loss {loss.item():.3f}  expert-load CV {cv:.3f}")
    elapsed = time.perf_counter() - start
    model.eval()
    with torch.no_grad():
        logits = model(val[:, :-1])
        val_loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), val[:, 1:].reshape(-1)).item()
    model.train()
    return {"name": name, "val_loss": val_loss, "tokens_per_s": tokens / elapsed,
            "final_cv": cvs[-1] if cvs else None, "cv_history": cvs}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=65)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--inter", type=int, default=128)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--vocab", type=int, default=256)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--balancing", nargs="+", default=["none", "auxiliary_loss", "dynamic"])
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    data = make_data(args.vocab, 1024, args.seq, seed=1)
    train, val = data[:896], data[896:]
    log_every = max(1, args.steps // 10)
    results = []
    torch.manual_seed(0)
    dense = TinyLM(args.vocab, args.hidden, args.layers, lambda: Expert(args.hidden, args.top_k * args.inter))
    results.append(run(dense, train, val, args.steps, args.batch, args.lr, log_every, "dense (same active params)"))
    torch.manual_seed(0)
    base = TinyLM(args.vocab, args.hidden, args.layers,
                  lambda: MoEBlock(args.hidden, args.inter, args.experts, args.top_k))
    for mode in args.balancing:
        model = copy.deepcopy(base)
        config = kernel_moe.KernelConfig.for_moe(
            load_balancing=mode, aux_loss_weight=0.05, bias_update_rate=0.01)
        report = kernel_moe.optimize(model, config, return_report=True)[1]
        assert report.num_swapped == args.layers, report
        results.append(run(model, train, val, args.steps, args.batch, args.lr, log_every, f"moe {mode}"))
    print(f"\n{'model':28} {'val loss':>9} {'tokens/s':>10} {'final CV':>9}")
    for r in results:
        cv = "-" if r["final_cv"] is None else f"{r['final_cv']:.3f}"
        print(f"{r['name']:28} {r['val_loss']:9.3f} {r['tokens_per_s']:10.0f} {cv:>9}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

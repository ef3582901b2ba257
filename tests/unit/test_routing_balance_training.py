"""A small training experiment: load balancing "none" vs auxiliary loss vs dynamic bias.

A tiny top-2 MoE (router Linear + 8 gated experts) learns a regression on inputs drawn from
a few clusters of very unequal size, so that a router left alone sends most tokens to a
few experts. Each balancing mode must end with a lower coefficient of variation of the
expert load than "none". Everything is seeded and runs on one thread, so the figures are
deterministic; they are printed (run with ``-s``) so that they can be quoted.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from kernel_moe.reference.moe import naive_moe_experts
from kernel_moe.routing.balancing import ExpertLoadTracker, expert_counts, expert_load_stats, update_expert_bias
from kernel_moe.routing.losses import load_balancing_loss
from kernel_moe.routing.topk import TopKRouting, route

H, E, K, I = 16, 8, 2, 16
CLUSTER_SHARES = (0.55, 0.25, 0.12, 0.08)
STEPS, BATCH, LR = 300, 256, 1e-2
AUX_COEF = 0.05  # weight of the Switch load-balancing loss (Switch uses 0.01 over far longer runs)
BIAS_RATE = 1e-2  # bias step per update (DeepSeek-V3 uses 1e-3 over far longer runs)
LAST_STEPS = 50  # training load is measured over the final steps


class TinyMoE(nn.Module):
    """Router Linear + E gated (SwiGLU) experts, top-k softmax routing with renormalisation."""

    def __init__(self) -> None:
        super().__init__()
        self.router = nn.Linear(H, E, bias=False)
        self.w_up_ENH = nn.Parameter(torch.randn(E, 2 * I, H) / H**0.5)
        self.w_down_EHI = nn.Parameter(torch.randn(E, H, I) / I**0.5)
        self.register_buffer("bias_E", torch.zeros(E))
        self.spec = TopKRouting(E, K, renormalize=True)

    def forward(self, x_TH: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        logits_TE = self.router(x_TH)
        weights_TK, ids_TK = route(logits_TE, self.spec, selection_bias_E=self.bias_E)
        out_TH = naive_moe_experts(x_TH, weights_TK, ids_TK, self.w_up_ENH, self.w_down_EHI)
        return out_TH, torch.softmax(logits_TE.float(), dim=-1), ids_TK


def make_task(seed: int):
    """Cluster centres, a random teacher and a sampler of (x, y) batches."""
    g = torch.Generator().manual_seed(seed)
    centres_CH = torch.randn(len(CLUSTER_SHARES), H, generator=g) * 2.0
    teacher_up_HH = torch.randn(H, H, generator=g) / H**0.5
    teacher_down_HH = torch.randn(H, H, generator=g) / H**0.5
    shares_C = torch.tensor(CLUSTER_SHARES)

    def sample(n: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        cluster_T = torch.multinomial(shares_C, n, replacement=True, generator=gen)
        x_TH = centres_CH[cluster_T] + 0.5 * torch.randn(n, H, generator=gen)
        y_TH = torch.tanh(x_TH @ teacher_up_HH) @ teacher_down_HH
        return x_TH, y_TH

    return sample


@dataclass
class Result:
    mode: str
    train_cv: float
    train_max_over_mean: float
    eval_cv: float
    eval_max_over_mean: float
    eval_gini: float
    eval_mse: float


def train(mode: str, seed: int = 0) -> Result:
    """Train one model under a balancing mode; load stats over the last steps and on held-out data."""
    sample = make_task(seed)
    torch.manual_seed(seed)
    model = TinyMoE()
    opt = torch.optim.Adam(model.parameters(), lr=LR)
    data_gen = torch.Generator().manual_seed(seed + 1)
    tracker = ExpertLoadTracker(E)
    for step in range(STEPS):
        x_TH, y_TH = sample(BATCH, data_gen)
        out_TH, probs_TE, ids_TK = model(x_TH)
        loss = F.mse_loss(out_TH, y_TH)
        if mode == "aux":
            loss = loss + AUX_COEF * load_balancing_loss(probs_TE, ids_TK, E)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        counts_E = expert_counts(ids_TK, E)
        if mode == "bias":
            update_expert_bias(model.bias_E, counts_E, BIAS_RATE)
        if step >= STEPS - LAST_STEPS:
            tracker.update_counts(counts_E)
    train_stats = tracker.summary()
    with torch.no_grad():
        x_TH, y_TH = sample(4096, torch.Generator().manual_seed(seed + 2))
        out_TH, _, ids_TK = model(x_TH)
        eval_stats = {k: v.item() for k, v in expert_load_stats(expert_counts(ids_TK, E)).items()}
        eval_mse = F.mse_loss(out_TH, y_TH).item()
    return Result(
        mode,
        train_stats["cv"],
        train_stats["max_over_mean"],
        eval_stats["cv"],
        eval_stats["max_over_mean"],
        eval_stats["gini"],
        eval_mse,
    )


@pytest.mark.slow
def test_balancing_modes_reduce_load_imbalance():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        results = {mode: train(mode) for mode in ("none", "aux", "bias")}
    finally:
        torch.set_num_threads(threads)
    print(
        f"\nTiny MoE H={H} E={E} top-{K}, clusters {CLUSTER_SHARES}, {STEPS} steps x {BATCH} tokens, "
        f"aux coef {AUX_COEF}, bias rate {BIAS_RATE}"
    )
    columns = ("train CV", "train max/mean", "eval CV", "eval max/mean", "eval Gini", "eval MSE")
    print(f"{'mode':<6} " + " ".join(f"{c:>14}" for c in columns))
    for r in results.values():
        print(
            f"{r.mode:<6} {r.train_cv:14.4f} {r.train_max_over_mean:14.4f} {r.eval_cv:14.4f} "
            f"{r.eval_max_over_mean:14.4f} {r.eval_gini:14.4f} {r.eval_mse:14.5f}"
        )
    none = results["none"]
    assert none.eval_cv > 0.5, "the synthetic task must make a plain router imbalanced"
    for mode in ("aux", "bias"):
        assert results[mode].train_cv < none.train_cv, mode
        assert results[mode].eval_cv < none.eval_cv, mode

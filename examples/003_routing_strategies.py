"""003: routing strategies on kernel_moe: top-1 / top-2 / top-k, expert capacity with dropped
tokens counted, random routing, and expert collapse: detected, then recovered.

    python examples/003_routing_strategies.py            # full: 61 s
    python examples/003_routing_strategies.py --smoke    # tiny sizes, few steps: 18 s
    (times measured on a shared 2-core CPU at load average 8-12; an idle one is faster)

The guide explains MoE routing (top-1 as in Switch, top-2 as in Mixtral, top-k), the three
answers to load imbalance (an auxiliary balance loss, expert capacity, random routing) and the
failure they prevent: routing collapse, "all tokens -> expert 1". Its practical tips: monitor
tokens per expert and detect collapse; capacity factor 1.25-1.5; balance-loss weight 0.01. Here
each one runs on a tiny language model (``TinyLM`` on the synthetic ``ClassLM`` task of
``_common.py``) whose feed-forward blocks are a hand-written Switch-style MoE (gate Linear,
softmax, top-k, a loop over the experts), swapped by ``kernel_moe.optimize``:

1. top-1 vs top-2 vs top-4 of 8 experts, each trained with the Switch balance loss
   (``load_balancing="auxiliary_loss"``, alpha 0.01): active parameters, training time per step,
   validation loss, load CV;
2. expert capacity on the trained top-2 model: ``capacity_factor`` from none (dropless) down to
   0.75; capacity per expert ``ceil(factor * T * k / E)``, slots dropped
   (``kernel_moe.training.dropped_tokens``) and what the drops cost in validation loss;
3. random routing (``random_routing=0.1``): tokens rerouted per step
   (``kernel_moe.training.randomly_routed``);
4. collapse and recovery: a top-1 model whose gate starts biased towards expert 0 and trains
   without balancing collapses; ``kernel_moe.training.RoutingMonitor`` logs its warning (shown
   here); the model is re-optimized with dynamic (aux-loss-free) balancing and random routing
   (``kernel_moe.restore`` then ``kernel_moe.optimize`` with the new config: the same
   Parameters) and the monitor shows the routing recover.
"""

from __future__ import annotations

import math
import time

import torch
from torch import nn

import kernel_moe
from kernel_moe import training
from kernel_moe.bench import LoadBalance, count_parameters

from _common import (
    ClassLM,
    Clock,
    GateAndExperts,
    TinyLM,
    parser,
    print_table,
    section,
    setup,
    show_kernel_moe_warnings,
    train,
    val_loss,
)


class SwitchMoE(GateAndExperts):
    """Gate -> softmax -> top-k experts, each token's output the gate-probability-weighted sum of its
    k experts, not renormalized (top-1 is the Switch Transformer's layer)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        probs = self.gate(x).softmax(dim=-1)
        weight, expert_id = probs.topk(self.k, dim=-1)
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            token, slot = torch.where(expert_id == e)
            out = out.index_add(0, token, expert(x[token]) * weight[token, slot, None])
        return out.reshape(shape)


def slots_per_expert(model: nn.Module, tokens: torch.Tensor) -> list[int]:
    """Slots routed to each expert, summed over the fused layers, in one eval forward."""
    layers = training.fused_layers(model)
    for layer in layers:
        layer.reset_routing_counts()
        layer.track_routing(True)
    val_loss(model, tokens)
    counts = torch.stack([layer.routing_counts.cpu() for layer in layers]).sum(0).tolist()
    for layer in layers:
        layer.track_routing(False)
        layer.reset_routing_counts()
    return counts


def main(argv=None) -> int:
    ap = parser(__doc__)
    ap.add_argument("--steps", type=int, default=None, help="training steps of each top-k run (default 150; smoke 20)")
    args = ap.parse_args(argv)
    setup(args, "003_routing_strategies", writes_files=False)
    show_kernel_moe_warnings()
    clock = Clock()
    smoke = args.smoke
    hidden, inter, num_experts, layers = (32, 32, 8, 1) if smoke else (64, 64, 8, 2)
    per_class, seq, batch = (16, 17, 16) if smoke else (64, 33, 32)
    steps = args.steps or (20 if smoke else 150)
    task = ClassLM(per_class)
    data, val = task.sample(1024, seq, seed=1), task.sample(128, seq, seed=2)
    tokens_per_call = val[:, :-1].numel()

    def moe_lm(top_k: int) -> TinyLM:
        torch.manual_seed(args.seed)
        return TinyLM(task.vocab, hidden, layers, lambda: SwitchMoE(hidden, inter, num_experts, top_k))

    # ------------------------------------------------------------ 1. top-1 / top-2 / top-k
    section(f"1. top-1 vs top-2 vs top-4 of {num_experts} experts ({steps} steps each, Switch balance loss 0.01)")
    balanced = kernel_moe.KernelConfig.for_moe(load_balancing="auxiliary_loss", aux_loss_weight=0.01)
    rows, trained = [], {}
    for top_k in (1, 2, 4):
        model = kernel_moe.optimize(moe_lm(top_k), balanced.replace(top_k=top_k))
        params = count_parameters(model)
        start = time.perf_counter()
        train(model, data, steps, batch, 3e-3, seed=args.seed)
        ms = (time.perf_counter() - start) / steps * 1e3
        cv = LoadBalance.from_counts(slots_per_expert(model, val)).cv
        trained[top_k] = model
        rows.append([f"top-{top_k}", f"{params.active:,} / {params.total:,}", f"{ms:.1f}", f"{val_loss(model, val):.3f}",
                     f"{cv:.2f}"])
    print_table(["routing", "active / total params", "ms per step", "val loss", "load CV"], rows)
    print(f"(task floor {task.entropy_floor():.3f}; the time per step includes the whole model: embedding, head, "
          "optimizer)")

    # ------------------------------------------------------------ 2. expert capacity
    section(f"2. expert capacity on the trained top-2 model ({tokens_per_call} tokens per forward, eval mode)")
    model = trained[2]
    rows = []
    for factor in (None, 2.0, 1.5, 1.25, 1.0, 0.75):
        model = kernel_moe.optimize(kernel_moe.restore(model), balanced.replace(top_k=2, capacity_factor=factor))
        loss = val_loss(model, val)
        dropped = training.dropped_tokens(model)
        slots = tokens_per_call * 2 * layers
        capacity = "none (dropless)" if factor is None else f"{math.ceil(factor * tokens_per_call * 2 / num_experts)}"
        rows.append(["-" if factor is None else f"{factor:g}", capacity, f"{dropped} ({100 * dropped / slots:.1f}%)",
                     f"{loss:.3f}"])
    print_table(["capacity factor", "slots per expert", "dropped slots (all layers)", "val loss"], rows)
    print("a dropped slot contributes nothing: the token keeps its residual (and its other expert)")

    # ------------------------------------------------------------ 3. random routing
    section("3. random routing p=0.1 (training only): a token's last slot goes to a random other expert")
    model = kernel_moe.optimize(kernel_moe.restore(model), balanced.replace(top_k=2, random_routing=0.1))
    rerouted = []
    train(model, data, 5, batch, 1e-3, seed=args.seed + 1,
          on_step=lambda step, loss: rerouted.append(training.randomly_routed(model)))
    per_step = tokens_per_call // val.shape[0] * batch * layers  # token rows per step, over all layers
    print(f"rerouted per step: {rerouted} of {per_step} token rows ({100 * sum(rerouted) / (5 * per_step):.1f}%)")

    # ------------------------------------------------------------ 4. collapse and recovery
    phase_steps, window = (20, 5) if smoke else (40, 10)
    section(f"4. collapse: top-1, gate biased towards expert 0, no balancing (monitor window {window} steps)")
    collapsing = moe_lm(1)
    with torch.no_grad():
        for ffn in collapsing.ffns:
            ffn.gate.bias.zero_()
            ffn.gate.bias[0] = 5.0
    model = kernel_moe.optimize(collapsing, kernel_moe.KernelConfig.for_moe(top_k=1, load_balancing="none"))

    def watch(monitor: training.RoutingMonitor, every: int, offset: int):
        def on_step(step: int, loss: float) -> None:
            health = monitor.step()
            if step % every == 0:
                h = max(health, key=lambda h: h.largest_share)
                print(f"  step {offset + step:3d}  loss {loss:.3f}  busiest expert {h.largest_expert}: "
                      f"{100 * h.largest_share:.0f}% of slots  dead experts {list(h.dead_experts) or 'none'}  "
                      f"{'COLLAPSED' if h.collapsed else 'healthy'}")
        return on_step

    monitor = training.RoutingMonitor(model, window=window, collapse_share=0.5, dead_after=window)
    train(model, data, phase_steps, batch, 3e-3, seed=args.seed, on_step=watch(monitor, window, 0))
    collapsed = any(h.collapsed for h in monitor.health())

    section("   recovery: the same weights re-optimized with dynamic balancing + random routing p=0.1")
    recovering = kernel_moe.KernelConfig.for_moe(top_k=1, load_balancing="dynamic", bias_update_rate=0.05,
                                                  random_routing=0.1)
    model = kernel_moe.optimize(kernel_moe.restore(model), recovering)
    monitor = training.RoutingMonitor(model, window=window, collapse_share=0.5, dead_after=window)
    train(model, data, 2 * phase_steps, batch, 3e-3, seed=args.seed + 1, on_step=watch(monitor, window, phase_steps))
    final = monitor.health()
    recovered = not any(h.collapsed for h in final)
    for h in final:
        print(f"  {h.layer}: tokens per expert over the last {h.steps} steps {list(h.tokens_per_expert)}")

    section("summary")
    print(f"collapse detected: {'yes' if collapsed else 'no'}; recovered: {'yes' if recovered else 'no'} "
          f"(busiest expert now {100 * max(h.largest_share for h in final):.0f}% of slots, "
          f"load CV {max(LoadBalance.from_counts(h.tokens_per_expert).cv for h in final):.2f})")
    clock.done()
    return 0 if collapsed and recovered else 1


if __name__ == "__main__":
    raise SystemExit(main())

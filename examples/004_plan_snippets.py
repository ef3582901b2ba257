"""004: the plan's snippets, run as written on kernel_moe.

    python examples/004_plan_snippets.py            # full: 78 s
    python examples/004_plan_snippets.py --smoke    # tiny sizes: 32 s
    python examples/004_plan_snippets.py --plan-sizes   # the benchmark at the plan's own sizes (long on a CPU)
    (times measured on a shared 2-core CPU at load average 8-12; an idle one is faster)

The plan ("Mixture of Experts (MoE) Optimization", v0.5.0) shows the API it wants: a top-k gating
module, an MoE layer with load balancing, a sparse expert attention, a ``for_moe`` config, the
``UnifiedManager`` and an ``MoEBenchmark``. Each snippet below is the plan's code with only the
import names changed (``kernel_pytorch`` -> ``kernel_moe``, ``KernelPyTorchConfig`` ->
``KernelConfig``, and ``kernel_pytorch.benchmarks`` -> ``kernel_moe.bench``, where the benchmark
harness lives), wrapped in a function whose arguments are the snippet's free names
(``hidden_states``, ``experts``, ``moe_model``, ``mixtral_model``). They run on:

- a tiny Mixtral built from transformers' ``MixtralConfig`` (random weights, no download);
- a hand-written MoE (a gate ``nn.Linear`` and an ``nn.ModuleList`` of SwiGLU experts, a loop over
  the experts: ``MoEBlock`` of ``train_moe.py``), in a small model of pre-norm residual MoE blocks.

One argument is left out: ``expert_parallel=True`` (see ``snippet_config``). The plan's sparse
expert attention (``SparseExpertAttention``) is not part of kernel_moe; its snippet reports that.
The benchmark snippet runs at CPU-sized batch and sequence lists unless ``--plan-sizes`` is given.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from kernel_moe import training

from _common import Clock, parser, print_table, section, setup
from train_moe import Expert as SwiGLUExpert  # the training example's hand-written MoE: gate Linear + SwiGLU experts
from train_moe import MoEBlock as HandwrittenMoE

PLAN_BATCH_SIZES, PLAN_SEQUENCE_LENGTHS = [1, 8, 32, 128], [512, 2048, 8192]


# ---------------------------------------------------------------- the plan's snippets
def snippet_gating(hidden_states):
    # Planned API (v0.5.0)
    from kernel_moe.moe import OptimizedTopKGating

    # Standard MoE gating with top-2 expert selection
    gating = OptimizedTopKGating(
        num_experts=8,
        top_k=2,
        capacity_factor=1.25,  # Extra capacity for load balancing
        jitter_noise=0.1,       # Noise for exploration during training
    )

    # Route tokens to experts
    expert_indices, expert_weights = gating(hidden_states)
    return gating, expert_indices, expert_weights


def snippet_load_balancing(experts, gating):
    # Planned API (v0.5.0)
    from kernel_moe.moe import AuxLossFreeMoE

    # DeepSeek-style auxiliary-loss-free load balancing
    moe_layer = AuxLossFreeMoE(
        experts=experts,
        gating=gating,
        load_balancing="dynamic",  # vs "auxiliary_loss", "none"
    )
    return moe_layer


def snippet_sparse_attention():
    # Planned API (v0.5.0)
    from kernel_moe.moe import SparseExpertAttention

    # Attention where each expert has its own attention head
    sparse_attn = SparseExpertAttention(
        d_model=4096,
        num_experts=8,
        num_heads_per_expert=4,
        expert_capacity=256,
    )
    return sparse_attn


def snippet_config():
    # Planned configuration (v0.5.0)
    from kernel_moe import KernelConfig

    config = KernelConfig.for_moe(
        num_experts=8,
        top_k=2,
        capacity_factor=1.25,
        load_balancing="dynamic",
        # expert_parallel=True,  # Distribute experts across GPUs
        # ^ left out: sharding the experts over devices needs torch.distributed (one process per device,
        #   launched with torchrun), and KernelConfig rejects expert_parallel=True in this version (a
        #   ValueError saying so); the token exchange it will use is kernel_moe.parallel, tested over
        #   gloo processes in tests/parallel/.
    )
    return config


def snippet_manager(config, moe_model):
    from kernel_moe import UnifiedManager

    manager = UnifiedManager(config)
    optimized_moe_model = manager.optimize(moe_model)
    return manager, optimized_moe_model


def snippet_benchmark(mixtral_model, batch_sizes, sequence_lengths):
    # Will be available in benchmarks/moe_benchmark.py (v0.5.0)
    from kernel_moe.bench import MoEBenchmark

    benchmark = MoEBenchmark(
        model=mixtral_model,
        batch_sizes=batch_sizes,  # the plan's [1, 8, 32, 128] with --plan-sizes
        sequence_lengths=sequence_lengths,  # the plan's [512, 2048, 8192] with --plan-sizes
    )

    results = benchmark.run()
    results.print_summary()
    return results


# ---------------------------------------------------------------- the models they run on
def tiny_mixtral(hidden: int, inter: int, layers: int, seed: int) -> nn.Module:
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(seed)
    config = MixtralConfig(vocab_size=512, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                           num_attention_heads=4, num_key_value_heads=2, num_local_experts=8,
                           num_experts_per_tok=2, max_position_embeddings=512)
    return MixtralForCausalLM(config).eval()


class HandwrittenModel(nn.Module):
    def __init__(self, hidden: int, inter: int, layers: int) -> None:
        super().__init__()
        self.norms = nn.ModuleList(nn.LayerNorm(hidden) for _ in range(layers))
        self.moes = nn.ModuleList(HandwrittenMoE(hidden, inter, num_experts=8, top_k=2) for _ in range(layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for norm, moe in zip(self.norms, self.moes):
            x = x + moe(norm(x))
        return x


def training_step(model: nn.Module, inputs: dict) -> tuple[float, int, int]:
    """One step of a toy loss in train mode: (loss, dropped slots, layers whose balancing bias moved)."""
    model.train()
    out = model(**inputs)
    out = out.logits if hasattr(out, "logits") else out
    loss = out.float().square().mean()
    loss.backward()
    dropped = training.dropped_tokens(model)
    updated = training.update_expert_biases(model)
    model.zero_grad(set_to_none=True)
    model.eval()
    return loss.item(), dropped, updated


def main(argv=None) -> int:
    ap = parser(__doc__)
    ap.add_argument("--plan-sizes", action="store_true",
                    help="run the benchmark snippet at the plan's batch sizes [1, 8, 32, 128] and sequence lengths "
                         "[512, 2048, 8192] (hours on a CPU)")
    args = ap.parse_args(argv)
    setup(args, "004_plan_snippets", writes_files=False)
    clock = Clock()
    smoke = args.smoke
    hidden, inter, layers, seq = (32, 64, 1, 16) if smoke else (64, 128, 2, 64)
    try:
        mixtral_model = tiny_mixtral(hidden, inter, layers, args.seed)
    except ImportError as exc:
        print(f"transformers is needed for the Mixtral model (pip install 'kernel_moe[hf]'): {exc}")
        return 1
    torch.manual_seed(args.seed)
    handwritten = HandwrittenModel(hidden, inter, layers).eval()
    input_ids = torch.randint(0, mixtral_model.config.vocab_size, (2, seq), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        hidden_states = mixtral_model.model.embed_tokens(input_ids)

    section("1. expert routing: OptimizedTopKGating on the Mixtral's token embeddings")
    gating, expert_indices, expert_weights = snippet_gating(hidden_states)
    print(f"hidden_states {list(hidden_states.shape)} -> expert_indices {list(expert_indices.shape)}, "
          f"expert_weights {list(expert_weights.shape)}; dropped slots (index -1): {int((expert_indices < 0).sum())}; "
          f"weights of a token sum to {float(expert_weights[0, 0].detach().sum()):.3f}")

    section("2. load balancing: AuxLossFreeMoE over hand-written SwiGLU experts")
    experts = nn.ModuleList(SwiGLUExpert(hidden, inter) for _ in range(8))
    moe_layer = snippet_load_balancing(experts, gating)
    out = moe_layer(hidden_states)
    bias_before = moe_layer.expert_bias.clone()
    loss, dropped, updated = training_step(moe_layer, {"hidden_states": hidden_states})
    print(f"{type(moe_layer).__name__}: {moe_layer.extra_repr()}")
    print(f"output {list(out.shape)}; one training step: dropped slots {dropped}, balancing bias updated in {updated} "
          f"layer(s), bias moved by {float((moe_layer.expert_bias - bias_before).abs().max()):.4f} per expert")

    section("3. sparse expert attention")
    try:
        snippet_sparse_attention()
    except ImportError as exc:
        print(f"not provided by kernel_moe ({exc}): the plan's sparse expert attention is not implemented")

    section("4. configuration and 5. UnifiedManager, on the tiny Mixtral and on the hand-written model")
    config = snippet_config()
    print(f"config: num_experts={config.num_experts}, top_k={config.top_k}, capacity_factor={config.capacity_factor}, "
          f"load_balancing={config.load_balancing!r}, expert_parallel={config.expert_parallel}")
    rows = []
    optimized = {}
    for name, moe_model, inputs in (("tiny Mixtral", mixtral_model, {"input_ids": input_ids}),
                                    ("hand-written", handwritten, {"x": hidden_states})):
        reference = copy.deepcopy(moe_model)
        manager, optimized_moe_model = snippet_manager(config, moe_model)
        print(f"\n{name}: {manager.report}")
        with torch.no_grad():
            got, want = optimized_moe_model(**inputs), reference(**inputs)
        got, want = (getattr(got, "logits", got), getattr(want, "logits", want))
        dropped = training.dropped_tokens(optimized_moe_model)
        loss, _, updated = training_step(optimized_moe_model, inputs)
        rows.append([name, manager.report.num_swapped, dropped, f"{float((got - want).abs().max()):.2e}", updated])
        optimized[name] = (optimized_moe_model, inputs)
    print()
    print_table(["model", "blocks swapped", "dropped slots (capacity 1.25)", "max |optimized - original|",
                 "layers rebalanced per step"], rows)
    print("(capacity 1.25 drops slots on purpose, so outputs differ where a slot was dropped; with no slot dropped "
          "they agree to fp32 rounding)")

    if not smoke:  # (the benchmark below compiles it too)
        compiled_model, inputs = optimized["tiny Mixtral"]
        compiled = torch.compile(compiled_model, fullgraph=True)
        with torch.no_grad():
            compiled(**inputs)
        print("torch.compile(optimized Mixtral, fullgraph=True): one graph, no break")

    section("6. benchmarking: MoEBenchmark on the tiny Mixtral (original / optimized / optimized+compiled)")
    if args.plan_sizes:
        batch_sizes, sequence_lengths = PLAN_BATCH_SIZES, PLAN_SEQUENCE_LENGTHS
    else:
        batch_sizes, sequence_lengths = ([1], [16]) if smoke else ([1, 8], [128])
    print(f"batch_sizes={batch_sizes}, sequence_lengths={sequence_lengths}"
          + ("" if args.plan_sizes else f" (the plan's {PLAN_BATCH_SIZES} x {PLAN_SEQUENCE_LENGTHS}: --plan-sizes)"))
    results = snippet_benchmark(tiny_mixtral(hidden, inter, layers, args.seed), batch_sizes, sequence_lengths)
    failed = [c for c in results.cases if not c.ok]
    clock.done()
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Expert parallelism with torchrun: a tiny transformers Qwen3-MoE model whose experts are sharded
over the ranks generates exactly what the single-process model generates.

    torchrun --nproc-per-node 2 examples/expert_parallel.py [--mode exact|padded|both] [--experts 8]

Every rank builds the same random-weight model (no download), keeps an unsharded copy as the
single-process reference, and optimizes the model with ``KernelConfig.for_moe(expert_parallel=True)``:
each swapped MoE block keeps E / world experts, the router and attention stay replicated. Each
rank then generates from its own prompts (different lengths per rank in the exact mode); the
tokens of every MoE layer travel to the ranks holding their experts by all-to-all (gloo on CPU,
NCCL on GPU). ``synced_gpus=True`` keeps the ranks stepping together until all have finished,
because every rank's forward takes part in the exchange. Exits with status 1 when a rank's
tokens differ from its single-process tokens.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
from datetime import timedelta

import torch
import torch.distributed as dist
from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

import kernel_moe


def tiny_model(num_experts: int) -> Qwen3MoeForCausalLM:
    """A random-weight two-layer Qwen3-MoE, the same on every rank (seeded)."""
    config = Qwen3MoeConfig(vocab_size=128, hidden_size=32, intermediate_size=48, moe_intermediate_size=24,
                            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                            num_experts=num_experts, num_experts_per_tok=2, max_position_embeddings=64,
                            pad_token_id=0, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    model = Qwen3MoeForCausalLM(config)
    with torch.no_grad():  # larger weights than the default init, so generation is not constant
        for p in model.parameters():
            p.normal_(0.0, 0.2)
    return model.eval()


def prompts(rank: int, mode: str) -> torch.Tensor:
    """[2, length] token ids of this rank: different content on every rank, and different lengths
    in the exact mode (the padded mode needs the same token count on every rank)."""
    length = 4 + (3 * rank if mode == "exact" else 0)
    g = torch.Generator().manual_seed(100 + rank)
    return torch.randint(3, 128, (2, length), generator=g)


def run(mode: str, experts: int, new_tokens: int) -> bool:
    """Optimize with expert parallelism in ``mode``, generate on every rank, compare with the
    single-process model; True when every rank generated the same tokens as it."""
    rank, world = dist.get_rank(), dist.get_world_size()
    model = tiny_model(experts)
    single = copy.deepcopy(model)  # the single-process reference, all experts, no exchange
    full = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    # a capacity factor of `world` can never drop a slot: the padded mode is then exact as well
    config = kernel_moe.KernelConfig.for_moe(expert_parallel=True, expert_parallel_mode=mode,
                                             expert_parallel_capacity_factor=float(world))
    manager = kernel_moe.UnifiedManager(config)
    model = manager.optimize(model)
    held = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)

    ids = prompts(rank, mode)
    kwargs = dict(max_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        ours = model.generate(ids, synced_gpus=True, **kwargs)
        reference = single.generate(ids, **kwargs)
    same = ours.shape == reference.shape and torch.equal(ours, reference)
    if rank == 0:
        print(manager.report, flush=True)
    for r in range(world):
        if r == rank:
            print(f"rank {rank}/{world} ({mode}): {len(manager.report.swapped)} MoE blocks, expert parameters "
                  f"{held:,} of {full:,}; prompt {tuple(ids.shape)} -> {ours[0, ids.shape[1]:].tolist()}; "
                  f"{'same tokens as the single-process model' if same else 'DIFFERENT from the single-process model'}",
                  flush=True)
        dist.barrier()
    all_same = torch.tensor([int(same)])
    dist.all_reduce(all_same, op=dist.ReduceOp.MIN)
    if rank == 0:
        print(f"{mode}: all ranks generate the same tokens as the single-process model" if all_same.item()
              else f"{mode}: MISMATCH: some rank generated other tokens than the single-process model", flush=True)
    return bool(all_same.item())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=["exact", "padded", "both"], default="exact")
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=12)
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    dist.init_process_group("gloo", timeout=timedelta(seconds=120))
    modes = ["exact", "padded"] if args.mode == "both" else [args.mode]
    ok = all([run(mode, args.experts, args.new_tokens) for mode in modes])
    dist.destroy_process_group()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

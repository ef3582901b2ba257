"""optimize() with KernelConfig.expert_parallel on 2 and 4 CPU processes (gloo): each rank keeps
1 / world of the experts; outputs equal the single-process layer's (fp32 1e-5) and so do the
gradients (1e-4), for different token counts per rank (0, 1, 7, 300), E in {4, 8, 12}, k in {1, 2}.

What "equal gradients" means: a rank's input and router gradients are those of the single-process
layer run on that rank's tokens (the router is replicated: each copy learns from its own tokens, as
in data parallelism); a rank's expert gradients are those of the single-process layer summed over
the tokens of every rank in the group (the experts are sharded: each sees every rank's tokens).
"""

from __future__ import annotations

import copy
import re

import pytest
import torch
import torch.distributed as dist

import kernel_moe
from helpers import TopKMoE
from kernel_moe import KernelConfig
from parallel.ranks import run_ranks

H, I = 16, 12
FP32 = dict(atol=1e-5, rtol=1e-5)
GRAD = dict(atol=1e-4, rtol=1e-4)


def _tokens(counts: list[int], seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(T, H, generator=g) for T in counts]


def _cotangent(out: torch.Tensor) -> torch.Tensor:
    return torch.linspace(-1, 1, out.numel()).view(out.shape)


def _run(model: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """(output, input gradient, parameter gradients) of one forward and backward."""
    model.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_(True)
    out = model(x)
    (out * _cotangent(out)).sum().backward()
    grads = {n: p.grad.clone() if p.grad is not None else torch.zeros_like(p) for n, p in model.named_parameters()}
    return out.detach(), x.grad if x.grad is not None else torch.zeros_like(x), grads


def _expert_count(model: torch.nn.Module) -> int:
    return sum(p.numel() for n, p in model.named_parameters() if n.startswith("experts."))


def _case(rank: int, E: int, K: int, counts: list[int], mode: str, group=None, members=None) -> list[tuple]:
    """(what, ours, single-process, tolerance) for one layer on this rank."""
    members = members if members is not None else list(range(len(counts)))
    torch.manual_seed(E * 10 + K)
    block = TopKMoE(H, I, E, K)
    single = kernel_moe.optimize(copy.deepcopy(block), KernelConfig.for_moe())
    full_experts = _expert_count(single)
    cfg = KernelConfig.for_moe(expert_parallel=True, expert_parallel_mode=mode,
                               expert_parallel_capacity_factor=float(len(members)))
    layer = kernel_moe.optimize(block, cfg, process_group=group)
    xs = _tokens(counts, seed=E + K)
    out, gx, grads = _run(layer, xs[rank])
    ref_out, ref_gx, ref_grads = _run(single, xs[rank])
    checks = [(f"E{E} k{K} {mode} output", out, ref_out, FP32), ("input grad", gx, ref_gx, GRAD),
              ("router grad", grads["gate.weight"], ref_grads["gate.weight"], GRAD),
              ("expert params x world", torch.tensor(_expert_count(layer) * len(members)), torch.tensor(full_experts),
               {})]
    summed = [_run(single, xs[m])[2] for m in members]
    for name, grad in grads.items():
        if name.startswith("experts."):
            checks.append((f"{name} grad", grad, sum(g[name] for g in summed), GRAD))
    if mode == "padded":
        checks.append(("dropped", layer.expert_parallel_dropped, torch.tensor(0), {}))
        checks += _compiled_checks(layer, xs[rank], out, gx, grads)
    return checks


def _compiled_checks(layer, x, out, gx, grads) -> list[tuple]:
    """The padded layer compiled whole (fullgraph, aot_eager): no graph break, the eager results."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    c_out, c_gx, c_grads = _run(compiled, x)
    c_grads = {n.removeprefix("_orig_mod."): g for n, g in c_grads.items()}
    breaks = sum(torch._dynamo.utils.counters["graph_break"].values())
    checks = [("graph breaks", torch.tensor(breaks), torch.tensor(0), {}), ("compiled output", c_out, out, FP32),
              ("compiled input grad", c_gx, gx, GRAD)]
    return checks + [(f"compiled {n} grad", c_grads[n], g, GRAD) for n, g in grads.items()]


def _worker(rank: int, world: int, cases: list[tuple]) -> list[tuple]:
    checks = []
    for E, K, counts, mode in cases:
        checks += _case(rank, E, K, counts, mode)
    return checks + (_extras_2(rank) if world == 2 else _extras_4(rank))


def _extras_2(rank: int) -> list[tuple]:
    """A DeviceMesh dimension as the group; an experts module swapped alone; a full checkpoint
    loads into the sharded layer."""
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (2,), mesh_dim_names=("ep",))
    checks = _case(rank, 8, 2, [5, 3], "exact", group=mesh["ep"]) + _experts_module_case(rank)
    torch.manual_seed(3)
    block = TopKMoE(H, I, 4, 2)
    full = copy.deepcopy(block.state_dict())
    layer = kernel_moe.optimize(block, KernelConfig.for_moe(expert_parallel=True))
    with torch.no_grad():
        for p in layer.parameters():
            p.zero_()
    layer.load_state_dict(full)
    held = [f"experts.{e}." for e in range(2 * rank, 2 * rank + 2)]
    for name, value in layer.state_dict().items():
        checks.append((f"loaded {name}", value, full[name], {}))
    kept = sorted(n for n in layer.state_dict() if n.startswith("experts."))
    checks.append((f"experts kept {kept}", torch.tensor(kept == sorted(n for n in full if n.startswith(tuple(held)))),
                   torch.tensor(True), {}))
    return checks


def _experts_module_case(rank: int) -> list[tuple]:
    """A transformers experts module swapped alone (routing given by its caller, stacked 3-D
    weights): the sharded FusedExperts against the single-process one."""
    from transformers import Qwen3MoeConfig
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeExperts

    torch.manual_seed(5)
    module = Qwen3MoeExperts(Qwen3MoeConfig(hidden_size=H, moe_intermediate_size=I, num_experts=8))
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0.0, 0.3)
    single = kernel_moe.optimize(copy.deepcopy(module), KernelConfig.for_moe())
    layer = kernel_moe.optimize(module, KernelConfig.for_moe(expert_parallel=True))
    g = torch.Generator().manual_seed(6)
    inputs = []
    for T in (9, 4):
        weights, ids = torch.softmax(torch.randn(T, 8, generator=g), dim=-1).topk(2, dim=-1)
        inputs.append((torch.randn(T, H, generator=g), ids, weights))

    def run(model, x, ids, weights):
        model.zero_grad(set_to_none=True)
        x, weights = x.clone().requires_grad_(True), weights.clone().requires_grad_(True)
        out = model(x, ids, weights)
        (out * _cotangent(out)).sum().backward()
        return out.detach(), x.grad, weights.grad, {n: p.grad.clone() for n, p in model.named_parameters()}

    out, gx, gw, grads = run(layer, *inputs[rank])
    ref_out, ref_gx, ref_gw, _ = run(single, *inputs[rank])
    summed = [run(single, *inputs[r])[3] for r in range(2)]
    checks = [(f"{type(layer).__name__} output", out, ref_out, FP32), ("experts module input grad", gx, ref_gx, GRAD),
              ("experts module routing-weight grad", gw, ref_gw, GRAD)]
    for name, grad in grads.items():
        checks.append((f"experts module {name} grad", grad, sum(g[name] for g in summed)[4 * rank: 4 * rank + 4], GRAD))
    return checks


def _extras_4(rank: int) -> list[tuple]:
    """Two groups of two ranks (each its own expert-parallel group); an uneven split raises."""
    pairs = [dist.new_group([0, 1]), dist.new_group([2, 3])]
    members = [0, 1] if rank < 2 else [2, 3]
    checks = _case(rank, 8, 2, [3, 300, 0, 7], "exact", group=pairs[rank // 2], members=members)
    try:
        kernel_moe.optimize(TopKMoE(H, I, 6, 2), KernelConfig.for_moe(expert_parallel=True))
        message = "no error"
    except ValueError as exc:
        message = str(exc)
    matched = re.search(r"num_experts=6 .*world size 4", message) is not None
    return checks + [(f"uneven split error: {message}", torch.tensor(matched), torch.tensor(True), {})]


CASES = {
    2: [(4, 1, [7, 0], "exact"), (8, 2, [300, 1], "exact"), (12, 2, [1, 7], "exact"), (12, 1, [7, 7], "padded")],
    4: [(12, 2, [0, 1, 7, 300], "exact"), (8, 1, [300, 7, 0, 1], "exact"), (4, 2, [1, 300, 7, 0], "exact"),
        (8, 2, [7, 7, 7, 7], "padded")],
}


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 4])
def test_expert_parallel_layer_equals_the_single_process_layer(world):
    results = run_ranks(_worker, world, CASES[world], timeout_s=600)
    for rank, checks in enumerate(results):
        for what, ours, ref, tol in checks:
            if tol:
                torch.testing.assert_close(ours, ref, **tol, msg=lambda m, w=what, r=rank: f"rank {r} {w}: {m}")
            else:
                assert torch.equal(ours, ref), f"rank {rank} {what}: {ours} != {ref}"


def _post_norm_worker(rank: int, world: int) -> list[tuple]:
    """MuseSpark experts (post-expert norm) swapped alone and sharded over 2 ranks, against the
    single-process layer: outputs, input and routing-weight gradients per rank; the expert weights'
    gradients summed over both ranks' tokens (each rank holds half); the norm weight, replicated, is
    normalised where the experts run, so its gradient summed over the ranks is the total of both."""
    from transformers.models.muse_spark.configuration_muse_spark import MuseSparkTextConfig
    from transformers.models.muse_spark.modeling_muse_spark import MuseSparkExperts

    torch.manual_seed(5)
    cfg = MuseSparkTextConfig(moe_hidden_size=H, moe_intermediate_size=I, num_local_experts=8)
    module = MuseSparkExperts(cfg)
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0.0, 0.3)
    single = kernel_moe.optimize(copy.deepcopy(module), KernelConfig.for_moe())
    layer = kernel_moe.optimize(module, KernelConfig.for_moe(expert_parallel=True))
    g = torch.Generator().manual_seed(6)
    inputs = []
    for T in (9, 4):
        weights, ids = torch.softmax(torch.randn(T, 8, generator=g), dim=-1).topk(2, dim=-1)
        inputs.append((torch.randn(T, H, generator=g), ids, weights))

    def run(model, x, ids, weights):
        model.zero_grad(set_to_none=True)
        x, weights = x.clone().requires_grad_(True), weights.clone().requires_grad_(True)
        out = model(x, ids, weights)
        (out * _cotangent(out)).sum().backward()
        return out.detach(), x.grad, weights.grad, {n: p.grad.clone() for n, p in model.named_parameters()}

    out, gx, gw, grads = run(layer, *inputs[rank])
    ref_out, ref_gx, ref_gw, _ = run(single, *inputs[rank])
    summed = [run(single, *inputs[r])[3] for r in range(2)]
    norm = "post_expert_norm.weight"
    total = grads[norm].clone()
    dist.all_reduce(total)
    checks = [("post-norm experts output", out, ref_out, FP32), ("input grad", gx, ref_gx, GRAD),
              ("routing-weight grad", gw, ref_gw, GRAD), ("norm weight grad, summed", total,
                                                          summed[0][norm] + summed[1][norm], GRAD)]
    for name in ("gate_up_proj", "down_proj"):
        checks.append((f"{name} grad", grads[name], (summed[0][name] + summed[1][name])[4 * rank: 4 * rank + 4], GRAD))
    return checks


@pytest.mark.slow
def test_post_expert_norm_experts_over_two_ranks():
    for rank, checks in enumerate(run_ranks(_post_norm_worker, 2, timeout_s=300)):
        for what, ours, ref, tol in checks:
            torch.testing.assert_close(ours, ref, **tol, msg=lambda m, w=what, r=rank: f"rank {r} {w}: {m}")


def test_optimize_without_an_initialised_group_raises_a_clear_error():
    assert not dist.is_initialized()
    with pytest.raises(ValueError, match="torch.distributed initialised"):
        kernel_moe.optimize(TopKMoE(H, I, 4, 2), KernelConfig.for_moe(expert_parallel=True))
    with pytest.raises(ValueError, match="expert_parallel=False"):
        kernel_moe.optimize(TopKMoE(H, I, 4, 2), KernelConfig.for_moe(), process_group=object())

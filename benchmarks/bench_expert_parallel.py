"""CPU benchmark of expert parallelism (gloo): 2 processes x 1 thread, each holding half of the
experts of a fine-grained MoE layer, against 1 process x 2 threads holding all of them, for the
same tokens; plus the measured inputs of a cost model that predicts 8 to 64 ranks.

    python benchmarks/bench_expert_parallel.py [--experts 64] [--top-k 8] [--hidden 512]
        [--inter 256] [--tokens 256] [--steps 10] [--json OUT]

``--tokens`` is per rank and step (the single process takes ``2 x tokens`` a step). Inference
forward (no_grad), fp32, the exact dispatch mode, random weights and a router trained on nothing
(routing close to uniform). Prints tokens/s of both set-ups, the time split into routing,
all-to-all (the exchange minus the expert computation: the collectives and the dispatch/combine
indexing) and expert compute, the bytes each rank sends per token, and the cost model: all-to-all
latency and bandwidth (all_to_all_single of growing buffers), expert compute rate (rows/s) and
the predicted tokens/s of 8..64 ranks with the same tokens per rank.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import socket
import statistics
import time
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import kernel_moe
from kernel_moe.bench.models import NaiveMoE
from kernel_moe.layers.expert_parallel import local_experts
from kernel_moe.ops.experts import run_experts
from kernel_moe.parallel.expert_parallel import exact_exchange
from kernel_moe.routing.topk import route

COLLECTIVES_PER_FORWARD = 4  # counts, rows, expert ids, results back
RANKS_PREDICTED = (2, 8, 16, 32, 64)


def _block(args) -> NaiveMoE:
    """A fine-grained MoE block: softmax top-k router, many small SwiGLU experts."""
    torch.manual_seed(0)
    return NaiveMoE(args.hidden, args.inter, args.experts, args.top_k).eval()


def _tokens(args, rank: int, step: int, count: int) -> torch.Tensor:
    return torch.randn(count, args.hidden, generator=torch.Generator().manual_seed(1000 * rank + step))


def _split(layer, x: torch.Tensor, parallel: bool) -> dict[str, float]:
    """One forward of ``layer`` phase by phase: seconds of routing, expert compute and (parallel)
    the rest of the exchange, and the rows this rank sent to other ranks."""
    times = {"routing": 0.0, "experts": 0.0, "all_to_all": 0.0, "remote_rows": 0.0}
    t0 = time.perf_counter()
    weights, ids = route(layer.router_logits(x), layer.spec.router.routing, None)
    times["routing"] = time.perf_counter() - t0
    if not parallel:
        t0 = time.perf_counter()
        layer._experts(x, weights, ids)
        times["experts"] = time.perf_counter() - t0
        return times
    ep = layer.expert_parallel
    stacked = local_experts(layer, ep)

    def experts_fn(rows, rows_ids):
        t = time.perf_counter()
        y = run_experts(rows, rows.new_ones(rows_ids.shape), rows_ids, stacked, layer.backend)
        times["experts"] += time.perf_counter() - t
        return y

    t0 = time.perf_counter()
    exact_exchange(x, weights, ids, experts_fn, ep.shard, ep.group)
    times["all_to_all"] = time.perf_counter() - t0 - times["experts"]
    dest = ids.div(ep.shard.local, rounding_mode="floor")
    times["remote_rows"] = float((dest != ep.shard.rank).sum())
    return times


def _throughput(layer, args, rank: int, count: int, parallel: bool) -> float:
    """Seconds per step of ``args.steps`` forwards (after 2 warm-up steps), all ranks together."""
    xs = [_tokens(args, rank, s, count) for s in range(args.steps)]
    with torch.no_grad():
        for x in xs[:2]:
            layer(x)
        if parallel:
            dist.barrier()
        t0 = time.perf_counter()
        for x in xs:
            layer(x)
        if parallel:
            dist.barrier()
    return (time.perf_counter() - t0) / args.steps


def _phases(layer, args, rank: int, count: int, parallel: bool) -> dict[str, float]:
    """Median seconds per phase over ``args.steps`` instrumented forwards."""
    runs = []
    with torch.no_grad():
        for s in range(args.steps):
            if parallel:
                dist.barrier()
            runs.append(_split(layer, _tokens(args, rank, 100 + s, count), parallel))
    return {k: statistics.median(r[k] for r in runs) for k in runs[0]}


def _all_to_all_curve(world: int) -> list[tuple[int, float]]:
    """(bytes each rank sends to each other rank, median seconds of all_to_all_single)."""
    curve = []
    for per_peer in (256, 4096, 65536, 1 << 20, 8 << 20):
        buf = torch.ones(world * per_peer // 4)
        out = torch.empty_like(buf)
        samples = []
        for _ in range(7):
            dist.barrier()
            t0 = time.perf_counter()
            dist.all_to_all_single(out, buf)
            samples.append(time.perf_counter() - t0)
        curve.append((per_peer, statistics.median(samples[2:])))
    return curve


def _parallel_worker(rank: int, world: int, port: int, args, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=300))
    try:
        layer = kernel_moe.optimize(_block(args), kernel_moe.KernelConfig.for_moe(expert_parallel=True))
        held = sum(p.numel() for n, p in layer.named_parameters() if n.startswith("experts."))
        result = dict(step_s=_throughput(layer, args, rank, args.tokens, True),
                      phases=_phases(layer, args, rank, args.tokens, True),
                      curve=_all_to_all_curve(world), expert_params=held)
        buffer = io.BytesIO()
        torch.save(result, buffer)
        queue.put((rank, buffer.getvalue()))
    finally:
        dist.destroy_process_group()


def run_parallel(args, world: int = 2) -> list[dict]:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [ctx.Process(target=_parallel_worker, args=(r, world, port, args, queue)) for r in range(world)]
    for p in procs:
        p.start()
    results = {}
    for _ in range(world):
        rank, value = queue.get(timeout=1800)
        results[rank] = torch.load(io.BytesIO(value), weights_only=False)
    for p in procs:
        p.join()
    return [results[r] for r in range(world)]


def run_single(args, threads: int = 2) -> dict:
    torch.set_num_threads(threads)
    layer = kernel_moe.optimize(_block(args), kernel_moe.KernelConfig.for_moe())
    count = 2 * args.tokens
    return dict(step_s=_throughput(layer, args, 0, count, False), phases=_phases(layer, args, 0, count, False),
                expert_params=sum(p.numel() for n, p in layer.named_parameters() if n.startswith("experts.")))


def cost_model(args, par: list[dict]) -> dict:
    """Latency and bandwidth of all_to_all_single, expert and routing rates, and the predicted
    step time and tokens/s of W ranks with ``args.tokens`` tokens each (weak scaling, balanced
    routing): t(W) = t_routing + t_experts + t_dispatch + collectives * alpha * (W - 1)
    + remote bytes(W) / beta, where t_dispatch (the exchange's indexing, gather and combine) is what
    the measured all-to-all phase of 2 ranks leaves over the collectives' model."""
    curve = [statistics.mean(c) for c in zip(*[[t for _, t in r["curve"]] for r in par])]
    sizes = [s for s, _ in par[0]["curve"]]
    alpha = curve[0]  # seconds of the smallest all-to-all: latency per peer (one peer here)
    beta = sizes[-1] / max(curve[-1] - alpha, 1e-9)  # bytes/s each rank sends to a peer
    ph = {k: statistics.mean(r["phases"][k] for r in par) for k in par[0]["phases"]}
    rows_per_step = args.tokens * args.top_k  # rows each rank computes a step with balanced routing
    expert_rate = rows_per_step / ph["experts"]
    elt = 4

    def collectives(W: int) -> tuple[float, float]:
        remote = args.tokens * args.top_k * (W - 1) / W * (args.hidden * elt * 2 + 8)  # bytes a rank sends
        return COLLECTIVES_PER_FORWARD * alpha * (W - 1) + remote / beta, remote

    dispatch = max(ph["all_to_all"] - collectives(len(par))[0], 0.0)
    predicted = []
    for W in [w for w in RANKS_PREDICTED if args.experts % w == 0]:
        t_coll, remote = collectives(W)
        t = ph["routing"] + rows_per_step / expert_rate + dispatch + t_coll
        predicted.append(dict(ranks=W, step_ms=t * 1e3, collectives_ms=t_coll * 1e3,
                              remote_bytes_per_token=remote / args.tokens, tokens_per_s=W * args.tokens / t,
                              experts_per_rank=args.experts // W))
    return dict(alpha_s=alpha, beta_bytes_per_s=beta, curve=list(zip(sizes, curve)), expert_rows_per_s=expert_rate,
                routing_tokens_per_s=args.tokens / ph["routing"], dispatch_s=dispatch, predicted=predicted)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experts", type=int, default=64)
    parser.add_argument("--top-k", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--inter", type=int, default=256)
    parser.add_argument("--tokens", type=int, default=256, help="tokens per rank and step")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    load = os.getloadavg()
    par = run_parallel(args)
    single = run_single(args)
    load_after = os.getloadavg()
    W = len(par)
    tokens = W * args.tokens
    par_step = max(r["step_s"] for r in par)
    ph = {k: statistics.mean(r["phases"][k] for r in par) for k in par[0]["phases"]}
    bytes_per_token = ph["remote_rows"] * (args.hidden * 4 * 2 + 8) / args.tokens
    model = cost_model(args, par)
    print(f"layer: E={args.experts} top-{args.top_k} H={args.hidden} I={args.inter}, fp32, {args.tokens} tokens per "
          f"rank and step ({tokens} a step in all); load average {load[0]:.1f} before, {load_after[0]:.1f} after")
    print(f"expert parameters per process: {par[0]['expert_params']:,} (2 ranks) vs {single['expert_params']:,} "
          "(1 process)")
    print(f"{'set-up':<24}{'tokens/s':>10}{'step ms':>10}{'routing':>10}{'all-to-all':>12}{'experts':>10}")
    print(f"{'2 processes x 1 thread':<24}{tokens / par_step:>10.0f}{par_step * 1e3:>10.1f}"
          f"{ph['routing'] * 1e3:>10.1f}{ph['all_to_all'] * 1e3:>12.1f}{ph['experts'] * 1e3:>10.1f}")
    sp = single["phases"]
    print(f"{'1 process x 2 threads':<24}{tokens / single['step_s']:>10.0f}{single['step_s'] * 1e3:>10.1f}"
          f"{sp['routing'] * 1e3:>10.1f}{'-':>12}{sp['experts'] * 1e3:>10.1f}")
    print(f"ratio (2 processes / 1 process tokens/s): {single['step_s'] / par_step:.2f}")
    print(f"bytes each rank sends to the other per token (rows there and back, ids): {bytes_per_token:.0f} "
          f"({ph['remote_rows'] / args.tokens:.2f} of {args.top_k} slots remote)")
    print("cost model: all_to_all_single per peer size -> seconds: "
          + ", ".join(f"{s} B {t * 1e3:.2f} ms" for s, t in model["curve"]))
    print(f"  latency alpha {model['alpha_s'] * 1e6:.0f} us per peer, bandwidth beta "
          f"{model['beta_bytes_per_s'] / 1e9:.2f} GB/s per peer, expert compute {model['expert_rows_per_s']:.0f} rows/s "
          f"per rank ({model['expert_rows_per_s'] * 6 * args.hidden * args.inter / 1e9:.1f} GFLOP/s), routing "
          f"{model['routing_tokens_per_s']:.0f} tokens/s, dispatch indexing {model['dispatch_s'] * 1e3:.2f} ms a step")
    print(f"  {'ranks':>6}{'experts/rank':>14}{'remote B/token':>16}{'collectives ms':>16}{'step ms':>10}"
          f"{'tokens/s':>12}")
    for p in model["predicted"]:
        print(f"  {p['ranks']:>6}{p['experts_per_rank']:>14}{p['remote_bytes_per_token']:>16.0f}"
              f"{p['collectives_ms']:>16.2f}{p['step_ms']:>10.1f}{p['tokens_per_s']:>12.0f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(args=vars(args), load=[load, load_after], parallel=par, single=single, model=model,
                           bytes_per_token=bytes_per_token), f, indent=1, default=str)


if __name__ == "__main__":
    main()

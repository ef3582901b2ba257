"""The native CPU extension (kernels/cpu): its grouped matrix-vector kernel against fp64
matmuls, its fused forward against the reference, the experts op's choice between them and
the PyTorch path, and the setting that switches the extension.

Where the extension cannot be built here the kernel tests are skipped with the build error;
with ``KERNEL_MOE_CPU_EXTENSION=require`` (set by ``make test`` and CI) they fail instead.
"""

from __future__ import annotations

import math

import pytest
import torch

from helpers import (as_fp32, assert_fp32_close, assert_low_precision_close, limit_for, no_compiler, op_inputs,
                     run_op, run_reference, simulate_cpu_extension_build)
from kernel_moe.kernels import cpu as cpu_kernels
from kernel_moe.kernels.cpu import forward as cpu_forward


@pytest.fixture(scope="module")
def ext():
    module = cpu_kernels.cpu_extension()
    if module is None:
        pytest.skip(f"native CPU extension unavailable: {cpu_kernels.extension_status()}")
    return module


def _reference(x_SK, w_ENK, counts):
    rows, start = [], 0
    for e, n in enumerate(counts):
        rows.append(x_SK[start : start + n].double() @ w_ENK[e].double().t())
        start += n
    return torch.cat(rows)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("counts", [[1], [0, 1, 0], [2, 0, 3], [5, 6, 7, 0], [9, 1, 4, 8], [0, 0, 0]],
                         ids=lambda c: "-".join(map(str, c)))
@pytest.mark.parametrize("K", [1, 16, 37, 64, 512])
@pytest.mark.parametrize("N", [24, 23])
def test_grouped_matvec_matches_fp64(ext, dtype, counts, K, N):
    """Rows in blocks of four plus every remainder, experts without rows, K not a multiple
    of the vector width (and a multiple of the bf16 kernel's 32), weight rows in pairs and one
    left alone (odd N)."""
    g = torch.Generator().manual_seed(K + len(counts))
    E, S = len(counts), sum(counts)
    w_ENK = torch.randn(E, N, K, generator=g).to(dtype)
    x_SK = torch.randn(S, K, generator=g)
    y_SN = ext.grouped_matvec(x_SK, w_ENK, counts)
    assert y_SN.shape == (S, N) and y_SN.dtype == torch.float32
    torch.testing.assert_close(y_SN.double(), _reference(x_SK, w_ENK, counts), rtol=1e-5, atol=1e-5 * K**0.5)


@pytest.mark.parametrize("M", [17, 31, 64, 70, 100, 200])
@pytest.mark.parametrize("K,N", [(2, 5), (96, 50), (256, 37)])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("float_out", [False, True], ids=["bf16_out", "fp32_out"])
def test_bf16_gemm_matches_fp64(ext, M, K, N, bias, float_out):
    """The fused forward's bf16 expert GEMM (more than 16 rows): every panel split of M (two to eight
    16-token vectors, padded tails), N not a multiple of its 6- or 4-row blocks or of 16, strided
    weight rows. Against the fp64 product (+ bias): what summing K products in fp32 may lose
    (K * 2^-24 <= 2^-16 of the sum of their magnitudes), plus one bf16 rounding of the result
    (2^-8 of it) for a bf16 out; an fp32 out (the down projection's, summed over the top-k in fp32)
    is not rounded."""
    if not ext.has_bf16_gemm():
        pytest.skip("this CPU has no bf16 dot-product instruction")
    g = torch.Generator().manual_seed(M * K + N)
    x = torch.randn(M, K, generator=g).bfloat16()
    w = torch.randn(N, K + 6, generator=g).bfloat16()[:, 3 : 3 + K]
    b = torch.randn(N, generator=g).bfloat16() if bias else None
    ref = x.double() @ w.double().t() + (b.double() if bias else 0)
    magnitude = x.double().abs() @ w.double().abs().t() + (b.double().abs() if bias else 0)
    got = ext.bf16_gemm(x, w, b, float_out=float_out)
    assert got.dtype == (torch.float32 if float_out else torch.bfloat16) and got.shape == (M, N)
    rounding = 0 if float_out else 2**-8
    excess = (got.double() - ref).abs() - (rounding * ref.abs() + 2**-16 * magnitude)
    assert excess.max() <= 0, excess.max()


def test_grouped_matvec_reads_strided_weight_views(ext):
    """Every other expert of a stack and rows sliced from a wider matrix: any expert and row
    stride, unit stride along K."""
    g = torch.Generator().manual_seed(3)
    base = torch.randn(8, 40, 70, generator=g)
    w_ENK = base[::2, 5:29, 3:67]  # [4, 24, 64]
    counts = [3, 0, 5, 1]
    x_SK = torch.randn(9, 64, generator=g)
    torch.testing.assert_close(ext.grouped_matvec(x_SK, w_ENK, counts).double(), _reference(x_SK, w_ENK, counts),
                               rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("bad,match", [
    (lambda x, w, c: (x.double(), w, c), "contiguous float32"),
    (lambda x, w, c: (x, w.half(), c), "float32 or bfloat16"),
    (lambda x, w, c: (x, w.transpose(1, 2), c), "unit stride"),
    (lambda x, w, c: (x, w, c[:-1]), "counts for"),
    (lambda x, w, c: (x, w, [c[0] + 1, *c[1:]]), "counts sum to"),
    (lambda x, w, c: (x[:, :-1].contiguous(), w, c), "features"),
])
def test_grouped_matvec_rejects_bad_inputs(ext, bad, match):
    x_SK, w_ENK, counts = torch.randn(4, 8), torch.randn(2, 6, 8), [1, 3]
    with pytest.raises(RuntimeError, match=match):
        ext.grouped_matvec(*bad(x_SK, w_ENK, counts))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("T", [1, 2, 7, 20])
@pytest.mark.parametrize("activation,glu", [("silu", "concat"), ("gelu", "none"), ("gpt_oss", "interleaved")])
def test_experts_op_on_the_native_path_matches_reference(ext, monkeypatch, dtype, T, activation, glu):
    """The op takes the native path for these shapes (checked) and matches the reference,
    biases included."""
    calls = _spy(monkeypatch, ext, "matvec_experts")
    inputs = op_inputs(T, 32, 24, 8, 2, glu=glu, bias=True, dtype=dtype, seed=T)
    out = run_op(inputs, activation, glu, 1.702, limit_for(glu), backend="cpu")
    assert calls, "the native kernel was not used"
    assert out.dtype == dtype
    if dtype == torch.float32:
        assert_fp32_close(out, run_reference(inputs, activation, glu, 1.702, limit_for(glu)))
    else:
        assert_low_precision_close(out, run_reference(as_fp32(inputs), activation, glu, 1.702, limit_for(glu)))


def _spy(monkeypatch, ext, name: str = "fused_experts") -> list:
    """Calls of the native kernel ``name`` (one entry each) while the test runs."""
    calls = []
    real = getattr(ext, name)
    monkeypatch.setattr(ext, name, lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


def test_many_rows_per_expert_take_the_fused_forward_and_fp64_the_torch_path(ext, monkeypatch):
    monkeypatch.setattr(ext, "matvec_experts", lambda *a, **k: pytest.fail("matrix-vector path taken"))
    calls = _spy(monkeypatch, ext)
    many = op_inputs(200, 32, 24, 4, 2, seed=1)  # 100 rows per expert
    assert_fp32_close(run_op(many, backend="cpu"), run_reference(many))
    assert calls == [1]
    fp64 = op_inputs(3, 32, 24, 4, 2, dtype=torch.float64, seed=2)
    fp64["topk_weights"] = fp64["topk_weights"].double()
    torch.testing.assert_close(run_op(fp64, backend="cpu"), run_reference(fp64), rtol=1e-12, atol=1e-12)
    assert calls == [1]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("activation,glu", [("silu", "concat"), ("gelu_tanh", "none"), ("relu", "interleaved"),
                                            ("gpt_oss", "interleaved")])
def test_experts_op_on_the_fused_forward_matches_reference(ext, monkeypatch, dtype, activation, glu):
    """Biases, uneven routing over 6 experts, 40 rows per expert on average (checked that the
    fused forward runs)."""
    calls = _spy(monkeypatch, ext)
    inputs = op_inputs(120, 32, 24, 6, 2, glu=glu, bias=True, dtype=dtype, seed=11)
    out = run_op(inputs, activation, glu, 1.702, limit_for(glu), backend="cpu")
    assert calls == [1] and out.dtype == dtype
    if dtype == torch.float32:
        assert_fp32_close(out, run_reference(inputs, activation, glu, 1.702, limit_for(glu)))
    else:
        assert_low_precision_close(out, run_reference(as_fp32(inputs), activation, glu, 1.702, limit_for(glu)))


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("routing", ["one", "few", "random"])
def test_fused_forward_on_one_thread_matches_reference(ext, monkeypatch, one_thread, routing):
    """One thread runs the tasks one after the other instead of side by side."""
    calls = _spy(monkeypatch, ext)
    inputs = op_inputs(300, 32, 24, 8, 2, bias=True, routing=routing, seed=12)
    assert_fp32_close(run_op(inputs, backend="cpu"), run_reference(inputs))
    assert calls == [1]


def test_fused_forward_with_fewer_tasks_than_threads_matches_reference(ext, monkeypatch):
    """Ten rows, all on one expert: one task, run outside a parallel region so that its GEMMs
    may use every thread."""
    calls = _spy(monkeypatch, ext)
    inputs = op_inputs(10, 32, 24, 4, 1, bias=True, routing="one", seed=16)
    assert_fp32_close(run_op(inputs, backend="cpu"), run_reference(inputs))
    assert calls == [1]


def _fused_args(inputs: dict, activation: str = "silu", glu: str = "concat") -> tuple:
    i = inputs
    E = i["w_up"].shape[0]
    slots = cpu_forward.sort_slots(i["topk_ids"], E)
    return (i["x"], i["topk_weights"], slots.order_S, slots.counts, i["w_up"], i["w_down"], i["b_up"], i["b_down"],
            activation, glu, 1.702, math.inf, math.inf, math.inf)


def test_fused_forward_splits_a_busy_expert_and_repeats_bit_for_bit(ext):
    """All 1200 rows on two experts: each is cut into several tasks; two runs agree exactly
    (every token sums its outputs in slot order, whatever the schedule)."""
    inputs = op_inputs(600, 32, 24, 4, 2, routing="few", seed=13)
    first = ext.fused_experts(*_fused_args(inputs))
    assert_fp32_close(first, run_reference(inputs))
    assert torch.equal(first, ext.fused_experts(*_fused_args(inputs)))


def test_fused_forward_reuses_its_workspace_across_sizes_and_threads(ext):
    """The buffer of sorted expert outputs is kept between calls (kernels/cpu/workspace.h): a call
    smaller than the one before uses a prefix of it, a larger one replaces it, and calls from several
    Python threads at once (one holds it, the others get buffers of their own) each give exactly
    what that call gives alone."""
    calls = [op_inputs(T, 32, 24, 6, 2, seed=T) for T in (300, 40, 700, 90, 300)]
    for c in calls:
        assert_fp32_close(ext.fused_experts(*_fused_args(c)), run_reference(c))
    _concurrent_calls_match(lambda c: ext.fused_experts(*_fused_args(c)), calls, threads=4, repeats=5)


def _concurrent_calls_match(call, args: list, threads: int, repeats: int) -> None:
    """Several Python threads each call ``call(a)`` for every ``a`` of ``args``, ``repeats`` times,
    each thread in its own order: every result equals that call's result made alone."""
    import threading

    alone = [call(a) for a in args]
    got = [[None] * len(args) for _ in range(threads)]

    def worker(w):
        for _ in range(repeats):
            for i in range(len(args)):
                j = (i + w) % len(args)
                got[w][j] = call(args[j])

    pool = [threading.Thread(target=worker, args=(w,)) for w in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join(timeout=120)
    for per_thread in got:
        for out, want in zip(per_thread, alone):
            assert torch.equal(out, want)


def test_fused_forward_records_nothing_for_weights_that_require_grad(ext):
    inputs = op_inputs(50, 32, 24, 4, 2, seed=14)
    inputs["w_up"].requires_grad_(True)
    inputs["w_down"].requires_grad_(True)
    with torch.enable_grad():
        out = ext.fused_experts(*_fused_args(inputs))
    assert not out.requires_grad
    assert_fp32_close(out, run_reference(inputs).detach())


@pytest.mark.parametrize("bad,match", [
    (lambda a: (a[0], a[1], torch.cat([a[2], a[2][:1]]), *a[3:]), "order has"),
    (lambda a: (a[0], a[1], a[2].flip(0)[:-1], *a[3:]), "counts sum to"),
    (lambda a: (a[0], a[1], torch.zeros_like(a[2]), *a[3:]), "or twice"),
    (lambda a: (*a[:3], [a[3][0] + 1, *a[3][1:]], *a[4:]), "counts sum to"),
    (lambda a: (*a[:4], a[4].double(), *a[5:]), "share one dtype"),
    (lambda a: (a[0].double(), a[1], a[2], a[3], a[4].double(), a[5].double(), *a[6:]), "float32, bfloat16"),
    (lambda a: (*a[:8], "swish", *a[9:]), "activation 'swish'"),
    (lambda a: (*a[:8], "gpt_oss", "none", *a[10:]), "needs a gated layout"),
])
def test_fused_forward_rejects_bad_inputs(ext, bad, match):
    args = _fused_args(op_inputs(6, 8, 4, 3, 2, seed=15))
    with pytest.raises(RuntimeError, match=match):
        ext.fused_experts(*bad(args))


def test_off_disables_the_extension(monkeypatch):
    monkeypatch.setenv(cpu_kernels.ENV, "off")
    assert cpu_kernels.cpu_extension() is None
    assert cpu_kernels.extension_status().startswith("off")
    inputs = op_inputs(1, 32, 24, 8, 2, seed=5)
    assert_fp32_close(run_op(inputs, backend="cpu"), run_reference(inputs))


def test_unknown_setting_raises_naming_the_variable(monkeypatch):
    monkeypatch.setenv(cpu_kernels.ENV, "fast")
    with pytest.raises(ValueError, match=r"KERNEL_MOE_CPU_EXTENSION='fast'.*auto, off, require"):
        cpu_kernels.cpu_extension()


def test_failed_build_falls_back_with_auto_and_raises_with_require(monkeypatch):
    """A machine without a compiler: auto runs the PyTorch path, require raises the build error."""
    simulate_cpu_extension_build(monkeypatch, no_compiler)
    monkeypatch.setenv(cpu_kernels.ENV, "auto")
    assert cpu_kernels.cpu_extension() is None
    assert "no C++ compiler" in cpu_kernels.extension_status()
    inputs = op_inputs(1, 32, 24, 8, 2, seed=6)
    assert_fp32_close(run_op(inputs, backend="cpu"), run_reference(inputs))
    monkeypatch.setenv(cpu_kernels.ENV, "require")
    with pytest.raises(RuntimeError, match="no C.. compiler"):
        cpu_kernels.cpu_extension()


def test_fused_forward_leaves_dropped_slots_out(ext, monkeypatch):
    """Slots with ids outside [0, E) are not in the sorted order: they add nothing."""
    calls = _spy(monkeypatch, ext)
    inputs = op_inputs(300, 32, 24, 4, 2, bias=True, seed=17)
    inputs["topk_ids"][::7, 1] = -1
    inputs["topk_ids"][::11, 0] = 4
    kept = dict(inputs, topk_weights=inputs["topk_weights"].clone(), topk_ids=inputs["topk_ids"].clamp(0, 3))
    kept["topk_weights"][(inputs["topk_ids"] < 0) | (inputs["topk_ids"] > 3)] = 0.0
    assert_fp32_close(run_op(inputs, backend="cpu"), run_reference(kept))
    assert calls == [1]


def test_grouped_matvec_from_many_threads_and_a_forked_child(ext):
    """The matrix-vector kernels' own thread pool (kernels/cpu/pool.h): calls from several Python
    threads at once take turns and stay exact, and a forked child (a data-loader worker) starts a
    pool of its own instead of waiting for its parent's threads."""
    import multiprocessing
    import threading

    g = torch.Generator().manual_seed(11)
    counts = [3, 0, 4, 2]
    w_ENK = torch.randn(4, 256, 96, generator=g)
    xs = [torch.randn(9, 96, generator=g) for _ in range(6)]
    want = [_reference(x, w_ENK, counts) for x in xs]
    got = [None] * len(xs)

    def call(i):
        for _ in range(20):
            got[i] = ext.grouped_matvec(xs[i], w_ENK, counts)

    threads = [threading.Thread(target=call, args=(i,)) for i in range(len(xs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    for y, ref in zip(got, want):
        torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-4)

    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    child = ctx.Process(target=_child_matvec, args=(queue, xs[0], w_ENK, counts))
    child.start()
    result = queue.get(timeout=120)
    child.join(timeout=30)
    assert child.exitcode == 0, "the forked child did not finish its call"
    torch.testing.assert_close(torch.tensor(result, dtype=torch.float64), want[0], rtol=1e-5, atol=1e-4)


def _child_matvec(queue, x_SK, w_ENK, counts):
    torch.set_num_threads(2)
    queue.put(cpu_kernels.cpu_extension().grouped_matvec(x_SK, w_ENK, counts).tolist())


def _sorted_call(T: int, K: int, E: int, g: torch.Generator) -> tuple:
    """(topk_weights [T, K], order [S'], counts [E]) of a random routing, every fifth slot dropped
    (left out of order, its weight NaN: it must add nothing)."""
    ids = torch.randint(0, E, (T * K,), generator=g)
    w_TK = torch.rand(T, K, generator=g)
    kept = torch.tensor([s for s in range(T * K) if s % 5 != 2], dtype=torch.long)
    w_TK.view(-1)[2::5] = float("nan")
    order = kept[torch.sort(ids[kept], stable=True).indices]
    counts = torch.bincount(ids[kept], minlength=E).tolist()
    return w_TK, order, counts, ids


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("T", [1, 3, 40])
def test_matvec_experts_sums_each_tokens_kept_slots(ext, dtype, T):
    """The decode forward called directly: gather, both projections with biases, SwiGLU and the
    combine in fp32 slot order, dropped slots adding nothing; more than 8 tokens combine in
    several chunks. Against an fp64 computation of the same formulas."""
    g = torch.Generator().manual_seed(T)
    K, E, H, I = 3, 5, 40, 24
    w_TK, order, counts, ids = _sorted_call(T, K, E, g)
    x = torch.randn(T, H, generator=g).to(dtype)
    w_up = (torch.randn(E, 2 * I, H, generator=g) / math.sqrt(H)).to(dtype)  # outputs of order one, as in a layer
    w_down = (torch.randn(E, H, I, generator=g) / math.sqrt(I)).to(dtype)
    b_up, b_down = torch.randn(E, 2 * I, generator=g).to(dtype), torch.randn(E, H, generator=g).to(dtype)
    out = ext.matvec_experts(x, w_TK, order, counts, w_up, w_down, b_up, b_down, "silu", "concat", 1.0,
                             float("inf"), float("inf"), float("inf"))
    expected = torch.zeros(T, H, dtype=torch.float64)
    for s in order.tolist():
        e, t = int(ids[s]), s // K
        h = w_up[e].double() @ x[t].double() + b_up[e].double()
        a = torch.nn.functional.silu(h[:I]) * h[I:]
        expected[t] += w_TK.view(-1)[s].double() * (w_down[e].double() @ a + b_down[e].double())
    assert out.dtype == dtype and out.shape == (T, H)
    if dtype == torch.float32:
        torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)
    else:
        assert_low_precision_close(out, expected.float())


def test_matvec_experts_rejects_bad_inputs(ext):
    g = torch.Generator().manual_seed(0)
    w_TK, order, counts, _ = _sorted_call(2, 2, 3, g)
    x, w_up, w_down = torch.randn(2, 8), torch.randn(3, 12, 8), torch.randn(3, 8, 6)
    act = ("silu", "concat", 1.0, float("inf"), float("inf"), float("inf"))
    with pytest.raises(RuntimeError, match="share one dtype"):
        ext.matvec_experts(x, w_TK, order, counts, w_up.bfloat16(), w_down, None, None, *act)
    with pytest.raises(RuntimeError, match="or twice"):
        ext.matvec_experts(x, w_TK, order.repeat(2)[:len(order)] * 0, counts, w_up, w_down, None, None, *act)
    with pytest.raises(RuntimeError, match="need both scales"):
        ext.matvec_experts(x, w_TK, order, counts, w_up, w_down, None, None, *act, format=1)
    with pytest.raises(RuntimeError, match=r"b_up must be \[E, N\]"):
        ext.matvec_experts(x, w_TK, order, counts, w_up, w_down, torch.randn(3, 6), None, *act)
    with pytest.raises(RuntimeError, match="for hidden size 8"):
        ext.matvec_experts(x, w_TK, order, counts, w_up, w_down[:, :4], None, None, *act)
    with pytest.raises(RuntimeError, match="activation 'tanh' is not supported"):
        ext.matvec_experts(x, w_TK, order, counts, w_up, w_down, None, None, "tanh", *act[1:])


def test_matvec_experts_from_several_threads_then_idle(ext):
    """The decode forward runs on the calling thread's OpenMP team or on the kernels' pool
    (kernels/cpu/pool.h), chosen per call: calls from several Python threads at once (each with a
    team of its own) stay exact, and afterwards the process uses next to no CPU while it sleeps (a
    pool worker that kept polling would use about the whole sleep)."""
    import time

    if torch.get_num_threads() < 2:
        pytest.skip("the pool needs two threads")
    g = torch.Generator().manual_seed(5)
    K, E, H, I = 2, 6, 256, 128
    calls = []
    for T in (1, 2, 4, 8):
        w_TK, order, counts, _ = _sorted_call(T, K, E, g)
        w_TK = torch.nan_to_num(w_TK)
        calls.append((torch.randn(T, H, generator=g), w_TK, order, counts))
    w_up, w_down = torch.randn(E, 2 * I, H, generator=g), torch.randn(E, H, I, generator=g)
    act = ("silu", "concat", 1.0, float("inf"), float("inf"), float("inf"))

    def call(c):
        return ext.matvec_experts(c[0], c[1], c[2], c[3], w_up, w_down, None, None, *act)

    _concurrent_calls_match(call, calls, threads=3, repeats=30)
    time.sleep(0.05)
    start = time.process_time()
    time.sleep(0.5)
    assert time.process_time() - start < 0.1


def test_omp_team_is_awake_right_after_a_parallel_op_and_asleep_later(ext, monkeypatch):
    """kernels/cpu/omp_team.h: right after a PyTorch parallel region the team's worker spins
    (libgomp's default), so a decode call may run on it; 0.3 s later it sleeps, and with one
    thread there is no team. Reads /proc, as the kernels do."""
    import os
    import time

    if torch.get_num_threads() < 2:
        pytest.skip("a team needs two threads")
    if os.environ.get("OMP_WAIT_POLICY") or os.environ.get("GOMP_SPINCOUNT"):
        pytest.skip("OpenMP's spinning was configured for this process")
    big = torch.ones(2**22)
    awake = []
    for _ in range(50):  # a moment when no other process's thread is runnable beside ours
        big.mul_(1.0)
        awake.append(ext.omp_team_awake())
    assert any(awake)
    time.sleep(0.3)
    assert not ext.omp_team_awake()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        big.mul_(1.0)
        assert not ext.omp_team_awake()
    finally:
        torch.set_num_threads(threads)

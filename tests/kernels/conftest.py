"""Kernel tests: Triton runs through its interpreter on CPU unless told otherwise.

TRITON_INTERPRET must be set before triton is first imported, hence at the very top here.
On a GPU machine run the ``gpu`` tests compiled: ``TRITON_INTERPRET=0 pytest tests/kernels -m gpu``.
Every test module that needs triton skips cleanly when triton is not installed.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import math  # noqa: E402
import types  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU and compiled Triton (TRITON_INTERPRET=0)")


def interpreting() -> bool:
    from kernel_moe.kernels import triton_interpreter_enabled

    return triton_interpreter_enabled()


def sqnr_db(out: torch.Tensor, ref: torch.Tensor) -> float:
    """Signal-to-quantisation-noise ratio of ``out`` against ``ref`` in dB."""
    ref = ref.double()
    noise = (out.double() - ref).pow(2).sum().item()
    signal = ref.pow(2).sum().item()
    return math.inf if noise == 0 else 10.0 * math.log10(signal / noise)


def make_moe(T, H, I, E, K, *, glu="concat", dtype=torch.float32, bias=False, device="cpu", seed=0, skew=None):
    """Random MoE inputs with outputs of order one. ``skew``: None (random top-k of random
    logits), "one" (every slot of every token to expert 0 .. K-1, expert 0 first) or
    "few" (only experts 0 and E-1 get tokens when K allows)."""
    g = torch.Generator().manual_seed(seed)
    N = 2 * I if glu != "none" else I
    x = torch.randn(T, H, generator=g)
    logits = torch.randn(T, E, generator=g)
    if skew == "one":
        logits = torch.arange(E, 0, -1, dtype=torch.float32).expand(T, E).clone()
    elif skew == "few":
        logits = torch.full((T, E), -10.0)
        logits[:, 0] = torch.rand(T, generator=g)
        logits[:, E - 1] = torch.rand(T, generator=g)
        logits[:, 1 : E - 1] -= torch.rand(T, E - 2, generator=g)
    weights, ids = torch.softmax(logits, dim=-1).topk(K, dim=-1)
    w_up = torch.randn(E, N, H, generator=g) / math.sqrt(H)
    w_down = torch.randn(E, H, I, generator=g) / math.sqrt(I)
    b_up = torch.randn(E, N, generator=g) * 0.1 if bias else None
    b_down = torch.randn(E, H, generator=g) * 0.1 if bias else None

    def cast(t):
        return None if t is None else t.to(device=device, dtype=dtype)

    return dict(
        x_TH=cast(x),
        topk_weights_TK=weights.to(device),
        topk_ids_TK=ids.to(device),
        w_up_ENH=cast(w_up),
        w_down_EHI=cast(w_down),
        b_up_EN=cast(b_up),
        b_down_EH=cast(b_down),
    )


def stacked(inputs: dict, activation="silu", glu="concat", alpha=1.702, limit=math.inf, **extra):
    """The StackedExperts of ``make_moe`` inputs with that activation (``extra``: weight_format,
    expert_map)."""
    from kernel_moe.kernels.contract import Activation, StackedExperts

    return StackedExperts(inputs["w_up_ENH"], inputs["w_down_EHI"], inputs["b_up_EN"], inputs["b_down_EH"],
                          Activation(activation, glu, alpha, limit), **extra)


def call_args(inputs: dict, **act) -> tuple:
    """(x, topk_weights, topk_ids, experts): the positional arguments of the Triton entry points."""
    return inputs["x_TH"], inputs["topk_weights_TK"], inputs["topk_ids_TK"], stacked(inputs, **act)


def as_fp32(inputs: dict) -> dict:
    """The same inputs with every floating tensor in fp32 (for the reference)."""
    return {k: (v.float() if isinstance(v, torch.Tensor) and v.is_floating_point() else v) for k, v in inputs.items()}


@pytest.fixture(scope="session")
def kt():
    """Helpers shared by the kernel tests (a fixture, so that no test imports conftest)."""
    return types.SimpleNamespace(make_moe=make_moe, as_fp32=as_fp32, sqnr_db=sqnr_db, interpreting=interpreting,
                                 stacked=stacked, call_args=call_args)

"""What the numbered examples share: the command line, the output folder, printed tables,
figures (matplotlib, optional), and a small synthetic language-modelling task with learnable
structure plus the tiny model and training loop that 002 and 003 train on it.

Not an API: each example shows its workflow on kernel_moe's public API; this file only keeps
them short.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import kernel_moe
from kernel_moe import training

EXAMPLES_DIR = Path(__file__).resolve().parent
DEFAULT_OUT = EXAMPLES_DIR / "out"  # git-ignored
MISSING_MATPLOTLIB = "matplotlib is not installed: figures skipped (pip install 'kernel_moe[plot]')"


# ---------------------------------------------------------------- command line, output
def parser(doc: str) -> argparse.ArgumentParser:
    """The options every example takes: --smoke, --out, --threads, --seed."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny sizes and few steps (a quick check that it runs)")
    ap.add_argument("--out", type=Path, default=None,
                    help=f"folder for figures and files (default: {DEFAULT_OUT.relative_to(EXAMPLES_DIR.parent)}/<example>)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch intra-op threads (default 1: these models are small, and on a CPU shared with "
                         "other busy processes more threads can make a call many times slower)")
    ap.add_argument("--seed", type=int, default=0)
    return ap


def setup(args: argparse.Namespace, name: str, writes_files: bool = True) -> Path:
    """Apply --threads and --seed, print a header; returns the output folder (created when a file is
    written there)."""
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    out = args.out if args.out is not None else DEFAULT_OUT / name
    mode = "smoke" if args.smoke else "full"
    where = f"; output in {out}" if writes_files else ""
    print(f"== {name} ({mode} mode, torch {torch.__version__}, {torch.get_num_threads()} thread(s), "
          f"kernel_moe {kernel_moe.__version__}){where}")
    return out


def section(title: str) -> None:
    print(f"\n-- {title}")


def print_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    """An aligned text table; floats as given (format them before)."""
    cells = [[str(c) for c in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    print("  ".join(h.ljust(w) for h, w in zip(headers, widths)).rstrip())
    print("  ".join("-" * w for w in widths))
    for r in cells:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())


def show_kernel_moe_warnings() -> None:
    """Print the warnings kernel_moe logs (its logger has only a NullHandler by default)."""
    logger = logging.getLogger("kernel_moe")
    if not any(getattr(h, "_examples", False) for h in logger.handlers):
        handler = logging.StreamHandler(sys.stdout)
        handler.setLevel(logging.WARNING)
        handler.setFormatter(logging.Formatter("  [%(levelname)s] %(message)s"))
        handler._examples = True
        logger.addHandler(handler)


class Clock:
    """Seconds since the example started (printed at the end)."""

    def __init__(self) -> None:
        self.start = time.perf_counter()

    def done(self) -> None:
        print(f"\ndone in {time.perf_counter() - self.start:.1f} s")


# ---------------------------------------------------------------- figures
def new_figure(width: float, height: float):
    """A matplotlib Figure (object API, no pyplot), or None with a message when matplotlib is
    missing."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        print(MISSING_MATPLOTLIB)
        return None
    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def save_figure(fig, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    print(f"figure: {os.fspath(path)}")


# ---------------------------------------------------------------- modules
class MLP(nn.Module):
    """fc1 -> ReLU -> fc2, with biases: [..., d] -> [..., d]."""

    def __init__(self, input_dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(input_dim, hidden_dim)
        self.fc2 = nn.Linear(hidden_dim, input_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.relu(self.fc1(x)))


class GateAndExperts(nn.Module):
    """What a hand-written MoE holds: a gate ``nn.Linear(d, num_experts)`` (with bias) and
    ``num_experts`` :class:`MLP` experts; each example writes its own routing in ``forward``."""

    def __init__(self, input_dim: int, hidden_dim: int, num_experts: int, k: int) -> None:
        super().__init__()
        self.k = k
        self.gate = nn.Linear(input_dim, num_experts)
        self.experts = nn.ModuleList(MLP(input_dim, hidden_dim) for _ in range(num_experts))


# ---------------------------------------------------------------- a synthetic task with structure
CLASS_NAMES = ("numbers", "names", "punctuation", "words")


class ClassLM:
    """Token sequences whose vocabulary falls into token classes (numbers, names, punctuation,
    words), each with its own rule, so that a model can learn it and experts can specialize:

    - the class of the next token follows a fixed cycle over the classes (with probability
      ``class_stay``; otherwise a uniformly random class);
    - inside that class, the next token is a class-specific permutation of the current token
      (with probability ``token_stay``; otherwise a random token of the class).

    ``token_class[v]`` is the class of token v. The best achievable loss is printed by
    :meth:`entropy_floor`.
    """

    def __init__(self, tokens_per_class: int, class_stay: float = 0.85, token_stay: float = 0.85,
                 seed: int = 1) -> None:
        gen = torch.Generator().manual_seed(seed)
        C = len(CLASS_NAMES)
        self.C, self.per_class, self.class_stay, self.token_stay = C, tokens_per_class, class_stay, token_stay
        self.vocab = C * tokens_per_class
        self.token_class = torch.arange(self.vocab) // tokens_per_class
        order = torch.randperm(C, generator=gen)  # the class cycle: order[0] -> order[1] -> ... -> order[0]
        self.next_class = torch.empty(C, dtype=torch.long)
        self.next_class[order] = torch.roll(order, -1)
        # per target class, a permutation of the whole vocabulary into that class's tokens
        self.maps = torch.stack([c * tokens_per_class + torch.randperm(self.vocab, generator=gen) % tokens_per_class
                                 for c in range(C)])

    def sample(self, n_seq: int, seq_len: int, seed: int) -> torch.Tensor:
        gen = torch.Generator().manual_seed(seed)
        data = torch.empty(n_seq, seq_len, dtype=torch.long)
        data[:, 0] = torch.randint(0, self.vocab, (n_seq,), generator=gen)
        for t in range(1, seq_len):
            cur = data[:, t - 1]
            cls = self.next_class[self.token_class[cur]]
            cls = torch.where(torch.rand(n_seq, generator=gen) < self.class_stay, cls,
                              torch.randint(0, self.C, (n_seq,), generator=gen))
            tok = self.maps[cls, cur]
            rnd = cls * self.per_class + torch.randint(0, self.per_class, (n_seq,), generator=gen)
            data[:, t] = torch.where(torch.rand(n_seq, generator=gen) < self.token_stay, tok, rnd)
        return data

    def entropy_floor(self) -> float:
        """The expected cross-entropy of the true next-token distribution (nats)."""
        def entropy(n: int, stay: float) -> float:  # one outcome with p = stay + (1 - stay) / n, n - 1 with (1 - stay) / n
            hit, miss = stay + (1 - stay) / n, (1 - stay) / n
            return -(hit * math.log(hit) + (n - 1) * miss * math.log(miss))

        # the class, then the token inside it
        return entropy(self.C, self.class_stay) + entropy(self.per_class, self.token_stay)


class TinyLM(nn.Module):
    """Embedding -> ``layers`` x (pre-norm residual feed-forward block from ``ffn()``) -> norm -> head.
    The next token of :class:`ClassLM` depends on the current one only, so no attention is needed."""

    def __init__(self, vocab: int, hidden: int, layers: int, ffn: Callable[[], nn.Module]) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, hidden)
        self.norms = nn.ModuleList(nn.LayerNorm(hidden) for _ in range(layers))
        self.ffns = nn.ModuleList(ffn() for _ in range(layers))
        self.final_norm = nn.LayerNorm(hidden)
        self.head = nn.Linear(hidden, vocab, bias=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.embed(ids)
        for norm, ffn in zip(self.norms, self.ffns):
            h = h + ffn(norm(h))
        return self.head(self.final_norm(h))


def lm_loss(model: nn.Module, seqs: torch.Tensor) -> torch.Tensor:
    logits = model(seqs[:, :-1])
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), seqs[:, 1:].reshape(-1))


@torch.no_grad()
def val_loss(model: nn.Module, val: torch.Tensor) -> float:
    was_training = model.training
    model.eval()
    loss = lm_loss(model, val).item()
    model.train(was_training)
    return loss


def train(model: nn.Module, data: torch.Tensor, steps: int, batch: int, lr: float, seed: int = 0,
          on_step: Callable[[int, float], None] | None = None) -> None:
    """``steps`` steps of AdamW on the LM loss plus ``kernel_moe.training.aux_loss(model)`` (zero
    unless a fused layer uses load_balancing="auxiliary_loss"), each followed by
    ``update_expert_biases`` (acts only on "dynamic" layers); ``on_step(step, loss)`` after each
    step (steps count from 1). ``data`` [sequences, length] token ids; ``batch`` sequences a step."""
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    for step in range(1, steps + 1):
        seqs = data[torch.randint(0, data.shape[0], (batch,), generator=gen)]  # [batch, length]
        loss = lm_loss(model, seqs) + training.aux_loss(model)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        training.update_expert_biases(model)
        if on_step is not None:
            on_step(step, loss.item())

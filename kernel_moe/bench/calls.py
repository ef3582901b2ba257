"""The calls a benchmark times: seeded forward inputs for one shape, a no-argument closure
running a module on them, and the main tensor of what it returns.

Legend: B batch size, S sequence length, H hidden size.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable

import torch
import torch.nn as nn

from kernel_moe.bench.settings import Inputs


def input_embedding(model: nn.Module) -> nn.Embedding | None:
    """The model's input embedding: ``get_input_embeddings()`` or an ``nn.Embedding`` child."""
    getter = getattr(model, "get_input_embeddings", None)
    if callable(getter):
        with contextlib.suppress(Exception):
            emb = getter()
            if isinstance(emb, nn.Embedding):
                return emb
    for child in model.children():
        if isinstance(child, nn.Embedding):
            return child
    return None


def infer_hidden_size(model: nn.Module) -> int | None:
    """H from the model or its config (hidden_size, hidden_dim, d_model), else the input
    features of its first Linear."""
    for obj in (model, getattr(model, "config", None)):
        for attr in ("hidden_size", "hidden_dim", "d_model"):
            value = getattr(obj, attr, None) if obj is not None else None
            if isinstance(value, int) and value > 0:
                return value
    for m in model.modules():
        if isinstance(m, nn.Linear):
            return m.in_features
    return None


class InputMaker:
    """Seeded forward inputs of ``model``: ``{"input_ids": [B, S]}`` or ``{"x": [B, S, H]}``.

    ``kind`` and ``hidden_size`` are resolved from the model when :class:`Inputs` leaves them
    open ("auto": token ids when the model has an input embedding, else hidden states).
    """

    def __init__(self, model: nn.Module, inputs: Inputs, device: torch.device, dtype: torch.dtype) -> None:
        self.model, self.device, self.dtype, self.seed = model, device, dtype, inputs.seed
        self.kind = inputs.kind
        if self.kind == "auto":
            self.kind = "ids" if input_embedding(model) is not None else "hidden"
        self.hidden_size = inputs.hidden_size or infer_hidden_size(model)
        if self.kind == "hidden" and self.hidden_size is None:
            raise ValueError("Inputs.hidden_size=None and it cannot be inferred; allowed: an int >= 1")

    def make(self, batch: int, seq: int) -> dict:
        gen = torch.Generator().manual_seed(self.seed + 1_000_003 * batch + seq)
        if self.kind == "ids":
            emb = input_embedding(self.model)
            config = getattr(self.model, "config", None)
            vocab = emb.num_embeddings if emb is not None else getattr(config, "vocab_size", None)
            if not vocab:
                raise ValueError("Inputs.kind='ids' but the model has no input embedding / vocab_size")
            ids_BS = torch.randint(0, vocab, (batch, seq), generator=gen).to(self.device)
            kwargs = {"input_ids": ids_BS}
            forward = inspect.signature(self.model.forward).parameters
            if "use_cache" in forward:
                kwargs["use_cache"] = False
            return kwargs
        x_BSH = torch.randn(batch, seq, self.hidden_size, generator=gen).to(device=self.device, dtype=self.dtype)
        return {"x": x_BSH}


def make_call(module: Callable, inputs: dict) -> Callable[[], object]:
    """A no-argument closure running ``module`` on ``inputs`` under ``torch.no_grad()``."""
    if "x" in inputs:
        x = inputs["x"]

        def call():
            with torch.no_grad():
                return module(x)

    else:

        def call():
            with torch.no_grad():
                return module(**inputs)

    return call


def first_tensor(output) -> torch.Tensor | None:
    """The main tensor of a model output: itself, ``.logits``, ``.last_hidden_state`` or item 0."""
    if isinstance(output, torch.Tensor):
        return output
    for attr in ("logits", "last_hidden_state"):
        value = getattr(output, attr, None)
        if isinstance(value, torch.Tensor):
            return value
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    return None

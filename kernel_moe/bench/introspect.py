"""What the benchmark harness reads off a model: its main output tensor, input embedding,
hidden size, routed layers and the parameters that take part in matmuls."""

from __future__ import annotations

import contextlib

import torch
import torch.nn as nn


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


def input_embedding(model: nn.Module) -> nn.Embedding | None:
    """The model's input embedding (``get_input_embeddings()`` or an Embedding child), if any."""
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


def hidden_size_of(model: nn.Module) -> int | None:
    """H from the model's (or its config's) hidden-size attribute, else the first Linear's input."""
    for obj in (model, getattr(model, "config", None)):
        for attr in ("hidden_size", "hidden_dim", "d_model"):
            value = getattr(obj, attr, None) if obj is not None else None
            if isinstance(value, int) and value > 0:
                return value
    for m in model.modules():
        if isinstance(m, nn.Linear):
            return m.in_features
    return None


def routed_layers(module: nn.Module) -> list[tuple[str, nn.Module]]:
    """Modules exposing the routing-tracking interface of ``kernel_moe.layers.FusedMoE``."""
    return [
        (name, m)
        for name, m in module.named_modules()
        if callable(getattr(m, "track_routing", None)) and isinstance(getattr(m, "routing_counts", None), torch.Tensor)
    ]


def matmul_param_stats(module: nn.Module, active_params: int) -> tuple[int, int]:
    """(active, total) parameters that take part in matmuls: embeddings excluded unless the
    same tensor is also a Linear weight (a tied LM head)."""
    linear_ids = {id(m.weight) for m in module.modules() if isinstance(m, nn.Linear)}
    emb = {id(m.weight): m.weight.numel() for m in module.modules() if isinstance(m, nn.Embedding)}
    lookup_only = sum(n for pid, n in emb.items() if pid not in linear_ids)
    total = sum(p.numel() for p in module.parameters()) - lookup_only
    return max(active_params - lookup_only, 0), max(total, 0)

"""What a module keeps besides its parameters, and whether its training forward changes it.

Some blocks count their routing or accumulate their auxiliary losses in their own tensors while
they train (per-expert counts feeding a load-balancing bias update, loss metrics): nothing their
outputs or gradients show, but a swapped layer would silently stop updating them. The manager
snapshots that state, runs the original's training forward once, names what changed (the training
steps then run the original) and puts every value back, so that proving a module leaves it as
it was.

State is a module's buffers and the tensors held in its plain attributes, directly or one object
down (a tensor wrapped to hide it from ``state_dict``), parameters excluded.
"""

from __future__ import annotations

import torch
from torch import nn

from kernel_moe.adapters.probe import train_mode


def module_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """{path: tensor} of the state the module and its submodules keep (not their parameters)."""
    params = {id(p) for p in module.parameters()}
    found: dict[str, torch.Tensor] = {}
    for path, m in module.named_modules():
        prefix = f"{path}." if path else ""
        for name, b in m.named_buffers(recurse=False):
            found[prefix + name] = b
        for name, value in vars(m).items():
            if isinstance(value, torch.Tensor):
                if id(value) not in params:
                    found[prefix + name] = value
            elif not isinstance(value, (nn.Module, dict, list, tuple, set, str, bytes)) and hasattr(value, "__dict__"):
                for inner, t in vars(value).items():
                    if isinstance(t, torch.Tensor) and id(t) not in params:
                        found[f"{prefix}{name}.{inner}"] = t
    return found


def saved_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """A copy of the module's state (see :func:`module_state`)."""
    return {path: t.detach().clone() for path, t in module_state(module).items()}


def restore_state(module: nn.Module, saved: dict[str, torch.Tensor]) -> None:
    """Put the saved values back into the module's state tensors (in place, same shapes only)."""
    with torch.no_grad():
        for path, t in module_state(module).items():
            old = saved.get(path)
            if old is not None and old.shape == t.shape and old.dtype == t.dtype:
                t.copy_(old)


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if a.is_floating_point():
        return bool(((a == b) | (a.isnan() & b.isnan())).all())
    return torch.equal(a, b)


def training_state_changes(module: nn.Module, args: tuple, saved: dict[str, torch.Tensor]) -> list[str]:
    """The paths of the state the original's training forward (with gradients recorded) changes,
    compared with ``saved``; the state is left changed (the caller restores it)."""
    inputs = [a.detach().clone().requires_grad_() if a.is_floating_point() else a for a in args]
    with torch.enable_grad(), train_mode(module, True), torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        module(*inputs)
    now = module_state(module)
    return sorted(p for p in set(saved) | set(now)
                  if p not in saved or p not in now or not _same(now[p].detach(), saved[p]))


__all__ = ["module_state", "restore_state", "saved_state", "training_state_changes"]

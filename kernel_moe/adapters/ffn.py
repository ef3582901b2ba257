"""Dense FFNs (opt-in with ``KernelConfig.for_ffn`` or ``swap_ffn=True``): a module whose only
parameters are two Linear layers chaining H -> I -> H, or three (gate, up: H -> I; down:
I -> H), with a pointwise activation between them. The wiring and activation are settled by
the same probe as hand-written experts.
"""

from __future__ import annotations

from torch import nn

from kernel_moe.adapters.base import Skip
from kernel_moe.adapters.handwritten import expert_forms, form_experts_spec
from kernel_moe.adapters.structure import linear_layers
from kernel_moe.config import KernelConfig
from kernel_moe.layers.spec import FFNSpec


def _hidden(linears: list[tuple[str, nn.Linear]]) -> int | None:
    """The model width H: the in_features shared by the up projections, or of the 2-Linear chain."""
    if len(linears) == 2:
        a, b = linears[0][1], linears[1][1]
        if a.out_features == b.in_features and b.out_features == a.in_features:
            return a.in_features
        return None
    ins = [m.in_features for _, m in linears]
    common = [h for h in set(ins) if ins.count(h) == 2]
    return common[0] if common else None


class DenseFFNAdapter:
    name = "ffn"

    def candidates(self, module: nn.Module, config: KernelConfig) -> list[FFNSpec] | Skip | None:
        if not config.swap_ffn:
            return None
        linears = linear_layers(module)
        if linears is None or len(linears) not in (2, 3):
            return None
        if any(isinstance(m, nn.ModuleList) for m in module.modules()):
            return None
        hidden = _hidden(linears)
        if hidden is None:
            return None
        forms = expert_forms(module, hidden)
        if isinstance(forms, Skip):
            return None
        specs = []
        for form in forms:
            inter = module.get_submodule(form.up[0]).out_features
            specs.append(FFNSpec(experts=form_experts_spec(form, [""], hidden, inter)))
        return specs

"""Every transformers MoE model type: optimize() runs, every MoE block is swapped or skipped with
a reason, and a model with anything swapped computes what the original computes.

The catalogue comes from the installed transformers (:func:`moe_model_types`), so the test
follows whatever version is installed. ``docs/supported-models.md`` is generated from the same
survey (``python scripts/gen_supported_models.py``); when the installed transformers is the one
the document was generated with, the document must list what this run finds.
"""

from __future__ import annotations

import copy
import math
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from torch import nn

import kernel_moe
from kernel_moe import FusedMoE
from kernel_moe.layers import FusedExperts
from kernel_moe.layers.moa_attention import FusedMoAAttention

pytest.importorskip("transformers")

from tests.integration.hf_tiny import (  # noqa: E402
    MOE_INTERMEDIATE,
    NUM_EXPERTS,
    TinyModelError,
    build_tiny_model,
    first_tensor,
    forward_module,
    modeling_module,
    moe_classes,
    moe_model_types,
    tiny_inputs,
)
from tests.integration.upstream_failures import known_upstream_failure  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
DOC = REPO / "docs" / "supported-models.md"
OUTPUT_RTOL = 1e-4  # max |optimized - original| / max |original|, fp32


@dataclass
class Row:
    """One line of the coverage table: what happened to one kind of module of a model type."""

    model_type: str
    outcome: str  # "FusedMoE", "FusedExperts", "FusedMoAAttention" or "skipped"
    module_class: str
    routing: str = ""
    experts: str = ""
    reason: str = ""


@dataclass
class Survey:
    model_type: str
    rows: list[Row] = field(default_factory=list)
    uncovered: list[str] = field(default_factory=list)
    swapped: int = 0
    rel_error: float | None = None
    not_run: str | None = None  # why the type could not be built at all
    upstream: str | None = None  # the whole model's forward fails inside transformers (upstream_failures.py)


def holds_expert_weights(module: nn.Module) -> bool:
    """Whether the module (or a descendant) holds per-expert weights of the tiny configs: a 3-D
    parameter, E * I packed rows, an embedding table of E rows, or E identical sub-modules."""
    for p in module.parameters():
        if p.dim() >= 3 or (p.dim() == 2 and p.shape[0] == NUM_EXPERTS * MOE_INTERMEDIATE):
            return True
    for m in module.modules():
        if isinstance(m, nn.Embedding) and m.num_embeddings == NUM_EXPERTS:
            return True
        kids = [c for c in m.children() if any(True for _ in c.parameters())]
        if len(kids) >= NUM_EXPERTS and len({type(c) for c in kids}) == 1:
            return True
    return False


def _experts_layout(ex) -> str:
    up = ex.up
    layout = "transposed " if getattr(up, "transposed", False) else ""
    a = ex.activation
    gated = "gated" if a.gated else "no gate"
    params = [f"alpha={a.alpha:g}"] if a.kind == "gpt_oss" else []
    params += [f"limit={a.limit:g}"] if a.limit != math.inf else []
    params += [f"softcaps={a.gate_softcap:g}/{a.up_softcap:g}"] if a.softcapped else []
    act = a.kind + (f"({', '.join(params)})" if params else "")
    return f"{layout}{gated} {a.glu if a.gated else ''} {act}".replace("  ", " ") + (
        " +bias" if ex.up_bias is not None else "") + (f", {ex.post_norm.describe()}" if ex.post_norm else "")


def _routing(spec) -> str:
    r = spec.router
    text = r.routing.describe()
    if r.logit_scale != 1.0:
        text = f"logits x{r.logit_scale:.4g}>{text}"
    if r.weight_scale:
        text += f", weights x {r.weight_scale}"
    if r.id_table:
        text = f"experts by token id (table), weighted {text}"
    if r.selection_bias:
        text += ", selection bias"
    if r.bias:
        text += ", logit bias"
    if spec.shared_expert:
        text += ", shared expert" + (" (sigmoid-gated)" if spec.shared_gate else "") + (
            " (weighted by the shared ids)" if spec.shared_weighted else "")
    if spec.expert_input or spec.expert_output:
        text += (f", experts between {' > '.join(spec.expert_input) or '-'} and "
                 f"{' > '.join(spec.expert_output) or '-'}")
    if spec.block_output:
        text += f", then {' > '.join(spec.block_output)} on the block output"
    if spec.scale_inputs:
        text += ", weights scale the inputs"
    if spec.capacity is not None:
        text += f", capacity {spec.capacity.slots} per {'sequence' if spec.capacity.per_sequence else 'call'}"
    if spec.routed_scale != 1.0:
        text += f", routed output x{spec.routed_scale:g}"
    if spec.num_experts > spec.experts.num_experts:
        text += f", +{spec.num_experts - spec.experts.num_experts} {spec.weightless} experts"
    extras = [e.describe() for e in spec.returned_extras()]
    if extras or spec.output_shape != "input":
        text += ", returns (output" + "".join(f", {e}" for e in extras) + ")" + (
            f" ({spec.output_shape})" if spec.output_shape != "input" else "")
    return text


def _clean(reason: str) -> str:
    return re.sub(r"\s+", " ", reason).replace("|", "/").strip()


def survey(model_type: str) -> Survey:
    """Build the tiny model, optimize it, check coverage and outputs; the table rows."""
    result = Survey(model_type)
    try:
        model = build_tiny_model(model_type)
    except TinyModelError as exc:
        result.not_run = str(exc)
        result.rows = [Row(model_type, "not built", "-", reason=_clean(str(exc)))]
        return result
    classes = tuple(moe_classes(modeling_module(model_type)))
    required = [n for n, m in model.named_modules() if isinstance(m, classes) and holds_expert_weights(m)]
    original = copy.deepcopy(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = kernel_moe.optimize(model, return_report=True)[1]
    result.swapped = len(report.swapped)

    named = [r.name for r in report.swapped] + [r.name for r in report.skipped]

    def covered(fqn: str) -> bool:
        return any(fqn == n or fqn.startswith(n + ".") or n.startswith(fqn + ".") for n in named)

    result.uncovered = [n for n in required if not covered(n)]

    rows: dict[tuple, Row] = {}
    skipped_by_name = {r.name: r for r in report.skipped}
    explained = set()
    for rec in report.swapped:
        layer = model.get_submodule(rec.name)
        if isinstance(layer, FusedMoE):
            row = Row(model_type, "FusedMoE", rec.original_class, _routing(layer.spec), _experts_layout(layer.spec.experts))
        elif isinstance(layer, FusedMoAAttention):
            row = Row(model_type, "FusedMoAAttention", rec.original_class, f"top{layer.top_k}>softmax",
                      "attention experts: query + output projections, shared kv")
        else:
            parent = rec.name.rpartition(".")[0]
            why = skipped_by_name.get(parent)
            if why is not None:
                explained.add(parent)
            kind = "FusedExperts" if isinstance(layer, FusedExperts) else type(layer).__name__
            row = Row(model_type, kind, rec.original_class, "router kept",
                      _experts_layout(layer.spec.experts), _clean(why.reason) if why else "")
        rows.setdefault((row.outcome, row.module_class, row.routing, row.experts, row.reason), row)
    for rec in report.skipped:
        if rec.name in explained:
            continue
        row = Row(model_type, "skipped", rec.module_class, reason=_clean(rec.reason))
        rows.setdefault((row.outcome, row.module_class, row.reason), row)
    result.rows = list(rows.values())

    if report.swapped:
        module, ref_module = forward_module(model), forward_module(original)
        inputs = tiny_inputs(model)
        known = known_upstream_failure(model_type)
        with torch.no_grad(), warnings.catch_warnings(), torch.random.fork_rng(devices=[]):
            warnings.simplefilter("ignore")
            torch.manual_seed(0)  # some forwards sample (diffusion noise): same draws for both
            try:
                ref = first_tensor(ref_module(**inputs))
            except Exception as exc:
                if known is None or not known.matches(exc):
                    raise
                result.upstream = known.describe()
                return result
            torch.manual_seed(0)
            out = first_tensor(module(**inputs))
        scale = ref.double().abs().max().item()
        result.rel_error = (out.double() - ref.double()).abs().max().item() / max(scale, 1e-30)
    return result


def outcome_of(s: Survey) -> str:
    kinds = {r.outcome for r in s.rows if r.outcome != "skipped"}
    if s.not_run:
        return "not built"
    if not kinds:
        return "skipped"
    return " + ".join(k for k in ("FusedMoE", "FusedExperts", "FusedMoAAttention") if k in kinds)


_CACHE: dict[str, Survey] = {}


def cached_survey(model_type: str) -> Survey:
    if model_type not in _CACHE:
        _CACHE[model_type] = survey(model_type)
    return _CACHE[model_type]


@pytest.mark.parametrize("model_type", moe_model_types())
def test_every_moe_block_is_swapped_or_skipped_and_outputs_match(model_type: str):
    s = cached_survey(model_type)
    if s.not_run:
        pytest.skip(s.not_run)
    assert not s.uncovered, f"{model_type}: MoE modules neither swapped nor skipped: {s.uncovered}"
    assert s.rows, f"{model_type}: the report lists nothing"
    for row in s.rows:
        if row.outcome == "skipped":
            assert row.reason, f"{model_type}: {row.module_class} skipped without a reason"
    if s.upstream:
        pytest.skip(f"{model_type}: blocks covered; the whole-model comparison cannot run: {s.upstream}")
    if s.swapped:
        assert s.rel_error is not None and s.rel_error <= OUTPUT_RTOL, (
            f"{model_type}: optimized output differs from the original: max error {s.rel_error:.2e} of the output scale")


def _doc_rows(text: str) -> set[tuple[str, str, str]]:
    rows = set()
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 6 and cells[0] not in ("model type", "---") and not cells[0].startswith("-"):
            rows.add((cells[0].strip("`"), cells[1], cells[2].strip("`")))
    return rows


def test_supported_models_doc_lists_what_this_run_finds():
    """docs/supported-models.md is generated by scripts/gen_supported_models.py from survey()."""
    import transformers

    text = DOC.read_text()
    version = re.search(r"transformers (\S+)", text)
    assert version, "docs/supported-models.md does not say which transformers it was generated with"
    if version.group(1) != transformers.__version__:
        pytest.skip(f"generated with transformers {version.group(1)}, {transformers.__version__} installed")
    found = set()
    for t in moe_model_types():
        for row in cached_survey(t).rows:
            found.add((row.model_type, row.outcome, row.module_class))
    assert _doc_rows(text) == found, "docs/supported-models.md is stale: run python scripts/gen_supported_models.py"

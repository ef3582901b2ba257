"""Tiny random-weight transformers MoE models, built from their config classes (no download).

Legend: T tokens, H hidden size, E experts, K experts per token (top-k), I expert
intermediate size.

- :func:`moe_model_types` lists every ``model_type`` of the installed transformers whose
  modeling file defines a Mixture-of-Experts (3-D expert parameters, a ``*SparseMoeBlock`` /
  ``*MoE`` / ``*Experts`` module) and whose config declares experts.
- :func:`tiny_config` shrinks the default config of a type (and all its sub-configs) so that a
  model builds in a fraction of a second, with every MoE layer enabled from layer 0.
- :func:`build_tiny_model` builds the smallest suitable model class with random weights.
- :func:`tiny_inputs` makes the forward kwargs a tiny model needs (``input_ids`` for most).

Shapes of the tiny configs: H = 64, 4 attention heads of 16, E = 8, K = 2, I = 24 for routed
experts, 40 for shared experts, 96 for dense MLPs, vocabulary 128, 2 layers. I is chosen so that
``[E, 2I, H]`` and ``[E, H, I]`` are never square, which lets a layout mix-up show.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import importlib.util
import inspect
import logging
import os
import re
import warnings
from typing import Any

import torch
import torch.nn as nn

logger = logging.getLogger("kernel_moe")

HIDDEN = 64
HEADS = 4
KV_HEADS = 2
HEAD_DIM = 16
NUM_EXPERTS = 8
TOP_K = 2
MOE_INTERMEDIATE = 24
SHARED_INTERMEDIATE = 40
DENSE_INTERMEDIATE = 96
VOCAB = 128
LAYERS = 2

# A modeling source defines an MoE when one of these shows.
_MOE_SOURCE_RE = re.compile(
    r"@use_experts_implementation"
    r"|^class \w*(?:SparseMoeBlock|SparseMoe|MoeBlock|MoEBlock|MoE|Moe|MoeMLP|MoEMLP|SparseMLP"
    r"|Experts|ExpertGLU)\("
    r"|nn\.Parameter\(\s*torch\.\w+\(\s*\(?\s*(?:self\.|config\.)?"
    r"(?:num_experts|num_local_experts|n_routed_experts|moe_num_experts)\b",
    re.MULTILINE,
)
# Class names of MoE modules in an imported modeling module.
_MOE_CLASS_RE = re.compile(
    r"(SparseMoeBlock|SparseMoe|MoeBlock|MoEBlock|MoE|Moe|MoeMLP|MoEMLP|SparseMLP|Experts|ExpertGLU)$"
)

_EXPERT_COUNT_KEYS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")
_TOPK_KEYS = ("num_experts_per_tok", "num_experts_per_token", "moe_topk", "moe_k", "top_k_experts", "moe_top_k")
_SHARED_COUNT_KEYS = ("n_shared_experts", "num_shared_experts", "moe_num_shared_experts")
_LAYER_COUNT_KEYS = (
    "num_hidden_layers",
    "num_layers",
    "n_layers",
    "encoder_layers",
    "decoder_layers",
    "num_decoder_layers",
    "depth",
)
_FIXED_INT = {
    "hidden_size": HIDDEN,
    "d_model": HIDDEN,
    "text_hidden_size": HIDDEN,
    "thinker_hidden_size": HIDDEN,
    "out_hidden_size": HIDDEN,
    "projector_hidden_size": HIDDEN,
    "projector_input_dim": HIDDEN,
    "projector_output_dim": HIDDEN,
    "vision_output_dim": HIDDEN,
    "hidden_size_per_layer_input": 16,
    "vocab_size_per_layer_input": VOCAB,
    "canvas_length": 8,
    "intermediate_size": DENSE_INTERMEDIATE,
    "dense_intermediate_size": DENSE_INTERMEDIATE,
    "intermediate_size_mlp": DENSE_INTERMEDIATE,
    "prefix_dense_intermediate_size": DENSE_INTERMEDIATE,
    "encoder_ffn_dim": DENSE_INTERMEDIATE,
    "decoder_ffn_dim": DENSE_INTERMEDIATE,
    "d_ff": DENSE_INTERMEDIATE,
    "moe_intermediate_size": MOE_INTERMEDIATE,
    "expert_ffn_hidden_size": MOE_INTERMEDIATE,
    "ffn_hidden_size": MOE_INTERMEDIATE,
    "moe_hidden_size": MOE_INTERMEDIATE,
    "shared_expert_intermediate_size": SHARED_INTERMEDIATE,
    "shared_experts_intermediate_size": SHARED_INTERMEDIATE,
    "moe_shared_expert_intermediate_size": SHARED_INTERMEDIATE,
    "share_expert_dim": SHARED_INTERMEDIATE,
    "shared_intermediate_size": SHARED_INTERMEDIATE,
    "zero_expert_num": 2,
    "mamba_num_heads": 4,
    "mamba_n_heads": 4,
    "mamba_head_dim": 32,
    "mamba_d_head": 32,
    "mamba_d_state": 16,
    "ssm_state_size": 16,
    "mamba_dt_rank": 8,
    "n_groups": 2,
    "downsample_hidden_size": 32,
    "projection_intermediate_size": DENSE_INTERMEDIATE,
    "num_attention_heads": HEADS,
    "n_heads": HEADS,
    "num_heads": HEADS,
    "encoder_attention_heads": HEADS,
    "decoder_attention_heads": HEADS,
    "swa_num_attention_heads": HEADS,
    "num_sliding_attention_heads": HEADS,
    "head_dim": HEAD_DIM,
    "swa_head_dim": HEAD_DIM,
    "d_kv": HEAD_DIM,
    "kv_channels": HEAD_DIM,
    "kv_lora_rank": 32,
    "q_lora_rank": 32,
    "o_lora_rank": 32,
    "qk_rope_head_dim": 8,
    "qk_nope_head_dim": 16,
    "qk_head_dim": 24,
    "v_head_dim": 16,
    "index_head_dim": 16,
    "index_n_heads": 2,
    "index_topk": 4,
    "linear_num_key_heads": 2,
    "linear_num_value_heads": 4,
    "linear_key_head_dim": 16,
    "linear_value_head_dim": 16,
    "linear_num_heads": 4,
    "linear_head_dim": 16,
    "vocab_size": VOCAB,
    "unpadded_vocab_size": VOCAB,
    "first_k_dense_replace": 0,
    "num_dense_layers": 0,
    "decoder_sparse_step": 1,
    "encoder_sparse_step": 1,
    "moe_layer_start_index": 0,
    "moe_layer_interval": 1,
    "interleave_moe_layer_step": 1,
    "expert_layer_period": 1,
    "expert_layer_offset": 0,
    "moe_layer_freq": 1,
}
_TOKEN_ID_KEYS = ("pad_token_id", "bos_token_id", "eos_token_id", "decoder_start_token_id", "sep_token_id")


def _module_dir(module_name: str) -> str | None:
    """Directory of ``transformers.models.<module_name>`` without importing it."""
    try:
        spec = importlib.util.find_spec(f"transformers.models.{module_name}")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return list(spec.submodule_search_locations)[0]


def _modeling_files(module_name: str) -> list[str]:
    folder = _module_dir(module_name)
    if folder is None or not os.path.isdir(folder):
        return []
    return sorted(
        os.path.join(folder, f) for f in os.listdir(folder) if f.startswith("modeling_") and f.endswith(".py")
    )


def _module_name(model_type: str) -> str | None:
    from transformers.models.auto import configuration_auto

    try:
        return configuration_auto.model_type_to_module_name(model_type)
    except Exception:  # noqa: BLE001 - an odd mapping entry must not break the survey
        return None


@functools.lru_cache(maxsize=None)
def _source_has_moe(module_name: str) -> bool:
    for path in _modeling_files(module_name):
        try:
            with open(path, encoding="utf-8") as f:
                if _MOE_SOURCE_RE.search(f.read()):
                    return True
        except OSError:
            continue
    return False


@functools.lru_cache(maxsize=None)
def modeling_module(model_type: str):
    """The imported ``modeling_*`` module of a model type, or None when it cannot be imported."""
    module_name = _module_name(model_type)
    if module_name is None:
        return None
    for path in _modeling_files(module_name):
        stem = os.path.splitext(os.path.basename(path))[0]
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return importlib.import_module(f"transformers.models.{module_name}.{stem}")
        except Exception as exc:  # noqa: BLE001 - optional dependencies, broken modules: skip
            logger.debug("cannot import %s: %s", stem, exc)
    return None


def moe_classes(module) -> list[type]:
    """MoE-looking ``nn.Module`` classes defined in an imported modeling module."""
    found = []
    for name, obj in vars(module).items():
        if not (isinstance(obj, type) and issubclass(obj, nn.Module) and obj.__module__ == module.__name__):
            continue
        decorated = hasattr(obj, "_apply_gate")  # use_experts_implementation adds it
        if _MOE_CLASS_RE.search(name) or decorated or _has_3d_expert_params(obj):
            found.append(obj)
    return found


def _has_3d_expert_params(cls: type) -> bool:
    try:
        src = inspect.getsource(cls.__init__)
    except (OSError, TypeError):
        return False
    return bool(
        re.search(r"nn\.Parameter\(\s*torch\.\w+\(\s*\(?\s*(?:self\.|config\.)?(?:num_experts|num_local_experts"
                  r"|n_routed_experts|moe_num_experts)\b", src)
    )


def _config_declares_experts(config) -> bool:
    from transformers.configuration_utils import PreTrainedConfig

    for key, value in vars(config).items():
        if isinstance(value, PreTrainedConfig):
            if _config_declares_experts(value):
                return True
        elif "expert" in key and not key.startswith("_"):
            return True
    return False


def _default_config(model_type: str):
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return CONFIG_MAPPING[model_type]()


@functools.lru_cache(maxsize=None)
def moe_model_types() -> list[str]:
    """Every installed model_type whose modeling file defines an MoE and whose config has experts.

    A type whose config or modeling module fails to import is skipped, never raised.
    """
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    found = []
    for model_type in CONFIG_MAPPING_NAMES:
        module_name = _module_name(model_type)
        if module_name is None or not _source_has_moe(module_name):
            continue
        try:
            if not _config_declares_experts(_default_config(model_type)):
                continue
        except Exception as exc:  # noqa: BLE001
            logger.debug("skip %s: config fails: %s", model_type, exc)
            continue
        module = modeling_module(model_type)
        try:
            if module is None or not moe_classes(module):
                continue
        except Exception as exc:  # noqa: BLE001
            logger.debug("skip %s: cannot inspect its modeling module: %s", model_type, exc)
            continue
        found.append(model_type)
    return sorted(found)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_subconfig_dict(value: Any) -> bool:
    return isinstance(value, dict) and "model_type" in value


def _shrink_layer_list(key: str, value: list, layers: int) -> list:
    """Cut a per-layer list to ``layers`` entries, keeping every MoE layer sparse.

    ``mlp_layer_types``: every dense entry becomes the most common sparse kind of the original.
    ``layer_types``: the first kind of the original, then the first other kind (so a hybrid
    model keeps one layer of each, e.g. linear + full attention). Others: the first entries.
    """
    if key.endswith("mlp_layer_types") and not key.startswith("mtp"):
        sparse = [v for v in value if v != "dense"]
        if sparse:
            common = max(set(sparse), key=sparse.count)
            return [v if v != "dense" else common for v in value[:layers]]
    if key == "layer_types" and value:
        others = [v for v in value if v != value[0]]
        if others and layers >= 2:
            return [value[0]] * (layers - 1) + [others[0]]
    return list(value[:layers])


def _scale_mrope(rope: dict[str, Any], rotary_half: int) -> dict[str, Any]:
    """Rescale a multimodal rope ``mrope_section`` so that it sums to ``rotary_half``."""
    section = rope.get("mrope_section")
    if not (isinstance(section, (list, tuple)) and section and rotary_half > 0):
        return rope
    total = sum(section)
    exact = [s * rotary_half / total for s in section]
    new = [int(e) for e in exact]
    by_remainder = sorted(range(len(new)), key=lambda i: new[i] - exact[i])
    for i in by_remainder[: rotary_half - sum(new)]:
        new[i] += 1  # largest remainders first, so equal sections stay equal
    return {**rope, "mrope_section": new}


def _shrink_dict(d: dict[str, Any]) -> dict[str, Any]:
    """Shrink one config dict (sub-config dicts recursively) to the tiny sizes above."""
    out = dict(d)
    old_layers = next((out[k] for k in _LAYER_COUNT_KEYS if _is_int(out.get(k))), None)
    for key, value in d.items():
        if _is_subconfig_dict(value):
            out[key] = _shrink_dict(value)
        elif key in _FIXED_INT:
            if _is_int(value) and value > 0:
                out[key] = _FIXED_INT[key]
            elif isinstance(value, list) and all(_is_int(v) for v in value):
                out[key] = [_FIXED_INT[key]] * len(value)
            elif value is None and key == "moe_intermediate_size":
                out[key] = MOE_INTERMEDIATE
        elif key in _LAYER_COUNT_KEYS and _is_int(value) and value > LAYERS:
            out[key] = LAYERS
        elif key in _EXPERT_COUNT_KEYS and (value is None or _is_int(value)):
            out[key] = NUM_EXPERTS
        elif key in _TOPK_KEYS and (value is None or _is_int(value)):
            out[key] = TOP_K
        elif key in ("enable_moe_block", "is_moe"):
            out[key] = True
        elif key in _SHARED_COUNT_KEYS and _is_int(value) and value > 0:
            out[key] = 1
        elif key in ("n_group", "num_expert_group") and _is_int(value):
            out[key] = 2 if value > 1 else value
        elif key == "topk_group" and _is_int(value):
            out[key] = 1
        elif key == "mlp_only_layers":
            out[key] = []
        elif key in ("num_key_value_heads", "swa_num_key_value_heads", "kv_n_heads") and _is_int(value):
            heads = d.get("num_attention_heads", d.get("n_heads"))
            out[key] = HEADS if value == heads else min(value, KV_HEADS)
        elif key == "attn_layer_period" and _is_int(value):
            out[key] = LAYERS
        elif key == "attn_layer_offset" and _is_int(value):
            out[key] = LAYERS - 1
        elif key == "index_kpool" and _is_int(value):
            out[key] = 2
    if _is_int(out.get("qk_rope_head_dim")) and "head_dim" in out:
        out["head_dim"] = out["qk_rope_head_dim"]  # MLA: rotary runs over the rope part only
    layers = next((out[k] for k in _LAYER_COUNT_KEYS if _is_int(out.get(k))), None)
    if _is_int(old_layers) and _is_int(layers) and layers < old_layers:
        for key, value in d.items():
            if isinstance(value, (list, tuple)) and len(value) == old_layers and key not in _FIXED_INT:
                out[key] = _shrink_layer_list(key, list(value), layers)
        if "moe_layer_end_index" in out and _is_int(out["moe_layer_end_index"]):
            out["moe_layer_end_index"] = layers - 1
        for key in ("num_sparse_decoder_layers", "num_sparse_encoder_layers"):
            if _is_int(out.get(key)):
                out[key] = layers
    for key in ("rope_parameters", "rope_scaling"):
        rope = out.get(key)
        if isinstance(rope, dict) and "mrope_section" in rope:
            head_dim = out.get("head_dim") or HEAD_DIM
            rotary = int(head_dim * rope.get("partial_rotary_factor", 1.0))
            out[key] = _scale_mrope(rope, rotary // 2)
        elif rope is not None:
            out.pop(key)  # recomputed from the tiny sizes by the config class
    if out.get("sliding_window") is None and "sliding_window" in out:
        kinds = out.get("layer_types") or []
        if any("sliding" in str(kind) for kind in kinds):
            out["sliding_window"] = 4
    vocab = out.get("vocab_size")
    if _is_int(vocab):
        for key in _TOKEN_ID_KEYS:
            value = out.get(key)
            if _is_int(value) and value >= vocab:
                out[key] = vocab - 1 - _TOKEN_ID_KEYS.index(key)
            elif isinstance(value, list):
                out[key] = [v if v < vocab else vocab - 1 for v in value]
    return out


# Per-type fixes applied to the shrunk config dict: what the generic rules cannot know.
_QWEN4_INDEXER = {
    "indexer_n_heads": 2,
    "indexer_kv_heads": 1,
    "indexer_head_dim": HEAD_DIM,
    "indexer_budget": 4,
    "indexer_compress_ratio": 2,
}
_DOTS3_VISION = {"adapter_in_dim": HIDDEN, "adapter_out_dim": HIDDEN}
# The inkling vision encoder plans its layers from the patch sizes; this plan needs no scipy.
_INKLING_VISION = {"patch_size": 4, "temporal_patch_size": 2, "num_hidden_layers": 4}
# Gemma-4 style: the full-attention layers get their own (large) head size.
_GEMMA4_TEXT = {"global_head_dim": 32}
# dots3: the sliding-window layers are MLA layers of their own sizes (``swa_*`` keys).
_DOTS3_TEXT = {
    "swa_num_attention_heads": HEADS,
    "swa_num_key_value_heads": HEADS,
    "swa_q_lora_rank": 32,
    "swa_kv_lora_rank": 32,
    "swa_head_dim": 24,
    "swa_qk_nope_head_dim": 16,
    "swa_v_head_dim": 16,
}
_TYPE_FIXES: dict[str, dict[str, Any]] = {
    # DbrxAttention reads attn_config.rope_theta, which the default attention config lacks.
    "dbrx": {"attn_config": {"rope_theta": 10000.0, "clip_qkv": 8.0}},
    "deepseek_ocr2": {"text_config": {"mlp_layer_types": ["sparse"] * LAYERS}},
    "deepseek_ocr2_text": {"mlp_layer_types": ["sparse"] * LAYERS},
    # deepseek_v4 has hash-routed ("hash_moe") and learned-router ("moe") layers: keep one of each.
    "deepseek_v4": {"mlp_layer_types": ["hash_moe", "moe"]},
    # The default dots1 config has n_shared_experts=None, which its MoE block cannot take.
    "dots1": {"n_shared_experts": 1},
    # Some transformers versions default diffusion_gemma's vision_config to None, which its model rejects.
    "diffusion_gemma": {"text_config": _GEMMA4_TEXT, "vision_config": lambda: _shrunk_default("gemma4_vision")},
    "diffusion_gemma_text": _GEMMA4_TEXT,
    "gemma4": {"text_config": _GEMMA4_TEXT},
    "gemma4_text": _GEMMA4_TEXT,
    "dots3_note_text": _DOTS3_TEXT,
    "dots3_note": {
        "text_config": _DOTS3_TEXT,
        "vision_config": _DOTS3_VISION,
        "audio_config": {"adapter_input_size": HIDDEN, "adapter_out_dim": HIDDEN},
    },
    "dots3_note_vision_encoder": _DOTS3_VISION,
    "granitemoehybrid": {"layer_types": ["linear_attention", "full_attention"]},
    "hunyuan_v1_moe": {"head_dim": HEAD_DIM},
    "inkling_mm_model": {"vision_config": _INKLING_VISION},
    "lfm2_moe": {"layer_types": ["conv", "full_attention"]},
    # The talker text config has no field for the shared expert its MoE block builds.
    "qwen3_omni_moe_talker_text": {"shared_expert_intermediate_size": SHARED_INTERMEDIATE},
    "qwen3_omni_moe": {
        "talker_config": {
            "spatial_merge_size": 2,
            "text_config": {"shared_expert_intermediate_size": SHARED_INTERMEDIATE},
        },
        "code2wav_config": {"decoder_dim": 32, "codebook_size": 64},
    },
    "qwen4_exp": {"text_config": _QWEN4_INDEXER},
    "qwen4_exp_text": _QWEN4_INDEXER,
    # step3p5 builds a sliding-window mask on every forward.
    "step3p5": {"sliding_window": 4},
    "step3p7": {"text_config": {"sliding_window": 4}},
    "vitpose_backbone": {"part_features": 16},
    # ZAYA routes each token to one expert only.
    "zaya": {"num_experts_per_tok": 1},
}


def _shrunk_default(model_type: str) -> dict[str, Any]:
    """The shrunk default config dict of another model type (to fill a missing sub-config)."""
    return _shrink_dict(_default_config(model_type).to_dict())


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """``base`` updated by ``extra``; dicts merge recursively, a callable value is called for its value."""
    out = dict(base)
    for key, value in extra.items():
        value = value() if callable(value) else value
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _set_eager(config) -> None:
    from transformers.configuration_utils import PreTrainedConfig

    config._attn_implementation = "eager"
    for value in vars(config).values():
        if isinstance(value, PreTrainedConfig):
            _set_eager(value)


def _fields(config_cls) -> set[str] | None:
    """Constructor fields of a (dataclass) config class, or None when it is not a dataclass."""
    if not dataclasses.is_dataclass(config_cls):
        return None
    return {f.name for f in dataclasses.fields(config_cls)}


def _sub_config_class(config_cls, key: str, d: dict[str, Any]):
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    sub = getattr(config_cls, "sub_configs", {}).get(key)
    if isinstance(sub, type) and not sub.__name__.startswith("Auto"):
        return sub
    model_type = d.get("model_type")
    return CONFIG_MAPPING[model_type] if model_type in CONFIG_MAPPING else None


def _keep_fields(config_cls, d: dict[str, Any]) -> dict[str, Any]:
    """Drop keys that are not constructor fields, so that derived attributes are recomputed."""
    names = _fields(config_cls)
    aliases = getattr(config_cls, "attribute_map", {}) or {}
    out = {}
    for key, value in d.items():
        if names is not None and key not in names:
            # to_dict() may write a field under its attribute_map name, in either direction.
            if aliases.get(key) in names:
                key = aliases[key]
            else:
                key = next((a for a, target in aliases.items() if target == key and a in names), key)
        if _is_subconfig_dict(value):
            sub_type = value["model_type"]
            sub_cls = _sub_config_class(config_cls, key, value)
            value = _keep_fields(sub_cls, value) if sub_cls is not None else value
            value["model_type"] = sub_type
        if names is None or key in names or _is_subconfig_dict(value):
            out[key] = value
    return out


def _make_tiny_config(model_type: str, overrides: dict[str, Any]):
    """The tiny config of ``model_type``; raises what the config class raises."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    config_cls = CONFIG_MAPPING[model_type]
    d = _keep_fields(config_cls, _shrink_dict(_default_config(model_type).to_dict()))
    d = _merge(d, _TYPE_FIXES.get(model_type, {}))
    d = _merge(d, overrides)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        config = config_cls(**d)
    _set_eager(config)
    _fix_mrope(config, _mrope_default(model_type))
    return config


@functools.lru_cache(maxsize=None)
def _mrope_default(model_type: str) -> tuple[int, ...] | None:
    """The ``mrope_section`` a modeling file falls back to, read from its source."""
    module_name = _module_name(model_type)
    for path in _modeling_files(module_name) if module_name else []:
        with open(path, encoding="utf-8") as f:
            m = re.search(r'get\("mrope_section",\s*\[([\d,\s]+)\]\)', f.read())
        if m:
            return tuple(int(v) for v in m.group(1).split(","))
    return None


def _fix_mrope(config, default: tuple[int, ...] | None) -> None:
    """Give every text config of a multimodal-rope model an ``mrope_section`` that fits its tiny heads."""
    from transformers.configuration_utils import PreTrainedConfig

    rope = getattr(config, "rope_parameters", None)
    if default and isinstance(rope, dict) and getattr(config, "vocab_size", None) and "mrope_section" not in rope:
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        rotary = int(head_dim * rope.get("partial_rotary_factor", 1.0))
        config.rope_parameters = _scale_mrope({**rope, "mrope_section": list(default)}, rotary // 2)
    for value in vars(config).values():
        if isinstance(value, PreTrainedConfig):
            _fix_mrope(value, default)


def tiny_config(model_type: str, **overrides: Any):
    """A tiny config of ``model_type`` (every MoE layer sparse, eager attention), or None.

    ``overrides`` are merged into the shrunk config dict (a dict value merges into a sub-config).
    None means the type cannot be made tiny: its config class rejects the tiny sizes.
    """
    try:
        return _make_tiny_config(model_type, overrides)
    except Exception as exc:  # noqa: BLE001 - any failure means "cannot be made tiny"
        logger.debug("no tiny config for %s: %s: %s", model_type, type(exc).__name__, exc)
        return None


def _class_candidates(model_type: str) -> list[str]:
    """Model class names the auto mappings give a type: causal LM first, then the base model, then others."""
    from transformers.models.auto import modeling_auto

    mappings = [modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, modeling_auto.MODEL_MAPPING_NAMES]
    mappings += [
        value
        for name, value in sorted(vars(modeling_auto).items())
        if name.endswith("_MAPPING_NAMES")
        and "CONFIG" not in name
        and isinstance(value, dict)
        and value not in mappings
    ]
    names = []
    for mapping in mappings:
        value = mapping.get(model_type)
        for name in value if isinstance(value, (list, tuple)) else [value]:
            if isinstance(name, str) and name not in names:
                names.append(name)
    return names


def model_class(model_type: str, config=None) -> type | None:
    """The smallest suitable model class: ``*ForCausalLM`` when it takes this config, else the base model."""
    module = modeling_module(model_type)
    if module is None:
        return None
    config = config if config is not None else tiny_config(model_type)
    if config is None:
        return None

    from transformers import PreTrainedModel

    def fits(cls) -> bool:
        if not (isinstance(cls, type) and issubclass(cls, PreTrainedModel)):
            return False
        wanted = getattr(cls, "config_class", None)
        return wanted is None or isinstance(config, wanted)

    for name in _class_candidates(model_type):
        cls = getattr(module, name, None)
        if cls is not None and fits(cls):
            return cls
    own = [
        obj
        for obj in vars(module).values()
        if isinstance(obj, type)
        and issubclass(obj, PreTrainedModel)
        and obj.__module__ == module.__name__
        and getattr(obj, "config_class", None) is type(config)
        and not obj.__name__.endswith("PreTrainedModel")
    ]
    # config_class is often inherited from the family's base class: prefer a class whose
    # __init__ annotates exactly this config class.
    annotated = [c for c in own if _init_config_annotation(c) == type(config).__name__]
    for pool in (annotated, own):
        for suffix in ("ForCausalLM", "Model", ""):
            matching = sorted((c for c in pool if c.__name__.endswith(suffix)), key=lambda c: len(c.__name__))
            if matching:
                return matching[0]
    return None


def _init_config_annotation(cls: type) -> str | None:
    try:
        annotation = inspect.signature(cls.__init__).parameters["config"].annotation
    except (KeyError, TypeError, ValueError):
        return None
    return annotation if isinstance(annotation, str) else getattr(annotation, "__name__", None)


_NORM_RE = re.compile(r"norm", re.IGNORECASE)
_SELECTION_BIAS_RE = re.compile(r"(e_score_correction_bias|expert_bias|correction_bias)$")


@torch.no_grad()
def randomize_weights(model: nn.Module, seed: int = 0, std: float = 0.1) -> None:
    """Re-initialise every weight so that no output is trivially zero.

    Matrices and embeddings ~ N(0, std), router weights ~ N(0, 2 std) so that top-k has clear
    winners, norm weights ~ 1 + N(0, std / 2), biases ~ N(0, std / 2), other all-zero 1-D
    parameters (sinks, scales) ~ N(0, std / 2), the expert-selection bias buffers
    (``e_score_correction_bias``...) ~ N(0, std), and a hash-routing table (``tid2eid``, all
    zeros by default) gets distinct random experts. Rotary tables and other buffers are kept.
    """
    gen = torch.Generator().manual_seed(seed)

    def normal_(t: torch.Tensor, mean: float, sigma: float) -> None:
        t.copy_((torch.randn(t.shape, generator=gen, dtype=torch.float32) * sigma + mean).to(t.dtype))

    for module_name, module in model.named_modules():
        is_norm = bool(_NORM_RE.search(type(module).__name__))
        is_router = bool(re.search(r"(router|gate)$", module_name)) and not is_norm
        for name, param in module.named_parameters(recurse=False):
            if not param.is_floating_point():
                continue
            if is_norm and name == "weight":
                normal_(param, 1.0, std / 2)
            elif param.dim() >= 2:
                normal_(param, 0.0, 2 * std if is_router or "router" in name else std)
            elif name.endswith("bias") or not bool(param.any()):
                normal_(param, 0.0, std / 2)
        for name, buf in module.named_buffers(recurse=False):
            if buf is None:
                continue
            if buf.is_floating_point() and _SELECTION_BIAS_RE.search(name):
                normal_(buf, 0.0, std)
            elif name == "tid2eid" and hasattr(module, "num_experts"):
                # Hash routing table [vocab, K]: K distinct random experts per token id.
                vocab, k = buf.shape
                order = torch.rand(vocab, module.num_experts, generator=gen).argsort(dim=-1)
                buf.copy_(order[:, :k].to(buf.dtype))


class TinyModelError(ValueError):
    """A tiny model of this type cannot be built with the installed transformers (the message says why)."""


def build_tiny_model(model_type: str, seed: int = 0, dtype: torch.dtype = torch.float32, **overrides: Any) -> nn.Module:
    """A tiny random-weight model of ``model_type`` in eval mode.

    Raises TinyModelError (a ValueError) naming the type when its tiny config cannot be built or no
    model class takes it. Types whose forward fails inside transformers itself are listed in
    ``tests/integration/upstream_failures.py``.
    """
    try:
        config = _make_tiny_config(model_type, overrides)
    except Exception as exc:  # noqa: BLE001
        raise TinyModelError(
            f"model_type={model_type!r}: no tiny config can be built ({type(exc).__name__}: {exc})"
        ) from exc
    cls = model_class(model_type, config)
    if cls is None:
        raise TinyModelError(f"model_type={model_type!r}: no model class takes config {type(config).__name__}")
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = cls._from_config(config, dtype=dtype)
    _keep_in_fp32(model, dtype)
    randomize_weights(model, seed=seed)
    return model.eval()


@torch.no_grad()
def _keep_in_fp32(model: nn.Module, dtype: torch.dtype) -> None:
    """Upcast what ``from_pretrained(dtype=...)`` keeps in fp32: ``_keep_in_fp32_modules_strict`` for
    bf16 / fp16 and also ``_keep_in_fp32_modules`` for fp16 (routers, selection biases, norms)."""
    patterns = set()
    if dtype in (torch.float16, torch.bfloat16):
        patterns |= set(getattr(model, "_keep_in_fp32_modules_strict", None) or [])
    if dtype == torch.float16:
        patterns |= set(getattr(model, "_keep_in_fp32_modules", None) or [])
    if not patterns:
        return
    for module_name, module in model.named_modules():
        for name, tensor in list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False)):
            full = f"{module_name}.{name}" if module_name else name
            if tensor is None or not tensor.is_floating_point() or not any(p in full for p in patterns):
                continue
            if isinstance(tensor, nn.Parameter):
                tensor.data = tensor.data.float()
            else:
                setattr(module, name, tensor.float())


def forward_module(model: nn.Module) -> nn.Module:
    """The module to call: the model itself, or its first sub-model when it has no forward of its own."""
    if type(model).forward is not nn.Module.forward:
        return model
    from transformers import PreTrainedModel

    for child in model.children():
        if isinstance(child, PreTrainedModel) and type(child).forward is not nn.Module.forward:
            return child
    return model


def _takes_input_ids(module: nn.Module) -> bool:
    """Whether ``module(input_ids=...)`` can embed the ids (some talker models only take embeddings)."""
    try:
        params = inspect.signature(module.forward).parameters
        source = inspect.getsource(type(module).forward)
    except (OSError, TypeError, ValueError):
        return True
    if "input_ids" not in params:
        return False
    if "self.embed_tokens(" in source and not hasattr(module, "embed_tokens"):
        return False
    try:
        return module.get_input_embeddings() is not None
    except (AttributeError, NotImplementedError):
        return False


def tiny_inputs(model: nn.Module, batch: int = 2, seq: int = 8, seed: int = 0) -> dict[str, Any]:
    """Forward kwargs for ``forward_module(model)``: random ``input_ids`` [batch, seq] for language models.

    Encoder-decoders also get ``decoder_input_ids``; a model without token embeddings gets
    ``inputs_embeds`` [batch, seq, H]; vision encoders get random pixels.
    """
    gen = torch.Generator().manual_seed(seed)
    module = forward_module(model)
    config = module.config
    dtype = next(model.parameters()).dtype
    params = inspect.signature(module.forward).parameters
    if "pixel_values" in params and "input_ids" not in params:
        return _vision_inputs(module, batch, gen, dtype)
    text = getattr(config, "text_config", None) or config
    vocab = getattr(text, "vocab_size", None) or VOCAB
    input_ids = torch.randint(3, min(vocab, VOCAB), (batch, seq), generator=gen)
    if not _takes_input_ids(module):
        hidden = getattr(text, "hidden_size", HIDDEN)
        return {"inputs_embeds": torch.randn(batch, seq, hidden, generator=gen).to(dtype)}
    kwargs: dict[str, Any] = {"input_ids": input_ids}
    if getattr(config, "is_encoder_decoder", False):
        kwargs["decoder_input_ids"] = input_ids.clone()
    return kwargs


def _vision_inputs(module: nn.Module, batch: int, gen: torch.Generator, dtype: torch.dtype) -> dict[str, Any]:
    config = module.config
    params = inspect.signature(module.forward).parameters
    if "grid_thw" in params:
        # One image of (2 merge) x (2 merge) patches, flattened to [t*h*w, C*P*P].
        merge = getattr(config, "spatial_merge_size", 1)
        grid = torch.tensor([[1, 2 * merge, 2 * merge]])
        patch_dim = getattr(config, "num_channels", 3) * config.patch_size**2
        patch_dim *= getattr(config, "temporal_patch_size", 1) if "temporal_patch_size" in vars(config) else 1
        n = int(grid.prod())
        return {"pixel_values": torch.randn(n, patch_dim, generator=gen).to(dtype), "grid_thw": grid}
    size = config.image_size if isinstance(config.image_size, (list, tuple)) else (config.image_size,) * 2
    pixels = torch.randn(batch, getattr(config, "num_channels", 3), *size, generator=gen).to(dtype)
    kwargs: dict[str, Any] = {"pixel_values": pixels}
    if "dataset_index" in params:
        kwargs["dataset_index"] = torch.arange(batch) % max(1, getattr(config, "num_experts", 1))
    return kwargs


def first_tensor(output) -> torch.Tensor:
    """The main floating-point tensor of a model output (logits / last_hidden_state / tensor)."""
    if isinstance(output, torch.Tensor):
        return output
    values = output.values() if hasattr(output, "values") else output
    for value in values:
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            return value
        if isinstance(value, (tuple, list)) or hasattr(value, "values"):
            try:
                return first_tensor(value)
            except LookupError:
                continue
    raise LookupError("no floating-point tensor in the model output")

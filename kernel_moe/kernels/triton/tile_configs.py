"""Tile configurations (block sizes, warps, pipeline stages) of the Triton MoE kernels: tuned
JSON tables and a sound default. Not to be confused with the user-facing ``KernelConfig``:
a tile config only says how the kernels of :mod:`kernel_moe.kernels.triton` are launched.

Legend: T tokens, H hidden, E experts, K experts per token (top-k), I expert intermediate
size, N up-projection features (2*I when gated, else I).

A forward tile config is a plain dict shared by the two grouped GEMMs (they share ``BLOCK_M``
because one expert-aligned layout feeds both)::

    {"BLOCK_M": 64,
     "up":   {"BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8, "num_warps": 8, "num_stages": 3},
     "down": {"BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8, "SPLIT_K": 1, "num_warps": 8, "num_stages": 3}}

``up.BLOCK_N`` counts intermediate columns: a gated program computes ``BLOCK_N`` gate and
``BLOCK_N`` up features. ``down.SPLIT_K`` > 1 splits the reduction over I between programs
(the decode path: few tokens, many programs streaming the weights). A backward tile config
adds ``act`` and ``dw`` (see :func:`default_backward_config`).

Tuned tables live in ``kernel_moe/kernels/triton/configs/`` (and in the folder named by the
environment variable ``KERNEL_MOE_TILE_CONFIG_DIR``, searched first; the deprecated
``KERNEL_MOE_KERNEL_CONFIG_DIR`` is still read, after it, with a DeprecationWarning), one JSON
file per ``(E, N, K=H, dtype, device)``, named by :func:`tile_config_file_name`, mapping a
token count T (as a string) to a config; the entry with the nearest T is used.
``benchmarks/tune_kernels.py`` writes them. This module does not import triton.
"""

from __future__ import annotations

import copy
import functools
import json
import logging
import math
import os
import re
import warnings
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger("kernel_moe")

TILE_CONFIG_DIR = Path(__file__).resolve().parent / "configs"
TILE_CONFIG_DIR_ENV = "KERNEL_MOE_TILE_CONFIG_DIR"
DEPRECATED_TILE_CONFIG_DIR_ENV = "KERNEL_MOE_KERNEL_CONFIG_DIR"
INTERPRETER_DEVICE = "interpreter"

_GEMM_KEYS = ("BLOCK_N", "BLOCK_K", "GROUP_M", "num_warps", "num_stages")
_DW_KEYS = ("BLOCK_M",) + _GEMM_KEYS
_TARGET_PROGRAMS = 512  # enough programs to keep ~132 SMs streaming weights (decode path)


def dtype_name(dtype: torch.dtype | str) -> str:
    """'bfloat16' for torch.bfloat16 (file-name form of a dtype)."""
    return dtype if isinstance(dtype, str) else str(dtype).removeprefix("torch.")


def device_key(device_name: str) -> str:
    """A device name reduced to file-name characters: 'NVIDIA H100 80GB HBM3' -> 'NVIDIA_H100_80GB_HBM3'."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", device_name.strip())


def tile_config_file_name(E: int, N: int, K: int, dtype: torch.dtype | str, device_name: str) -> str:
    """File name of the tuned table for experts E, up-projection features N, hidden size K."""
    return f"E={E},N={N},K={K},dtype={dtype_name(dtype)},device={device_key(device_name)}.json"


# --------------------------------------------------------------------------------------
# validation
# --------------------------------------------------------------------------------------


def _check_block(field: str, value: Any) -> None:
    if not isinstance(value, int) or value < 16 or value & (value - 1):
        raise ValueError(f"tile config field {field}={value!r}; allowed: a power of two >= 16")


def _check_gemm(config: dict, gemm: str, keys: tuple[str, ...]) -> None:
    """One GEMM's entry ``config[gemm]``: every key present, BLOCK_* powers of two >= 16, the
    others ints >= 1, num_warps a power of two."""
    sub = config.get(gemm)
    if not isinstance(sub, dict):
        raise ValueError(f"tile config field {gemm!r}={sub!r}; allowed: a dict with {', '.join(keys)}")
    for key in keys:
        if key not in sub:
            raise ValueError(f"tile config field {gemm}.{key} is missing; required: {', '.join(keys)}")
        value = sub[key]
        if key.startswith("BLOCK"):
            _check_block(f"{gemm}.{key}", value)
        elif not isinstance(value, int) or value < 1:
            raise ValueError(f"tile config field {gemm}.{key}={value!r}; allowed: an int >= 1")
    if sub["num_warps"] & (sub["num_warps"] - 1):
        raise ValueError(f"tile config field {gemm}.num_warps={sub['num_warps']!r}; allowed: a power of two")


def validate_tile_config(config: Any) -> dict:
    """Check a forward tile config; raise ValueError naming the field, the value and what is allowed."""
    if not isinstance(config, dict):
        raise ValueError(f"tile config must be a dict, got {type(config).__name__}")
    for field in ("BLOCK_M", "up", "down"):
        if field not in config:
            raise ValueError(f"tile config misses field {field!r}; required: BLOCK_M, up, down")
    _check_block("BLOCK_M", config["BLOCK_M"])
    for gemm in ("up", "down"):
        _check_gemm(config, gemm, _GEMM_KEYS)
    split = config["down"].get("SPLIT_K", 1)
    if not isinstance(split, int) or split < 1:
        raise ValueError(f"tile config field down.SPLIT_K={split!r}; allowed: an int >= 1")
    return config


def validate_backward_config(config: Any) -> dict:
    """Check a backward tile config (a forward one with ``act`` and ``dw``); ValueError naming
    the field, the value and what is allowed."""
    validate_tile_config(config)
    _check_gemm(config, "act", _GEMM_KEYS)
    _check_gemm(config, "dw", _DW_KEYS)
    return config


# --------------------------------------------------------------------------------------
# tuned tables
# --------------------------------------------------------------------------------------


@functools.cache
def _warn_deprecated_dir(value: str) -> None:
    """Once per value: the old variable still works but is on its way out."""
    warnings.warn(
        f"{DEPRECATED_TILE_CONFIG_DIR_ENV}={value!r} is deprecated; set {TILE_CONFIG_DIR_ENV} instead",
        DeprecationWarning,
        stacklevel=4,
    )


def _search_dirs() -> list[Path]:
    dirs = []
    for env in (TILE_CONFIG_DIR_ENV, DEPRECATED_TILE_CONFIG_DIR_ENV):
        value = os.environ.get(env)
        if value:
            if env == DEPRECATED_TILE_CONFIG_DIR_ENV:
                _warn_deprecated_dir(value)
            dirs.append(Path(value))
    return dirs + [TILE_CONFIG_DIR]


@functools.lru_cache(maxsize=64)
def _load_table(path: str) -> dict[int, dict] | None:
    """A tuned table {T: config}, or None when the file is missing or malformed (logged)."""
    p = Path(path)
    if not p.is_file():
        return None
    try:
        raw = json.loads(p.read_text())
        table = {int(t): validate_tile_config(cfg) for t, cfg in raw.items()}
    except (OSError, ValueError, TypeError, AttributeError) as exc:
        logger.warning("ignoring tile config file %s: %s", p, exc)
        return None
    return table or None


def load_tuned_table(E: int, N: int, K: int, dtype: torch.dtype | str, device_name: str) -> dict[int, dict] | None:
    """The first tuned table found for these shapes and device, or None."""
    name = tile_config_file_name(E, N, K, dtype, device_name)
    for folder in _search_dirs():
        table = _load_table(str(folder / name))
        if table is not None:
            return table
    return None


# --------------------------------------------------------------------------------------
# defaults and lookup
# --------------------------------------------------------------------------------------


def default_tile_config(
    E: int, N: int, K: int, dtype: torch.dtype | str, device_name: str, T: int, *, top_k: int = 2, gated: bool = True
) -> dict:
    """Heuristic config when no tuned table matches.

    Decode (few slots per expert): BLOCK_M 16, narrow up-projection tiles and split-K on the
    down projection so that several hundred programs stream the weights. Prefill: BLOCK_M
    grows with the average number of slots per expert; 128-wide tiles (64 per
    accumulator when gated), grouped ids.
    Under the interpreter: small blocks, to keep its numpy emulation fast.
    """
    I = N // 2 if gated else N
    H = K
    if device_name == INTERPRETER_DEVICE:
        return {
            "BLOCK_M": 16,
            "up": {"BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 4, "num_warps": 4, "num_stages": 1},
            "down": {"BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 4, "SPLIT_K": 1, "num_warps": 4, "num_stages": 1},
        }
    S = max(1, T * top_k)
    per_expert = S / E
    active = min(E, S)
    fp32 = dtype_name(dtype) == "float32"
    if per_expert <= 16:
        block_m = 16
        up_n = 64
        while up_n > 16 and active * math.ceil(I / up_n) < _TARGET_PROGRAMS:
            up_n //= 2
        down_n = 64
        tiles = active * math.ceil(H / down_n)
        split = 1
        while split < 16 and tiles * split < _TARGET_PROGRAMS and I >= 2 * split * 128:
            split *= 2
        bk = 64 if fp32 else 128
        return {
            "BLOCK_M": block_m,
            "up": {"BLOCK_N": up_n, "BLOCK_K": bk, "GROUP_M": 1, "num_warps": 4, "num_stages": 4},
            "down": {"BLOCK_N": down_n, "BLOCK_K": bk, "GROUP_M": 1, "SPLIT_K": split, "num_warps": 4, "num_stages": 4},
        }
    if per_expert <= 64:
        block_m, block_n, warps, stages = 32, 64, 4, 4
    elif per_expert <= 256:
        block_m, block_n, warps, stages = 64, 128, 4, 3
    else:
        block_m, block_n, warps, stages = 128, 128, 8, 3
    bk = 32 if fp32 else 64
    up_n = block_n // 2 if gated else block_n  # a gated program holds two accumulators
    return {
        "BLOCK_M": block_m,
        "up": {"BLOCK_N": up_n, "BLOCK_K": bk, "GROUP_M": 8, "num_warps": warps, "num_stages": stages},
        "down": {
            "BLOCK_N": block_n,
            "BLOCK_K": bk,
            "GROUP_M": 8,
            "SPLIT_K": 1,
            "num_warps": warps,
            "num_stages": stages,
        },
    }


def get_tile_config(
    E: int,
    N: int,
    K: int,
    dtype: torch.dtype | str,
    device_name: str,
    T: int,
    *,
    top_k: int = 2,
    gated: bool | None = None,
) -> dict:
    """Block sizes for experts E, up-projection features N, hidden size K (= H), T tokens.

    Looks up the tuned table of ``(E, N, K, dtype, device_name)`` and takes the entry whose
    token count is nearest to T; falls back to :func:`default_tile_config`. ``top_k`` and
    ``gated`` (default: N even) only shape the default. Returns a fresh dict.
    """
    if device_name != INTERPRETER_DEVICE:
        table = load_tuned_table(E, N, K, dtype, device_name)
        if table is not None:
            nearest = min(table, key=lambda t: (abs(t - T), t))
            return copy.deepcopy(table[nearest])
    if gated is None:
        gated = N % 2 == 0
    return default_tile_config(E, N, K, dtype, device_name, T, top_k=top_k, gated=gated)


def default_backward_config(
    E: int, N: int, H: int, dtype: torch.dtype | str, device_name: str, T: int, *, top_k: int = 2, gated: bool = True
) -> dict:
    """Block sizes of the backward kernels: the forward config (``BLOCK_M`` of the layout,
    ``down`` for grad_x) plus ``act`` (tiles of the activation-backward kernel: BLOCK_N
    columns of I, BLOCK_K of H) and ``dw`` (tiles of the weight gradients: BLOCK_M x BLOCK_N
    of the weight, BLOCK_K rows of slots per step). Small blocks under the interpreter."""
    config = get_tile_config(E, N, H, dtype, device_name, T, top_k=top_k, gated=gated)
    act = {k: config["up"][k] for k in _GEMM_KEYS}
    if device_name == INTERPRETER_DEVICE:
        dw = {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32, "GROUP_M": 4, "num_warps": 4, "num_stages": 1}
    else:
        if gated:  # three accumulators per program
            act["BLOCK_N"] = max(16, min(act["BLOCK_N"], 64))
        fp32 = dtype_name(dtype) == "float32"
        dw = {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 32 if fp32 else 64, "GROUP_M": 8, "num_warps": 8,
              "num_stages": 3}  # fmt: skip
    config["act"] = act
    config["dw"] = dw
    return config

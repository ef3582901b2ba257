"""Block-size configs: tuned-table lookup (nearest T), defaults and validation (no triton needed)."""

import json

import pytest
import torch

from kernel_moe.kernels import block_config
from kernel_moe.kernels.block_config import (
    INTERPRETER_DEVICE,
    config_file_name,
    default_kernel_config,
    get_kernel_config,
    validate_kernel_config,
)

DEVICE = "NVIDIA H100 80GB HBM3"


def _cfg(block_m, up_n=64, split=1):
    gemm = {"BLOCK_N": up_n, "BLOCK_K": 64, "GROUP_M": 8, "num_warps": 4, "num_stages": 3}
    return {"BLOCK_M": block_m, "up": dict(gemm), "down": dict(gemm, SPLIT_K=split)}


@pytest.fixture
def table_dir(tmp_path, monkeypatch):
    monkeypatch.setenv(block_config.CONFIG_DIR_ENV, str(tmp_path))
    block_config._load_table.cache_clear()
    yield tmp_path
    block_config._load_table.cache_clear()


def test_file_name_is_keyed_by_shape_dtype_and_device():
    name = config_file_name(8, 28672, 4096, torch.bfloat16, DEVICE)
    assert name == "E=8,N=28672,K=4096,dtype=bfloat16,device=NVIDIA_H100_80GB_HBM3.json"


def test_nearest_token_count_wins(table_dir):
    table = {"1": _cfg(16, split=4), "64": _cfg(32), "4096": _cfg(128, up_n=128)}
    (table_dir / config_file_name(8, 64, 32, torch.bfloat16, DEVICE)).write_text(json.dumps(table))
    pick = lambda T: get_kernel_config(8, 64, 32, torch.bfloat16, DEVICE, T)  # noqa: E731
    assert pick(1)["down"]["SPLIT_K"] == 4
    assert pick(20)["BLOCK_M"] == 16
    assert pick(40)["BLOCK_M"] == 32
    assert pick(3000)["BLOCK_M"] == 128
    assert pick(10**6)["up"]["BLOCK_N"] == 128
    pick(1)["BLOCK_M"] = 999  # callers get a copy
    assert pick(1)["BLOCK_M"] == 16


def test_other_dtype_or_device_falls_back_to_default(table_dir):
    (table_dir / config_file_name(8, 64, 32, torch.bfloat16, DEVICE)).write_text(json.dumps({"1": _cfg(128)}))
    got = get_kernel_config(8, 64, 32, torch.float16, DEVICE, 1)
    assert got == default_kernel_config(8, 64, 32, torch.float16, DEVICE, 1)
    got = get_kernel_config(8, 64, 32, torch.bfloat16, "NVIDIA A100-SXM4-80GB", 1)
    assert got["BLOCK_M"] == 16


def test_malformed_file_is_ignored(table_dir):
    (table_dir / config_file_name(8, 64, 32, torch.bfloat16, DEVICE)).write_text(json.dumps({"1": {"BLOCK_M": 7}}))
    got = get_kernel_config(8, 64, 32, torch.bfloat16, DEVICE, 1)
    assert got == default_kernel_config(8, 64, 32, torch.bfloat16, DEVICE, 1)


@pytest.mark.parametrize("T", [1, 16, 64, 512, 4096, 16384])
@pytest.mark.parametrize("shape", [(8, 2 * 14336, 4096, 2), (128, 2 * 768, 2048, 8), (4, 48, 40, 2)])
def test_default_is_valid_and_decode_splits(shape, T):
    E, N, H, K = shape
    cfg = validate_kernel_config(default_kernel_config(E, N, H, torch.bfloat16, DEVICE, T, top_k=K))
    if T * K <= E:  # decode: many programs stream the weights
        assert cfg["BLOCK_M"] == 16
    if (E, T) == (8, 1):
        assert cfg["down"]["SPLIT_K"] > 1
    if T >= 4096 and E == 8:
        assert cfg["BLOCK_M"] >= 64


def test_interpreter_config_is_small():
    cfg = get_kernel_config(8, 48, 40, torch.float32, INTERPRETER_DEVICE, 300)
    assert cfg["BLOCK_M"] == 16 and cfg["up"]["BLOCK_N"] <= 32 and cfg["up"]["BLOCK_K"] <= 32


@pytest.mark.parametrize(
    "mutate, field",
    [
        (lambda c: c.pop("up"), "up"),
        (lambda c: c.update(BLOCK_M=24), "BLOCK_M"),
        (lambda c: c["up"].update(BLOCK_K=8), "up.BLOCK_K"),
        (lambda c: c["down"].update(SPLIT_K=0), "down.SPLIT_K"),
        (lambda c: c["down"].update(num_warps=3), "down.num_warps"),
        (lambda c: c["up"].pop("GROUP_M"), "up.GROUP_M"),
    ],
)
def test_validation_names_the_field(mutate, field):
    cfg = _cfg(16)
    mutate(cfg)
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        validate_kernel_config(cfg)

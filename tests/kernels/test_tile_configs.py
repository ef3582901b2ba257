"""Tile configs of the Triton kernels: tuned-table lookup (nearest T), defaults, validation,
the search folders and the deprecated names (no triton needed)."""

import json
import warnings

import pytest
import torch

import kernel_moe.kernels
from kernel_moe.kernels.triton import tile_configs
from kernel_moe.kernels.triton.tile_configs import (
    INTERPRETER_DEVICE,
    default_backward_config,
    default_tile_config,
    get_tile_config,
    tile_config_file_name,
    validate_backward_config,
    validate_tile_config,
)

DEVICE = "NVIDIA H100 80GB HBM3"


def _cfg(block_m, up_n=64, split=1):
    gemm = {"BLOCK_N": up_n, "BLOCK_K": 64, "GROUP_M": 8, "num_warps": 4, "num_stages": 3}
    return {"BLOCK_M": block_m, "up": dict(gemm), "down": dict(gemm, SPLIT_K=split)}


@pytest.fixture
def table_dir(tmp_path, monkeypatch):
    monkeypatch.setenv(tile_configs.TILE_CONFIG_DIR_ENV, str(tmp_path))
    monkeypatch.delenv(tile_configs.DEPRECATED_TILE_CONFIG_DIR_ENV, raising=False)
    tile_configs._load_table.cache_clear()
    yield tmp_path
    tile_configs._load_table.cache_clear()


def test_file_name_is_keyed_by_shape_dtype_and_device():
    name = tile_config_file_name(8, 28672, 4096, torch.bfloat16, DEVICE)
    assert name == "E=8,N=28672,K=4096,dtype=bfloat16,device=NVIDIA_H100_80GB_HBM3.json"


def test_nearest_token_count_wins(table_dir):
    table = {"1": _cfg(16, split=4), "64": _cfg(32), "4096": _cfg(128, up_n=128)}
    (table_dir / tile_config_file_name(8, 64, 32, torch.bfloat16, DEVICE)).write_text(json.dumps(table))
    pick = lambda T: get_tile_config(8, 64, 32, torch.bfloat16, DEVICE, T)  # noqa: E731
    assert pick(1)["down"]["SPLIT_K"] == 4
    assert pick(20)["BLOCK_M"] == 16
    assert pick(40)["BLOCK_M"] == 32
    assert pick(3000)["BLOCK_M"] == 128
    assert pick(10**6)["up"]["BLOCK_N"] == 128
    pick(1)["BLOCK_M"] = 999  # callers get a copy
    assert pick(1)["BLOCK_M"] == 16


def test_other_dtype_or_device_falls_back_to_default(table_dir):
    (table_dir / tile_config_file_name(8, 64, 32, torch.bfloat16, DEVICE)).write_text(json.dumps({"1": _cfg(128)}))
    got = get_tile_config(8, 64, 32, torch.float16, DEVICE, 1)
    assert got == default_tile_config(8, 64, 32, torch.float16, DEVICE, 1)
    got = get_tile_config(8, 64, 32, torch.bfloat16, "NVIDIA A100-SXM4-80GB", 1)
    assert got["BLOCK_M"] == 16


def test_malformed_file_is_ignored(table_dir):
    (table_dir / tile_config_file_name(8, 64, 32, torch.bfloat16, DEVICE)).write_text(json.dumps({"1": {"BLOCK_M": 7}}))
    got = get_tile_config(8, 64, 32, torch.bfloat16, DEVICE, 1)
    assert got == default_tile_config(8, 64, 32, torch.bfloat16, DEVICE, 1)


@pytest.mark.parametrize("T", [1, 16, 64, 512, 4096, 16384])
@pytest.mark.parametrize("shape", [(8, 2 * 14336, 4096, 2), (128, 2 * 768, 2048, 8), (4, 48, 40, 2)])
def test_default_is_valid_and_decode_splits(shape, T):
    E, N, H, K = shape
    cfg = validate_tile_config(default_tile_config(E, N, H, torch.bfloat16, DEVICE, T, top_k=K))
    if T * K <= E:  # decode: many programs stream the weights
        assert cfg["BLOCK_M"] == 16
    if (E, T) == (8, 1):
        assert cfg["down"]["SPLIT_K"] > 1
    if T >= 4096 and E == 8:
        assert cfg["BLOCK_M"] >= 64


def test_interpreter_config_is_small():
    cfg = get_tile_config(8, 48, 40, torch.float32, INTERPRETER_DEVICE, 300)
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
        validate_tile_config(cfg)


def test_backward_config_validation_names_the_field():
    cfg = default_backward_config(4, 48, 40, torch.float32, INTERPRETER_DEVICE, 4)
    assert validate_backward_config(cfg) is cfg
    del cfg["dw"]
    with pytest.raises(ValueError, match="'dw'"):
        validate_backward_config(cfg)
    cfg = default_backward_config(4, 48, 40, torch.float32, INTERPRETER_DEVICE, 4)
    cfg["act"]["num_warps"] = 6
    with pytest.raises(ValueError, match=r"act\.num_warps=6"):
        validate_backward_config(cfg)


def test_packaged_tables_live_next_to_the_module():
    assert tile_configs.TILE_CONFIG_DIR.name == "configs"
    assert tile_configs.TILE_CONFIG_DIR.parent.name == "triton"
    assert (tile_configs.TILE_CONFIG_DIR / "README.md").is_file()


def test_deprecated_directory_variable_is_read_with_a_warning(tmp_path, monkeypatch):
    """KERNEL_MOE_KERNEL_CONFIG_DIR still adds its folder (after KERNEL_MOE_TILE_CONFIG_DIR) and
    warns that it is deprecated."""
    new, old = tmp_path / "new", tmp_path / "old"
    new.mkdir()
    old.mkdir()
    name = tile_config_file_name(8, 64, 32, torch.bfloat16, DEVICE)
    (old / name).write_text(json.dumps({"1": _cfg(32)}))
    monkeypatch.delenv(tile_configs.TILE_CONFIG_DIR_ENV, raising=False)
    monkeypatch.setenv("KERNEL_MOE_KERNEL_CONFIG_DIR", str(old))
    tile_configs._load_table.cache_clear()
    with pytest.warns(DeprecationWarning, match="KERNEL_MOE_TILE_CONFIG_DIR"):
        assert get_tile_config(8, 64, 32, torch.bfloat16, DEVICE, 1)["BLOCK_M"] == 32
    (new / name).write_text(json.dumps({"1": _cfg(64)}))
    monkeypatch.setenv("KERNEL_MOE_TILE_CONFIG_DIR", str(new))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        assert get_tile_config(8, 64, 32, torch.bfloat16, DEVICE, 1)["BLOCK_M"] == 64  # the new variable first
    tile_configs._load_table.cache_clear()


def test_new_directory_variable_does_not_warn(table_dir):
    (table_dir / tile_config_file_name(8, 64, 32, torch.bfloat16, DEVICE)).write_text(json.dumps({"1": _cfg(32)}))
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        assert get_tile_config(8, 64, 32, torch.bfloat16, DEVICE, 1)["BLOCK_M"] == 32


@pytest.mark.parametrize("old, new", [("config_file_name", tile_config_file_name),
                                      ("default_kernel_config", default_tile_config),
                                      ("get_kernel_config", get_tile_config),
                                      ("validate_kernel_config", validate_tile_config),
                                      ("default_backward_config", default_backward_config)])
def test_deprecated_top_level_names_resolve_to_the_new_functions(old, new):
    if old == "default_backward_config":
        pytest.importorskip("triton")  # its deprecated home is kernel_moe.kernels.triton.backward
    assert getattr(kernel_moe.kernels, old) is new

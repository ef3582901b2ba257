"""Training a small MoE through the fused layer: every load-balancing mode of KernelConfig
reduces expert-load imbalance relative to "none" (examples/train_moe.py, small and seeded)."""

import copy
import importlib.util
from pathlib import Path

import pytest
import torch

import kernel_moe

pytestmark = pytest.mark.slow

_spec = importlib.util.spec_from_file_location("train_moe", Path(__file__).parents[2] / "examples" / "train_moe.py")
train_moe = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(train_moe)


def test_balancing_modes_reduce_load_imbalance():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        data = train_moe.make_data(128, 256, 33, seed=1)
        train, val = data[:224], data[224:]
        torch.manual_seed(0)
        base = train_moe.TinyLM(128, 32, 1, lambda: train_moe.MoEBlock(32, 64, 8, 2))
        cv = {}
        for mode in ("none", "auxiliary_loss", "dynamic"):
            model = copy.deepcopy(base)
            config = kernel_moe.KernelConfig.for_moe(load_balancing=mode, aux_loss_weight=0.05, bias_update_rate=0.01)
            assert kernel_moe.optimize(model, config, return_report=True)[1].num_swapped == 1
            result = train_moe.run(model, train, val, steps=120, batch=8, lr=3e-3, log_every=30, name=mode)
            cv[mode] = sum(result["cv_history"][-2:]) / 2
            assert result["val_loss"] < 4.85  # below the uniform-prediction loss ln(128) = 4.85: it learned
        print("expert-load CV:", cv)
        assert cv["auxiliary_loss"] < cv["none"]
        assert cv["dynamic"] < cv["none"]
    finally:
        torch.set_num_threads(threads)

"""optimize() with offload_experts: outputs equal the model's own for every slot count (waves when a
step routes to more experts than slots), on hand-written and transformers models and in generate();
the experts file, checkpoints, the stats, prefetch and its cap, and what offloading refuses."""

from __future__ import annotations

import copy

import pytest
import torch

import kernel_moe
from helpers import TwoBlockModel, assert_fp32_close
from kernel_moe import KernelConfig, KernelMoEError
from kernel_moe.layers.offload import offload_stats

H, I, E, K = 32, 48, 8, 2
TIERS = ("host", "disk")


def _model(seed: int = 0, bias: bool = False) -> TwoBlockModel:
    torch.manual_seed(seed)
    return TwoBlockModel(hidden=H, inter=I, num_experts=E, top_k=K, bias=bias).eval()


def _offloaded(model, tier, slots, **extra):
    return kernel_moe.optimize(copy.deepcopy(model), KernelConfig.for_moe(offload_experts=tier, expert_slots=slots,
                                                                         **extra), return_report=True)


@pytest.mark.parametrize("tier", TIERS)
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
def test_every_slot_count_gives_the_models_outputs(tier, bias):
    reference = _model(bias=bias)
    batches = [torch.randn(T, H, generator=torch.Generator().manual_seed(T)) for T in (1, 7, 64, 1, 3)]
    with torch.no_grad():
        want = [reference(x) for x in batches]
    for slots in range(1, E + 1):
        model, report = _offloaded(reference, tier, slots)
        assert report.num_swapped == 2 and "experts offloaded" in report.swapped[0].details
        with torch.no_grad():
            for x, y in zip(batches, want):
                assert_fp32_close(model(x), y)
        stats = offload_stats(model)["total"]
        assert stats.steps == 2 * len(batches) and stats.tokens == 2 * sum(len(x) for x in batches)
        assert (stats.extra_waves > 0) == (slots < E)  # 64 tokens route to every expert: waves below E slots


def test_no_tokens_and_dropped_slots_follow_the_contract():
    from kernel_moe.kernels.contract import StackedExperts
    from kernel_moe.ops.experts import run_experts

    reference = _model()
    experts = reference.blocks[0].experts
    full = StackedExperts(torch.stack([torch.cat([e.w1.weight, e.w3.weight]) for e in experts]),
                          torch.stack([e.w2.weight for e in experts]))
    model, _ = _offloaded(reference, "disk", 2)
    with torch.no_grad():
        assert model(torch.randn(0, H)).shape == (0, H)
        x, w = torch.randn(3, H), torch.rand(3, 2)
        ids = torch.tensor([[0, -1], [9, 1], [-1, -1]])  # -1 and ids >= E: dropped slots
        got = model.blocks[0].offloaded_experts(x, w, ids)
        assert_fp32_close(got, run_experts(x, w, ids, full, "cpu"))
    assert torch.equal(got[2], torch.zeros(H))


def test_bf16_outputs_match_within_the_dtype_tolerance_in_waves():
    reference = _model().to(torch.bfloat16)
    x = torch.randn(32, H, dtype=torch.bfloat16)
    with torch.no_grad():
        want = reference(x).float()
        for slots in (1, 3, E):
            model, _ = _offloaded(reference, "disk", slots)
            torch.testing.assert_close(model(x).float(), want, atol=2e-2, rtol=2e-2)


def test_the_experts_leave_the_model_and_the_file_holds_them(tmp_path):
    safetensors = pytest.importorskip("safetensors")
    reference = _model(bias=True)
    model, _ = _offloaded(reference, "disk", 2, offload_dir=str(tmp_path))
    assert not any(".experts." in k for k in model.state_dict())
    assert not any(".experts." in n for n, _ in model.named_parameters())
    path = tmp_path / "blocks.0.experts.safetensors"
    assert path.exists()
    ex3 = reference.blocks[0].experts[3]  # w2(silu(w1 x) * w3 x): up = [w1; w3]
    with safetensors.safe_open(str(path), "pt") as f:
        assert torch.equal(f.get_tensor("e3.up"), torch.cat([ex3.w1.weight, ex3.w3.weight]))
        assert torch.equal(f.get_tensor("e3.down"), ex3.w2.weight)
        assert torch.equal(f.get_tensor("e3.up_bias"), torch.cat([ex3.w1.bias, ex3.w3.bias]))
        assert torch.equal(f.get_tensor("e3.down_bias"), ex3.w2.bias)


def test_a_checkpoint_with_expert_weights_is_written_into_the_store():
    other = _model(seed=5)
    for tier in TIERS:
        model, _ = _offloaded(_model(), tier, 3)
        x = torch.randn(9, H)
        with torch.no_grad():
            model(x)  # fill the slots with the old experts
            model.load_state_dict(other.state_dict())
            assert_fp32_close(model(x), other(x))


def test_prefetch_predicts_the_next_layer_and_respects_the_upload_cap():
    reference = _model()
    x = torch.randn(16, H)
    for cap in (1, 2):
        model, _ = _offloaded(reference, "disk", 4, offload_upload_cap=cap)
        with torch.no_grad():
            for _ in range(3):
                assert_fp32_close(model(x), reference(x))
        first, second = model.blocks[0].offloaded_experts.stats, model.blocks[1].offloaded_experts.stats
        assert first.predicted == 0 and first.prefetched == 0  # nothing before the first layer
        assert second.predicted > 0 and 0 < second.prefetched <= cap * 3
        assert second.prediction_accuracy > 0.5
        expert_bytes = model.blocks[1].offloaded_experts.store.expert_bytes
        assert second.bytes_moved == (second.loads + second.prefetched) * expert_bytes
    off, _ = _offloaded(reference, "disk", 4, offload_prefetch=False)
    with torch.no_grad():
        off(x)
    assert offload_stats(off)["total"].prefetched == 0


def test_hit_rate_reaches_one_when_every_expert_fits():
    model, _ = _offloaded(_model(), "host", E, offload_prefetch=False)
    x = torch.randn(64, H)
    with torch.no_grad():
        model(x)
        for s in offload_stats(model).values():
            s.reset()
        model.to("cpu")  # no move: the slots keep their experts
        model(x)
    total = offload_stats(model)["total"]
    assert total.hit_rate == 1.0 and total.loads == 0 and total.bytes_per_token == 0.0


def test_offloaded_experts_are_inference_only_and_cannot_be_restored():
    model, _ = _offloaded(_model(), "host", 2)
    x = torch.randn(4, H, requires_grad=True)
    with pytest.raises(KernelMoEError, match="inference-only.*torch.no_grad"):
        model(x)
    with pytest.raises(KernelMoEError, match="cannot restore.*offload_experts"):
        kernel_moe.restore(model)


def test_config_validation_names_the_field_and_what_is_allowed():
    with pytest.raises(ValueError, match="offload_experts='gpu'.*None, 'host', 'disk'"):
        KernelConfig.for_moe(offload_experts="gpu", expert_slots=2)
    with pytest.raises(ValueError, match="expert_slots=None.*an int >= 1 when offload_experts='disk'"):
        KernelConfig.for_moe(offload_experts="disk")
    with pytest.raises(ValueError, match="expert_slots=0"):
        KernelConfig.for_moe(offload_experts="disk", expert_slots=0)
    with pytest.raises(ValueError, match="expert_slots=4.*None when offload_experts is None"):
        KernelConfig.for_moe(expert_slots=4)
    with pytest.raises(ValueError, match="offload_dir='/tmp'.*None unless offload_experts='disk'"):
        KernelConfig.for_moe(offload_experts="host", expert_slots=2, offload_dir="/tmp")
    with pytest.raises(ValueError, match="offload_eviction='fifo'.*frequency, lru"):
        KernelConfig.for_moe(offload_experts="host", expert_slots=2, offload_eviction="fifo")
    with pytest.raises(ValueError, match="offload_upload_cap=0"):
        KernelConfig.for_moe(offload_experts="host", expert_slots=2, offload_upload_cap=0)
    with pytest.raises(ValueError, match="quantize_experts='int8'.*offload_experts"):
        KernelConfig.for_moe(offload_experts="host", expert_slots=2, quantize_experts="int8")
    with pytest.raises(ValueError, match="expert_parallel=True.*False when offload_experts is set"):
        KernelConfig.for_moe(offload_experts="host", expert_slots=2, expert_parallel=True)


def _tiny_hf(model_type: str):
    pytest.importorskip("transformers")
    from tests.integration.hf_tiny import build_tiny_model

    return build_tiny_model(model_type, seed=3)


@pytest.mark.parametrize("model_type", ["qwen3_moe", "mixtral"])
def test_tiny_transformers_models_give_the_same_logits_and_generate_the_same_tokens(model_type):
    reference = _tiny_hf(model_type)
    num_experts = reference.config.num_experts if model_type == "qwen3_moe" else reference.config.num_local_experts
    tokens = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want_logits = reference(tokens).logits
        want_tokens = reference.generate(tokens, max_new_tokens=6, do_sample=False)
    for slots in range(1, num_experts + 1):
        tier = TIERS[slots % 2]
        model, report = _offloaded(reference, tier, slots)
        assert report.num_swapped == reference.config.num_hidden_layers, str(report)
        with torch.no_grad():
            assert_fp32_close(model(tokens).logits, want_logits)
            assert torch.equal(model.generate(tokens, max_new_tokens=6, do_sample=False), want_tokens)
        assert offload_stats(model)["total"].predicted > 0  # layer 0 predicted layer 1's experts


def test_offloaded_model_compiles_whole():
    reference = _model()
    model, _ = _offloaded(reference, "disk", 3)
    x = torch.randn(8, H)
    torch._dynamo.reset()
    with torch.no_grad():
        assert torch._dynamo.explain(model)(x).graph_break_count == 0
        compiled = torch.compile(model, fullgraph=True)
        for T in (8, 8, 1):
            assert_fp32_close(compiled(x[:T]), reference(x[:T]))
    assert offload_stats(model)["total"].steps > 0
    torch._dynamo.reset()


@pytest.mark.slow
def test_peak_rss_stays_within_the_slots_and_the_non_expert_weights(tmp_path):
    """The benchmark's memory measurement (a subprocess reading VmHWM around generate()) at a
    model whose experts are 4x the slots."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    out = tmp_path / "memory.json"
    env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, str(root / "benchmarks" / "bench_offload.py"), "memory", "--scale", "2",
                    "--json", str(out)], check=True, env=env, cwd=root, timeout=900, capture_output=True)
    r = json.loads(out.read_text())
    assert r["expert_bytes"] >= 4 * r["slot_bytes"] * 0.99
    assert r["same_tokens"] and r["within"], r


def test_a_deleted_model_frees_its_slots_without_waiting_for_the_garbage_collector():
    import gc
    import weakref

    model, _ = _offloaded(_model(), "disk", 4)
    with torch.no_grad():
        model(torch.randn(5, H))
    refs = [weakref.ref(m.offloaded_experts) for m in model.blocks]
    gc.disable()
    try:
        del model
        assert all(r() is None for r in refs)  # no reference cycle keeps the slots alive
    finally:
        gc.enable()


def test_experts_with_a_post_expert_norm_are_not_offloaded():
    """Offloaded experts run the plain op: a layer whose experts normalise each output is skipped
    with that reason and keeps computing what the original does."""
    pytest.importorskip("transformers")
    from transformers.models.muse_spark.configuration_muse_spark import MuseSparkTextConfig
    from transformers.models.muse_spark.modeling_muse_spark import MuseSparkExperts

    torch.manual_seed(0)
    module = MuseSparkExperts(MuseSparkTextConfig(moe_hidden_size=16, moe_intermediate_size=12, num_local_experts=4))
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0.0, 0.3)
    config = KernelConfig.for_moe(offload_experts="host", expert_slots=2)
    model, report = kernel_moe.optimize(copy.deepcopy(module), config, return_report=True)
    assert report.swapped == [] and "post-expert norm" in report.skipped[0].reason
    x = torch.randn(5, 16)
    weights, ids = torch.randn(5, 4).softmax(-1).topk(2, dim=-1)
    with torch.no_grad():
        torch.testing.assert_close(model(x, ids, weights), module(x, ids, weights), rtol=0, atol=0)

"""The GPU paths: each subsystem that takes a device, run on CUDA and checked against a CPU peer.

Skipped without CUDA. ``PIMOE_TEST_DEVICE=cpu python -m pytest tests/test_cuda.py`` runs the same
checks on the CPU (to check the checks on a machine without a GPU); the device-only assertions
(the ``auto`` backend picking ``grouped_mm``, int4 refused off the CPU) then test the CPU side.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pimoe.moe import LoRAConfig, MoEConfig, PiMoE, add_lora, merge_lora, unmerge_lora
from pimoe.moe.backends import _BACKENDS, get_experts_backend
from pimoe.moe.lora import lora_adapters
from pimoe.moe.model import LMConfig, PiMoELM

DEVICE = torch.device(os.environ.get("PIMOE_TEST_DEVICE", "cuda"))
pytestmark = pytest.mark.skipif(
    DEVICE.type == "cuda" and not torch.cuda.is_available(), reason="no CUDA device"
)


def rel_error(out: Tensor, ref: Tensor) -> float:
    """``||out - ref|| / ||ref||`` in float64 on the CPU."""
    out, ref = out.detach().double().cpu(), ref.detach().double().cpu()
    return ((out - ref).norm() / ref.norm()).item()


def assert_grads_close(a: nn.Module, b: nn.Module, bound: float) -> None:
    grads_a = {n: p.grad for n, p in a.named_parameters() if p.grad is not None}
    grads_b = {n: p.grad for n, p in b.named_parameters() if p.grad is not None}
    assert grads_a.keys() == grads_b.keys() and grads_a
    for name, grad in grads_a.items():
        assert rel_error(grad, grads_b[name]) < bound, name


LAYERS = {
    "softmax top-2": dict(num_experts=8, top_k=2),
    "sigmoid shared bias": dict(
        num_experts=8, top_k=3, score="sigmoid", shared_experts=1, bias=True
    ),
    "capacity": dict(num_experts=4, top_k=2, capacity_factor=1.0),
    "expert choice": dict(num_experts=4, top_k=2, routing="expert_choice"),
    "aux-loss-free bias": dict(num_experts=8, top_k=2, balance="bias"),
}


@pytest.mark.parametrize("name", list(LAYERS))
def test_layer_forward_and_gradients_match_float64_on_the_cpu(name: str) -> None:
    torch.manual_seed(0)
    reference = PiMoE(32, MoEConfig(ffn_dim=64, **LAYERS[name])).double()
    layer = copy.deepcopy(reference).float().to(DEVICE)
    x_ref = torch.randn(4, 16, 32, dtype=torch.float64, requires_grad=True)
    x = x_ref.detach().float().to(DEVICE).requires_grad_()
    out, expected = layer(x), reference(x_ref)
    assert out.device.type == DEVICE.type
    assert rel_error(out, expected) < 1e-5
    grad = torch.randn_like(expected)
    out.backward(grad.float().to(DEVICE))
    expected.backward(grad)
    assert rel_error(x.grad, x_ref.grad) < 1e-5
    assert_grads_close(layer, reference, 1e-4)


def test_bfloat16_backends_agree_and_auto_picks_grouped_mm_on_cuda() -> None:
    torch.manual_seed(0)
    config = MoEConfig(num_experts=8, top_k=2, ffn_dim=128, router_bias=True, backend="loop")
    loop = PiMoE(64, config).to(DEVICE, torch.bfloat16)
    with torch.no_grad():
        loop.router.gate.bias[3] = -100.0  # expert 3 gets no rows: a zero-length group
    grouped = copy.deepcopy(loop)
    grouped.experts.backend = "grouped_mm"
    auto = "grouped_mm" if DEVICE.type == "cuda" and hasattr(F, "grouped_mm") else "loop"
    assert get_experts_backend("auto", loop.experts.w_in) is _BACKENDS[auto]
    x = torch.randn(3, 40, 64, device=DEVICE, dtype=torch.bfloat16)
    xs = [x.clone().requires_grad_() for _ in range(2)]
    outs = [loop(xs[0]), grouped(xs[1])]
    assert loop.last_stats is not None and loop.last_stats.tokens_per_expert[3] == 0
    assert rel_error(outs[1], outs[0]) < 1e-2
    grad = torch.randn_like(outs[0])
    for out in outs:
        out.backward(grad)
    assert rel_error(xs[1].grad, xs[0].grad) < 2e-2
    assert_grads_close(grouped, loop, 2e-2)


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe", "olmoe", "deepseek_v3", "gpt_oss"])
def test_hf_models_run_their_experts_on_pimoe_on_the_device(family: str) -> None:
    pytest.importorskip("transformers")
    from pimoe.hf.families import build_tiny, compare_implementations

    model = build_tiny(family).to(DEVICE)
    ids = torch.randint(
        0, model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1)
    )
    diff = compare_implementations(model, ids.to(DEVICE))["pimoe"]
    assert diff["max_abs_logit"] > 0.5
    assert diff["max_abs_logit_diff"] <= 1e-4
    assert diff["max_abs_grad_diff"] <= 1e-5 * diff["max_abs_grad"]


def test_int8_experts_on_the_device_match_the_cpu_and_int4_says_it_is_cpu_only() -> None:
    from pimoe.compress.quantize_experts import quantize_experts

    torch.manual_seed(0)
    layer = PiMoE(64, num_experts=4, top_k=2, ffn_dim=64).eval()
    quantize_experts(layer, 8)
    moved = copy.deepcopy(layer).to(DEVICE)
    x = torch.randn(30, 64)
    with torch.no_grad():
        assert rel_error(moved(x.to(DEVICE)), layer(x)) < 1e-5
    int4 = PiMoE(64, num_experts=4, top_k=2, ffn_dim=64).to(DEVICE)
    if DEVICE.type == "cpu":
        assert quantize_experts(int4, 4, group_size=32) == ["experts"]
    else:
        with pytest.raises(ValueError, match="CPU only"):
            quantize_experts(int4, 4, group_size=32)


def test_lora_on_experts_trains_merges_and_unmerges_on_the_device() -> None:
    torch.manual_seed(0)
    reference = nn.Sequential(nn.Linear(16, 16), PiMoE(16, num_experts=4, top_k=2, ffn_dim=8))
    add_lora(reference, LoRAConfig(r=2, lora_alpha=4, target_modules=("0",)))
    with torch.no_grad():
        for adapter in lora_adapters(reference).values():
            adapter.lora_B.normal_(0.0, 0.1)
    reference = reference.double()
    model = copy.deepcopy(reference).float().to(DEVICE)
    x_ref = torch.randn(3, 5, 16, dtype=torch.float64)
    x = x_ref.float().to(DEVICE)
    out, expected = model(x), reference(x_ref)
    assert rel_error(out, expected) < 1e-5
    out.square().sum().backward()
    expected.square().sum().backward()
    assert_grads_close(model, reference, 1e-4)
    assert all("lora_" in n for n, p in model.named_parameters() if p.grad is not None)
    with torch.no_grad():
        merge_lora(model)
        assert rel_error(model(x), expected) < 1e-5
        unmerge_lora(model)
        assert rel_error(model(x), expected) < 1e-5


def test_inference_engine_on_the_device_with_bfloat16_autocast() -> None:
    from pimoe.infer.engine import InferenceConfig, InferenceEngine

    torch.manual_seed(0)
    layer = PiMoE(32, num_experts=4, top_k=2, ffn_dim=64).to(DEVICE)
    x = torch.randn(2, 9, 32, device=DEVICE)
    fp32 = InferenceEngine(InferenceConfig(device=str(DEVICE))).infer(layer, x)
    with torch.no_grad():
        assert torch.equal(fp32, layer(x))
    bf16 = InferenceEngine(InferenceConfig(device=str(DEVICE), dtype="bfloat16")).infer(layer, x)
    assert bf16.device.type == DEVICE.type and rel_error(bf16, fp32) < 2e-2


def _greedy_through_the_engine(
    model, prompts: list[list[int]], tokens: int
) -> list[tuple[int, ...]]:
    from pimoe.infer.generation import GenerationEngine, SamplingParams

    engine = GenerationEngine(model, max_batch_size=4)
    try:
        params = SamplingParams(max_tokens=tokens, temperature=0)
        events = [engine.generate(p, params) for p in prompts]
    finally:
        engine.close()
    assert [e.error for e in events] == [None] * len(events)
    return [e.token_ids for e in events]


def test_pimoe_lm_serves_greedy_tokens_of_its_own_generate_on_the_device() -> None:
    from pimoe.infer.lm_models import PiMoEGenerationModel

    torch.manual_seed(0)
    config = LMConfig(
        block_size=64,
        n_layer=2,
        n_head=2,
        d_model=32,
        moe=MoEConfig(num_experts=4, top_k=2, ffn_dim=32),
    )
    model = PiMoEGenerationModel(PiMoELM(config).to(DEVICE).eval())
    prompts = [model.encode(p) for p in ("The with statement", "import os", "x = 1")]
    expected = [
        tuple(
            model.model.generate(torch.tensor([p], device=DEVICE), 10, temperature=0)[
                0, len(p) :
            ].tolist()
        )
        for p in prompts
    ]
    assert _greedy_through_the_engine(model, prompts, 10) == expected


def test_hf_lm_serves_greedy_tokens_of_transformers_generate_on_the_device(tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    from pimoe.bench.tiny_llama import byte_tokenizer, save_tiny_llama
    from pimoe.infer.lm_models import HFGenerationModel, open_generation_model

    model = open_generation_model(
        save_tiny_llama(tmp_path / "llama", byte_tokenizer()), device=str(DEVICE)
    )
    assert isinstance(model, HFGenerationModel)
    assert next(model.model.parameters()).device.type == DEVICE.type
    prompts = [model.encode(p) for p in ("The with statement", "class A:")]
    expected = []
    for p in prompts:
        out = model.model.generate(
            torch.tensor([p], device=DEVICE),
            max_new_tokens=8,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
        )
        expected.append(tuple(out[0, len(p) :].tolist()))
    assert _greedy_through_the_engine(model, prompts, 8) == expected


def test_training_an_lm_on_the_device_lowers_the_loss() -> None:
    from pimoe.data.text import byte_splits, load_pydoc_text
    from pimoe.training import train_lm

    train, val = byte_splits(load_pydoc_text()[:200_000])
    config = LMConfig(
        block_size=32,
        n_layer=2,
        n_head=2,
        d_model=64,
        moe=MoEConfig(num_experts=4, top_k=2, ffn_dim=64),
    )
    result = train_lm(
        config, train, val, steps=40, batch_size=8, lr=3e-3, device=DEVICE, seed=0, progress=False
    )
    assert next(result.model.parameters()).device.type == DEVICE.type
    assert sum(result.ce[-5:]) / 5 < sum(result.ce[:5]) / 5 - 0.5
    assert result.val_loss < 4.0  # below the 5.55 nats of a uniform byte

"""The seed's inference names in :mod:`pimoe.compat`, and its "Ultra-Fast Inference
Implementation" example run with only its import line changed."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from pimoe.compat import (
    InferenceCache,
    IntelligentCaching,
    UltraFastInferenceConfig,
    UltraFastInferenceEngine,
)
from pimoe.infer import InferenceCache as BaseCache


def _seed_example(model: nn.Module, input_data: torch.Tensor) -> tuple[object, torch.Tensor]:
    # --- the seed's example, verbatim but for the import line ---
    from pimoe.compat import (  # noqa: I001 (as the seed wrote it)
        UltraFastInferenceEngine,
        UltraFastInferenceConfig,
    )

    # Create ultra-fast inference engine
    inference_config = UltraFastInferenceConfig(
        cache_size=10000,
        enable_model_compression=True,
        enable_pruning=True,
        enable_quantization=True,
        quantization_bits=8,
        enable_torch_compile=True,
        enable_mixed_precision=True,
    )

    engine = UltraFastInferenceEngine(inference_config)
    output = engine.infer(model, input_data)
    # --- end of the seed's example ---
    return engine, output


def test_seed_ultra_fast_inference_example() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 8)).eval()
    input_data = torch.randn(4, 32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a compile fallback warns; the result must still be right
        engine, output = _seed_example(model, input_data)
    assert isinstance(engine, UltraFastInferenceEngine)
    assert output.shape == (4, 8) and torch.isfinite(output.float()).all()
    reference = model(input_data)
    assert torch.nn.functional.cosine_similarity(output.float(), reference, dim=-1).mean() > 0.8
    report = engine.report(model)
    assert report.steps[0].name == "before"
    # after "before": pruning, then quantization step(s)
    steps = [row.name for row in report.steps][1:]
    assert steps[0].endswith("prune") and len(steps) >= 2, steps
    again = engine.infer(model, input_data)  # a cache hit; compressed once
    assert torch.equal(again, output) and engine.report(model) is report
    assert engine.engine.cache is not None and engine.engine.cache.stats.hits == 1
    assert all(p.abs().sum() > 0 for p in model.parameters())  # the original is not changed


def test_config_maps_to_engine_and_compression_settings() -> None:
    cfg = UltraFastInferenceConfig(
        cache_size=5, enable_torch_compile=True, enable_mixed_precision=True
    )
    inf = cfg.inference_config()
    assert (inf.compile, inf.dtype, inf.cache_size) == (True, "bfloat16", 5)
    assert cfg.architecture_config() is None
    arch = UltraFastInferenceConfig(
        enable_model_compression=True, enable_pruning=True
    ).architecture_config()
    assert arch is not None and arch.enabled_steps() == ["prune"]


def test_engine_without_compression_runs_the_model_itself() -> None:
    model = nn.Linear(3, 2).eval()
    x = torch.randn(2, 3)
    out = UltraFastInferenceEngine().infer(model, x)
    assert torch.allclose(out, model(x))


def test_inference_cache_accepts_cache_strategy() -> None:
    cache = InferenceCache(max_size=2, cache_strategy="lru")
    assert isinstance(cache, BaseCache) and cache.policy == "lru"
    assert InferenceCache(max_size=2, policy="fifo").policy == "fifo"
    for key in ("a", "b"):
        cache.put(key, torch.zeros(1))
    cache.get("a")
    cache.put("c", torch.zeros(1))  # LRU evicts "b"
    assert "a" in cache and "b" not in cache and cache.stats.evictions == 1
    with pytest.raises(ValueError, match="disagree"):
        InferenceCache(max_size=2, cache_strategy="lru", policy="lfu")


def test_intelligent_caching_get_or_compute() -> None:
    cache = IntelligentCaching(UltraFastInferenceConfig(cache_size=3))
    calls: list[int] = []

    def compute() -> torch.Tensor:
        calls.append(1)
        return torch.ones(2)

    assert torch.equal(cache.get_or_compute("k", compute), torch.ones(2))
    assert torch.equal(cache.get_or_compute("k", compute), torch.ones(2))
    assert len(calls) == 1 and cache.stats.hits == 1 and cache.stats.misses == 1
    assert IntelligentCaching(max_size=4, cache_strategy="fifo").policy == "fifo"

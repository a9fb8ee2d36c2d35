"""check_families rows (consumed by `pimoe bench models`) and the transformers-backend benchmark."""

from __future__ import annotations

import itertools

import pytest
import torch

pytest.importorskip("transformers")

from pimoe.bench.hf_backend import HFBackendBenchConfig, run
from pimoe.hf import check_families, families
from pimoe.moe.threaded import threaded_kernel


def test_check_families_row(monkeypatch: pytest.MonkeyPatch) -> None:
    # a clock that advances 1 s per reading: each timed forward takes exactly 1000 ms
    ticks = itertools.count()
    monkeypatch.setattr(families.time, "perf_counter", lambda: float(next(ticks)))
    (row,) = check_families(["olmoe"], tokens=16, repeats=3)
    assert row["family"] == "olmoe" and row["experts_class"] == "OlmoeExperts"
    assert row["max_abs_logit_diff"] <= 1e-4 and row["max_abs_grad"] > 0
    assert row["grouped_mm_max_abs_logit_diff"] <= 1e-4
    timed = {k: v for k, v in row.items() if k.startswith("fwd_ms_")}
    assert timed == {f"fwd_ms_{name}": 1000.0 for name in ("pimoe", "grouped_mm", "eager")}


def test_check_families_bad_input() -> None:
    with pytest.raises(ValueError, match="unknown MoE families \\['llama'\\]"):
        check_families(["llama"])
    with pytest.raises(ValueError, match="tokens and repeats"):
        check_families(["mixtral"], tokens=0)


def test_benchmark_runs_at_a_tiny_size() -> None:
    threads = torch.get_num_threads()
    try:
        result = run(
            HFBackendBenchConfig(
                d_model=32, tokens=[24], rounds=1, families=["mixtral"], family_tokens=8
            )
        )
    finally:
        torch.set_num_threads(threads)
    assert {r["shape"] for r in result["rows"]} == {"qwen3_moe E64 k8 f256", "mixtral E8 k2 f1024"}
    assert result["max_abs_diff_vs_eager"] <= 1e-5
    assert result["max_abs_logit_diff_hf"] == result["families"][0]["max_abs_logit_diff"]
    assert all(r["pimoe_vs_grouped_mm"] > 0 for r in result["rows"])
    if threaded_kernel() is not None:  # packed weights: timed in forward rows only
        packed = {r["mode"]: r["pimoe_packed_vs_grouped_mm"] for r in result["rows"]}
        assert packed["fwd"] > 0 and packed["fwd+bwd"] is None

"""The LoRA-on-transformers-experts bench compares like with like: its three runs start from the
same model, the two LoRA runs hold the same adapters and differ only in the experts path."""

from dataclasses import replace

import torch

from pimoe.bench.expert_lora_hf import QUICK, RUNS, bench_family, build_run
from pimoe.moe.lora import lora_adapters


def test_runs_start_equal_and_only_the_experts_path_differs() -> None:
    ids = torch.randint(3, 200, (2, 12), generator=torch.Generator().manual_seed(0))
    logits, grads = {}, {}
    for run in RUNS:
        model, _ = build_run("qwen3_moe", run, QUICK)
        assert model.config._experts_implementation == RUNS[run][0]
        out = model(ids).logits
        out.square().sum().backward()
        logits[run] = out.detach()
        grads[run] = [a.lora_B.grad for a in lora_adapters(model).values()]
    torch.testing.assert_close(logits["lora"], logits["full"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logits["lora_parametrized"], logits["full"], rtol=1e-5, atol=1e-5)
    assert grads["lora"] and len(grads["lora"]) == len(grads["lora_parametrized"])
    for got, expected in zip(grads["lora"], grads["lora_parametrized"], strict=True):
        torch.testing.assert_close(
            got, expected, rtol=1e-4, atol=1e-5 * expected.abs().max().item()
        )


def test_bench_family_reports_every_run() -> None:
    row = bench_family("mixtral", replace(QUICK, steps=1, memory_steps=0), progress=False)
    trainable = row["trainable_params"]
    assert trainable["lora"] == trainable["lora_parametrized"] < trainable["full"] // 5
    assert row["step_time_vs_full"]["full"] == 1.0
    assert all(row[run]["step_s_median"] > 0 for run in RUNS)
    assert row["lora"]["grad_bytes"] < row["full"]["grad_bytes"] // 5

"""The byte-level computation benchmark is a pure function of its seed on one machine."""

from __future__ import annotations

import re
from dataclasses import replace

import torch

from pimoe.bench.computation import QUICK, run
from pimoe.compute.train import TrainSettings
from pimoe.moe.config import MoEConfig
from pimoe.moe.model import LMConfig

TIMING = re.compile(r"latency|_s_|seconds")


def _micro(seed: int):
    lm = LMConfig(
        block_size=128,
        n_layer=1,
        n_head=2,
        d_model=32,
        moe=MoEConfig(num_experts=2, top_k=1, ffn_dim=32),
    )
    return replace(
        QUICK,
        lm=lm,
        lm_train=TrainSettings(steps=40, batch_size=8, lr=1e-2),
        router_train=TrainSettings(steps=20, batch_size=8, lr=1e-2),
        eval_problems=4,
        router_eval_problems=12,
        max_new_tokens=24,
        seed=seed,
    )


def _measured(result: dict) -> dict:
    return {k: v for k, v in result.items() if not TIMING.search(k)}


def test_same_seed_same_numbers_different_seed_different_training() -> None:
    threads = torch.get_num_threads()
    first, second = run(_micro(0), progress=False), run(_micro(0), progress=False)
    assert torch.get_num_threads() == threads  # the run's thread setting is undone
    assert _measured(first) == _measured(second)
    assert first["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    other = run(_micro(1), progress=False)
    assert other["final_loss_text_expert"] != first["final_loss_text_expert"]

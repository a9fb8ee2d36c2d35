"""pimoe.training: the step runner, its progress lines in logs, the LM trainer; pimoe.models.progress."""

from __future__ import annotations

import itertools

import pytest
import torch

from pimoe.models import progress
from pimoe.models.progress import Progress, track
from pimoe.moe.config import MoEConfig
from pimoe.moe.model import LMConfig
from pimoe.training import lr_factor, run_steps, train_lm

TINY = LMConfig(
    block_size=16,
    n_layer=2,
    n_head=2,
    d_model=16,
    moe=MoEConfig(num_experts=4, top_k=2, ffn_dim=16),
)


def test_run_steps_keeps_each_value_and_prints_plain_lines(
    monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    monkeypatch.setattr(progress, "PLAIN_EVERY_S", 0.0)  # a line after every step
    history = run_steps(lambda i: {"loss": 1.0 / (i + 1), "aux": float(i)}, 4, "train toy")
    assert history == {"loss": [1.0, 0.5, 1 / 3, 0.25], "aux": [0.0, 1.0, 2.0, 3.0]}
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "train toy: 0/4"
    assert [line.split(" (")[0] for line in lines[1:5]] == [
        f"train toy: {i}/4" for i in range(1, 5)
    ]
    assert lines[4].endswith("loss 0.25 aux 3")
    assert lines[5].startswith("train toy: done, 4 in ") and len(lines) == 6


def test_plain_lines_are_periodic_and_can_be_off(monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    monkeypatch.setattr(progress, "PLAIN_EVERY_S", 3600.0)
    assert list(track(range(50), "loop")) == list(range(50))
    lines = capsys.readouterr().out.splitlines()
    assert (
        lines[0] == "loop: 0/50" and lines[1].startswith("loop: done, 50 in ") and len(lines) == 2
    )
    with Progress(3, "quiet", enabled=False) as bar:
        bar.update(loss=1.0)
    assert capsys.readouterr().out == ""
    with pytest.raises(ValueError, match="steps must be >= 1"):
        run_steps(lambda i: {}, 0, "none")


def test_lr_schedule_warms_up_then_decays_to_a_tenth() -> None:
    factors = [lr_factor(s, 100) for s in range(100)]
    assert factors[:5] == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0])
    assert all(a >= b for a, b in itertools.pairwise(factors[4:]))
    assert factors[-1] == pytest.approx(0.1, abs=1e-3)


def test_train_lm_is_seeded_and_reports_routing(capsys) -> None:
    data = torch.randint(0, 256, (2000,), generator=torch.Generator().manual_seed(0))
    runs = [
        train_lm(
            TINY, data[:1600], data[1600:], steps=6, batch_size=2, lr=1e-2, device="cpu", seed=3
        )
        for _ in range(2)
    ]
    assert runs[0].losses == runs[1].losses and runs[0].val_loss == runs[1].val_loss
    assert len(runs[0].ce) == 6 and all(
        a > c for a, c in zip(runs[0].losses, runs[0].ce)
    )  # aux adds to CE
    assert len(runs[0].routing) == 2 and sum(runs[0].routing[0].load) == pytest.approx(1.0)
    assert "train PiMoE LM: done, 6 in " in capsys.readouterr().out
    dense = train_lm(
        TINY.dense_twin(),
        data[:1600],
        data[1600:],
        steps=2,
        batch_size=2,
        lr=1e-2,
        device="cpu",
        seed=3,
        progress=False,
    )
    assert dense.aux == [0.0, 0.0] and dense.routing == [] and capsys.readouterr().out == ""

from __future__ import annotations

import torch

from pimoe.compute.head_validation import (
    CACHED_LAYERS,
    layer_slice,
    phrasing_group,
    validation_split,
)
from pimoe.compute.llm_prompts import shot_problems
from pimoe.compute.word_grammar import FIRST_ROUND, FRAMES
from pimoe.compute.word_problems import PATTERNS, TEMPLATES, WordProblemSet


def test_validation_phrasings_are_unseen_training_phrasings() -> None:
    problems = WordProblemSet()
    train, val = validation_split(problems)
    train_groups = {phrasing_group(t) for t in train}
    val_groups = {phrasing_group(t) for t in val}
    assert train_groups.isdisjoint(val_groups)
    assert {t.pattern for t in val} == set(PATTERNS)
    assert {t.question for t in TEMPLATES["heldout"]}.isdisjoint(t.question for t in val)
    assert {p.template for p in shot_problems(problems, 4)}.isdisjoint(val)
    frames = [g for g in val_groups if g.startswith("frame:")]
    assert len(frames) == len(PATTERNS)
    assert all(int(g.split(":")[1]) < FIRST_ROUND for g in frames)


def test_fewer_training_frames_keep_the_validation_phrasings() -> None:
    problems = WordProblemSet()
    train_all, val_all = validation_split(problems)
    train_first, val_first = validation_split(problems, frames=FIRST_ROUND)
    assert val_all == val_first and set(train_first) < set(train_all)
    assert all(
        not g.startswith("frame:") or int(g.split(":")[1]) < FIRST_ROUND
        for g in map(phrasing_group, train_first)
    )
    assert len(FRAMES) > FIRST_ROUND


def test_layer_slice_picks_the_named_layers() -> None:
    width = 3
    features = torch.arange(len(CACHED_LAYERS) * width, dtype=torch.float16)[None]
    sliced = layer_slice(features, (CACHED_LAYERS[2], CACHED_LAYERS[0]))
    assert sliced.tolist() == [[6.0, 7.0, 8.0, 0.0, 1.0, 2.0]]


def test_ensemble_votes_with_the_mean_log_probs() -> None:
    from pimoe.compute.operand_head import HeadEnsemble, OperandHead, QuestionNumbers

    torch.manual_seed(0)
    heads = [OperandHead(8, 16) for _ in range(2)]
    question, numbers = torch.randn(12, 8), QuestionNumbers([], ["7", "3", "5"], [2, 5, 9])
    single = HeadEnsemble(heads[:1])
    assert single.expression(question, numbers) == heads[0].expression(question, numbers)
    pair = HeadEnsemble(heads).log_probs(question, numbers)
    for got, *parts in zip(pair, *(h.log_probs(question, numbers) for h in heads)):
        torch.testing.assert_close(got, (parts[0] + parts[1]) / 2)

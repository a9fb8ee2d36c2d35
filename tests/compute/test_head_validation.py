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


def test_composed_features_are_cached_in_chunks_keyed_by_their_questions(
    tmp_path, monkeypatch
) -> None:
    from dataclasses import replace

    from pimoe.compute import head_validation
    from pimoe.compute.word_compose import composed_problems

    computed: list[list[str]] = []

    def fake(runner, problems, desc):  # one fake feature row per problem, counted
        computed.append([p.question for p in problems])
        n = len(problems)
        return head_validation.Cached(problems, [torch.zeros(1, 2)] * n, [[0]] * n, [["1"]] * n)

    monkeypatch.setattr(head_validation, "cache_questions", fake)
    chunk = head_validation.COMPOSED_CHUNK
    problems = composed_problems(WordProblemSet(), 2 * chunk + 3)
    prefix = str(tmp_path / "c")
    short = head_validation.composed_cache(lambda: None, problems[: chunk + 1], prefix)
    assert [len(c) for c in computed] == [chunk, 1]
    long = head_validation.composed_cache(lambda: None, problems, prefix)
    assert [len(c) for c in computed] == [chunk, 1, chunk, 3]  # the first full chunk reused
    assert [p.question for p in long.problems] == [p.question for p in problems]
    assert long.problems[:chunk] == short.problems[:chunk]
    changed = [replace(problems[0], question=problems[0].question + " Quickly."), *problems[1:]]
    again = head_validation.composed_cache(lambda: None, changed, prefix)
    assert [len(c) for c in computed] == [chunk, 1, chunk, 3, chunk]  # another question: new key
    assert again.problems[0].question.endswith("Quickly.")


def test_shared_clauses_finds_long_clauses_only() -> None:
    from pimoe.compute.head_validation import shared_clauses
    from pimoe.compute.word_patterns import Template

    t = Template(PATTERNS[0], "Ava had {a} red {item} at home; she sold {b}. How many now?", "{r}")
    assert shared_clauses((t,), ["AVA HAD {a} RED {item} AT HOME, then more"]) == {
        t.question: {"ava had {a} red {item} at home"}
    }
    assert shared_clauses((t,), ["she sold {b}. how many now?"]) == {}  # clauses of <= 4 words

"""Candidate readings of a question and their scoring by the frozen LM (tiny random Llama)."""

from __future__ import annotations

import math

import torch
from test_llm_chain import tiny_lm

from pimoe.compute.lm_rerank import CUE, describe, lm_loglik
from pimoe.compute.operand_head import Candidate, candidates, decode
from pimoe.compute.word_problems import PATTERNS, SLOTS


def test_candidates_are_every_reading_best_first() -> None:
    torch.manual_seed(0)
    texts = ["12", "5", "7"]
    pattern_lp = torch.randn(len(PATTERNS)).log_softmax(-1)
    slot_lp = torch.randn(3, len(PATTERNS) * len(SLOTS) + 1).log_softmax(-1)
    every = candidates(pattern_lp, slot_lp, texts)
    arity = [sum(f"{{{s}}}" in t for s in SLOTS) for t in PATTERNS]
    assert len(every) == sum(math.perm(3, k) for k in arity)  # the 4-operand tree does not fit
    assert [c.score for c in every] == sorted((c.score for c in every), reverse=True)
    assert every[0].expression == decode(pattern_lp, slot_lp, texts)
    assert candidates(pattern_lp, slot_lp, texts, 4) == every[:4]
    assert decode(pattern_lp, slot_lp, []) == ""


def test_describe_fills_the_request() -> None:
    c = Candidate(0.0, PATTERNS.index("{a}*{b}+{c}"), ("12", "5", "7"))
    assert c.expression == "12*5+7"
    assert describe(c) == "multiply 12 by 5, then add 7"


def test_batched_scores_equal_one_sequence_at_a_time() -> None:
    """The shared-question pass plus one padded batch gives each description's log-likelihood
    exactly as scoring the whole text alone (descriptions of different lengths)."""
    model, tokenizer = tiny_lm()
    question = "A shop had 12 pens, sold 5 and got 7 more. How many now?"
    cands = [
        Candidate(0.0, 0, ("12", "5", "7")),
        Candidate(0.0, 5, ("12", "5", "7")),
        Candidate(0.0, 6, ("1", "2", "3", "4")),
    ]
    total, count = lm_loglik(model, tokenizer, question, cands)
    context = tokenizer(f"Question: {question}{CUE}", add_special_tokens=False)["input_ids"]
    for k, c in enumerate(cands):
        cont = tokenizer(f" {describe(c)}.", add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([context + cont])).logits[0]
        lp = logits[len(context) - 1 : -1].log_softmax(-1).gather(-1, torch.tensor(cont)[:, None])
        assert int(count[k]) == len(cont)
        torch.testing.assert_close(total[k], lp.sum(), rtol=1e-4, atol=1e-4)


def test_rerank_accuracy_picks_by_the_weighted_score() -> None:
    """The head prefers the wrong reading, the LM the right one: the weight decides."""
    from pimoe.compute.head_rerank import Reranked, rerank_accuracy

    row = Reranked(
        "1+2",
        ["2+1", "1+2"],
        torch.tensor([0.0, -1.0]),
        torch.tensor([-10.0, -3.0]),
        torch.tensor([5.0, 3.0]),
        0.0,
    )
    assert rerank_accuracy([row], 0.0, False) == 0.0  # head alone
    assert rerank_accuracy([row], float("inf"), False) == 1.0  # LM alone (sums -10, -3)
    assert rerank_accuracy([row], float("inf"), True) == 1.0  # per token -2, -1
    assert rerank_accuracy([row], 0.1, False) == 0.0  # -1.0 against -1.3
    assert rerank_accuracy([row], 1.0, False) == 1.0  # -10 against -4
    assert rerank_accuracy([row], 1.0, True) == 0.0  # -2 against -2: the first (head's) wins

"""LM reranking of the text-to-computation head's best candidates, on the validation split of
:mod:`pimoe.compute.head_validation` (``python -m pimoe.compute.head_validation --rerank K``):
the frozen LM's likelihood of each candidate reading's plain-words description
(:mod:`pimoe.compute.lm_rerank`), alone or added to the head's joint score with a weight fitted
on the training problems (head scores cross-fitted over two folds of phrasing groups, since the
head has learned those). An experiment; the chain does not use it."""

from __future__ import annotations

import statistics
import time
import zlib
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor
from tqdm.auto import tqdm

from pimoe.compute.head_validation import Cached, head_data, layer_slice, phrasing_group
from pimoe.compute.llm_train import ChainTrainSettings, train_head
from pimoe.compute.lm_rerank import lm_loglik
from pimoe.compute.operand_head import OperandHead, QuestionNumbers, candidates

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


@dataclass
class Reranked:
    """One problem's ``top`` head candidates: expressions, head scores ``[K]``, LM log-likelihood
    sums ``[K]`` and token counts ``[K]`` of their descriptions, and the LM pass's seconds."""

    gold: str
    expressions: list[str]
    head: Tensor
    lm_sum: Tensor
    lm_tokens: Tensor
    seconds: float


def rerank_rows(
    head: OperandHead,
    cached: Cached,
    indices: list[int],
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    top: int,
    layers: tuple[int, ...] = (22, 30),
) -> list[Reranked]:
    """Score the ``top`` candidates of ``head`` on ``cached`` problems ``indices`` with the LM."""
    rows = []
    for i in tqdm(indices, desc="LM rerank"):
        p, texts = cached.problems[i], cached.texts[i]
        numbers = QuestionNumbers([], texts, cached.positions[i])
        cands = candidates(
            *head.log_probs(layer_slice(cached.features[i], layers), numbers), texts, top
        )
        start = time.perf_counter()
        total, count = lm_loglik(model, tokenizer, p.question, cands)
        rows.append(
            Reranked(
                p.expression,
                [c.expression for c in cands],
                torch.tensor([c.score for c in cands]),
                total,
                count,
                time.perf_counter() - start,
            )
        )
    return rows


def rerank_accuracy(rows: list[Reranked], weight: float, mean: bool) -> float:
    """Accuracy of picking ``argmax(head + weight * LM)`` (the LM's log-likelihood per token when
    ``mean``); ``weight=inf`` ranks by the LM alone."""
    right = 0
    for r in rows:
        lm = r.lm_sum / r.lm_tokens if mean else r.lm_sum
        score = lm if weight == float("inf") else r.head + weight * lm
        right += r.expressions[int(score.argmax())] == r.gold
    return right / len(rows)


WEIGHTS = (0.0, 0.1, 0.3, 1.0, 2.0, 3.0, 5.0, 10.0, 30.0)


def rerank_main(
    train: Cached, val: Cached, count: int, top: int, settings: ChainTrainSettings
) -> None:
    """Print head alone, LM rerank alone and combined (weight fitted on training) on ``val``."""
    from pimoe.models import load_pretrained

    model, tokenizer = load_pretrained("smollm2-135m-instruct")
    layers = (22, 30)
    data = head_data(train, layers, count)
    dim = data[0].question.shape[-1]
    fold = [zlib.crc32(phrasing_group(p.template).encode()) % 2 for p in train.problems[:count]]
    fitted: list[Reranked] = []
    for k in (0, 1):
        part = [d for d, f in zip(data, fold) if f != k]
        held = [i for i in range(count) if fold[i] == k]
        fitted += rerank_rows(
            train_head(part, dim, settings, False)[0], train, held, model, tokenizer, top
        )
    head = train_head(data, dim, settings, False)[0]
    rows = rerank_rows(head, val, list(range(len(val.problems))), model, tokenizer, top)
    print(f"head alone {rerank_accuracy(rows, 0.0, False):.3f}")
    print(f"gold among the top {top}: {sum(r.gold in r.expressions for r in rows) / len(rows):.3f}")
    for mean in (False, True):
        name = "per-token mean" if mean else "sum"
        weight = max(WEIGHTS, key=lambda w: (rerank_accuracy(fitted, w, mean), -w))
        print(
            f"LM {name}: alone {rerank_accuracy(rows, float('inf'), mean):.3f}; combined, weight "
            f"{weight} (cross-fitted training accuracy {rerank_accuracy(fitted, weight, mean):.3f}): "
            f"{rerank_accuracy(rows, weight, mean):.3f}"
        )
    ms = [1000 * r.seconds for r in rows]
    print(
        f"LM passes: median {statistics.median(ms):.0f} ms per problem (question + one batch of {top})"
    )

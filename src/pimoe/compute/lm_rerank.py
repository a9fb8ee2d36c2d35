"""Reranking the text-to-computation head's candidates with the frozen LM's own likelihood.

Each candidate reading of a question (a pattern and its operands, :class:`Candidate`) is described
in plain words (:data:`~pimoe.compute.word_templates.REQUESTS`, e.g. ``multiply 12 by 5, then add
7``) and scored by the frozen LM as a continuation of ``Question: <question>`` + :data:`CUE`: the
sum (or the per-token mean) of the description tokens' log-probabilities. All candidates of one
question are scored in one batched forward pass; the LM writes no expression token.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from pimoe.compute.operand_head import Candidate
from pimoe.compute.word_templates import REQUESTS

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

CUE = "\nSteps:"


def describe(candidate: Candidate) -> str:
    """The plain-words request of ``candidate`` (its pattern's :data:`REQUESTS` entry, filled)."""
    from pimoe.compute.word_problems import PATTERNS

    return candidate.fill(REQUESTS[PATTERNS[candidate.pattern]])


@torch.no_grad()
def lm_loglik(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    question: str,
    cands: list[Candidate],
) -> tuple[Tensor, Tensor]:
    """``(sum [K], token count [K])`` of the LM's log-probabilities of each candidate's
    description after ``Question: <question>`` and :data:`CUE`: one pass over the shared question,
    then one batched pass over the ``K`` right-padded descriptions on its repeated KV cache."""
    from transformers import DynamicCache

    if not cands:
        raise ValueError("no candidates to score")
    context = list(tokenizer(f"Question: {question}{CUE}", add_special_tokens=False)["input_ids"])
    conts = [
        list(tokenizer(f" {describe(c)}.", add_special_tokens=False)["input_ids"]) for c in cands
    ]
    cache = DynamicCache()
    first = model(
        input_ids=torch.tensor([context], device=model.device), cache=cache, use_cache=True
    )
    cache.batch_repeat_interleave(len(cands))
    width = max(len(c) for c in conts)
    ids = torch.zeros(len(cands), width, dtype=torch.long)
    mask = torch.ones(len(cands), len(context) + width, dtype=torch.long)
    for k, cont in enumerate(conts):
        ids[k, : len(cont)] = torch.tensor(cont)
        mask[k, len(context) + len(cont) :] = 0
    out = model(
        input_ids=ids.to(model.device),
        attention_mask=mask.to(model.device),
        cache=cache,
        use_cache=True,
    )
    # position 0's token is predicted by the question pass's last logits
    logits = torch.cat([first.logits[:, -1:].expand(len(cands), 1, -1), out.logits[:, :-1]], 1)
    logp = logits.float().log_softmax(-1).gather(-1, ids.to(model.device)[..., None])[..., 0]
    counted = mask[:, len(context) :].float().to(logp.device)
    return (logp * counted).sum(-1).cpu(), counted.sum(-1).cpu()

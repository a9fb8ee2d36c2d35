"""Training the real-LLM chain's modules on a frozen LM.

The LM forward is the expensive part, so it runs once per training problem and its features are
cached (:func:`collect_features`: the few-shot prefix is cached, then the question block, the gold
answer, and the LM's own greedy answer up to its first number); both modules train on them:

- router labels, on two answers to each question: the gold answer (at the last question position
  and every answer position, 1 when the *next* token is the first token of the result's digits)
  and the answer the frozen LM itself writes, decoded as the chain decodes (1 at the position whose
  next token starts the first number it writes, 0 before; nothing after). The second is the
  wording the router meets at inference, whatever the gold answers' wording; binary cross-entropy,
  positives re-weighted to the negatives' total. The router's input is
  :func:`~pimoe.compute.llm_router.router_input` (features and the LM's digit log-probability);
- text-to-computation labels: the problem's pattern, and for each number in the question its
  role (pattern and operand slot, :func:`~pimoe.compute.operand_head.role`; cross-entropy each).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from pimoe.compute.llm_chain import ChainConfig, ComputationChain
from pimoe.compute.llm_prompts import fewshot_prefix, question_block, shot_problems
from pimoe.compute.llm_router import TokenRouter, router_input
from pimoe.compute.llm_runner import LMRunner, Session
from pimoe.compute.operand_head import (
    NONE_SLOT,
    OperandHead,
    locate_numbers,
    number_features,
    role,
    summary,
)
from pimoe.compute.word_compose import composed_problems
from pimoe.compute.word_problems import WordProblem, WordProblemSet

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


@dataclass(frozen=True)
class ChainTrainSettings:
    """Data and optimization of :func:`train_chain`."""

    problems: int = 400
    shots: int = 4
    train_digits: int = 5
    heldout_digits: int = 8
    steps: int = 300
    lr: float = 2e-3
    weight_decay: float = 1e-2
    router_hidden: int = 64
    head_hidden: int = 128
    own_tokens: int = 12
    composed: int = 640
    seed: int = 0


QUICK_SETTINGS = ChainTrainSettings(problems=192, steps=200, composed=640)


@dataclass
class ProblemFeatures:
    """Cached LM features of one training problem (``F`` = the runner's feature width)."""

    router_x: Tensor  # [A, F+1]: router inputs on the gold answer and the LM's own answer
    router_y: Tensor  # [A]: 1 where the next token starts the result
    question: Tensor  # [T, F]: the question block
    number_positions: list[int]
    slots: Tensor  # [N]: slot index per question number (NONE_SLOT for none)
    pattern: int


def own_answer(
    runner: LMRunner, session: Session, logits: Tensor, last: Tensor, max_tokens: int
) -> tuple[Tensor, Tensor]:
    """Router inputs ``[K, F+1]`` and labels ``[K]`` along the LM's greedy answer after the prompt
    in ``session`` (``logits``/``last``: the prompt's last logits and features), decoded as
    :meth:`~pimoe.compute.llm_chain.ComputationChain.run` decodes before a hand-off, up to the
    first token that starts a number (label 1), a stop token or ``max_tokens``."""
    xs, ys = [], []
    for step in range(max_tokens):
        xs.append(router_input(last, runner.digit_logprob(logits)))
        if step == 0:
            logits = logits.masked_fill(runner.stop_tokens, float("-inf"))
        token = int(logits.argmax())
        ys.append(float(runner.digit_tokens[token]))
        if ys[-1] or runner.is_stop(token):
            break
        logits, features = runner.feed(session, [token])
        last = features[-1]
    return torch.stack(xs), torch.tensor(ys)


def problem_features(
    runner: LMRunner, problem: WordProblem, own_tokens: int = 12
) -> ProblemFeatures:
    """LM passes over the question block and the gold answer (after the cached prefix), then the
    LM's own answer (:func:`own_answer`, at most ``own_tokens`` tokens)."""
    numbers = locate_numbers(runner.tokenizer, question_block(problem.question))
    answer = " " + problem.answer_text + "\n"
    enc = runner.tokenizer(answer, add_special_tokens=False, return_offsets_mapping=True)
    answer_ids, offsets = list(enc["input_ids"]), list(enc["offset_mapping"])
    first = 1 + problem.result_start  # the answer's leading space shifts offsets by one
    target = next(i for i, (s, e) in enumerate(offsets) if s <= first < e)
    session = runner.start()
    q_logits, question = runner.feed_all(session, numbers.ids)
    a_logits, answer_features = runner.feed_all(session, answer_ids)
    gold_x = router_input(
        torch.cat([question[-1:], answer_features[:-1]]),
        runner.digit_logprob(torch.cat([q_logits[-1:], a_logits[:-1]])),
    )
    gold_y = torch.zeros(len(answer_ids))
    gold_y[target] = 1.0
    runner.rewind(session, len(answer_ids))
    own_x, own_y = own_answer(runner, session, q_logits[-1], question[-1], own_tokens)
    return ProblemFeatures(
        torch.cat([gold_x, own_x]),
        torch.cat([gold_y, own_y]),
        question,
        numbers.positions,
        operand_slots(problem, len(numbers.positions)),
        problem.pattern,
    )


def operand_slots(problem: WordProblem, count: int) -> Tensor:
    """``[count]``: the slot of each of the question's first ``count`` numbers (left to right),
    ``NONE_SLOT`` for numbers that are no operand."""
    order = problem.operand_order
    return torch.tensor([order[i] if i < len(order) else NONE_SLOT for i in range(count)])


def question_features(runner: LMRunner, problem: WordProblem) -> ProblemFeatures:
    """The head's part of :func:`problem_features` only: one LM pass over the question block (no
    router inputs), for problems that train the text-to-computation head alone."""
    numbers = locate_numbers(runner.tokenizer, question_block(problem.question))
    _, question = runner.feed_all(runner.start(), numbers.ids)
    empty = torch.zeros(0)
    slots = operand_slots(problem, len(numbers.positions))
    return ProblemFeatures(empty, empty, question, numbers.positions, slots, problem.pattern)


def questions_features(
    runner: LMRunner, problems: list[WordProblem], progress: bool = True
) -> list[ProblemFeatures]:
    """:func:`question_features` for every problem, the LM passes batched by
    :meth:`~pimoe.compute.llm_runner.LMRunner.question_features` (the same features, in about
    0.6x the time on 2 CPU cores), with a progress bar."""
    blocks = [locate_numbers(runner.tokenizer, question_block(p.question)) for p in problems]
    with tqdm(total=len(problems), desc="LM features, composed", disable=not progress) as bar:
        features = runner.question_features([b.ids for b in blocks], on_batch=bar.update)
    empty = torch.zeros(0)
    return [
        ProblemFeatures(
            empty,
            empty,
            question,
            numbers.positions,
            operand_slots(problem, len(numbers.positions)),
            problem.pattern,
        )
        for problem, numbers, question in zip(problems, blocks, features)
    ]


def collect_features(
    runner: LMRunner, problems: list[WordProblem], progress: bool = True, own_tokens: int = 12
) -> list[ProblemFeatures]:
    """:func:`problem_features` for every problem, with a progress bar."""
    return [
        problem_features(runner, p, own_tokens)
        for p in tqdm(problems, desc="LM features", disable=not progress)
    ]


def train_router(
    data: list[ProblemFeatures],
    feature_dim: int,
    settings: ChainTrainSettings,
    progress: bool = True,
) -> tuple[TokenRouter, list[float]]:
    """Full-batch AdamW on every cached position; returns the router and its loss per step."""
    torch.manual_seed(settings.seed)
    x = torch.cat([d.router_x for d in data])
    y = torch.cat([d.router_y for d in data])
    router = TokenRouter(feature_dim, settings.router_hidden)
    router.set_scale(x)
    weight = (y.numel() - y.sum()) / y.sum().clamp_min(1.0)
    optim = torch.optim.AdamW(
        router.parameters(), lr=settings.lr, weight_decay=settings.weight_decay
    )
    losses = []
    for _ in tqdm(range(settings.steps), desc="router", disable=not progress):
        loss = F.binary_cross_entropy_with_logits(router(x), y, pos_weight=weight)
        optim.zero_grad()
        loss.backward()
        optim.step()
        losses.append(loss.item())
    return router.eval(), losses


def train_head(
    data: list[ProblemFeatures],
    feature_dim: int,
    settings: ChainTrainSettings,
    progress: bool = True,
) -> tuple[OperandHead, list[float]]:
    """AdamW on the pattern + pointer cross-entropies over all problems per step."""
    torch.manual_seed(settings.seed)
    head = OperandHead(feature_dim, settings.head_hidden)
    head.set_scale(torch.cat([d.question for d in data]))
    optim = torch.optim.AdamW(head.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    patterns = torch.tensor([d.pattern for d in data])
    summaries = torch.stack([summary(d.question) for d in data])
    numbers = torch.cat([number_features(d.question, d.number_positions) for d in data])
    owner = torch.cat([torch.full((len(d.number_positions),), i) for i, d in enumerate(data)])
    roles = torch.cat([role(d.pattern, d.slots) for d in data])
    inputs = head.inputs(summaries, numbers, owner)  # fixed: standardized once, not per step
    losses = []
    for _ in tqdm(range(settings.steps), desc="text-to-computation", disable=not progress):
        pattern_logits, slot_logits = head.logits(*inputs)
        loss = F.cross_entropy(pattern_logits, patterns) + F.cross_entropy(slot_logits, roles)
        optim.zero_grad()
        loss.backward()
        optim.step()
        losses.append(loss.item())
    return head.eval(), losses


def train_chain(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    base_model: str,
    settings: ChainTrainSettings = ChainTrainSettings(),
    layers: tuple[int, ...] | None = None,
    progress: bool = True,
) -> tuple[ComputationChain, dict]:
    """Cache the frozen LM's features on ``settings.problems`` train-split problems, train the
    router and the text-to-computation head, and join them into a :class:`ComputationChain`.

    Returns the chain and a report: seconds per stage, final losses, sizes.
    """
    problems = WordProblemSet(settings.train_digits, settings.heldout_digits, settings.seed)
    prefix = fewshot_prefix(shot_problems(problems, settings.shots), "answer")
    start = time.perf_counter()
    runner = LMRunner(model, tokenizer, prefix, layers)
    data = collect_features(
        runner, problems.problems("train", 0, settings.problems), progress, settings.own_tokens
    )
    composed = questions_features(runner, composed_problems(problems, settings.composed), progress)
    feature_s = time.perf_counter() - start
    router, router_losses = train_router(data, runner.feature_dim, settings, progress)
    router_s = time.perf_counter() - start - feature_s
    head_data = data + composed
    head, head_losses = train_head(head_data, runner.feature_dim, settings, progress)
    head_s = time.perf_counter() - start - feature_s - router_s
    report = {
        "feature_s": round(feature_s, 1),
        "train_s_router": round(router_s, 1),
        "train_s_head": round(head_s, 1),
        "router_loss_first": round(router_losses[0], 4),
        "router_loss_final": round(router_losses[-1], 4),
        "head_loss_first": round(head_losses[0], 4),
        "head_loss_final": round(head_losses[-1], 4),
        "head_problems": len(head_data),
        "params_router": sum(p.numel() for p in router.parameters()),
        "params_head": sum(p.numel() for p in head.parameters()),
        "settings": asdict(settings),
    }
    config = ChainConfig(
        base_model=base_model,
        prefix=prefix,
        layers=runner.layers,
        feature_dim=runner.feature_dim,
        router_hidden=settings.router_hidden,
        head_hidden=settings.head_hidden,
        training=report,
    )
    return ComputationChain(model, tokenizer, router, head, config), report

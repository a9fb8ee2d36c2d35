"""The pipelines the computation chain is compared with, on the same frozen LM (greedy, KV cache):

- :func:`lm_only` (a): the LM alone answers after the few-shot prefix (style ``"answer"``).
- :func:`tool_call` (c): the LM, few-shot prompted with ``"tool"`` examples, writes
  ``<<expression>>``; when it closes the call, Python evaluates it with the same exact engine,
  the result is appended in one prefill and the LM continues. The LoRA-tuned tool call (c') is the
  same function on a copy of the LM whose adapters learned the format on the chain's training
  questions (:mod:`pimoe.compute.tool_call_lora`), with no few-shot prefix.
- :func:`two_call` (d): a two-call agent. The first call (``"request"`` examples) writes a request
  in words ``<<...>>``; a second call of the same LM (its own few-shot prompt,
  :func:`~pimoe.compute.llm_prompts.translate_prefix`) turns the request into an expression;
  Python evaluates; the first call re-reads its whole context (question, its answer so far, the
  result; the static few-shot prefix stays cached) and continues.

Each returns a :class:`PipelineRun`; nothing raises on an expression the engine rejects (its error
token goes into the text).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from torch import Tensor

from pimoe.compute.engine import ArithmeticEngine
from pimoe.compute.llm_prompts import question_block
from pimoe.compute.llm_runner import LMRunner, Session

MAX_CALLS = 2  # tool calls per answer


@dataclass(frozen=True)
class PipelineRun:
    """One answer: its text, LM-generated tokens (all calls), forward passes (all calls,
    prefills included), engine calls and wall time."""

    text: str
    generated_tokens: int
    forward_passes: int
    calls: int
    seconds: float


def _greedy(
    runner: LMRunner,
    session: Session,
    logits: Tensor,
    budget: int,
    stop: str = "\n",
    close: str | None = None,
    start: int | None = None,
) -> tuple[int, bool]:
    """Append greedy tokens until ``stop``, ``budget`` tokens, or (``close``) the text after
    ``start`` gains one more ``close`` marker; returns (tokens generated, closed)."""
    start = len(session.tokens) if start is None else start
    before = runner.decode(session.tokens[start:]).count(close) if close else 0
    generated = 0
    while generated < budget:
        token = int(logits.argmax())
        generated += 1
        if runner.is_stop(token, stop):
            session.tokens.append(token)
            return generated, False
        logits, _ = runner.feed(session, [token])
        if close and runner.decode(session.tokens[start:]).count(close) > before:
            return generated, True
    return generated, False


def _call_text(text: str) -> str:
    """The text between the last ``<<`` and the following ``>>``."""
    inner = text[text.rfind("<<") + 2 :]
    return inner[: inner.find(">>")] if ">>" in inner else inner


def lm_only(runner: LMRunner, question: str, max_new_tokens: int = 48) -> PipelineRun:
    """(a): the LM alone."""
    t0 = time.perf_counter()
    session = runner.start()
    logits, _ = runner.feed(session, runner.encode(question_block(question)))
    prompt_len = len(session.tokens)
    generated, _ = _greedy(runner, session, logits, max_new_tokens)
    return PipelineRun(
        runner.decode(session.tokens[prompt_len:]).strip(),
        generated,
        session.forward_passes,
        0,
        time.perf_counter() - t0,
    )


def tool_call(
    runner: LMRunner, engine: ArithmeticEngine, question: str, max_new_tokens: int = 48
) -> PipelineRun:
    """(c): the LM writes ``<<expression>>``; Python evaluates; the result is prefilled."""
    t0 = time.perf_counter()
    session = runner.start()
    logits, _ = runner.feed(session, runner.encode(question_block(question)))
    prompt_len = len(session.tokens)
    generated = calls = 0
    while generated < max_new_tokens:
        steps, closed = _greedy(
            runner, session, logits, max_new_tokens - generated, close=">>", start=prompt_len
        )
        generated += steps
        if not closed or calls >= MAX_CALLS:
            break
        calls += 1
        result = engine.compute(_call_text(runner.decode(session.tokens[prompt_len:])))
        logits, _ = runner.feed(session, runner.encode(result))
    return PipelineRun(
        runner.decode(session.tokens[prompt_len:]).strip(),
        generated,
        session.forward_passes,
        calls,
        time.perf_counter() - t0,
    )


def two_call(
    agent: LMRunner,
    translator: LMRunner,
    engine: ArithmeticEngine,
    question: str,
    max_new_tokens: int = 48,
    max_expression_tokens: int = 48,
) -> PipelineRun:
    """(d): request in words -> second LM call writes the expression -> Python -> re-read."""
    t0 = time.perf_counter()
    block = agent.encode(question_block(question))
    session = agent.start()
    logits, _ = agent.feed(session, block)
    generated = calls = passes = 0
    while generated < max_new_tokens:
        steps, closed = _greedy(
            agent, session, logits, max_new_tokens - generated, close=">>", start=len(block)
        )
        generated += steps
        if not closed or calls >= MAX_CALLS:
            break
        calls += 1
        answer = agent.decode(session.tokens[len(block) :])
        ask = translator.start()
        t_logits, _ = translator.feed(
            ask, translator.encode(f"Request: {_call_text(answer)}\nExpression:")
        )
        steps, _ = _greedy(translator, ask, t_logits, max_expression_tokens)
        generated += steps
        passes += ask.forward_passes
        expression = translator.decode(ask.tokens[len(ask.tokens) - steps :]).strip()
        answer += engine.compute(expression)
        passes += session.forward_passes
        session = agent.start()  # the first call re-reads its context from the cached prefix on
        logits, _ = agent.feed(session, block + agent.encode(answer))
    passes += session.forward_passes
    return PipelineRun(
        agent.decode(session.tokens[len(block) :]).strip(),
        generated,
        passes,
        calls,
        time.perf_counter() - t0,
    )

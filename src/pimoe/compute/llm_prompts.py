"""Prompt texts of the real-LLM pipelines and the answer read-out.

Every pipeline shows the frozen LM the same few-shot examples (train-split problems), each as
``"Question: ...\\nAnswer: ...\\n\\n"``; only the answer style differs:

- ``"answer"``: the plain answer (the LM alone and the PiMoE chain);
- ``"tool"``: the answer with the tool call ``<<expression>>`` before the result
  (``... has <<120-45+30>>105 apples now.``);
- ``"request"``: the two-call agent's first call, with a plain-words request before the result
  (``... has <<start with 120, take away 45, then add 30>>105 apples now.``);

and :func:`translate_prefix` is the second call's prompt (request -> expression).
"""

from __future__ import annotations

import re
from typing import Literal

from pimoe.compute.word_problems import PATTERNS, WordProblem, WordProblemSet

Style = Literal["answer", "tool", "request"]
STYLES: tuple[Style, ...] = ("answer", "tool", "request")
SHOT_OFFSET = 900_000  # few-shot examples come from the train split, far from training problems
_NUMBER = re.compile(r"-?[0-9]+(?:/[0-9]+)?")


def question_block(question: str) -> str:
    """The text fed after the prefix for one question; the model's answer follows it."""
    return f"Question: {question}\nAnswer:"


def shot_problems(problems: WordProblemSet, shots: int) -> list[WordProblem]:
    """``shots`` train-split examples with distinct patterns and hand-written phrasings (deterministic;
    generated phrasings are for training only: after a prefix of them the LM tended to stop at once)."""
    if not 0 <= shots <= len(PATTERNS):
        raise ValueError(f"shots must lie in 0..{len(PATTERNS)}, got {shots}")
    chosen: list[WordProblem] = []
    index = SHOT_OFFSET
    while len(chosen) < shots:
        p = problems.problem("train", index, written_only=True)
        if p.pattern not in {c.pattern for c in chosen}:
            chosen.append(p)
        index += 1
    return chosen


def answer_in_style(problem: WordProblem, style: Style) -> str:
    """The example answer of ``problem`` in ``style``."""
    if style == "answer":
        return problem.answer_text
    if style == "tool":
        return problem.tool_answer()
    if style == "request":
        return problem.request_answer()
    raise ValueError(f"style must be one of {STYLES}, got {style!r}")


def fewshot_prefix(examples: list[WordProblem], style: Style) -> str:
    """The cached prompt prefix: the examples, each answered in ``style``."""
    return "".join(
        f"{question_block(p.question)} {answer_in_style(p, style)}\n\n" for p in examples
    )


def translate_prefix(examples: list[WordProblem]) -> str:
    """The two-call agent's second prompt: requests turned into engine expressions."""
    return "".join(f"Request: {p.request}\nExpression: {p.expression}\n\n" for p in examples)


def final_number(text: str) -> str | None:
    """The last number of ``text`` after removing ``<<...>>`` calls and thousands separators (``None`` if there is none)."""
    plain = re.sub(r"(?<=[0-9]),(?=[0-9]{3})", "", re.sub(r"<<.*?>>", " ", text))
    found = _NUMBER.findall(plain)
    return found[-1] if found else None

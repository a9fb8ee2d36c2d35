"""Validating the text-to-computation head on training phrasings only.

The held-out phrasings are for reporting; choices about the head are made here, on a split of the
*training* phrasings grouped by how they were written, so validation phrasings are unseen by the
head: per pattern, every phrasing generated from one grammar frame (chosen by seed) and two
hand-written phrasings (never a few-shot example's) are validation phrasings. Validation problems
have the held-out operand lengths (6-8 digits); training problems are drawn from the other
phrasings with training lengths. The frozen LM's question features are computed once for several
layers (:data:`CACHED_LAYERS`) and every variant is trained on slices of them.

``python -m pimoe.compute.head_validation`` prints the expression accuracy of each variant;
``--rerank K`` instead compares the shipped head with reranking its ``K`` best candidates by the
frozen LM's likelihood of their plain-words description (:mod:`pimoe.compute.lm_rerank`), alone
or added to the head's joint score with a weight fitted on the training problems (with head
scores cross-fitted over two folds of phrasing groups, since the head has learned those).
"""

from __future__ import annotations

import argparse
import functools
import os
import random
import re
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import torch
from torch import Tensor
from tqdm.auto import tqdm

from pimoe.compute.llm_prompts import fewshot_prefix, question_block, shot_problems
from pimoe.compute.llm_runner import LMRunner
from pimoe.compute.llm_train import (
    QUICK_SETTINGS,
    ChainTrainSettings,
    ProblemFeatures,
    operand_slots,
    train_head,
)
from pimoe.compute.operand_head import (
    HeadEnsemble,
    OperandHead,
    QuestionNumbers,
    locate_numbers,
)
from pimoe.compute.word_compose import composed_problems, composed_templates
from pimoe.compute.word_grammar import FIRST_ROUND, FRAMES, expand, frame_templates
from pimoe.compute.word_problems import PATTERNS, TEMPLATES, WordProblem, WordProblemSet
from pimoe.compute.word_templates import WRITTEN_TEMPLATES, Template

if TYPE_CHECKING:
    pass

CACHED_LAYERS = (15, 18, 22, 26, 30)


@functools.cache
def _frame_questions() -> tuple[frozenset[str], ...]:
    return tuple(frozenset(expand(question)) for _, question, _ in FRAMES)


def phrasing_group(template: Template) -> str:
    """``"frame:<i>"`` for a generated phrasing (its grammar frame), ``"written:<i>"`` otherwise."""
    if template in WRITTEN_TEMPLATES["train"]:
        return f"written:{WRITTEN_TEMPLATES['train'].index(template)}"
    for i, questions in enumerate(_frame_questions()):
        if template.question in questions:
            return f"frame:{i}"
    raise ValueError(f"not a training phrasing: {template.question!r}")


def validation_split(
    problems: WordProblemSet, shots: int = 4, seed: int = 0, frames: int | None = None
) -> tuple[tuple[Template, ...], tuple[Template, ...]]:
    """``(train phrasings, validation phrasings)`` (see the module docstring). Validation frames are
    drawn among the first round of frames (``FIRST_ROUND``) and their phrasings independently of
    :func:`generated_templates`, so adding frames leaves the validation phrasings as they are;
    ``frames`` keeps only ``FRAMES[:frames]`` for training (to measure what later frames add)."""
    rng = random.Random(seed)
    fixed = {p.template for p in shot_problems(problems, shots)}
    held: set[str] = set()
    val: list[Template] = []
    for pattern in range(len(PATTERNS)):
        frame = rng.choice([i for i, f in enumerate(FRAMES[:FIRST_ROUND]) if f[0] == pattern])
        written = [
            f"written:{i}"
            for i, t in enumerate(WRITTEN_TEMPLATES["train"])
            if t.pattern == PATTERNS[pattern] and t not in fixed
        ]
        held |= {f"frame:{frame}", *rng.sample(written, 2)}
        val += frame_templates(frame, 8, random.Random(f"{seed}/{frame}"))
    val += [t for i, t in enumerate(WRITTEN_TEMPLATES["train"]) if f"written:{i}" in held]
    kept = {f"frame:{i}" for i in range(frames if frames is not None else len(FRAMES))}
    kept |= {f"written:{i}" for i in range(len(WRITTEN_TEMPLATES["train"]))}
    train = tuple(
        t for t in TEMPLATES["train"] if phrasing_group(t) not in held and phrasing_group(t) in kept
    )
    return train, tuple(val)


def shared_clauses(
    templates: tuple[Template, ...], questions: list[str], words: int = 4
) -> dict[str, set[str]]:
    """Per phrasing of ``templates``: its clauses (split at ``.;?,:``) of more than ``words``
    words that occur in one of ``questions`` (lower-cased; phrasings without one are left out)."""
    lowered = [q.lower() for q in questions]
    out: dict[str, set[str]] = {}
    for t in templates:
        for clause in re.split(r"[.;?,:]", t.question.lower()):
            if len(clause.split()) > words and any(clause.strip() in q for q in lowered):
                out.setdefault(t.question, set()).add(clause.strip())
    return out


@dataclass
class Cached:
    """Question features ``[T, len(CACHED_LAYERS) * H]`` (float16) of problems and their labels."""

    problems: list[WordProblem]
    features: list[Tensor]
    positions: list[list[int]]
    texts: list[list[str]]


def cache_questions(runner: LMRunner, problems: list[WordProblem], desc: str) -> Cached:
    """One LM pass per question block after the cached prefix."""
    out = Cached(problems, [], [], [])
    for p in tqdm(problems, desc=desc):
        numbers = locate_numbers(runner.tokenizer, question_block(p.question))
        _, features = runner.feed_all(runner.start(), numbers.ids)
        out.features.append(features.half())
        out.positions.append(numbers.positions)
        out.texts.append(numbers.texts)
    return out


def cached(key: str | None, make: Callable[[], Cached]) -> Cached:
    """``make()``, saved under ``key`` (and loaded from there when it exists)."""
    if key and os.path.exists(key):
        return Cached(**torch.load(key, weights_only=False))
    out = make()
    if key:
        torch.save(vars(out), key)
    return out


COMPOSED_CHUNK = 160


def composed_cache(
    runner: Callable[[], LMRunner], problems: list[WordProblem], cache: str | None
) -> Cached:
    """Features of composed ``problems``, cached in chunks of :data:`COMPOSED_CHUNK` keyed by a
    checksum of their questions (a longer run reuses the chunks of a shorter one; a grammar
    change gives new keys)."""
    parts = []
    for start in range(0, len(problems), COMPOSED_CHUNK):
        chunk = problems[start : start + COMPOSED_CHUNK]
        crc = zlib.crc32("\n".join(p.question for p in chunk).encode())
        parts.append(
            cached(
                f"{cache}.composed.{start}.{len(chunk)}.{crc:08x}.pt" if cache else None,
                lambda chunk=chunk: cache_questions(runner(), chunk, "composed"),  # type: ignore[misc]
            )
        )
    return join(*parts)


def join(*parts: Cached) -> Cached:
    """The problems of ``parts`` one after the other."""
    return Cached(*([x for p in parts for x in getattr(p, f)] for f in vars(parts[0])))


def layer_slice(features: Tensor, layers: tuple[int, ...]) -> Tensor:
    """The columns of ``layers`` in cached features ``[T, len(CACHED_LAYERS) * H]`` (float32)."""
    width = features.shape[-1] // len(CACHED_LAYERS)
    cols = [
        features[:, CACHED_LAYERS.index(i) * width : (CACHED_LAYERS.index(i) + 1) * width]
        for i in layers
    ]
    return torch.cat(cols, dim=-1).float()


def head_data(cached: Cached, layers: tuple[int, ...], count: int) -> list[ProblemFeatures]:
    """:class:`ProblemFeatures` (question part only) of the first ``count`` cached problems."""
    if count > len(cached.problems):
        raise ValueError(f"only {len(cached.problems)} problems cached, {count} asked for")
    data = []
    for p, f, pos in list(zip(cached.problems, cached.features, cached.positions))[:count]:
        slots = operand_slots(p, len(pos))
        empty = torch.zeros(0)
        data.append(ProblemFeatures(empty, empty, layer_slice(f, layers), pos, slots, p.pattern))
    return data


def accuracy(
    head: OperandHead | HeadEnsemble, cached: Cached, layers: tuple[int, ...]
) -> tuple[float, dict[int, float]]:
    """Expression accuracy on ``cached`` and per pattern."""
    right: dict[int, list[bool]] = {}
    for p, f, pos, texts in zip(cached.problems, cached.features, cached.positions, cached.texts):
        got = head.expression(layer_slice(f, layers), QuestionNumbers([], texts, pos))
        right.setdefault(p.pattern, []).append(got == p.expression)
    every = [r for v in right.values() for r in v]
    return sum(every) / len(every), {k: sum(v) / len(v) for k, v in sorted(right.items())}


def main(
    train_count: int = 384,
    val_count: int = 200,
    seed: int = 0,
    cache: str | None = None,
    frames: int | None = None,
    only: str | None = None,
    rerank: int | None = None,
    extra: int = 0,
    composed: int = 0,
) -> None:
    """Cache features, train every variant, print its validation accuracy (or compare the LM
    rerank of the ``rerank`` best candidates, see the module docstring). ``extra`` more problems
    of the training phrasings and ``composed`` problems of composed phrasings are cached for the
    variants that train on them (each cached under its own key)."""
    from pimoe.models import load_pretrained

    torch.set_num_threads(1)
    model, tokenizer = load_pretrained("smollm2-135m-instruct")
    settings = QUICK_SETTINGS
    problems = WordProblemSet(settings.train_digits, settings.heldout_digits, settings.seed)
    train_t, val_t = validation_split(problems, settings.shots, seed, frames)
    print(f"{len(train_t)} train phrasings, {len(val_t)} validation phrasings")
    if composed:
        shared = shared_clauses(val_t, [t.question for t in composed_templates(composed)])
        clauses = sorted(set().union(*shared.values()))
        print(
            f"{len(shared)} validation phrasings share a clause with the composed ones: {clauses}"
        )
    prefix = fewshot_prefix(shot_problems(problems, settings.shots), "answer")
    runner = functools.cache(lambda: LMRunner(model, tokenizer, prefix, CACHED_LAYERS))

    def train_problems(start: int, count: int) -> list[WordProblem]:
        return [problems.problem("train", i, templates=train_t) for i in range(start, count)]

    key = f"{cache}.{train_count}.{val_count}.{seed}.{frames}.pt" if cache else None
    if key and os.path.exists(key):
        train, val = (Cached(**d) for d in torch.load(key, weights_only=False))
    else:
        train = cache_questions(runner(), train_problems(0, train_count), "train")
        val_p = [problems.problem("heldout", i, templates=val_t) for i in range(val_count)]
        val = cache_questions(runner(), val_p, "val")
        if key:
            torch.save((vars(train), vars(val)), key)
    if rerank:
        from pimoe.compute.head_rerank import rerank_main

        rerank_main(train, val, train_count, rerank, settings)
        return
    pools = {"train": train}
    if extra:
        more = cached(
            f"{cache}.extra.{train_count}.{extra}.{seed}.{frames}.pt" if cache else None,
            lambda: cache_questions(
                runner(), train_problems(train_count, train_count + extra), "extra"
            ),
        )
        pools["extra"] = join(train, more)
    if composed:
        comp = composed_cache(runner, composed_problems(problems, composed), cache)
        pools["composed"], pools["composed only"] = join(train, comp), comp
    for name, layers, pool, count, seeds, s in variants(settings):
        if (only and only not in name) or pool not in pools:
            continue
        start = time.perf_counter()
        data = head_data(pools[pool], layers, count or len(pools[pool].problems))
        heads = [
            train_head(data, data[0].question.shape[-1], replace(s, seed=s.seed + k), False)[0]
            for k in range(seeds)
        ]
        model_ = heads[0] if seeds == 1 else HeadEnsemble(heads)
        acc, per = accuracy(model_, val, layers)
        per_s = " ".join(f"{v:.2f}" for v in per.values())
        print(f"{name:40s} {acc:.3f}  [{per_s}]  {time.perf_counter() - start:.0f} s", flush=True)


Variant = tuple[str, tuple[int, ...], str, int | None, int, ChainTrainSettings]


def variants(s: ChainTrainSettings) -> list[Variant]:
    """(name, layers, pool of training problems, how many of them (``None``: all), seeds, settings)
    of every compared variant; pools: ``train`` (the ``--train`` problems), ``extra`` (and the
    ``--extra`` ones), ``composed`` (and the ``--composed`` ones), ``composed only``."""
    p = (22, 30)
    return [
        ("baseline 22+30, 192 problems", p, "train", 192, 1, s),
        ("baseline, seed 1", p, "train", 192, 1, replace(s, seed=1)),
        ("baseline, seed 2", p, "train", 192, 1, replace(s, seed=2)),
        ("ensemble of 5 seeds", p, "train", 192, 5, s),
        ("384 problems", p, "train", 384, 1, s),
        ("384 problems, ensemble of 5", p, "train", 384, 5, s),
        ("layers 18+22+30", (18, 22, 30), "train", 192, 1, s),
        ("layers 15+22+26+30", (15, 22, 26, 30), "train", 192, 1, s),
        ("layers 26+30", (26, 30), "train", 192, 1, s),
        ("400 steps", p, "train", 192, 1, replace(s, steps=400)),
        ("hidden 256", p, "train", 192, 1, replace(s, head_hidden=256)),
        ("more problems of the same phrasings", p, "extra", None, 1, s),
        ("+ composed phrasings", p, "composed", None, 1, s),
        ("+ the first 160 composed phrasings", p, "composed", 192 + 160, 1, s),
        ("+ composed phrasings, seed 1", p, "composed", None, 1, replace(s, seed=1)),
        ("+ composed phrasings, seed 2", p, "composed", None, 1, replace(s, seed=2)),
        ("composed phrasings only", p, "composed only", None, 1, s),
        ("composed phrasings only, seed 1", p, "composed only", None, 1, replace(s, seed=1)),
    ]


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--train", type=int, default=384)
    parser.add_argument("--val", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache", help="file prefix: reuse the LM features saved there")
    parser.add_argument("--frames", type=int, help="train on the first FRAMES grammar frames only")
    parser.add_argument("--only", help="run only the variants whose name contains this")
    parser.add_argument("--rerank", type=int, help="compare the LM rerank of the K best candidates")
    parser.add_argument("--extra", type=int, default=0, help="more problems of the same phrasings")
    parser.add_argument("--composed", type=int, default=0, help="problems of composed phrasings")
    args = parser.parse_args()
    main(
        args.train,
        args.val,
        args.seed,
        args.cache,
        args.frames,
        args.only,
        args.rerank,
        args.extra,
        args.composed,
    )

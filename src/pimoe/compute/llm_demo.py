"""The computation chain inside ``pimoe demo``: trained once, then loaded from the pimoe cache.

:func:`cached_chain` trains the chain's modules on the frozen LM at the given settings (or loads
them from an earlier run with the same settings and the same base weights) under
``pimoe.models.cache_root() / "chain"``; :func:`side_by_side` answers a few held-out problems with
the chain and with the LM alone.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

from pimoe.compute.llm_baselines import lm_only
from pimoe.compute.llm_bench import EVAL_OFFSET
from pimoe.compute.llm_chain import CHAIN_FORMAT, CONFIG_FILE, ComputationChain
from pimoe.compute.llm_prompts import final_number
from pimoe.compute.llm_train import ChainTrainSettings, train_chain
from pimoe.compute.word_compose import composed_templates
from pimoe.compute.word_problems import TEMPLATES, WordProblemSet

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


def chain_cache_dir(name: str, settings: ChainTrainSettings, fingerprint: str) -> Path:
    """Cache folder of the chain trained on ``name`` (whose weights have ``fingerprint``) with
    ``settings`` on the current training phrasings in the current
    :data:`~pimoe.compute.llm_chain.CHAIN_FORMAT` (a chain saved in another format or trained on
    other phrasings lives under another key, so it is retrained, never loaded)."""
    from pimoe.models import cache_root
    from pimoe.models.cache import keyed_folder

    parts = {
        "model": fingerprint,
        "format": CHAIN_FORMAT,
        "phrasings": [asdict(t) for t in TEMPLATES["train"]],
        "composed_phrasings": [asdict(t) for t in composed_templates(settings.composed)],
        **asdict(settings),
    }
    return keyed_folder(cache_root() / "chain", name, parts)


def cached_chain(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    name: str,
    settings: ChainTrainSettings,
    fingerprint: str,
    retrain: bool = False,
    progress: bool = True,
) -> tuple[ComputationChain, str]:
    """The chain on ``model``: loaded from :func:`chain_cache_dir` when an earlier run saved it
    (and not ``retrain``), else trained with ``settings`` and saved there. Returns the chain and
    ``"cache"`` or ``"trained"``."""
    folder = chain_cache_dir(name, settings, fingerprint)
    if (folder / CONFIG_FILE).is_file() and not retrain:
        try:
            return ComputationChain.load(folder, model, tokenizer), "cache"
        except (ValueError, OSError, RuntimeError):
            pass  # an unreadable or stale cache entry is retrained and overwritten
    chain, _ = train_chain(model, tokenizer, name, settings, progress=progress)
    chain.save(folder)
    return chain, "trained"


def side_by_side(chain: ComputationChain, count: int, max_new_tokens: int = 40) -> list[dict]:
    """``count`` held-out problems (unseen phrasings, longer operands), each answered by the LM
    alone and by the chain: question, exact answer, both texts, whether each is right and the
    expression the chain computed."""
    settings = chain.config.training.get("settings", {})
    problems = WordProblemSet(
        settings.get("train_digits", 5), settings.get("heldout_digits", 8), settings.get("seed", 0)
    )
    rows = []
    for problem in problems.problems("heldout", EVAL_OFFSET, count):
        alone = lm_only(chain.runner, problem.question, max_new_tokens)
        run = chain.run(problem.question, max_new_tokens)
        rows.append(
            {
                "question": problem.question,
                "answer": problem.answer,
                "lm_only": alone.text,
                "lm_only_right": final_number(alone.text) == problem.answer,
                "pimoe": run.text,
                "pimoe_right": final_number(run.text) == problem.answer,
                "expression": run.expression,
            }
        )
    return rows

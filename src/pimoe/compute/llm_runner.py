"""A frozen Hugging Face causal LM behind a cached prompt prefix: KV-cached greedy stepping that
also returns the hidden-state features the chain's modules read.

``LMRunner(model, tokenizer, prefix, layers)`` runs the (few-shot) ``prefix`` once and keeps its
KV cache; :meth:`LMRunner.start` crops the cache back to the prefix for each new question, so the
prefix is never recomputed. :meth:`LMRunner.feed` appends tokens in one forward pass (one prefill)
and returns the last position's logits and the features of every appended position: the hidden
states of ``layers`` (indices into ``output_hidden_states``: 0 = embeddings, ``n_layer`` = last),
concatenated; :meth:`LMRunner.feed_all` returns every appended position's logits instead.
:meth:`LMRunner.question_features` gives the features of many token lists, each read right after
the prefix, in batched forward passes (lists of one length together, no padding).
:meth:`LMRunner.rewind` drops a session's last tokens from its cache (to decode another
continuation of the same prompt). :attr:`LMRunner.digit_tokens` and :attr:`LMRunner.stop_tokens`
are vocabulary masks (tokens whose text starts with a digit; the end-of-sequence token and tokens
containing a newline) and :meth:`LMRunner.digit_logprob` is the LM's probability mass, in log, on
its next token starting a number.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


def default_layers(model: PreTrainedModel) -> tuple[int, int]:
    """The layer at three quarters of the depth and the last layer of ``model`` (22 and 30 for
    SmolLM2-135M: on held-out phrasings they beat 15 + 30 and 8 + 15 + 22 + 30)."""
    n = int(model.config.num_hidden_layers)
    return (max(1, 3 * n // 4), n)


@dataclass
class Session:
    """One question's decoding state: the KV cache (prefix included) and counters."""

    cache: Any
    forward_passes: int = 0
    tokens: list[int] = field(default_factory=list)


class LMRunner:
    """A frozen causal LM with a cached ``prefix`` (see the module docstring)."""

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        prefix: str,
        layers: tuple[int, ...] | None = None,
    ) -> None:
        self.model, self.tokenizer = model, tokenizer
        self.layers = tuple(layers) if layers is not None else default_layers(model)
        n = int(model.config.num_hidden_layers)
        if not self.layers or any(not 0 <= layer <= n for layer in self.layers):
            raise ValueError(f"layers must lie in 0..{n}, got {self.layers}")
        for p in model.parameters():
            p.requires_grad_(False)
        model.eval()
        self.prefix = prefix
        self.prefix_ids = self.encode(prefix) if prefix else []
        self._cache: Any = None
        if self.prefix_ids:
            from transformers import DynamicCache

            self._cache = DynamicCache()
            self._forward(self.prefix_ids, self._cache)

    @property
    def feature_dim(self) -> int:
        """Width of one position's features: ``hidden_size * len(layers)``."""
        return int(self.model.config.hidden_size) * len(self.layers)

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` (no special tokens added)."""
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def decode(self, ids: list[int]) -> str:
        return str(self.tokenizer.decode(ids, skip_special_tokens=True))

    def start(self) -> Session:
        """A new session whose cache holds exactly the prefix."""
        if self._cache is None:
            from transformers import DynamicCache

            return Session(DynamicCache())
        extra = self._cache.get_seq_length() - len(self.prefix_ids)
        if extra > 0:
            self._cache.crop(-extra)
        return Session(self._cache)

    def feed(self, session: Session, ids: list[int]) -> tuple[Tensor, Tensor]:
        """Append ``ids`` in one forward pass: ``(logits [vocab] of the last position,
        features [len(ids), feature_dim])``."""
        logits, features = self.feed_all(session, ids)
        return logits[-1], features

    @torch.no_grad()
    def feed_all(self, session: Session, ids: list[int]) -> tuple[Tensor, Tensor]:
        """As :meth:`feed`, with the logits of every appended position: ``[len(ids), vocab]``."""
        if not ids:
            raise ValueError("feed needs at least one token")
        session.forward_passes += 1
        session.tokens.extend(ids)
        return self._forward(ids, session.cache)

    @torch.no_grad()
    def question_features(
        self,
        questions: list[list[int]],
        batch_size: int = 16,
        on_batch: Callable[[int], object] | None = None,
    ) -> list[Tensor]:
        """The features ``[len(ids), feature_dim]`` of each token list ``ids`` in ``questions``,
        each read right after the prefix: what ``feed_all(start(), ids)[1]`` gives, in fewer
        forward passes. Lists of the same length run together, up to ``batch_size`` per pass,
        with no padding and only the last position's logits computed (the features do not need
        them), so every row goes through the arithmetic of a pass of its own: on a CPU whose
        matrix products give a row the same result whatever the number of rows (the x86 MKL
        build this was measured on, from 8 rows on; each pass here has at least 8), the features
        are bitwise those of single passes (``tests/compute/test_llm_chain.py``), elsewhere they
        may differ by float rounding. ``on_batch(n)`` is called after each pass of ``n`` lists."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if any(not ids for ids in questions):
            raise ValueError("feed needs at least one token")
        self.start()  # the prefix cache holds exactly the prefix
        by_length: dict[int, list[int]] = {}
        for i, ids in enumerate(questions):
            by_length.setdefault(len(ids), []).append(i)
        out: list[Tensor] = [torch.empty(0)] * len(questions)
        for indices in by_length.values():
            for first in range(0, len(indices), batch_size):
                chunk = indices[first : first + batch_size]
                cache = self._prefix_cache(len(chunk))
                result = self.model(
                    input_ids=torch.tensor([questions[i] for i in chunk], device=self.model.device),
                    cache=cache,
                    use_cache=True,
                    output_hidden_states=True,
                    logits_to_keep=1,
                )
                features = torch.cat(
                    [result.hidden_states[layer] for layer in self.layers], dim=-1
                ).float()
                for row, i in enumerate(chunk):
                    out[i] = features[row]
                if on_batch is not None:
                    on_batch(len(chunk))
        return out

    def _prefix_cache(self, batch: int) -> Any:
        """A new cache holding the prefix ``batch`` times (the runner's own cache is not changed)."""
        if self._cache is None:
            from transformers import DynamicCache

            return DynamicCache()
        cache = copy.deepcopy(self._cache)
        if batch > 1:
            cache.batch_repeat_interleave(batch)
        return cache

    def rewind(self, session: Session, count: int) -> None:
        """Forget the last ``count`` tokens of ``session`` (cache and token list)."""
        if not 0 <= count <= len(session.tokens):
            raise ValueError(f"count must lie in 0..{len(session.tokens)}, got {count}")
        if count:
            session.cache.crop(-count)
            del session.tokens[-count:]

    def _forward(self, ids: list[int], cache: Any) -> tuple[Tensor, Tensor]:
        out = self.model(
            input_ids=torch.tensor([ids], device=self.model.device),
            cache=cache,
            use_cache=True,
            output_hidden_states=True,
        )
        features = torch.cat([out.hidden_states[layer][0] for layer in self.layers], dim=-1).float()
        return out.logits[0].float(), features

    def _vocab_mask(self, keep: Callable[[int, str], bool]) -> Tensor:
        size = int(self.model.config.vocab_size)
        texts = self.tokenizer.batch_decode([[i] for i in range(min(size, len(self.tokenizer)))])
        mask = torch.zeros(size, dtype=torch.bool)
        mask[: len(texts)] = torch.tensor([keep(i, str(t)) for i, t in enumerate(texts)])
        return mask

    @cached_property
    def digit_tokens(self) -> Tensor:
        """``[vocab]`` bool: tokens whose text (leading spaces removed) starts with a digit."""
        return self._vocab_mask(lambda _, text: text.lstrip()[:1].isdigit())

    @cached_property
    def stop_tokens(self) -> Tensor:
        """``[vocab]`` bool: the tokens :meth:`is_stop` stops at (end of sequence, newline)."""
        eos = self.tokenizer.eos_token_id
        return self._vocab_mask(lambda i, text: i == eos or "\n" in text)

    def digit_logprob(self, logits: Tensor) -> Tensor:
        """``logits [..., vocab] -> [...]``: log-probability that the next token starts a number."""
        logp = logits.log_softmax(-1)
        return logp[..., self.digit_tokens].logsumexp(-1)

    def is_stop(self, token: int, stop: str = "\n") -> bool:
        """True for the end-of-sequence token or a token whose text contains ``stop``."""
        return token == self.tokenizer.eos_token_id or stop in self.tokenizer.decode([token])

"""The computation chain (:class:`pimoe.compute.ComputationChain`) behind the OpenAI routes.

``pimoe serve --chain DIR`` serves a chain saved by ``pimoe chain train --out DIR``: a completion's
``prompt``, or a chat's last ``user`` message, is the question; the answer is the chain's text, the
arithmetic engine's exact result inside. :class:`ChainEngine` has the surface of a
:class:`~pimoe.infer.generation.GenerationEngine` (``submit``, ``queued``, ``close``), so the routes,
their errors, streaming and metrics are the same; it answers one question at a time on its worker
thread (the chain decodes greedily with batch size 1), from a bounded queue.

The chain has no per-token hook, so an answer is streamed as one text chunk once it is complete
(then the chunk with its ``finish_reason``); a cancelled or expired request is dropped before it
starts, not during its decoding. The chain decodes greedily: ``temperature`` above 0 and ``top_p``
below 1 are refused (400); ``seed`` changes nothing; ``stop`` strings cut the answer.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from pimoe.infer.decode_batch import TextModel
from pimoe.infer.request_queue import RequestQueue
from pimoe.infer.sampling import SamplingParams
from pimoe.infer.text_generator import GenerationEvent

if TYPE_CHECKING:
    from pimoe.compute import ComputationChain

DEFAULT_MAX_TOKENS = 48  # the chain's own default answer length


class ChainTextModel(TextModel):
    """The chain's tokenizer. A prompt is the question; chat messages give their last ``user``
    message (the chain builds its own prompt around the question)."""

    def __init__(self, chain: ComputationChain) -> None:
        tokenizer: Any = chain.tokenizer
        config: Any = chain.model.config
        self.tokenizer = tokenizer
        self.context_length = int(
            getattr(config, "max_position_embeddings", None) or tokenizer.model_max_length
        )
        self.vocab_size = int(config.vocab_size)
        self.eos_ids = frozenset(i for i in (tokenizer.eos_token_id,) if i is not None)

    def encode(self, text: str) -> list[int]:
        return [int(i) for i in self.tokenizer(text, add_special_tokens=False)["input_ids"]]

    def decode(self, ids: list[int]) -> str:
        return str(
            self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
        )

    def chat_ids(self, messages: list[dict[str, str]]) -> list[int]:
        questions = [m["content"] for m in messages if m["role"] == "user"]
        if not questions:
            raise ValueError("the computation chain answers the last user message; there is none")
        return self.encode(questions[-1])


@dataclass(eq=False)
class _Job:
    question: str
    params: SamplingParams
    on_event: Callable[[GenerationEvent], None]
    deadline: float | None
    prompt_tokens: int
    cancelled: bool = False

    def cancel(self) -> None:
        self.cancelled = True


class ChainEngine:
    """Answers questions with a :class:`ComputationChain`, one at a time, on a worker thread.

    Args:
        chain: the loaded chain.
        max_queue: most questions waiting; more raise :class:`~pimoe.infer.request_queue.EngineFull` (HTTP 429).
    """

    kind = "chain"
    greedy_only = True

    def __init__(self, chain: ComputationChain, max_queue: int = 256) -> None:
        self._queue: RequestQueue[_Job] = RequestQueue(max_queue, "chain")
        self.chain, self.max_queue = chain, max_queue
        self.model = ChainTextModel(chain)
        self.answered = 0
        self._queue.start(self._run, "pimoe-chain")

    @property
    def queued(self) -> int:
        """Questions waiting for the worker."""
        return self._queue.queued

    def submit(
        self,
        prompt: list[int],
        params: SamplingParams,
        on_event: Callable[[GenerationEvent], None],
        timeout_s: float | None = None,
    ) -> _Job:
        """Queue the question whose token ids are ``prompt``; ``on_event`` gets its answer on the
        worker thread. ``ValueError`` for an empty question; :class:`~pimoe.infer.request_queue.EngineFull`, :class:`~pimoe.infer.request_queue.EngineClosed`."""
        question = self.model.decode(prompt).strip()
        if not question:
            raise ValueError("the question is empty")
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        job = _Job(question, params, on_event, deadline, len(prompt))
        self._queue.enqueue(job)
        return job

    def close(self) -> None:
        """Stop taking questions, answer the queued ones, and join the worker."""
        self._queue.close()

    def _run(self) -> None:
        q = self._queue
        while True:
            with q.cond:
                while not q.waiting and not q.closed:
                    q.cond.wait()
                if not q.waiting:
                    return
                job = q.waiting.popleft()
            if job.cancelled:
                continue
            try:
                event = self._answer(job)
            except Exception as exc:  # the chain failed: fail this request, keep serving
                event = GenerationEvent(
                    "",
                    job.prompt_tokens,
                    0,
                    error=(500, f"the chain failed: {type(exc).__name__}: {exc}"),
                )
            with contextlib.suppress(
                Exception
            ):  # a consumer that went away must not stop the engine
                job.on_event(event)

    def _answer(self, job: _Job) -> GenerationEvent:
        if job.deadline is not None and time.monotonic() > job.deadline:
            return GenerationEvent(
                "",
                job.prompt_tokens,
                0,
                error=(504, "the request's deadline passed before it started"),
            )
        limit = job.params.max_tokens or DEFAULT_MAX_TOKENS
        with torch.inference_mode():
            run = self.chain.run(job.question, limit)
        self.answered += 1
        text, finish = run.text, "length" if run.generated_tokens >= limit else "stop"
        cuts = [i for i in (text.find(s) for s in job.params.stop) if i >= 0]
        if cuts:
            text, finish = text[: min(cuts)], "stop"
        return GenerationEvent(
            text, job.prompt_tokens, run.generated_tokens, finish, tuple(self.model.encode(text))
        )


def open_chain(folder: str | os.PathLike[str], max_queue: int = 256) -> ChainEngine:
    """A :class:`ChainEngine` for the chain saved in ``folder`` (its base model is loaded by the
    name or path in its ``chain.json``)."""
    from pimoe.compute import ComputationChain

    return ChainEngine(ComputationChain.load(Path(folder)), max_queue)


__all__ = ["ChainEngine", "ChainTextModel", "open_chain"]

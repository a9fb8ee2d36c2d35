"""Continuous batching for text generation (iteration-level scheduling, as in Orca and vLLM).

A :class:`GenerationEngine` owns one worker thread and one
:class:`~pimoe.infer.decode_batch.DecodeBatch`. Each iteration of its loop plans a step
(:func:`~pimoe.infer.scheduler.plan_step`: at most ``max_num_batched_tokens`` tokens, the running
sequences' first), runs the next chunk of a prompt being prefilled in chunks (with
``enable_chunked_prefill``), prefills the admitted prompts together
(:meth:`~pimoe.infer.decode_batch.DecodeBatch.add`) and chooses their first tokens, then advances
every running sequence by one token in one batched step; a sequence that finishes
(end-of-sequence token, stop string, ``max_tokens``, full context), is cancelled or passes its
deadline leaves the batch before the next step. Each sequence keeps its own KV cache rows, so its
greedy output does not depend on what else runs.

Requests beyond ``max_batch_size`` running wait in a queue of at most ``max_queue``; a full queue
raises :class:`EngineFull` (HTTP 429). Results arrive as :class:`GenerationEvent` s through a
callback called on the worker thread (keep it cheap: hand the event to your own queue).
"""

from __future__ import annotations

import itertools
import queue
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from pimoe.infer.decode_batch import DecodeBatch, GenerationModel, PartialPrefill
from pimoe.infer.request_queue import EngineClosed, EngineFull, RequestQueue
from pimoe.infer.sampling import SamplingParams, choose_tokens
from pimoe.infer.scheduler import SchedulerConfig, plan_step
from pimoe.infer.sequence import GenerationSequence
from pimoe.infer.text_generator import Cancellable, GenerationEvent, TextGenerator


@dataclass
class GenerationStats:
    """Counters since start: decoding ``steps``, the ``rows`` they advanced (``rows / steps`` is
    the mean batch), ``prefills`` (prompts prefilled, whole or in chunks), ``prefill_chunks``
    (forward passes of chunked prefills) and generated ``tokens``."""

    steps: int = 0
    rows: int = 0
    prefills: int = 0
    prefill_chunks: int = 0
    tokens: int = 0


class Ticket:
    """A submitted request; :meth:`cancel` makes it leave the batch before the next step."""

    def __init__(self, seq: GenerationSequence, engine: GenerationEngine) -> None:
        self._seq, self._engine = seq, engine

    def cancel(self) -> None:
        self._seq.cancelled = True
        self._engine._queue.wake()


class GenerationEngine:
    """Continuous-batching text generation over one :class:`GenerationModel`.

    Args:
        model: the model and tokenizer.
        max_batch_size: most sequences decoded together.
        max_queue: most requests waiting for a row; more raise :class:`EngineFull`.
        max_context: most positions (prompt + completion) of one sequence, at most the model's
            context; None: the model's. It bounds the KV memory: ``max_batch_size * max_context``
            positions.
        max_num_batched_tokens: most tokens one step processes, one per running sequence plus
            prompt tokens (see :mod:`pimoe.infer.scheduler`): a burst of arrivals is admitted
            over several steps, so running streams wait for at most about this many tokens
            between two of theirs. Without chunked prefill a step still admits one prompt
            whole when none fits. None: no limit (every waiting request that has a row is
            admitted at once).
        enable_chunked_prefill: prefill a prompt that does not fit the step's budget in chunks
            over the next steps, the running streams advancing one token every step (as vLLM's
            option of that name). Needs ``max_num_batched_tokens >= max_batch_size`` and a model
            with :attr:`~GenerationModel.chunked_prefill`.
    """

    kind = "generation"
    greedy_only = False

    def __init__(
        self,
        model: GenerationModel,
        max_batch_size: int = 32,
        max_queue: int = 256,
        max_context: int | None = None,
        max_num_batched_tokens: int | None = None,
        enable_chunked_prefill: bool = False,
    ) -> None:
        if max_batch_size < 1 or max_queue < 0 or (max_context is not None and max_context < 2):
            raise ValueError(
                f"need max_batch_size >= 1, max_queue >= 0 and max_context >= 2 or None, got "
                f"{max_batch_size}, {max_queue}, {max_context}"
            )
        self.scheduler = SchedulerConfig(max_num_batched_tokens, enable_chunked_prefill)
        if enable_chunked_prefill:
            if (max_num_batched_tokens or 0) < max_batch_size:
                raise ValueError(
                    f"chunked prefill needs max_num_batched_tokens >= max_batch_size "
                    f"({max_batch_size}), got {max_num_batched_tokens}"
                )
            if not model.chunked_prefill:
                raise ValueError(f"{type(model).__name__} does not prefill in chunks")
        self.model, self.max_batch_size = model, max_batch_size
        self.context_length = min(model.context_length, max_context or model.context_length)
        self.stats = GenerationStats()
        self._running = 0
        self._queue: RequestQueue[GenerationSequence] = RequestQueue(max_queue, "generation")
        self._queue.start(self._run, "pimoe-generation")

    @property
    def max_queue(self) -> int:
        return self._queue.max_queue

    @property
    def queued(self) -> int:
        """Requests waiting for a row."""
        return self._queue.queued

    @property
    def running(self) -> int:
        """Sequences in the decode batch."""
        return self._running

    def submit(
        self,
        prompt: list[int],
        params: SamplingParams,
        on_event: Callable[[GenerationEvent], None],
        timeout_s: float | None = None,
    ) -> Ticket:
        """Queue a completion of the token ids ``prompt``; ``on_event`` gets its events on the
        worker thread. ``timeout_s`` bounds its time from now to its last token (an error event
        with status 504 when exceeded). Raises ``ValueError`` for an empty prompt or one that
        fills the context, :class:`EngineFull` or :class:`EngineClosed`."""
        room = self.context_length - len(prompt)
        if not prompt:
            raise ValueError("the prompt is empty")
        if room < 1:
            raise ValueError(
                f"the prompt has {len(prompt)} tokens; this model's context holds "
                f"{self.context_length}, prompt and completion together"
            )
        limit = room if params.max_tokens is None else min(room, params.max_tokens)
        generator = None
        if params.temperature > 0:
            generator = torch.Generator()
            generator.manual_seed(
                params.seed if params.seed is not None else int(torch.randint(2**62, ()).item())
            )
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        seq = GenerationSequence(list(prompt), params, on_event, deadline, limit, generator)
        self._queue.enqueue(seq)
        return Ticket(seq, self)

    def generate(
        self, prompt: list[int], params: SamplingParams, timeout_s: float | None = None
    ) -> GenerationEvent:
        """Blocking: the whole completion as one event (its ``text`` is the full text)."""
        events: queue.SimpleQueue[GenerationEvent] = queue.SimpleQueue()
        self.submit(prompt, params, events.put, timeout_s)
        parts: list[str] = []
        while True:
            event = events.get()
            parts.append(event.text)
            if event.final:
                return GenerationEvent(
                    "".join(parts),
                    event.prompt_tokens,
                    event.completion_tokens,
                    event.finish_reason,
                    event.token_ids,
                    event.error,
                )

    def close(self) -> None:
        """Stop taking requests, finish the queued and running ones, and join the worker."""
        self._queue.close()

    def _run(self) -> None:
        with torch.inference_mode():  # the caches are inference tensors, written in place
            self._loop()

    def _loop(self) -> None:
        q = self._queue
        batch = self.model.new_batch(self.max_batch_size)
        active: list[GenerationSequence] = []
        chunked: tuple[GenerationSequence, PartialPrefill] | None = None
        while True:
            with q.cond:
                while not q.waiting and not active and chunked is None and not q.closed:
                    q.cond.wait()
                if q.closed and not q.waiting and not active and chunked is None:
                    return
                free = self.max_batch_size - len(active) - (chunked is not None)
                plan = plan_step(
                    self.scheduler,
                    len(active),
                    free,
                    None if chunked is None else chunked[1].left,
                    [len(s.prompt) for s in itertools.islice(q.waiting, free + 1)],
                )
                admitted = [q.waiting.popleft() for _ in range(plan.whole)]
                if plan.start_chunked:
                    seq = q.waiting.popleft()
                    chunked = (seq, PartialPrefill(seq.prompt))
            try:
                if chunked is not None and self._expire(chunked[0]):
                    chunked = None
                if chunked is not None and plan.chunk:
                    logits = batch.add_chunk(chunked[1], plan.chunk)  # [V] once complete
                    self.stats.prefill_chunks += 1
                    if logits is not None:
                        self._join([chunked[0]], logits[None], active)
                        chunked = None
                ready = [seq for seq in admitted if not self._expire(seq)]
                if ready:
                    logits = batch.add([seq.prompt for seq in ready])  # [n, V]
                    self._join(ready, logits, active)
                self._drop_finished(batch, active)
                if active:
                    logits = batch.step([s.tokens[-1] for s in active])  # [rows, V]
                    self.stats.steps += 1
                    self.stats.rows += len(active)
                    self._advance_all(active, logits)
                    self._drop_finished(batch, active)
                self._running = len(active)
            except Exception as exc:  # the model failed: fail the running requests, keep serving
                failed = [*active, *admitted, *([] if chunked is None else [chunked[0]])]
                for seq in failed:
                    if not seq.done:
                        seq.emit("", error=(500, f"the model failed: {type(exc).__name__}: {exc}"))
                active.clear()
                chunked = None
                self._running = 0
                batch = self.model.new_batch(self.max_batch_size)

    def _join(
        self, seqs: list[GenerationSequence], logits: Tensor, active: list[GenerationSequence]
    ) -> None:
        """``seqs`` were prefilled as the batch's new last rows (``logits [n, V]``): they join
        ``active`` and get their first tokens."""
        active.extend(seqs)
        self.stats.prefills += len(seqs)
        self._advance_all(seqs, logits)

    def _expire(self, seq: GenerationSequence) -> bool:
        """Finish ``seq`` if it was cancelled or passed its deadline; whether it is done."""
        if seq.cancelled:
            seq.done = True
        elif seq.deadline is not None and time.monotonic() > seq.deadline and not seq.done:
            seq.emit(
                "",
                error=(
                    504,
                    f"the request's deadline passed after {len(seq.tokens)} completion tokens",
                ),
            )
        return seq.done

    def _drop_finished(self, batch: DecodeBatch, active: list[GenerationSequence]) -> None:
        for i in range(len(active) - 1, -1, -1):
            if self._expire(active[i]):
                batch.remove(i)
                active[i] = active[-1]
                active.pop()

    def _advance_all(self, seqs: list[GenerationSequence], logits: Tensor) -> None:
        """Append to each ``seqs[i]`` the token chosen from ``logits[i]`` (``[n, V]``) and send
        its new text."""
        tokens = choose_tokens(logits, [s.params for s in seqs], [s.generator for s in seqs])
        for seq, token in zip(seqs, tokens):
            seq.advance(token, self.model)
            self.stats.tokens += 1


__all__ = [
    "Cancellable",
    "EngineClosed",
    "EngineFull",
    "GenerationEngine",
    "GenerationEvent",
    "GenerationStats",
    "SamplingParams",
    "TextGenerator",
    "Ticket",
    "choose_tokens",
]

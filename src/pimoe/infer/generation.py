"""Continuous batching for text generation (iteration-level scheduling, as in Orca and vLLM).

A :class:`GenerationEngine` owns one worker thread and one :class:`~pimoe.infer.lm_models.DecodeBatch`.
Each iteration of its loop admits waiting requests into free rows (their prompts prefilled together,
see :meth:`~pimoe.infer.decode_batch.DecodeBatch.add`, and their first tokens chosen), then advances every running sequence by one token in one batched
step; a sequence that finishes (end-of-sequence token, stop string, ``max_tokens``, full context),
is cancelled or passes its deadline leaves the batch before the next step. Each sequence keeps its
own KV cache rows, so its greedy output does not depend on what else runs.

Requests beyond ``max_batch_size`` running wait in a queue of at most ``max_queue``; a full queue
raises :class:`EngineFull` (HTTP 429). Results arrive as :class:`GenerationEvent` s through a
callback called on the worker thread (keep it cheap: hand the event to your own queue).
"""

from __future__ import annotations

import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import Tensor

from pimoe.infer.decode_batch import DecodeBatch, GenerationModel, TextModel

FinishReason = str  # "stop" | "length"


@dataclass(frozen=True)
class SamplingParams:
    """How one completion is sampled.

    Args:
        max_tokens: most completion tokens; None: until the model's context is full.
        temperature: 0 is greedy decoding; otherwise logits are divided by it before sampling.
        top_p: nucleus sampling: sample among the most likely tokens whose probabilities sum to
            ``top_p`` (1 keeps all).
        seed: seeds this request's own ``torch.Generator`` (None: a random seed).
        stop: strings that end the completion (not included in its text).
    """

    max_tokens: int | None = 16
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.max_tokens is not None and self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if not 0.0 <= self.temperature <= 2.0:
            raise ValueError(f"temperature must be in [0, 2], got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if len(self.stop) > 4 or any(not s for s in self.stop):
            raise ValueError("stop must hold at most 4 non-empty strings")


@dataclass(frozen=True)
class GenerationEvent:
    """New ``text`` of one sequence since its previous event. The last event has a
    ``finish_reason`` ("stop" or "length") and the completion's ``token_ids``, or an ``error``
    (``status``, message); ``completion_tokens`` counts the tokens generated so far."""

    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: FinishReason | None = None
    token_ids: tuple[int, ...] = ()
    error: tuple[int, str] | None = None

    @property
    def final(self) -> bool:
        return self.finish_reason is not None or self.error is not None


class EngineFull(RuntimeError):
    """The engine's queue is full (answer 429 and let the client retry)."""


class EngineClosed(RuntimeError):
    """The engine was closed and takes no more requests."""


@dataclass
class GenerationStats:
    """Counters since start: decoding ``steps``, the ``rows`` they advanced (``rows / steps`` is
    the mean batch), ``prefills`` and generated ``tokens``."""

    steps: int = 0
    rows: int = 0
    prefills: int = 0
    tokens: int = 0


@dataclass(eq=False)
class _Sequence:
    prompt: list[int]
    params: SamplingParams
    on_event: Callable[[GenerationEvent], None]
    deadline: float | None
    limit: int
    generator: torch.Generator | None
    tokens: list[int] = field(default_factory=list)
    sent: int = 0  # characters of the completion text already sent
    done: bool = False
    cancelled: bool = False

    def emit(
        self, text: str, finish: FinishReason | None = None, error: tuple[int, str] | None = None
    ) -> None:
        if finish is not None or error is not None:
            self.done = True
        event = GenerationEvent(
            text,
            len(self.prompt),
            len(self.tokens),
            finish,
            tuple(self.tokens) if finish is not None else (),
            error,
        )
        try:
            self.on_event(event)
        except Exception:  # a consumer that went away must not stop the engine
            self.cancelled = True


class Cancellable(Protocol):
    def cancel(self) -> None:
        """Make the request leave as soon as it can."""


class TextGenerator(Protocol):
    """What the OpenAI routes serve: a :class:`GenerationEngine`, or another engine with the same
    surface (:class:`~pimoe.infer.chain_serving.ChainEngine`). ``kind`` is what ``/healthz``
    reports; ``greedy_only`` engines refuse sampling parameters."""

    kind: str
    greedy_only: bool

    @property
    def model(self) -> TextModel: ...

    @property
    def queued(self) -> int: ...

    def submit(
        self,
        prompt: list[int],
        params: SamplingParams,
        on_event: Callable[[GenerationEvent], None],
        timeout_s: float | None = None,
    ) -> Cancellable: ...

    def close(self) -> None: ...


class Ticket:
    """A submitted request; :meth:`cancel` makes it leave the batch before the next step."""

    def __init__(self, seq: _Sequence, engine: GenerationEngine) -> None:
        self._seq, self._engine = seq, engine

    def cancel(self) -> None:
        self._seq.cancelled = True
        self._engine._wake()


class GenerationEngine:
    """Continuous-batching text generation over one :class:`GenerationModel`.

    Args:
        model: the model and tokenizer.
        max_batch_size: most sequences decoded together.
        max_queue: most requests waiting for a row; more raise :class:`EngineFull`.
        max_context: most positions (prompt + completion) of one sequence, at most the model's
            context; None: the model's. It bounds the KV memory: ``max_batch_size * max_context``
            positions.
        max_prefill_tokens: prompt tokens prefilled between two decoding steps (at least one
            prompt is): a burst of arrivals is admitted over several steps, so running streams
            wait for at most about this many prompt tokens between two of their tokens. None: no
            limit (every waiting request that fits is admitted at once).
    """

    kind = "generation"
    greedy_only = False

    def __init__(
        self,
        model: GenerationModel,
        max_batch_size: int = 32,
        max_queue: int = 256,
        max_context: int | None = None,
        max_prefill_tokens: int | None = None,
    ) -> None:
        if max_batch_size < 1 or max_queue < 0 or (max_context is not None and max_context < 2):
            raise ValueError(
                f"need max_batch_size >= 1, max_queue >= 0 and max_context >= 2 or None, got "
                f"{max_batch_size}, {max_queue}, {max_context}"
            )
        if max_prefill_tokens is not None and max_prefill_tokens < 1:
            raise ValueError(f"max_prefill_tokens must be >= 1 or None, got {max_prefill_tokens}")
        self.max_prefill_tokens = max_prefill_tokens
        self.model, self.max_batch_size, self.max_queue = model, max_batch_size, max_queue
        self.context_length = min(model.context_length, max_context or model.context_length)
        self.stats = GenerationStats()
        self._waiting: deque[_Sequence] = deque()
        self._cond = threading.Condition()
        self._closed = False
        self._running = 0
        self._thread = threading.Thread(target=self._run, name="pimoe-generation", daemon=True)
        self._thread.start()

    @property
    def queued(self) -> int:
        """Requests waiting for a row."""
        return len(self._waiting)

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
        seq = _Sequence(list(prompt), params, on_event, deadline, limit, generator)
        with self._cond:
            if self._closed:
                raise EngineClosed("the generation engine is shut down")
            if (
                len(self._waiting) >= self.max_queue
            ):  # cancelled requests (gone clients) give their place
                self._waiting = deque(s for s in self._waiting if not s.cancelled)
            if len(self._waiting) >= self.max_queue:
                raise EngineFull(
                    f"{len(self._waiting)} requests are already waiting (max_queue={self.max_queue})"
                )
            self._waiting.append(seq)
            self._cond.notify()
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
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._thread.join()

    def _wake(self) -> None:
        with self._cond:
            self._cond.notify()

    def _run(self) -> None:
        with torch.inference_mode():  # the caches are inference tensors, written in place
            self._loop()

    def _loop(self) -> None:
        batch = self.model.new_batch(self.max_batch_size)
        active: list[_Sequence] = []
        while True:
            with self._cond:
                while not self._waiting and not active and not self._closed:
                    self._cond.wait()
                if self._closed and not self._waiting and not active:
                    return
                admitted: list[_Sequence] = []
                budget = self.max_prefill_tokens
                while (
                    self._waiting
                    and len(active) + len(admitted) < self.max_batch_size
                    and (not admitted or budget is None or len(self._waiting[0].prompt) <= budget)
                ):
                    admitted.append(self._waiting.popleft())
                    budget = None if budget is None else budget - len(admitted[-1].prompt)
            try:
                ready = [seq for seq in admitted if not self._expire(seq)]
                if ready:
                    logits = batch.add(
                        [seq.prompt for seq in ready]
                    )  # [n, V]: one prefill per length group
                    active.extend(ready)
                    self.stats.prefills += len(ready)
                    self._advance_all(ready, logits)
                self._drop_finished(batch, active)
                if active:
                    logits = batch.step([s.tokens[-1] for s in active])  # [rows, V]
                    self.stats.steps += 1
                    self.stats.rows += len(active)
                    self._advance_all(active, logits)
                    self._drop_finished(batch, active)
                self._running = len(active)
            except Exception as exc:  # the model failed: fail the running requests, keep serving
                for seq in [*active, *admitted]:
                    if not seq.done:
                        seq.emit("", error=(500, f"the model failed: {type(exc).__name__}: {exc}"))
                active.clear()
                self._running = 0
                batch = self.model.new_batch(self.max_batch_size)

    def _expire(self, seq: _Sequence) -> bool:
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

    def _drop_finished(self, batch: DecodeBatch, active: list[_Sequence]) -> None:
        for i in range(len(active) - 1, -1, -1):
            if self._expire(active[i]):
                batch.remove(i)
                active[i] = active[-1]
                active.pop()

    def _advance_all(self, seqs: list[_Sequence], logits: Tensor) -> None:
        """Append to each ``seqs[i]`` the token chosen from ``logits[i]`` (``[n, V]``) and send its new text."""
        for seq, token in zip(
            seqs, choose_tokens(logits, [s.params for s in seqs], [s.generator for s in seqs])
        ):
            self._advance(seq, token)

    def _advance(self, seq: _Sequence, token: int) -> None:
        p = seq.params
        seq.tokens.append(token)
        self.stats.tokens += 1
        if token in self.model.eos_ids:
            seq.emit(self._text(seq)[seq.sent :], "stop")
            return
        text = self._text(seq)
        cut = min((i for i in (text.find(s) for s in p.stop) if i >= 0), default=-1)
        if cut >= 0:
            seq.emit(text[seq.sent : max(cut, seq.sent)], "stop")
        elif len(seq.tokens) >= seq.limit:
            seq.emit(text[seq.sent :], "length")
        else:
            safe = _safe_end(text, p.stop)
            if safe > seq.sent:
                out, seq.sent = text[seq.sent : safe], safe
                seq.emit(out)

    def _text(self, seq: _Sequence) -> str:
        ids = [t for t in seq.tokens if t not in self.model.eos_ids]
        return self.model.decode(ids)


def _safe_end(text: str, stops: tuple[str, ...]) -> int:
    """How much of ``text`` can be sent: not a trailing partial character (U+FFFD from an
    incomplete UTF-8 sequence) nor a tail that may grow into a stop string."""
    end = len(text)
    while end and text[end - 1] == "\ufffd":
        end -= 1
    return end - max(
        (k for s in stops for k in range(1, len(s)) if text.endswith(s[:k], 0, end)), default=0
    )


def choose_tokens(
    logits: Tensor, params: list[SamplingParams], generators: list[torch.Generator | None]
) -> list[int]:
    """The next token of each row of ``logits [n, V]``: the argmax where ``params[i].temperature``
    is 0, else a draw with ``generators[i]`` at that temperature within the ``top_p`` nucleus.
    Temperature, softmax and nucleus are computed for all sampled rows at once; each row then
    draws from its own generator (so a seed gives the same text whatever else is in the batch)."""
    tokens = logits.argmax(dim=-1).tolist()
    sampled = [i for i, p in enumerate(params) if p.temperature > 0]
    if not sampled:
        return tokens
    rows = logits[sampled].float().cpu()  # [m, V]; the generators live on the CPU
    temperature = torch.tensor([params[i].temperature for i in sampled])[:, None]
    probs = torch.softmax(rows / temperature, dim=-1)
    top_p = torch.tensor([params[i].top_p for i in sampled])[:, None]
    if bool((top_p < 1.0).any()):
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        drop = sorted_probs.cumsum(-1) - sorted_probs >= top_p  # the first token is always kept
        probs = probs.scatter(-1, order, sorted_probs.masked_fill(drop, 0.0))
    for j, i in enumerate(sampled):
        tokens[i] = int(torch.multinomial(probs[j], 1, generator=generators[i]))
    return tokens


__all__ = [
    "EngineClosed",
    "EngineFull",
    "GenerationEngine",
    "GenerationEvent",
    "GenerationStats",
    "SamplingParams",
    "Ticket",
    "choose_tokens",
]

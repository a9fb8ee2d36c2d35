"""One inference chain, three ways to get the result bytes of a computation span.

Every mode decodes greedily with the text expert's KV cache (each step runs the model on the
bytes appended since the last step only; past ``block_size`` the context is cropped, as
:meth:`PiMoELM.extend` does), from the prompt until the stop byte (``"\\n"``, which ends a
completion) or ``max_new_tokens`` new bytes:

- ``"lm_only"``: the text expert writes every byte, result digits included.
- ``"pimoe"``: token-level hand-off. At each step the :class:`HandoffRouter` reads the text
  expert's last hidden state; when it routes to the computation expert and that expert has a byte
  to write (inside a span, from ``=`` on: :meth:`ComputationExpert.targets`), the expert's exact
  byte is appended instead of the text expert's; otherwise the text expert's. Control goes back
  as soon as the router routes to the text expert (the expert itself closes the span with
  ``CALL_END``).
- ``"pimoe_span"``: as ``"pimoe"``, but once the router hands off, the expert appends all its
  remaining bytes (through ``CALL_END``) at once, without running the model on them.
- ``"tool_call"``: the text expert writes the call ``CALL_START expression =``; when it has
  written ``=`` inside an open span, generation stops, Python evaluates the expression
  (text-to-computation, then the same :class:`ArithmeticEngine`), the result and ``CALL_END`` are
  appended, and the text expert continues.

An expression the engine cannot evaluate gives its error token (``<err:div0>`` ...) in the chain,
in both the hand-off and the tool-call modes; nothing raises.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Literal

import torch

from pimoe.compute.engine import ArithmeticEngine
from pimoe.compute.expert import NO_OUTPUT, ComputationExpert
from pimoe.compute.handoff import HandoffRouter
from pimoe.compute.task import CALL_END, CALL_START, EQUALS
from pimoe.compute.text_to_computation import to_expression
from pimoe.moe.kv_cache import KVCache
from pimoe.moe.model import PiMoELM

Mode = Literal["lm_only", "pimoe", "pimoe_span", "tool_call"]
MODES: tuple[Mode, ...] = ("lm_only", "pimoe", "pimoe_span", "tool_call")
NEWLINE = ord("\n")


@dataclass(frozen=True)
class ChainOutput:
    """One decoded completion.

    Attributes:
        completion: the bytes appended after the prompt (the stop byte included, if reached).
        steps: decoding steps, i.e. forward passes of the text expert; each appends one token,
            written by the text expert or (``"pimoe"``) by the computation expert.
        inserted: bytes appended by the computation expert or the tool (``steps`` counts the
            ones that cost a forward pass; ``"pimoe_span"`` and ``"tool_call"`` insert for free).
        seconds: wall time of the whole decode.
    """

    completion: bytes
    steps: int
    inserted: int
    seconds: float


def open_call(sequence: list[int]) -> tuple[bytes, bytes] | None:
    """``(context, call)`` when the last span is still open and its ``=`` is the last byte (the
    point where a tool call fires): ``call`` is the span's text before ``=``, ``context`` all the
    bytes before the span. ``None`` otherwise."""
    if not sequence or sequence[-1] != EQUALS:
        return None
    for t in range(len(sequence) - 2, -1, -1):
        if sequence[t] == CALL_START:
            return bytes(sequence[:t]), bytes(sequence[t + 1 : -1])
        if sequence[t] in (CALL_END, EQUALS):
            return None
    return None


def span_answer(completion: bytes) -> bytes | None:
    """The bytes between the first span's ``=`` and its ``CALL_END``; ``None`` if there is none."""
    start = completion.find(bytes([CALL_START]))
    if start < 0:
        return None
    eq = completion.find(b"=", start)
    end = completion.find(bytes([CALL_END]), eq + 1)
    return completion[eq + 1 : end] if 0 <= eq < end else None


class InferenceChain:
    """The text expert, the computation expert, the text-to-computation module and the router
    joined in one decoding loop.

    Args:
        lm: the trained text expert.
        router: the trained hand-off router (needed for the ``"pimoe"`` modes only).
        engine: the arithmetic engine of the computation expert and of the tool.
        max_new_tokens: longest completion.
    """

    def __init__(
        self,
        lm: PiMoELM,
        router: HandoffRouter | None = None,
        engine: ArithmeticEngine | None = None,
        max_new_tokens: int = 64,
    ) -> None:
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        self.lm, self.router = lm.eval(), router
        self.engine = engine or ArithmeticEngine()
        self.expert = ComputationExpert(lm.tok_emb, self.engine)
        self.max_new_tokens = max_new_tokens

    def _expert_bytes(self, sequence: list[int], whole: bool) -> list[int]:
        """The computation expert's next byte after ``sequence`` (``whole``: all its remaining
        bytes through ``CALL_END``); empty where it has nothing to write."""
        written: list[int] = []
        while True:
            byte = int(self.expert.targets(torch.tensor([sequence + written]))[0, -1])
            if byte == NO_OUTPUT:
                return written
            written.append(byte)
            if not whole or byte == CALL_END:
                return written

    def _tool(self, context: bytes, call: bytes) -> list[int]:
        """The tool call: resolve and evaluate in Python, return the result bytes and ``CALL_END``."""
        return [*list(self.engine.compute(to_expression(call, context)).encode("ascii")), CALL_END]

    def _step(
        self, sequence: list[int], cache: KVCache | None
    ) -> tuple[torch.Tensor, torch.Tensor, KVCache | None]:
        """Run the text expert on what ``cache`` lacks of ``sequence`` -> ``(logits [V],
        last hidden state [D] (``norm_f``'s output), cache)``."""
        captured: list[torch.Tensor] = []
        handle = self.lm.norm_f.register_forward_hook(
            lambda module, args, out: captured.append(out)
        )
        try:
            logits, cache = self.lm.extend(torch.tensor([sequence]), cache)
        finally:
            handle.remove()
        return logits[0], captured[-1][0, -1], cache

    @torch.no_grad()
    def run(self, prompt: bytes, mode: Mode) -> ChainOutput:
        """Decode a completion of ``prompt`` (non-empty bytes) in ``mode``."""
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if not isinstance(prompt, bytes) or not prompt:
            raise ValueError("prompt must be non-empty bytes")
        if mode.startswith("pimoe") and self.router is None:
            raise ValueError(f"mode {mode!r} needs a router")
        start = time.perf_counter()
        sequence, steps, inserted = list(prompt), 0, 0
        cache: KVCache | None = None
        while len(sequence) - len(prompt) < self.max_new_tokens:
            call = open_call(sequence) if mode == "tool_call" else None
            if call is not None:
                result = self._tool(*call)
                sequence += result
                inserted += len(result)
                continue
            logits, hidden, cache = self._step(sequence, cache)
            steps += 1
            written = [int(logits.argmax())]
            if mode.startswith("pimoe") and self.router.hand_off(hidden):  # type: ignore[union-attr]
                expert = self._expert_bytes(sequence, whole=mode == "pimoe_span")
                if expert:
                    written, inserted = expert, inserted + len(expert)
            sequence += written
            if sequence[-1] == NEWLINE:
                break
        completion = bytes(sequence[len(prompt) : len(prompt) + self.max_new_tokens])
        return ChainOutput(completion, steps, inserted, time.perf_counter() - start)

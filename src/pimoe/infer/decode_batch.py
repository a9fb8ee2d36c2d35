"""The interface between the generation engine and a language model, and the per-row KV storage
shared by the batched models.

A :class:`TextModel` turns text into token ids and back (plain prompts and chat messages); a
:class:`GenerationModel` also opens a :class:`DecodeBatch`: the rows of the running batch, each a
sequence with its own KV cache. The engine (:mod:`pimoe.infer.generation`) prefills newly admitted
prompts together with :meth:`DecodeBatch.add` (or one long prompt in chunks with
:meth:`DecodeBatch.add_chunk`), advances every row by one token with :meth:`DecodeBatch.step` and
drops finished rows with :meth:`DecodeBatch.remove`.

:class:`SlotCache` holds the rows' keys and values: per layer ``[max_rows, kv_heads, capacity,
head_dim]``, row ``b`` holding its own ``lengths[b]`` positions. A decode step writes each row's
new key and value at that row's own position; :meth:`SlotCache.visible` gives the mask hiding each
row's unused tail.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor


@dataclass(eq=False)
class PartialPrefill:
    """A prompt being prefilled in chunks: its first ``done`` tokens are in ``cache``, the model's
    own KV cache of this one sequence (outside the batch until the prompt is complete)."""

    prompt: list[int]
    done: int = 0
    cache: Any = None

    @property
    def left(self) -> int:
        """Prompt tokens not yet prefilled."""
        return len(self.prompt) - self.done


class DecodeBatch(ABC):
    """The running sequences of one model, row ``i`` being the ``i``-th added and not removed."""

    @property
    @abstractmethod
    def size(self) -> int:
        """Number of rows."""

    @abstractmethod
    def add(self, prompts: list[list[int]]) -> Tensor:
        """Prefill ``prompts`` as new last rows, in order -> logits of each one's last position ``[n, V]``."""

    @abstractmethod
    def step(self, tokens: list[int]) -> Tensor:
        """Append ``tokens[i]`` to row ``i`` for every row -> next-token logits ``[rows, V]``."""

    @abstractmethod
    def remove(self, row: int) -> None:
        """Drop ``row``; the last row moves into its place (the others keep their index)."""

    def add_chunk(self, prefill: PartialPrefill, n: int) -> Tensor | None:
        """Prefill the next ``n`` tokens of ``prefill.prompt`` on top of its earlier chunks. Once
        the whole prompt is in, add it as the new last row and return the logits of its last
        position ``[V]``; before that, None. Batches of models whose
        :attr:`GenerationModel.chunked_prefill` is False do not implement it."""
        raise NotImplementedError(f"{type(self).__name__} does not prefill in chunks")


class TextModel(ABC):
    """Token ids of prompts and chat messages, and text of completions."""

    context_length: int  # most positions one sequence may hold (prompt + completion)
    vocab_size: int  # token ids are in [0, vocab_size)
    eos_ids: frozenset[int]  # tokens that end a completion (finish_reason "stop")

    @abstractmethod
    def encode(self, text: str) -> list[int]:
        """Token ids of a plain prompt."""

    @abstractmethod
    def decode(self, ids: list[int]) -> str:
        """Text of completion ids (special tokens skipped)."""

    @abstractmethod
    def chat_ids(self, messages: list[dict[str, str]]) -> list[int]:
        """Token ids of ``messages`` (``{"role", "content"}``) in the chat format, ending with the
        assistant's turn opened."""


class GenerationModel(TextModel):
    """A causal LM the engine can serve: its tokenizer and its decode batches.
    ``chunked_prefill``: its batches implement :meth:`DecodeBatch.add_chunk`."""

    chunked_prefill: bool = False

    @abstractmethod
    def new_batch(self, max_rows: int) -> DecodeBatch:
        """An empty decode batch for at most ``max_rows`` sequences."""


class SlotCache:
    """Per-row KV storage: ``keys[l]``/``values[l]`` ``[max_rows, kv_heads, capacity, head_dim]``
    (zeros where unused, so masked positions never hold NaN) and each row's length, kept both on
    the host (``host_lengths``, so a step needs no device sync) and as a tensor (``lengths [rows]``).

    During a decode step the model calls :meth:`update` once per layer with the new ``k, v
    [rows, kv_heads, 1, head_dim]``; they are written at each row's own position. The capacity
    doubles when a row needs more room.
    """

    def __init__(
        self,
        n_layer: int,
        max_rows: int,
        kv_heads: int,
        head_dim: int,
        max_len: int,
        dtype: torch.dtype,
        device: torch.device,
        capacity: int = 64,
    ) -> None:
        shape = (max_rows, kv_heads, min(capacity, max_len), head_dim)
        self.max_len = max_len
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layer)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layer)]
        self.host_lengths: list[int] = []
        self.lengths = torch.zeros(0, dtype=torch.long, device=device)
        self._rows = torch.zeros(0, dtype=torch.long, device=device)
        self._end = 0  # positions returned by update: max(lengths) + 1 during a step

    @property
    def capacity(self) -> int:
        return self.keys[0].shape[2]

    @property
    def size(self) -> int:
        return len(self.host_lengths)

    def reserve(self, length: int) -> None:
        """Make room for ``length`` positions in every row (doubling the capacity)."""
        if length > self.max_len:
            raise ValueError(f"{length} positions exceed the model's context of {self.max_len}")
        if length <= self.capacity:
            return
        new = min(self.max_len, max(length, 2 * self.capacity))
        for store in (self.keys, self.values):
            for i, t in enumerate(store):
                grown = t.new_zeros((*t.shape[:2], new, t.shape[3]))
                grown[:, :, : t.shape[2]] = t
                store[i] = grown

    def put_row(
        self, layer_keys: list[Tensor], layer_values: list[Tensor], index: int, start: int, end: int
    ) -> None:
        """Append a prefilled sequence as the new last row: per layer ``layer_keys[l][index, :,
        start:end]`` (of ``[n, kv_heads, P, head_dim]``), likewise for the values."""
        self.reserve(end - start + 1)
        row = self.size
        for store, new in ((self.keys, layer_keys), (self.values, layer_values)):
            for t, n in zip(store, new):
                t[row, :, : end - start] = n[index, :, start:end]
                t[row, :, end - start :] = 0
        self.host_lengths.append(end - start)
        self._sync()

    def move_row(self, src: int, dst: int) -> None:
        """Copy row ``src`` onto row ``dst`` and drop the last row (``src`` must be the last)."""
        if src != dst:
            for store in (self.keys, self.values):
                for t in store:
                    t[dst] = t[src]
            self.host_lengths[dst] = self.host_lengths[src]
        self.host_lengths.pop()
        self._sync()

    def _sync(self) -> None:
        self.lengths = torch.tensor(self.host_lengths, dtype=torch.long, device=self.lengths.device)
        self._rows = torch.arange(self.size, device=self.lengths.device)

    def begin_step(self) -> Tensor:
        """Prepare a step that appends one position to every row -> ``visible [rows, end]`` (True
        where row ``b``'s query may look: its ``lengths[b]`` positions and the new one)."""
        self._end = max(self.host_lengths) + 1
        self.reserve(self._end)
        return torch.arange(self._end, device=self.lengths.device) <= self.lengths[:, None]

    def end_step(self) -> None:
        """Count the step's new position in every row."""
        self.host_lengths = [n + 1 for n in self.host_lengths]
        self.lengths += 1

    def update(
        self, k: Tensor, v: Tensor, layer_idx: int, *args: Any, **kwargs: Any
    ) -> tuple[Tensor, Tensor]:
        """Write the step's ``k, v [rows, kv_heads, 1, head_dim]`` at each row's position; return
        the rows' keys and values ``[rows, kv_heads, max(lengths) + 1, head_dim]``."""
        n = k.shape[0]
        self.keys[layer_idx][self._rows, :, self.lengths] = k[:, :, 0]
        self.values[layer_idx][self._rows, :, self.lengths] = v[:, :, 0]
        return self.keys[layer_idx][:n, :, : self._end], self.values[layer_idx][:n, :, : self._end]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return max(self.host_lengths, default=0)


class SlotBatch(DecodeBatch):
    """A decode batch whose rows live in a :class:`SlotCache` (``self.cache``). It prefills a
    prompt in chunks with :meth:`forward_chunk`, the model's own forward over the chunk's tokens
    on top of the sequence's cache of the earlier chunks."""

    cache: SlotCache

    @property
    def size(self) -> int:
        return self.cache.size

    @torch.inference_mode()
    def remove(self, row: int) -> None:
        self.cache.move_row(self.size - 1, row)

    @abstractmethod
    def forward_chunk(
        self, prefill: PartialPrefill, ids: list[int]
    ) -> tuple[list[Tensor], list[Tensor], Tensor]:
        """Run ``ids``, the prompt's tokens after its ``prefill.done`` first ones, on top of
        ``prefill.cache`` (created on the first chunk) -> per layer keys and values of the
        sequence so far ``[1, kv_heads, >= done + len(ids), head_dim]`` and the last position's
        logits ``[V]``."""

    @torch.inference_mode()
    def add_chunk(self, prefill: PartialPrefill, n: int) -> Tensor | None:
        if not 1 <= n <= prefill.left:
            raise ValueError(f"a chunk must hold 1 to {prefill.left} tokens, got {n}")
        start = prefill.done
        keys, values, logits = self.forward_chunk(prefill, prefill.prompt[start : start + n])
        prefill.done += n
        if prefill.left:
            return None
        self.cache.put_row(keys, values, 0, 0, prefill.done)
        prefill.cache = None
        return logits


def length_groups(lengths: list[int], max_waste: float = 0.25) -> list[list[int]]:
    """Indices of ``lengths`` grouped for padded prefills: sorted by length, a group grows while
    its padding stays within ``max_waste`` of its real tokens."""
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    groups: list[list[int]] = []
    for i in order:
        group = groups[-1] if groups else None
        if group is not None and (len(group) + 1) * lengths[i] <= (1 + max_waste) * (
            sum(lengths[j] for j in group) + lengths[i]
        ):
            group.append(i)
        else:
            groups.append([i])
    return groups


__all__ = [
    "DecodeBatch",
    "GenerationModel",
    "PartialPrefill",
    "SlotBatch",
    "SlotCache",
    "TextModel",
    "length_groups",
]

"""Language models behind the text-generation engine, behind one interface.

A :class:`GenerationModel` turns text into token ids and back (plain prompts and chat messages)
and opens a :class:`DecodeBatch`: the rows of the running batch, each a sequence with its own
KV cache. The engine (:mod:`pimoe.infer.generation`) adds a sequence with :meth:`DecodeBatch.add`
(its prompt is prefilled alone), advances every row by one token with :meth:`DecodeBatch.step`
and drops finished rows with :meth:`DecodeBatch.remove`.

- :class:`HFGenerationModel`: a Hugging Face decoder-only LM with full attention whose layers
  call ``cache.update(k, v, layer_idx)`` and take a 4-D additive mask (LLaMA, Mistral, Qwen2,
  SmolLM2, and those upcycled into PiMoE layers by :func:`pimoe.models.upcycle`). Rows share one
  slot cache (:class:`SlotCache`): per layer ``[rows, kv_heads, capacity, head_dim]``, row ``b``
  holding its ``lengths[b]`` positions; a decode step writes each row's new key at its own
  position, masks each row's unused tail and gives each row its own position id. One batched
  forward pass per step.
- :class:`PiMoEGenerationModel`: a byte-level :class:`PiMoELM` (its tokens are UTF-8 bytes).
  Each row keeps a batch-1 :class:`KVCache` and a step runs the rows one after another through
  the model's own cached forward, so outputs equal :meth:`PiMoELM.generate`'s.
"""

from __future__ import annotations

import json
import os
from abc import ABC, abstractmethod
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from pimoe.moe.kv_cache import KVCache
from pimoe.moe.model import PiMoELM

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


class DecodeBatch(ABC):
    """The running sequences of one model, row ``i`` being the ``i``-th added and not removed."""

    @property
    @abstractmethod
    def size(self) -> int:
        """Number of rows."""

    @abstractmethod
    def add(self, prompt: list[int]) -> Tensor:
        """Prefill ``prompt`` as a new last row -> logits of its last position ``[V]``."""

    @abstractmethod
    def step(self, tokens: list[int]) -> Tensor:
        """Append ``tokens[i]`` to row ``i`` for every row -> next-token logits ``[rows, V]``."""

    @abstractmethod
    def remove(self, row: int) -> None:
        """Drop ``row``; the last row moves into its place (the others keep their index)."""


class GenerationModel(ABC):
    """A causal LM the engine can serve: its tokenizer and its decode batches."""

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

    @abstractmethod
    def new_batch(self, max_rows: int) -> DecodeBatch:
        """An empty decode batch for at most ``max_rows`` sequences."""


class SlotCache:
    """Per-row KV storage for an HF model: ``keys[l]``/``values[l]`` ``[max_rows, kv_heads, capacity,
    head_dim]`` (zeros where unused, so masked positions never hold NaN), ``lengths [rows]``.

    During a decode step the model calls :meth:`update` once per layer with the new ``k, v
    [rows, kv_heads, 1, head_dim]``; they are written at each row's own position ``lengths[b]``.
    The capacity doubles when a row needs more room.
    """

    def __init__(self, n_layer: int, max_rows: int, kv_heads: int, head_dim: int, max_len: int,
                 dtype: torch.dtype, device: torch.device, capacity: int = 64) -> None:
        self.shape = (max_rows, kv_heads, min(capacity, max_len), head_dim)
        self.max_len = max_len
        self.keys = [torch.zeros(self.shape, dtype=dtype, device=device) for _ in range(n_layer)]
        self.values = [torch.zeros(self.shape, dtype=dtype, device=device) for _ in range(n_layer)]
        self.lengths = torch.zeros(0, dtype=torch.long, device=device)
        self._rows = torch.zeros(0, dtype=torch.long, device=device)

    @property
    def capacity(self) -> int:
        return self.keys[0].shape[2]

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

    def put_row(self, row: int, layer_keys: list[Tensor], layer_values: list[Tensor]) -> None:
        """Store a prefilled sequence (per layer ``[1, kv_heads, P, head_dim]``) as ``row``."""
        length = layer_keys[0].shape[2]
        self.reserve(length + 1)
        for store, new in ((self.keys, layer_keys), (self.values, layer_values)):
            for t, n in zip(store, new):
                t[row, :, :length] = n[0]
                t[row, :, length:] = 0
        self.lengths = torch.cat((self.lengths, self.lengths.new_tensor([length])))
        self._rows = torch.arange(len(self.lengths), device=self.lengths.device)

    def move_row(self, src: int, dst: int) -> None:
        """Copy row ``src`` onto row ``dst`` and drop the last row (``src`` must be the last)."""
        if src != dst:
            for store in (self.keys, self.values):
                for t in store:
                    t[dst] = t[src]
            self.lengths[dst] = self.lengths[src]
        self.lengths = self.lengths[:-1].clone()
        self._rows = self._rows[:-1]

    def update(self, k: Tensor, v: Tensor, layer_idx: int, *args: Any, **kwargs: Any) -> tuple[Tensor, Tensor]:
        """Write the step's ``k, v [rows, kv_heads, 1, head_dim]`` at each row's position; return
        the rows' keys and values ``[rows, kv_heads, max(lengths) + 1, head_dim]``."""
        n = k.shape[0]
        self.keys[layer_idx][self._rows, :, self.lengths] = k[:, :, 0]
        self.values[layer_idx][self._rows, :, self.lengths] = v[:, :, 0]
        end = int(self.lengths.max()) + 1
        return self.keys[layer_idx][:n, :, :end], self.values[layer_idx][:n, :, :end]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return int(self.lengths.max()) if len(self.lengths) else 0


class _HFBatch(DecodeBatch):
    def __init__(self, model: PreTrainedModel, max_rows: int, context_length: int) -> None:
        cfg = model.config
        heads = cfg.num_attention_heads
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
        weight = next(model.parameters())
        self.model, self.dtype = model, weight.dtype
        self.cache = SlotCache(cfg.num_hidden_layers, max_rows, getattr(cfg, "num_key_value_heads", heads),
                               head_dim, context_length, weight.dtype, weight.device)

    @property
    def size(self) -> int:
        return len(self.cache.lengths)

    @torch.inference_mode()
    def add(self, prompt: list[int]) -> Tensor:
        from transformers import DynamicCache

        cache = DynamicCache(config=self.model.config)
        ids = torch.tensor([prompt], device=self.cache.lengths.device)
        logits = self.model(input_ids=ids, cache=cache, use_cache=True, logits_to_keep=1).logits
        layers: list[Any] = list(cache.layers)  # full-attention layers: keys/values [1, kv_heads, P, head_dim]
        self.cache.put_row(self.size, [layer.keys for layer in layers], [layer.values for layer in layers])
        return logits[0, -1]

    @torch.inference_mode()
    def step(self, tokens: list[int]) -> Tensor:
        cache = self.cache
        cache.reserve(int(cache.lengths.max()) + 1)
        end = int(cache.lengths.max()) + 1
        visible = torch.arange(end, device=cache.lengths.device) <= cache.lengths[:, None]  # [rows, end]
        mask = torch.zeros(visible.shape, dtype=self.dtype, device=visible.device)
        mask.masked_fill_(~visible, torch.finfo(self.dtype).min)
        ids = torch.tensor(tokens, device=cache.lengths.device)[:, None]
        logits = self.model(input_ids=ids, position_ids=cache.lengths[:, None], attention_mask=mask[:, None, None, :],
                            cache=cache, use_cache=True).logits
        cache.lengths += 1
        return logits[:, -1]

    @torch.inference_mode()
    def remove(self, row: int) -> None:
        self.cache.move_row(self.size - 1, row)


class HFGenerationModel(GenerationModel):
    """A Hugging Face causal LM (full attention, see the module docstring) with its tokenizer."""

    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> None:
        if getattr(model.config, "sliding_window", None) and getattr(model.config, "use_sliding_window", True):
            raise ValueError(f"{type(model).__name__} uses sliding-window attention, which the slot cache does not model")
        self.model, self.tokenizer = model.eval(), tokenizer
        self.context_length = int(getattr(model.config, "max_position_embeddings", None) or tokenizer.model_max_length)
        self.vocab_size = int(model.config.vocab_size)
        eos = model.generation_config.eos_token_id if model.generation_config is not None else None
        ids = {tokenizer.eos_token_id} | set(eos if isinstance(eos, list) else [eos])
        self.eos_ids = frozenset(i for i in ids if i is not None)

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def decode(self, ids: list[int]) -> str:
        return str(self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False))

    def chat_ids(self, messages: list[dict[str, str]]) -> list[int]:
        if not getattr(self.tokenizer, "chat_template", None):
            raise ValueError("this model's tokenizer has no chat template: use /v1/completions")
        out: Any = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        ids = out["input_ids"] if hasattr(out, "keys") else out  # a BatchEncoding in transformers 5
        return [int(i) for i in ids]

    def new_batch(self, max_rows: int) -> DecodeBatch:
        return _HFBatch(self.model, max_rows, self.context_length)


class _PiMoEBatch(DecodeBatch):
    def __init__(self, model: PiMoELM) -> None:
        self.model = model
        self.caches: list[KVCache] = []

    @property
    def size(self) -> int:
        return len(self.caches)

    @torch.inference_mode()
    def add(self, prompt: list[int]) -> Tensor:
        cache = self.model.new_cache(1)
        device = self.model.tok_emb.weight.device
        logits = self.model(torch.tensor([prompt], device=device), cache=cache).logits
        self.caches.append(cache)
        return logits[0, -1]

    @torch.inference_mode()
    def step(self, tokens: list[int]) -> Tensor:
        device = self.model.tok_emb.weight.device
        return torch.cat([self.model(torch.tensor([[t]], device=device), cache=c).logits[:, -1]
                          for t, c in zip(tokens, self.caches)])

    def remove(self, row: int) -> None:
        last = self.caches.pop()
        if row < len(self.caches):
            self.caches[row] = last


class PiMoEGenerationModel(GenerationModel):
    """A byte-level :class:`PiMoELM`: prompts are UTF-8 bytes, completions are decoded as UTF-8
    (invalid bytes become U+FFFD); chat messages are joined as ``"role: content\\n"`` lines
    followed by ``"assistant: "``. It has no end-of-sequence token."""

    eos_ids: frozenset[int] = frozenset()
    vocab_size = 256

    def __init__(self, model: PiMoELM) -> None:
        if model.config.vocab_size != 256:
            raise ValueError(f"a PiMoELM served for text must be byte-level (vocab_size 256), got {model.config.vocab_size}")
        if not model.can_cache:
            raise ValueError("this PiMoELM routes across positions (capacity or expert choice), so it cannot decode "
                             "with a KV cache")
        self.model = model.eval()
        self.context_length = model.config.block_size

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        return bytes(ids).decode("utf-8", errors="replace")

    def chat_ids(self, messages: list[dict[str, str]]) -> list[int]:
        return self.encode("".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant: ")

    def new_batch(self, max_rows: int) -> DecodeBatch:
        return _PiMoEBatch(self.model)


def is_causal_lm_folder(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a Hugging Face folder whose ``config.json`` names a ``...ForCausalLM``."""
    config = Path(path) / "config.json"
    if not config.is_file():
        return False
    try:
        architectures = json.loads(config.read_text()).get("architectures") or []
    except (OSError, ValueError, AttributeError):
        return False
    return any(str(a).endswith("ForCausalLM") for a in architectures)


def open_generation_model(spec: str | os.PathLike[str], routers: str | os.PathLike[str] | None = None,
                          device: str = "cpu") -> GenerationModel | None:
    """The generation model ``spec`` names, or None when it is not a language model.

    ``spec`` is a name known to :func:`pimoe.models.load_pretrained` (e.g.
    ``"smollm2-135m-instruct"``), a Hugging Face causal-LM folder, or a :class:`PiMoELM`
    safetensors file. ``routers`` (a file of :func:`pimoe.models.save_routers`) upcycles the HF
    model into PiMoE layers before serving it. Encoder folders and ``pimoe compress`` outputs
    give None (they are served by ``/v1/infer`` only).
    """
    from pimoe.models.pretrained import REGISTRY

    if str(spec) in REGISTRY or is_causal_lm_folder(spec):
        from pimoe.models import load_pretrained

        model, tokenizer = load_pretrained(spec, device=device, progress=False)
        if routers is not None:
            from pimoe.models import load_routers

            load_routers(model, routers)
        return HFGenerationModel(model, tokenizer)
    if routers is not None:
        raise ValueError(f"routers upcycle a Hugging Face causal LM; {spec} is not one")
    if Path(spec).is_file():
        try:
            lm = PiMoELM.load(spec, map_location=device)
        except ValueError:
            return None
        return PiMoEGenerationModel(lm) if lm.config.vocab_size == 256 and lm.can_cache else None
    return None


__all__ = ["DecodeBatch", "GenerationModel", "HFGenerationModel", "PiMoEGenerationModel", "SlotCache",
           "is_causal_lm_folder", "open_generation_model"]

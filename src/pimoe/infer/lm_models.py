"""Hugging Face causal LMs behind the text-generation engine, and :func:`open_generation_model`,
which opens any model ``pimoe serve`` can generate with.

:class:`HFGenerationModel`: a Hugging Face decoder-only LM with full attention whose layers call
``cache.update(k, v, layer_idx)`` and take a 4-D additive mask (LLaMA, Mistral, Qwen2, SmolLM2,
and those upcycled into PiMoE layers by :func:`pimoe.models.upcycle`). Rows share one
:class:`~pimoe.infer.decode_batch.SlotCache`. Newly admitted prompts are prefilled together:
grouped by length (:func:`~pimoe.infer.decode_batch.length_groups`), each group left-padded into
one forward pass with an attention mask and per-row position ids, its rows' keys and values then
copied into the slot cache without the padding. A decode step writes each row's new key at its
own position, masks each row's unused tail and gives each row its own position id: one batched
forward pass per step. A byte-level :class:`PiMoELM` is served by
:class:`~pimoe.infer.pimoe_lm.PiMoEGenerationModel`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import Tensor

from pimoe.infer.decode_batch import (
    DecodeBatch,
    GenerationModel,
    PartialPrefill,
    SlotBatch,
    SlotCache,
    TextModel,
    length_groups,
)
from pimoe.infer.pimoe_lm import PiMoEGenerationModel
from pimoe.moe.model import PiMoELM

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


class _HFBatch(SlotBatch):
    def __init__(self, model: PreTrainedModel, max_rows: int, context_length: int) -> None:
        cfg = model.config
        heads = cfg.num_attention_heads
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
        weight = next(model.parameters())
        self.model, self.dtype = model, weight.dtype
        self.cache = SlotCache(
            cfg.num_hidden_layers,
            max_rows,
            getattr(cfg, "num_key_value_heads", heads),
            head_dim,
            context_length,
            weight.dtype,
            weight.device,
        )

    @torch.inference_mode()
    def add(self, prompts: list[list[int]]) -> Tensor:
        device = self.cache.lengths.device
        done: list[tuple[list[Tensor], list[Tensor], int, int, int] | None] = [None] * len(prompts)
        logits: list[Tensor | None] = [None] * len(prompts)
        for group in length_groups([len(p) for p in prompts]):
            keys, values, last = self._prefill([prompts[i] for i in group], device)
            longest = keys[0].shape[2]
            for j, i in enumerate(group):
                done[i] = (keys, values, j, longest - len(prompts[i]), longest)
                logits[i] = last[j]
        for item in done:
            assert item is not None
            self.cache.put_row(*item)
        return torch.stack([t for t in logits if t is not None])

    def _prefill(
        self, prompts: list[list[int]], device: torch.device
    ) -> tuple[list[Tensor], list[Tensor], Tensor]:
        """One left-padded forward pass -> per layer keys and values ``[n, kv_heads, P, head_dim]``
        and the last position's logits ``[n, V]``."""
        from transformers import DynamicCache

        longest = max(len(p) for p in prompts)
        ids = torch.zeros((len(prompts), longest), dtype=torch.long)
        mask = torch.zeros((len(prompts), longest), dtype=torch.long)
        for i, p in enumerate(prompts):
            ids[i, longest - len(p) :] = torch.tensor(p)
            mask[i, longest - len(p) :] = 1
        positions = (mask.cumsum(1) - 1).clamp(min=0)
        ragged = any(len(p) != longest for p in prompts)
        cache = DynamicCache(config=self.model.config)
        out = self.model(
            input_ids=ids.to(device),
            attention_mask=mask.to(device) if ragged else None,
            position_ids=positions.to(device),
            cache=cache,
            use_cache=True,
            logits_to_keep=1,
        )
        layers: list[Any] = list(
            cache.layers
        )  # full-attention layers: keys/values [n, kv_heads, P, head_dim]
        logits: Tensor = out.logits[:, -1]
        return [layer.keys for layer in layers], [layer.values for layer in layers], logits

    def forward_chunk(
        self, prefill: PartialPrefill, ids: list[int]
    ) -> tuple[list[Tensor], list[Tensor], Tensor]:
        from transformers import DynamicCache

        if prefill.cache is None:
            prefill.cache = DynamicCache(config=self.model.config)
        device = self.cache.lengths.device
        positions = torch.arange(prefill.done, prefill.done + len(ids), device=device)
        out = self.model(
            input_ids=torch.tensor([ids], device=device),
            position_ids=positions[None],
            cache=prefill.cache,
            use_cache=True,
            logits_to_keep=1,
        )  # one row, no padding: the causal mask over the cached positions is the model's own
        layers: list[Any] = list(prefill.cache.layers)
        logits: Tensor = out.logits[0, -1]
        return [layer.keys for layer in layers], [layer.values for layer in layers], logits

    @torch.inference_mode()
    def step(self, tokens: list[int]) -> Tensor:
        cache = self.cache
        visible = cache.begin_step()  # [rows, end]
        mask = torch.zeros(visible.shape, dtype=self.dtype, device=visible.device)
        mask.masked_fill_(~visible, torch.finfo(self.dtype).min)
        ids = torch.tensor(tokens, device=cache.lengths.device)[:, None]
        out = self.model(
            input_ids=ids,
            position_ids=cache.lengths[:, None],
            attention_mask=mask[:, None, None, :],
            cache=cache,
            use_cache=True,
        )
        cache.end_step()
        logits: Tensor = out.logits[:, -1]
        return logits


class HFGenerationModel(GenerationModel):
    """A Hugging Face causal LM (full attention, see the module docstring) with its tokenizer."""

    chunked_prefill = True

    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> None:
        if getattr(model.config, "sliding_window", None) and getattr(
            model.config, "use_sliding_window", True
        ):
            raise ValueError(
                f"{type(model).__name__} uses sliding-window attention, which the slot cache does not model"
            )
        cast(Any, model).eval()
        self.model, self.tokenizer = model, tokenizer
        self.context_length = int(
            getattr(model.config, "max_position_embeddings", None) or tokenizer.model_max_length
        )
        self.vocab_size = int(model.config.vocab_size)
        eos = model.generation_config.eos_token_id if model.generation_config is not None else None
        ids = {tokenizer.eos_token_id} | set(eos if isinstance(eos, list) else [eos])
        self.eos_ids = frozenset(i for i in ids if i is not None)

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def decode(self, ids: list[int]) -> str:
        return str(
            self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
        )

    def chat_ids(self, messages: list[dict[str, str]]) -> list[int]:
        if not getattr(self.tokenizer, "chat_template", None):
            raise ValueError("this model's tokenizer has no chat template: use /v1/completions")
        out: Any = self.tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=True
        )
        ids = out["input_ids"] if hasattr(out, "keys") else out  # a BatchEncoding in transformers 5
        return [int(i) for i in ids]

    def new_batch(self, max_rows: int) -> DecodeBatch:
        return _HFBatch(self.model, max_rows, self.context_length)


def is_causal_lm_folder(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a Hugging Face folder whose ``config.json`` names a ``...ForCausalLM``."""
    config = Path(path) / "config.json"
    if not config.is_file():
        return False
    try:
        architectures = json.loads(config.read_text(encoding="utf-8")).get("architectures")
    except (OSError, ValueError, AttributeError, RecursionError):
        return False
    return isinstance(architectures, list) and any(
        str(a).endswith("ForCausalLM") for a in architectures
    )


def open_generation_model(
    spec: str | os.PathLike[str],
    routers: str | os.PathLike[str] | None = None,
    device: str = "cpu",
    pack_experts: bool = False,
) -> GenerationModel | None:
    """The generation model ``spec`` names, or None when it is not a language model.

    ``spec`` is a name known to :func:`pimoe.models.load_pretrained` (e.g.
    ``"smollm2-135m-instruct"``), a Hugging Face causal-LM folder, or a :class:`PiMoELM`
    safetensors file. ``routers`` (a file of :func:`pimoe.models.save_routers`) upcycles the HF
    model into PiMoE layers before serving it. ``pack_experts`` prepacks the model's expert
    weights for CPU inference (:func:`pimoe.moe.pack_experts_`; ``ValueError`` naming why when
    the model has no expert it can pack). Encoder folders and ``pimoe compress`` outputs give
    None (they are served by ``/v1/infer`` only).
    """
    from pimoe.models.pretrained import REGISTRY

    served: GenerationModel | None = None
    weights: torch.nn.Module | None = None
    if str(spec) in REGISTRY or is_causal_lm_folder(spec):
        from pimoe.models import load_pretrained

        model, tokenizer = load_pretrained(spec, device=device, progress=False)
        if routers is not None:
            from pimoe.models import load_routers

            load_routers(model, routers)
        served, weights = HFGenerationModel(model, tokenizer), model
    elif routers is not None:
        raise ValueError(f"routers upcycle a Hugging Face causal LM; {spec} is not one")
    elif Path(spec).is_file():
        try:
            lm = PiMoELM.load(spec, map_location=device)
        except ValueError:
            return None
        if lm.config.vocab_size == 256 and lm.can_cache:
            served, weights = PiMoEGenerationModel(lm), lm
    if served is not None and pack_experts:
        from pimoe.moe import pack_experts_

        assert weights is not None
        pack_experts_(weights)
    return served


__all__ = [
    "DecodeBatch",
    "GenerationModel",
    "HFGenerationModel",
    "PiMoEGenerationModel",
    "SlotCache",
    "TextModel",
    "is_causal_lm_folder",
    "open_generation_model",
]

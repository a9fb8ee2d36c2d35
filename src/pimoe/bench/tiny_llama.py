"""A tiny random Hugging Face Llama sized to a tokenizer: the stand-in model of the loopback soak
and of the generation and chain tests, where the server or the chain is under test rather than
the matrix multiplies."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from transformers import LlamaForCausalLM, PreTrainedTokenizerBase


def tiny_llama(
    tokenizer: PreTrainedTokenizerBase,
    *,
    hidden_size: int = 32,
    num_attention_heads: int = 4,
    num_key_value_heads: int = 2,
    max_position_embeddings: int = 256,
    seed: int = 0,
    **overrides: Any,
) -> LlamaForCausalLM:
    """A seeded random 2-layer ``LlamaForCausalLM`` (MLP width ``2 * hidden_size``, tied
    embeddings, fp32, eval mode) whose vocabulary and bos/eos/pad ids are ``tokenizer``'s.

    Args:
        tokenizer: its ``len`` is the vocabulary size.
        overrides: further ``LlamaConfig`` fields (e.g. ``tie_word_embeddings=False``).
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        **{
            "vocab_size": len(tokenizer),
            "hidden_size": hidden_size,
            "intermediate_size": 2 * hidden_size,
            "num_hidden_layers": 2,
            "num_attention_heads": num_attention_heads,
            "num_key_value_heads": num_key_value_heads,
            "max_position_embeddings": max_position_embeddings,
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
            "tie_word_embeddings": True,
            **overrides,
        }
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval()


def save_tiny_llama(
    folder: Path, tokenizer: PreTrainedTokenizerBase, model: LlamaForCausalLM | None = None
) -> Path:
    """Save ``model`` (default: ``tiny_llama(tokenizer)``) and ``tokenizer`` as a Hugging Face
    folder that ``pimoe.models.load_pretrained`` and ``pimoe serve --model`` read; returns it."""
    (model if model is not None else tiny_llama(tokenizer)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


__all__ = ["save_tiny_llama", "tiny_llama"]

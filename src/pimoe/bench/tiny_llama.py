"""A tiny random Hugging Face Llama sized to a tokenizer: the stand-in model of the loopback soak
and of the generation and chain tests, where the server or the chain is under test rather than
the matrix multiplies."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from transformers import LlamaForCausalLM, PreTrainedTokenizerBase, PreTrainedTokenizerFast


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


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer without merges (every byte, so every digit and space, is its own
    token, as in SmolLM2's tokenizer for digits): ids 0-2 are ``<|endoftext|>`` (pad),
    ``<|im_start|>`` (bos) and ``<|im_end|>`` (eos), then the 256 byte symbols."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    vocab = {t: i for i, t in enumerate(specials + sorted(pre_tokenizers.ByteLevel.alphabet()))}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        eos_token="<|im_end|>",
        bos_token="<|im_start|>",
        pad_token="<|endoftext|>",
    )


def tiny_byte_llama(
    seed: int = 0, max_position_embeddings: int = 4096
) -> tuple[LlamaForCausalLM, PreTrainedTokenizerFast]:
    """``(model, tokenizer)``: :func:`tiny_llama` with hidden size 16 (2 heads, 1 KV head,
    untied embeddings) on :func:`byte_tokenizer`, the stand-in LM of the computation-chain
    tests."""
    tokenizer = byte_tokenizer()
    model = tiny_llama(
        tokenizer,
        hidden_size=16,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=max_position_embeddings,
        seed=seed,
        tie_word_embeddings=False,
    )
    return model, tokenizer


def save_tiny_llama(
    folder: Path, tokenizer: PreTrainedTokenizerBase, model: LlamaForCausalLM | None = None
) -> Path:
    """Save ``model`` (default: ``tiny_llama(tokenizer)``) and ``tokenizer`` as a Hugging Face
    folder that ``pimoe.models.load_pretrained`` and ``pimoe serve --model`` read; returns it."""
    (model if model is not None else tiny_llama(tokenizer)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


__all__ = ["byte_tokenizer", "save_tiny_llama", "tiny_byte_llama", "tiny_llama"]

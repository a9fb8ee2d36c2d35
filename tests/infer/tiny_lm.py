"""A tiny random Hugging Face Llama with a real byte-level BPE tokenizer (trained on Python's
docs in a fraction of a second) and a ChatML chat template, for the generation tests."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import torch

from pimoe.bench.tiny_llama import save_tiny_llama as save_llama
from pimoe.bench.tiny_llama import tiny_llama

CHATML = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@lru_cache(maxsize=1)
def _tokenizer_files() -> dict[str, str]:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from pimoe.data import load_pydoc_text

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([load_pydoc_text()[:60_000].decode("utf-8", "ignore")], trainer)
    return {"tokenizer.json": tok.to_str()}


def save_tiny_llama(folder: Path, seed: int = 0) -> Path:
    """Write a 2-layer Llama (hidden 32, 4 heads, 2 KV heads) and its tokenizer to ``folder``."""
    from transformers import PreTrainedTokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tokenizer.json").write_text(_tokenizer_files()["tokenizer.json"])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_file=str(folder / "tokenizer.json"),
        eos_token="<|im_end|>",
        bos_token="<|im_start|>",
        pad_token="<|endoftext|>",
    )
    tokenizer.chat_template = CHATML
    model = tiny_llama(tokenizer, seed=seed)
    with torch.no_grad():  # a wider spread of logits than the 0.02 init: fewer greedy near-ties
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.3)
    return save_llama(folder, tokenizer, model)

"""pimoe.bench.tiny_llama: sized to its tokenizer, seeded, saved as a folder load_pretrained reads."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from pimoe.bench.tiny_llama import save_tiny_llama, tiny_llama


@pytest.fixture(scope="module")
def tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "</s>", "<s>"]  # not LlamaConfig's default ids (bos 1, eos 2)
    vocab = {t: i for i, t in enumerate(specials + sorted(pre_tokenizers.ByteLevel.alphabet()))}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    return PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", bos_token="<s>", eos_token="</s>"
    )


def test_sized_to_the_tokenizer_and_seeded(tokenizer) -> None:
    model = tiny_llama(tokenizer, hidden_size=16, num_attention_heads=2, num_key_value_heads=1)
    config = model.config
    assert config.vocab_size == len(tokenizer) == 259 and config.num_hidden_layers == 2
    assert (config.hidden_size, config.intermediate_size) == (16, 32)
    assert (config.pad_token_id, config.bos_token_id, config.eos_token_id) == (0, 2, 1)
    assert config.tie_word_embeddings and not model.training
    again = tiny_llama(tokenizer, hidden_size=16, num_attention_heads=2, num_key_value_heads=1)
    other = tiny_llama(
        tokenizer, hidden_size=16, num_attention_heads=2, num_key_value_heads=1, seed=1
    )
    weight = "model.layers.0.mlp.up_proj.weight"
    assert torch.equal(model.state_dict()[weight], again.state_dict()[weight])
    assert not torch.equal(model.state_dict()[weight], other.state_dict()[weight])
    untied = tiny_llama(tokenizer, tie_word_embeddings=False, max_position_embeddings=64)
    assert not untied.config.tie_word_embeddings
    assert untied.config.max_position_embeddings == 64


def test_saved_folder_loads_with_the_same_logits(tokenizer, tmp_path: Path) -> None:
    from pimoe.models import load_pretrained

    model = tiny_llama(tokenizer, seed=3)
    folder = save_tiny_llama(tmp_path / "llama", tokenizer, model)
    loaded, loaded_tokenizer = load_pretrained(str(folder), progress=False)
    ids = loaded_tokenizer("def f(x): return x", return_tensors="pt").input_ids
    assert ids.tolist() == tokenizer("def f(x): return x", return_tensors="pt").input_ids.tolist()
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits)

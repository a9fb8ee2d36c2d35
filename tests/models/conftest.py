"""A tiny Llama GGUF inside a fake installed package, so tests exercise the real conversion path in seconds."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pimoe.models import REGISTRY, PretrainedSpec

TINY = PretrainedSpec(
    name="tiny-llama",
    package="pimoe-test-tiny-llama",
    module="pimoe_test_tiny_llama",
    gguf_file="tiny.gguf",
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MERGES = ["Ġ t", "h e", "Ġt he", "Ġ a", "i s"]


def _byte_alphabet() -> list[str]:
    """GPT-2's printable stand-ins for the 256 bytes (the vocabulary of a byte-level BPE)."""
    keep = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars, extra = [], 0
    for b in range(256):
        if b in keep:
            chars.append(chr(b))
        else:
            chars.append(chr(256 + extra))
            extra += 1
    return chars


def write_tiny_gguf(path: Path, seed: int = 0) -> None:
    """A 2-layer Llama (hidden 16, 2 heads, 1 KV head, FFN 32) with a byte-level BPE tokenizer, F32 weights."""
    import gguf

    tokens = SPECIALS + _byte_alphabet() + ["".join(m.split()) for m in MERGES]
    types = [gguf.TokenType.CONTROL] * len(SPECIALS) + [gguf.TokenType.NORMAL] * (
        len(tokens) - len(SPECIALS)
    )
    hidden, ffn, heads, kv_heads, layers, vocab = 16, 32, 2, 1, 2, len(tokens)
    head_dim = hidden // heads
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(64)
    writer.add_embedding_length(hidden)
    writer.add_block_count(layers)
    writer.add_feed_forward_length(ffn)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(vocab)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(MERGES)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    writer.add_add_bos_token(False)
    rng = np.random.default_rng(seed)

    def tensor(name: str, *shape: int) -> None:
        writer.add_tensor(name, (rng.standard_normal(shape) * 0.2).astype(np.float32))

    tensor("token_embd.weight", vocab, hidden)
    for i in range(layers):
        writer.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(hidden, dtype=np.float32))
        writer.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(hidden, dtype=np.float32))
        tensor(f"blk.{i}.attn_q.weight", hidden, hidden)
        tensor(f"blk.{i}.attn_k.weight", kv_heads * head_dim, hidden)
        tensor(f"blk.{i}.attn_v.weight", kv_heads * head_dim, hidden)
        tensor(f"blk.{i}.attn_output.weight", hidden, hidden)
        tensor(f"blk.{i}.ffn_gate.weight", ffn, hidden)
        tensor(f"blk.{i}.ffn_up.weight", ffn, hidden)
        tensor(f"blk.{i}.ffn_down.weight", hidden, ffn)
    writer.add_tensor("output_norm.weight", np.ones(hidden, dtype=np.float32))
    tensor("output.weight", vocab, hidden)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.fixture(scope="session")
def tiny_package(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder on ``sys.path`` holding the package ``pimoe_test_tiny_llama`` with ``tiny.gguf``."""
    root = tmp_path_factory.mktemp("site")
    package = root / TINY.module
    package.mkdir()
    (package / "__init__.py").write_text("")
    write_tiny_gguf(package / TINY.gguf_file)
    return root


@pytest.fixture
def tiny(tiny_package: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> PretrainedSpec:
    """The tiny model registered under ``tiny-llama``, its package importable, ``PIMOE_HOME`` in tmp."""
    monkeypatch.syspath_prepend(str(tiny_package))
    monkeypatch.setitem(REGISTRY, TINY.name, TINY)
    monkeypatch.setenv("PIMOE_HOME", str(tmp_path / "home"))
    return TINY

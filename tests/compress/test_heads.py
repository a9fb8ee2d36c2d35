"""Structured attention-head pruning: equivalence with nn.MultiheadAttention, exactness when the
removed heads write nothing, and Hugging Face BERT attention; structured optimizer steps."""

import pytest
import torch
from torch import nn

from pimoe.compress import ArchitectureConfig, ArchitectureOptimizer
from pimoe.compress.heads import PrunedMultiheadAttention, head_scores, prune_attention_heads


@pytest.mark.parametrize("batch_first", [True, False])
def test_all_heads_kept_matches_multihead_attention(batch_first: bool) -> None:
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(32, 4, batch_first=batch_first).eval()
    x = torch.randn(2, 5, 32) if batch_first else torch.randn(5, 2, 32)
    padding = torch.tensor([[False] * 5, [False] * 3 + [True] * 2])
    causal = torch.ones(5, 5, dtype=torch.bool).triu(1)
    pruned = PrunedMultiheadAttention.from_mha(mha, torch.arange(4))
    with torch.no_grad():
        for kwargs in (
            {},
            {"key_padding_mask": padding, "attn_mask": causal, "average_attn_weights": False},
        ):
            (a, wa), (b, wb) = mha(x, x, x, **kwargs), pruned(x, x, x, **kwargs)
            torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(wb, wa, atol=1e-6, rtol=1e-5)


def test_heads_that_write_nothing_go_first_and_output_is_unchanged() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32))
    model.attn = nn.MultiheadAttention(32, 4, batch_first=True).eval()
    with torch.no_grad():
        model.attn.out_proj.weight[:, 8:16] = 0  # head 1 (head_dim 8) contributes nothing
    x = torch.randn(2, 6, 32)
    with torch.no_grad():
        before = model.attn(x, x, x)[0]
    scores = head_scores(model.attn.in_proj_weight.chunk(3)[2], model.attn.out_proj.weight, 4)
    assert float(scores[1]) == 0.0 and bool((scores[[0, 2, 3]] > 0).all())
    kept = prune_attention_heads(model, 0.25)
    assert kept == {"attn": [0, 2, 3]}
    assert model.attn.q_proj.weight.shape == (24, 32) and model.attn.out_proj.weight.shape == (
        32,
        24,
    )
    with torch.no_grad():
        torch.testing.assert_close(model.attn(x, x, x)[0], before, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="amount"):
        prune_attention_heads(model, 1.0)


def test_hugging_face_bert_heads_shrink() -> None:
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=50,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=16,
    )
    bert = BertModel(config).eval()
    with torch.no_grad():
        for layer in bert.encoder.layer:
            layer.attention.output.dense.weight[:, 16:24] = 0  # head 2 of every layer
    ids = torch.randint(0, 50, (2, 7))
    with torch.no_grad():
        before = bert(ids).last_hidden_state
        kept = prune_attention_heads(bert, 0.25)
        after = bert(ids).last_hidden_state
    assert kept == {f"encoder.layer.{i}.attention": [0, 1, 3] for i in range(2)}
    assert bert.encoder.layer[0].attention.self.query.out_features == 24
    torch.testing.assert_close(after, before, atol=1e-5, rtol=1e-5)


def test_neuron_step_and_bad_ratios() -> None:
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    bert = BertModel(
        BertConfig(
            vocab_size=50,
            hidden_size=32,
            num_hidden_layers=1,
            num_attention_heads=4,
            intermediate_size=64,
            max_position_embeddings=16,
        )
    ).eval()
    config = ArchitectureConfig(
        enable_pruning=False,
        enable_quantization=False,
        enable_neuron_pruning=True,
        neuron_prune_ratio=0.25,
        enable_head_pruning=True,
        head_prune_ratio=0.5,
    )
    small = ArchitectureOptimizer(config).compress(bert)
    layer = small.encoder.layer[0]
    assert layer.intermediate.dense.out_features == 48 and layer.output.dense.in_features == 48
    assert layer.attention.self.num_attention_heads == 2
    assert (
        bert.encoder.layer[0].intermediate.dense.out_features == 64
    )  # the input model is untouched
    for bad in (
        dict(head_prune_ratio=0.0, enable_head_pruning=True),
        dict(neuron_prune_ratio=1.0, enable_neuron_pruning=True),
        dict(expert_drop_ratio=-0.1, enable_expert_drop=True),
        dict(experts_after_merge=0, enable_expert_merge=True),
    ):
        with pytest.raises(
            ValueError, match="amount|num_experts"
        ):  # the step's own config refuses it
            ArchitectureConfig(**bad)
        disabled = {k: v for k, v in bad.items() if not k.startswith("enable_")}
        ArchitectureConfig(**disabled)  # a disabled step's setting feeds nothing and is not checked

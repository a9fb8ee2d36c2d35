import math

import pytest
import torch
from torch import nn

from pimoe.fusion import ContrastiveAligner, FusionConfig, info_nce, recall_at_k


def test_info_nce_matches_clip_pseudocode_and_is_symmetric():
    a = nn.functional.normalize(torch.randn(6, 4), dim=-1)
    b = nn.functional.normalize(torch.randn(6, 4), dim=-1)
    logits = 10.0 * a @ b.t()
    labels = torch.arange(6)
    expected = (
        nn.functional.cross_entropy(logits, labels)
        + nn.functional.cross_entropy(logits.t(), labels)
    ) / 2
    torch.testing.assert_close(info_nce(a, b, 10.0), expected)
    torch.testing.assert_close(info_nce(b, a, 10.0), expected)
    assert float(info_nce(a, a, 100.0)) < float(info_nce(a, b, 100.0))
    with pytest.raises(ValueError):
        info_nce(a, b[:5], 1.0)


def test_recall_at_k_counts_ranks_of_the_true_match():
    gallery = torch.eye(4)
    queries = torch.tensor([[1.0, 0, 0, 0], [0.9, 0.1, 0, 0], [0, 0, 0, 1.0], [0, 0, 0, 1.0]])
    r = recall_at_k(queries, gallery, ks=(1, 2))
    # query 1's match is second (query 0's row is closer); query 2's ties do not count against it
    assert r[1] == pytest.approx(0.5) and r[2] == pytest.approx(1.0)
    assert recall_at_k(gallery, gallery, ks=(1,))[1] == 1.0


def test_temperature_is_learned_and_clamped():
    aligner = ContrastiveAligner(nn.Linear(3, 4), nn.Linear(5, 4), init_temperature=0.07)
    assert float(aligner.logit_scale.detach()) == pytest.approx(1 / 0.07, rel=1e-5)
    loss = aligner(torch.randn(8, 3), torch.randn(8, 5))
    loss.backward()
    assert aligner.log_scale.grad is not None and aligner.log_scale.grad != 0
    with torch.no_grad():
        aligner.log_scale.fill_(10.0)
    assert float(aligner.logit_scale.detach()) == pytest.approx(100.0)


def test_contrastive_training_aligns_two_views_of_the_same_items():
    torch.manual_seed(0)
    latent = torch.randn(256, 6)
    view_a = latent @ torch.randn(6, 10)  # two different linear "sensors" of one latent
    view_b = torch.tanh(latent @ torch.randn(6, 12))
    aligner = ContrastiveAligner(
        nn.Linear(10, 16), nn.Sequential(nn.Linear(12, 32), nn.GELU(), nn.Linear(32, 16))
    )
    with torch.no_grad():
        before = recall_at_k(aligner.embed_a(view_a[200:]), aligner.embed_b(view_b[200:]))[1]
    optimizer = torch.optim.Adam(aligner.parameters(), lr=3e-3)
    for _ in range(150):
        idx = torch.randint(0, 200, (64,))
        loss = aligner(view_a[idx], view_b[idx])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        after = recall_at_k(aligner.embed_a(view_a[200:]), aligner.embed_b(view_b[200:]), ks=(1, 5))
    assert after[1] > 0.5 and after[1] > before + 0.3 and after[5] >= after[1], (before, after)
    assert math.isfinite(float(aligner.logit_scale.detach()))


def test_seed_name_multimodal_fusion_fuse():
    from pimoe.compat import MultiModalFusion

    fusion = MultiModalFusion(
        FusionConfig({"image": 12, "text": 6}, "cross_attention", d_model=8, heads=2)
    )
    out = fusion.fuse({"image": torch.randn(3, 5, 12), "text": torch.randn(3, 6)})
    assert out.shape == (3, 8)
    assert MultiModalFusion(modalities={"a": 2, "b": 2}, method="concat", d_model=4).fuse(
        {"a": torch.randn(2, 2), "b": torch.randn(2, 2)}
    ).shape == (2, 4)
    with pytest.raises(ValueError):
        MultiModalFusion(FusionConfig({"a": 2, "b": 2}), method="concat")

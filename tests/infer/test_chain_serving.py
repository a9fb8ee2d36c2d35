"""The computation chain served on the OpenAI routes: answers (streamed or not) carry the
arithmetic engine's exact result, and equal the chain's own answer."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")
pytest.importorskip("uvicorn")
sys.path.insert(0, str(Path(__file__).parent))

from live_server import LiveServer  # noqa: E402

from pimoe.bench.tiny_llama import save_tiny_llama, tiny_byte_llama  # noqa: E402
from pimoe.compute import ChainConfig, ComputationChain  # noqa: E402
from pimoe.compute.llm_router import TokenRouter  # noqa: E402
from pimoe.compute.operand_head import OperandHead  # noqa: E402
from pimoe.infer.chain_serving import ChainEngine, open_chain  # noqa: E402
from pimoe.infer.server import create_app  # noqa: E402
from pimoe.models import load_pretrained  # noqa: E402

QUESTION = "Tom packs 1234 boxes of 5678 apples and eats 91 apples. How many apples are left?"


@pytest.fixture(scope="module")
def chain_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A chain on a tiny random Llama whose router always hands off (zero weights: probability
    0.5 above a 0.4 threshold), saved as ``pimoe chain train --out`` saves one."""
    torch.manual_seed(0)
    tmp = tmp_path_factory.mktemp("chain")
    model, tokenizer = tiny_byte_llama(max_position_embeddings=1024)
    folder = save_tiny_llama(tmp / "llama", tokenizer, model)
    model, tokenizer = load_pretrained(str(folder), progress=False)
    hidden = int(model.config.hidden_size)
    router, head = TokenRouter(2 * hidden, 8), OperandHead(2 * hidden, 8)
    with torch.no_grad():
        for p in router.parameters():
            p.zero_()
    config = ChainConfig(
        base_model=str(folder),
        prefix="",
        layers=(1, 2),
        feature_dim=2 * hidden,
        router_hidden=8,
        head_hidden=8,
        threshold=0.4,
    )
    ComputationChain(model, tokenizer, router, head, config).save(tmp / "chain")
    return tmp / "chain"


@pytest.fixture(scope="module")
def served(chain_dir: Path) -> Iterator[tuple[openai.OpenAI, ChainEngine]]:
    engine = open_chain(chain_dir)
    with LiveServer(create_app({}, generators={"chain": engine})) as http:
        port = http.base_url.port
        yield (
            openai.OpenAI(
                base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0, timeout=60
            ),
            engine,
        )


def test_answers_carry_the_exact_result(served: tuple[openai.OpenAI, ChainEngine]) -> None:
    client, engine = served
    reference = engine.chain.run(QUESTION, 16)
    assert reference.expression  # the router handed off
    exact = engine.chain.engine.compute(reference.expression)
    assert exact in reference.text
    whole = client.completions.create(model="chain", prompt=QUESTION, max_tokens=16)
    streamed = "".join(
        c.choices[0].text
        for c in client.completions.create(
            model="chain", prompt=QUESTION, max_tokens=16, stream=True
        )
    )
    chat = client.chat.completions.create(
        model="chain",
        max_tokens=16,
        messages=[
            {"role": "system", "content": "Be exact."},
            {"role": "user", "content": QUESTION},
        ],
    )
    chunks = list(
        client.chat.completions.create(
            model="chain",
            max_tokens=16,
            stream=True,
            messages=[{"role": "user", "content": QUESTION}],
        )
    )
    assert whole.choices[0].text == streamed == chat.choices[0].message.content == reference.text
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == reference.text
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")
    assert whole.usage.completion_tokens == reference.generated_tokens


def test_chain_refuses_sampling_and_is_listed(served: tuple[openai.OpenAI, ChainEngine]) -> None:
    client, _ = served
    with pytest.raises(openai.BadRequestError, match="greedily"):
        client.completions.create(model="chain", prompt=QUESTION, temperature=0.7)
    assert [m.id for m in client.models.list().data] == ["chain"]
    health = httpx.get(str(client.base_url).replace("/v1/", "/healthz")).json()
    assert health["models"] == {"chain": "chain"}

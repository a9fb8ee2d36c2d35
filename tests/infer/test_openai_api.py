"""The OpenAI generation routes, driven by the official ``openai`` client over loopback HTTP."""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import torch

openai = pytest.importorskip("openai")
sys.path.insert(0, str(Path(__file__).parent))
from live_server import LiveServer  # noqa: E402

from pimoe.infer.generation import GenerationEngine, SamplingParams  # noqa: E402
from pimoe.infer.lm_models import (  # noqa: E402
    HFGenerationModel,
    PiMoEGenerationModel,
)
from pimoe.infer.server import create_app  # noqa: E402
from pimoe.moe.config import MoEConfig  # noqa: E402
from pimoe.moe.model import LMConfig, PiMoELM  # noqa: E402

CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is a list?"}]


def _client(http: httpx.Client, key: str = "unused") -> openai.OpenAI:
    return openai.OpenAI(
        base_url=f"http://127.0.0.1:{http.base_url.port}/v1", api_key=key, max_retries=0, timeout=30
    )


@pytest.fixture(scope="module")
def server(tiny_hf: HFGenerationModel) -> Iterator[tuple[httpx.Client, GenerationEngine]]:
    engine = GenerationEngine(tiny_hf, max_batch_size=4, max_queue=1)
    app = create_app({}, generators={"tiny": engine})  # type: ignore[dict-item]
    with LiveServer(app) as http:
        yield http, engine


def test_completion_stream_and_usage(
    server: tuple[httpx.Client, GenerationEngine], tiny_hf: HFGenerationModel
) -> None:
    http, engine = server
    client = _client(http)
    assert [m.id for m in client.models.list().data] == ["tiny"]
    prompt = "The with statement"
    whole = client.completions.create(model="tiny", prompt=prompt, max_tokens=12, temperature=0)
    expected = engine.generate(tiny_hf.encode(prompt), SamplingParams(max_tokens=12, temperature=0))
    assert whole.choices[0].text == expected.text and whole.choices[0].finish_reason == "length"
    assert (whole.usage.prompt_tokens, whole.usage.completion_tokens, whole.usage.total_tokens) == (
        len(tiny_hf.encode(prompt)),
        12,
        len(tiny_hf.encode(prompt)) + 12,
    )
    chunks = list(
        client.completions.create(
            model="tiny",
            prompt=prompt,
            max_tokens=12,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert "".join(c.choices[0].text for c in chunks if c.choices) == expected.text
    assert (
        chunks[-2].choices[0].finish_reason == "length" and chunks[-1].usage.completion_tokens == 12
    )
    ids = client.completions.create(
        model="tiny", prompt=tiny_hf.encode(prompt), max_tokens=12, temperature=0
    )
    assert ids.choices[0].text == expected.text  # token ids as the prompt
    with http.stream(
        "POST",
        "/v1/completions",
        json={"model": "tiny", "prompt": prompt, "max_tokens": 3, "stream": True},
    ) as r:
        lines = [line for line in r.iter_lines() if line]
    assert r.headers["content-type"].startswith("text/event-stream") and lines[-1] == "data: [DONE]"
    assert all(line.startswith("data: ") for line in lines)


def test_chat_uses_the_template(
    server: tuple[httpx.Client, GenerationEngine], tiny_hf: HFGenerationModel
) -> None:
    http, engine = server
    client = _client(http)
    reply = client.chat.completions.create(
        model="tiny", messages=CHAT, max_tokens=10, temperature=0, seed=1
    )
    prompt = tiny_hf.tokenizer.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=True)[
        "input_ids"
    ]
    expected = engine.generate(list(prompt), SamplingParams(max_tokens=10, temperature=0))
    assert (
        reply.choices[0].message.role == "assistant"
        and reply.choices[0].message.content == expected.text
    )
    assert reply.usage.prompt_tokens == len(prompt) and reply.object == "chat.completion"
    chunks = list(
        client.chat.completions.create(
            model="tiny", messages=CHAT, max_tokens=10, temperature=0, stream=True
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == expected.text
    assert chunks[-1].choices[0].finish_reason == "length"
    sampled = [
        client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=10, seed=3)
        .choices[0]
        .message.content
        for _ in range(2)
    ]
    assert sampled[0] == sampled[1]  # the seed makes sampling reproducible


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"n": 2}, "n"),
        ({"logprobs": 2}, "logprobs"),
        ({"temperature": "1"}, "temperature"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"top_p": 1.5}, "top_p"),
        ({"prompt": "a" * 2000}, "prompt"),
    ],
)
def test_bad_requests_are_400_naming_the_field(
    server: tuple[httpx.Client, GenerationEngine], extra: dict[str, object], param: str
) -> None:
    client = _client(server[0])
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(**{"model": "tiny", "prompt": "a", "max_tokens": 2, **extra})  # type: ignore[call-overload]
    assert info.value.body["param"] == param and param in info.value.message


def test_unknown_model_is_404(server: tuple[httpx.Client, GenerationEngine]) -> None:
    client = _client(server[0])
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="x" * 10_000, messages=CHAT)
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("nope")


def test_full_queue_is_429_and_disconnect_cancels(
    server: tuple[httpx.Client, GenerationEngine], tiny_hf: HFGenerationModel
) -> None:
    http, engine = server
    client = _client(http)
    gate, started = threading.Event(), threading.Event()
    prompt = tiny_hf.encode("x")

    def hold(event: object) -> None:  # runs on the engine's worker: holds it mid-step
        started.set()
        gate.wait(10)

    busy = [engine.submit(prompt, SamplingParams(max_tokens=200), hold)]
    assert started.wait(10)
    busy.append(
        engine.submit(prompt, SamplingParams(max_tokens=200), hold)
    )  # waits: the queue (1) is full
    deadline = time.monotonic() + 10
    try:
        with pytest.raises(openai.RateLimitError):
            client.completions.create(model="tiny", prompt="a", max_tokens=2)
    finally:
        for ticket in busy:
            ticket.cancel()
        gate.set()
    while (engine.running or engine.queued) and time.monotonic() < deadline:
        time.sleep(0.01)
    before = engine.stats.tokens
    with http.stream(
        "POST",
        "/v1/completions",
        json={"model": "tiny", "prompt": "x", "max_tokens": 240, "stream": True},
    ) as r:
        next(r.iter_lines())  # one chunk, then hang up
    while engine.running and time.monotonic() < deadline:
        time.sleep(0.01)
    assert engine.running == 0 and engine.stats.tokens - before < 240


def test_api_key_and_pimoe_lm(tiny_hf: HFGenerationModel) -> None:
    torch.manual_seed(0)
    lm = PiMoELM(
        LMConfig(
            block_size=64,
            n_layer=2,
            n_head=2,
            d_model=32,
            moe=MoEConfig(num_experts=4, top_k=2, ffn_dim=32),
        )
    )
    app = create_app({"lm": lm}, generators={"lm": PiMoEGenerationModel(lm)}, api_key="s3cret")
    with LiveServer(app) as http:
        with pytest.raises(openai.AuthenticationError):
            _client(http, "wrong").completions.create(model="lm", prompt="a", max_tokens=2)
        client = _client(http, "s3cret")
        text = (
            client.completions.create(model="lm", prompt="hello", max_tokens=8, temperature=0)
            .choices[0]
            .text
        )
        expected = lm.generate(torch.tensor([list(b"hello")]), 8, temperature=0)[0, 5:].tolist()
        assert text == bytes(expected).decode("utf-8", errors="replace")
        infer = http.post(
            "/v1/infer",
            json={"model": "lm", "text": "hello", "return_logits": False},
            headers={"authorization": "Bearer s3cret"},
        )
        assert (
            infer.status_code == 200 and infer.json()["next_token_id"] == expected[0]
        )  # /v1/infer stays
        metrics = http.get("/metrics", headers={"authorization": "Bearer s3cret"}).text
        assert 'pimoe_generated_tokens_total{model="lm"} 8.0' in metrics


def test_chunked_prefill_served_gives_the_unchunked_text(
    server: tuple[httpx.Client, GenerationEngine], tiny_hf: HFGenerationModel
) -> None:
    from pimoe.data import load_pydoc_text

    long = tiny_hf.decode(tiny_hf.encode(load_pydoc_text()[:3000].decode("utf-8", "ignore"))[:150])
    expected = server[1].generate(tiny_hf.encode(long), SamplingParams(max_tokens=8, temperature=0))
    app = create_app(
        {},
        generators={"chunked": tiny_hf},
        max_batch_size=4,
        max_num_batched_tokens=16,
        enable_chunked_prefill=True,
    )
    with LiveServer(app) as http:
        client = _client(http)
        out = client.completions.create(model="chunked", prompt=long, max_tokens=8, temperature=0)
        engine = app.state.generation["chunked"]
        assert engine.stats.prefill_chunks >= 150 // 16  # the prompt really was chunked
    assert (
        out.choices[0].text == expected.text and out.usage.prompt_tokens == expected.prompt_tokens
    )

"""Requests a hostile or careless client sends: each is a 4xx naming the problem, never a 500."""

from __future__ import annotations

import json
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient

sys.path.insert(0, str(Path(__file__).parent))
from live_server import LiveServer

from pimoe.infer.lm_models import PiMoEGenerationModel
from pimoe.infer.openai_api import TOKENIZE_AT_ONCE
from pimoe.infer.sampling import MAX_STOP_CHARS, SamplingParams, choose_tokens
from pimoe.infer.sequence import safe_end
from pimoe.infer.served import ServedModel
from pimoe.infer.server import create_app


@pytest.fixture(scope="module")
def client(tiny_pimoe: PiMoEGenerationModel) -> Iterator[TestClient]:
    torch.manual_seed(0)
    app = create_app(
        {"t": ServedModel.tensor(torch.nn.Linear(4, 2), (4,))}, generators={"pm": tiny_pimoe}
    )
    with TestClient(app, raise_server_exceptions=False) as c:
        yield c


def _post(client: TestClient, path: str, body: str) -> tuple[int, dict[str, object]]:
    r = client.post(path, content=body, headers={"content-type": "application/json"})
    return r.status_code, r.json()["error"] if r.status_code >= 400 else r.json()


@pytest.mark.parametrize("seed", [2**63, -(2**63) - 1, 10**30])
def test_a_seed_beyond_64_bits_is_400_naming_seed(client: TestClient, seed: int) -> None:
    status, error = _post(
        client,
        "/v1/completions",
        f'{{"model": "pm", "prompt": "hi", "max_tokens": 2, "seed": {seed}}}',
    )
    assert status == 400 and error["param"] == "seed" and "64-bit" in str(error["message"])


def test_64_bit_seeds_are_served() -> None:
    assert SamplingParams(seed=2**63 - 1).seed == 2**63 - 1
    assert SamplingParams(seed=-(2**63)).seed == -(2**63)


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_deeply_nested_json_is_400_not_500(client: TestClient, path: str) -> None:
    status, error = _post(client, path, '{"a":' * 100_000 + "1" + "}" * 100_000)
    assert status == 400 and "nested too deeply" in str(error["message"])


def test_a_duplicate_key_is_400_naming_it(client: TestClient) -> None:
    status, error = _post(
        client, "/v1/completions", '{"model": "pm", "prompt": "a", "prompt": "b", "max_tokens": 1}'
    )
    assert status == 400 and error["param"] == "prompt" and "twice" in str(error["message"])
    body = '{"model": "pm", "messages": [{"role": "user", "role": "system", "content": "x"}]}'
    status, error = _post(client, "/v1/chat/completions", body)
    assert status == 400 and error["param"] == "role"
    status, _ = _post(client, "/v1/completions", '{"model": "pm", "prompt": "a", "max_tokens": 1}')
    assert status == 200  # the server still serves


@pytest.mark.parametrize("depth", [3, 500, 900])
def test_over_nested_inputs_are_422_not_500(client: TestClient, depth: int) -> None:
    body = '{"model": "t", "inputs": ' + "[" * depth + "1" + "]" * depth + "}"
    status, error = _post(client, "/v1/infer", body)
    assert status == 422 and "shape [4]" in str(error["message"])
    status, ok = _post(client, "/v1/infer", '{"model": "t", "inputs": [[1, 2, 3, 4]]}')
    assert status == 200 and ok["shape"] == [1, 2]


def test_a_misspelt_infer_field_is_422_naming_it(client: TestClient) -> None:
    status, error = _post(
        client, "/v1/infer", '{"model": "t", "inputs": [1, 2, 3, 4], "return_logit": false}'
    )
    assert status == 422 and error["param"] == "body.return_logit"


def test_a_stop_string_over_the_limit_is_400_naming_stop(client: TestClient) -> None:
    body = {"model": "pm", "prompt": "hi", "max_tokens": 2, "stop": ["x" * (MAX_STOP_CHARS + 1)]}
    status, error = _post(client, "/v1/completions", json.dumps(body))
    assert (
        status == 400 and error["param"] == "stop" and str(MAX_STOP_CHARS) in str(error["message"])
    )
    body["stop"] = ["x" * MAX_STOP_CHARS]
    assert _post(client, "/v1/completions", json.dumps(body))[0] == 200


def test_holding_back_a_stop_prefix_looks_only_as_far_back_as_the_text() -> None:
    start = time.perf_counter()
    assert safe_end("abx", ("x" * 300_000,)) == 2  # was quadratic in the stop's length: seconds
    assert time.perf_counter() - start < 0.5
    assert safe_end("ab", ("bcd", "xyz")) == 1 and safe_end("abc", ("abcd",)) == 0


def test_tokenizing_a_prompt_does_not_stall_other_clients(
    tiny_pimoe: PiMoEGenerationModel,
) -> None:
    """While one prompt is being tokenized (a huge one takes seconds), the event loop serves
    others: the tokenizer below blocks until /healthz has answered, so tokenizing on the loop
    itself would time the health check out."""
    entered, release = threading.Event(), threading.Event()

    class BlockingTokenizer(PiMoEGenerationModel):
        def encode(self, text: str) -> list[int]:
            entered.set()
            release.wait(timeout=30)
            return super().encode(text)

    app = create_app({}, generators={"slow": BlockingTokenizer(tiny_pimoe.model)})
    with LiveServer(app) as http:
        body = {"model": "slow", "prompt": "hi", "max_tokens": 1}
        worker = threading.Thread(
            target=http.post, args=("/v1/completions",), kwargs={"json": body}
        )
        worker.start()
        try:
            assert entered.wait(timeout=30)  # the prompt is being tokenized now
            assert http.get("/healthz", timeout=10).status_code == 200
        finally:
            release.set()
            worker.join()


def test_at_most_two_prompts_are_tokenized_at_once(tiny_pimoe: PiMoEGenerationModel) -> None:
    active, most = 0, 0
    lock = threading.Lock()

    class SlowToTokenize(PiMoEGenerationModel):
        def encode(self, text: str) -> list[int]:
            nonlocal active, most
            with lock:
                active += 1
                most = max(most, active)
            time.sleep(0.3)
            with lock:
                active -= 1
            return super().encode(text)

    app = create_app({}, generators={"slow": SlowToTokenize(tiny_pimoe.model)})
    with LiveServer(app) as http:
        body = {"model": "slow", "prompt": "hi", "max_tokens": 1}
        workers = [
            threading.Thread(target=http.post, args=("/v1/completions",), kwargs={"json": body})
            for _ in range(5)
        ]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
    assert most == TOKENIZE_AT_ONCE == 2  # each huge prompt holds its token ids until refused


@pytest.mark.parametrize(
    "sampling", [{"temperature": 1e-40}, {"temperature": 5e-324}, {"top_p": 1e-300}]
)
def test_a_vanishing_temperature_or_top_p_decodes_greedily_not_500(
    client: TestClient, sampling: dict[str, float]
) -> None:
    """Before: temperature 1e-40 turned the logits into inf - inf = NaN and top_p 1e-300 dropped
    every token, so sampling raised and the step failed (a 500 for every request in the batch)."""
    body = {"model": "pm", "prompt": "hi", "max_tokens": 4, "seed": 1}
    greedy = _post(client, "/v1/completions", json.dumps({**body, "temperature": 0}))
    status, answer = _post(client, "/v1/completions", json.dumps({**body, **sampling}))
    assert status == 200, answer
    assert answer["choices"] == greedy[1]["choices"]  # type: ignore[index]


def test_one_rows_extreme_sampling_does_not_fail_the_batch() -> None:
    logits = torch.tensor([[3e38, -3e38, 0.0], [1.0, 5.0, float("-inf")], [0.0, 2.0, 1.0]])
    params = [SamplingParams(temperature=1e-45), SamplingParams(), SamplingParams(top_p=1e-30)]
    generators = [torch.Generator().manual_seed(i) for i in range(3)]
    tokens = choose_tokens(logits, params, generators)  # type: ignore[arg-type]
    assert tokens[0] == 0 and tokens[1] in (0, 1) and tokens[2] == 1


def test_max_tokens_is_checked_when_max_completion_tokens_is_given(client: TestClient) -> None:
    body = {"model": "pm", "messages": [{"role": "user", "content": "a"}]}
    body |= {"max_completion_tokens": 2, "max_tokens": -5}
    status, error = _post(client, "/v1/chat/completions", json.dumps(body))
    assert status == 400 and error["param"] == "max_tokens", error


def test_a_conversation_is_tokenized_once(tiny_pimoe: PiMoEGenerationModel) -> None:
    """Before: every message was tokenized on its own (only to check its text), then the whole
    conversation again: twice the work for an 8 MiB body of 200,000 messages (seconds)."""
    from pimoe.infer.openai_requests import ChatCompletionRequest, chat_prompt

    calls: list[str] = []

    class Counting(PiMoEGenerationModel):
        def encode(self, text: str) -> list[int]:
            calls.append(text)
            return super().encode(text)

    messages = [{"role": "user", "content": f"m{i}"} for i in range(50)]
    req = ChatCompletionRequest.model_validate({"model": "pm", "messages": messages})
    ids = chat_prompt(Counting(tiny_pimoe.model), req)
    assert len(calls) <= 1 and ids == chat_prompt(tiny_pimoe, req)


def test_a_lone_surrogate_in_a_message_is_400_naming_it(client: TestClient) -> None:
    body = '{"model": "pm", "messages": [{"role": "user", "content": "ok"}, '
    body += '{"role": "user", "content": [{"type": "text", "text": "a\\ud800"}]}]}'
    status, error = _post(client, "/v1/chat/completions", body)
    assert status == 400 and error["param"] == "messages.1.content", error

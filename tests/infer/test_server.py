"""The HTTP server, started with uvicorn on a loopback port and called over HTTP with httpx."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from torch import nn

pytest.importorskip("fastapi")
pytest.importorskip("prometheus_client")
httpx = pytest.importorskip("httpx")
uvicorn = pytest.importorskip("uvicorn")

from live_server import LiveServer  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from pimoe.cli import app as cli_app  # noqa: E402
from pimoe.infer.server import ServedModel, create_app  # noqa: E402
from pimoe.moe.config import MoEConfig  # noqa: E402
from pimoe.moe.model import LMConfig, PiMoELM  # noqa: E402

MAX_ELEMENTS = 512


@pytest.fixture(scope="module")
def lm_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    model = PiMoELM(
        LMConfig(
            block_size=32,
            n_layer=2,
            n_head=2,
            d_model=16,
            moe=MoEConfig(num_experts=4, top_k=2, ffn_dim=16),
        )
    )
    path = tmp_path_factory.mktemp("lm") / "model.safetensors"
    model.save(path)
    return path


@pytest.fixture(scope="module")
def reference(lm_path: Path) -> PiMoELM:
    return PiMoELM.load(lm_path).eval()


@pytest.fixture(scope="module")
def linear() -> nn.Linear:
    torch.manual_seed(1)
    return nn.Linear(4, 3)


@pytest.fixture(scope="module")
def tagger() -> nn.Linear:
    torch.manual_seed(2)
    return nn.Linear(4, 2)


class _Boom(nn.Module):
    """Raises on a first element of 0; returns NaN otherwise."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (x[:, 0] == 0).any():
            raise RuntimeError("boom")
        return x * float("nan")


@pytest.fixture(scope="module")
def served(
    lm_path: Path, linear: nn.Linear, tagger: nn.Linear
) -> Iterator[tuple[httpx.Client, object]]:
    app = create_app(
        {
            "lm": lm_path,
            "linear": ServedModel.tensor(linear, (4,)),
            "boom": ServedModel.tensor(_Boom(), (2,)),
            "tagger": ServedModel.tensor(tagger, (None, 4)),
        },
        max_batch_size=32,
        max_wait_ms=20,
        max_request_elements=MAX_ELEMENTS,
    )
    with LiveServer(app) as client:
        yield client, app


@pytest.fixture
def client(served: tuple[httpx.Client, object]) -> httpx.Client:
    return served[0]


def _logits(model: PiMoELM, ids: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        return model(torch.tensor([ids])).logits[0]


def test_healthz(client: httpx.Client) -> None:
    r = client.get("/healthz")
    assert r.status_code == 200
    assert r.json() == {
        "status": "ok",
        "models": {"lm": "lm", "linear": "tensor", "boom": "tensor", "tagger": "tensor"},
        "generation": [],
    }


def test_token_ids_match_direct_forward(client: httpx.Client, reference: PiMoELM) -> None:
    ids = [3, 70, 200, 5, 9]
    r = client.post("/v1/infer", json={"model": "lm", "token_ids": ids})
    assert r.status_code == 200, r.text
    body = r.json()
    expected = _logits(reference, ids)
    assert body["shape"] == [5, 256]
    torch.testing.assert_close(torch.tensor(body["outputs"]), expected, rtol=1e-5, atol=1e-5)
    assert body["next_token_id"] == int(expected[-1].argmax())
    assert body["latency_ms"] > 0 and body["cached"] is False


def test_text_is_utf8_bytes(client: httpx.Client, reference: PiMoELM) -> None:
    text = "héllo"
    r = client.post("/v1/infer", json={"model": "lm", "text": text, "return_logits": False})
    assert r.status_code == 200, r.text
    body = r.json()
    assert "outputs" not in body
    assert body["next_token_id"] == int(_logits(reference, list(text.encode()))[-1].argmax())


@pytest.mark.parametrize(
    "x", [[0.5, -1.0, 2.0, 0.25], [[0.5, -1.0, 2.0, 0.25], [1.0, 0.0, -3.0, 4.5]]]
)
def test_float_tensor_model(client: httpx.Client, linear: nn.Linear, x: list) -> None:
    r = client.post("/v1/infer", json={"model": "linear", "inputs": x})
    assert r.status_code == 200, r.text
    with torch.inference_mode():
        expected = linear(torch.tensor(x))
    assert r.json()["shape"] == list(expected.shape)
    torch.testing.assert_close(torch.tensor(r.json()["outputs"]), expected)


def test_variable_length_tensor_model_is_padded_and_cut(
    served: tuple[httpx.Client, object], tagger: nn.Linear
) -> None:
    client, app = served
    xs = [torch.randn(n, 4).tolist() for n in (1, 3, 5, 2, 4, 6, 1, 2)]
    start = threading.Barrier(len(xs))

    def call(x: list) -> dict:
        start.wait()
        return client.post("/v1/infer", json={"model": "tagger", "inputs": [x]}).json()

    with ThreadPoolExecutor(len(xs)) as pool:
        bodies = list(pool.map(call, xs))
    with torch.inference_mode():
        for x, body in zip(xs, bodies):
            torch.testing.assert_close(torch.tensor(body["outputs"]), tagger(torch.tensor([x])))
    assert app.state.batchers["tagger"].stats.mean_batch_size > 1  # type: ignore[attr-defined]


def test_model_failure_is_500_and_server_keeps_serving(client: httpx.Client) -> None:
    r = client.post("/v1/infer", json={"model": "boom", "inputs": [0.0, 2.0]})
    assert r.status_code == 500 and "RuntimeError: boom" in r.json()["error"]["message"]
    r = client.post("/v1/infer", json={"model": "boom", "inputs": [1.0, 2.0]})
    assert r.status_code == 500 and "NaN" in r.json()["error"]["message"]
    assert client.post("/v1/infer", json={"model": "lm", "token_ids": [1]}).status_code == 200


def test_concurrent_requests_are_batched_and_correct(
    served: tuple[httpx.Client, object], reference: PiMoELM
) -> None:
    client, app = served
    before = app.state.batchers["lm"].stats.batch_size_counts  # type: ignore[attr-defined]
    seqs = [[(7 * i + j) % 256 for j in range(1 + i % 9)] for i in range(32)]
    start = threading.Barrier(32)

    def call(ids: list[int]) -> dict:
        start.wait()
        r = client.post("/v1/infer", json={"model": "lm", "token_ids": ids})
        assert r.status_code == 200, r.text
        return r.json()

    with ThreadPoolExecutor(32) as pool:
        bodies = list(pool.map(call, seqs))
    for ids, body in zip(seqs, bodies):
        torch.testing.assert_close(
            torch.tensor(body["outputs"]), _logits(reference, ids), rtol=1e-4, atol=1e-5
        )
    after = app.state.batchers["lm"].stats.batch_size_counts  # type: ignore[attr-defined]
    new_sizes = {size for size, n in after.items() if n > before.get(size, 0)}
    assert max(new_sizes) > 1, after


@pytest.mark.parametrize(
    ("body", "status", "fragment"),
    [
        ({"model": "nope", "token_ids": [1]}, 404, "unknown model"),
        ({"model": "linear", "inputs": [[1.0, 2.0, 3.0]]}, 422, "shape"),
        ({"model": "linear", "inputs": [[1.0, 2.0], [3.0]]}, 422, "rectangular"),
        ({"model": "linear", "inputs": [["a", "b", "c", "d"]]}, 422, "inputs"),
        ({"model": "linear", "inputs": [[True, 1.0, 2.0, 3.0]]}, 422, "numbers"),
        ({"model": "linear", "inputs": [[0.0] * 4] * (MAX_ELEMENTS // 4 + 1)}, 413, "elements"),
        ({"model": "linear", "token_ids": [1, 2]}, 422, "inputs"),
        ({"model": "lm", "token_ids": [1, 256]}, 422, "token ids"),
        ({"model": "lm", "token_ids": []}, 422, "sequence length"),
        ({"model": "lm", "token_ids": list(range(33))}, 422, "block_size"),
        ({"model": "lm", "token_ids": [1], "text": "a"}, 422, "exactly one"),
        ({"model": "lm", "inputs": [[1.0]]}, 422, "language model"),
        ({"token_ids": [1]}, 422, "model"),
    ],
)
def test_bad_requests_get_json_errors(
    client: httpx.Client, body: dict, status: int, fragment: str
) -> None:
    r = client.post("/v1/infer", json=body)
    assert r.status_code == status, r.text
    assert fragment in r.json()["error"]["message"]
    assert client.get("/healthz").status_code == 200


def test_nan_malformed_json_and_large_body(client: httpx.Client, linear: nn.Linear) -> None:
    headers = {"content-type": "application/json"}
    r = client.post(
        "/v1/infer", content=b'{"model": "linear", "inputs": [[NaN, 1, 2, 3]]}', headers=headers
    )
    assert r.status_code == 422 and "NaN" in r.json()["error"]["message"]
    r = client.post("/v1/infer", content=b'{"model": "linear", "inputs": [[1, 2', headers=headers)
    assert r.status_code == 422 and "invalid request body" in r.json()["error"]["message"]
    r = client.post("/v1/infer", content=b" " * (8 * 2**20 + 1), headers=headers)
    assert r.status_code == 413 and "exceeds" in r.json()["error"]["message"]
    ok = client.post("/v1/infer", json={"model": "linear", "inputs": [[1.0, 2.0, 3.0, 4.0]]})
    assert ok.status_code == 200


def test_metrics(client: httpx.Client) -> None:
    client.post("/v1/infer", json={"model": "lm", "token_ids": [1, 2, 3]})
    client.post("/v1/infer", json={"model": "nope", "token_ids": [1]})
    text = client.get("/metrics").text
    assert 'pimoe_requests_total{model="lm",status="200"}' in text
    assert 'pimoe_requests_total{model="",status="404"}' in text
    assert 'pimoe_request_latency_seconds_count{model="lm"}' in text
    assert 'pimoe_batch_size_bucket{le="1.0",model="lm"}' in text
    assert "pimoe_cache_hit_rate 0.0" in text


def test_cache_hits(lm_path: Path, reference: PiMoELM) -> None:
    app = create_app({"lm": lm_path}, cache_size=8, max_wait_ms=0)
    with LiveServer(app) as client:
        first = client.post("/v1/infer", json={"model": "lm", "text": "abc"}).json()
        second = client.post("/v1/infer", json={"model": "lm", "text": "abc"}).json()
        assert (first["cached"], second["cached"]) == (False, True)
        assert second["outputs"] == first["outputs"]
        assert "pimoe_cache_hit_rate 0.5" in client.get("/metrics").text
    assert app.state.batchers["lm"]._closed  # the lifespan closed the batcher on shutdown


def test_create_app_rejects_bad_models(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="at least one"):
        create_app({})
    bad = tmp_path / "x.safetensors"
    bad.write_bytes(b"not a model")
    with pytest.raises(ValueError, match="safetensors"):
        create_app({"x": bad})
    with pytest.raises(ValueError, match="input_shape"):
        ServedModel.tensor(nn.Linear(2, 2), ())


def test_serve_command(lm_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[object, dict]] = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kwargs: calls.append((app, kwargs)))
    result = CliRunner().invoke(
        cli_app, ["serve", str(lm_path), "--port", "8123", "--max-batch-size", "4"]
    )
    assert result.exit_code == 0, result.output
    ((app, kwargs),) = calls
    assert (kwargs["host"], kwargs["port"], kwargs["timeout_graceful_shutdown"]) == (
        "127.0.0.1",
        8123,
        10.0,
    )
    assert list(app.state.models) == ["model"] and app.state.batchers["model"].max_batch_size == 4
    app.state.batchers["model"].close()
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"junk")
    result = CliRunner().invoke(cli_app, ["serve", str(bad)])
    assert result.exit_code != 0 and "safetensors" in result.output

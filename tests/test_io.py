import json
import os
import signal
import stat
import struct
import subprocess
import sys
import textwrap
import time
import uuid

import pytest
import torch

from pimoe.io import (
    atomic_output,
    atomic_write_bytes,
    atomic_write_text,
    check_safetensors_shapes,
    clean_stale_temps,
    read_safetensors_header,
    tensor_digest,
)


def test_atomic_write_replaces_and_leaves_no_temp(tmp_path) -> None:
    target = tmp_path / "sub" / "out.json"
    atomic_write_text(target, "old")
    atomic_write_text(target, "new")
    assert target.read_text() == "new"
    assert [p.name for p in target.parent.iterdir()] == ["out.json"]
    mask = os.umask(0)
    os.umask(mask)
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~mask


def test_failed_write_keeps_the_old_file(tmp_path) -> None:
    target = tmp_path / "out.bin"
    atomic_write_bytes(target, b"old")
    with pytest.raises(TypeError):
        atomic_write_bytes(target, "not bytes")  # type: ignore[arg-type]
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.bin"]


def _spawn_writer(target, hold: str) -> subprocess.Popen:
    """A process inside ``atomic_output(target)`` that wrote ``hold`` bytes and waits forever."""
    code = textwrap.dedent(f"""
        import sys, time
        from pimoe.io import atomic_output
        with atomic_output({str(target)!r}) as tmp:
            tmp.write_bytes(b"x" * {len(hold)})
            print("ready", flush=True)
            time.sleep(600)
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    return proc


def _temps(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


def test_killed_writers_temps_are_removed_by_the_next_write(tmp_path) -> None:
    target = tmp_path / "model.bin"
    for _ in range(3):
        proc = _spawn_writer(target, "abc")
        proc.send_signal(signal.SIGKILL)  # kill -9 skips every cleanup of the writer
        proc.wait(timeout=30)
    assert len(_temps(tmp_path)) == 1  # each writer removed its killed predecessor's temp
    (tmp_path / ".model.bin.keep").write_bytes(b"not ours")
    (tmp_path / ".model.bin.extra.abcdef.tmp").write_bytes(b"a temp of 'model.bin.extra'")
    atomic_write_bytes(target, b"new")
    assert target.read_bytes() == b"new"
    assert _temps(tmp_path) == [".model.bin.extra.abcdef.tmp"]
    assert (tmp_path / ".model.bin.keep").exists()


def test_a_live_writers_temp_is_kept(tmp_path) -> None:
    target = tmp_path / "model.bin"
    proc = _spawn_writer(target, "abc")
    try:
        held = _temps(tmp_path)
        assert len(held) == 1
        assert clean_stale_temps(tmp_path, "model.bin") == []
        atomic_write_bytes(target, b"other writer")
        assert _temps(tmp_path) == held
    finally:
        proc.kill()
        proc.wait(timeout=30)
    assert [p.name for p in clean_stale_temps(tmp_path, "model.bin")] == held
    assert _temps(tmp_path) == []


def test_unlocked_temps_younger_than_min_age_are_kept(tmp_path) -> None:
    temp = tmp_path / f".out.json.{uuid.uuid4().hex}.tmp"  # a writer that does not lock
    temp.write_bytes(b"partial")
    assert clean_stale_temps(tmp_path, "out.json", min_age_s=3600) == []
    old = time.time() - 7200
    os.utime(temp, (old, old))
    assert clean_stale_temps(tmp_path, "out.json", min_age_s=3600) == [temp]


def test_atomic_output_writes_by_name_and_removes_on_error(tmp_path) -> None:
    target = tmp_path / "t.pt"
    with atomic_output(target) as tmp:
        torch.save({"a": torch.ones(2)}, tmp)
    assert torch.equal(torch.load(target)["a"], torch.ones(2))
    with pytest.raises(RuntimeError, match="boom"), atomic_output(target) as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("boom")
    assert [p.name for p in tmp_path.iterdir()] == ["t.pt"]


def test_tensor_digest_sees_every_change() -> None:
    g = torch.Generator().manual_seed(0)
    state = {"w": torch.randn(4, 3, generator=g), "b": torch.arange(3), "flag": torch.tensor(True)}
    base = tensor_digest(state)
    assert base == tensor_digest({k: state[k].clone() for k in reversed(list(state))})
    assert base == tensor_digest(
        {**state, "w": state["w"].t().contiguous().t()}
    )  # layout does not matter
    nan = state["w"].clone()
    nan[1, 2] = float("nan")
    flipped = state["w"].clone()
    flipped.view(torch.int32)[0, 0] ^= 1  # one bit
    variants = [
        {**state, "w": nan},
        {**state, "w": flipped},
        {**state, "w": state["w"].reshape(3, 4)},
        {**state, "w": state["w"].double()},
        {"W": state["w"], "b": state["b"], "flag": state["flag"]},
        {k: v for k, v in state.items() if k != "flag"},
    ]
    assert len({base, *(tensor_digest(v) for v in variants)}) == len(variants) + 1
    q = torch.quantize_per_tensor(state["w"], 0.1, 0, torch.qint8)
    q2 = torch.quantize_per_tensor(state["w"], 0.2, 0, torch.qint8)
    assert tensor_digest({"q": q}) == tensor_digest({"q": q.clone()}) != tensor_digest({"q": q2})
    with pytest.raises(TypeError, match="'x'"):
        tensor_digest({"x": 1.0})  # type: ignore[dict-item]


def test_safetensors_header_checks_shapes_before_loading(tmp_path) -> None:
    from safetensors.torch import save_file

    path = tmp_path / "m.safetensors"
    save_file({"emb": torch.zeros(256, 8), "b": torch.zeros(8)}, str(path), metadata={"k": "v"})
    assert read_safetensors_header(path) == (
        {"k": "v"},
        {"emb": ("F32", (256, 8)), "b": ("F32", (8,))},
    )
    assert read_safetensors_header(path.read_bytes())[1]["b"] == ("F32", (8,))
    expected = {"emb": (256, 8), "b": (8,), "head": (256, 8)}
    assert check_safetensors_shapes(path, expected, may_be_missing={"head"}) == {"k": "v"}
    with pytest.raises(
        ValueError,
        match=r"m\.safetensors: tensor 'emb' has shape \[256, 8\], expected \[10000000, 8\]",
    ):
        check_safetensors_shapes(
            path, {**expected, "emb": (10_000_000, 8)}, may_be_missing={"head"}
        )
    with pytest.raises(ValueError, match=r"missing tensor\(s\) \['head'\]"):
        check_safetensors_shapes(path, expected)
    with pytest.raises(ValueError, match="unexpected tensor 'b'"):
        check_safetensors_shapes(path, {"emb": (256, 8)})


def _with_header(header: dict, data: bytes) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


@pytest.mark.parametrize(
    "blob, problem",
    [
        (b"", "not a safetensors file"),
        (struct.pack("<Q", 10**12) + b"{}", "header length"),
        (struct.pack("<Q", 4) + b"\xff\xfe{}", "not JSON"),
        (
            _with_header(
                {"w": {"dtype": "F32", "shape": [10**12], "data_offsets": [0, 16]}}, bytes(16)
            ),
            "invalid entry",
        ),
        (
            _with_header({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, bytes(8)),
            "invalid entry",
        ),
        (
            _with_header({"w": {"dtype": "X9", "shape": [4], "data_offsets": [0, 16]}}, bytes(16)),
            "invalid entry",
        ),
        (
            _with_header(
                {"w": {"dtype": "F32", "shape": [-4], "data_offsets": [0, 16]}}, bytes(16)
            ),
            "invalid entry",
        ),
        (_with_header({"w": [1]}, b""), "invalid entry"),
        (struct.pack("<Q", 200_000) + b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
        (_with_header({"w": {"dtype": "F32", "shape": ["x" * 10**6]}}, b""), "invalid entry"),
    ],
)
def test_bad_safetensors_headers_are_value_errors_naming_the_file(tmp_path, blob, problem) -> None:
    path = tmp_path / "bad.safetensors"
    path.write_bytes(blob)
    with pytest.raises(ValueError, match=rf"bad\.safetensors: .*{problem}") as info:
        read_safetensors_header(path)
    assert len(str(info.value)) < 1000  # a crafted header does not make a megabyte message


def test_concurrent_writers_of_one_target_never_remove_each_others_temps(tmp_path) -> None:
    import threading

    target = tmp_path / "shared.bin"
    errors: list[BaseException] = []

    def write(i: int) -> None:
        try:
            for j in range(25):
                atomic_write_bytes(target, f"{i}-{j}".encode() * 1000)
        except BaseException as exc:  # a writer whose temp vanished would fail in os.replace
            errors.append(exc)

    threads = [threading.Thread(target=write, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert errors == []
    assert target.read_bytes() in {f"{i}-24".encode() * 1000 for i in range(4)}
    assert _temps(tmp_path) == []


def test_a_hf_folder_declaring_more_parameters_than_it_stores_is_refused_before_loading(
    tmp_path,
) -> None:
    """A small folder whose config.json declares a huge vocabulary must not reach from_pretrained."""
    import json

    from transformers import BertConfig, BertModel, LlamaConfig, LlamaForCausalLM

    from pimoe.data.minilm import load_minilm
    from pimoe.io import check_hf_folder_fits
    from pimoe.models import load_pretrained

    bert = tmp_path / "bert"
    BertModel(
        BertConfig(
            vocab_size=64,
            hidden_size=16,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=32,
        )
    ).save_pretrained(bert)
    llama = tmp_path / "llama"
    LlamaForCausalLM(
        LlamaConfig(
            vocab_size=64,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=2,
        )
    ).save_pretrained(llama)
    for folder in (bert, llama):
        check_hf_folder_fits(folder)  # honest folders pass
        config = json.loads((folder / "config.json").read_text())
        config["vocab_size"] = 10**12
        (folder / "config.json").write_text(json.dumps(config))
        with pytest.raises(ValueError, match="declares"):
            check_hf_folder_fits(folder)
    with pytest.raises(ValueError, match="declares"):
        load_minilm(bert)
    with pytest.raises(ValueError, match="declares"):
        load_pretrained(str(llama), progress=False)

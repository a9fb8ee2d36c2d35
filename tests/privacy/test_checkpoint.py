import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from pimoe.io import lock_file
from pimoe.privacy.audit import AuditLog
from pimoe.privacy.checkpoint import load_encrypted, save_encrypted
from pimoe.privacy.crypto import IntegrityError, generate_key, load_key, seal


def _state() -> dict[str, torch.Tensor]:
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    state = model.state_dict()
    state["tied"] = state["0.weight"]  # shares storage with 0.weight
    state["steps"] = torch.tensor(7)
    return state


def test_roundtrip_with_key_from_env(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PIMOE_KEY", generate_key().hex())
    state, path = _state(), tmp_path / "ckpt" / "model.enc"
    size = save_encrypted(state, path, load_key())
    assert path.stat().st_size == size
    raw = path.read_bytes()
    assert b"0.weight" not in raw and state["0.weight"].numpy().tobytes()[:16] not in raw
    loaded = load_encrypted(path, load_key())
    assert loaded.keys() == state.keys()
    for name, tensor in state.items():
        assert torch.equal(loaded[name], tensor) and loaded[name].dtype == tensor.dtype
    assert [p.name for p in path.parent.iterdir()] == ["model.enc"]  # no temp file left behind


def test_tampered_truncated_or_wrong_key_fails_and_is_audited(tmp_path) -> None:
    key, path = generate_key(), tmp_path / "model.enc"
    audit = AuditLog(tmp_path / "audit.jsonl")
    save_encrypted(_state(), path, key, audit=audit)
    blob = bytearray(path.read_bytes())
    blob[len(blob) // 2] ^= 0x40
    path.write_bytes(bytes(blob))
    with pytest.raises(IntegrityError, match="model.enc.*failed authentication"):
        load_encrypted(path, key, audit=audit)
    path.write_bytes(bytes(blob[:20]))
    with pytest.raises(IntegrityError, match="truncated"):
        load_encrypted(path, key, audit=audit)
    save_encrypted(_state(), path, key)
    with pytest.raises(IntegrityError):
        load_encrypted(path, generate_key(), audit=audit)
    events = [e["event"] for e in audit.entries()]
    assert events == ["checkpoint_saved"] + ["authentication_failed"] * 3
    assert audit.verify() == 4


def test_a_sealed_blob_from_another_context_is_not_a_checkpoint(tmp_path) -> None:
    key, path = generate_key(), tmp_path / "entry.bin"
    path.write_bytes(seal(key, b"cache entry", b"cache-key-1"))
    with pytest.raises(IntegrityError):
        load_encrypted(path, key)


def test_bad_state_dicts_rejected(tmp_path) -> None:
    with pytest.raises(TypeError, match="non-empty"):
        save_encrypted({}, tmp_path / "x", generate_key())
    with pytest.raises(TypeError, match="not tensors: \\['lr'\\]"):
        save_encrypted({"w": torch.ones(2), "lr": 0.1}, tmp_path / "x", generate_key())
    with pytest.raises(ValueError, match="32 raw bytes"):
        save_encrypted({"w": torch.ones(2)}, tmp_path / "x", b"short")


_SAVER = """
import sys, torch
from pimoe.privacy.checkpoint import save_encrypted
state = {"w": torch.randn(2_000_000)}  # 8 MB: each save spends milliseconds writing its temp file
print("ready", flush=True)
while True:
    save_encrypted(state, sys.argv[1], bytes(32))
"""


def _temps(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


def _kill_mid_write(path: Path) -> list[str]:
    """Start a process that saves ``path`` in a loop and SIGKILL it while a temp file exists."""
    for _ in range(3):  # the kill can land just after a rename, leaving no temp: try again
        child = subprocess.Popen(
            [sys.executable, "-c", _SAVER, str(path)], stdout=subprocess.PIPE, text=True
        )
        try:
            assert child.stdout is not None and child.stdout.readline().strip() == "ready"
            deadline = time.monotonic() + 30
            while not _temps(path.parent) and time.monotonic() < deadline:
                time.sleep(0.001)
            os.kill(child.pid, signal.SIGKILL)
        finally:
            child.kill()
            child.wait(timeout=30)
            child.stdout.close()  # type: ignore[union-attr]
        if _temps(path.parent):
            return _temps(path.parent)
    raise AssertionError("no save was caught mid-write")


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL (POSIX)")
def test_temps_of_a_save_killed_mid_write_are_removed_by_the_next_save(tmp_path) -> None:
    path = tmp_path / "model.enc"
    left = _kill_mid_write(path)
    assert left and all(name.startswith(".model.enc.") for name in left)
    save_encrypted({"w": torch.ones(2)}, path, bytes(32))
    assert [p.name for p in tmp_path.iterdir()] == ["model.enc"]
    assert torch.equal(load_encrypted(path, bytes(32))["w"], torch.ones(2))


def test_load_removes_only_dead_writers_temps_of_its_own_path(tmp_path) -> None:
    path = tmp_path / "model.enc"
    save_encrypted({"w": torch.ones(2)}, path, bytes(32))
    stale = tmp_path / ".model.enc.k1ll3d.tmp"  # a killed save's temp: nobody holds its lock
    others = [
        tmp_path / ".other.enc.abc123.tmp",
        tmp_path / "notes.tmp",
        tmp_path / ".model.enc.tmp",
    ]
    for file in [stale, *others]:  # another target's temp, a user's file, a name outside our scheme
        file.write_bytes(b"x" * 1000)
    live = (
        tmp_path / ".model.enc.live99.tmp"
    )  # a save in progress elsewhere: its writer holds the lock
    with open(live, "wb") as held:
        lock_file(held.fileno())
        load_encrypted(path, bytes(32))
        assert _temps(tmp_path) == sorted(
            [live.name, *(o.name for o in others if o.name.endswith(".tmp"))]
        )
    load_encrypted(path, bytes(32))  # the writer of `live` is gone now
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["model.enc", *(o.name for o in others)]
    )

import pytest
import torch
from torch import nn

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

import base64

import pytest

from pimoe.privacy.crypto import (
    KEY_BYTES,
    IntegrityError,
    generate_key,
    load_key,
    open_sealed,
    seal,
)


def test_roundtrip_and_fresh_nonce() -> None:
    key = generate_key()
    assert len(key) == KEY_BYTES
    a, b = seal(key, b"weights", b"ctx"), seal(key, b"weights", b"ctx")
    assert a != b  # random nonce per seal
    assert a[0] == 1 and len(a) == 1 + 12 + len(b"weights") + 16
    assert open_sealed(key, a, b"ctx") == open_sealed(key, b, b"ctx") == b"weights"
    assert b"weights" not in a


def test_every_flipped_byte_fails_authentication() -> None:
    key = generate_key()
    blob = seal(key, b"some plaintext", b"ad")
    for i in range(len(blob)):
        tampered = bytearray(blob)
        tampered[i] ^= 0x01
        with pytest.raises(IntegrityError):
            open_sealed(key, bytes(tampered), b"ad")


@pytest.mark.parametrize("cut", [0, 5, 28, -1])
def test_truncated_blob_fails(cut: int) -> None:
    key = generate_key()
    blob = seal(key, b"payload")
    with pytest.raises(IntegrityError):
        open_sealed(key, blob[:cut])


def test_wrong_key_and_wrong_associated_data_fail() -> None:
    key = generate_key()
    blob = seal(key, b"payload", b"entry-1")
    with pytest.raises(IntegrityError, match="authentication"):
        open_sealed(generate_key(), blob, b"entry-1")
    with pytest.raises(IntegrityError):
        open_sealed(key, blob, b"entry-2")
    assert issubclass(IntegrityError, ValueError)


def test_bad_key_length_is_value_error_not_integrity_error() -> None:
    with pytest.raises(ValueError, match="32 raw bytes") as info:
        seal(b"short", b"x")
    assert not isinstance(info.value, IntegrityError)


def test_load_key_from_env_hex_and_base64(monkeypatch: pytest.MonkeyPatch) -> None:
    key = generate_key()
    monkeypatch.setenv("PIMOE_KEY", key.hex())
    assert load_key() == key
    monkeypatch.setenv("PIMOE_KEY", base64.b64encode(key).decode())
    assert load_key() == key
    monkeypatch.setenv("OTHER_KEY", " " + key.hex().upper() + "\n")
    assert load_key("OTHER_KEY") == key


@pytest.mark.parametrize(
    "value", ["abcd", "zz" * 32, base64.b64encode(b"x" * 16).decode(), "not base64!"]
)
def test_load_key_rejects_bad_env_values(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv("PIMOE_KEY", value)
    with pytest.raises(ValueError, match=r"\$PIMOE_KEY"):
        load_key()


def test_load_key_missing_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PIMOE_KEY", raising=False)
    with pytest.raises(ValueError, match="no key"):
        load_key()


def test_load_key_from_file(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PIMOE_KEY", raising=False)
    key = generate_key()
    raw, text, bad = tmp_path / "raw.key", tmp_path / "hex.key", tmp_path / "bad.key"
    raw.write_bytes(key)
    text.write_text(key.hex() + "\n")
    bad.write_bytes(b"\xff" * 31)
    assert load_key(path=raw) == key
    assert load_key(path=text) == key
    with pytest.raises(ValueError, match="31 raw bytes"):
        load_key(path=bad)

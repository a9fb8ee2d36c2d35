"""A tampered disk-cache database: no row makes the tier unpickle, read or delete anything."""

from __future__ import annotations

import os
import pickle
import sqlite3
from contextlib import closing
from pathlib import Path

import pytest
import torch

pytest.importorskip("diskcache")
from pimoe.infer.disk import MARKER, DiskTier
from pimoe.infer.disk_entry import CorruptEntry, encode_entry
from pimoe.privacy.crypto import generate_key


class _Evil:
    """Unpickling this creates the file ``path``."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[object, tuple[str, str]]:
        return (Path.write_text, (str(self.path), "pwned"))  # type: ignore[return-value]


def _tier_with(path: Path, key: bytes | None) -> None:
    tier = DiskTier(path, 10**7, encrypt_key=key)
    tier.put("small", encode_entry("small", torch.ones(3), key))
    tier.put("big", encode_entry("big", torch.ones(20_000), key))  # 80 kB: in a value file
    tier.close()


def _sql(path: Path, statement: str, *args: object) -> None:
    with closing(sqlite3.connect(path / "cache.db")) as db:
        db.execute(statement, args)
        db.commit()


@pytest.mark.parametrize("encrypted", [False, True])
def test_a_pickled_value_row_is_dropped_not_unpickled(tmp_path: Path, encrypted: bool) -> None:
    key = generate_key() if encrypted else None
    _tier_with(tmp_path / "c", key)
    marker = tmp_path / "pwned"
    _sql(
        tmp_path / "c",
        "UPDATE Cache SET mode = 4, value = ? WHERE key = 'small'",
        pickle.dumps(_Evil(marker)),
    )
    tier = DiskTier(tmp_path / "c", 10**7, encrypt_key=key)
    try:
        assert tier.get("small") is not None and not marker.exists()  # MISSING, nothing ran
        assert tier.corrupt_entries == 1 and "small" not in tier
        assert tier.get("big") is not None and tier.corrupt_entries == 1  # the rest still reads
    finally:
        tier.close()


def test_a_row_naming_another_file_neither_reads_nor_deletes_it(tmp_path: Path) -> None:
    _tier_with(tmp_path / "c", None)
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    _sql(tmp_path / "c", "UPDATE Cache SET filename = '../victim.txt' WHERE key = 'big'")
    tier = DiskTier(tmp_path / "c", 10**7)
    try:
        tier.get("big")  # unreadable: dropped
        assert tier.corrupt_entries == 1 and "big" not in tier
        tier.clear()
    finally:
        tier.close()
    assert victim.read_text() == "precious"


def test_a_pickled_key_is_refused_on_open(tmp_path: Path) -> None:
    _tier_with(tmp_path / "c", None)
    marker = tmp_path / "pwned"
    _sql(
        tmp_path / "c",
        "UPDATE Cache SET raw = 0, key = ? WHERE key = 'small'",
        pickle.dumps(_Evil(marker)),
    )
    _sql(tmp_path / "c", "DELETE FROM Cache WHERE key = 'big'")  # the probe would stop at it
    os.remove(tmp_path / "c" / MARKER)  # an unmarked folder has its keys probed
    with pytest.raises(CorruptEntry, match="pickled"):
        DiskTier(tmp_path / "c", 10**7)
    assert not marker.exists()

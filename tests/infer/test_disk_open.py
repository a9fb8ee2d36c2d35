"""Opening a disk cache: a key mismatch refuses to open and deletes nothing; an unreadable
cache.db is moved aside; value files of killed writers are removed."""

import logging
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from contextlib import closing
from pathlib import Path

import diskcache
import pytest
import torch

from pimoe.infer import InferenceCache
from pimoe.infer.disk import MARKER, CacheKeyError
from pimoe.privacy.crypto import generate_key

BIG = 20_000  # float32 elements: 80 kB, over diskcache's 32 kB inline limit, so a value file


def _fill(path: Path, key: bytes | None, n: int = 20) -> None:
    with InferenceCache(disk_path=path, encrypt_key=key) as c:
        for i in range(n):
            c.put(f"k{i}", torch.full((4,), float(i)))


def _count(path: Path, key: bytes | None) -> int:
    with InferenceCache(disk_path=path, encrypt_key=key) as c:
        return sum(c.get(f"k{i}") is not None for i in range(20))


@pytest.mark.parametrize("first, then", [("key", "wrong"), ("key", None), (None, "key")])
def test_a_key_mismatch_refuses_to_open_and_deletes_nothing(tmp_path, first, then) -> None:
    keys = {"key": generate_key(), "wrong": generate_key(), None: None}
    _fill(tmp_path, keys[first])
    with pytest.raises(CacheKeyError, match=str(tmp_path)):
        InferenceCache(disk_path=tmp_path, encrypt_key=keys[then])
    assert len(diskcache.Cache(str(tmp_path))) == 20  # before: the wrong opener dropped 20 -> 0
    assert _count(tmp_path, keys[first]) == 20


def test_a_cache_without_marker_is_checked_on_its_entries(tmp_path) -> None:
    key = generate_key()
    _fill(tmp_path, key)
    (tmp_path / MARKER).unlink()  # as written before the marker existed
    with pytest.raises(CacheKeyError, match="none of the 16 entries"):
        InferenceCache(disk_path=tmp_path, encrypt_key=generate_key())
    with pytest.raises(CacheKeyError, match="without an encrypt_key"):
        InferenceCache(disk_path=tmp_path)
    assert (
        _count(tmp_path, key) == 20 and (tmp_path / MARKER).exists()
    )  # the right key re-creates it
    for damaged in ("{not json", "[" * 100_000 + "]" * 100_000):  # the second: too deep
        (tmp_path / MARKER).write_text(damaged)
        with pytest.raises(ValueError, match="pimoe-cache.json: unreadable"):
            InferenceCache(disk_path=tmp_path, encrypt_key=key)


@pytest.mark.parametrize("damage", ["truncated", "not a database"])
def test_an_unreadable_database_is_moved_aside(tmp_path, damage, caplog) -> None:
    _fill(tmp_path, None)
    db = tmp_path / "cache.db"
    data = db.read_bytes()
    damaged = data[: len(data) // 2] if damage == "truncated" else b"hello, not sqlite" * 100
    db.write_bytes(damaged)
    events = []
    with caplog.at_level(logging.WARNING, logger="pimoe.infer.cache"):
        c = InferenceCache(disk_path=tmp_path, audit=lambda e, f: events.append(e))
    with c:
        assert c.get("k1") is None
        c.put("new", torch.ones(2))
        assert torch.equal(c.get("new"), torch.ones(2))
        moved = c._disk.quarantined
    assert moved is not None and Path(moved).name.startswith("cache.db.corrupt-")
    assert Path(moved).read_bytes() == damaged  # kept for a post-mortem, not deleted
    assert any("moved it to" in r.getMessage() for r in caplog.records) and events == [
        "cache.quarantined"
    ]
    with InferenceCache(disk_path=tmp_path) as again:  # the fresh database persists
        assert torch.equal(again.get("new"), torch.ones(2)) and again._disk.quarantined is None


def _value_files(path: Path) -> set[str]:
    return {p.relative_to(path).as_posix() for p in path.glob("*/*/*.val")}


def _referenced(path: Path) -> set[str]:
    with closing(sqlite3.connect(path / "cache.db")) as db:
        return {r[0] for r in db.execute("SELECT filename FROM Cache WHERE filename IS NOT NULL")}


def test_orphaned_value_files_are_removed_when_no_one_else_has_the_cache_open(tmp_path) -> None:
    with InferenceCache(disk_path=tmp_path) as c:
        c.put("big", torch.arange(BIG, dtype=torch.float32))
    kept = _value_files(tmp_path)
    assert len(kept) == 1
    orphan = tmp_path / "ab" / "cd" / ("0" * 28 + ".val")  # a killed writer's file without its row
    orphan.parent.mkdir(parents=True)
    orphan.write_bytes(b"x" * 1000)
    other = tmp_path / "ab" / "notes.txt"
    other.write_text("not a value file")
    with InferenceCache(disk_path=tmp_path) as first:
        orphan2 = tmp_path / "ab" / "cd" / ("1" * 28 + ".val")
        orphan2.write_bytes(b"y")  # may be a live writer's: another tier is open, so it stays
        with InferenceCache(disk_path=tmp_path) as second:
            assert second._disk.orphans_removed == 0 and orphan2.exists()
        assert first._disk.orphans_removed == 1 and not orphan.exists()
        assert torch.equal(first.get("big"), torch.arange(BIG, dtype=torch.float32))
    with InferenceCache(disk_path=tmp_path) as third:
        assert third._disk.orphans_removed == 1 and not orphan2.exists()
    assert _value_files(tmp_path) == kept and other.exists()


_WRITER = textwrap.dedent("""
    import sys, torch
    from pimoe.infer import InferenceCache
    cache = InferenceCache(max_size=1, disk_path=sys.argv[1])
    print("ready", flush=True)
    i = 0
    while True:
        cache.put(f"k{i}", torch.randn(2_000_000)); i += 1  # 8 MB values: files written for a while
""")


@pytest.mark.slow
def test_killed_writers_leave_no_orphans_after_the_next_open(tmp_path) -> None:
    orphans: set[str] = set()
    for attempt in range(20):  # kill -9 until a writer died between its file and its row
        proc = subprocess.Popen(
            [sys.executable, "-c", _WRITER, str(tmp_path)], stdout=subprocess.PIPE, text=True
        )
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        time.sleep(0.3 + 0.11 * attempt)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        orphans = _value_files(tmp_path) - _referenced(tmp_path)
        if orphans:
            break
    if not orphans:  # timing-dependent; the deterministic test above covers the cleanup itself
        pytest.skip("no kill landed between a value file and its row")
    with InferenceCache(disk_path=tmp_path) as c:
        assert c._disk.orphans_removed == len(orphans)
    assert _value_files(tmp_path) == _referenced(tmp_path)

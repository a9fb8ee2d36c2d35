"""Persistent disk tier of :class:`~pimoe.infer.cache.InferenceCache`, on ``diskcache``.

Why diskcache rather than raw sqlite3: it is sqlite underneath (one transaction per write, so a
crash leaves the old entry or the new one), adds what we would otherwise write by hand (a byte
budget with culling, per-entry expiry, thread- and process-safe access, large values in
side files that are written before the row that points at them is committed) and stores
``bytes`` values raw. Its ``Disk`` is narrowed to that (:class:`_RawDisk`), so nothing on disk is
ever unpickled, even from a tampered ``cache.db``, and a row cannot make the tier read or delete a
file outside its value files.

Each entry is a value bound to its key, checksummed or sealed (:mod:`pimoe.infer.disk_entry`).

Opening a folder (files next to diskcache's ``cache.db``):
- ``pimoe-cache.json`` records whether the entries are encrypted and, if so, a value sealed with
  the key. Opening with a wrong key, without the key of an encrypted cache, or with a key for a
  plain one raises :class:`CacheKeyError` and leaves every entry in place. A folder from before
  this file existed is checked on its entries instead (one that opens suffices).
- ``.pimoe-cache.lock``: each open tier holds a shared ``flock`` on it. The opener that finds no
  other holder (an exclusive lock succeeds) may repair the folder: a ``cache.db`` that is not a
  readable database is renamed aside (``cache.db.corrupt-<UTC time>``, with its ``-wal``/``-shm``)
  and the tier starts empty with a logged warning; value files that no row points to (left by
  writers killed between writing the file and committing its row) are deleted.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import re
import sqlite3
import time
from collections.abc import Callable, Mapping
from contextlib import closing
from pathlib import Path
from typing import Any

from pimoe.extras import extra_imports
from pimoe.infer.values import MISSING
from pimoe.io import atomic_write_text, lock_file

with extra_imports("serve", "the inference cache's disk tier"):
    import diskcache

from pimoe.infer.disk_entry import CorruptEntry, decode_entry, encode_entry  # after the check
from pimoe.privacy.crypto import IntegrityError, open_sealed, seal

logger = logging.getLogger("pimoe.infer.cache")

AuditHook = Callable[[str, Mapping[str, object]], None]
MARKER = "pimoe-cache.json"
LOCK = ".pimoe-cache.lock"
_MARKER_FORMAT = "pimoe-disk-cache/1"
_KEY_CHECK = b"pimoe disk cache key check"
_PROBE_ENTRIES = 16
_VALUE_FILE = re.compile(
    r"[0-9a-f]{2}/[0-9a-f]{2}/[0-9a-f]{28}\.val"
)  # diskcache's value-file names


class _RawDisk(diskcache.Disk):
    """diskcache's ``Disk`` limited to what the tier writes: str/bytes keys and bytes values,
    stored raw (inline, or in a value file diskcache named). A tampered ``cache.db`` row that
    asks for unpickling (a pickled key or value) or names any other file is refused with
    :class:`CorruptEntry` instead of being unpickled (code execution) or read, and deleting such
    a row removes no file (diskcache would delete the file the row names, wherever it is)."""

    def get(self, key: Any, raw: bool) -> Any:
        if not raw:
            raise CorruptEntry("the entry's key is pickled (the tier never writes one); not loaded")
        return super().get(key, raw)

    def fetch(self, mode: int, filename: str | None, value: Any, read: bool) -> Any:
        if mode == diskcache.core.MODE_RAW or (
            mode == diskcache.core.MODE_BINARY and _VALUE_FILE.fullmatch(filename or "")
        ):
            return super().fetch(mode, filename, value, read)
        raise CorruptEntry(
            f"the entry's value has mode {mode} and file {filename!r}; the tier writes raw bytes "
            "only, so it was not read"
        )

    def remove(self, file_path: str) -> None:
        if _VALUE_FILE.fullmatch(file_path):
            super().remove(file_path)


class CacheKeyError(ValueError):
    """A disk cache opened with a wrong ``encrypt_key``, without the key of an encrypted cache,
    or with a key for a plain one; the cache was not opened and nothing was deleted."""


class DiskTier:
    """Entries on disk under ``path`` (at most ``max_bytes``; the oldest writes are culled first).

    Culling by write age keeps a disk read read-only: diskcache's LRU policy turns every read
    into a sqlite write transaction (about 0.2 ms here). Hot keys live in the memory tier anyway.

    An entry that fails to read is deleted, counted (``integrity_failures`` for AES-GCM
    authentication failures, ``corrupt_entries`` otherwise), logged as a warning, passed to
    ``audit(event, fields)`` if given, and reported as missing. ``ttl_s`` expires entries by
    wall-clock time (diskcache uses ``time.time``).
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        max_bytes: int,
        encrypt_key: bytes | None = None,
        ttl_s: float | None = None,
        audit: AuditHook | None = None,
    ) -> None:
        if not isinstance(max_bytes, int) or max_bytes <= 0:
            raise ValueError(f"disk_max_bytes must be a positive int, got {max_bytes!r}")
        self.path = os.fspath(path)
        self.encrypt_key = encrypt_key
        self.ttl_s = ttl_s
        self.audit = audit
        self.integrity_failures = 0
        self.corrupt_entries = 0
        self.quarantined: str | None = None  # where an unreadable cache.db was moved on open
        self.orphans_removed = 0  # value files without a row, deleted on open
        os.makedirs(self.path, exist_ok=True)
        self._lock_fd = os.open(os.path.join(self.path, LOCK), os.O_RDWR | os.O_CREAT, 0o666)
        try:
            sole = lock_file(
                self._lock_fd, blocking=False
            )  # no other open tier: we may repair the folder
            if not sole:
                lock_file(self._lock_fd, exclusive=False)
            self._store = self._open_store(max_bytes, sole)
            try:
                self._check_key(sole)
                if sole:
                    self.orphans_removed = self._remove_orphans()
            except BaseException:
                self._store.close()
                raise
            if sole:
                lock_file(self._lock_fd, exclusive=False)
        except BaseException:
            os.close(self._lock_fd)
            raise

    def __contains__(self, key: str | bytes) -> bool:
        return key in self._store

    def __len__(self) -> int:
        return len(self._store)

    def get(self, key: str | bytes) -> Any:
        """The stored value of ``key``, or ``MISSING`` (absent, expired, or unreadable and dropped)."""
        try:
            blob = self._store.get(key, default=None, retry=True)
            if blob is None:
                return MISSING
            return decode_entry(key, blob, self.encrypt_key)
        except IntegrityError as exc:
            self.integrity_failures += 1
            self._drop(key, "cache.integrity_failure", str(exc))
        except CorruptEntry as exc:
            self.corrupt_entries += 1
            self._drop(key, "cache.corrupt_entry", str(exc))
        return MISSING

    def put(self, key: str | bytes, blob: bytes) -> None:
        """Store an :func:`encode_entry` blob (atomically replacing any old one)."""
        self._store.set(key, blob, expire=self.ttl_s, retry=True)

    def delete(self, key: str | bytes) -> bool:
        """Delete the entry of ``key``; whether there was one."""
        return bool(self._store.delete(key, retry=True))

    def clear(self) -> None:
        """Delete every entry."""
        self._store.clear(retry=True)

    def close(self) -> None:
        """Close the database handles and release the folder (the entries stay on disk)."""
        self._store.close()
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
            self._lock_fd = -1

    def _open_store(self, max_bytes: int, sole: bool) -> diskcache.Cache:
        """diskcache on the folder; an unreadable ``cache.db`` is moved aside when ``sole``."""

        def open_() -> diskcache.Cache:
            return diskcache.Cache(
                self.path,
                size_limit=max_bytes,
                eviction_policy="least-recently-stored",
                disk=_RawDisk,
            )

        try:
            return open_()
        except sqlite3.DatabaseError as exc:
            if (
                type(exc) is not sqlite3.DatabaseError
            ):  # OperationalError (locked, ...) is not corruption
                raise
            if not sole:
                raise ValueError(
                    f"{self.path}/cache.db is not a readable database ({exc}); another process "
                    "has the cache open, so it was left in place"
                ) from exc
            self.quarantined = _quarantine(Path(self.path) / "cache.db")
            logger.warning(
                "disk cache %s: cache.db is not a readable database (%s); moved it to %s and "
                "started empty",
                self.path,
                exc,
                self.quarantined,
            )
            if self.audit is not None:
                self.audit(
                    "cache.quarantined",
                    {"path": self.path, "reason": str(exc), "moved_to": self.quarantined},
                )
            return open_()

    def _check_key(self, sole: bool) -> None:
        """Raise :class:`CacheKeyError` unless ``encrypt_key`` is the one the entries were written
        with (or both are plain); record it in a new folder."""
        marker = Path(self.path) / MARKER
        if not marker.exists():
            self._probe_entries()
            if sole:
                check = (
                    None
                    if self.encrypt_key is None
                    else seal(self.encrypt_key, _KEY_CHECK, _KEY_CHECK)
                )
                atomic_write_text(
                    marker,
                    json.dumps(
                        {
                            "format": _MARKER_FORMAT,
                            "encrypted": check is not None,
                            "key_check": None
                            if check is None
                            else base64.b64encode(check).decode("ascii"),
                        }
                    ),
                )
            return
        try:
            info = json.loads(marker.read_text(encoding="utf-8"))
            encrypted, check = info["encrypted"], info["key_check"]
            if info["format"] != _MARKER_FORMAT or not isinstance(encrypted, bool):
                raise ValueError(f"format {info['format']!r}")
            sealed = base64.b64decode(check, validate=True) if encrypted else None
        except (OSError, ValueError, KeyError, TypeError, RecursionError) as exc:
            raise ValueError(
                f"{marker}: unreadable ({exc}); delete it to have the entries checked instead"
            ) from exc
        if encrypted and self.encrypt_key is None:
            raise CacheKeyError(
                f"disk cache {self.path} is encrypted: pass its encrypt_key (nothing was opened or deleted)"
            )
        if not encrypted and self.encrypt_key is not None:
            raise CacheKeyError(
                f"disk cache {self.path} holds plain entries: open it without encrypt_key, "
                "or use another folder (nothing was opened or deleted)"
            )
        if sealed is not None and self.encrypt_key is not None:
            try:
                open_sealed(self.encrypt_key, sealed, _KEY_CHECK)
            except IntegrityError:
                raise CacheKeyError(
                    f"disk cache {self.path} was written with another encrypt_key "
                    "(nothing was opened or deleted)"
                ) from None

    def _probe_entries(self) -> None:
        """A folder without a marker: some entry must open with ``encrypt_key`` (if any exist)."""
        tried = 0
        for key in self._store.iterkeys():
            blob = self._store.get(key, default=None, retry=True)
            if not isinstance(key, str) or blob is None:
                continue
            try:
                decode_entry(key, blob, self.encrypt_key)
                return
            except (IntegrityError, CorruptEntry):
                tried += 1
            if tried == _PROBE_ENTRIES:
                break
        if tried:
            how = (
                "with this encrypt_key"
                if self.encrypt_key is not None
                else "without an encrypt_key"
            )
            raise CacheKeyError(
                f"disk cache {self.path}: none of the {tried} entries checked opens {how} "
                "(nothing was opened or deleted)"
            )

    def _remove_orphans(self) -> int:
        """Delete value files no row points to; only called with no other tier open."""
        root = Path(self.path)
        with closing(
            sqlite3.connect(f"{(root.resolve() / 'cache.db').as_uri()}?mode=ro", uri=True)
        ) as db:
            known = {
                row[0]
                for row in db.execute("SELECT filename FROM Cache WHERE filename IS NOT NULL")
            }
        removed = 0
        for path in root.glob("*/*/*.val"):
            name = path.relative_to(root).as_posix()
            if _VALUE_FILE.fullmatch(name) and name not in known:
                path.unlink(missing_ok=True)
                removed += 1
        if removed:
            logger.warning(
                "disk cache %s: deleted %d value file(s) no entry points to", self.path, removed
            )
        return removed

    def _drop(self, key: str | bytes, event: str, reason: str) -> None:
        self._store.delete(key, retry=True)
        logger.warning("dropped disk cache entry %r: %s", key, reason)
        if self.audit is not None:
            self.audit(event, {"key": key, "reason": reason, "path": self.path})


def _quarantine(db: Path) -> str:
    """Rename ``db`` and its ``-wal``/``-shm`` files aside with a UTC timestamp; the new db path."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    target = db.with_name(f"{db.name}.corrupt-{stamp}")
    n = 1
    while target.exists():
        n += 1
        target = db.with_name(f"{db.name}.corrupt-{stamp}-{n}")
    for suffix in ("-wal", "-shm"):
        side = db.with_name(db.name + suffix)
        if side.exists():
            os.replace(side, target.with_name(target.name + suffix))
    os.replace(db, target)
    return str(target)


__all__ = [
    "LOCK",
    "MARKER",
    "MISSING",
    "AuditHook",
    "CacheKeyError",
    "CorruptEntry",
    "DiskTier",
    "decode_entry",
    "encode_entry",
]

"""Append-only audit log of privacy-relevant events (rounds, ε spent, key use, failed authentication).

One JSON object per line::

    {"seq": 3, "ts": "2026-11-24T23:10:00.123456+00:00", "event": "round", ...fields,
     "prev": "<hash of line 2>", "hash": "<hash of this line>"}

Every line is written with one ``write`` in append mode, flushed and fsynced before
:meth:`AuditLog.record` returns. Each ``hash`` covers the line's content and the previous hash
(a hash chain), so :meth:`AuditLog.verify` detects an edited, deleted, inserted or reordered line.
Removing lines from the *end* leaves a valid shorter chain: compare :attr:`AuditLog.head` with a
copy kept elsewhere (``verify(expected_head=...)``). With a ``key`` the hashes are HMAC-SHA256, so
someone who can write the file but lacks the key cannot rebuild a valid chain after an edit;
without it they are plain SHA-256 (tamper-evident against accidents, not against a forger).

Several writers (threads or processes) may share a file: each append holds an exclusive
``flock`` on it while it reads the current last entry and writes the next one, so there is one
chain (POSIX only; without ``fcntl`` opening a log raises OSError). A writer killed in the middle
of a line leaves a *torn tail*: bytes after the last newline. The next writer (or opening the
log) keeps the verified entries, drops those bytes (a warning, :attr:`AuditLog.dropped_bytes`)
and records the loss in the chain itself as a ``torn_tail_dropped`` event. A torn line that is
complete but for its newline and verifies is kept. Damage anywhere else is not a crash but
tampering: it raises IntegrityError and nothing is truncated.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import IO, Any

from pimoe import io as pimoe_io
from pimoe.privacy.crypto import IntegrityError

GENESIS = "0" * 64
RESERVED = ("seq", "ts", "event", "prev", "hash")
TORN_TAIL_EVENT = "torn_tail_dropped"
_CHUNK = 1 << 16


class AuditLog:
    """Append-only, hash-chained JSON-lines log at ``path`` (created if missing; reopened logs continue).

    Args:
        path: the log file.
        key: optional secret for HMAC-SHA256 hashes (bytes); the same key is needed to verify.

    Attributes:
        head: the hash of the last entry this object wrote or read (``GENESIS`` when empty).
        dropped_bytes: bytes of torn tails this object dropped (0 when the log was intact).
    """

    def __init__(self, path: str | os.PathLike[str], key: bytes | None = None) -> None:
        if key is not None and (not isinstance(key, bytes) or len(key) < 16):
            raise ValueError("an audit-log key must be at least 16 bytes")
        self.path = Path(path)
        self._key = key
        self.dropped_bytes = 0
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._locked() as handle:
            self.head = self._tail(handle)[1]

    def _digest(self, body: str) -> str:
        if self._key is None:
            return hashlib.sha256(body.encode()).hexdigest()
        return hmac.new(self._key, body.encode(), hashlib.sha256).hexdigest()

    @contextmanager
    def _locked(self, shared: bool = False) -> Iterator[IO[bytes]]:
        """The log opened for append (or, ``shared``, for reading) under its ``flock``."""
        if pimoe_io.fcntl is None:  # pragma: no cover - Windows
            raise OSError(
                "AuditLog needs fcntl.flock (POSIX) to keep one hash chain across writers"
            )
        with open(self.path, "rb" if shared else "a+b") as handle:
            pimoe_io.lock_file(handle.fileno(), exclusive=not shared, blocking=True)
            yield handle  # closing the file releases the lock

    def _entry(self, raw: bytes, seq: int, prev: str) -> dict[str, Any] | None:
        """``raw`` parsed if it is the verified entry number ``seq`` after hash ``prev``, else None."""
        try:
            entry = json.loads(raw)
            stored = str(entry.pop("hash"))
        except (ValueError, KeyError, AttributeError, TypeError):
            return None
        if entry.get("seq") != seq or entry.get("prev") != prev:
            return None
        if not hmac.compare_digest(self._digest(json.dumps(entry, sort_keys=True)), stored):
            return None
        return {**entry, "hash": stored}

    def _tail(self, handle: IO[bytes]) -> tuple[int, str]:
        """``(seq, hash)`` of the last entry, after repairing a torn tail (exclusive lock held)."""
        size = handle.seek(0, os.SEEK_END)
        end, buffer = size, b""
        while (
            end > 0 and buffer.count(b"\n") < 2
        ):  # enough for the last complete line and what follows
            start = max(0, end - _CHUNK)
            handle.seek(start)
            buffer, end = handle.read(end - start) + buffer, start
        cut = buffer.rfind(b"\n") + 1  # where the torn bytes (after the last newline) start
        complete, torn = buffer[:cut], buffer[cut:]
        seq, head = 0, GENESIS
        if complete:
            last = complete[:-1].rsplit(b"\n", 1)[-1]
            try:
                entry = json.loads(last)
                seq, head = int(entry["seq"]), str(entry["hash"])
            except (ValueError, KeyError, TypeError):
                raise IntegrityError(
                    f"audit log {self.path}: the last complete line is not an audit entry "
                    "(edited or corrupted; not repaired)"
                ) from None
        if not torn:
            return seq, head
        kept = self._entry(torn, seq + 1, head)
        if kept is not None:  # killed just before the newline: the entry itself is whole
            handle.write(b"\n")
            self._sync(handle)
            return kept["seq"], kept["hash"]
        os.ftruncate(handle.fileno(), end + cut)
        self._sync(handle)
        self.dropped_bytes += len(torn)
        warnings.warn(
            f"audit log {self.path}: dropped a torn last line ({len(torn)} bytes) left by an interrupted "
            f"write; the {seq} entries before it are kept",
            RuntimeWarning,
            stacklevel=3,
        )
        return self._append(handle, TORN_TAIL_EVENT, {"dropped_bytes": len(torn)}, seq, head)

    @staticmethod
    def _sync(handle: IO[bytes]) -> None:
        handle.flush()
        os.fsync(handle.fileno())

    def _append(
        self, handle: IO[bytes], event: str, fields: dict[str, Any], seq: int, head: str
    ) -> tuple[int, str]:
        entry = {
            "seq": seq + 1,
            "ts": datetime.now(timezone.utc).isoformat(),
            "event": event,
            **fields,
            "prev": head,
        }
        try:
            body = json.dumps(entry, sort_keys=True, allow_nan=False)
        except (TypeError, ValueError) as error:
            raise TypeError(
                f"audit fields must be JSON-serializable finite values: {error}"
            ) from None
        entry["hash"] = self._digest(body)
        handle.write((json.dumps(entry, sort_keys=True) + "\n").encode("utf-8"))
        self._sync(handle)
        return entry["seq"], entry["hash"]

    def record(self, event: str, **fields: Any) -> str:
        """Append one event with its fields (JSON-serializable); return the entry's hash (the new head).

        The entry follows the file's current last entry, whoever wrote it (the file lock is held).
        """
        if not isinstance(event, str) or not event:
            raise ValueError("an audit event needs a non-empty name")
        clash = sorted(set(fields) & set(RESERVED))
        if clash:
            raise ValueError(f"field names {clash} are reserved by the audit log")
        with self._locked() as handle:
            seq, head = self._tail(handle)
            self.head = self._append(handle, event, fields, seq, head)[1]
        return self.head

    def entries(self) -> list[dict[str, Any]]:
        """All entries, oldest first (not verified: call :meth:`verify` for that)."""
        if not self.path.exists():
            return []
        with self._locked(shared=True) as handle:
            return [json.loads(line) for line in handle if line.strip()]

    def verify(self, expected_head: str | None = None) -> int:
        """Check the whole chain; return the number of entries.

        Raises IntegrityError naming the first bad line (edited, inserted, deleted or reordered
        entries, a wrong key), or if the last hash differs from ``expected_head`` (truncated tail).
        """
        prev, count = GENESIS, 0
        if self.path.exists():
            with self._locked(shared=True) as handle:
                for number, line in enumerate(handle, start=1):
                    try:
                        entry = json.loads(line)
                        stored = entry.pop("hash")
                    except (ValueError, KeyError, AttributeError, TypeError):  # list.pop("hash")
                        raise IntegrityError(
                            f"audit log {self.path} line {number}: not an audit entry"
                        ) from None
                    if entry.get("seq") != number or entry.get("prev") != prev:
                        raise IntegrityError(
                            f"audit log {self.path} line {number}: chain broken (line deleted, inserted or reordered)"
                        )
                    if not hmac.compare_digest(
                        self._digest(json.dumps(entry, sort_keys=True)), str(stored)
                    ):
                        raise IntegrityError(
                            f"audit log {self.path} line {number}: hash mismatch (entry edited or wrong key)"
                        )
                    prev, count = stored, number
        if expected_head is not None and prev != expected_head:
            raise IntegrityError(
                f"audit log {self.path}: last hash is not the expected head (entries removed from the end?)"
            )
        return count

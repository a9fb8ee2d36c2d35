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
One writer process per file: two processes appending to the same file would fork the chain.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import threading
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from pimoe.privacy.crypto import IntegrityError

GENESIS = "0" * 64
RESERVED = ("seq", "ts", "event", "prev", "hash")


class AuditLog:
    """Append-only, hash-chained JSON-lines log at ``path`` (created if missing; reopened logs continue).

    Args:
        path: the log file.
        key: optional secret for HMAC-SHA256 hashes (bytes); the same key is needed to verify.
    """

    def __init__(self, path: str | os.PathLike[str], key: bytes | None = None) -> None:
        if key is not None and (not isinstance(key, bytes) or len(key) < 16):
            raise ValueError("an audit-log key must be at least 16 bytes")
        self.path = Path(path)
        self._key = key
        self._lock = threading.Lock()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._seq, self.head = self._scan_tail()

    def _digest(self, body: str) -> str:
        if self._key is None:
            return hashlib.sha256(body.encode()).hexdigest()
        return hmac.new(self._key, body.encode(), hashlib.sha256).hexdigest()

    def _scan_tail(self) -> tuple[int, str]:
        if not self.path.exists() or self.path.stat().st_size == 0:
            return 0, GENESIS
        last = self.path.read_bytes().rstrip(b"\n").rsplit(b"\n", 1)[-1]
        try:
            entry = json.loads(last)
            return int(entry["seq"]), str(entry["hash"])
        except (ValueError, KeyError, TypeError):
            raise IntegrityError(f"audit log {self.path}: the last line is not an audit entry") from None

    def record(self, event: str, **fields: Any) -> str:
        """Append one event with its fields (JSON-serializable); return the entry's hash (the new head)."""
        if not isinstance(event, str) or not event:
            raise ValueError("an audit event needs a non-empty name")
        clash = sorted(set(fields) & set(RESERVED))
        if clash:
            raise ValueError(f"field names {clash} are reserved by the audit log")
        with self._lock:
            entry = {"seq": self._seq + 1, "ts": datetime.now(timezone.utc).isoformat(), "event": event, **fields,
                     "prev": self.head}
            try:
                body = json.dumps(entry, sort_keys=True, allow_nan=False)
            except (TypeError, ValueError) as error:
                raise TypeError(f"audit fields must be JSON-serializable finite values: {error}") from None
            entry["hash"] = self._digest(body)
            line = json.dumps(entry, sort_keys=True) + "\n"
            with open(self.path, "a", encoding="utf-8") as handle:
                handle.write(line)
                handle.flush()
                os.fsync(handle.fileno())
            self._seq, self.head = entry["seq"], entry["hash"]
            return self.head

    def entries(self) -> list[dict[str, Any]]:
        """All entries, oldest first (not verified: call :meth:`verify` for that)."""
        if not self.path.exists():
            return []
        with open(self.path, encoding="utf-8") as handle:
            return [json.loads(line) for line in handle if line.strip()]

    def verify(self, expected_head: str | None = None) -> int:
        """Check the whole chain; return the number of entries.

        Raises IntegrityError naming the first bad line (edited, inserted, deleted or reordered
        entries, a wrong key), or if the last hash differs from ``expected_head`` (truncated tail).
        """
        prev, count = GENESIS, 0
        if self.path.exists():
            with open(self.path, encoding="utf-8") as handle:
                for number, line in enumerate(handle, start=1):
                    try:
                        entry = json.loads(line)
                        stored = entry.pop("hash")
                    except (ValueError, KeyError, AttributeError):
                        raise IntegrityError(f"audit log {self.path} line {number}: not an audit entry") from None
                    if entry.get("seq") != number or entry.get("prev") != prev:
                        raise IntegrityError(f"audit log {self.path} line {number}: chain broken (line deleted, inserted or reordered)")
                    if not hmac.compare_digest(self._digest(json.dumps(entry, sort_keys=True)), str(stored)):
                        raise IntegrityError(f"audit log {self.path} line {number}: hash mismatch (entry edited or wrong key)")
                    prev, count = stored, number
        if expected_head is not None and prev != expected_head:
            raise IntegrityError(f"audit log {self.path}: last hash is not the expected head (entries removed from the end?)")
        return count

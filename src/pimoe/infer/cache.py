"""``InferenceCache``: a thread-safe memory tier (one replacement policy from
:mod:`pimoe.infer.policies`) in front of an optional persistent, optionally encrypted, disk tier.

Values are tensors or tuples/lists/dicts of tensors (other values are accepted by the memory tier
and stored as they are). With ``copy_values=True`` (the default) ``put`` stores detached clones
and ``get`` returns clones, so neither the caller's later writes nor writes to a returned value
reach the cache; a clone of a 4 KB tensor costs about a microsecond. ``copy_values=False`` stores
and returns detached tensors that alias the cached ones (faster for large values; the caller
promises not to write to them). A disk-tier read always builds a new object, never aliased.
Tensors are always detached: a cache must not keep autograd graphs alive.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Callable, Hashable, Iterator, MutableMapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from pimoe.extras import require
from pimoe.infer.policies import TTLCache, make_policy
from pimoe.infer.values import MISSING, map_tensors

if TYPE_CHECKING:
    from pimoe.infer.disk import AuditHook, DiskTier

_KEY_VERSION = b"pimoe-key-v1"


def _frame(h: Any, tag: bytes, data: bytes | memoryview) -> None:
    h.update(tag + memoryview(data).nbytes.to_bytes(8, "little"))
    h.update(data)


def _feed(h: Any, part: Any) -> None:
    if isinstance(part, torch.Tensor):
        if part.layout != torch.strided:
            raise TypeError(f"make_key hashes dense tensors only, got layout {part.layout}")
        t = part.detach().resolve_conj().resolve_neg().cpu().contiguous()
        _frame(h, b"T", f"{t.dtype}{tuple(t.shape)}".encode())
        _frame(h, b"B", t.reshape(-1).view(torch.uint8).numpy().data if t.numel() else b"")
    elif isinstance(part, (tuple, list)):
        _frame(h, b"(" if isinstance(part, tuple) else b"[", str(len(part)).encode())
        for item in part:
            _feed(h, item)
    elif isinstance(part, dict):
        _frame(h, b"{", str(len(part)).encode())
        for k, v in part.items():
            _feed(h, k)
            _feed(h, v)
    else:
        _frame(h, b"V", repr(part).encode())


def make_key(*parts: Any, namespace: str = "") -> str:
    """A 32-hex-digit xxh3_128 key of ``parts`` under ``namespace`` (e.g. a model name + version).

    A tensor contributes its dtype, shape and bytes (a contiguous CPU copy), so equal tensors give
    equal keys and any change of dtype, shape or content gives another; tuples, lists and dicts
    are hashed item by item (in order); anything else by its ``repr``.
    """
    h = require("xxhash", "serve", "make_key").xxh3_128()
    _frame(h, b"N", _KEY_VERSION + b"\x00" + namespace.encode())
    for part in parts:
        _feed(h, part)
    return str(h.hexdigest())


@dataclass(frozen=True)
class CacheStats:
    """Counters since the cache was created. ``hits`` include ``disk_hits`` and callers of
    ``get_or_compute`` that waited for another thread's computation of the same key; ``misses``
    are ``get`` calls that returned the default and ``get_or_compute`` calls that ran ``fn``."""

    hits: int
    misses: int
    evictions: int
    hit_rate: float
    bytes: int
    entries: int
    disk_hits: int
    integrity_failures: int
    corrupt_entries: int
    expirations: int


class _Pending:
    """One in-flight computation that other callers of the same key wait for."""

    def __init__(self) -> None:
        self.done = threading.Event()
        self.value: Any = None
        self.error: BaseException | None = None


class InferenceCache(MutableMapping[Hashable, Any]):
    """Memory tier (``max_size`` entries, ``max_bytes`` bytes) + optional disk tier.

    Args:
        max_size: most entries in memory.
        max_bytes: most bytes of values in memory (None: no byte bound). A value larger than
            this raises ValueError from ``put``/``get_or_compute`` (it is never silently dropped).
        policy: "lru", "fifo", "lfu", "ttl" (LRU among entries younger than ``ttl_s``) or
            "tinylfu" (W-TinyLFU admission).
        ttl_s: lifetime of an entry in seconds; required by, and only used with, "ttl".
        disk_path: folder of the persistent tier (None: memory only). Reopening the same folder
            sees the entries written before. Writes go to both tiers; a disk hit is promoted.
        disk_max_bytes: byte budget of the disk tier (the oldest writes are culled first).
        encrypt_key: 32-byte AES-256 key; every disk entry is then sealed with AES-GCM, bound to
            its cache key. Requires ``disk_path`` (the memory tier holds plain tensors). A folder
            written with another key (or none, or opened without its key) raises
            :class:`~pimoe.infer.disk.CacheKeyError` and is left untouched.
        audit: called as ``audit(event, fields)`` when a disk entry fails its integrity check or
            an unreadable ``cache.db`` is moved aside (see :mod:`pimoe.infer.disk`).
        timer: clock of the "ttl" policy (inject a fake one in tests).
        copy_values: see the module docstring.

    A ``MutableMapping``, as ``dict`` and cachetools' caches: ``cache[key]`` (``KeyError`` on a
    miss), ``cache[key] = value``, ``del cache[key]`` (both tiers), ``in``, ``len`` and iteration
    (the memory tier's keys), ``pop``, ``setdefault``, ``update``. Keys are any hashable value
    (e.g. :func:`make_key` output, ints, tuples) for the memory tier; with a disk tier they must be
    ``str`` or ``bytes`` (``TypeError`` otherwise). All methods are thread-safe (one lock);
    ``get_or_compute`` runs ``fn`` outside it, once per key however many threads ask.
    """

    def __init__(
        self,
        max_size: int = 1024,
        max_bytes: int | None = None,
        policy: str = "lru",
        ttl_s: float | None = None,
        disk_path: str | os.PathLike[str] | None = None,
        disk_max_bytes: int = 2**30,
        encrypt_key: bytes | None = None,
        audit: AuditHook | None = None,
        timer: Callable[[], float] = time.monotonic,
        copy_values: bool = True,
    ) -> None:
        self._memory = make_policy(policy, max_size, max_bytes, ttl_s=ttl_s, timer=timer)
        if encrypt_key is not None:
            if disk_path is None:
                raise ValueError(
                    "encrypt_key encrypts disk entries; it needs disk_path (the memory tier is plain)"
                )
            if not isinstance(encrypt_key, bytes) or len(encrypt_key) != 32:
                raise ValueError(
                    "encrypt_key must be 32 raw bytes (see pimoe.privacy.crypto.load_key / generate_key)"
                )
        self.policy = policy
        self.copy_values = copy_values
        self._encrypt_key = encrypt_key
        self._disk: DiskTier | None = None
        if disk_path is not None:
            from pimoe.infer.disk import DiskTier

            self._disk = DiskTier(disk_path, disk_max_bytes, encrypt_key, ttl_s, audit)
        self._lock = threading.Lock()
        self._pending: dict[Hashable, _Pending] = {}
        self._hits = self._misses = self._disk_hits = 0

    def __contains__(self, key: object) -> bool:
        """True if ``key`` is in memory or on disk (a disk entry is validated only when read)."""
        self._check_key(key)
        with self._lock:
            disk = self._disk
            return key in self._memory or (
                disk is not None and isinstance(key, (str, bytes)) and key in disk
            )

    def __len__(self) -> int:
        """Entries in the memory tier."""
        with self._lock:
            return len(self._memory)

    def __iter__(self) -> Iterator[Hashable]:
        """The memory tier's keys (a snapshot), in no particular order."""
        with self._lock:
            return iter(self._memory.keys())

    def __getitem__(self, key: Hashable) -> Any:
        """The cached value of ``key``; ``KeyError`` on a miss (counted as one)."""
        value = self.get(key, MISSING)
        if value is MISSING:
            raise KeyError(key)
        return value

    def __setitem__(self, key: Hashable, value: Any) -> None:
        self.put(key, value)

    def __delitem__(self, key: Hashable) -> None:
        """Remove ``key`` from both tiers; ``KeyError`` if neither holds it."""
        self._check_key(key)
        with self._lock:
            found = self._memory.pop(key, MISSING) is not MISSING
            if self._disk is not None and isinstance(key, (str, bytes)):
                found = self._disk.delete(key) or found
        if not found:
            raise KeyError(key)

    def __enter__(self) -> InferenceCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def stats(self) -> CacheStats:
        """A snapshot of the counters."""
        with self._lock:
            lookups = self._hits + self._misses
            disk = self._disk
            return CacheStats(
                hits=self._hits,
                misses=self._misses,
                evictions=self._memory.evictions,
                hit_rate=self._hits / lookups if lookups else 0.0,
                bytes=self._memory.bytes,
                entries=len(self._memory),
                disk_hits=self._disk_hits,
                integrity_failures=disk.integrity_failures if disk is not None else 0,
                corrupt_entries=disk.corrupt_entries if disk is not None else 0,
                expirations=self._memory.expirations if isinstance(self._memory, TTLCache) else 0,
            )

    def get(self, key: Hashable, default: Any = None) -> Any:
        """The cached value of ``key`` (memory, else disk, then promoted), or ``default``."""
        self._check_key(key)
        with self._lock:
            value = self._lookup(key)
            if value is MISSING:
                self._misses += 1
                return default
            self._hits += 1
            return self._out(value)

    def put(self, key: Hashable, value: Any) -> None:
        """Store ``value`` under ``key`` in memory and, if configured, on disk."""
        self._check_key(key)
        stored, blob = self._prepare(key, value)
        with self._lock:
            self._store(key, stored, blob)

    def get_or_compute(self, key: Hashable, fn: Callable[[], Any]) -> Any:
        """The cached value of ``key``, else ``fn()`` stored and returned.

        Concurrent callers of the same missing key wait for the first one's ``fn`` (called once);
        if it raises, they all see its exception and nothing is stored.
        """
        self._check_key(key)
        with self._lock:
            value = self._lookup(key)
            if value is not MISSING:
                self._hits += 1
                return self._out(value)
            pending = self._pending.get(key)
            owner = pending is None
            if pending is None:
                pending = self._pending[key] = _Pending()
                self._misses += 1
            else:
                self._hits += 1
        if not owner:
            pending.done.wait()
            if pending.error is not None:
                raise pending.error
            return self._out(pending.value)
        try:
            value = fn()
            stored, blob = self._prepare(key, value)
            with self._lock:
                self._store(key, stored, blob)
            pending.value = stored
            return value
        except BaseException as exc:
            pending.error = exc
            raise
        finally:
            with self._lock:
                del self._pending[key]
            pending.done.set()

    def clear(self) -> None:
        """Remove every entry from both tiers (the counters are kept)."""
        with self._lock:
            self._memory.clear()
            if self._disk is not None:
                self._disk.clear()

    def close(self) -> None:
        """Release the disk tier's files (the cache stays usable for the memory tier only)."""
        with self._lock:
            if self._disk is not None:
                self._disk.close()
                self._disk = None

    def _lookup(self, key: Hashable) -> Any:
        value = self._memory.get(key, MISSING)
        if value is MISSING and self._disk is not None and isinstance(key, (str, bytes)):
            value = self._disk.get(key)
            if value is not MISSING:
                self._disk_hits += 1
                self._promote(key, value)
        return value

    def _promote(self, key: Hashable, value: Any) -> None:
        with contextlib.suppress(
            ValueError
        ):  # written under a larger max_bytes: serve it from disk only
            self._memory.put(key, value)

    def _prepare(self, key: Hashable, value: Any) -> tuple[Any, bytes | None]:
        stored = map_tensors(
            value, (lambda t: t.detach().clone()) if self.copy_values else torch.Tensor.detach
        )
        size = self._memory.getsizeof(stored)
        if self._memory.max_bytes is not None and size > self._memory.max_bytes:
            raise ValueError(
                f"value of {size} bytes exceeds max_bytes={self._memory.max_bytes}; raise max_bytes or cache smaller values"
            )
        if self._disk is None or not isinstance(key, (str, bytes)):
            return stored, None
        from pimoe.infer.disk_entry import check_storable, encode_entry

        check_storable(stored)
        return stored, encode_entry(key, stored, self._encrypt_key)

    def _store(self, key: Hashable, stored: Any, blob: bytes | None) -> None:
        self._memory.put(key, stored)
        if blob is not None and self._disk is not None and isinstance(key, (str, bytes)):
            self._disk.put(key, blob)

    def _check_key(self, key: object) -> None:
        """``TypeError`` for a key the cache cannot hold: unhashable, or neither str nor bytes
        with a disk tier."""
        try:
            hash(key)
        except TypeError:
            raise TypeError(f"cache keys must be hashable, got {type(key).__name__}") from None
        if self._disk is not None and not isinstance(key, (str, bytes)):
            raise TypeError(
                f"a cache with a disk tier takes str or bytes keys (see make_key), got {type(key).__name__}"
            )

    def _out(self, value: Any) -> Any:
        return map_tensors(value, torch.Tensor.clone) if self.copy_values else value

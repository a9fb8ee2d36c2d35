"""Progress over a loop: a tqdm bar on a terminal, plain periodic lines otherwise (logs, CI)."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")

PLAIN_EVERY_S = 15.0
"""Without a terminal, a line is printed at the start, at most this often, and at the end."""


def track(items: Iterable[T], desc: str, total: int | None = None, enabled: bool = True) -> Iterator[T]:
    """Yield ``items``, showing progress: a tqdm bar when stdout is a terminal, else plain lines
    ``desc: i/total (s)`` on stdout every :data:`PLAIN_EVERY_S` seconds. ``total`` defaults to
    ``len(items)`` when it has one."""
    if total is None and hasattr(items, "__len__"):
        total = len(items)  # type: ignore[arg-type]
    if not enabled:
        yield from items
        return
    if sys.stdout.isatty():
        from tqdm.auto import tqdm

        yield from tqdm(items, desc=desc, total=total, leave=False)
        return
    start = last = time.perf_counter()
    of = f"/{total}" if total is not None else ""
    print(f"{desc}: 0{of}", flush=True)
    count = 0
    for item in items:
        yield item
        count += 1
        now = time.perf_counter()
        if now - last >= PLAIN_EVERY_S:
            print(f"{desc}: {count}{of} ({now - start:.0f} s)", flush=True)
            last = now
    print(f"{desc}: done, {count} in {time.perf_counter() - start:.1f} s", flush=True)

"""Progress of long work: a tqdm bar on a terminal, plain periodic lines otherwise (logs, CI).

``track(items, desc)`` wraps a loop; ``Progress(total, desc)`` is the same display driven by hand,
with named values (``update(loss=2.31)``) shown next to the count.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator
from types import TracebackType
from typing import Any, TypeVar

T = TypeVar("T")

PLAIN_EVERY_S = 15.0
"""Without a terminal, a line is printed at the start, at most this often, and at the end."""


class Progress:
    """Count ``total`` steps of work named ``desc``; a context manager.

    On a terminal this is a tqdm bar (``leave=False``); otherwise a plain line
    ``desc: i/total (s) name value ...`` goes to stdout at the start, at most every
    :data:`PLAIN_EVERY_S` seconds, and at the end. ``enabled=False`` shows nothing.
    """

    def __init__(self, total: int | None, desc: str, enabled: bool = True) -> None:
        self.total, self.desc, self.enabled = total, desc, enabled
        self.count = 0
        self.fields: dict[str, float] = {}
        self._bar: Any = None
        self._start = self._last = time.perf_counter()
        if not enabled:
            return
        if sys.stdout.isatty():
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total, desc=desc, leave=False)
        else:
            self._print(f"{self.count}{self._of}")

    @property
    def _of(self) -> str:
        return f"/{self.total}" if self.total is not None else ""

    def _print(self, text: str) -> None:
        values = "".join(f" {name} {value:.4g}" for name, value in self.fields.items())
        print(f"{self.desc}: {text}{values}", flush=True)

    def update(self, n: int = 1, /, **fields: float) -> None:
        """Advance by ``n`` steps; ``fields`` (e.g. ``loss=2.31``) replace the values shown."""
        self.count += n
        self.fields.update(fields)
        if not self.enabled:
            return
        if self._bar is not None:
            if fields:
                self._bar.set_postfix(
                    {k: f"{v:.4g}" for k, v in self.fields.items()}, refresh=False
                )
            self._bar.update(n)
            return
        now = time.perf_counter()
        if now - self._last >= PLAIN_EVERY_S:
            self._print(f"{self.count}{self._of} ({now - self._start:.0f} s)")
            self._last = now

    def close(self) -> None:
        """End the display (the plain form prints its last line: count and seconds)."""
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.close()
        else:
            self._print(f"done, {self.count} in {time.perf_counter() - self._start:.1f} s")
        self.enabled = False

    def __enter__(self) -> Progress:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def track(
    items: Iterable[T], desc: str, total: int | None = None, enabled: bool = True
) -> Iterator[T]:
    """Yield ``items`` while showing a :class:`Progress` named ``desc``; ``total`` defaults to
    ``len(items)`` when it has one."""
    if total is None and hasattr(items, "__len__"):
        total = len(items)  # type: ignore[arg-type]
    with Progress(total, desc, enabled) as progress:
        for item in items:
            yield item
            progress.update()

"""A bounded queue of requests served by one worker thread: what every text-generation engine
(:class:`~pimoe.infer.generation.GenerationEngine`,
:class:`~pimoe.infer.chain_serving.ChainEngine`) shares.

:meth:`RequestQueue.enqueue` refuses requests once the queue holds ``max_queue`` live ones
(:class:`EngineFull`, HTTP 429; cancelled requests give their place first) or once the engine is
closed (:class:`EngineClosed`, HTTP 503). :meth:`RequestQueue.close` stops taking requests, lets
the worker finish the queued and running ones, and joins it.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from typing import Generic, Protocol, TypeVar


class EngineFull(RuntimeError):
    """The engine's queue is full (answer 429 and let the client retry)."""


class EngineClosed(RuntimeError):
    """The engine was closed and takes no more requests."""


class _Request(Protocol):
    cancelled: bool


R = TypeVar("R", bound=_Request)


class RequestQueue(Generic[R]):
    """Requests of type ``R`` (anything with a ``cancelled`` flag) waiting for one worker thread
    (:meth:`start`). The worker reads :attr:`waiting` under :attr:`cond` and waits on it;
    :attr:`closed` tells it to finish. ``what`` names the engine in errors."""

    def __init__(self, max_queue: int, what: str) -> None:
        if max_queue < 0:
            raise ValueError(f"max_queue must be >= 0, got {max_queue}")
        self.max_queue, self._what = max_queue, what
        self.waiting: deque[R] = deque()
        self.cond = threading.Condition()
        self.closed = False
        self._thread: threading.Thread | None = None

    def start(self, run: Callable[[], None], name: str) -> None:
        """Start the worker thread ``run`` (named ``name``)."""
        self._thread = threading.Thread(target=run, name=name, daemon=True)
        self._thread.start()

    @property
    def queued(self) -> int:
        """Requests waiting for the worker."""
        return len(self.waiting)

    def enqueue(self, request: R) -> None:
        """Append ``request`` and wake the worker; :class:`EngineClosed` after :meth:`close`,
        :class:`EngineFull` when ``max_queue`` live requests already wait."""
        with self.cond:
            if self.closed:
                raise EngineClosed(f"the {self._what} engine is shut down")
            if len(self.waiting) >= self.max_queue:  # gone clients give their place
                self.waiting = deque(r for r in self.waiting if not r.cancelled)
            if len(self.waiting) >= self.max_queue:
                raise EngineFull(
                    f"{len(self.waiting)} requests are already waiting (max_queue={self.max_queue})"
                )
            self.waiting.append(request)
            self.cond.notify()

    def wake(self) -> None:
        """Wake the worker (e.g. a request was cancelled)."""
        with self.cond:
            self.cond.notify()

    def close(self) -> None:
        """Stop taking requests, let the worker finish the queued and running ones, and join it."""
        with self.cond:
            self.closed = True
            self.cond.notify()
        if self._thread is not None:
            self._thread.join()


__all__ = ["EngineClosed", "EngineFull", "RequestQueue"]

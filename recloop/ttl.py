"""A value every serving worker re-reads from a shared store at most every ``ttl_s`` seconds.

The blocklist (``recloop.blocklist.CachedBlocklist``) and the new-item catalogue (``recloop.catalog.CachedCatalog``)
are read on the request path: one read per ``ttl_s`` per worker, so a change reaches every worker and replica
within ``ttl_s``, and a store outage never fails a request (the last value read keeps serving).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any, Generic, TypeVar

logger = logging.getLogger(__name__)
T = TypeVar("T")


class TTLCached(Generic[T]):
    """``read()`` cached for ``ttl_s`` seconds. Thread-safe: one caller at a time re-reads, the others get the
    previous value meanwhile. A failed read keeps the last value (``initial`` before the first success), records
    ``last_error`` and is retried after ``ttl_s``.

    Args:
        read: the store read (any exception is caught and logged).
        initial: the value before the first successful read.
        ttl_s: seconds a value is reused (>= 0; 0 = read on every call).
        clock: monotonic seconds (tests pass a fake).
        what: the value's name in the warning logged on a failed read.
    Raises:
        ValueError: ttl_s < 0.
    """

    def __init__(self, read: Callable[[], T], initial: T, ttl_s: float, clock: Any = time.monotonic,
                 what: str = "value") -> None:
        if ttl_s < 0:
            raise ValueError(f"ttl_s={ttl_s}; expected >= 0")
        self._read, self._value, self.ttl_s, self._clock, self._what = read, initial, ttl_s, clock, what
        self._read_at: float | None = None
        self._lock = threading.Lock()
        self.last_error: str | None = None

    def invalidate(self) -> None:
        """Re-read on the next call (this process changed the store)."""
        self._read_at = None if self._read_at is None else self._read_at - self.ttl_s - 1.0

    def get(self) -> T:
        """The value, at most ``ttl_s`` seconds old (or the last one read, after a failure)."""
        if self._read_at is not None and self._clock() - self._read_at < self.ttl_s:
            return self._value
        if not self._lock.acquire(blocking=self._read_at is None):
            return self._value  # another request is re-reading
        try:
            try:
                self._value = self._read()
                self.last_error = None
            except Exception as err:  # noqa: BLE001 - keep serving the last value; retried after ttl_s
                self.last_error = f"{type(err).__name__}: {err}"[:300]
                logger.warning("%s not read; keeping the last one error=%s", self._what, self.last_error)
            self._read_at = self._clock()
        finally:
            self._lock.release()
        return self._value

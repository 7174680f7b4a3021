"""Exactly-once consumption of the event log by ``seq``, although rows may commit out of order.

On PostgreSQL ``seq`` comes from a sequence when a row is inserted, not when it commits, so seq 10 can
commit after seq 11 (two users' transactions; ``recloop.eventlog``'s docstring warns). A reader that keeps
only "the highest seq consumed" then skips seq 10 for ever. Inserts that roll back, and inserts of a known
``event_id`` (``ON CONFLICT DO NOTHING`` still draws a number), leave permanent holes of the same shape.

The cursor is the standard fix (as change-data-capture readers of outbox tables do): a **watermark** (the
highest seq consumed) plus the **open gaps** below it: the seqs missing when the reader passed them, each
with the time it was first seen missing. Every read takes the rows past the watermark *and* the rows that
filled a gap; a gap stays open for ``grace_s`` after it was first seen (a transaction that commits later
than that is taken to have rolled back), so a late commit is consumed exactly once, and a hole never stalls
the reader. ``grace_s`` must exceed the longest write transaction (the serving feedback transaction is
bounded by the online push deadline, well under a second). SQLite commits in seq order; the same cursor
works there (its gaps are rolled-back inserts only).

``advance`` is pure; ``read_new`` does the read (``flows/loop.py``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

#: Default time a missing seq stays open (s): far above any write transaction of the log.
DEFAULT_GAP_GRACE_S = 600.0
#: At most this many open gaps are kept (the oldest close first): a bound on the state's size.
MAX_OPEN_GAPS = 100_000


def loop_state_path(home: Path) -> Path:
    """Where the continuous loop keeps its cursor (``flows/loop.py``; the monitor reads it too)."""
    return home / "state" / "loop.json"


@dataclass(frozen=True)
class LogCursor:
    """Where a consumer of the event log stands.

    Attributes:
        watermark: the highest seq consumed (0: nothing yet).
        gaps: seq -> ISO time it was first seen missing, for the seqs below ``watermark`` not consumed yet.
    """

    watermark: int = 0
    gaps: dict[int, str] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """The cursor as JSON (``event_log_seq`` is the watermark, the key the loop state always had)."""
        return {"event_log_seq": int(self.watermark), "gaps": {str(s): t for s, t in sorted(self.gaps.items())}}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> LogCursor:
        """Inverse of ``to_json``; a state without ``gaps`` (written before them) has none."""
        return cls(int(data.get("event_log_seq", 0)), {int(s): str(t) for s, t in (data.get("gaps") or {}).items()})

    @property
    def read_from(self) -> int:
        """The seq to read after: below the oldest open gap, else the watermark."""
        return min(self.gaps) - 1 if self.gaps else self.watermark


def advance(cursor: LogCursor, seqs: np.ndarray | list[int], now: datetime,
            grace_s: float = DEFAULT_GAP_GRACE_S) -> tuple[np.ndarray, LogCursor]:
    """Which of the committed ``seqs`` read after ``cursor.read_from`` to consume, and the next cursor. Pure.

    Args:
        cursor: where the consumer stands.
        seqs: the seqs of the rows read (``seq > cursor.read_from``), any order, distinct.
        now: the read's time (tz-aware); new gaps are stamped with it, gaps older than ``grace_s`` close.
        grace_s: how long a missing seq may still commit (>= 0).
    Returns:
        (take, next): a boolean mask over ``seqs`` (the rows past the watermark and those filling an open
        gap), and the cursor after consuming them.
    Raises:
        ValueError: ``grace_s`` < 0.
    """
    if grace_s < 0:
        raise ValueError(f"grace_s={grace_s} must be >= 0")
    arr = np.asarray(seqs, dtype=np.int64)
    take = (arr > cursor.watermark) | np.isin(arr, np.fromiter(cursor.gaps, dtype=np.int64, count=len(cursor.gaps)))
    taken = set(arr[take].tolist())
    gaps = {s: t for s, t in cursor.gaps.items() if s not in taken}
    high = max(taken | {cursor.watermark})
    stamp = pd.Timestamp(now).isoformat()
    if high > cursor.watermark:
        above = np.arange(cursor.watermark + 1, high + 1, dtype=np.int64)
        for s in above[~np.isin(above, arr)].tolist():
            gaps[int(s)] = stamp
    cutoff = pd.Timestamp(now) - pd.Timedelta(seconds=grace_s)
    gaps = {s: t for s, t in gaps.items() if pd.Timestamp(t) > cutoff}
    if len(gaps) > MAX_OPEN_GAPS:
        gaps = dict(sorted(gaps.items())[-MAX_OPEN_GAPS:])
    return take, LogCursor(int(high), gaps)


def read_new(log: Any, cursor: LogCursor, now: datetime, grace_s: float = DEFAULT_GAP_GRACE_S
             ) -> tuple[pd.DataFrame, LogCursor]:
    """The log's rows the cursor has not consumed (``EventLog.since`` after ``cursor.read_from``).

    Args:
        log: a ``recloop.eventlog.EventLog``.
        cursor, now, grace_s: as ``advance``.
    Returns:
        (rows, next): the new rows in seq order with ``seq`` and ``ingested_at``; the cursor after them.
    """
    frame = log.since(after_seq=cursor.read_from, with_seq=True)
    take, nxt = advance(cursor, frame["seq"].to_numpy(), now, grace_s)
    return frame[take].sort_values("seq", kind="stable").reset_index(drop=True), nxt

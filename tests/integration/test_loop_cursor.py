"""Exactly-once consumption of the event log by the loop's cursor (``recloop.cursor``), with concurrent writers.

Four writer threads append events of their own users through ``append_and_recent`` while a reader consumes
with the cursor every few milliseconds. Some writers hold their transaction open for a while after the
insert (their seq is drawn, not committed), so on PostgreSQL larger seqs commit first; some roll back (a
permanent hole); some replay a stored event_id (PostgreSQL draws a seq for it all the same). Every committed
event must be consumed exactly once, and the holes must close after the grace period.
"""

from __future__ import annotations

import random
import threading
import time
from datetime import UTC, datetime

import numpy as np
import pandas as pd
import pytest
from sqlalchemy import select

from recloop.cursor import LogCursor, advance, read_new
from recloop.eventlog import EventLog

WRITERS = 4
PER_WRITER = 40
GRACE_S = 1.0


class _Rollback(RuntimeError):
    pass


def _writer(log: EventLog, w: int, stop_on: list[BaseException]) -> None:
    rng = random.Random(w)
    try:
        for i in range(PER_WRITER):
            row = {"user_id": f"w{w}-u{i % 5}", "item_id": f"i{rng.randrange(50)}", "event_type": "click",
                   "event_id": f"w{w}-e{i}", "timestamp": datetime(2024, 1, 1, tzinfo=UTC)}
            hold_s = rng.choice([0.0, 0.0, 0.005, 0.03])
            fail = rng.random() < 0.05

            def inside(_recent: list[str], hold_s: float = hold_s, fail: bool = fail) -> None:
                time.sleep(hold_s)  # the seq is drawn; others commit larger ones meanwhile
                if fail:
                    raise _Rollback

            try:
                log.append_and_recent(row, 5, while_locked=inside)
            except _Rollback:
                pass
            if rng.random() < 0.1:  # a client retry of a stored event: stored once
                log.append_and_recent(row, 5)
    except BaseException as err:  # noqa: BLE001 - reported by the test
        stop_on.append(err)


def test_every_committed_event_is_consumed_exactly_once(log_db) -> None:
    writers_log = EventLog(log_db.url, table_name=log_db.events_table)
    reader_log = EventLog(log_db.url, table_name=log_db.events_table, create=False)
    errors: list[BaseException] = []
    threads = [threading.Thread(target=_writer, args=(writers_log, w, errors)) for w in range(WRITERS)]
    consumed: list[str] = []
    cursor, late = LogCursor(), 0
    try:
        for t in threads:
            t.start()
        while any(t.is_alive() for t in threads):
            rows, nxt = read_new(reader_log, cursor, datetime.now(UTC), GRACE_S)
            late += int((rows["seq"] <= cursor.watermark).sum())  # committed after a larger seq was read
            consumed += rows["event_id"].tolist()
            cursor = nxt
            time.sleep(0.003)
        for t in threads:
            t.join()
        assert not errors, errors
        deadline = time.monotonic() + GRACE_S + 5
        while True:  # a last read; the holes of rollbacks close after the grace
            rows, cursor = read_new(reader_log, cursor, datetime.now(UTC), GRACE_S)
            consumed += rows["event_id"].tolist()
            if not cursor.gaps or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        with writers_log.engine.connect() as conn:
            committed = [r[0] for r in conn.execute(select(writers_log.table.c.event_id))]
    finally:
        writers_log.close()
        reader_log.close()
    assert not cursor.gaps
    assert len(consumed) == len(set(consumed)), "an event was consumed twice"
    assert sorted(consumed) == sorted(committed), "a committed event was never consumed"
    assert WRITERS * PER_WRITER * 0.8 < len(committed) < WRITERS * PER_WRITER  # some rolled back
    if log_db.url.startswith("postgresql"):
        assert late > 0, "no late commit happened: the test did not exercise the race"


def test_advance_reads_gaps_until_the_grace_has_passed() -> None:
    t0 = pd.Timestamp("2024-01-01T00:00:00Z")
    take, cur = advance(LogCursor(), [1, 2, 4, 5], t0, grace_s=30)
    assert take.all() and cur.watermark == 5 and set(cur.gaps) == {3} and cur.read_from == 2
    take, cur2 = advance(cur, [3, 4, 5, 6], t0 + pd.Timedelta(seconds=10), grace_s=30)  # 3 committed late
    assert take.tolist() == [True, False, False, True] and cur2.watermark == 6 and not cur2.gaps
    take, cur3 = advance(cur, np.array([4, 5]), t0 + pd.Timedelta(seconds=31), grace_s=30)  # 3 rolled back
    assert not take.any() and cur3.watermark == 5 and not cur3.gaps
    assert LogCursor.from_json(cur.to_json()) == cur
    assert LogCursor.from_json({"event_log_seq": 7}) == LogCursor(7)  # a state written before the gaps
    with pytest.raises(ValueError, match="grace_s"):
        advance(cur, [], t0, grace_s=-1)

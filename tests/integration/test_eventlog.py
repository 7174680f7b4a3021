"""The event log on SQLite (WAL) and on the real PostgreSQL at 127.0.0.1:5432."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pytest
from sqlalchemy import text

from recloop.contract import EVENT_COLUMNS, ContractError
from recloop.eventlog import EventLog
from recloop.settings import get_settings

T0 = pd.Timestamp("2024-05-01T12:00:00Z")


def _postgres_url() -> str:
    return get_settings().postgres_url


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def log(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[EventLog]:
    table = f"events_test_{uuid.uuid4().hex[:10]}"
    url = f"sqlite:///{tmp_path / 'eventlog.db'}" if request.param == "sqlite" else _postgres_url()
    try:
        event_log = EventLog(url, table_name=table)
    except Exception as err:  # noqa: BLE001 - any connection failure means the server is absent
        if request.param == "postgres":
            pytest.skip(f"PostgreSQL not reachable: {err}")
        raise
    yield event_log
    event_log.drop()
    event_log.close()


def _ev(user: str, item: str, minutes: int, **kw: object) -> dict[str, object]:
    return {
        "user_id": user,
        "item_id": item,
        "event_type": "click",
        "timestamp": T0 + pd.Timedelta(minutes=minutes),
        **kw,
    }


def test_sqlite_runs_in_wal_mode(tmp_path: Path) -> None:
    event_log = EventLog(f"sqlite:///{tmp_path / 'el.db'}")
    with event_log.engine.connect() as conn:
        assert conn.execute(text("PRAGMA journal_mode")).scalar() == "wal"
        assert conn.execute(text("PRAGMA busy_timeout")).scalar() == 30_000
    event_log.close()


def test_append_is_idempotent_and_refuses_conflicts(log: EventLog) -> None:
    rows = [_ev("u1", "a", 0, event_id="e1"), _ev("u1", "b", 1, event_id="e2", value=4.5)]
    assert log.append(rows) == 2
    assert log.append(rows) == 0
    assert log.append(pd.DataFrame(rows)) == 0  # the frame path gives the same ids and content
    with pytest.raises(ValueError, match="event_id 'e2' is already stored with different content") as err:
        log.append([_ev("u1", "c", 2, event_id="e3"), _ev("u1", "zzz", 1, event_id="e2", value=4.5)])
    assert "item_id" in str(err.value) and "'b'" not in str(err.value)  # names fields, never stored values
    assert log.count() == 2  # e3 was rolled back with the conflicting row
    with pytest.raises(ValueError, match="appears twice"):
        log.append([_ev("u2", "a", 0, event_id="x"), _ev("u2", "b", 0, event_id="x")])
    with pytest.raises(ContractError, match="event_type"):
        log.append([_ev("u2", "a", 0) | {"event_type": "teleport"}])
    assert log.count() == 2


def test_append_one_derives_stable_ids(log: EventLog) -> None:
    assert log.append_one("u", "a", "like", timestamp=T0) is True
    assert log.append_one("u", "a", "like", timestamp=T0) is False  # same event again: a retry
    assert log.append_one("u", "a", "like", timestamp=T0 + pd.Timedelta(seconds=1)) is True
    assert log.count() == 2


def test_recent_items_since_and_max(log: EventLog) -> None:
    assert log.recent_items("u1", 3) == [] and log.max_timestamp() is None and log.count() == 0
    log.append([_ev("u1", "late", 5), _ev("u1", "early", 1), _ev("u2", "x", 3), _ev("u1", "tie", 5)])
    # One append is one receipt, logged in its own timestamp order; equal times keep the given order.
    assert log.recent_items("u1", 2) == ["late", "tie"]
    assert log.recent_items("u1", 10) == ["early", "late", "tie"]
    assert log.max_timestamp() == T0 + pd.Timedelta(minutes=5)
    frame = log.since(T0 + pd.Timedelta(minutes=2))
    assert tuple(frame.columns) == EVENT_COLUMNS and str(frame["timestamp"].dtype) == "datetime64[ns, UTC]"
    assert frame["item_id"].tolist() == ["x", "late", "tie"]
    all_rows = log.since(None, with_seq=True)
    first_seq = int(all_rows["seq"].min())
    assert log.since(None, after_seq=first_seq)["item_id"].tolist() == ["x", "late", "tie"]  # log order
    late_seq = int(all_rows.set_index("item_id").loc["late", "seq"])
    keyset = log.since(T0 + pd.Timedelta(minutes=5), after_seq=late_seq)
    assert keyset["item_id"].tolist() == ["tie"]
    assert log.max_seq() == int(all_rows["seq"].max())


def test_client_timestamps_never_reorder_a_history(log: EventLog) -> None:
    """A stamp far in the future (or past) is kept as data; the order is the order of receipt."""
    log.append([_ev("u1", "first", 0)])
    log.append([_ev("u1", "from-the-future", 60 * 24 * 365 * 5)])  # five years ahead
    log.append([_ev("u1", "from-the-past", -60 * 24 * 365 * 20)])  # twenty years back
    log.append([_ev("u1", "latest", 1)])
    assert log.recent_items("u1", 2) == ["from-the-past", "latest"]
    frame = log.since(None, with_seq=True)
    assert frame["item_id"].tolist() == ["first", "from-the-future", "from-the-past", "latest"]  # log order
    ordered = frame.sort_values("received_at", kind="stable")["item_id"].tolist()
    assert ordered == ["first", "from-the-future", "from-the-past", "latest"]  # received_at follows seq
    assert frame.set_index("item_id").loc["from-the-future", "timestamp"].year == T0.year + 5  # kept as data


def test_receive_times_follow_the_log_order_even_if_a_clock_steps_back(log: EventLog) -> None:
    log.append([_ev("u1", "a", 0)])
    future = pd.Timestamp.now(tz="UTC") + pd.Timedelta(hours=1)  # another replica's clock, an hour ahead
    with log.engine.begin() as conn:
        conn.execute(log.table.update().values(ingested_at=future.to_pydatetime()))
    log.append([_ev("u1", "b", 1)])
    log.append_and_recent(_ev("u1", "c", 2), 5)
    frame = log.since(None, with_seq=True)
    received = frame.sort_values("seq")["received_at"].tolist()
    assert received[0] < received[1] < received[2]  # never behind the user's last receive time


def test_concurrent_writers_of_one_user_lose_nothing(log: EventLog) -> None:
    n, threads, per_thread = 5, 8, 100
    results: list[tuple[str, list[str]]] = []
    errors: list[BaseException] = []

    def writer(t: int) -> None:
        try:
            for i in range(per_thread):
                item = f"t{t}-{i}"
                inserted, recent = log.append_and_recent(_ev("hot", item, 0, event_id=item), n)
                assert inserted
                results.append((item, recent))
        except BaseException as err:  # noqa: BLE001 - surfaced by the main thread below
            errors.append(err)

    pool = [threading.Thread(target=writer, args=(t,)) for t in range(threads)]
    for th in pool:
        th.start()
    for th in pool:
        th.join()
    assert not errors, errors[:1]
    assert log.count() == threads * per_thread
    order = log.since(None)["item_id"].tolist()  # all share one timestamp: seq order
    assert len(order) == 800 and log.recent_items("hot", n) == order[-n:]
    position = {item: k for k, item in enumerate(order)}
    for item, recent in results:
        k = position[item]
        assert recent == order[max(0, k - n + 1) : k + 1], (item, recent)


def test_users_lists_each_user_once(log: EventLog) -> None:
    log.append([_ev("u2", "a", 0), _ev("u1", "b", 1), _ev("u2", "c", 2)])
    assert log.users() == ["u1", "u2"]

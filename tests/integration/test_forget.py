"""Forgetting a user on the production stores and under concurrent feedback (SQLite and PostgreSQL, Redis).

- Feedback for the user racing the deletion (4 writer threads) leaves no row: every event the log accepted
  before the tombstone is in the receipt's count and deleted; every later one is refused (``UserForgotten``).
- After the deletion, a query over every column of every table of the event-log schema finds no trace of
  the id (PostgreSQL: the production event log), and the Redis online store has no key or value with it.
"""

from __future__ import annotations

import threading
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

import pytest
from conftest import LogDb
from sqlalchemy import MetaData, String, cast, func, select

from recloop.eventlog import EventLog
from recloop.exposures import ExposureLog
from recloop.forget import ForgetStore, UserForgotten, UserHasher, run_forget
from recloop.forget_handlers import close_handlers, kernel_handlers
from recloop.logdb import log_tables
from recloop.settings import Settings

X = "forgetme-5c0ffee1d2e3"  # distinctive, so a search for it cannot match anything else
KEY = "test-forget-key"


class _NoOnlineStore:
    """The online store's handler for a test without Feast (``featurestore.forget`` is tested below)."""

    name, repeat = "online_store", False

    def delete(self, user_id: str) -> int:
        return 0

    def remaining(self, user_id: str) -> int:
        return 0

    def durable(self) -> None:
        return None


def _settings(log_db: LogDb, tmp_path: Path) -> Settings:
    return Settings(home=tmp_path / "home", event_log_url=log_db.url, forget_salt=KEY)


def _forget(settings: Settings, events_table: str, settle_s: float = 0.2) -> dict:
    handlers = [*kernel_handlers(settings, events_table), _NoOnlineStore()]
    try:
        return run_forget(X, settings, handlers, settle_s=settle_s, events_table=events_table).as_dict()
    finally:
        close_handlers(handlers)


def test_feedback_racing_the_deletion_leaves_no_row(log_db: LogDb, tmp_path: Path) -> None:
    settings = _settings(log_db, tmp_path)
    log = EventLog(log_db.url, table_name=log_db.events_table)
    log.user_hasher = UserHasher(KEY.encode())
    now = datetime.now(UTC)
    log.append([{"user_id": X, "item_id": f"seed{i}", "event_type": "click", "timestamp": now} for i in range(20)])
    accepted, refused, errors = [0], [0], []
    stop = threading.Event()

    def writer(n: int) -> None:
        i = 0
        while not stop.is_set():
            try:
                log.append_one(X, f"w{n}-{i}", "click")
                accepted[0] += 1
            except UserForgotten:
                refused[0] += 1
            except Exception as err:  # noqa: BLE001 - reported by the assertion below
                errors.append(err)
                return
            i += 1

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    try:
        time.sleep(0.3)  # writers are admitted before the tombstone
        receipt = _forget(settings, log_db.events_table)
        time.sleep(0.2)  # and refused after it
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert not errors, errors
    assert accepted[0] > 0 and refused[0] > 0
    assert receipt["status"] == "done"
    assert receipt["rows"]["event_log"] == 20 + accepted[0]  # every admitted event was deleted
    t = log.table
    with log.engine.connect() as conn:
        assert conn.execute(select(func.count()).where(t.c.user_id == X)).scalar() == 0
    with pytest.raises(UserForgotten):
        log.append_one(X, "late", "click")
    log.close()


def test_no_trace_in_any_column_of_the_event_log_schema(log_db: LogDb, tmp_path: Path) -> None:
    settings = _settings(log_db, tmp_path)
    log = EventLog(log_db.url, table_name=log_db.events_table)
    log.user_hasher = UserHasher(KEY.encode())
    exposures = ExposureLog(log_db.url, events_table=log_db.events_table)
    for user in (X, "other"):
        for _i in range(3):
            request_id = uuid.uuid4().hex
            exposures.record(request_id, user, "1", [("i1", 0.5), ("i2", 0.4)], context=["i0"])
            log.append_one(user, "i1", "click", request_id=request_id, position=1)
    assert exposures.flush()
    receipt = _forget(settings, log_db.events_table)
    assert receipt["rows"]["event_log"] == 3 and receipt["rows"]["exposure_log"] == 3 * (1 + 2)
    tables = log_tables(MetaData(), log_db.events_table)
    with log.engine.connect() as conn:
        for table in vars(tables).values():
            for column in table.columns:
                hits = conn.execute(select(func.count()).select_from(table).where(
                    cast(column, String).like(f"%{X}%"))).scalar()
                assert hits == 0, f"{table.name}.{column.name} still mentions the forgotten user"
        assert conn.execute(select(func.count()).select_from(tables.events)).scalar() == 3  # others kept
    with ForgetStore(log_db.url, events_table=log_db.events_table) as store:
        (row,) = store.receipts()
    assert row["user_hash"] == UserHasher(KEY.encode())(X) and row["status"] == "done" and X not in str(row)
    exposures.close()
    log.close()


@pytest.mark.redis
def test_the_redis_online_store_holds_no_trace(tmp_path: Path) -> None:
    import redis

    from featurestore.forget import OnlineStoreHandler

    project = f"fg{uuid.uuid4().hex[:10]}"
    settings = Settings(home=tmp_path / "home", online_store="redis", feast_project=project)
    client = redis.Redis.from_url(f"redis://{settings.redis_url}")
    try:
        client.ping()
    except redis.exceptions.ConnectionError as err:
        pytest.skip(f"Redis not reachable: {err}")
    handler = OnlineStoreHandler(settings)
    try:
        for user in (X, "other"):  # the user's hash as Feast writes it: one key per entity, every view inside
            client.hset(handler._redis_key(user), mapping={b"_ts:user_recent_items": b"1", b"f": b"items"})
        assert handler.remaining(X) == 1
        assert handler.delete(X) == 1 and handler.remaining(X) == 0
        keys = list(client.scan_iter(match=f"*{project}*"))
        assert len(keys) == 1 and X.encode() not in keys[0]
        assert not any(X.encode() in v for k in keys for v in client.hgetall(k).values())
    finally:
        for k in client.scan_iter(match=f"*{project}*"):
            client.delete(k)
        handler.close()
        client.close()

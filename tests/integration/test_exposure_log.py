"""The exposure log (recloop.exposures): batched, non-blocking writes; reads, links to feedback, retention."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sqlalchemy import create_engine

from models.exploration import ExplorationPolicy, explore
from recloop import logdb
from recloop.contract import EVENT_COLUMNS, ContractError
from recloop.eventlog import EventLog
from recloop.exposures import ExposureLog
from recloop.settings import get_settings

T0 = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)


def _items(k: int, n: int) -> list[tuple[str, float]]:
    return [(f"i{(k + j) % 97}", 1.0 - j / n) for j in range(n)]


@pytest.fixture()
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'eventlog.db'}"


@pytest.fixture()
def xlog(sqlite_url: str) -> Iterator[ExposureLog]:
    log = ExposureLog(sqlite_url, flush_interval_s=0.02)
    yield log
    log.close()


def test_a_thousand_records_are_written_in_order(xlog: ExposureLog) -> None:
    k_items = 5
    started = time.perf_counter()
    for k in range(1000):
        assert xlog.record(
            f"req-{k}", f"u{k % 10}", "7", _items(k, k_items), variant="champion", context=[f"h{k}", "h2"],
            ts=T0 + timedelta(seconds=k),
        )
    per_call_us = (time.perf_counter() - started) / 1000 * 1e6
    assert per_call_us < 200  # a queue append, never the database (a few µs; generous for a busy CI box)
    assert xlog.flush(10)
    assert xlog.count() == 1000
    stats = xlog.stats()
    assert stats | {"last_error": None} == {
        "queued": 0, "written": 1000, "dropped": 0, "invalid": 0, "failed_batches": 0, "last_error": None,
    }
    exposures, items = xlog.read()
    assert exposures["request_id"].is_unique and len(exposures) == 1000
    assert exposures["request_id"].tolist() == [f"req-{k}" for k in range(1000)]  # ordered by ts
    assert str(exposures["ts"].dtype) == "datetime64[ns, UTC]"
    assert exposures["ts"].iloc[3] == pd.Timestamp(T0 + timedelta(seconds=3))
    assert exposures["context"].iloc[3] == ["h3", "h2"]
    assert (exposures["variant"] == "champion").all() and (exposures["policy"] == "greedy").all()
    assert len(items) == 1000 * k_items
    for request_id, group in items.groupby("request_id", sort=False):
        k = int(request_id.split("-")[1])
        assert group["position"].tolist() == list(range(1, k_items + 1))
        assert group["item_id"].tolist() == [item for item, _ in _items(k, k_items)]
        assert group["score"].tolist() == pytest.approx([score for _, score in _items(k, k_items)])


def test_read_windows_teams_and_propensities(xlog: ExposureLog) -> None:
    xlog.record("a", "u1", "3", [("x", 0.9), ("y", None)], teams=["A", "B"], propensities=[0.5, 0.25],
                policy="interleaving", experiment_id="exp-1", arm="treatment", ts=T0)
    xlog.record("b", "u1", "3", [], context=(), ts=T0 + timedelta(hours=1))
    assert xlog.flush()
    exposures, items = xlog.read(since=T0, until=T0 + timedelta(hours=1))  # since < ts <= until
    assert exposures["request_id"].tolist() == ["b"] and exposures["context"].tolist() == [[]]
    assert items.empty
    exposures, items = xlog.read(until=T0)
    assert exposures[["policy", "experiment_id", "arm"]].values.tolist() == [["interleaving", "exp-1", "treatment"]]
    assert items[["position", "item_id", "team"]].values.tolist() == [[1, "x", "A"], [2, "y", "B"]]
    assert items["propensity"].tolist() == [0.5, 0.25] and pd.isna(items["score"].iloc[1])


def test_propensities_and_pool_size_round_trip(xlog: ExposureLog) -> None:
    xlog.record("eps", "u1", "3", [("x", 0.9), ("y", 0.4), ("z", 0.1)], context=["h"], policy="epsilon:0.1",
                propensities=[0.9, 0.1 / 47, 0.9], pool_size=50, ts=T0)
    xlog.record("pl", "u2", "3", [("x", 0.9)], policy="plackett_luce:tau=0.5,n=50", propensities=[0.37],
                pool_size=0, ts=T0 + timedelta(seconds=1))
    xlog.record("old", "u3", "3", [("x", 0.9)], ts=T0 + timedelta(seconds=2))  # no pool size: null
    lazy = explore(np.array([-np.inf, 3.0, 2.0, 1.0]), 2, ExplorationPolicy("plackett_luce", temperature=0.5),
                   np.random.default_rng(0), defer=True)
    xlog.record("lazy", "u4", "3", [("a", 3.0), ("b", 2.0)], policy="plackett_luce:tau=0.5,n=50",
                propensities=lazy.propensities, pool_size=3, ts=T0 + timedelta(seconds=3))
    for bad in (-1, 1.5, "many", True, 2**31):
        assert xlog.record(f"bad-{bad}", "u", "3", [("x", 1.0)], pool_size=bad)  # the writer refuses it
    assert xlog.flush()
    assert xlog.stats()["invalid"] == 5
    exposures, items = xlog.read()
    assert exposures["request_id"].tolist() == ["eps", "pl", "old", "lazy"]
    assert items["propensity"].iloc[5:].tolist() == lazy.propensities.values().tolist()  # read by the writer
    assert str(exposures["pool_size"].dtype) == "Int64"
    assert exposures["pool_size"].tolist()[:2] == [50, 0] and pd.isna(exposures["pool_size"].iloc[2])
    assert exposures["policy"].tolist() == ["epsilon:0.1", "plackett_luce:tau=0.5,n=50", "greedy",
                                           "plackett_luce:tau=0.5,n=50"]
    assert items["propensity"].iloc[:4].tolist() == [0.9, 0.1 / 47, 0.9, 0.37]
    assert pd.isna(items["propensity"].iloc[4])


def test_a_feedback_event_links_to_its_exposure(sqlite_url: str, xlog: ExposureLog) -> None:
    events = EventLog(sqlite_url)
    try:
        xlog.record("req-42", "u1", "3", [("a", 0.9), ("b", 0.8), ("c", 0.7)], context=["h1"])
        assert xlog.flush()
        assert events.append_one("u1", "b", "click", request_id=" req-42 ", position=2)
        assert events.append_one("u1", "z", "click")  # unlinked: not in linked()
        linked = events.linked()
        assert linked[["request_id", "position", "item_id"]].values.tolist() == [["req-42", 2, "b"]]
        exposures, items = xlog.read()
        joined = linked.merge(items, on=["request_id", "position"], suffixes=("", "_shown"))
        assert joined[["item_id", "item_id_shown", "score"]].values.tolist() == [["b", "b", 0.8]]
        assert linked.merge(exposures, on="request_id")["model_version"].tolist() == ["3"]
        assert events.linked(since=linked["received_at"].iloc[0]).empty
        assert list(events.since().columns) == list(EVENT_COLUMNS)  # since() stays the contract frame
    finally:
        events.close()


def test_links_are_checked_and_not_part_of_the_identity(sqlite_url: str) -> None:
    events = EventLog(sqlite_url)
    try:
        row = {"user_id": "u", "item_id": "a", "event_type": "click", "timestamp": T0, "event_id": "e1"}
        assert events.append([row | {"request_id": "r1", "position": 1}]) == 1
        assert events.append([row | {"request_id": "r2", "position": 3}]) == 0  # a replay keeps the first link
        assert events.get("e1")["request_id"] == "r1" and events.get("e1")["position"] == 1
        frame = pd.DataFrame([row | {"event_id": "e2"}, row | {"event_id": "e3", "request_id": "r3", "position": 2}])
        assert events.append(frame) == 2  # a frame: position becomes float with a null; whole floats pass
        assert (events.get("e2")["request_id"], events.get("e3")["position"]) == (None, 2)
        assert events.append(pd.DataFrame([row | {"event_id": "e4"}])) == 1  # a frame without the columns
        inserted, _ = events.append_and_recent(row | {"event_id": "e5", "request_id": "r5", "position": 4}, n=3)
        assert inserted and (events.get("e5")["request_id"], events.get("e5")["position"]) == ("r5", 4)
        for bad in ({"request_id": ""}, {"request_id": "x" * 65}, {"request_id": "a\x00b"}, {"request_id": 7},
                    {"position": 0}, {"position": 10_001}, {"position": True}, {"position": 1.5}):
            column = next(iter(bad))
            with pytest.raises(ContractError, match=f"events.{column}"):
                events.append([row | {"event_id": "bad"} | bad])
        assert events.count() == 5
    finally:
        events.close()


def test_a_full_queue_drops_and_counts(sqlite_url: str) -> None:
    log = ExposureLog(sqlite_url, flush_interval_s=60, max_queue=5, batch_size=1000)  # the writer sleeps
    try:
        results = [log.record(f"r{k}", "u", "1", [("a", 1.0)]) for k in range(8)]
        assert results == [True] * 5 + [False] * 3
        assert log.stats()["dropped"] == 3 and log.stats()["queued"] == 5
        assert log.flush(10)
        assert log.count() == 5 and log.stats()["queued"] == 0
        assert log.record("r-next", "u", "1", [])  # room again
    finally:
        log.close()
    assert log.record("r-late", "u", "1", []) is False  # closed: dropped, never raised


def test_invalid_records_are_skipped_not_blocking(xlog: ExposureLog) -> None:
    assert xlog.record("", "u", "1", [("a", 1.0)])  # queued; the writer finds it invalid
    assert xlog.record("ok", "u", "1", [("a", 1.0)], teams=["A", "B"])  # teams do not match the items
    assert xlog.record("fine", "u", "1", [("a", 1.0)])
    assert xlog.record("fine", "u2", "1", [("b", 1.0)])  # a repeated request_id keeps the first
    assert xlog.flush()
    assert xlog.stats()["invalid"] == 2 and xlog.count() == 1
    assert xlog.read()[0]["user_id"].tolist() == ["u"]


def test_prune_deletes_old_exposures_and_their_items_only(xlog: ExposureLog) -> None:
    for k in range(30):
        xlog.record(f"r{k}", "u", "1", _items(k, 3), ts=T0 + timedelta(days=k))
    assert xlog.flush()
    assert xlog.prune(T0 + timedelta(days=10)) == {"exposures": 10, "items": 30}
    exposures, items = xlog.read()
    assert exposures["request_id"].tolist() == [f"r{k}" for k in range(10, 30)]
    assert sorted(set(items["request_id"])) == sorted(exposures["request_id"]) and len(items) == 60
    assert xlog.prune(T0) == {"exposures": 0, "items": 0}


def test_an_unreachable_database_is_retried_never_raised(sqlite_url: str, tmp_path: Path) -> None:
    log = ExposureLog(sqlite_url, flush_interval_s=0.01)
    good = log.engine
    try:
        log.engine = create_engine(f"sqlite:///{tmp_path / 'missing' / 'dir' / 'x.db'}")  # cannot even open
        assert log.record("r1", "u", "1", [("a", 1.0)]) is True
        assert log.flush(timeout_s=0.5) is False
        stats = log.stats()
        assert stats["failed_batches"] >= 1 and stats["queued"] == 1 and "OperationalError" in stats["last_error"]
        assert log.record("r2", "u", "1", [("b", 1.0)]) is True  # still queueing while down
        log.engine.dispose()
        log.engine = good  # the database is back: the same batch lands
        assert log.flush(timeout_s=10)
        assert log.count() == 2 and log.stats()["written"] == 2
    finally:
        log.engine = good
        log.close()


@pytest.mark.postgres
def test_postgres_round_trip() -> None:
    table = f"events_test_{uuid.uuid4().hex[:10]}"
    url = get_settings().postgres_url
    try:
        log = ExposureLog(url, events_table=table, flush_interval_s=0.02)
    except Exception as err:  # noqa: BLE001 - any connection failure means the server is absent
        pytest.skip(f"PostgreSQL not reachable: {err}")
    events = EventLog(url, table_name=table)
    try:
        for k in range(200):
            assert log.record(f"req-{k}", f"u{k % 7}", "5", _items(k, 4), context=["h1", f"h{k}"],
                              ts=T0 + timedelta(minutes=k), policy="epsilon:0.1", propensities=[0.9, 0.9, 0.9, 0.01],
                              pool_size=100 + k)
        log.record("req-0", "other", "5", [("dup", 1.0)])  # a stored request_id wins
        assert log.flush(10)
        assert log.count() == 200
        exposures, items = log.read()
        assert exposures["context"].iloc[5] == ["h1", "h5"] and len(items) == 800
        assert items[items["request_id"] == "req-0"]["item_id"].tolist() == [i for i, _ in _items(0, 4)]
        assert exposures["pool_size"].tolist() == list(range(100, 300)) and str(exposures["pool_size"].dtype) == "Int64"
        assert items[items["request_id"] == "req-7"]["propensity"].tolist() == [0.9, 0.9, 0.9, 0.01]
        events.append_one("u3", "i3", "click", request_id="req-3", position=1)
        linked = events.linked()
        assert linked.merge(items, on=["request_id", "position"])["item_id_y"].tolist() == ["i3"]
        assert log.prune(T0 + timedelta(minutes=50)) == {"exposures": 50, "items": 200}
    finally:
        log.close()
        events.drop()  # the whole schema: events, exposures, exposure_items, the version table
        events.close()
        engine = create_engine(url)
        assert logdb.current_revision(engine, table) is None
        engine.dispose()

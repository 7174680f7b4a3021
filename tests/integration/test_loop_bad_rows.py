"""Rows written straight into the event log (around the API) never wedge the loop, on SQLite and PostgreSQL.

Each kind of bad row is read back (no exception while reading), quarantined by the validation gate
with its reason, the good rows reach the lake, and a batch of only bad rows moves the watermark on.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pytest
from sqlalchemy import text

from recloop.settings import get_settings

PG = "postgresql+psycopg://postgres@127.0.0.1:5432"
GOOD_TS = "2024-01-01 10:00:00"

#: (label, user_id, item_id, event_type, value, timestamp, expected words in the reason); None = both backends.
BAD_ROWS = [
    ("year 9999", "u1", "i1", "click", None, "9999-12-31 00:00:00", "timestamp"),
    ("year 1", "u1", "i2", "click", None, "0001-01-01 00:00:00", "timestamp"),
    ("bidi id", "u1", "i\u202e3", "click", None, GOOD_TS, "item_id"),
    ("zero-width id", "u\u200b1", "i4", "click", None, GOOD_TS, "user_id"),
    ("unknown type", "u1", "i5", "hover", None, GOOD_TS, "event_type"),
    ("empty user", "", "i6", "click", None, GOOD_TS, "user_id"),
    ("negative id", "-5", "i7", "click", None, GOOD_TS, "user_id"),
]
SQLITE_ONLY = [  # PostgreSQL cannot store these at all (NUL in text, text in a float column)
    ("NUL id", "u\x001", "i8", "click", None, GOOD_TS, "user_id"),
    ("text value", "u1", "i9", "rating", "abc", GOOD_TS, "value"),
    ("garbage timestamp", "u1", "i10", "click", None, "not a time", "timestamp"),
]


@pytest.fixture(scope="module")
def harness() -> Iterator[None]:
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=90):
        yield


@pytest.fixture(params=["sqlite", "postgresql"])
def log_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'log.db'}"
        return
    psycopg = pytest.importorskip("psycopg")
    db = f"recloop_badrows_{uuid.uuid4().hex[:8]}"
    try:
        admin = psycopg.connect("postgresql://postgres@127.0.0.1:5432/postgres", autocommit=True, connect_timeout=5)
    except psycopg.OperationalError as err:
        pytest.skip(f"PostgreSQL not reachable: {err}")
    with admin:
        admin.execute(f'CREATE DATABASE "{db}"')
        try:
            yield f"{PG}/{db}"
        finally:
            admin.execute(f'DROP DATABASE "{db}" WITH (FORCE)')


def _write_raw(log_url: str, rows: list[tuple]) -> None:
    """INSERT rows as the database takes them, bypassing the API and EventLog's own checks."""
    from recloop.eventlog import EventLog

    log = EventLog(log_url)  # creates the table
    with log.engine.begin() as conn:
        for k, (_, user, item, etype, value, ts, _) in enumerate(rows):
            conn.execute(
                text(
                    "INSERT INTO events (event_id, user_id, item_id, event_type, value, timestamp, source, ingested_at)"
                    " VALUES (:e, :u, :i, :t, :v, :ts, 'raw', :now)"
                ),
                {"e": f"raw-{k}", "u": user, "i": item, "t": etype, "v": value, "ts": ts, "now": GOOD_TS},
            )
    log.close()


def _env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, log_url: str) -> None:
    monkeypatch.setenv("RECLOOP_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("RECLOOP_EVENT_LOG_URL", log_url)
    get_settings.cache_clear()


@pytest.mark.postgres
def test_every_bad_log_row_is_quarantined_and_good_rows_reach_the_lake(
    harness: None, log_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from flows.loop import ingest_feedback, read_feedback
    from recloop.cursor import LogCursor
    from recloop.lake import Lake

    _env(monkeypatch, tmp_path, log_url)
    bad = BAD_ROWS + (SQLITE_ONLY if log_url.startswith("sqlite") else [])
    good = [("good", "u1", "i100", "click", None, GOOD_TS, ""), ("good 2", "u2", "i101", "like", None, GOOD_TS, "")]
    _write_raw(log_url, good + bad)

    events, cursor, _ = read_feedback.fn(LogCursor())  # reading never fails on a bad row
    assert len(events) == len(good) + len(bad) and cursor.watermark == len(good) + len(bad)
    summary = ingest_feedback(events, "feedback-1")
    assert summary["new_events"] == len(good) and summary["rows_quarantined"] == len(bad)

    lake = Lake(get_settings().lake_path).events()
    assert sorted(lake["item_id"]) == ["i100", "i101"]
    quarantined = pd.read_parquet(Path(summary["results_path"]).parent / "quarantined.parquet")
    by_item = dict(zip(quarantined["item_id"].astype(str), quarantined["reason"], strict=True))
    for label, _, item, *_, column in bad:
        assert column in by_item[item], (label, by_item[item])
    get_settings.cache_clear()


@pytest.mark.postgres
def test_a_batch_of_only_bad_rows_moves_the_watermark_on(
    harness: None, log_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from flows.loop import loop_flow, read_watermark

    _env(monkeypatch, tmp_path, log_url)
    _write_raw(log_url, BAD_ROWS)
    first = loop_flow(deploy=False, start_service=False)
    assert first["status"] == "quarantined" and first["ingest"]["rows_quarantined"] == len(BAD_ROWS)
    assert read_watermark(get_settings().home) == first["watermark_to"] == len(BAD_ROWS)
    assert loop_flow(deploy=False, start_service=False)["status"] == "skipped"  # consumed, not retried forever
    get_settings.cache_clear()


@pytest.mark.postgres
def test_training_sequences_follow_the_order_of_receipt_not_client_stamps(
    harness: None, log_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from flows.loop import ingest_feedback, read_feedback
    from models.sequences import build_sequences
    from models.vocab import ItemVocabulary
    from recloop.cursor import LogCursor
    from recloop.eventlog import EventLog
    from recloop.lake import Lake

    _env(monkeypatch, tmp_path, log_url)
    now = pd.Timestamp.now(tz="UTC")
    log = EventLog(log_url)
    for item, stamp in [("a", now - pd.Timedelta(minutes=1)), ("b", now + pd.Timedelta(seconds=200)),
                        ("c", pd.Timestamp("2001-01-01", tz="UTC")), ("d", now)]:
        log.append([{"user_id": "u1", "item_id": item, "event_type": "click", "timestamp": stamp}])
    # Accepted extremes flow through too: the floor's first second, a 255-character id, an NFC-normalised id.
    edge = [("\u00fc" * 255, pd.Timestamp("1990-01-01T00:00:01Z")), ("cafe\u0301", now)]
    log.append([{"user_id": "u2", "item_id": i, "event_type": "view", "timestamp": t} for i, t in edge])
    log.close()
    events, _, _ = read_feedback.fn(LogCursor())
    summary = ingest_feedback(events, "feedback-order")
    assert summary["rows_quarantined"] == 0
    lake = Lake(get_settings().lake_path).events()
    assert lake.loc[lake["user_id"] == "u2", "item_id"].tolist() == ["\u00fc" * 255, "caf\u00e9"]
    lake = lake[lake["user_id"] == "u1"]
    assert lake["item_id"].tolist() == ["a", "b", "c", "d"]  # (received_at, seq), not the client's stamps
    vocab = ItemVocabulary.from_ids(lake["item_id"])
    seqs = build_sequences(lake, vocab)
    assert vocab.decode(seqs["u1"]) == ["a", "b", "c", "d"]
    get_settings.cache_clear()


def test_a_busy_user_or_a_retried_batch_never_wedges_the_feedback_path(
    harness: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The bot guard does not stop feedback; rows a failed turn already put in the lake still count."""
    from flows.loop import ingest_feedback, read_feedback
    from recloop.cursor import LogCursor
    from recloop.eventlog import EventLog

    url = f"sqlite:///{tmp_path / 'log.db'}"
    _env(monkeypatch, tmp_path, url)
    now = pd.Timestamp.now(tz="UTC") - pd.Timedelta(minutes=30)
    rows = [{"user_id": "power-user" if k % 2 else f"u{k}", "item_id": f"i{k % 50}", "event_type": "click",
             "timestamp": now + pd.Timedelta(seconds=k)} for k in range(1200)]  # one user: 50 % of 1,200
    log = EventLog(url)
    log.append(rows)
    log.close()
    events, _, _ = read_feedback.fn(LogCursor())
    first = ingest_feedback(events, "feedback-busy")
    assert first["new_events"] == 1200 and first["rows_ok"] == 1200
    again = ingest_feedback(events, "feedback-busy-retry")  # the turn failed after the lake: same rows again
    assert again["new_events"] == 0 and again["rows_ok"] == 1200  # so the loop retrains instead of skipping
    get_settings.cache_clear()

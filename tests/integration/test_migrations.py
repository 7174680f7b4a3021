"""Versioned migrations of the event-log database (recloop.logdb, Alembic) on SQLite and PostgreSQL."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

import pandas as pd
import pytest
from alembic.config import Config
from alembic.script import ScriptDirectory
from conftest import LogDb
from sqlalchemy import (
    BigInteger,
    Column,
    DateTime,
    Engine,
    Float,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    create_engine,
    inspect,
    select,
)

from recloop import logdb
from recloop.eventlog import EventLog

T0 = pd.Timestamp("2024-05-01T12:00:00Z")


Db = LogDb


@pytest.fixture
def db(log_db: LogDb) -> LogDb:
    """The shared event-log database fixture (tests/conftest.py)."""
    return log_db


def _legacy_events_table(name: str) -> Table:
    """The events table exactly as EventLog.__init__ created it before migrations existed (create_all)."""
    return Table(
        name,
        MetaData(),
        Column("seq", BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True),
        Column("event_id", String(128), nullable=False, unique=True),
        Column("user_id", String(255), nullable=False),
        Column("item_id", String(255), nullable=False),
        Column("event_type", String(16), nullable=False),
        Column("value", Float, nullable=True),
        Column("timestamp", DateTime(timezone=True), nullable=False),  # UTCDateTime's DDL
        Column("source", String(128), nullable=False),
        Column("ingested_at", DateTime(timezone=True), nullable=False),
        Index(f"ix_{name}_user_ts", "user_id", "timestamp", "seq"),
        Index(f"ix_{name}_ts", "timestamp", "seq"),
    )


def test_head_revision_is_the_scripts_head() -> None:
    config = Config()
    config.set_main_option("script_location", str(logdb.MIGRATIONS_DIR))
    script = ScriptDirectory.from_config(config)
    assert script.get_current_head() == logdb.HEAD_REVISION
    assert [s.revision for s in script.walk_revisions()][::-1] == [f"{k:04d}" for k in range(1, 8)]


def test_table_names() -> None:
    default = logdb.LogTableNames("events", "exposures", "exposure_items", "alembic_version", "experiments",
                                  "blocklist", "catalog_items", "forgotten_users")
    assert logdb.table_names() == logdb.table_names("events") == default
    assert logdb.table_names("events_test_ab12") == logdb.LogTableNames(
        "events_test_ab12", "events_test_ab12_exposures", "events_test_ab12_exposure_items",
        "events_test_ab12_alembic_version", "events_test_ab12_experiments", "events_test_ab12_blocklist",
        "events_test_ab12_catalog_items", "events_test_ab12_forgotten_users",
    )
    assert logdb.table_names("app_events").exposures == "app_exposures"


def test_a_database_of_the_previous_code_upgrades_in_place(db: Db) -> None:
    legacy = _legacy_events_table(db.events_table)
    legacy.metadata.create_all(db.engine)
    rows = [
        {"event_id": f"e{k}", "user_id": f"u{k % 2}", "item_id": f"i{k}", "event_type": "click",
         "value": None if k % 2 else 4.0, "timestamp": (T0 + pd.Timedelta(minutes=k)).to_pydatetime(),
         "source": "feedback", "ingested_at": (T0 + pd.Timedelta(minutes=k, seconds=1)).to_pydatetime()}
        for k in range(5)
    ]
    with db.engine.begin() as conn:
        conn.execute(legacy.insert(), rows)
        conn.execute(legacy.delete().where(legacy.c.event_id == "e2"))  # a gap in seq must survive
        before = {r.event_id: r.seq for r in conn.execute(select(legacy.c.event_id, legacy.c.seq))}
    assert logdb.current_revision(db.engine, db.events_table) is None

    log = EventLog(db.url, table_name=db.events_table)
    try:
        assert logdb.current_revision(log.engine, db.events_table) == logdb.HEAD_REVISION
        frame = log.since(with_seq=True)
        assert dict(zip(frame["event_id"], frame["seq"], strict=True)) == before
        assert frame["event_id"].tolist() == ["e0", "e1", "e3", "e4"]
        assert frame["value"].isna().tolist() == [False, True, True, False]
        assert log.get("e3")["request_id"] is None and log.get("e3")["position"] is None
        assert log.get("e0")["value"] == 4.0 and log.get("e0")["timestamp"] == T0.to_pydatetime()
        names = log.names
        inspector = inspect(log.engine)
        assert {names.exposures, names.exposure_items, names.experiments, names.version_table} <= set(
            inspector.get_table_names())
        assert {"request_id", "position"} <= {c["name"] for c in inspector.get_columns(db.events_table)}
        assert f"ix_{db.events_table}_request" in {ix["name"] for ix in inspector.get_indexes(db.events_table)}
        # New rows continue the sequence and may carry a link.
        assert log.append_one("u9", "x", "click", timestamp=T0, request_id="req-1", position=2)
        assert log.get(log.since()["event_id"].iloc[-1])["seq"] > max(before.values())
        assert log.linked()[["request_id", "position", "item_id"]].values.tolist() == [["req-1", 2, "x"]]
        # A second upgrade is a no-op (the fast path) and changes nothing.
        assert logdb.upgrade(log.engine, db.events_table) == logdb.HEAD_REVISION
        assert log.count() == 5
    finally:
        log.close()


def test_the_migrated_schema_matches_log_tables(db: Db) -> None:
    assert logdb.upgrade(db.engine, db.events_table) == logdb.HEAD_REVISION
    tables = logdb.log_tables(MetaData(), db.events_table)
    inspector = inspect(db.engine)
    for table in (tables.events, tables.exposures, tables.exposure_items, tables.experiments, tables.blocklist,
                  tables.catalog_items, tables.forgotten_users):
        columns = {c["name"]: c for c in inspector.get_columns(table.name)}
        assert set(columns) == {c.name for c in table.c}, table.name
        for col in table.c:
            assert columns[col.name]["nullable"] == col.nullable, (table.name, col.name)
        assert set(inspector.get_pk_constraint(table.name)["constrained_columns"]) == {
            c.name for c in table.primary_key
        }
        assert {ix["name"] for ix in inspector.get_indexes(table.name)} >= {ix.name for ix in table.indexes}


def _upgrade_to(engine: Engine, events_table: str, revision: str) -> None:
    """``alembic upgrade <revision>`` of the schema (an older database, as an earlier release left it)."""
    from alembic import command

    config = Config()
    config.set_main_option("script_location", str(logdb.MIGRATIONS_DIR))
    with engine.begin() as conn:
        config.attributes["connection"] = conn
        config.attributes["log_table_names"] = logdb.table_names(events_table)
        command.upgrade(config, revision)


def test_a_0002_database_upgrades_to_0003_keeping_its_rows(db: Db) -> None:
    from recloop.experiments import ExperimentStore

    _upgrade_to(db.engine, db.events_table, "0002")
    assert logdb.current_revision(db.engine, db.events_table) == "0002"
    names = logdb.table_names(db.events_table)
    assert not inspect(db.engine).has_table(names.experiments)
    tables = logdb.log_tables(MetaData(), db.events_table)
    with db.engine.begin() as conn:
        conn.execute(tables.events.insert(), [{
            "event_id": "e0", "user_id": "u0", "item_id": "i0", "event_type": "click", "value": None,
            "timestamp": T0.to_pydatetime(), "source": "feedback", "ingested_at": T0.to_pydatetime(),
            "request_id": "req-0", "position": 1}])
        conn.execute(tables.exposures.insert(), [{
            "request_id": "req-0", "user_id": "u0", "ts": T0.to_pydatetime(), "model_version": "3",
            "variant": "champion", "policy": "greedy", "context": "[]"}])

    store = ExperimentStore(db.url, events_table=db.events_table)  # opening it upgrades in place
    try:
        assert logdb.current_revision(store.engine, db.events_table) == logdb.HEAD_REVISION
        inspector = inspect(store.engine)
        assert f"ix_{names.experiments}_status" in {ix["name"] for ix in inspector.get_indexes(names.experiments)}
        assert store.active() is None
        started = store.start(mode="ab", champion_version="3", challenger_version="4")
        assert store.active() == started
    finally:
        store.close()
    log = EventLog(db.url, table_name=db.events_table)
    try:
        assert log.count() == 1 and log.get("e0")["request_id"] == "req-0"
        assert log.linked()["request_id"].tolist() == ["req-0"]
    finally:
        log.close()
    with db.engine.connect() as conn:
        assert conn.execute(select(tables.exposures.c.request_id)).scalars().all() == ["req-0"]


def test_a_0003_database_upgrades_to_head_keeping_its_rows(db: Db) -> None:
    from recloop.experiments import ExperimentStore
    from recloop.exposures import ExposureLog

    _upgrade_to(db.engine, db.events_table, "0003")
    assert logdb.current_revision(db.engine, db.events_table) == "0003"
    names = logdb.table_names(db.events_table)
    inspector = inspect(db.engine)
    assert not {"pool_size", "masked"} & {c["name"] for c in inspector.get_columns(names.exposures)}
    assert "exploration_champion" not in {c["name"] for c in inspector.get_columns(names.experiments)}
    md = MetaData()  # the 0003 tables, as that release wrote them (no new columns)
    exposures = Table(names.exposures, md, autoload_with=db.engine)
    items = Table(names.exposure_items, md, autoload_with=db.engine)
    experiments = Table(names.experiments, md, autoload_with=db.engine)
    with db.engine.begin() as conn:
        conn.execute(exposures.insert(), [{
            "request_id": "req-0", "user_id": "u0", "ts": T0.to_pydatetime(), "model_version": "3",
            "variant": "champion", "policy": "greedy", "context": '["h1"]'}])
        conn.execute(items.insert(), [{"request_id": "req-0", "position": 1, "item_id": "i1", "score": 0.5,
                                       "team": None, "propensity": 1.0}])
        conn.execute(experiments.insert(), [{
            "experiment_id": "exp-000000000001", "mode": "ab", "champion_version": "3", "challenger_version": "4",
            "weight_champion": 50.0, "weight_challenger": 50.0, "salt": "s", "status": "stopped",
            "started_at": T0.to_pydatetime(), "stopped_at": T0.to_pydatetime(), "note": "kept"}])

    xlog = ExposureLog(db.url, events_table=db.events_table, flush_interval_s=0.02)  # opening it upgrades
    try:
        assert logdb.current_revision(xlog.engine, db.events_table) == logdb.HEAD_REVISION == "0007"
        xlog.record("req-1", "u1", "4", [("i2", 0.9), ("i3", 0.1)], context=["h2"], policy="epsilon:0.1",
                    propensities=[0.9, 0.01], pool_size=120, ts=T0 + pd.Timedelta(minutes=1),
                    masked={"h2", "old-1"})
        assert xlog.flush()
        shown, slots = xlog.read()
        assert shown["request_id"].tolist() == ["req-0", "req-1"]
        assert shown["context"].tolist() == [["h1"], ["h2"]] and shown["policy"].tolist() == ["greedy", "epsilon:0.1"]
        assert shown["pool_size"].isna().tolist() == [True, False] and shown["pool_size"].iloc[1] == 120
        assert shown["masked"].tolist() == [None, ["h2", "old-1"]]  # 0005: unknown before it, sorted ids after
        assert slots["propensity"].tolist() == pytest.approx([1.0, 0.9, 0.01])
    finally:
        xlog.close()
    store = ExperimentStore(db.url, events_table=db.events_table)
    try:
        old = store.get("exp-000000000001")
        assert old is not None and old.status == "stopped" and old.exploration == (None, None)
        started = store.start(mode="ab", champion_version="3", challenger_version="4",
                              exploration=(None, "epsilon:0.2"))
        assert store.active() == started and store.active().exploration == (None, "epsilon:0.2")
    finally:
        store.close()
    with db.engine.connect() as conn:
        notes = conn.execute(select(experiments.c.experiment_id, experiments.c.note)).all()
        assert dict(notes) == {"exp-000000000001": "kept", started.experiment_id: None}


def test_concurrent_upgrades_of_a_fresh_database_all_succeed(db: Db) -> None:
    barrier = threading.Barrier(4)
    results: list[str] = []
    errors: list[BaseException] = []

    def run(k: int) -> None:
        # Each thread stands for a process starting: its own engine (one plain, the others as the log makes them).
        engine = create_engine(db.url) if k == 0 else logdb.make_engine(db.url)
        try:
            barrier.wait()
            results.append(logdb.upgrade(engine, db.events_table))
        except BaseException as err:  # noqa: BLE001 - reported below
            errors.append(err)
        finally:
            engine.dispose()

    threads = [threading.Thread(target=run, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors, errors
    assert results == [logdb.HEAD_REVISION] * 4
    assert logdb.current_revision(db.engine, db.events_table) == logdb.HEAD_REVISION


_UPGRADE_IN_A_PROCESS = """
import sys, time
from pathlib import Path
from recloop import logdb
url, table, folder, k = sys.argv[1:5]
engine = logdb.make_engine(url)
(Path(folder) / f"ready{k}").touch()
while not (Path(folder) / "go").exists():
    time.sleep(0.005)
print(logdb.upgrade(engine, table))
"""


def test_concurrent_upgrades_from_several_processes_all_succeed(db: Db, tmp_path: Path) -> None:
    folder = tmp_path / "sync"
    folder.mkdir()
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _UPGRADE_IN_A_PROCESS, db.url, db.events_table, str(folder), str(k)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        for k in range(4)
    ]
    deadline = time.monotonic() + 60
    while len(list(folder.glob("ready*"))) < 4 and time.monotonic() < deadline:
        time.sleep(0.01)
    (folder / "go").touch()  # all four start upgrading at once
    outs = [p.communicate(timeout=60) for p in procs]
    assert [p.returncode for p in procs] == [0] * 4, [err[-2000:] for _, err in outs]
    assert [out.strip() for out, _ in outs] == [logdb.HEAD_REVISION] * 4
    assert logdb.current_revision(db.engine, db.events_table) == logdb.HEAD_REVISION


def test_a_fresh_event_log_is_at_head(db: Db) -> None:
    log = EventLog(db.url, table_name=db.events_table)
    try:
        assert logdb.current_revision(log.engine, db.events_table) == logdb.HEAD_REVISION
        assert log.count() == 0
    finally:
        log.close()


def test_create_false_leaves_the_schema_alone(db: Db) -> None:
    log = EventLog(db.url, table_name=db.events_table, create=False)
    try:
        assert logdb.current_revision(log.engine, db.events_table) is None
        assert not inspect(log.engine).has_table(db.events_table)
    finally:
        log.close()

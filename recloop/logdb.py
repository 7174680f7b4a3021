"""The event-log database: its table names, its tables at head and its versioned migrations (Alembic).

One schema holds the feedback log (``recloop.eventlog``), the exposure log (``recloop.exposures``) and
the online experiments (``recloop.experiments``). Every name derives from the events table's name, so
tests can run side by side in one database:

- ``events`` → ``exposures``, ``exposure_items``, ``experiments``, ``blocklist``, ``catalog_items``,
  ``forgotten_users``, version table
  ``alembic_version``;
- ``events_test_ab12`` → ``events_test_ab12_exposures``, ``events_test_ab12_exposure_items``,
  ``events_test_ab12_experiments``, ``events_test_ab12_blocklist``, ``events_test_ab12_alembic_version``

(prefix = ``events_table[:-6]`` when the name ends with "events", else ``events_table + "_"``.)

Tables at head (``HEAD_REVISION``):

- ``events``: ``seq`` (autoincrement primary key), ``event_id`` (unique), ``user_id``, ``item_id``,
  ``event_type``, ``value``, ``timestamp``, ``source``, ``ingested_at``, ``request_id`` (nullable: the
  exposure the event answers) and ``position`` (nullable, 1-based rank in that exposure); indexes
  ``ix_<events>_user_ts`` (user_id, timestamp, seq), ``ix_<events>_ts`` (timestamp, seq) and
  ``ix_<events>_request`` (request_id).
- ``exposures``: one row per served list: ``request_id`` (primary key), ``user_id``, ``ts``,
  ``model_version``, ``variant``, ``experiment_id``, ``arm``, ``policy``, ``context`` (JSON array of
  the history item ids, oldest first, the scores were computed from) and ``pool_size`` (nullable: the
  candidates the exploration policy could draw from, after masking; revision 0004) and ``masked``
  (nullable JSON array: the item ids serving masked before ranking; revision 0005); indexes on (ts) and
  (user_id, ts).
- ``exposure_items``: one row per shown item: (``request_id``, ``position``) primary key, ``item_id``,
  ``score``, ``team``, ``propensity``. No foreign key: the writer batches both tables.
- ``experiments``: one row per online experiment (champion against challenger): ``experiment_id``
  (primary key), ``mode`` ("ab" | "interleave"), ``champion_version``, ``challenger_version``,
  ``weight_champion``, ``weight_challenger``, ``salt``, ``status`` ("running" | "stopped" | "concluded"),
  ``started_at``, ``stopped_at``, ``concluded_at`` (nullable), ``result`` (JSON text, nullable), ``note``,
  ``exploration_champion`` and ``exploration_challenger`` (nullable: each arm's exploration policy text,
  ``models.exploration.ExplorationPolicy.parse``; null = the service's policy; revision 0004);
  index ``ix_<experiments>_status``. At most one is running (``recloop.experiments.ExperimentStore``).
- ``blocklist``: the catalogue-wide blocklist every serving worker masks (``recloop.blocklist``, revision
  0006): ``item_id`` (primary key), ``kind`` ("blocked" | "retired"), ``reason`` (nullable), ``added_at``.
- ``catalog_items`` (revision 0007): items added after the lake snapshot (``POST /items``, a source batch):
  ``item_id`` (primary key), ``title``, ``genres`` (pipe-separated, nullable), ``text`` (nullable), ``added_at``.
- ``forgotten_users`` (revision 0007): one row per forget request, keyed by the salted hash of the user id
  (the tombstone): ``user_hash`` (primary key), ``requested_at``, ``completed_at``, ``rows`` (JSON: rows
  removed per store), ``honoured_by`` (the MLflow run of the cold retrain that honoured it).
- ``experiments.rerank_champion``/``rerank_challenger`` (revision 0007): each arm's re-ranking text.

Migrations live in ``recloop/migrations`` (Alembic scripts; the names come from
``config.attributes["log_table_names"]``, never from the scripts). ``upgrade`` applies them under a
lock, so several processes may start at once: ``pg_advisory_lock`` on PostgreSQL, the database write
lock (``BEGIN IMMEDIATE``) on SQLite. Revision 0001 creates the events table only if it is missing, so
a database made before the migrations existed (an events table, no version table) upgrades in place.
"""

from __future__ import annotations

import hashlib
import logging
import sqlite3
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pandas as pd
from sqlalchemy import (
    BigInteger,
    Column,
    Connection,
    DateTime,
    Engine,
    Float,
    Index,
    Integer,
    MetaData,
    PrimaryKeyConstraint,
    String,
    Table,
    Text,
    create_engine,
    event,
    text,
)
from sqlalchemy.engine import make_url
from sqlalchemy.types import TypeDecorator

from recloop.contract import MAX_ID_CHARS, MAX_REQUEST_ID_CHARS

logger = logging.getLogger(__name__)
#: Alembic's ``context``/``op`` proxies are module globals: one migration run per process at a time.
#: Taken before the database lock, never after it, so two threads of one process cannot deadlock.
_ALEMBIC_LOCK = threading.Lock()

#: The newest migration (``recloop/migrations/versions``); a test keeps it equal to the scripts' head.
HEAD_REVISION = "0007"
#: The migration scripts (an Alembic ``script_location``).
MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"
#: SQLite ``busy_timeout``: how long a writer waits for the database write lock.
BUSY_TIMEOUT_MS = 30_000
#: Column widths shared by the tables and the writers' checks (ids: ``recloop.contract``).
REQUEST_ID_CHARS = MAX_REQUEST_ID_CHARS
MODEL_VERSION_CHARS = 64
VARIANT_CHARS = 64
EXPERIMENT_ID_CHARS = 64
ARM_CHARS = 32
POLICY_CHARS = 32
TEAM_CHARS = 32
EXPERIMENT_MODE_CHARS = 16
EXPERIMENT_STATUS_CHARS = 16
SALT_CHARS = 64
EXPLORATION_CHARS = 64
BLOCK_KIND_CHARS = 16
BLOCK_REASON_CHARS = 500
RERANK_CHARS = 64
CATALOG_TITLE_CHARS = 500
CATALOG_GENRES_CHARS = 500
USER_HASH_CHARS = 64
RUN_ID_CHARS = 64


class UTCDateTime(TypeDecorator):
    """Timezone-aware UTC datetimes on every backend (SQLite stores naive UTC, fixed width;
    PostgreSQL ``timestamptz``). Naive inputs are taken as UTC; results are tz-aware UTC."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: Any, dialect: Any) -> datetime | None:
        if value is None:
            return None
        ts = pd.Timestamp(value)
        ts = ts.tz_localize("UTC") if ts.tzinfo is None else ts.tz_convert("UTC")
        out = ts.to_pydatetime()
        return out.replace(tzinfo=None) if dialect.name == "sqlite" else out

    def process_result_value(self, value: Any, dialect: Any) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


@dataclass(frozen=True)
class LogTableNames:
    """The table names of one event-log schema (see the module docstring)."""

    events: str
    exposures: str
    exposure_items: str
    version_table: str
    experiments: str
    blocklist: str
    catalog_items: str
    forgotten_users: str


@dataclass(frozen=True)
class LogTables:
    """The SQLAlchemy tables of one event-log schema at ``HEAD_REVISION`` (for queries, not DDL)."""

    events: Table
    exposures: Table
    exposure_items: Table
    experiments: Table
    blocklist: Table
    catalog_items: Table
    forgotten_users: Table


def table_names(events_table: str = "events") -> LogTableNames:
    """The schema's names derived from the events table's name.

    Args:
        events_table: e.g. "events" (→ exposures, exposure_items, alembic_version, experiments, blocklist) or
            "events_test_ab12" (→ events_test_ab12_exposures, ...).
    Raises:
        ValueError: ``events_table`` is empty.
    """
    if not events_table:
        raise ValueError("events_table must not be empty")
    prefix = events_table[:-6] if events_table.endswith("events") else events_table + "_"
    return LogTableNames(
        events=events_table,
        exposures=prefix + "exposures",
        exposure_items=prefix + "exposure_items",
        version_table=prefix + "alembic_version",
        experiments=prefix + "experiments",
        blocklist=prefix + "blocklist",
        catalog_items=prefix + "catalog_items",
        forgotten_users=prefix + "forgotten_users",
    )


def log_tables(metadata: MetaData, events_table: str = "events") -> LogTables:
    """Define the schema's tables at head in ``metadata`` (the migrations create them; see the module docstring)."""
    n = table_names(events_table)
    events = Table(
        n.events,
        metadata,
        Column("seq", BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True),
        Column("event_id", String(128), nullable=False, unique=True),
        Column("user_id", String(MAX_ID_CHARS), nullable=False),
        Column("item_id", String(MAX_ID_CHARS), nullable=False),
        Column("event_type", String(16), nullable=False),
        Column("value", Float, nullable=True),
        Column("timestamp", UTCDateTime, nullable=False),
        Column("source", String(128), nullable=False),
        Column("ingested_at", UTCDateTime, nullable=False),
        Column("request_id", String(REQUEST_ID_CHARS), nullable=True),
        Column("position", Integer, nullable=True),
        Index(f"ix_{n.events}_user_ts", "user_id", "timestamp", "seq"),
        Index(f"ix_{n.events}_ts", "timestamp", "seq"),
        Index(f"ix_{n.events}_request", "request_id"),
    )
    exposures = Table(
        n.exposures,
        metadata,
        Column("request_id", String(REQUEST_ID_CHARS), primary_key=True),
        Column("user_id", String(MAX_ID_CHARS), nullable=False),
        Column("ts", UTCDateTime, nullable=False),
        Column("model_version", String(MODEL_VERSION_CHARS), nullable=False),
        Column("variant", String(VARIANT_CHARS), nullable=False, server_default=""),
        Column("experiment_id", String(EXPERIMENT_ID_CHARS), nullable=True),
        Column("arm", String(ARM_CHARS), nullable=True),
        Column("policy", String(POLICY_CHARS), nullable=False, server_default="greedy"),
        Column("context", Text, nullable=True),
        Column("pool_size", Integer, nullable=True),
        Column("masked", Text, nullable=True),
        Index(f"ix_{n.exposures}_ts", "ts"),
        Index(f"ix_{n.exposures}_user_ts", "user_id", "ts"),
    )
    exposure_items = Table(
        n.exposure_items,
        metadata,
        Column("request_id", String(REQUEST_ID_CHARS), nullable=False),
        Column("position", Integer, nullable=False),
        Column("item_id", String(MAX_ID_CHARS), nullable=False),
        Column("score", Float, nullable=True),
        Column("team", String(TEAM_CHARS), nullable=True),
        Column("propensity", Float, nullable=True),
        PrimaryKeyConstraint("request_id", "position", name=f"pk_{n.exposure_items}"),
    )
    experiments = Table(
        n.experiments,
        metadata,
        Column("experiment_id", String(EXPERIMENT_ID_CHARS), primary_key=True),
        Column("mode", String(EXPERIMENT_MODE_CHARS), nullable=False),
        Column("champion_version", String(MODEL_VERSION_CHARS), nullable=False),
        Column("challenger_version", String(MODEL_VERSION_CHARS), nullable=False),
        Column("weight_champion", Float, nullable=False),
        Column("weight_challenger", Float, nullable=False),
        Column("salt", String(SALT_CHARS), nullable=False),
        Column("status", String(EXPERIMENT_STATUS_CHARS), nullable=False),
        Column("started_at", UTCDateTime, nullable=False),
        Column("stopped_at", UTCDateTime, nullable=True),
        Column("concluded_at", UTCDateTime, nullable=True),
        Column("result", Text, nullable=True),
        Column("note", Text, nullable=True),
        Column("exploration_champion", String(EXPLORATION_CHARS), nullable=True),
        Column("exploration_challenger", String(EXPLORATION_CHARS), nullable=True),
        Column("rerank_champion", String(RERANK_CHARS), nullable=True),
        Column("rerank_challenger", String(RERANK_CHARS), nullable=True),
        Index(f"ix_{n.experiments}_status", "status"),
    )
    blocklist = Table(
        n.blocklist,
        metadata,
        Column("item_id", String(MAX_ID_CHARS), primary_key=True),
        Column("kind", String(BLOCK_KIND_CHARS), nullable=False),
        Column("reason", String(BLOCK_REASON_CHARS), nullable=True),
        Column("added_at", UTCDateTime, nullable=False),
    )
    catalog_items = Table(
        n.catalog_items,
        metadata,
        Column("item_id", String(MAX_ID_CHARS), primary_key=True),
        Column("title", String(CATALOG_TITLE_CHARS), nullable=False),
        Column("genres", String(CATALOG_GENRES_CHARS), nullable=True),
        Column("text", Text, nullable=True),
        Column("added_at", UTCDateTime, nullable=False),
    )
    forgotten_users = Table(
        n.forgotten_users,
        metadata,
        Column("user_hash", String(USER_HASH_CHARS), primary_key=True),
        Column("requested_at", UTCDateTime, nullable=False),
        Column("completed_at", UTCDateTime, nullable=True),
        Column("rows", Text, nullable=True),
        Column("honoured_by", String(RUN_ID_CHARS), nullable=True),
    )
    return LogTables(events=events, exposures=exposures, exposure_items=exposure_items, experiments=experiments,
                     blocklist=blocklist, catalog_items=catalog_items, forgotten_users=forgotten_users)


# ---- engines -------------------------------------------------------------------------------------
def make_engine(url: str) -> Engine:
    """An engine for the log database at ``url``, configured as the event log's.

    SQLite: the parent folder is created, WAL, ``busy_timeout`` (``BUSY_TIMEOUT_MS``) and every
    transaction begins with ``BEGIN IMMEDIATE`` (the database write lock; pass the execution option
    ``sqlite_begin="BEGIN"`` for a read). PostgreSQL: ``pool_pre_ping``.
    """
    parsed = make_url(url)
    is_sqlite = parsed.get_backend_name() == "sqlite"
    if is_sqlite and parsed.database and parsed.database != ":memory:":
        Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(url, pool_pre_ping=not is_sqlite)
    if is_sqlite:
        event.listen(engine, "connect", _sqlite_on_connect)
        event.listen(engine, "begin", _sqlite_on_begin)
    return engine


def _sqlite_on_connect(dbapi_conn: Any, _record: Any) -> None:
    dbapi_conn.isolation_level = None  # let SQLAlchemy's "begin" event issue BEGIN itself
    cur = dbapi_conn.cursor()
    cur.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
    # Switching a fresh database to WAL needs an exclusive lock, and SQLite may answer "database is
    # locked" at once instead of waiting (several processes opening a new file together): retry.
    deadline = time.monotonic() + BUSY_TIMEOUT_MS / 1000
    while True:
        try:
            cur.execute("PRAGMA journal_mode=WAL")
            break
        except sqlite3.OperationalError as err:
            if "locked" not in str(err) or time.monotonic() > deadline:
                raise
            time.sleep(0.01)
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.close()


def _sqlite_on_begin(conn: Connection) -> None:
    conn.exec_driver_sql(conn.get_execution_options().get("sqlite_begin", "BEGIN IMMEDIATE"))


# ---- migrations ----------------------------------------------------------------------------------
def current_revision(engine: Engine, events_table: str = "events") -> str | None:
    """The schema's applied revision (e.g. ``HEAD_REVISION``), or None when it has no version table.

    A read: takes no write lock. Raises the driver's error when the database is unreachable.
    """
    with _read_connection(engine) as conn:
        return _revision(conn, table_names(events_table).version_table)


def upgrade(engine: Engine, events_table: str = "events") -> str:
    """Apply the migrations up to head; safe when several processes (or threads) start at once.

    Fast path: when the version table already says ``HEAD_REVISION`` it returns after one read,
    without loading the migration scripts. Otherwise the upgrade runs in one transaction under the
    schema's lock (``pg_advisory_lock`` on a key derived from the version table's name on PostgreSQL;
    ``BEGIN IMMEDIATE`` on SQLite, waiting up to ``busy_timeout``), so a second process waits and then
    finds head. Within one process, threads also take a module lock first (Alembic's proxies are
    globals). DDL is transactional on both backends: a failed upgrade leaves the previous revision.

    Args:
        engine: the log database (``make_engine``; a plain SQLite engine works too).
        events_table: the events table's name; the other names derive from it (``table_names``).
    Returns:
        The head revision now applied.
    Raises:
        sqlalchemy.exc.SQLAlchemyError: the database is unreachable or a migration failed.
        RuntimeError: the migrations ran but the version table does not say head.
    """
    names = table_names(events_table)
    with _read_connection(engine) as conn:
        if _revision(conn, names.version_table) == HEAD_REVISION:
            return HEAD_REVISION
    with _ALEMBIC_LOCK:
        _upgrade_locked(engine, names)
    with _read_connection(engine) as conn:
        revision = _revision(conn, names.version_table)
    if revision != HEAD_REVISION:
        raise RuntimeError(f"upgrade of {names.events!r} ended at revision {revision!r}, not {HEAD_REVISION!r}")
    return revision


def _upgrade_locked(engine: Engine, names: LogTableNames) -> None:
    """Run the migrations under the database's lock (the caller holds ``_ALEMBIC_LOCK``)."""
    if engine.dialect.name == "postgresql":
        key = _migration_lock_key(names.version_table)
        with engine.connect() as conn:
            conn.execute(text("SELECT pg_advisory_lock(:k)"), {"k": key})
            conn.commit()
            try:
                with conn.begin():
                    _run_alembic(conn, names)
            finally:
                conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": key})
                conn.commit()
    elif engine.dialect.name == "sqlite":
        with engine.connect() as conn:
            if event.contains(engine, "begin", _sqlite_on_begin):
                with conn.execution_options(sqlite_begin="BEGIN IMMEDIATE").begin():
                    _run_alembic(conn, names)
            else:  # a plain engine: take the write lock ourselves (pysqlite then treats it as open)
                with conn.begin():
                    conn.exec_driver_sql("BEGIN IMMEDIATE")
                    _run_alembic(conn, names)
    else:
        with engine.begin() as conn:
            _run_alembic(conn, names)


def drop_all(engine: Engine, events_table: str = "events") -> None:
    """Drop every table of the schema and its version table, if present (tests and teardown)."""
    n = table_names(events_table)
    metadata = MetaData()
    tables = log_tables(metadata, events_table)
    version = Table(n.version_table, metadata, Column("version_num", String(32), primary_key=True))
    with engine.begin() as conn:
        for table in (tables.forgotten_users, tables.catalog_items, tables.blocklist, tables.experiments,
                      tables.exposure_items, tables.exposures, tables.events, version):
            table.drop(conn, checkfirst=True)


def _run_alembic(conn: Connection, names: LogTableNames) -> None:
    """``alembic upgrade head`` on ``conn`` (inside the caller's transaction and lock)."""
    from alembic import command
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.attributes["connection"] = conn
    config.attributes["log_table_names"] = names
    command.upgrade(config, "head")


def _revision(conn: Connection, version_table: str) -> str | None:
    from alembic.runtime.migration import MigrationContext

    return MigrationContext.configure(conn, opts={"version_table": version_table}).get_current_revision()


def _read_connection(engine: Engine) -> Connection:
    conn = engine.connect()
    return conn.execution_options(sqlite_begin="BEGIN") if engine.dialect.name == "sqlite" else conn


def _migration_lock_key(version_table: str) -> int:
    """A signed 64-bit advisory-lock key for the migrations of one schema."""
    digest = hashlib.sha1(f"recloop.logdb.migrate\x1f{version_table}".encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


class LogTableStore:
    """Base of a store over one table of the event-log schema (``ExperimentStore``, ``BlocklistStore``).

    Subclasses name their table with ``TABLE`` (a field of ``LogTables``: "experiments", "blocklist").

    Args:
        url: SQLAlchemy URL of the event-log database (``settings.event_log_uri``).
        events_table: the events table's name; the table's name derives from it (``table_names``).
        create: migrate the schema to head first (``upgrade``).
    Raises:
        sqlalchemy.exc.SQLAlchemyError: with ``create``, the database is unreachable or a migration failed.
    """

    TABLE: str = ""

    def __init__(self, url: str, *, events_table: str = "events", create: bool = True) -> None:
        self.names = table_names(events_table)
        self.engine: Engine = make_engine(url)
        self.table: Table = getattr(log_tables(MetaData(), events_table), self.TABLE)
        if create:
            upgrade(self.engine, events_table)

    def close(self) -> None:
        """Release pooled connections."""
        self.engine.dispose()

    def __enter__(self) -> Any:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()


"""The event log: the durable, idempotent store of feedback events from serving (SQLAlchemy 2).

SQLite (WAL, ``busy_timeout``) is the embedded default; PostgreSQL (``postgresql+psycopg://``)
the production store. The table holds the ``events`` contract columns plus ``seq`` (an
autoincrement insertion counter) and ``ingested_at`` (UTC). ``event_id`` is unique: appending
the same event twice stores it once; the same id with different content is refused.

Per-user atomicity ("insert an event, then read that user's last n items" without lost updates
under concurrent writers) comes from one transaction per call that first serialises writers of
the same user: ``pg_advisory_xact_lock`` on a 64-bit hash of the user on PostgreSQL, ``BEGIN
IMMEDIATE`` (the database write lock) on SQLite. Order within a user is the log sequence ``seq``
(server-assigned, the contract's history order); ``ingested_at`` is the receive time, exported as
the contract's ``received_at``. The client's ``timestamp`` is stored as data and never reorders.
Caveat: on PostgreSQL a smaller ``seq`` can commit after a larger one (different users), so a
reader paging by ``after_seq`` alone may skip a row committed late; re-read a small overlap.
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pandas as pd
from sqlalchemy import (
    BigInteger,
    Column,
    Connection,
    DateTime,
    Float,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    create_engine,
    event,
    func,
    select,
    text,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import make_url
from sqlalchemy.types import TypeDecorator

from recloop.contract import (
    EVENT_COLUMNS,
    RULE_EVENT_TYPE,
    RULE_TIMESTAMP,
    RULE_VALUE,
    ContractError,
    coerce_events,
    derive_event_id,
    empty_events,
    event_type_violation,
    id_violation,
    normalise_event_type,
    normalise_id,
    parse_timestamps,
    value_violation,
)

logger = logging.getLogger(__name__)
CONTENT = ("user_id", "item_id", "event_type", "value", "timestamp", "source")
BUSY_TIMEOUT_MS = 30_000


class UTCDateTime(TypeDecorator):
    """Timezone-aware UTC datetimes on every backend (SQLite stores naive UTC, fixed width)."""

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


def _lock_key(table: str, user_id: str) -> int:
    """A signed 64-bit advisory-lock key for (table, user)."""
    return int.from_bytes(hashlib.sha1(f"{table}\x1f{user_id}".encode()).digest()[:8], "big", signed=True)


class EventLog:
    """An event log at SQLAlchemy ``url`` (``settings.event_log_uri`` at the edges).

    Args:
        url: e.g. ``sqlite:///home/eventlog.db`` or ``postgresql+psycopg://user@host/db``.
        table_name: the table (tests use a unique name per run).
        create: create the table and indexes if missing.
    """

    def __init__(self, url: str, *, table_name: str = "events", create: bool = True) -> None:
        parsed = make_url(url)
        self.is_sqlite = parsed.get_backend_name() == "sqlite"
        if self.is_sqlite and parsed.database and parsed.database != ":memory:":
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        self.engine = create_engine(url, pool_pre_ping=not self.is_sqlite)
        if self.is_sqlite:
            event.listen(self.engine, "connect", _sqlite_on_connect)
            event.listen(self.engine, "begin", _sqlite_on_begin)
        self.table = Table(
            table_name,
            MetaData(),
            Column("seq", BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True),
            Column("event_id", String(128), nullable=False, unique=True),
            Column("user_id", String(255), nullable=False),
            Column("item_id", String(255), nullable=False),
            Column("event_type", String(16), nullable=False),
            Column("value", Float, nullable=True),
            Column("timestamp", UTCDateTime, nullable=False),
            Column("source", String(128), nullable=False),
            Column("ingested_at", UTCDateTime, nullable=False),
            Index(f"ix_{table_name}_user_ts", "user_id", "timestamp", "seq"),
            Index(f"ix_{table_name}_ts", "timestamp", "seq"),
        )
        if create:
            self.table.metadata.create_all(self.engine)

    # ---- writes --------------------------------------------------------------------------
    def append(self, events: pd.DataFrame | Iterable[dict[str, Any]]) -> int:
        """Insert events, ignoring ones whose ``event_id`` is already stored with the same content.

        Args:
            events: a frame or dicts with the contract columns (``event_id`` optional: derived
                deterministically; ``source`` optional: "feedback").
        Returns:
            The number of newly inserted events.
        Raises:
            ContractError: an event violates the contract.
            ValueError: an ``event_id`` is stored (or repeated in ``events``) with different
                content; nothing of the call is stored.
        """
        rows = self._rows(events)
        if not rows:
            return 0
        with self.engine.begin() as conn:
            self._lock_users(conn, sorted({r["user_id"] for r in rows}))
            _stamp_received(rows, self._last_received(conn, {r["user_id"] for r in rows}))
            return len(self._insert(conn, rows))

    def append_one(
        self,
        user_id: str,
        item_id: str,
        event_type: str,
        *,
        value: float | None = None,
        timestamp: datetime | pd.Timestamp | None = None,
        event_id: str | None = None,
        source: str = "feedback",
    ) -> bool:
        """Insert one event (timestamp defaults to now, UTC). Returns True if newly inserted."""
        return self.append([_event(user_id, item_id, event_type, value, timestamp, event_id, source)]) == 1

    def append_and_recent(
        self, event_row: dict[str, Any], n: int, after_ts: datetime | None = None
    ) -> tuple[bool, list[str]]:
        """Atomically insert one event and read that user's last ``n`` item ids (oldest first).

        Concurrent calls for the same user are serialised, so every returned list reflects all
        earlier inserts and none is lost (the read-modify-write race of docs/stack-notes.md).

        Args:
            event_row: one event (keys as in ``append``; ``timestamp`` defaults to now, UTC).
            n: how many items to return (>= 1).
            after_ts: only events received after it (``ingested_at``; the part of the history the lake
                does not hold yet: the newest ``received_at`` of the user's lake events).
        Returns:
            (inserted, recent): whether the event was new; the user's last ``n`` item ids in log order.
        Raises:
            ValueError: n < 1, or the event's id is stored with different content.
        """
        if n < 1:
            raise ValueError(f"n={n}; expected n >= 1")
        row = dict(event_row)
        row.setdefault("timestamp", datetime.now(UTC))
        rows = self._rows([row])
        with self.engine.begin() as conn:
            self._lock_users(conn, [rows[0]["user_id"]])
            _stamp_received(rows, self._last_received(conn, {rows[0]["user_id"]}))
            inserted = self._insert(conn, rows)
            recent = self._recent(conn, rows[0]["user_id"], n, after_ts)
        return bool(inserted), recent

    def _rows(self, events: pd.DataFrame | Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
        """Contract-checked, de-duplicated rows ready to insert (pandas only for frames: it costs ~10 ms)."""
        if isinstance(events, pd.DataFrame):
            if events.empty:
                return []
            frame = coerce_events(events, default_source="feedback")
            frame["timestamp"] = frame["timestamp"].dt.floor("us")  # the stored precision
            frame = frame.drop(columns=["received_at"])  # the log assigns its own (ingested_at)
            rows = frame.astype({"value": object}).where(frame.notna(), None).to_dict("records")
        else:
            rows = _coerce_dicts(list(events))
        seen: dict[str, dict[str, Any]] = {}
        for r in rows:
            if r["event_id"] in seen and not _same(seen[r["event_id"]], r):
                raise EventIdConflict(r["event_id"], _differing(seen[r["event_id"]], r), "appears twice in the batch")
            seen[r["event_id"]] = r
        now = datetime.now(UTC)
        # One call is one receipt: its rows are logged (seq) in the order of their own timestamps, stable.
        ordered = sorted(seen.values(), key=lambda r: pd.Timestamp(r["timestamp"]))
        return [dict(r, ingested_at=now) for r in ordered]

    def _lock_users(self, conn: Connection, users: Sequence[str]) -> None:
        if self.is_sqlite or not users:
            return  # SQLite: BEGIN IMMEDIATE already holds the database write lock
        keys = sorted({_lock_key(self.table.name, u) for u in users})
        conn.execute(
            text(
                "SELECT pg_advisory_xact_lock(k) "
                "FROM (SELECT unnest(CAST(:keys AS bigint[])) AS k ORDER BY k) s"
            ),
            {"keys": keys},
        )

    def _as_text(self, column: Any) -> Any:
        """A timestamp column as ISO-8601 UTC text (PostgreSQL: independent of the session's DateStyle)."""
        if self.is_sqlite:
            return column.cast(String)
        return func.to_char(func.timezone("UTC", column), 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"')

    def _last_received(self, conn: Connection, users: set[str]) -> dict[str, datetime]:
        """user_id -> newest ``ingested_at`` among ``users`` (read under their locks)."""
        t = self.table
        out: dict[str, datetime] = {}
        users_list = sorted(users)
        for start in range(0, len(users_list), 500):
            chunk = users_list[start : start + 500]
            q = select(t.c.user_id, func.max(t.c.ingested_at)).where(t.c.user_id.in_(chunk)).group_by(t.c.user_id)
            for user_id, newest in conn.execute(q):
                if newest is not None:
                    ts = pd.Timestamp(newest)
                    ts = ts.tz_localize("UTC") if ts.tzinfo is None else ts.tz_convert("UTC")
                    out[user_id] = ts.to_pydatetime()
        return out

    def _insert(self, conn: Connection, rows: list[dict[str, Any]]) -> set[str]:
        dialect_insert = sqlite.insert if self.is_sqlite else postgresql.insert
        stmt = dialect_insert(self.table).on_conflict_do_nothing(index_elements=["event_id"])
        inserted = {r.event_id for r in conn.execute(stmt.returning(self.table.c.event_id), rows)}
        clashes = [r for r in rows if r["event_id"] not in inserted]
        for start in range(0, len(clashes), 500):
            chunk = {r["event_id"]: r for r in clashes[start : start + 500]}
            stored = conn.execute(select(self.table).where(self.table.c.event_id.in_(list(chunk)))).mappings()
            for old in stored:
                if not _same(old, chunk[old["event_id"]]):
                    # The message names the differing fields only: the stored event may be another user's.
                    raise EventIdConflict(old["event_id"], _differing(old, chunk[old["event_id"]]), "is already stored")
        return inserted

    # ---- reads ---------------------------------------------------------------------------
    def recent_items(self, user_id: str, n: int, after_ts: datetime | None = None) -> list[str]:
        """The user's last ``n`` item ids in log order (``seq``), oldest first ([] for an unknown user).

        ``after_ts`` keeps only events stamped after it.
        """
        with self.engine.connect().execution_options(sqlite_begin="BEGIN") as conn:
            return self._recent(conn, str(user_id), n, after_ts)

    def _recent(self, conn: Connection, user_id: str, n: int, after_ts: datetime | None = None) -> list[str]:
        t = self.table
        cond = t.c.user_id == user_id
        if after_ts is not None:
            cond = cond & (t.c.ingested_at > pd.Timestamp(after_ts).tz_convert("UTC").to_pydatetime())
        q = select(t.c.item_id).where(cond).order_by(t.c.seq.desc()).limit(n)
        return [r[0] for r in conn.execute(q)][::-1]

    def since(
        self,
        watermark_ts: datetime | pd.Timestamp | None = None,
        after_seq: int | None = None,
        *,
        with_seq: bool = False,
    ) -> pd.DataFrame:
        """Events after a position, as a contract frame: in log order (``seq``), or ordered by
        (timestamp, seq) when paging by ``watermark_ts``.

        Args:
            watermark_ts: keep events with ``timestamp > watermark_ts`` (None: no time bound).
            after_seq: alone, keep ``seq > after_seq``; with ``watermark_ts``, keyset paging:
                ``timestamp > watermark_ts`` or (``timestamp == watermark_ts`` and ``seq > after_seq``).
            with_seq: also return the ``seq`` and ``ingested_at`` columns.
        """
        t = self.table
        # Timestamps are read as text and parsed here, so a row written around the API with a value no
        # datetime can hold (year 9999 / year 1 on PostgreSQL, any string on SQLite) comes back as its
        # raw text for the validation gate to quarantine, instead of failing the whole read.
        raw_cols = [self._as_text(c).label(c.name) if c.name in ("timestamp", "ingested_at") else c for c in t.c]
        # Position by the log sequence (the contract's history order); the timestamp keyset keeps its own.
        q = select(*raw_cols).order_by(t.c.seq) if watermark_ts is None else select(*raw_cols).order_by(
            t.c.timestamp, t.c.seq
        )
        if watermark_ts is not None:
            wm = pd.Timestamp(watermark_ts)
            cond = t.c.timestamp > wm
            if after_seq is not None:
                cond = cond | ((t.c.timestamp == wm) & (t.c.seq > after_seq))
            q = q.where(cond)
        elif after_seq is not None:
            q = q.where(t.c.seq > after_seq)
        with self.engine.connect().execution_options(sqlite_begin="BEGIN") as conn:
            rows = conn.execute(q).mappings().all()
        if not rows:
            out = empty_events()
            return (
                out.assign(seq=pd.Series(dtype="int64"), ingested_at=pd.Series(dtype="datetime64[ns, UTC]"))
                if with_seq
                else out
            )
        df = pd.DataFrame([dict(r) for r in rows])
        value = pd.to_numeric(df["value"], errors="coerce")
        if (value.notna() == df["value"].notna()).all():  # else keep the raw values for the gate to quarantine
            df["value"] = value.astype("float64")
        for col in ("timestamp", "ingested_at"):
            parsed = parse_timestamps(df[col].astype(object))
            df[col] = parsed if parsed.notna().all() else parsed.astype(object).where(parsed.notna(), df[col])
        df["received_at"] = df["ingested_at"]  # the contract's server-assigned order column
        cols = list(EVENT_COLUMNS) + (["seq", "ingested_at"] if with_seq else [])
        return df[cols].reset_index(drop=True)

    def get(self, event_id: str) -> dict[str, Any] | None:
        """The stored event with ``event_id`` (contract fields plus ``seq``), or None."""
        with self.engine.connect().execution_options(sqlite_begin="BEGIN") as conn:
            row = conn.execute(select(self.table).where(self.table.c.event_id == str(event_id))).mappings().first()
        return None if row is None else dict(row)

    def users(self) -> list[str]:
        """The distinct user ids of the log, sorted (one query; a read, no write lock)."""
        with self.engine.connect().execution_options(sqlite_begin="BEGIN") as conn:
            return sorted(str(r[0]) for r in conn.execute(select(self.table.c.user_id).distinct()))

    def count(self) -> int:
        """Number of stored events."""
        return int(self._scalar_from(func.count()))

    def _scalar_from(self, expr: Any) -> Any:
        with self.engine.connect().execution_options(sqlite_begin="BEGIN") as conn:
            return conn.execute(select(expr).select_from(self.table)).scalar()

    def max_timestamp(self) -> pd.Timestamp | None:
        """Newest event timestamp (UTC), or None when empty."""
        value = self._scalar_from(func.max(self.table.c.timestamp))
        if value is None:
            return None
        if isinstance(value, str):  # SQLite aggregates bypass the column type
            value = datetime.fromisoformat(value)
        ts = pd.Timestamp(value)
        return ts.tz_localize("UTC") if ts.tzinfo is None else ts.tz_convert("UTC")

    def max_seq(self) -> int | None:
        """Largest ``seq`` stored, or None when empty."""
        value = self._scalar_from(func.max(self.table.c.seq))
        return None if value is None else int(value)

    def drop(self) -> None:
        """Drop the table (tests and teardown)."""
        self.table.drop(self.engine, checkfirst=True)

    def close(self) -> None:
        """Release pooled connections."""
        self.engine.dispose()


def _sqlite_on_connect(dbapi_conn: Any, _record: Any) -> None:
    dbapi_conn.isolation_level = None  # let SQLAlchemy's "begin" event issue BEGIN itself
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.close()


def _sqlite_on_begin(conn: Connection) -> None:
    conn.exec_driver_sql(conn.get_execution_options().get("sqlite_begin", "BEGIN IMMEDIATE"))


def _event(
    user_id: str,
    item_id: str,
    event_type: str,
    value: float | None,
    timestamp: datetime | pd.Timestamp | None,
    event_id: str | None,
    source: str,
) -> dict[str, Any]:
    row: dict[str, Any] = {
        "user_id": user_id,
        "item_id": item_id,
        "event_type": event_type,
        "value": value,
        "timestamp": timestamp if timestamp is not None else datetime.now(UTC),
        "source": source,
    }
    if event_id is not None:
        row["event_id"] = event_id
    return row


def _coerce_dicts(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The contract's row rules (``recloop.contract``) for a few dict rows, without building a frame.

    Raises:
        ContractError: naming the column, rule and value, as ``coerce_events`` does.
    """
    out: list[dict[str, Any]] = []
    repeats: dict[tuple[Any, ...], int] = {}
    for k, raw in enumerate(rows):
        missing = [c for c in ("user_id", "item_id", "event_type", "timestamp") if raw.get(c) is None]
        if missing:
            raise ContractError("events", missing[0], f"must not be null (row {k})")
        r = {c: raw.get(c) for c in CONTENT}
        for c in ("user_id", "item_id"):
            rule = id_violation(r[c])
            if rule:
                raise ContractError("events", c, f"{rule} (row {k})", [raw[c]])
            r[c] = normalise_id(r[c])
        if event_type_violation(r["event_type"]):
            raise ContractError("events", "event_type", RULE_EVENT_TYPE, [raw["event_type"]])
        r["event_type"] = normalise_event_type(r["event_type"])
        if value_violation(r["value"]):
            raise ContractError("events", "value", RULE_VALUE, [raw["value"]])
        r["value"] = None if r["value"] is None or r["value"] != r["value"] else float(r["value"])
        ts = parse_timestamps(pd.Series([r["timestamp"]], dtype=object))[0]
        if pd.isna(ts):
            raise ContractError("events", "timestamp", RULE_TIMESTAMP, [raw["timestamp"]])
        r["timestamp"] = ts.floor("us")  # the stored precision
        r["source"] = str(r["source"] or "feedback")
        event_id = raw.get("event_id")
        if event_id is None or not str(event_id).strip():
            key = (r["source"], r["user_id"], r["item_id"], r["event_type"], ts.value)
            repeats[key] = repeats.get(key, -1) + 1
            event_id = derive_event_id(*key, repeats[key])
        r["event_id"] = str(event_id).strip()
        out.append(r)
    return out


class EventIdConflict(ValueError):
    """An ``event_id`` reused with other content. The message names the id and the differing field
    names, never the stored values (they may belong to another user)."""

    def __init__(self, event_id: str, fields: list[str], where: str) -> None:
        super().__init__(f"event_id {event_id!r} {where} with different content (differs in {', '.join(fields)})")
        self.event_id, self.fields = event_id, fields


def _stamp_received(rows: list[dict[str, Any]], last: dict[str, datetime]) -> None:
    """Set each row's receive time inside the write transaction, after the per-user lock.

    ``ingested_at = max(now, the user's last ingested_at + 1 µs)``: a user's receive times follow the
    log order ``seq`` even when replicas' clocks differ or a clock steps back (NTP).

    Args:
        rows: rows about to be inserted, in log order.
        last: user_id -> newest stored ``ingested_at`` (tz-aware), for the users of ``rows``.
    """
    now = datetime.now(UTC)
    step = timedelta(microseconds=1)
    for r in rows:
        prev = last.get(r["user_id"])
        r["ingested_at"] = now if prev is None or now > prev else prev + step
        last[r["user_id"]] = r["ingested_at"]


def _differing(a: Any, b: Any) -> list[str]:
    """The CONTENT fields on which two rows differ (as ``_same`` compares them)."""
    return [c for c in CONTENT if not _same(a, b, (c,))]


def _same(a: Any, b: Any, columns: tuple[str, ...] = CONTENT) -> bool:
    for c in columns:
        x, y = a[c], b[c]
        if c == "value":
            if (x is None or (isinstance(x, float) and math.isnan(x))) != (
                y is None or (isinstance(y, float) and math.isnan(y))
            ):
                return False
            if x is not None and y is not None and not math.isclose(float(x), float(y)):
                return False
        elif c == "timestamp":
            if pd.Timestamp(x) != pd.Timestamp(y):
                return False
        elif str(x) != str(y):
            return False
    return True

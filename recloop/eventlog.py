"""The event log: the durable, idempotent store of feedback events from serving (SQLAlchemy 2).

SQLite (WAL, ``busy_timeout``) is the embedded default; PostgreSQL (``postgresql+psycopg://``)
the production store. The table holds the ``events`` contract columns plus ``seq`` (an
autoincrement insertion counter), ``ingested_at`` (UTC) and an optional link to the exposure the
event answers (``request_id``, ``position``: ``recloop.exposures``; not part of the event's identity).
``event_id`` is unique: appending the same event twice stores it once; the same id with different
content is refused. The schema is versioned: ``recloop.logdb.upgrade`` (Alembic) creates or migrates it.

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
from collections.abc import Callable, Iterable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import pandas as pd
from sqlalchemy import Connection, MetaData, String, bindparam, func, select, text
from sqlalchemy.dialects import postgresql, sqlite

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
    position_violation,
    request_id_violation,
    value_violation,
)
from recloop.logdb import BUSY_TIMEOUT_MS as BUSY_TIMEOUT_MS
from recloop.logdb import UTCDateTime as UTCDateTime  # one definition, shared with the exposure log
from recloop.logdb import _sqlite_on_begin as _sqlite_on_begin
from recloop.logdb import _sqlite_on_connect as _sqlite_on_connect
from recloop.logdb import drop_all, log_tables, make_engine, table_names, upgrade
from recloop.policy import EventPolicy

logger = logging.getLogger(__name__)
CONTENT = ("user_id", "item_id", "event_type", "value", "timestamp", "source")
#: An event's optional link to the exposure it answers (recloop.exposures); not part of its identity.
LINK = ("request_id", "position")
#: The columns of ``EventLog.linked``.
LINKED_COLUMNS = ("request_id", "position", "user_id", "item_id", "event_type", "value", "timestamp", "received_at")


def _lock_key(table: str, user_id: str) -> int:
    """A signed 64-bit advisory-lock key for (table, user)."""
    return int.from_bytes(hashlib.sha1(f"{table}\x1f{user_id}".encode()).digest()[:8], "big", signed=True)


#: ``after_ts=None`` (the whole log) as a bound: before any ``ingested_at``.
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def _after(after_ts: datetime | None) -> datetime:
    """``ingested_at > after`` bound of a read: ``after_ts`` in UTC, or the epoch for the whole log."""
    return _EPOCH if after_ts is None else pd.Timestamp(after_ts).tz_convert("UTC").to_pydatetime()


class EventLog:
    """An event log at SQLAlchemy ``url`` (``settings.event_log_uri`` at the edges).

    Args:
        url: e.g. ``sqlite:///home/eventlog.db`` or ``postgresql+psycopg://user@host/db``.
        table_name: the events table (tests use a unique name per run); the exposure tables and the
            version table derive their names from it (``recloop.logdb.table_names``).
        create: migrate the schema to head (``recloop.logdb.upgrade``: creates the tables, or upgrades a
            database made by an older version in place, keeping its rows). False leaves the schema
            alone; it must then already be at head.
    Raises:
        sqlalchemy.exc.SQLAlchemyError: with ``create``, the database is unreachable or a migration failed.
    """

    def __init__(self, url: str, *, table_name: str = "events", create: bool = True) -> None:
        self.engine = make_engine(url)
        self.is_sqlite = self.engine.dialect.name == "sqlite"
        self.names = table_names(table_name)
        self.tables = log_tables(MetaData(), table_name)
        self.table = self.tables.events
        if create:
            upgrade(self.engine, table_name)

    # ---- writes --------------------------------------------------------------------------
    def append(self, events: pd.DataFrame | Iterable[dict[str, Any]]) -> int:
        """Insert events, ignoring ones whose ``event_id`` is already stored with the same content.

        Args:
            events: a frame or dicts with the contract columns (``event_id`` optional: derived
                deterministically; ``source`` optional: "feedback"), optionally ``request_id`` (str, the
                exposure the event answers) and ``position`` (int 1..10000, its rank there). The link is
                not part of the event's identity: a replay of a stored ``event_id`` keeps the first link.
        Returns:
            The number of newly inserted events.
        Raises:
            ContractError: an event violates the contract (incl. a bad ``request_id``/``position``).
            ValueError: an ``event_id`` is stored (or repeated in ``events``) with different
                content; nothing of the call is stored.
        """
        rows = self._rows(events)
        if not rows:
            return 0
        with self.engine.begin() as conn:
            self._lock_users(conn, sorted({r["user_id"] for r in rows}))
            self._refuse_forgotten(conn, {r["user_id"] for r in rows})
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
        request_id: str | None = None,
        position: int | None = None,
    ) -> bool:
        """Insert one event (timestamp defaults to now, UTC). Returns True if newly inserted.

        ``request_id``/``position``: the exposure the event answers and the item's rank in it (see ``append``).
        """
        row = _event(user_id, item_id, event_type, value, timestamp, event_id, source)
        return self.append([dict(row, request_id=request_id, position=position)]) == 1

    #: ``append_and_recent`` takes ``while_locked`` and ``recent_locked`` exists: the serving core pushes the
    #: online list while the user's write lock is held, so pushes are ordered across processes.
    supports_locked_push = True

    def append_and_recent(
        self, event_row: dict[str, Any], n: int, after_ts: datetime | None = None, *,
        while_locked: Callable[[list[str]], None] | None = None,
    ) -> tuple[bool, list[str]]:
        """Atomically insert one event and read that user's last ``n`` item ids (oldest first).

        Concurrent calls for the same user are serialised, across processes too (PostgreSQL: a per-user
        transaction-level advisory lock; SQLite: the database write lock of ``BEGIN IMMEDIATE``), so every
        returned list reflects all earlier inserts and none is lost (the read-modify-write race of
        docs/stack-notes.md).

        Args:
            event_row: one event (keys as in ``append``; ``timestamp`` defaults to now, UTC).
            n: how many items to return (>= 1).
            after_ts: only events received after it (``ingested_at``; the part of the history the lake
                does not hold yet: the newest ``received_at`` of the user's lake events).
            while_locked: called with the returned list after the insert, before the commit, while the
                user's lock is held: what it writes elsewhere (the online push) is ordered like the log,
                whichever process writes. It should not raise: an exception rolls the insert back and
                propagates. It holds the lock as long as it runs (bound its time).
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
            self._refuse_forgotten(conn, {rows[0]["user_id"]})
            _stamp_received(rows, self._last_received(conn, {rows[0]["user_id"]}))
            inserted = self._insert(conn, rows)
            recent = self._recent(conn, rows[0]["user_id"], n, after_ts)
            if while_locked is not None:
                while_locked(recent)
        return bool(inserted), recent

    def recent_locked(self, user_id: str, n: int, while_locked: Callable[[list[str]], None],
                      after_ts: datetime | None = None) -> list[str]:
        """Read the user's last ``n`` item ids and call ``while_locked(recent)`` under the user's write lock.

        The lock is the one ``append_and_recent`` takes, so a write made in ``while_locked`` (a re-push of
        the online list) cannot interleave with a concurrent append's own write and overwrite it with an
        older list. Arguments as ``append_and_recent``.

        Returns:
            The list passed to ``while_locked``.
        """
        if n < 1:
            raise ValueError(f"n={n}; expected n >= 1")
        with self.engine.begin() as conn:
            self._lock_users(conn, [str(user_id)])
            self._refuse_forgotten(conn, {str(user_id)})
            recent = self._recent(conn, str(user_id), n, after_ts)
            while_locked(recent)
        return recent

    def _rows(self, events: pd.DataFrame | Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
        """Contract-checked, de-duplicated rows ready to insert (pandas only for frames: it costs ~10 ms)."""
        if isinstance(events, pd.DataFrame):
            if events.empty:
                return []
            links = _frame_links(events)
            frame = coerce_events(events, default_source="feedback")
            frame["timestamp"] = frame["timestamp"].dt.floor("us")  # the stored precision
            frame = frame.drop(columns=["received_at"])  # the log assigns its own (ingested_at)
            rows = frame.astype({"value": object}).where(frame.notna(), None).to_dict("records")
            for r, (request_id, position) in zip(rows, links, strict=True):
                r["request_id"], r["position"] = request_id, position
        else:
            rows = _coerce_dicts(list(events))
        seen: dict[str, dict[str, Any]] = {}
        for r in rows:
            if r["event_id"] in seen and not _same(seen[r["event_id"]], r):
                raise EventIdConflict(r["event_id"], _differing(seen[r["event_id"]], r), "appears twice in the batch")
            seen.setdefault(r["event_id"], r)  # a repeat keeps the first link (request_id, position)
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

    # ---- forgotten users (recloop/forget.py) -------------------------------------------------
    @property
    def user_hasher(self) -> Any:
        """The forget key's hasher (``recloop.forget.user_hasher`` of the settings), or None while no key
        exists (re-read until one does: the key file appears with the first forget)."""
        if getattr(self, "_user_hasher", None) is None:
            from recloop.forget import user_hasher
            from recloop.settings import get_settings

            self._user_hasher = user_hasher(get_settings())
        return self._user_hasher

    @user_hasher.setter
    def user_hasher(self, value: Any) -> None:
        self._user_hasher = value

    def _refuse_forgotten(self, conn: Connection, users: set[str]) -> None:
        """Raise ``recloop.forget.UserForgotten`` when a user has a tombstone (read under the users' write
        lock: a forget deleting after its tombstone committed cannot miss an event admitted here)."""
        from recloop.forget import UserForgotten, forgotten_among

        gone = forgotten_among(conn, self.tables.forgotten_users, users, self.user_hasher)
        if gone:
            raise UserForgotten(self.user_hasher(sorted(gone)[0]))

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
    _stmts: dict[str, Any] | None = None  # ``_statements``, built for ``_stmts_policy``
    _stmts_policy: EventPolicy | None = None

    # ---- the event policy (recloop/policy.py) ---------------------------------------------
    @property
    def policy(self) -> EventPolicy:
        """The event policy of history reads (default: the settings' ``event_policy``)."""
        if getattr(self, "_policy", None) is None:
            from recloop.settings import get_settings

            self._policy = get_settings().event_policy
        return self._policy

    @policy.setter
    def policy(self, value: EventPolicy) -> None:
        self._policy = value

    def _positive_clause(self) -> Any:
        """SQL form of ``event_role(...) == "positive"`` (tests/unit/test_event_policy.py checks they agree)."""
        t, p = self.table, self.policy
        plain = sorted(p.positive - {"rating"})
        cond = t.c.event_type.in_(plain) if plain else None
        if "rating" in p.positive:
            rating = t.c.event_type == "rating"
            if p.rating_negative_below is not None:  # NaN/None is not below: stays positive
                rating = rating & ((t.c.value >= p.rating_negative_below) | t.c.value.is_(None))
            cond = rating if cond is None else cond | rating
        return cond if cond is not None else text("1 = 0")

    def _negative_clause(self) -> Any:
        """SQL form of ``event_role(...) == "negative"`` (checked against it like ``_positive_clause``)."""
        t, p = self.table, self.policy
        plain = sorted(p.negative - {"rating"})
        cond = t.c.event_type.in_(plain) if plain else None
        rating = None
        if "rating" in p.negative:
            rating = t.c.event_type == "rating"
        elif p.rating_negative_below is not None:
            rating = (t.c.event_type == "rating") & (t.c.value < p.rating_negative_below)
        if rating is not None:
            cond = rating if cond is None else cond | rating
        return cond if cond is not None else text("1 = 0")

    def recent_items(self, user_id: str, n: int, after_ts: datetime | None = None) -> list[str]:
        """The user's last ``n`` positive item ids (the event policy) in log order (``seq``), oldest
        first ([] for an unknown user). Negative and context-only events are never history.

        ``after_ts`` keeps only events stamped after it.
        """
        with self.engine.connect().execution_options(sqlite_begin="BEGIN") as conn:
            return self._recent(conn, str(user_id), n, after_ts)

    def _recent(self, conn: Connection, user_id: str, n: int, after_ts: datetime | None = None) -> list[str]:
        rows = conn.execute(self._statements()["recent"], {"uid": user_id, "after": _after(after_ts), "n": int(n)})
        return [r[0] for r in rows][::-1]

    def _statements(self) -> dict[str, Any]:
        """The per-request reads, built once with bind parameters (``uid``, ``after``, ``since``, ``n``).

        Building a SQLAlchemy expression costs more than running it on a small indexed range (~1 ms of
        the ~2 ms ``user_state`` took per recommend in a profile), so serving's reads reuse these.
        """
        if self._stmts is None or self._stmts_policy is not self.policy:  # ``policy`` may be set after init
            self._stmts_policy = self.policy
            t = self.table
            mine = t.c.user_id == bindparam("uid")
            pos = mine & self._positive_clause() & (t.c.ingested_at > bindparam("after", type_=UTCDateTime()))
            neg = mine & self._negative_clause() & (t.c.ingested_at > bindparam("since", type_=UTCDateTime()))
            self._stmts = {
                "recent": select(t.c.item_id).where(pos).order_by(t.c.seq.desc()).limit(bindparam("n")),
                "consumed": select(t.c.item_id).where(pos).distinct(),
                "consumed_typed": select(t.c.item_id, t.c.event_type).where(pos).order_by(t.c.seq),
                "suppressed": select(t.c.item_id, func.max(t.c.ingested_at)).where(neg).group_by(t.c.item_id),
            }
        return self._stmts

    def user_state(
        self, user_id: str, after_ts: datetime | None = None, now: datetime | None = None
    ) -> tuple[set[str], dict[str, datetime]]:
        """What serving masks for a user beyond the online window, from the log (shared by every worker).

        Two indexed reads in one connection, classified by the SQL forms of ``recloop.policy.event_role``.

        Args:
            user_id: the user.
            after_ts: the lake snapshot's newest ``received_at`` for the user (None: the whole log).
            now: the reference time of suppression (default now, UTC).
        Returns:
            (consumed, suppressed): item ids of positives received after ``after_ts``; item_id -> the
            time its newest negative stops suppressing it (negatives received within
            ``policy.suppress_s`` before ``now``).
        """
        now = now or datetime.now(UTC)
        span = timedelta(seconds=self.policy.suppress_s)
        stmts = self._statements()
        params = {"uid": str(user_id), "after": _after(after_ts), "since": now - span}
        with self.engine.connect().execution_options(sqlite_begin="BEGIN") as conn:
            consumed = {r[0] for r in conn.execute(stmts["consumed"], params)}
            newest = conn.execute(stmts["suppressed"], params)
            suppressed = {item: _utc(received) + span for item, received in newest}
        return consumed, suppressed

    def event_types(self, user_id: str, item_ids: Sequence[str]) -> dict[str, str]:
        """The event type of the user's newest positive event on each of ``item_ids`` (explanations' verb).

        One indexed read (user_id), only the positives (``recloop.policy``); items without one are absent.

        Args:
            user_id: the user.
            item_ids: the items asked about (e.g. the history items that explain a recommendation).
        Returns:
            item_id -> event type ("rating", "click", "purchase", ...).
        """
        if not item_ids:
            return {}
        t = self.table
        cond = (t.c.user_id == str(user_id)) & self._positive_clause() & t.c.item_id.in_(list(item_ids))
        q = select(t.c.item_id, t.c.event_type).where(cond).order_by(t.c.seq)
        with self.engine.connect().execution_options(sqlite_begin="BEGIN") as conn:
            return {item: kind for item, kind in conn.execute(q)}  # the newest (largest seq) wins

    def user_state_typed(
        self, user_id: str, after_ts: datetime | None = None, now: datetime | None = None
    ) -> tuple[dict[str, str], dict[str, datetime]]:
        """``user_state`` with the event type of each consumed item's newest positive, in the same two reads.

        Serving's mask and its explanations' verb ("because you rated / clicked ...") come from this one
        read, so ``explain`` adds no round trip to the log.

        Args:
            user_id, after_ts, now: as ``user_state``.
        Returns:
            (consumed, suppressed): item_id -> event type of the newest (largest ``seq``) positive received
            after ``after_ts`` (its keys are ``user_state``'s consumed set); suppressed as ``user_state``.
        """
        now = now or datetime.now(UTC)
        span = timedelta(seconds=self.policy.suppress_s)
        stmts = self._statements()
        params = {"uid": str(user_id), "after": _after(after_ts), "since": now - span}
        with self.engine.connect().execution_options(sqlite_begin="BEGIN") as conn:
            rows = conn.execute(stmts["consumed_typed"], params)
            consumed = {item: kind for item, kind in rows}  # the newest (largest seq) wins
            newest = conn.execute(stmts["suppressed"], params)
            suppressed = {item: _utc(received) + span for item, received in newest}
        return consumed, suppressed

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

    def linked(self, since: datetime | pd.Timestamp | None = None) -> pd.DataFrame:
        """The events linked to an exposure (``request_id`` not null), in log order (``seq``).

        Join them to ``recloop.exposures.ExposureLog.read`` on ``request_id`` (and ``position``).

        Args:
            since: only events received after it (``ingested_at > since``; naive means UTC).
        Returns:
            A frame with ``LINKED_COLUMNS``: request_id (str), position (Int64, <NA> when unknown),
            user_id, item_id, event_type (str), value (float64), timestamp and received_at
            (datetime64[ns, UTC]; received_at is the log's ``ingested_at``).
        """
        t = self.table
        q = select(
            t.c.request_id, t.c.position, t.c.user_id, t.c.item_id, t.c.event_type, t.c.value, t.c.timestamp,
            t.c.ingested_at.label("received_at"),
        ).where(t.c.request_id.is_not(None))
        if since is not None:
            q = q.where(t.c.ingested_at > _utc(since))
        with self.engine.connect().execution_options(sqlite_begin="BEGIN") as conn:
            rows = conn.execute(q.order_by(t.c.seq)).all()
        df = pd.DataFrame([tuple(r) for r in rows], columns=list(LINKED_COLUMNS))
        df["position"] = df["position"].astype("Int64")
        df["value"] = pd.to_numeric(df["value"], errors="coerce").astype("float64")
        for col in ("timestamp", "received_at"):
            df[col] = pd.to_datetime(df[col], utc=True).astype("datetime64[ns, UTC]")
        for col in ("request_id", "user_id", "item_id", "event_type"):
            df[col] = df[col].astype(object)
        return df

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
        """Drop the log's tables (events, exposures, exposure_items) and its version table (tests and teardown)."""
        drop_all(self.engine, self.table.name)

    def close(self) -> None:
        """Release pooled connections."""
        self.engine.dispose()


def _utc(value: Any) -> datetime:
    """A timestamp (a datetime, or text from an SQLite aggregate) as tz-aware UTC (naive means UTC)."""
    ts = pd.Timestamp(value)
    return (ts.tz_localize("UTC") if ts.tzinfo is None else ts.tz_convert("UTC")).to_pydatetime()


def _missing(value: Any) -> bool:
    return value is None or value is pd.NA or value is pd.NaT or (isinstance(value, float) and math.isnan(value))


def _link(request_id: Any, position: Any) -> tuple[str | None, int | None]:
    """An event's optional link to an exposure, checked by the contract's rules and normalised.

    Returns:
        (request_id or None, position or None).
    Raises:
        ContractError: ``request_id`` breaks ``request_id_violation`` or ``position`` ``position_violation``.
    """
    if _missing(request_id):
        request_id = None
    else:
        rule = request_id_violation(request_id)
        if rule:
            raise ContractError("events", "request_id", rule, [request_id])
        request_id = normalise_id(request_id)
    if _missing(position):
        position = None
    else:
        rule = position_violation(position)
        if rule:
            raise ContractError("events", "position", rule, [position])
        position = int(position)
    return request_id, position


def _frame_links(events: pd.DataFrame) -> list[tuple[str | None, int | None]]:
    """The checked ``LINK`` of each row of a frame, in row order (columns may be absent: no link).

    A float ``position`` column of whole numbers (what pandas makes of integers with nulls) is accepted.
    """
    n = len(events)
    request_ids = events["request_id"].tolist() if "request_id" in events.columns else [None] * n
    positions = events["position"].tolist() if "position" in events.columns else [None] * n
    positions = [int(p) if isinstance(p, float) and p.is_integer() else p for p in positions]
    return [_link(r, p) for r, p in zip(request_ids, positions, strict=True)]


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
        r["request_id"], r["position"] = _link(raw.get("request_id"), raw.get("position"))
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

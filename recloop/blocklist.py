"""The catalogue-wide blocklist: items no serving worker recommends (blocked by a business rule, or retired).

State every serving worker must see lives in the event-log database (``recloop.logdb``, table
``blocklist``, revision 0006), never only in process memory:

- ``BlocklistStore``: ``add`` (upsert: a second add updates kind and reason), ``remove``, ``list``,
  ``item_ids``. Written by ``recloop blocklist add|remove`` and ``POST /blocklist``.
- ``CachedBlocklist``: what a serving worker reads on every request: the store's ids, re-read at most
  every ``ttl_s`` seconds (``settings.blocklist_ttl_s``), so a change reaches every worker and replica
  within ``ttl_s`` plus one read. A failed re-read keeps the last ids (logged) and is retried after
  ``ttl_s``: a store outage never unblocks an item, and never fails a request.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import delete, select, update

from recloop.contract import id_violation, normalise_id
from recloop.logdb import BLOCK_REASON_CHARS, LogTableStore
from recloop.ttl import TTLCached

logger = logging.getLogger(__name__)

#: What a blocklist row means: a business rule hides the item, or the item left the catalogue.
KINDS: tuple[str, ...] = ("blocked", "retired")
#: Ids one ``add``/``remove`` call takes at most (the endpoint's bound too).
MAX_IDS_PER_CALL = 1000
DEFAULT_TTL_S = 5.0


def _ids(item_ids: Iterable[str]) -> list[str]:
    """The contract's id rule and normalisation, deduplicated in order.

    Raises:
        ValueError: an id breaks the rule (named), or more than ``MAX_IDS_PER_CALL`` ids.
    """
    out: dict[str, None] = {}
    for raw in item_ids:
        rule = id_violation(raw)
        if rule:
            raise ValueError(f"item_id {str(raw)[:64]!r}: {rule}")
        out[normalise_id(raw)] = None
    if len(out) > MAX_IDS_PER_CALL:
        raise ValueError(f"{len(out)} item ids; expected at most {MAX_IDS_PER_CALL} per call")
    return list(out)


class BlocklistStore(LogTableStore):
    """The blocklist table of the event-log database at SQLAlchemy ``url`` (``settings.event_log_uri``).

    Args:
        url: e.g. ``sqlite:///home/eventlog.db`` or ``postgresql+psycopg://user@host/db``.
        events_table: the events table's name; the blocklist's name derives from it
            (``recloop.logdb.table_names``: "events" → "blocklist").
        create: migrate the schema to head first (``recloop.logdb.upgrade``).
    Raises:
        sqlalchemy.exc.SQLAlchemyError: with ``create``, the database is unreachable or a migration failed.
    """

    TABLE = "blocklist"

    def add(self, item_ids: Iterable[str], *, kind: str = "blocked", reason: str | None = None,
            now: datetime | None = None) -> list[str]:
        """Block (or retire) items; an item already listed gets the new kind and reason.

        One transaction (SQLite: the write lock; PostgreSQL: row locks of the updated rows); a concurrent
        add of the same id is an update, never a duplicate.

        Args:
            item_ids: raw item ids (the contract's id rule; at most ``MAX_IDS_PER_CALL``). Ids the model
                does not know are stored too (a later version may know them).
            kind: "blocked" or "retired".
            reason: free text, at most ``BLOCK_REASON_CHARS`` characters (None: none).
            now: the time recorded as ``added_at`` of new rows (default now, UTC).
        Returns:
            The ids newly listed (not those that were listed already), in input order.
        Raises:
            ValueError: a bad id, kind or reason.
        """
        ids = _ids(item_ids)
        if kind not in KINDS:
            raise ValueError(f"kind={kind!r}; expected one of {list(KINDS)}")
        if reason is not None and len(reason) > BLOCK_REASON_CHARS:
            raise ValueError(f"reason has {len(reason)} characters; expected at most {BLOCK_REASON_CHARS}")
        when = now or datetime.now(UTC)
        t = self.table
        with self.engine.begin() as conn:
            listed = set(conn.execute(select(t.c.item_id).where(t.c.item_id.in_(ids))).scalars()) if ids else set()
            if listed:
                conn.execute(update(t).where(t.c.item_id.in_(listed)).values(kind=kind, reason=reason))
            new = [i for i in ids if i not in listed]
            if new:
                conn.execute(self._insert_ignoring_duplicates(), [
                    {"item_id": i, "kind": kind, "reason": reason, "added_at": when} for i in new
                ])
        logger.info("blocklist add kind=%s n_new=%d n_updated=%d", kind, len(new), len(listed))
        return new

    def _insert_ignoring_duplicates(self) -> Any:
        """INSERT ... ON CONFLICT (item_id) DO NOTHING on SQLite and PostgreSQL (a concurrent add won)."""
        if self.engine.dialect.name == "postgresql":
            from sqlalchemy.dialects.postgresql import insert
        else:
            from sqlalchemy.dialects.sqlite import insert
        return insert(self.table).on_conflict_do_nothing(index_elements=["item_id"])

    def remove(self, item_ids: Iterable[str]) -> list[str]:
        """Unblock items. Returns the ids that were listed (others are ignored), in input order.

        Raises:
            ValueError: a bad id.
        """
        ids = _ids(item_ids)
        t = self.table
        with self.engine.begin() as conn:
            listed = set(conn.execute(select(t.c.item_id).where(t.c.item_id.in_(ids))).scalars()) if ids else set()
            if listed:
                conn.execute(delete(t).where(t.c.item_id.in_(listed)))
        logger.info("blocklist remove n_removed=%d", len(listed))
        return [i for i in ids if i in listed]

    def list(self) -> list[dict[str, Any]]:
        """Every listed item: [{item_id, kind, reason, added_at (ISO 8601 UTC)}], ordered by item_id."""
        t = self.table
        with self._read() as conn:
            rows = conn.execute(select(t).order_by(t.c.item_id)).all()
        return [{"item_id": r.item_id, "kind": r.kind, "reason": r.reason, "added_at": r.added_at.isoformat()}
                for r in rows]

    def item_ids(self) -> frozenset[str]:
        """The listed item ids (one read; takes no write lock)."""
        with self._read() as conn:
            return frozenset(conn.execute(select(self.table.c.item_id)).scalars())

    def _read(self) -> Any:
        conn = self.engine.connect()
        return conn.execution_options(sqlite_begin="BEGIN") if self.engine.dialect.name == "sqlite" else conn


class CachedBlocklist:
    """A serving worker's view of the blocklist: ``BlocklistStore.item_ids`` re-read at most every ``ttl_s``
    (``recloop.ttl.TTLCached``: one re-read at a time; a failed read keeps the last ids, an empty set before the
    first success, and is retried after ``ttl_s``).

    Args:
        store: anything with ``item_ids() -> frozenset[str]``.
        ttl_s: seconds the ids are reused (>= 0; 0 = read on every call).
        clock: monotonic seconds (tests pass a fake).
    Raises:
        ValueError: ttl_s < 0.
    """

    def __init__(self, store: Any, ttl_s: float = DEFAULT_TTL_S, clock: Any = time.monotonic) -> None:
        self.store, self.ttl_s = store, ttl_s
        self._cache: TTLCached[frozenset[str]] = TTLCached(lambda: frozenset(store.item_ids()), frozenset(), ttl_s,
                                                           clock, "blocklist")

    @property
    def last_error(self) -> str | None:
        """Why the last read failed (None after a success)."""
        return self._cache.last_error

    def invalidate(self) -> None:
        """Re-read on the next call (this process changed the store)."""
        self._cache.invalidate()

    def item_ids(self) -> frozenset[str]:
        """The blocked item ids, at most ``ttl_s`` seconds old (or the last ones read, after a failure)."""
        return self._cache.get()

"""New catalogue items: items added after the lake snapshot, seen by every serving worker and by the next retrain.

State every serving worker must see lives in the event-log database (``recloop.logdb``, table
``catalog_items``, revision 0007), never only in process memory:

- ``CatalogStore``: ``add`` (upsert by ``item_id``: a second add replaces title, genres and text), ``list``,
  ``items_frame`` (the contract's ``items`` frame). Written by ``POST /items`` and ``recloop catalog add``
  (a file of items: the source batch path).
- ``CachedCatalog``: what a serving worker reads per request: the store's rows, re-read at most every ``ttl_s``
  seconds (``settings.catalog_ttl_s``), so a new item reaches every worker and replica within ``ttl_s`` plus
  one read. A failed re-read keeps the last rows (logged). ``version`` changes whenever the rows do.

A text-aware served model scores the new items at once from their text (``models.text_items``); the train
flow adds them to the vocabulary, so the next retrain gives them ID embeddings.
"""

from __future__ import annotations

import hashlib
import logging
import time
import unicodedata
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from typing import Any

import pandas as pd
from sqlalchemy import select, update

from recloop.contract import id_violation, normalise_id
from recloop.logdb import CATALOG_GENRES_CHARS, CATALOG_TITLE_CHARS, LogTableStore
from recloop.ttl import TTLCached

logger = logging.getLogger(__name__)

#: Longest free text of an item (a description); the API's body limit bounds it too.
MAX_TEXT_CHARS = 4000
#: Genres of one item at most, and characters of one genre.
MAX_GENRES = 30
MAX_GENRE_CHARS = 64
#: Items one ``add`` takes at most.
MAX_ITEMS_PER_CALL = 1000
DEFAULT_TTL_S = 5.0
GENRE_SEP = "|"


def _text_rule(value: object, name: str, max_chars: int, required: bool) -> str:
    """'' when ``value`` is acceptable free text, else the rule it breaks (named)."""
    if value is None:
        return f"{name}: required" if required else ""
    if not isinstance(value, str):
        return f"{name}: must be a string"
    if any(unicodedata.category(ch) == "Cc" and ch not in "\n\t" for ch in value):
        return f"{name}: must not contain control characters"
    if any(unicodedata.category(ch) in ("Cs", "Co", "Cn") for ch in value):
        return f"{name}: must not contain surrogate, private-use or unassigned characters"
    if required and not value.strip():
        return f"{name}: must not be empty"
    if len(value) > max_chars:
        return f"{name}: must be at most {max_chars} characters; got {len(value)}"
    return ""


def validate_item(item: Mapping[str, Any]) -> dict[str, Any]:
    """One new item checked and normalised: ``{item_id, title, genres (list[str]), text (str | None)}``.

    Rules: ``item_id`` the contract's id rule (``recloop.contract.id_violation``); ``title`` non-empty, at most
    ``CATALOG_TITLE_CHARS`` characters; ``genres`` at most ``MAX_GENRES`` non-empty strings of at most
    ``MAX_GENRE_CHARS`` without ``|``; ``text`` at most ``MAX_TEXT_CHARS``; no control characters (newline and
    tab allowed in ``text``).

    Raises:
        ValueError: the first rule broken, naming the field.
    """
    rule = id_violation(item.get("item_id"))
    if rule:
        raise ValueError(f"item_id {str(item.get('item_id'))[:64]!r}: {rule}")
    title = item.get("title")
    rule = _text_rule(title, "title", CATALOG_TITLE_CHARS, True) or (
        "title: must not contain line breaks" if isinstance(title, str) and ("\n" in title or "\t" in title) else "")
    rule = rule or _text_rule(item.get("text"), "text", MAX_TEXT_CHARS, False)
    if rule:
        raise ValueError(rule)
    genres = [str(g).strip() for g in (item.get("genres") or [])]
    if len(genres) > MAX_GENRES:
        raise ValueError(f"genres: at most {MAX_GENRES}; got {len(genres)}")
    for g in genres:
        rule = _text_rule(g, "genres", MAX_GENRE_CHARS, True)
        if rule or GENRE_SEP in g or "\n" in g:
            raise ValueError(rule or f"genres: {g[:64]!r} must not contain '{GENRE_SEP}' or line breaks")
    joined = GENRE_SEP.join(dict.fromkeys(genres))
    if len(joined) > CATALOG_GENRES_CHARS:
        raise ValueError(f"genres: at most {CATALOG_GENRES_CHARS} characters in all; got {len(joined)}")
    text = item.get("text")
    return {"item_id": normalise_id(item["item_id"]), "title": unicodedata.normalize("NFC", title).strip(),
            "genres": list(dict.fromkeys(genres)), "text": (text.strip() or None) if isinstance(text, str) else None}


class CatalogStore(LogTableStore):
    """The ``catalog_items`` table of the event-log database at SQLAlchemy ``url`` (``settings.event_log_uri``).

    Args:
        url: e.g. ``sqlite:///home/eventlog.db`` or ``postgresql+psycopg://user@host/db``.
        events_table: the events table's name; the catalogue's name derives from it
            (``recloop.logdb.table_names``: "events" -> "catalog_items").
        create: migrate the schema to head first (``recloop.logdb.upgrade``).
    Raises:
        sqlalchemy.exc.SQLAlchemyError: with ``create``, the database is unreachable or a migration failed.
    """

    TABLE = "catalog_items"

    def add(self, items: Iterable[Mapping[str, Any]], now: datetime | None = None) -> list[str]:
        """Add items (``{item_id, title, genres?, text?}``); an item already listed gets the new title, genres
        and text (``added_at`` is kept). One transaction, the same on SQLite and PostgreSQL.

        Returns:
            The ids newly added (not those updated), in input order.
        Raises:
            ValueError: a bad item (``validate_item``) or more than ``MAX_ITEMS_PER_CALL``; nothing is stored.
        """
        rows: dict[str, dict[str, Any]] = {}
        for item in items:
            row = validate_item(item)
            rows[row["item_id"]] = row
        if len(rows) > MAX_ITEMS_PER_CALL:
            raise ValueError(f"{len(rows)} items; expected at most {MAX_ITEMS_PER_CALL} per call")
        when = now or datetime.now(UTC)
        t = self.table
        ids = list(rows)
        with self.engine.begin() as conn:
            listed = set(conn.execute(select(t.c.item_id).where(t.c.item_id.in_(ids))).scalars()) if ids else set()
            for item_id in listed:
                r = rows[item_id]
                conn.execute(update(t).where(t.c.item_id == item_id).values(
                    title=r["title"], genres=GENRE_SEP.join(r["genres"]) or None, text=r["text"]))
            new = [i for i in ids if i not in listed]
            if new:
                conn.execute(self._insert_ignoring_duplicates(), [
                    {"item_id": i, "title": rows[i]["title"], "genres": GENRE_SEP.join(rows[i]["genres"]) or None,
                     "text": rows[i]["text"], "added_at": when} for i in new])
        logger.info("catalogue add n_new=%d n_updated=%d", len(new), len(listed))
        return new

    def _insert_ignoring_duplicates(self) -> Any:
        """INSERT ... ON CONFLICT (item_id) DO NOTHING on SQLite and PostgreSQL (a concurrent add won)."""
        if self.engine.dialect.name == "postgresql":
            from sqlalchemy.dialects.postgresql import insert
        else:
            from sqlalchemy.dialects.sqlite import insert
        return insert(self.table).on_conflict_do_nothing(index_elements=["item_id"])

    def list(self) -> list[dict[str, Any]]:
        """Every catalogue item: [{item_id, title, genres (list), text, added_at (ISO 8601 UTC)}] by item_id."""
        t = self.table
        conn = self.engine.connect()
        if self.engine.dialect.name == "sqlite":
            conn = conn.execution_options(sqlite_begin="BEGIN")  # a read takes no write lock
        with conn:
            rows = conn.execute(select(t).order_by(t.c.item_id)).all()
        return [{"item_id": r.item_id, "title": r.title, "genres": r.genres.split(GENRE_SEP) if r.genres else [],
                 "text": r.text, "added_at": r.added_at.isoformat()} for r in rows]

    def items_frame(self) -> pd.DataFrame:
        """The catalogue as the contract's ``items`` frame (``recloop.contract.ITEM_COLUMNS``; ``created_at`` =
        ``added_at``; ``text`` empty when none, so ``recloop.features.item_text`` uses title and genres)."""
        return items_frame(self.list())


def items_frame(rows: Iterable[Mapping[str, Any]]) -> pd.DataFrame:
    """``CatalogStore.list`` rows -> the contract's ``items`` frame (item_id, title, genres, text, created_at)."""
    rows = list(rows)
    return pd.DataFrame({
        "item_id": [r["item_id"] for r in rows],
        "title": [r["title"] for r in rows],
        "genres": [list(r["genres"]) for r in rows],
        "text": [r["text"] or "" for r in rows],
        "created_at": pd.to_datetime([r["added_at"] for r in rows], utc=True),
    })


def rows_version(rows: Iterable[Mapping[str, Any]]) -> str:
    """A content hash (12 hex chars) of catalogue rows: changes whenever an item is added or edited."""
    digest = hashlib.sha1()
    for r in rows:
        digest.update("\x1f".join([r["item_id"], r["title"], "|".join(r["genres"]), r["text"] or ""]).encode())
        digest.update(b"\x1e")
    return digest.hexdigest()[:12]


class CachedCatalog:
    """A serving worker's view of the catalogue: ``CatalogStore.list`` re-read at most every ``ttl_s``
    (``recloop.ttl.TTLCached``: one re-read at a time; a failed read keeps the last rows, none before the first
    success, and is retried after ``ttl_s``).

    Args:
        store: anything with ``list() -> [{item_id, title, genres, text, added_at}]``.
        ttl_s: seconds the rows are reused (>= 0; 0 = read on every call).
        clock: monotonic seconds (tests pass a fake).
    Raises:
        ValueError: ttl_s < 0.
    """

    def __init__(self, store: Any, ttl_s: float = DEFAULT_TTL_S, clock: Any = time.monotonic) -> None:
        self.store, self.ttl_s = store, ttl_s

        def read() -> tuple[tuple[dict[str, Any], ...], str]:
            rows = tuple(store.list())
            return rows, rows_version(rows)

        self._cache: TTLCached[tuple[tuple[dict[str, Any], ...], str]] = TTLCached(
            read, ((), rows_version(())), ttl_s, clock, "catalogue")

    @property
    def last_error(self) -> str | None:
        """Why the last read failed (None after a success)."""
        return self._cache.last_error

    def invalidate(self) -> None:
        """Re-read on the next call (this process changed the store)."""
        self._cache.invalidate()

    def rows(self) -> tuple[tuple[dict[str, Any], ...], str]:
        """(the catalogue rows, their version), at most ``ttl_s`` seconds old (or the last ones read)."""
        return self._cache.get()
        if not self._lock.acquire(blocking=self._read_at is None):
            return self._rows, self._version  # another request is re-reading
        try:
            try:
                rows = tuple(self.store.list())
                self._rows, self._version = rows, rows_version(rows)
                self.last_error = None
            except Exception as err:  # noqa: BLE001 - keep serving the last rows; retried after ttl_s
                self.last_error = f"{type(err).__name__}: {err}"[:300]
                logger.warning("catalogue not read; keeping %d items error=%s", len(self._rows), self.last_error)
            self._read_at = self._clock()
        finally:
            self._lock.release()
        return self._rows, self._version

"""Forget a user: a salted-hash tombstone, deletion through every store under the loop's lock, a receipt.

The right to erasure (GDPR art. 17) as the platform implements it; the policy is stated in
docs/operations.md ("Forgetting a user"):

1. **Tombstone first.** ``run_forget`` writes the user's salted hash (``UserHasher``: HMAC-SHA256 keyed by
   ``settings.forget_salt``, else a random key generated once under ``<home>/state/forget_salt``) into the
   ``forgotten_users`` table and commits. From then on the event log refuses the user's events inside its
   per-user write lock (``recloop.eventlog.EventLog`` raises ``UserForgotten``; the API answers 410),
   ingestion and validation drop them with a count (``drop_forgotten``), and every serving worker treats
   the user as unknown (``TombstoneCheck``, one indexed read per request).
2. **Then delete, under the loop's lock** (``loop_lock``: the continuous loop holds it for a whole turn, so
   a turn never sees half a deletion). Every store keyed by user has a handler (``STORES``, the registry
   keyed by store name; ``recloop.forget_handlers`` for the kernel's stores, ``featurestore.forget`` for
   the online store, ``serving.forget`` assembles them). Each handler deletes, then the stores live
   writers may still write to (a feedback or exposure already past its check) are deleted again after
   ``settle_s``, and every store is verified empty of the user before the receipt is completed.
3. **The receipt** (the same row): the hash, ``requested_at``, ``completed_at``, rows removed per store
   (JSON), and ``honoured_by``: the MLflow run of the cold retrain that no longer saw the user
   (``flows/loop.py``). The raw id is never stored, and never logged (``log_id``).
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import json
import logging
import os
import secrets
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

from filelock import FileLock, Timeout
from sqlalchemy import Connection, Table, func, select, update

from recloop.contract import id_violation, normalise_id
from recloop.logdb import LogTableStore

logger = logging.getLogger(__name__)

#: The stores keyed by user, each with the handler that deletes from it (``ForgetHandler.name``). A test
#: fails when a table or file with a user column is not covered by one of them.
STORES: dict[str, str] = {
    "event_log": "events table of the event-log database (feedback, rows keyed by user_id)",
    "exposure_log": "exposures and their exposure_items (request_ids of the user's exposures)",
    "lake": "lake Parquet: events/<batch>/ and users/<batch>/, rewritten atomically",
    "quarantine": "quarantine/<batch>/quarantined.parquet: rows the gate set aside",
    "validation_docs": "quarantine/<batch>/result.json (GX results) and the Data Docs site (data_docs/)",
    "feature_tables": "Feast offline source tables (features/*.parquet with a user_id column)",
    "online_store": "Feast online store rows of the user entity (SQLite tables or the Redis hash)",
}
#: Optional steps: a serving process's in-memory state, tags on the registry's versions.
OPTIONAL_STEPS: dict[str, str] = {
    "serving_memory": "the serving process's lake snapshot (histories, seen and suppressed sets), owed pushes",
    "model_registry": "registry versions trained before the deletion: tagged recloop.holds_forgotten_users",
}
#: Tables of the event-log schema with a user column, and the store whose handler covers each
#: (``forgotten_users`` holds the salted hash only: the receipt).
TABLE_STORES: dict[str, str] = {"events": "event_log", "exposures": "exposure_log", "forgotten_users": "receipt"}
#: Folders under ``RECLOOP_HOME`` whose Parquet files may have a user column, and their store.
FILE_STORES: dict[str, str] = {"lake": "lake", "quarantine": "quarantine", "features": "feature_tables"}
SALT_FILE = "forget_salt"
LOCK_FILE = "loop.lock"
#: Registry tag of a model version trained while a forgotten user's data was still in its training set.
HOLDS_FORGOTTEN_TAG = "recloop.holds_forgotten_users"


class UserForgotten(Exception):  # noqa: N818 - a state, like KeyError
    """The user was forgotten: its events are refused (HTTP 410). Carries the hash, never the id."""

    def __init__(self, user_hash: str) -> None:
        self.user_hash = user_hash
        super().__init__(f"user was forgotten (receipt {user_hash[:12]}…): its events are refused")


class ForgetIncomplete(RuntimeError):
    """Rows of the user are still in some store after the deletion passes (``left``: store -> rows)."""

    def __init__(self, left: Mapping[str, int]) -> None:
        self.left = dict(left)
        super().__init__(f"user rows left after forgetting: {self.left}; run the forget again")


# ---- the salted hash -----------------------------------------------------------------------------------
def salt_path(home: Path) -> Path:
    """Where the generated key lives when ``settings.forget_salt`` is unset."""
    return Path(home) / "state" / SALT_FILE


def load_key(salt: str | None, home: Path, *, create: bool = False) -> bytes | None:
    """The HMAC key: ``salt`` (``settings.forget_salt``), else the key file under ``home``.

    Args:
        salt: the configured secret (None: use the file).
        home: ``settings.home``.
        create: generate the file (32 random bytes, hex, mode 0600) when it is missing; a concurrent
            creator's file wins (``O_EXCL``).
    Returns:
        The key, or None when there is none and ``create`` is False (nothing was ever forgotten here).
    """
    if salt:
        return salt.encode()
    path = salt_path(home)
    if path.exists():
        return path.read_text().strip().encode()
    if not create:
        return None
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return path.read_text().strip().encode()
    with os.fdopen(fd, "w") as out:
        out.write(secrets.token_hex(32))
    return path.read_text().strip().encode()


@dataclass(frozen=True)
class UserHasher:
    """HMAC-SHA256 of a user id (the contract's normalised form) under a secret key: 64 hex chars.

    Keyed, so a receipt cannot be reversed by hashing candidate ids without the key (RFC 2104).
    """

    key: bytes = field(repr=False)

    def __call__(self, user_id: str) -> str:
        return hmac.new(self.key, normalise_id(user_id).encode(), hashlib.sha256).hexdigest()


def user_hasher(settings: Any, *, create: bool = False) -> UserHasher | None:
    """The hasher of ``settings`` (``forget_salt`` or the key file under ``home``); None when no key exists."""
    key = load_key(getattr(settings, "forget_salt", None), settings.home, create=create)
    return None if key is None else UserHasher(key)


def log_id(user_id: str) -> str:
    """What a log line may carry instead of a user id: an unkeyed 10-hex digest (correlates lines only)."""
    return "u:" + hashlib.sha256(str(user_id).encode()).hexdigest()[:10]


def check_user_id(user_id: Any) -> str:
    """The contract's id rule and normalisation. Raises ``ValueError`` naming the rule."""
    rule = id_violation(user_id)
    if rule:
        raise ValueError(f"user_id: {rule}")
    return normalise_id(user_id)


# ---- receipts and tombstones ---------------------------------------------------------------------------
class ForgetStore(LogTableStore):
    """The ``forgotten_users`` table (``recloop.logdb``, revision 0007): tombstones and receipts.

    Args: as ``recloop.logdb.LogTableStore`` (``url`` = ``settings.event_log_uri``).
    """

    TABLE = "forgotten_users"

    def tombstone(self, user_hash: str, now: datetime | None = None) -> bool:
        """Record the request (committed before any deletion). Returns True when new; a repeated request
        keeps its ``requested_at`` and reopens the receipt (``completed_at`` cleared until it completes)."""
        t = self.table
        with self.engine.begin() as conn:
            if conn.execute(select(t.c.user_hash).where(t.c.user_hash == user_hash)).first() is not None:
                conn.execute(update(t).where(t.c.user_hash == user_hash).values(completed_at=None))
                return False
            conn.execute(t.insert().values(user_hash=user_hash, requested_at=now or datetime.now(UTC)))
        return True

    def complete(self, user_hash: str, rows: Mapping[str, int], now: datetime | None = None) -> None:
        """Mark the deletion done with the rows removed per store."""
        t = self.table
        with self.engine.begin() as conn:
            conn.execute(update(t).where(t.c.user_hash == user_hash).values(
                completed_at=now or datetime.now(UTC), rows=json.dumps(dict(rows), sort_keys=True)))

    def honour(self, user_hashes: Iterable[str], run_id: str) -> int:
        """Record ``run_id`` (a cold retrain without these users) as honouring the receipts. Returns rows."""
        hashes = list(user_hashes)
        if not hashes:
            return 0
        t = self.table
        with self.engine.begin() as conn:
            return int(conn.execute(update(t).where(t.c.user_hash.in_(hashes)).values(honoured_by=run_id)).rowcount)

    def get(self, user_hash: str) -> dict[str, Any] | None:
        """One receipt (``receipts``' form) or None."""
        rows = self.receipts([user_hash])
        return rows[0] if rows else None

    def receipts(self, user_hashes: Iterable[str] | None = None) -> list[dict[str, Any]]:
        """Receipts ordered by ``requested_at``: user_hash, requested_at, completed_at (ISO or None), rows
        (dict or None), honoured_by, status ("pending" | "done" | "honoured")."""
        t = self.table
        q = select(t).order_by(t.c.requested_at, t.c.user_hash)
        if user_hashes is not None:
            q = q.where(t.c.user_hash.in_(list(user_hashes)))
        with self._read() as conn:
            rows = conn.execute(q).mappings().all()
        return [{
            "user_hash": r["user_hash"],
            "requested_at": r["requested_at"].isoformat(),
            "completed_at": r["completed_at"].isoformat() if r["completed_at"] else None,
            "rows": json.loads(r["rows"]) if r["rows"] else None,
            "honoured_by": r["honoured_by"],
            "status": "pending" if r["completed_at"] is None else ("honoured" if r["honoured_by"] else "done"),
        } for r in rows]

    def unhonoured(self) -> list[str]:
        """Hashes of completed deletions no cold retrain has honoured yet (the next loop turn trains cold)."""
        t = self.table
        q = select(t.c.user_hash).where(t.c.completed_at.is_not(None), t.c.honoured_by.is_(None))
        with self._read() as conn:
            return list(conn.execute(q.order_by(t.c.user_hash)).scalars())

    def incomplete(self) -> list[str]:
        """Hashes whose deletion has not completed (running, waiting for the loop's lock, or interrupted)."""
        t = self.table
        with self._read() as conn:
            return list(conn.execute(select(t.c.user_hash).where(t.c.completed_at.is_(None))).scalars())

    def is_forgotten(self, user_hash: str) -> bool:
        """One primary-key read."""
        with self._read() as conn:
            return forgotten_hashes(conn, self.table, [user_hash]) == {user_hash}

    def forgotten(self, user_hashes: Iterable[str]) -> set[str]:
        """The hashes among ``user_hashes`` that have a tombstone."""
        with self._read() as conn:
            return forgotten_hashes(conn, self.table, user_hashes)

    def count(self) -> int:
        """How many users were ever forgotten here (one aggregate read)."""
        with self._read() as conn:
            return int(conn.execute(select(func.count()).select_from(self.table)).scalar() or 0)

    def any(self) -> bool:
        """Whether any user was ever forgotten here."""
        with self._read() as conn:
            return conn.execute(select(self.table.c.user_hash).limit(1)).first() is not None

    def _read(self) -> Any:
        conn = self.engine.connect()
        return conn.execution_options(sqlite_begin="BEGIN") if self.engine.dialect.name == "sqlite" else conn


def forgotten_hashes(conn: Connection, table: Table, user_hashes: Iterable[str]) -> set[str]:
    """The hashes among ``user_hashes`` that have a tombstone (chunks of 500, on ``conn``'s transaction)."""
    hashes = sorted(set(user_hashes))
    found: set[str] = set()
    for start in range(0, len(hashes), 500):
        chunk = hashes[start:start + 500]
        found |= set(conn.execute(select(table.c.user_hash).where(table.c.user_hash.in_(chunk))).scalars())
    return found


def forgotten_among(conn: Connection, table: Table, user_ids: Iterable[str], hasher: UserHasher | None) -> set[str]:
    """The ids among ``user_ids`` that are forgotten, read on ``conn`` (inside the caller's lock).

    Raises:
        RuntimeError: tombstones exist but no key is configured (``forget_salt`` unset and no key file under
            this home): the check cannot be made, so nothing is admitted rather than a forgotten user.
    """
    ids = {str(u) for u in user_ids}
    if not ids:
        return set()
    if hasher is None:
        if conn.execute(select(table.c.user_hash).limit(1)).first() is None:
            return set()
        raise RuntimeError("users were forgotten but no forget key is available: set RECLOOP_FORGET_SALT "
                           "(the same on every replica) or keep <home>/state/forget_salt")
    by_hash = {hasher(u): u for u in ids}
    return {by_hash[h] for h in forgotten_hashes(conn, table, by_hash)}


class TombstoneCheck:
    """A serving worker's per-request check: is this user forgotten? (one primary-key read; a hit is
    remembered for the process's life, tombstones are permanent).

    A failed read answers False (logged): serving keeps answering through a database outage, and the
    user's stored rows were deleted by then anyway.

    Args:
        store: a ``ForgetStore`` (anything with ``is_forgotten(hash)`` and ``any()``).
        hasher: a function returning the current ``UserHasher`` or None (re-read while None: the key file
            appears with the first forget).
    """

    def __init__(self, store: Any, hasher: Callable[[], UserHasher | None]) -> None:
        self.store, self._hasher_of = store, hasher
        self._hasher: UserHasher | None = None
        self._known: set[str] = set()

    def hash_of(self, user_id: str) -> str | None:
        """The user's hash, or None when no key exists yet."""
        if self._hasher is None:
            self._hasher = self._hasher_of()
        return None if self._hasher is None else self._hasher(user_id)

    def is_forgotten(self, user_id: str) -> bool:
        """True when the user has a tombstone."""
        try:
            user_hash = self.hash_of(user_id)
            if user_hash is None:
                return False
            if user_hash in self._known:
                return True
            hit = bool(self.store.is_forgotten(user_hash))
        except Exception as err:  # noqa: BLE001 - never fail a request on this read
            logger.warning("tombstone check failed; answering as not forgotten error=%s", err)
            return False
        if hit:
            self._known.add(user_hash)
        return hit

    def count(self) -> int:
        """The store's number of tombstones (a failed read raises)."""
        return int(self.store.count())

    def forgotten_ids(self, user_ids: Iterable[str]) -> set[str]:
        """The forgotten ids among ``user_ids`` (bulk reads; a failed read raises)."""
        ids = {str(u) for u in user_ids}
        if not ids or self.hash_of("") is None:
            return set()
        by_hash = {self.hash_of(u): u for u in ids}
        return {by_hash[h] for h in self.store.forgotten(by_hash)}


def tombstone_filter(settings: Any) -> Callable[[Iterable[str]], set[str]] | None:
    """A function returning the forgotten ids among some raw user ids, or None when nobody was forgotten
    (no key, or an event-log database that does not exist yet): ingestion's and validation's check."""
    hasher = user_hasher(settings)
    url = settings.event_log_uri
    if hasher is None or (url.startswith("sqlite:///") and not Path(url[len("sqlite:///"):]).exists()):
        return None
    with ForgetStore(url) as store:
        if not store.any():
            return None

    def forgotten(user_ids: Iterable[str]) -> set[str]:
        with ForgetStore(url, create=False) as store, store._read() as conn:
            return forgotten_among(conn, store.table, user_ids, hasher)

    return forgotten


def drop_forgotten(frame: Any, forgotten: Callable[[Iterable[str]], set[str]] | None,
                   column: str = "user_id") -> tuple[Any, int]:
    """``frame`` without the rows of forgotten users (raw ids, compared in the contract's normal form).

    Args:
        frame: a raw or coerced frame with ``column`` (or None).
        forgotten: ``tombstone_filter``'s function, or None (nobody forgotten: ``frame`` unchanged).
    Returns:
        (the kept rows, the number of rows dropped).
    """
    if frame is None or forgotten is None or column not in frame.columns or not len(frame):
        return frame, 0
    raw = frame[column]
    valid = raw.map(lambda v: not id_violation(v))
    ids = raw.where(valid, None).map(lambda v: normalise_id(v) if v is not None else None)
    gone = forgotten(set(ids.dropna()))
    if not gone:
        return frame, 0
    drop = ids.isin(gone).to_numpy()
    return frame[~drop].reset_index(drop=True), int(drop.sum())


# ---- the loop's lock -----------------------------------------------------------------------------------
def loop_lock(home: Path) -> FileLock:
    """The continuous loop's lock (``<home>/state/loop.lock``, ``filelock``: across threads and processes).

    The loop holds it for a whole turn (``holds_loop_lock``); a forget holds it while it deletes.
    """
    path = Path(home) / "state" / LOCK_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    return FileLock(path)


def holds_loop_lock(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Run ``fn`` holding ``loop_lock(get_settings().home)`` (waits for a forget in progress)."""

    @functools.wraps(fn)
    def locked(*args: Any, **kwargs: Any) -> Any:
        from recloop.settings import get_settings

        with loop_lock(get_settings().home):
            return fn(*args, **kwargs)

    return locked


# ---- running a forget ----------------------------------------------------------------------------------
class ForgetHandler(Protocol):
    """Deletes one user from one store (``STORES``/``OPTIONAL_STEPS`` name it)."""

    name: str
    #: deleted again after ``settle_s`` (a live writer may have written past its check)
    repeat: bool

    def delete(self, user_id: str) -> int:
        """Remove the user's rows (files: rows rewritten away). Returns how many."""

    def remaining(self, user_id: str) -> int:
        """Rows of the user still stored (0 after a complete deletion)."""

    def durable(self) -> None:
        """Make the deletion durable and unrecoverable from the store's files (SQLite: WAL checkpoint)."""


@dataclass
class ForgetResult:
    """What ``run_forget`` did: the receipt's fields plus ``status`` ("done" | "pending") and ``seconds``."""

    user_hash: str
    status: str
    rows: dict[str, int]
    seconds: dict[str, float]
    new: bool

    def as_dict(self) -> dict[str, Any]:
        return {"user_hash": self.user_hash, "status": self.status, "rows": self.rows,
                "seconds": self.seconds, "new_request": self.new}


def run_forget(user_id: str, settings: Any, handlers: Iterable[ForgetHandler], *,
               lock_timeout_s: float | None = None, settle_s: float = 1.0,
               events_table: str = "events") -> ForgetResult:
    """Forget ``user_id`` through every handler: tombstone, delete under the loop's lock, settle, delete
    again, verify, make durable, complete the receipt.

    Args:
        user_id: the raw id (the contract's id rule).
        settings: ``recloop.settings.Settings`` (home, event log, forget key).
        handlers: one per ``STORES`` name (all required), optional ``OPTIONAL_STEPS``.
        lock_timeout_s: how long to wait for the loop's lock (None: as long as a turn takes). On a
            timeout the tombstone stays (serving and ingestion already refuse the user) and the result's
            status is "pending": run the forget again (it is idempotent).
        settle_s: pause before the second pass over ``repeat`` handlers (>= the exposure writer's flush
            interval plus a commit).
        events_table: the event-log schema's events table (its ``forgotten_users`` table holds the receipt).
    Returns:
        ``ForgetResult``.
    Raises:
        ValueError: a bad user id, or a required store has no handler.
        ForgetIncomplete: rows are left after both passes (the receipt stays pending).
    """
    user_id = check_user_id(user_id)
    handlers = list(handlers)
    missing = sorted(set(STORES) - {h.name for h in handlers})
    if missing:
        raise ValueError(f"no forget handler for stores {missing}; every store in recloop.forget.STORES needs one")
    hasher = user_hasher(settings, create=True)
    assert hasher is not None  # create=True always yields a key
    user_hash = hasher(user_id)
    t0 = time.perf_counter()
    store = ForgetStore(settings.event_log_uri, events_table=events_table)
    try:
        new = store.tombstone(user_hash)
        seconds = {"tombstone": round(time.perf_counter() - t0, 4)}
        lock = loop_lock(settings.home)
        try:
            lock.acquire(timeout=-1 if lock_timeout_s is None else lock_timeout_s)
        except Timeout:
            logger.warning("forget pending: the loop holds its lock user=%s", log_id(user_id))
            return ForgetResult(user_hash, "pending", {}, seconds, new)
        try:
            rows = _delete_everywhere(user_id, handlers, settle_s, seconds)
        finally:
            lock.release()
        store.complete(user_hash, rows)
    finally:
        store.close()
    seconds["total"] = round(time.perf_counter() - t0, 4)
    logger.info("forget done user=%s rows=%s seconds=%.3f", log_id(user_id), rows, seconds["total"])
    return ForgetResult(user_hash, "done", rows, seconds, new)


def _delete_everywhere(user_id: str, handlers: list[ForgetHandler], settle_s: float,
                       seconds: dict[str, float]) -> dict[str, int]:
    rows: dict[str, int] = {}
    for handler in handlers:
        t = time.perf_counter()
        rows[handler.name] = int(handler.delete(user_id))
        seconds[handler.name] = round(time.perf_counter() - t, 4)
    if settle_s > 0:
        time.sleep(settle_s)
    for handler in handlers:
        if handler.repeat:
            rows[handler.name] += int(handler.delete(user_id))
    left = {h.name: n for h in handlers if (n := int(h.remaining(user_id)))}
    if left:
        raise ForgetIncomplete(left)
    for handler in handlers:
        handler.durable()
    return rows

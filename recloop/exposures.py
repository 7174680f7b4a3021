"""The exposure log: what each request showed, written off the request path (SQLAlchemy 2, SQLite | PostgreSQL).

One ``record`` per served list: the ``exposures`` row (request id, user, time, model version, variant,
experiment arm, policy, the history the scores were computed from, the exploration pool size) and one
``exposure_items`` row per shown item (1-based position, item, score, interleaving team, propensity).
Feedback events carry the same ``request_id`` and ``position`` (``EventLog.append(..., request_id=, position=)``), so
``EventLog.linked()`` joins them to what was shown. Tables and names: ``recloop.logdb``.

``record`` never touches the database on the caller's thread: it appends to a bounded in-memory queue
(a few microseconds) and returns False, counting a drop, when ``max_queue`` records are already waiting.
A daemon thread writes batches, one transaction per batch (executemany into both tables), every
``flush_interval_s`` or as soon as ``batch_size`` records wait. When a write fails (database down,
locked), the same batch is retried with exponential backoff (up to ``MAX_BACKOFF_S``), a warning is
logged, and new records keep queueing up to ``max_queue``; nothing is raised into callers. A
``request_id`` already stored is kept as first written (insert-or-ignore), so a retried batch whose
commit did land is not duplicated. A record that breaks the checks (ids, widths, lengths) is skipped,
counted as ``invalid`` and logged; it never blocks the queue.

**Durability.** The exposure log is best effort by design. ``kill -9`` (or a crash) loses the records
still queued: at most those recorded in the last ``flush_interval_s`` plus one batch in flight (more
while the database is unreachable), never more than ``max_queue``. ``close()`` (and ``flush()``) write
them first, and so does a normal interpreter exit (``atexit``, for up to ``EXIT_FLUSH_S``).
Acknowledged feedback is unaffected: ``EventLog`` writes it synchronously, in the request, and an
event whose exposure was lost still carries its ``request_id`` and ``position``.
"""

from __future__ import annotations

import atexit
import json
import logging
import math
import threading
import time
import weakref
from collections import deque
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from typing import Any, NamedTuple

import pandas as pd
from sqlalchemy import MetaData, delete, func, select
from sqlalchemy.dialects import postgresql, sqlite

from recloop.contract import id_violation, normalise_id, request_id_violation
from recloop.logdb import (
    ARM_CHARS,
    EXPERIMENT_ID_CHARS,
    MODEL_VERSION_CHARS,
    POLICY_CHARS,
    TEAM_CHARS,
    VARIANT_CHARS,
    log_tables,
    make_engine,
    table_names,
    upgrade,
)

logger = logging.getLogger(__name__)

#: The columns of the two frames ``ExposureLog.read`` returns.
EXPOSURE_COLUMNS = ("request_id", "user_id", "ts", "model_version", "variant", "experiment_id", "arm", "policy",
                    "context", "pool_size", "masked")
EXPOSURE_ITEM_COLUMNS = ("request_id", "position", "item_id", "score", "team", "propensity")
MAX_ITEMS = 10_000  # positions 1..MAX_ITEMS (recloop.contract.MAX_POSITION)
MAX_BACKOFF_S = 5.0
PRUNE_BATCH = 1_000
EXIT_FLUSH_S = 2.0
_WARN_EVERY_S = 30.0


class _Record(NamedTuple):
    request_id: Any
    user_id: Any
    model_version: Any
    items: tuple[Any, ...]
    variant: Any
    context: tuple[Any, ...]
    policy: Any
    experiment_id: Any
    arm: Any
    teams: tuple[Any, ...] | None
    propensities: Sequence[Any] | None
    ts: Any
    pool_size: Any = None
    masked: Any = None


def _per_item(values: Sequence[Any] | None) -> Sequence[Any] | None:
    """A tuple copy of per-item values, or the object itself when it defers its computation to the reader."""
    if values is None or getattr(values, "deferred", False):
        return values
    return tuple(values)


class ExposureLog:
    """The exposure log at SQLAlchemy ``url`` (the event log's database, ``settings.event_log_uri``).

    Args:
        url: e.g. ``sqlite:///home/eventlog.db`` or ``postgresql+psycopg://user@host/db``.
        events_table: the events table's name; the exposure tables' names derive from it
            (``recloop.logdb.table_names``: "events" → "exposures", "exposure_items").
        flush_interval_s: the writer thread writes what is queued at least this often (seconds, > 0).
        max_queue: the most records held in memory (queued plus the batch in flight); beyond it
            ``record`` drops (>= 1).
        batch_size: the most records per transaction; reaching it wakes the writer early (>= 1).
        create: migrate the schema to head first (``recloop.logdb.upgrade``).
    Raises:
        ValueError: a bad size or interval.
        sqlalchemy.exc.SQLAlchemyError: with ``create``, the database is unreachable or a migration failed.
    """

    def __init__(
        self,
        url: str,
        *,
        events_table: str = "events",
        flush_interval_s: float = 0.1,
        max_queue: int = 10_000,
        batch_size: int = 500,
        create: bool = True,
    ) -> None:
        if not flush_interval_s > 0:
            raise ValueError(f"flush_interval_s={flush_interval_s}; expected > 0")
        if max_queue < 1 or batch_size < 1:
            raise ValueError(f"max_queue={max_queue}, batch_size={batch_size}; expected >= 1")
        self.flush_interval_s = float(flush_interval_s)
        self.max_queue = int(max_queue)
        self.batch_size = int(batch_size)
        self.names = table_names(events_table)
        self.engine = make_engine(url)
        self.is_sqlite = self.engine.dialect.name == "sqlite"
        tables = log_tables(MetaData(), events_table)
        self.exposures, self.items = tables.exposures, tables.exposure_items
        if create:
            upgrade(self.engine, events_table)
        self._cond = threading.Condition()
        self._pending: deque[tuple[int, _Record]] = deque()
        self._in_flight = 0
        self._accepted = 0  # tickets handed out (1, 2, ...); FIFO, so "done >= t" means all up to t are done
        self._done = 0
        self._written = self._dropped = self._invalid = self._failed_batches = 0
        self._last_error: str | None = None
        self._closed = False
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"exposure-writer-{self.names.exposures}", daemon=True)
        self._thread.start()
        atexit.register(_close_at_exit, weakref.ref(self))

    # ---- the caller's side ---------------------------------------------------------------------------
    def record(
        self,
        request_id: str,
        user_id: str,
        model_version: str,
        items: Sequence[tuple[str, float | None]],
        *,
        variant: str = "",
        context: Sequence[str] = (),
        policy: str = "greedy",
        experiment_id: str | None = None,
        arm: str | None = None,
        teams: Sequence[str | None] | None = None,
        propensities: Sequence[float | None] | None = None,
        ts: datetime | None = None,
        pool_size: int | None = None,
        masked: Iterable[str] | None = None,
    ) -> bool:
        """Queue one exposure for writing; never blocks on, or touches, the database.

        Args:
            request_id: the request's id (``recloop.contract.request_id_violation``: 1..64 printable chars),
                the key feedback events link to.
            user_id: the user served.
            model_version: the registered model version that scored (at most 64 chars).
            items: (item_id, score) pairs, best first; position = index + 1 (at most ``MAX_ITEMS``).
            variant: the served alias or variant ("" when none).
            context: the history item ids the scores were computed from, oldest first.
            policy: the ranking policy ("greedy", "interleaving", ...; at most 32 chars).
            experiment_id, arm: the experiment and arm the user was assigned to, if any.
            teams: per item, the interleaving team that contributed it (same length as ``items``).
            propensities: per item, the probability it was shown at that position (same length). A sequence
                with a true ``deferred`` attribute (``models.exploration.DeferredPropensities``) is kept as is
                and read by the writer thread, so its computation stays off the caller's path.
            ts: when it was served (default now, UTC; naive means UTC).
            pool_size: the number of candidates the exploration policy could draw from, after masking
                (``models.exploration.Slate.pool_size``; an integer >= 0, or None when unknown).
            masked: the item ids removed from the candidates before ranking (consumed, suppressed, ...),
                stored sorted as a JSON array so off-policy estimates mask the same (None: not recorded).
                Pass a collection the caller no longer mutates: it is read by the writer thread.
        Returns:
            True when queued; False when dropped (the queue holds ``max_queue`` records, or closed).
            Invalid fields are found by the writer: the record is then skipped and counted as invalid.
        """
        rec = _Record(
            request_id, user_id, model_version, tuple(items), variant, tuple(context), policy, experiment_id, arm,
            None if teams is None else tuple(teams), _per_item(propensities),
            ts if ts is not None else datetime.now(UTC), pool_size, masked,
        )
        with self._cond:
            if self._closed or len(self._pending) + self._in_flight >= self.max_queue:
                self._dropped += 1
                return False
            self._accepted += 1
            self._pending.append((self._accepted, rec))
            full = len(self._pending) >= self.batch_size
        if full:
            self._wake.set()
        return True

    def flush(self, timeout_s: float = 5.0) -> bool:
        """Wait until every record queued before this call is written (or skipped as invalid).

        Returns:
            True when done; False after ``timeout_s`` seconds (e.g. the database is down: the records
            stay queued and the writer keeps retrying).
        """
        with self._cond:
            target = self._accepted
            if self._done >= target:
                return True
        self._wake.set()
        with self._cond:
            return self._cond.wait_for(lambda: self._done >= target, timeout=timeout_s)

    def close(self, timeout_s: float = 5.0) -> None:
        """Flush (up to ``timeout_s``), stop the writer and release the engine. Idempotent.

        Records still queued after the timeout are lost (logged as a warning); ``record`` then drops.
        """
        if self._closed:
            return
        self.flush(timeout_s)
        with self._cond:
            self._closed = True
        self._stop.set()  # the writer tries what is left once more, then exits
        self._wake.set()
        self._thread.join(timeout=max(1.0, timeout_s))
        with self._cond:
            left = len(self._pending) + self._in_flight
        if left:
            logger.warning("exposure log closed with %d records unwritten (last error: %s)", left, self._last_error)
        self.engine.dispose()

    def stats(self) -> dict[str, Any]:
        """Counters since start: ``queued`` (waiting or in flight now), ``written`` (exposures inserted; a
        request_id already stored is not counted again),
        ``dropped`` (refused by a full queue or after close), ``invalid`` (skipped by the checks),
        ``failed_batches`` (failed write attempts; each retry counts) and ``last_error`` (str or None)."""
        with self._cond:
            return {
                "queued": len(self._pending) + self._in_flight,
                "written": self._written,
                "dropped": self._dropped,
                "invalid": self._invalid,
                "failed_batches": self._failed_batches,
                "last_error": self._last_error,
            }

    # ---- the writer thread ---------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            self._wake.wait(self.flush_interval_s)
            self._wake.clear()
            try:
                self._drain()
            except Exception:  # noqa: BLE001 - a bug here must not kill the writer silently
                logger.exception("exposure writer: unexpected error")
            if self._stop.is_set():
                return

    def _drain(self) -> None:
        """Write batches while records wait; retry a failed batch with backoff until it lands or we stop
        (once stopping, each batch gets one attempt)."""
        while True:
            with self._cond:
                if not self._pending:
                    return
                n = min(self.batch_size, len(self._pending))
                batch = [self._pending.popleft() for _ in range(n)]
                self._in_flight = n
            exposures, items, invalid = _prepare([rec for _, rec in batch])
            delay, warned_at = 0.05, 0.0
            while True:
                try:
                    inserted = self._write(exposures, items)
                    break
                except Exception as err:  # noqa: BLE001 - any database failure is retried, never raised
                    with self._cond:
                        self._failed_batches += 1
                        self._last_error = f"{type(err).__name__}: {err}"[:500]
                    now = time.monotonic()
                    if now - warned_at >= _WARN_EVERY_S:
                        warned_at = now
                        logger.warning("exposure log: writing %d records failed, retrying: %s", n, self._last_error)
                    if self._stop.wait(delay):
                        with self._cond:  # closing: this batch and the rest are lost (close() logs them)
                            self._in_flight = 0
                            self._pending.extendleft(reversed(batch))
                        return
                    delay = min(delay * 2, MAX_BACKOFF_S)
            with self._cond:
                self._in_flight = 0
                self._written += inserted
                self._invalid += invalid
                self._done = batch[-1][0]
                self._cond.notify_all()

    def _write(self, exposures: list[dict[str, Any]], items: list[dict[str, Any]]) -> int:
        """One transaction: the exposures, then the items of those newly inserted (a stored request_id wins).

        Returns the number of exposures inserted. Raises the driver's error (the caller retries).
        """
        if not exposures:
            return 0
        insert = sqlite.insert if self.is_sqlite else postgresql.insert
        with self.engine.begin() as conn:
            stmt = insert(self.exposures).on_conflict_do_nothing(index_elements=["request_id"])
            new = {r.request_id for r in conn.execute(stmt.returning(self.exposures.c.request_id), exposures)}
            rows = [r for r in items if r["request_id"] in new]
            if rows:
                conn.execute(insert(self.items).on_conflict_do_nothing(index_elements=["request_id", "position"]), rows)
        return len(new)

    # ---- reads and retention -------------------------------------------------------------------------
    def read(
        self, since: datetime | pd.Timestamp | None = None, until: datetime | pd.Timestamp | None = None
    ) -> tuple[pd.DataFrame, pd.DataFrame]:
        """The exposures with ``since < ts <= until`` (either bound optional; naive means UTC) and their items.

        Returns:
            (exposures, items): ``EXPOSURE_COLUMNS`` ordered by (ts, request_id), ``ts``
            datetime64[ns, UTC], ``context`` a list[str] (oldest first; [] when none), ``pool_size``
            Int64 (<NA> when unknown), ``masked`` a sorted list[str] or None (not recorded);
            ``EXPOSURE_ITEM_COLUMNS`` ordered by (ts, request_id, position), ``position`` int64,
            ``score``/``propensity`` float64 (NaN when none), ``team`` str or None.
        """
        e, i = self.exposures, self.items
        cond = []
        if since is not None:
            cond.append(e.c.ts > _utc(since))
        if until is not None:
            cond.append(e.c.ts <= _utc(until))
        qe = select(*e.c).where(*cond).order_by(e.c.ts, e.c.request_id)
        qi = (
            select(*i.c).join_from(i, e, i.c.request_id == e.c.request_id).where(*cond)
            .order_by(e.c.ts, i.c.request_id, i.c.position)
        )
        with self._read() as conn:
            exp_rows = [tuple(r) for r in conn.execute(qe)]
            item_rows = [tuple(r) for r in conn.execute(qi)]
        exp = pd.DataFrame(exp_rows, columns=[c.name for c in e.c])[list(EXPOSURE_COLUMNS)]
        exp["ts"] = pd.to_datetime(exp["ts"], utc=True).astype("datetime64[ns, UTC]")
        exp["context"] = [json.loads(c) if c else [] for c in exp["context"]]
        exp["pool_size"] = pd.array(exp["pool_size"].tolist(), dtype="Int64")
        exp["masked"] = pd.Series([json.loads(m) if m is not None else None for m in exp["masked"]], dtype=object,
                                  index=exp.index)
        for col in ("request_id", "user_id", "model_version", "variant", "experiment_id", "arm", "policy", "context"):
            exp[col] = exp[col].astype(object)
        its = pd.DataFrame(item_rows, columns=[c.name for c in i.c])[list(EXPOSURE_ITEM_COLUMNS)]
        its["position"] = its["position"].astype("int64")
        for col in ("score", "propensity"):
            its[col] = pd.to_numeric(its[col], errors="coerce").astype("float64")
        for col in ("request_id", "item_id", "team"):
            its[col] = its[col].astype(object)
        return exp, its

    def count(self) -> int:
        """Number of stored exposures (written ones; queued records are not counted)."""
        with self._read() as conn:
            return int(conn.execute(select(func.count()).select_from(self.exposures)).scalar() or 0)

    def prune(self, older_than: datetime | pd.Timestamp) -> dict[str, int]:
        """Delete the exposures with ``ts < older_than`` (naive means UTC) and their items: the retention step.

        Works in batches of ``PRUNE_BATCH`` exposures, one short transaction each, so the writer is
        never blocked for long.

        Returns:
            {"exposures": n, "items": m}: the rows deleted.
        """
        e, i = self.exposures, self.items
        cutoff = _utc(older_than)
        total = {"exposures": 0, "items": 0}
        while True:
            with self.engine.begin() as conn:
                ids = [r[0] for r in conn.execute(select(e.c.request_id).where(e.c.ts < cutoff).limit(PRUNE_BATCH))]
                if not ids:
                    return total
                total["items"] += conn.execute(delete(i).where(i.c.request_id.in_(ids))).rowcount
                total["exposures"] += conn.execute(delete(e).where(e.c.request_id.in_(ids))).rowcount

    def drop(self) -> None:
        """Drop the exposure tables (tests; ``EventLog.drop`` / ``recloop.logdb.drop_all`` drop the whole schema)."""
        self.items.drop(self.engine, checkfirst=True)
        self.exposures.drop(self.engine, checkfirst=True)

    def _read(self) -> Any:
        conn = self.engine.connect()
        return conn.execution_options(sqlite_begin="BEGIN") if self.is_sqlite else conn

    def __enter__(self) -> ExposureLog:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()


def _close_at_exit(ref: weakref.ref[ExposureLog]) -> None:
    """A normal interpreter exit writes what is queued (up to ``EXIT_FLUSH_S``) when ``close`` was not called."""
    log = ref()
    if log is not None and not log._closed:
        log.close(timeout_s=EXIT_FLUSH_S)


# ---- checks and rows (the writer thread) -----------------------------------------------------------------
class _Invalid(ValueError):
    pass


def _prepare(records: list[_Record]) -> tuple[list[dict[str, Any]], list[dict[str, Any]], int]:
    """Rows for both tables from queued records; invalid records are skipped (logged, counted).

    Returns:
        (exposure rows, item rows, number of invalid records). A request_id repeated in the batch
        keeps its first record, as the database keeps the first stored one.
    """
    exposures: list[dict[str, Any]] = []
    items: list[dict[str, Any]] = []
    invalid = 0
    seen: set[str] = set()
    for rec in records:
        try:
            exposure, rows = _rows(rec)
        except Exception as err:  # noqa: BLE001 - _Invalid, or a value whose conversion fails: skip it
            invalid += 1
            logger.warning("exposure log: skipped an invalid record: %s", err)
            continue
        if exposure["request_id"] in seen:
            continue
        seen.add(exposure["request_id"])
        exposures.append(exposure)
        items.extend(rows)
    return exposures, items, invalid


def _rows(rec: _Record) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """One record's exposure row and item rows. Raises ``_Invalid`` naming the field."""
    rule = request_id_violation(rec.request_id)
    if rule:
        raise _Invalid(f"request_id {rule}: {rec.request_id!r}")
    request_id = normalise_id(rec.request_id)
    user_id = _id("user_id", rec.user_id)
    if len(rec.items) > MAX_ITEMS:
        raise _Invalid(f"{request_id}: {len(rec.items)} items; at most {MAX_ITEMS}")
    for name, per_item in (("teams", rec.teams), ("propensities", rec.propensities)):
        if per_item is not None and len(per_item) != len(rec.items):
            raise _Invalid(f"{request_id}: {len(per_item)} {name} for {len(rec.items)} items")
    try:
        ts = _utc(rec.ts)
    except (TypeError, ValueError) as err:
        raise _Invalid(f"{request_id}: ts {rec.ts!r}: {err}") from err
    exposure = {
        "request_id": request_id,
        "user_id": user_id,
        "ts": ts,
        "model_version": _text("model_version", rec.model_version, MODEL_VERSION_CHARS, required=True),
        "variant": _text("variant", rec.variant, VARIANT_CHARS) or "",
        "experiment_id": _text("experiment_id", rec.experiment_id, EXPERIMENT_ID_CHARS),
        "arm": _text("arm", rec.arm, ARM_CHARS),
        "policy": _text("policy", rec.policy, POLICY_CHARS, required=True),
        "context": json.dumps([normalise_id(x) for x in rec.context]),
        "pool_size": _count("pool_size", rec.pool_size),
        "masked": None if rec.masked is None else json.dumps(sorted({normalise_id(x) for x in rec.masked})),
    }
    rows = []
    for k, pair in enumerate(rec.items):
        try:
            item_id, score = pair
        except (TypeError, ValueError) as err:
            raise _Invalid(f"{request_id}: item {k + 1} is not an (item_id, score) pair: {pair!r}") from err
        rows.append({
            "request_id": request_id,
            "position": k + 1,
            "item_id": _id("item_id", item_id),
            "score": _float("score", score),
            "team": None if rec.teams is None else _text("team", rec.teams[k], TEAM_CHARS),
            "propensity": None if rec.propensities is None else _float("propensity", rec.propensities[k]),
        })
    return exposure, rows


def _id(name: str, value: Any) -> str:
    rule = id_violation(value)
    if rule:
        raise _Invalid(f"{name} {rule}: {value!r}")
    return normalise_id(value)


def _text(name: str, value: Any, max_chars: int, *, required: bool = False) -> str | None:
    if value is None:
        if required:
            raise _Invalid(f"{name} must not be null")
        return None
    out = str(value).strip()
    if len(out) > max_chars or not out.isprintable() or (required and not out):
        raise _Invalid(f"{name} must be 1..{max_chars} printable characters: {value!r}")
    return out


def _float(name: str, value: Any) -> float | None:
    if value is None:
        return None
    try:
        out = float(value)
    except (TypeError, ValueError) as err:
        raise _Invalid(f"{name} must be numeric or null: {value!r}") from err
    return out if math.isfinite(out) else None


def _count(name: str, value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not float(value).is_integer() or not 0 <= int(value) < 2**31:
        raise _Invalid(f"{name} must be an integer in [0, 2**31) or null: {value!r}")
    return int(value)


def _utc(value: datetime | pd.Timestamp) -> datetime:
    ts = pd.Timestamp(value)
    if ts is pd.NaT:
        raise ValueError("NaT")
    return (ts.tz_localize("UTC") if ts.tzinfo is None else ts.tz_convert("UTC")).to_pydatetime()

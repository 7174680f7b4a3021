"""The kernel's forget handlers (``recloop.forget.STORES``): the event-log database, the lake, quarantine,
validation results and Data Docs, and the Feast offline source tables (plain Parquet: no Feast import here).

Deleting leaves no copy readable from the files: SQLite deletes run with ``PRAGMA secure_delete=ON`` (freed
cells and pages are zeroed) and ``durable`` checkpoints and truncates the WAL (``wal_checkpoint(TRUNCATE)``);
Parquet files are rewritten to a temporary file and renamed over the old one. On PostgreSQL the rows are
deleted under the user's advisory lock (the lock ``EventLog`` appends under); their dead tuples are
reclaimed by autovacuum (no query can read them).
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, MetaData, delete, func, select, text

from recloop.contract import normalise_id
from recloop.eventlog import _lock_key
from recloop.lake import Lake
from recloop.logdb import log_tables, make_engine, upgrade

logger = logging.getLogger(__name__)
REDACTED = "[forgotten]"
ID_BATCH = 500


class _LogDbHandler:
    """Base of the handlers over the event-log database (SQLite | PostgreSQL)."""

    name = ""
    repeat = True  # feedback and the exposure writer write here live

    def __init__(self, url: str, events_table: str = "events") -> None:
        self.engine = make_engine(url)
        self.is_sqlite = self.engine.dialect.name == "sqlite"
        upgrade(self.engine, events_table)
        self.tables = log_tables(MetaData(), events_table)

    @contextmanager
    def _writing(self, user_id: str) -> Iterator[Connection]:
        """A write transaction holding the user's lock (PostgreSQL advisory; SQLite the write lock), with
        SQLite's secure delete on."""
        with self.engine.connect() as conn:
            with conn.begin():
                if self.is_sqlite:
                    conn.exec_driver_sql("PRAGMA secure_delete=ON")
                else:
                    conn.execute(text("SELECT pg_advisory_xact_lock(:k)"),
                                 {"k": _lock_key(self.tables.events.name, user_id)})
                yield conn
            if self.is_sqlite:
                conn.exec_driver_sql("PRAGMA secure_delete=OFF")
                conn.commit()

    def durable(self) -> None:
        """SQLite: checkpoint the WAL into the database and truncate it (freed pages are already zeroed)."""
        if not self.is_sqlite:
            return
        raw = self.engine.raw_connection()
        try:
            busy = raw.cursor().execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
        finally:
            raw.close()
        if busy and busy[0]:
            logger.warning("forget: WAL checkpoint blocked by a reader; the WAL is truncated by the next one")

    def close(self) -> None:
        self.engine.dispose()


class EventLogHandler(_LogDbHandler):
    """``events`` rows of the user (feedback), deleted under the lock ``EventLog.append`` takes."""

    name = "event_log"

    def delete(self, user_id: str) -> int:
        t = self.tables.events
        with self._writing(user_id) as conn:
            return int(conn.execute(delete(t).where(t.c.user_id == user_id)).rowcount or 0)

    def remaining(self, user_id: str) -> int:
        t = self.tables.events
        with self.engine.connect() as conn:
            return int(conn.execute(select(func.count()).where(t.c.user_id == user_id)).scalar() or 0)


class ExposureLogHandler(_LogDbHandler):
    """``exposures`` rows of the user and the ``exposure_items`` of those requests."""

    name = "exposure_log"

    def delete(self, user_id: str) -> int:
        e, i = self.tables.exposures, self.tables.exposure_items
        n = 0
        with self._writing(user_id) as conn:
            ids = list(conn.execute(select(e.c.request_id).where(e.c.user_id == user_id)).scalars())
            for start in range(0, len(ids), ID_BATCH):
                chunk = ids[start:start + ID_BATCH]
                n += int(conn.execute(delete(i).where(i.c.request_id.in_(chunk))).rowcount or 0)
            n += int(conn.execute(delete(e).where(e.c.user_id == user_id)).rowcount or 0)
        return n

    def remaining(self, user_id: str) -> int:
        e = self.tables.exposures
        with self.engine.connect() as conn:
            return int(conn.execute(select(func.count()).where(e.c.user_id == user_id)).scalar() or 0)


class LakeHandler:
    """The lake's events and users files (``recloop.lake.Lake.delete_user``, under the lake's lock)."""

    name = "lake"
    repeat = False  # written only by ingestion, which drops forgotten users and runs under the loop's lock

    def __init__(self, lake_path: Path) -> None:
        self.lake = Lake(lake_path)

    def delete(self, user_id: str) -> int:
        removed = self.lake.delete_user(user_id)
        return removed["events"] + removed["users"]

    def remaining(self, user_id: str) -> int:
        return self.lake.count_user(user_id)

    def durable(self) -> None:
        return None


def _same_id(value: Any, user_id: str) -> bool:
    """Whether a raw stored value (text, int or float: quarantine keeps raw values as text) is ``user_id``."""
    if value is None:
        return False
    if isinstance(value, float) and value != value:
        return False
    try:
        norm = normalise_id(value)
    except (TypeError, ValueError, OverflowError):
        return False
    if norm == user_id:
        return True
    return bool(re.fullmatch(r"-?\d+\.0+", norm)) and norm.split(".", 1)[0] == user_id


class ParquetFilesHandler:
    """Every Parquet file under ``root`` with a ``user_id`` column, rewritten without the user's rows."""

    repeat = False

    def __init__(self, name: str, root: Path, column: str = "user_id") -> None:
        self.name, self.root, self.column = name, Path(root), column

    def _files(self) -> list[Path]:
        return sorted(self.root.rglob("*.parquet")) if self.root.exists() else []

    def _mask(self, path: Path, user_id: str) -> tuple[Any, int]:
        """(boolean mask of the user's rows, count): the column as text, compared in the contract's normal
        form (``_same_id``: surrounding spaces, whole floats written "7.0"), vectorised."""
        import pyarrow as pa
        import pyarrow.compute as pc
        import pyarrow.parquet as pq

        if self.column not in pq.read_schema(path).names:
            return None, 0
        col = pq.read_table(path, columns=[self.column]).column(self.column)
        try:
            text_col = pc.utf8_trim_whitespace(col.cast(pa.string()))
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):  # an odd type: compare value by value
            mask = pa.array([_same_id(v, user_id) for v in col.to_pylist()])
        else:
            mask = pc.equal(text_col, user_id)
            if re.fullmatch(r"-?\d+", user_id):
                mask = pc.or_(mask, pc.match_substring_regex(text_col, rf"^{re.escape(user_id)}\.0+$"))
            mask = pc.fill_null(mask, False)
        return mask, int(pc.sum(mask).as_py() or 0)

    def delete(self, user_id: str) -> int:
        import pyarrow.compute as pc
        import pyarrow.parquet as pq

        n = 0
        for path in self._files():
            mask, hits = self._mask(path, user_id)
            if not hits:
                continue
            kept = pq.read_table(path).filter(pc.invert(mask))
            tmp = path.with_name(path.name + ".forget-tmp")
            pq.write_table(kept, tmp)
            os.replace(tmp, path)
            n += hits
        return n

    def remaining(self, user_id: str) -> int:
        return sum(self._mask(p, user_id)[1] for p in self._files())

    def durable(self) -> None:
        return None


def _redact_json(value: Any, user_id: str) -> tuple[Any, int]:
    """``value`` with every string equal to ``user_id`` (dict keys too) replaced by ``REDACTED``."""
    if isinstance(value, str):
        return (REDACTED, 1) if _same_id(value, user_id) else (value, 0)
    if isinstance(value, list):
        out, n = [], 0
        for v in value:
            r, k = _redact_json(v, user_id)
            out.append(r)
            n += k
        return out, n
    if isinstance(value, dict):
        out_d, n = {}, 0
        for key, v in value.items():
            r, k = _redact_json(v, user_id)
            new_key = REDACTED if _same_id(key, user_id) else key
            out_d[new_key] = r
            n += k + (new_key != key)
        return out_d, n
    return value, 0


def _token_pattern(user_id: str) -> re.Pattern[str]:
    """``user_id`` as a whole rendered value: an HTML text node (``>id<``) or a quoted string."""
    uid = re.escape(user_id)
    return re.compile(rf"(?<=>)(\s*){uid}(\s*)(?=<)|(?<=[\"']){uid}(?=[\"'])")


class ValidationDocsHandler:
    """Validation results (``quarantine/*/result.json``: GX results, unexpected values) and the Data Docs
    site (``data_docs/``): the user's id as a whole value is redacted (``REDACTED``); counts are kept."""

    name = "validation_docs"
    repeat = False
    SUFFIXES = (".html", ".json", ".js", ".txt", ".md")

    def __init__(self, home: Path) -> None:
        self.home = Path(home)

    def _files(self) -> list[Path]:
        results = sorted((self.home / "quarantine").glob("*/result.json"))
        docs = self.home / "data_docs"
        site = sorted(p for p in docs.rglob("*") if p.suffix in self.SUFFIXES) if docs.exists() else []
        return results + site

    def _rewrite(self, path: Path, user_id: str, write: bool) -> int:
        raw = path.read_text(errors="replace")
        if path.suffix == ".json":
            try:
                redacted, n = _redact_json(json.loads(raw), user_id)
            except json.JSONDecodeError:
                redacted, n = None, 0
            if redacted is not None:
                if n and write:
                    _replace_text(path, json.dumps(redacted, indent=1, default=str))
                return n
        pattern = _token_pattern(user_id)
        out, n = pattern.subn(lambda m: (m.group(1) or "") + REDACTED + (m.group(2) or ""), raw)
        if n and write:
            _replace_text(path, out)
        return n

    def delete(self, user_id: str) -> int:
        return sum(self._rewrite(p, user_id, True) for p in self._files())

    def remaining(self, user_id: str) -> int:
        return sum(self._rewrite(p, user_id, False) for p in self._files())

    def durable(self) -> None:
        return None


def _replace_text(path: Path, content: str) -> None:
    tmp = path.with_name(path.name + ".forget-tmp")
    tmp.write_text(content)
    os.replace(tmp, path)


def kernel_handlers(settings: Any, events_table: str = "events") -> list[Any]:
    """The kernel's handlers for ``settings`` (every ``STORES`` name except ``online_store``, which lives in
    ``featurestore.forget``). Close them with ``close_handlers``."""
    home = Path(settings.home)
    return [
        EventLogHandler(settings.event_log_uri, events_table),
        ExposureLogHandler(settings.event_log_uri, events_table),
        LakeHandler(settings.lake_path),
        ParquetFilesHandler("quarantine", home / "quarantine"),
        ValidationDocsHandler(home),
        ParquetFilesHandler("feature_tables", home / "features"),
    ]


def close_handlers(handlers: list[Any]) -> None:
    """Release what the handlers hold (engines, clients)."""
    for handler in handlers:
        close = getattr(handler, "close", None)
        if close is not None:
            close()

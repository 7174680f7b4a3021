"""The Parquet lake: append-only, idempotent ingestion of contract frames.

Layout under ``root``::

    events/<batch_id>/part-0.parquet   contract columns + batch_id + seq
    items/<batch_id>/part-0.parquet    contract columns + batch_id (every version: use ``items()``)
    users/<batch_id>/part-0.parquet    user_id + attributes + batch_id (every version: use ``users()``)
    _state.json                              committed batches, next seq, watermark per source

A batch becomes visible only when ``_state.json`` lists it: files are written to a temporary
folder, renamed into place, and the state file is replaced atomically last. A failed ingest
therefore leaves nothing readable through ``Lake``. (``pd.read_parquet(root / "events")`` works
too: folders are not hive-partitioned and pyarrow skips ``_tmp``; it does not filter uncommitted
folders left by a crash between rename and commit, which the next ingest of that id replaces.)

``seq`` is a lake-wide ingest counter (file order within a batch, batches in commit order), so
the recorded event order is (received_at, seq): the contract's server-assigned order column, which
is the timestamp for replayed files and the receive time for feedback from the event log.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from filelock import FileLock
from pydantic import BaseModel

from recloop.contract import EVENT_COLUMNS, ITEM_COLUMNS, ORDER_COLUMN, empty_events
from recloop.sources.base import SourceFrames
from recloop.sources.checks import conflicting_event_ids

logger = logging.getLogger(__name__)
BATCH_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
CONTENT_COLUMNS = ["user_id", "item_id", "event_type", "value", "timestamp", "source"]


class IngestReport(BaseModel):
    """What one ``Lake.ingest`` did. Counts of the input are distinct ids over events + side tables."""

    batch_id: str
    sources: list[str]
    events: int  # event rows in the input
    users: int  # distinct users in the input (users table and events)
    items: int  # distinct items in the input (items table and events)
    new_events: int
    duplicates_dropped: int  # identical events already in the lake or repeated in the input
    new_items: int  # item rows written (new or changed)
    new_users: int  # user rows written (new or changed)
    total_events: int
    watermark: datetime | None  # newest event timestamp of the lake after the ingest (UTC)


def _plain(value: Any) -> Any:
    """A JSON-stable form of a cell, equal before and after a Parquet round trip."""
    if isinstance(value, np.ndarray | list | tuple):
        return [_plain(v) for v in value]
    if value is None or (isinstance(value, float | np.floating) and np.isnan(value)) or value is pd.NaT:
        return None
    if isinstance(value, pd.Timestamp | datetime):
        return pd.Timestamp(value).isoformat()
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def _fingerprint(df: pd.DataFrame, key: str) -> pd.Series:
    """sha1 of each row's non-key content (JSON of ``_plain`` cells), indexed by ``key``."""
    cols = sorted(c for c in df.columns if c not in (key, "batch_id"))
    rows = zip(*(df[c].to_numpy() for c in cols), strict=True) if cols else ([] for _ in range(len(df)))
    digests = [
        hashlib.sha1(json.dumps([_plain(v) for v in row], default=str).encode()).hexdigest() for row in rows
    ]
    return pd.Series(digests, index=df[key].to_numpy())


def batch_digest(events: pd.DataFrame | None) -> str:
    """sha256 of a batch's (event_id, timestamp ns) pairs, sorted by event_id (row order does not matter)."""
    digest = hashlib.sha256()
    if events is not None and len(events):
        frame = events[["event_id", "timestamp"]].sort_values("event_id", kind="stable")
        digest.update("\n".join(frame["event_id"].astype(str)).encode())
        digest.update(pd.to_datetime(frame["timestamp"], utc=True).astype("int64").to_numpy().tobytes())
    return digest.hexdigest()


class Lake:
    """A Parquet lake at ``root`` (``settings.lake_path`` by default at the edges)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    # ---- state ---------------------------------------------------------------------------
    @property
    def _state_path(self) -> Path:
        return self.root / "_state.json"

    def _state(self) -> dict[str, Any]:
        if not self._state_path.exists():
            return {"version": 1, "next_seq": 0, "batches": [], "watermarks": {}}
        return json.loads(self._state_path.read_text())

    @contextmanager
    def _locked(self) -> Iterator[None]:
        """An exclusive lock on the lake (``root/.lock``), across threads and processes (``filelock``)."""
        self.root.mkdir(parents=True, exist_ok=True)
        with FileLock(self.root / ".lock"):
            yield

    def _read(self, table: str, batches: list[str]) -> pd.DataFrame | None:
        files = [self.root / table / b / "part-0.parquet" for b in batches]
        parts = [pd.read_parquet(f) for f in files if f.exists()]
        return pd.concat(parts, ignore_index=True) if parts else None

    def batches(self) -> list[dict[str, Any]]:
        """Committed batches, oldest first (``batch_id``, ``created_at``, counts, ``sources``)."""
        return list(self._state()["batches"])

    # ---- forgetting a user (recloop/forget.py) ------------------------------------------------
    def _user_rows(self, path: Path, user_id: str) -> tuple[Any, int]:
        """(mask of ``user_id``'s rows, count) of one Parquet file, reading its user_id column only."""
        import pyarrow.compute as pc
        import pyarrow.parquet as pq

        if "user_id" not in pq.read_schema(path).names:
            return None, 0
        mask = pc.equal(pq.read_table(path, columns=["user_id"]).column("user_id").cast("string"), user_id)
        return mask, int(pc.sum(mask).as_py() or 0)

    def count_user(self, user_id: str) -> int:
        """Rows of ``user_id`` in every committed (and left-over uncommitted) events and users file."""
        return sum(self._user_rows(f, user_id)[1] for t in ("events", "users")
                   for f in (self.root / t).glob("*/part-0.parquet"))

    def delete_user(self, user_id: str) -> dict[str, int]:
        """Rewrite every events and users file that holds ``user_id`` without its rows, under the lake's lock.

        Each file is written to a temporary file and renamed over the old one (atomic per file; a reader
        sees the old or the new file). The batch entries' counts in ``_state.json`` follow; ``seq`` values
        and watermarks stay (a gap in ``seq`` is allowed). Uncommitted folders left by a crash are cleaned too.

        Returns:
            {"events": rows removed, "users": rows removed, "files": files rewritten}.
        """
        import pyarrow.compute as pc
        import pyarrow.parquet as pq

        removed = {"events": 0, "users": 0, "files": 0}
        with self._locked():
            state = self._state()
            by_id = {b["batch_id"]: b for b in state["batches"]}
            for table in ("events", "users"):
                for path in sorted((self.root / table).glob("*/part-0.parquet")):
                    mask, n = self._user_rows(path, user_id)
                    if not n:
                        continue
                    kept = pq.read_table(path).filter(pc.invert(mask))
                    tmp = path.with_name("part-0.parquet.forget-tmp")
                    pq.write_table(kept, tmp)
                    os.replace(tmp, path)
                    removed[table] += n
                    removed["files"] += 1
                    entry = by_id.get(path.parent.name)
                    if entry is not None:
                        entry[table] = max(0, int(entry.get(table, 0)) - n)
                        if table == "events":  # the batch's digest follows its rows (``fingerprint``)
                            entry["sha256"] = batch_digest(kept.select(["event_id", "timestamp"]).to_pandas())
            if removed["files"]:
                self._commit(state)
        logger.info("lake delete_user events=%d users=%d files=%d", removed["events"], removed["users"],
                    removed["files"])
        return removed

    # ---- reads ---------------------------------------------------------------------------
    def events(self, *, with_lineage: bool = False) -> pd.DataFrame:
        """All events in contract dtypes, ordered by (received_at, seq): the contract's history order
        (``recloop.contract.ORDER_COLUMN``), ties in ingest order.

        Args:
            with_lineage: also return ``batch_id`` and ``seq``.
        """
        ids = [b["batch_id"] for b in self._state()["batches"]]
        return self._as_events(self._read("events", ids), with_lineage)

    @staticmethod
    def _as_events(df: pd.DataFrame | None, with_lineage: bool) -> pd.DataFrame:
        """Raw lake rows -> contract dtypes and columns, ordered by (received_at, seq)."""
        if df is None:
            out = empty_events()
            return (
                out.assign(batch_id=pd.Series(dtype=object), seq=pd.Series(dtype=np.int64))
                if with_lineage
                else out
            )
        df["timestamp"] = df["timestamp"].astype("datetime64[ns, UTC]")
        if ORDER_COLUMN not in df.columns:  # batches written before the contract named the order column
            df[ORDER_COLUMN] = df["timestamp"]
        df[ORDER_COLUMN] = df[ORDER_COLUMN].astype("datetime64[ns, UTC]").fillna(df["timestamp"])
        df = df.sort_values([ORDER_COLUMN, "seq"], kind="stable").reset_index(drop=True)
        for col in ("event_id", "user_id", "item_id", "event_type", "source"):
            df[col] = df[col].astype(object)
        cols = list(EVENT_COLUMNS) + (["batch_id", "seq"] if with_lineage else [])
        return df[cols]

    # ---- incremental reads (the loop's incremental turn, docs/architecture.md "Incremental loop") ----------
    def _event_files(self, batches: list[str] | None = None) -> list[Path]:
        ids = [b["batch_id"] for b in self._state()["batches"]] if batches is None else batches
        return [f for f in (self.root / "events" / b / "part-0.parquet" for b in ids) if f.exists()]

    def _scan_events(self, keep: Any, columns: list[str], batches: list[str] | None = None) -> pd.DataFrame | None:
        """Rows of committed event files where ``keep(table of columns) -> bool mask``; only ``columns`` are
        read to decide, and the rest of a file only when it has a hit (pyarrow; nothing else is materialised)."""
        import pyarrow.compute as pc
        import pyarrow.parquet as pq

        parts = []
        for path in self._event_files(batches):
            pf = pq.ParquetFile(path)
            names = pf.schema_arrow.names
            mask = keep(pf.read(columns=[c for c in columns if c in names]))
            if not pc.any(mask).as_py():
                continue
            parts.append(pf.read().filter(mask).to_pandas())
        return pd.concat(parts, ignore_index=True) if parts else None

    def _colliding_events(self, event_ids: pd.Series, batches: list[str]) -> pd.DataFrame | None:
        """Committed rows whose ``event_id`` is in ``event_ids`` (what a new batch can collide with)."""
        import pyarrow as pa
        import pyarrow.compute as pc

        wanted = pa.array(event_ids.astype(str).unique(), type=pa.string())
        return self._scan_events(lambda t: pc.is_in(t.column("event_id").cast(pa.string()), wanted),
                                 ["event_id"], batches)

    def events_of_batches(self, batch_ids: list[str], *, with_lineage: bool = False) -> pd.DataFrame:
        """The events of the given committed batches only, as ``events()``."""
        return self._as_events(self._read("events", list(batch_ids)), with_lineage)

    def events_of_users(self, user_ids: Any, *, with_lineage: bool = False) -> pd.DataFrame:
        """Every event of the given users, as ``events()`` (contract dtypes, history order).

        Reads the ``user_id`` column of each batch and the other columns of batches that hold one of them:
        the cost follows the lake's file count and the users' own rows, not a full materialisation.
        """
        import pyarrow as pa
        import pyarrow.compute as pc

        wanted = pa.array(sorted({str(u) for u in user_ids}), type=pa.string())
        df = self._scan_events(lambda t: pc.is_in(t.column("user_id").cast(pa.string()), wanted), ["user_id"])
        return self._as_events(df, with_lineage)

    def events_received_after(self, after: pd.Timestamp | datetime, *, with_lineage: bool = False) -> pd.DataFrame:
        """Events whose order time (``received_at``, else ``timestamp``) is later than ``after``, as ``events()``."""
        import pyarrow as pa
        import pyarrow.compute as pc

        cut = pa.scalar(pd.Timestamp(after).tz_convert("UTC").value, type=pa.timestamp("ns", tz="UTC"))

        def keep(t: Any) -> Any:
            ts = t.column("timestamp").cast(pa.timestamp("ns", tz="UTC"))
            if ORDER_COLUMN in t.column_names:
                ts = pc.coalesce(t.column(ORDER_COLUMN).cast(pa.timestamp("ns", tz="UTC")), ts)
            return pc.fill_null(pc.greater(ts, cut), False)

        return self._as_events(self._scan_events(keep, ["timestamp", ORDER_COLUMN]), with_lineage)

    def user_ids(self) -> np.ndarray:
        """Distinct user ids of the lake's events, sorted (reads the ``user_id`` column only)."""
        import pyarrow as pa
        import pyarrow.compute as pc
        import pyarrow.parquet as pq

        cols = [pq.read_table(f, columns=["user_id"]).column("user_id").cast(pa.string()) for f in self._event_files()]
        if not cols:
            return np.array([], dtype=object)
        uniq = pc.unique(pa.chunked_array([c for col in cols for c in col.chunks], type=pa.string()))
        return np.sort(uniq.to_numpy(zero_copy_only=False).astype(object))

    def fingerprint(self) -> str:
        """The lake's incremental data fingerprint: sha256 chained over the committed batches' digests
        (``batch_digest`` of each batch's event ids and timestamps, kept in ``_state.json`` at ingest), so it
        costs O(batches) and changes exactly when a batch is added or rewritten (``delete_user``). A batch
        written before digests were kept is digested from its file; a batch without events is passed over."""
        chain = hashlib.sha256(b"recloop-lake-v1")
        for entry in self._state()["batches"]:
            if not int(entry.get("events", 0)):
                continue  # a batch without events (all duplicates, or all forgotten) holds no data
            digest = entry.get("sha256")
            if digest is None:
                files = self._event_files([entry["batch_id"]])
                frame = pd.read_parquet(files[0], columns=["event_id", "timestamp"]) if files else None
                digest = batch_digest(frame)
            chain.update(f"{entry['batch_id']}:{digest}\n".encode())
        return chain.hexdigest()

    def events_since(self, watermark: pd.Timestamp | datetime | None) -> pd.DataFrame:
        """Events with ``timestamp > watermark`` (all when None), ordered as ``events()``."""
        df = self.events()
        if watermark is None:
            return df
        return df[df["timestamp"] > pd.Timestamp(watermark)].reset_index(drop=True)

    def items(self) -> pd.DataFrame:
        """The latest version of every item (contract columns, genres as lists)."""
        df = self._read("items", [b["batch_id"] for b in self._state()["batches"]])
        if df is None:
            return pd.DataFrame({c: pd.Series(dtype=object) for c in ITEM_COLUMNS})
        df = df.drop_duplicates("item_id", keep="last").reset_index(drop=True)
        df["genres"] = df["genres"].map(lambda g: [str(x) for x in g] if g is not None else [])
        df["created_at"] = df["created_at"].astype("datetime64[ns, UTC]")
        return df[list(ITEM_COLUMNS)]

    def users(self) -> pd.DataFrame:
        """The latest version of every user (``user_id`` + the union of attribute columns)."""
        df = self._read("users", [b["batch_id"] for b in self._state()["batches"]])
        if df is None:
            return pd.DataFrame({"user_id": pd.Series(dtype=object)})
        return df.drop_duplicates("user_id", keep="last").drop(columns="batch_id").reset_index(drop=True)

    def watermarks(self) -> dict[str, pd.Timestamp]:
        """Newest event timestamp ingested per source."""
        return {src: pd.Timestamp(v) for src, v in self._state()["watermarks"].items()}

    def watermark(self, source: str | None = None) -> pd.Timestamp | None:
        """Newest event timestamp ingested for ``source`` (any source when None); None if none."""
        marks = self._state()["watermarks"]
        values = (
            [marks[source]]
            if source is not None and source in marks
            else ([] if source is not None else list(marks.values()))
        )
        return max(pd.Timestamp(v) for v in values) if values else None

    # ---- ingest --------------------------------------------------------------------------
    def ingest(self, frames: SourceFrames, batch_id: str | None = None) -> IngestReport:
        """Append coerced ``frames`` as one batch; identical re-ingests add nothing.

        Args:
            frames: output of ``load_source`` (contract dtypes).
            batch_id: a new id (default ``<UTC time>-<hash of the event ids>``).
        Returns:
            The ``IngestReport``.
        Raises:
            ValueError: frames not coerced, ``batch_id`` already used, or an ``event_id`` repeated
                with different content (inside the batch or against the lake); nothing is written.
        """
        ev = frames.events
        if list(ev.columns) != list(EVENT_COLUMNS) or not isinstance(
            ev["timestamp"].dtype, pd.DatetimeTZDtype
        ):
            raise ValueError(
                f"frames.events must be contract-coerced (columns {list(EVENT_COLUMNS)}, "
                f"UTC timestamps); got {list(ev.columns)}: use load_source()"
            )
        conflicts = conflicting_event_ids(ev)
        if len(conflicts):
            eid = conflicts["event_id"].iloc[0]
            rows = conflicts.loc[conflicts["event_id"] == eid, "row"].tolist()
            raise ValueError(f"event_id {eid!r} appears at rows {rows} of the batch with different content")
        batch = ev.drop_duplicates("event_id").reset_index(drop=True)
        with self._locked():
            state = self._state()
            committed = [b["batch_id"] for b in state["batches"]]
            batch_id = batch_id or self._new_batch_id(batch)
            if not BATCH_ID_RE.fullmatch(batch_id):
                raise ValueError(
                    f"batch_id {batch_id!r}; expected letters, digits, '.', '_' or '-' (not first)"
                )
            if batch_id in committed:
                raise ValueError(f"batch_id {batch_id!r} already exists in {self.root}")
            existing = self._colliding_events(batch["event_id"], committed)  # never the whole lake
            new = self._drop_known(batch, existing)
            new_items = self._changed(frames.items, self._read("items", committed) if len(frames.items) else None,
                                      "item_id")
            new_users = self._changed(frames.users, self._read("users", committed) if len(frames.users) else None,
                                      "user_id")
            new = new.assign(batch_id=batch_id, seq=np.arange(len(new), dtype=np.int64) + state["next_seq"])
            self._write(
                batch_id,
                {
                    "events": new,
                    "items": new_items.assign(batch_id=batch_id),
                    "users": new_users.assign(batch_id=batch_id),
                },
            )
            marks = dict(state["watermarks"])
            for src, ts in ev.groupby("source")["timestamp"].max().items():
                marks[src] = max(pd.Timestamp(marks.get(src, ts)), ts).isoformat()
            entry = {
                "batch_id": batch_id,
                "created_at": datetime.now(UTC).isoformat(),
                "events": len(new),
                "items": len(new_items),
                "users": len(new_users),
                "sources": sorted(ev["source"].unique()),
                "sha256": batch_digest(new),  # the lake's incremental fingerprint chains these (``fingerprint``)
            }
            state.update(
                next_seq=state["next_seq"] + len(new), batches=[*state["batches"], entry], watermarks=marks
            )
            self._commit(state)
        total = sum(int(b.get("events", 0)) for b in state["batches"])  # counts of committed batches (with this one)
        report = IngestReport(
            batch_id=batch_id,
            sources=entry["sources"],
            events=len(ev),
            users=len(set(ev["user_id"]) | set(frames.users["user_id"].astype(str))),
            items=len(set(ev["item_id"]) | set(frames.items["item_id"].astype(str))),
            new_events=len(new),
            duplicates_dropped=len(ev) - len(new),
            new_items=len(new_items),
            new_users=len(new_users),
            total_events=total,
            watermark=self.watermark(),
        )
        logger.info(
            "lake ingest batch_id=%s new_events=%d duplicates=%d", batch_id, len(new), len(ev) - len(new)
        )
        return report

    @staticmethod
    def _new_batch_id(events: pd.DataFrame) -> str:
        digest = hashlib.sha1("\n".join(events["event_id"]).encode()).hexdigest()[:8]
        return f"{datetime.now(UTC):%Y%m%dT%H%M%S%f}-{digest}"

    @staticmethod
    def _drop_known(batch: pd.DataFrame, existing: pd.DataFrame | None) -> pd.DataFrame:
        if existing is None:
            return batch
        known = batch["event_id"].isin(existing["event_id"])
        if known.any():
            old = existing[existing["event_id"].isin(batch["event_id"])][list(EVENT_COLUMNS)]
            both = pd.concat([old, batch[known]], ignore_index=True)
            both["timestamp"] = both["timestamp"].astype("datetime64[ns, UTC]")
            bad = conflicting_event_ids(both)
            if len(bad):
                eid = bad["event_id"].iloc[0]
                raise ValueError(
                    f"event_id {eid!r} is already in the lake with different content: "
                    f"lake {old[old['event_id'] == eid][CONTENT_COLUMNS].to_dict('records')} vs "
                    f"new {batch[batch['event_id'] == eid][CONTENT_COLUMNS].to_dict('records')}"
                )
        return batch[~known].reset_index(drop=True)

    @staticmethod
    def _changed(frame: pd.DataFrame, existing: pd.DataFrame | None, key: str) -> pd.DataFrame:
        """Rows of ``frame`` that are new or differ from the latest stored version.

        A frame with no attribute columns (ids only) never overrides stored attributes.
        """
        frame = frame.drop_duplicates(key, keep="last").reset_index(drop=True)
        if existing is None or frame.empty:
            return frame
        latest = existing.drop_duplicates(key, keep="last")
        ids_only = list(frame.columns) == [key]
        if ids_only:
            return frame[~frame[key].isin(latest[key])].reset_index(drop=True)
        old = _fingerprint(latest[[c for c in latest.columns if c in frame.columns or c == key]], key)
        new = _fingerprint(frame, key)
        same = pd.Series(new.index, index=new.index).map(old).to_numpy() == new.to_numpy()
        return frame[~same].reset_index(drop=True)

    def _write(self, batch_id: str, tables: dict[str, pd.DataFrame]) -> None:
        tmp = self.root / "_tmp" / batch_id
        if tmp.exists():
            shutil.rmtree(tmp)
        written = []
        try:
            for table, df in tables.items():
                if df.empty:
                    continue
                out = tmp / table / "part-0.parquet"
                out.parent.mkdir(parents=True, exist_ok=True)
                df.to_parquet(out, index=False)
                written.append(table)
            for table in written:
                final = self.root / table / batch_id
                final.parent.mkdir(parents=True, exist_ok=True)
                if final.exists():  # left over by an uncommitted, crashed ingest
                    shutil.rmtree(final)
                os.replace(tmp / table, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def _commit(self, state: dict[str, Any]) -> None:
        tmp = self._state_path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(state, indent=1))
        os.replace(tmp, self._state_path)

"""Generic event files: CSV / Parquet with a column mapping, and academic sequence text files."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from recloop.sources.base import (
    SourceError,
    SourceFrames,
    decode_file,
    empty_items,
    read_table,
    register,
    users_from_events,
)

REQUIRED_EVENT_COLUMNS = ("user_id", "item_id", "timestamp")
SYNTHETIC_EPOCH = pd.Timestamp("2000-01-01", tz="UTC")


def _map_events(df: pd.DataFrame, path: Path, options: dict[str, Any], source: str) -> pd.DataFrame:
    """Rename columns through ``options['columns']`` (file name -> contract name) and fill defaults."""
    mapping: dict[str, str] = dict(options.get("columns") or {})
    missing = [src for src in mapping if src not in df.columns]
    if missing:
        raise SourceError(
            path,
            f"mapped column {missing[0]!r} not in file; columns are {list(df.columns)}",
            column=missing[0],
            line=1,
        )
    df = df.rename(columns=mapping)
    for col in REQUIRED_EVENT_COLUMNS:
        if col not in df.columns:
            raise SourceError(
                path,
                f"missing column {col!r}; columns are {list(df.columns)} "
                "(map yours with columns={'<yours>': '<contract name>'})",
                column=col,
                line=1,
            )
    if "event_type" not in df.columns:
        df["event_type"] = options.get("event_type") or ("rating" if "value" in df.columns else "click")
    if "value" not in df.columns:
        df["value"] = np.nan
    if "source" not in df.columns:
        df["source"] = source
    cols = ["user_id", "item_id", "event_type", "value", "timestamp", "source"]
    if "event_id" in df.columns:
        cols.insert(0, "event_id")
    return df[cols]


def _side_tables(
    options: dict[str, Any], events: pd.DataFrame, reader: Any
) -> tuple[pd.DataFrame, pd.DataFrame]:
    items = reader(Path(options["items_path"])) if options.get("items_path") else None
    users = reader(Path(options["users_path"])) if options.get("users_path") else None
    items = items.rename(columns=options.get("item_columns") or {}) if items is not None else empty_items()
    users = (
        users.rename(columns=options.get("user_columns") or {})
        if users is not None
        else users_from_events(events)
    )
    return items, users


@register("csv")
def read_csv_source(path: Path | None = None, **options: Any) -> SourceFrames:
    """Read an events CSV (with a header) and optional items/users CSVs.

    Args:
        path: the events file.
        options: ``columns`` (mapping file column -> contract column), ``sep`` (default ","),
            ``encoding`` (default utf-8), ``event_type`` (when the file has none; default "rating"
            if a value column exists else "click"), ``source_name`` (default "csv"),
            ``items_path``/``item_columns``, ``users_path``/``user_columns``, ``rating_range``.
    Raises:
        ValueError: no path. SourceError: unreadable file or a missing (mapped) column.
    """
    if path is None:
        raise ValueError("source 'csv' needs a path to the events file")
    path = Path(path)
    sep, enc = options.get("sep", ","), options.get("encoding", "utf-8")
    id_cols = {
        src: str
        for src, dst in (options.get("columns") or {}).items()
        if dst in ("user_id", "item_id", "event_id")
    }
    id_cols.update({c: str for c in ("user_id", "item_id", "event_id")})
    df = read_table(path, sep=sep, encoding=enc, dtype=id_cols)
    source = options.get("source_name", "csv")
    events = _map_events(df, path, options, source)
    items, users = _side_tables(
        options, events, lambda p: read_table(p, sep=sep, encoding=enc, table="items")
    )
    return SourceFrames(events, items, users, meta=_meta(source, path, options))


@register("parquet")
def read_parquet_source(path: Path | None = None, **options: Any) -> SourceFrames:
    """Read an events Parquet file or folder, with the same options as ``csv`` (no sep/encoding).

    Raises:
        ValueError: no path. FileNotFoundError: missing file. SourceError: a missing (mapped) column.
    """
    if path is None:
        raise ValueError("source 'parquet' needs a path to the events file or folder")
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"source file not found: {path}")
    df = pd.read_parquet(path)
    if df.empty:
        raise SourceError(path, "file has no data rows")
    source = options.get("source_name", "parquet")
    events = _map_events(df, path, options, source)
    items, users = _side_tables(options, events, pd.read_parquet)
    meta = _meta(source, path, options)
    meta["first_line"] = {"events": 0}  # Parquet: "line" is the 0-based row number
    return SourceFrames(events, items, users, meta=meta)


def _meta(source: str, path: Path, options: dict[str, Any]) -> dict[str, Any]:
    return {
        "source": source,
        "path": str(path),
        "synthetic_timestamps": False,
        "rating_range": options.get("rating_range"),
        "files": {"events": path},
        "first_line": {"events": 2},
    }


@register("sequence-txt")
def read_sequence_txt(path: Path | None = None, **options: Any) -> SourceFrames:
    """Read an academic sequence file: ``user item`` per line, or ``user item item ...`` per user.

    These files (e.g. the SASRec / BERT4Rec preprocessed datasets) keep only order, so timestamps
    are synthesized: event ``k`` of the file (file order) gets ``2000-01-01 UTC + k`` seconds,
    monotonic within each user and overall; ``meta['synthetic_timestamps']`` is True.

    Args:
        path: the text file (whitespace-separated ids).
        options: ``layout`` ("auto" | "pairs" | "lines"; auto = pairs when every line has exactly
            two fields), ``event_type`` (default "click"), ``encoding``, ``source_name``.
    Raises:
        ValueError: no path or an unknown layout. SourceError: empty file, or a line with no item.
    """
    if path is None:
        raise ValueError("source 'sequence-txt' needs a path")
    path = Path(path)
    layout = options.get("layout", "auto")
    if layout not in ("auto", "pairs", "lines"):
        raise ValueError(f"layout={layout!r}; expected one of ['auto', 'pairs', 'lines']")
    text = decode_file(path, options.get("encoding", "utf-8"))
    users: list[str] = []
    items: list[str] = []
    lines: list[int] = []
    rows = [(n, line.split()) for n, line in enumerate(text.splitlines(), start=1) if line.strip()]
    if layout == "auto":
        layout = "pairs" if all(len(f) == 2 for _, f in rows) else "lines"
    for n, fields in rows:
        if len(fields) < 2 or (layout == "pairs" and len(fields) != 2):
            expected = "2 fields 'user item'" if layout == "pairs" else "'user item [item ...]'"
            raise SourceError(
                path, f"expected {expected}, found {len(fields)} field(s)", line=n, value=" ".join(fields)
            )
        users.extend([fields[0]] * (len(fields) - 1))
        items.extend(fields[1:])
        lines.extend([n] * (len(fields) - 1))
    source = options.get("source_name", "sequence-txt")
    ts = SYNTHETIC_EPOCH + pd.to_timedelta(np.arange(len(items)), unit="s")
    events = pd.DataFrame(
        {
            "user_id": users,
            "item_id": items,
            "event_type": options.get("event_type", "click"),
            "value": np.nan,
            "timestamp": ts,
            "source": source,
        }
    )
    meta = {
        "source": source,
        "path": str(path),
        "synthetic_timestamps": True,
        "rating_range": None,
        "layout": layout,
        "files": {"events": path},
        "lines": {"events": np.asarray(lines)},
    }
    return SourceFrames(events, users=users_from_events(events), meta=meta)

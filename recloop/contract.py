"""The data contract (DESIGN.md): three tables, coerced to exact dtypes or rejected with a clear error.

| table  | columns |
|--------|---------|
| events | event_id str (unique), user_id str, item_id str, event_type in EVENT_TYPES, value float|NaN,
|        | timestamp datetime64[ns, UTC], source str |
| items  | item_id str (unique), title str, genres list[str], text str, created_at UTC|NaT |
| users  | user_id str (unique), optional attribute columns kept as they are |

External ids are strings. The coercion functions are pure: they return a new frame and never
mutate their input.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

import numpy as np
import pandas as pd

EVENT_TYPES: tuple[str, ...] = ("view", "click", "like", "rating", "purchase", "skip")
EVENT_COLUMNS: tuple[str, ...] = ("event_id", "user_id", "item_id", "event_type", "value", "timestamp", "source")
ITEM_COLUMNS: tuple[str, ...] = ("item_id", "title", "genres", "text", "created_at")
USER_COLUMNS: tuple[str, ...] = ("user_id",)


class ContractError(ValueError):
    """A frame violates the data contract. The message names the table, column, rule and examples."""

    def __init__(self, table: str, column: str, rule: str, examples: Iterable[object] = ()) -> None:
        shown = [repr(x) for x in list(examples)[:5]]
        msg = f"{table}.{column}: {rule}"
        if shown:
            msg += f" (e.g. {', '.join(shown)})"
        super().__init__(msg)
        self.table, self.column, self.rule = table, column, rule


def _require_columns(df: pd.DataFrame, table: str, required: Iterable[str]) -> None:
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise ContractError(table, missing[0], f"missing column(s) {missing}; got {list(df.columns)}")


def _as_id(series: pd.Series, table: str, column: str) -> pd.Series:
    """Coerce an id column to non-empty strings; integers become their decimal string."""
    if series.isna().any():
        bad = series.index[series.isna()][:5].tolist()
        raise ContractError(table, column, "must not be null; null at rows", bad)
    if pd.api.types.is_float_dtype(series):
        frac = series[(series % 1) != 0]
        if len(frac):
            raise ContractError(table, column, "float ids must be whole numbers", frac.tolist())
        series = series.astype(np.int64)
    if pd.api.types.is_integer_dtype(series):
        neg = series[series < 0]
        if len(neg):
            raise ContractError(table, column, "numeric ids must be >= 0", neg.tolist())
    out = series.astype(str).str.strip()
    empty = out[out == ""]
    if len(empty):
        raise ContractError(table, column, "must not be empty; empty at rows", empty.index.tolist())
    return out


def to_utc(series: pd.Series, table: str, column: str, *, unit: str | None = None) -> pd.Series:
    """Parse timestamps to ``datetime64[ns, UTC]``.

    Numbers are read as Unix time in ``unit`` (default seconds); naive datetimes are taken as UTC.
    Null stays NaT (callers decide whether that is allowed).

    Raises:
        ContractError: a value cannot be parsed (the message shows examples).
    """
    if pd.api.types.is_numeric_dtype(series) and not pd.api.types.is_bool_dtype(series):
        out = pd.to_datetime(series, unit=unit or "s", utc=True, errors="coerce")
    else:
        out = pd.to_datetime(series, utc=True, errors="coerce", format="mixed")
    bad = series[out.isna() & series.notna()]
    if len(bad):
        raise ContractError(table, column, "unparsable timestamp", bad.tolist())
    return out.astype("datetime64[ns, UTC]")


def derive_event_id(source: str, user_id: str, item_id: str, event_type: str, ts_ns: int, seq: int) -> str:
    """A deterministic event id for sources that have none: sha1 of the identifying fields, 20 hex chars.

    ``seq`` disambiguates identical (user, item, type, timestamp) rows within one source file.
    """
    key = f"{source}\x1f{user_id}\x1f{item_id}\x1f{event_type}\x1f{ts_ns}\x1f{seq}"
    return hashlib.sha1(key.encode()).hexdigest()[:20]


def derive_event_ids(df: pd.DataFrame) -> pd.Series:
    """Vectorised ``derive_event_id`` for a frame with user_id/item_id/event_type/timestamp/source.

    Rows identical in those fields are numbered in row order, so re-ingesting the same file yields
    the same ids (the idempotency key), while genuine repeats stay distinct.
    """
    keys = ["source", "user_id", "item_id", "event_type", "timestamp"]
    seq = df.groupby(keys, sort=False, dropna=False).cumcount().to_numpy()
    ts_ns = df["timestamp"].astype("int64").to_numpy()
    return pd.Series(
        [
            derive_event_id(s, u, i, t, int(n), int(q))
            for s, u, i, t, n, q in zip(
                df["source"], df["user_id"], df["item_id"], df["event_type"], ts_ns, seq, strict=True
            )
        ],
        index=df.index,
        dtype=object,
    )


def coerce_events(df: pd.DataFrame, *, default_source: str | None = None) -> pd.DataFrame:
    """Coerce a frame to the ``events`` contract.

    Missing ``event_id`` values are derived deterministically (``derive_event_ids``); a missing
    ``source`` column takes ``default_source``; a missing ``value`` column is all NaN.

    Returns:
        A new frame with exactly ``EVENT_COLUMNS``, in input row order.
    Raises:
        ContractError: a required column is missing, an id is null/negative/empty, an event type is
            unknown, a value is not numeric, or a timestamp is unparsable or null.
    """
    table = "events"
    df = df.copy()
    if "source" not in df.columns and default_source is not None:
        df["source"] = default_source
    if "value" not in df.columns:
        df["value"] = np.nan
    _require_columns(df, table, ["user_id", "item_id", "event_type", "timestamp", "source"])
    out = pd.DataFrame(index=df.index)
    out["user_id"] = _as_id(df["user_id"], table, "user_id")
    out["item_id"] = _as_id(df["item_id"], table, "item_id")
    etype = df["event_type"].astype(str).str.strip().str.lower()
    bad = etype[~etype.isin(EVENT_TYPES)]
    if len(bad):
        raise ContractError(table, "event_type", f"must be one of {list(EVENT_TYPES)}", bad.unique().tolist())
    out["event_type"] = etype
    value = pd.to_numeric(df["value"], errors="coerce")
    bad = df["value"][value.isna() & df["value"].notna()]
    if len(bad):
        raise ContractError(table, "value", "must be numeric or null", bad.tolist())
    out["value"] = value.astype("float64")
    ts = to_utc(df["timestamp"], table, "timestamp")
    if ts.isna().any():
        raise ContractError(table, "timestamp", "must not be null; null at rows", ts.index[ts.isna()][:5].tolist())
    out["timestamp"] = ts
    out["source"] = df["source"].fillna(default_source or "unknown").astype(str)
    if "event_id" in df.columns:
        eid = df["event_id"].astype(object).where(df["event_id"].notna(), None)
        eid = eid.map(lambda x: None if x is None or str(x).strip() == "" else str(x).strip())
    else:
        eid = pd.Series([None] * len(df), index=df.index, dtype=object)
    if eid.isna().any():
        derived = derive_event_ids(out)
        eid = eid.where(eid.notna(), derived)
    out["event_id"] = eid.astype(object)
    return out[list(EVENT_COLUMNS)].reset_index(drop=True)


def coerce_items(df: pd.DataFrame) -> pd.DataFrame:
    """Coerce a frame to the ``items`` contract.

    ``genres`` may be a list or a ``|``-separated string; ``text`` defaults to "title. genres".

    Raises:
        ContractError: missing ``item_id``, null/duplicate ids, or unparsable ``created_at``.
    """
    table = "items"
    _require_columns(df, table, ["item_id"])
    out = pd.DataFrame(index=df.index)
    out["item_id"] = _as_id(df["item_id"], table, "item_id")
    dup = out["item_id"][out["item_id"].duplicated()]
    if len(dup):
        raise ContractError(table, "item_id", "must be unique; duplicated", dup.tolist())
    out["title"] = df["title"].fillna("").astype(str) if "title" in df.columns else ""
    if "genres" in df.columns:
        out["genres"] = df["genres"].map(_as_genre_list)
    else:
        out["genres"] = [[] for _ in range(len(df))]
    if "text" in df.columns:
        out["text"] = df["text"].fillna("").astype(str)
    else:
        out["text"] = [
            f"{t}. {', '.join(g)}" if g else str(t) for t, g in zip(out["title"], out["genres"], strict=True)
        ]
    if "created_at" in df.columns:
        out["created_at"] = to_utc(df["created_at"], table, "created_at")
    else:
        out["created_at"] = pd.Series(pd.NaT, index=df.index, dtype="datetime64[ns, UTC]")
    return out[list(ITEM_COLUMNS)].reset_index(drop=True)


def _as_genre_list(value: object) -> list[str]:
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return []
    if isinstance(value, str):
        parts = value.split("|")
    else:
        parts = list(value)  # type: ignore[call-overload]
    return [str(p).strip() for p in parts if str(p).strip() and str(p).strip() != "(no genres listed)"]


def coerce_users(df: pd.DataFrame) -> pd.DataFrame:
    """Coerce a frame to the ``users`` contract: a unique string ``user_id``; other columns kept.

    Raises:
        ContractError: missing, null or duplicated ``user_id``.
    """
    table = "users"
    _require_columns(df, table, USER_COLUMNS)
    out = df.copy()
    out["user_id"] = _as_id(df["user_id"], table, "user_id")
    dup = out["user_id"][out["user_id"].duplicated()]
    if len(dup):
        raise ContractError(table, "user_id", "must be unique; duplicated", dup.tolist())
    cols = ["user_id"] + [c for c in out.columns if c != "user_id"]
    return out[cols].reset_index(drop=True)


def empty_events() -> pd.DataFrame:
    """An empty frame with the exact ``events`` dtypes."""
    return pd.DataFrame(
        {
            "event_id": pd.Series(dtype=object),
            "user_id": pd.Series(dtype=object),
            "item_id": pd.Series(dtype=object),
            "event_type": pd.Series(dtype=object),
            "value": pd.Series(dtype="float64"),
            "timestamp": pd.Series(dtype="datetime64[ns, UTC]"),
            "source": pd.Series(dtype=object),
        }
    )

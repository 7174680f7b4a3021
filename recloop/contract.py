"""The data contract (docs/architecture.md): three tables, coerced to exact dtypes or rejected with a clear error.

| table  | columns |
|--------|---------|
| events | event_id str (unique), user_id str, item_id str, event_type in EVENT_TYPES, value float|NaN,
|        | timestamp datetime64[ns, UTC], source str, received_at datetime64[ns, UTC] |
| items  | item_id str (unique), title str, genres list[str], text str, created_at UTC|NaT |
| users  | user_id str (unique), optional attribute columns kept as they are |

External ids are strings. The coercion functions are pure: they return a new frame and never
mutate their input.

Order of a user's history: ``received_at`` (``ORDER_COLUMN``), then ingest order. It is assigned by
the server: the event log stamps each event with the time it received it, so a client's clock can
never reorder a history (a stamp far in the future cannot pin an old click as the most recent one).
The client's ``timestamp`` is kept as data (freshness, windows, the validation gate). Sources that
carry no receive time — files and datasets replayed from the past — take ``received_at = timestamp``.

The row rules of events (which ids, event types, values and timestamps are valid) are defined
here once, as the ``*_violations`` functions, and used by every place that checks events: the
strict loaders (``recloop.sources``), the quarantine of the validation gate (``recloop.quarantine``),
the event log (``recloop.eventlog``), the synthetic source and the API schemas (``serving.schemas``).
"""

from __future__ import annotations

import hashlib
import math
import unicodedata
from collections.abc import Iterable
from datetime import datetime, timedelta
from typing import Literal, get_args

import numpy as np
import pandas as pd

#: The event types, defined once (the API schema uses this Literal; everything else EVENT_TYPES).
EventType = Literal["view", "click", "like", "rating", "purchase", "skip"]
EVENT_TYPES: tuple[str, ...] = get_args(EventType)
MAX_ID_CHARS = 255  # user_id / item_id: the event log's column width
MAX_EVENT_ID_CHARS = 128  # event_id: the event log's column width
MAX_REQUEST_ID_CHARS = 64  # request_id: the exposure log's key width (an event's link to what was shown)
MAX_POSITION = 10_000  # position: 1-based rank of the item in the exposure

# The rules, as the text every checker reports (a rule is "<column> <rule>" in quarantine reasons).
RULE_NULL = "must not be null"
RULE_EMPTY = "must not be empty"
RULE_NEGATIVE = "numeric ids must be >= 0"
RULE_FRACTIONAL = "numeric ids must be whole numbers"
RULE_TOO_LONG = f"must be at most {MAX_ID_CHARS} characters"
RULE_BAD_CHARS = "must not contain control, format, bidi, surrogate or unassigned characters"
RULE_EVENT_TYPE = f"must be one of {list(EVENT_TYPES)}"
RULE_VALUE = "must be numeric or null"
RULE_TIMESTAMP = "unparsable timestamp"
EVENT_COLUMNS: tuple[str, ...] = (
    "event_id", "user_id", "item_id", "event_type", "value", "timestamp", "source", "received_at",
)
#: The server-assigned column that orders a user's history (see the module docstring).
ORDER_COLUMN = "received_at"
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


def _is_null(value: object) -> bool:
    return value is None or value is pd.NA or value is pd.NaT or (isinstance(value, float) and math.isnan(value))


#: Unicode categories an id may not contain: control (Cc, incl. NUL), format (Cf: zero-width and bidi
#: controls such as U+202E), surrogates (Cs), private use (Co) and unassigned (Cn) code points.
FORBIDDEN_ID_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Co", "Cn"})


def id_violation(value: object) -> str:
    """The rule a raw user/item id breaks ('' when valid).

    Rules: not null; numbers, and strings that parse as numbers, whole and >= 0; not empty once
    stripped; no control / format / bidi / surrogate / private-use / unassigned characters (the same
    answer on SQLite and PostgreSQL, which cannot store NUL); at most ``MAX_ID_CHARS`` characters.
    Valid ids become ``normalise_id(value)``: Unicode NFC, surrounding whitespace stripped, whole
    floats without ``.0``.
    """
    if _is_null(value):
        return RULE_NULL
    if isinstance(value, bool):
        return ""
    try:
        number = float(value) if isinstance(value, int | float | np.integer | np.floating | str) else None
    except ValueError:
        number = None
    if number is not None and not math.isnan(number):
        if number < 0:
            return RULE_NEGATIVE
        if number % 1 != 0:
            return RULE_FRACTIONAL
    return _text_violation(str(value), MAX_ID_CHARS)


def event_id_violation(value: object) -> str:
    """The rule a client-supplied ``event_id`` breaks ('' when valid): an opaque string, so only null,
    empty, the forbidden characters of ``id_violation`` and ``MAX_EVENT_ID_CHARS`` apply."""
    if _is_null(value):
        return RULE_NULL
    return _text_violation(str(value), MAX_EVENT_ID_CHARS)


RULE_NOT_TEXT = "must be a string"
RULE_NOT_PRINTABLE = "must contain printable characters only"
RULE_POSITION = f"must be an integer in 1..{MAX_POSITION}"


def request_id_violation(value: object) -> str:
    """The rule a ``request_id`` breaks ('' when valid): the opaque id of an exposure (a served list).

    Rules: not null; a string; not empty once stripped; at most ``MAX_REQUEST_ID_CHARS``
    characters; printable characters only (no control, format, line-separator or unassigned ones).
    Valid values become ``normalise_id(value)`` (NFC, stripped).
    """
    if _is_null(value):
        return RULE_NULL
    if not isinstance(value, str):
        return RULE_NOT_TEXT
    rule = _text_violation(value, MAX_REQUEST_ID_CHARS)
    if rule:
        return rule
    return "" if normalise_id(value).isprintable() else RULE_NOT_PRINTABLE


def position_violation(value: object) -> str:
    """The rule an exposure ``position`` breaks ('' when valid): an integer (not a bool) in 1..``MAX_POSITION``."""
    if isinstance(value, bool | np.bool_) or not isinstance(value, int | np.integer):
        return RULE_POSITION
    return "" if 1 <= int(value) <= MAX_POSITION else RULE_POSITION


def _text_violation(text: str, max_chars: int) -> str:
    """The text part of the id rules: forbidden characters, empty once normalised, too long."""
    if any(unicodedata.category(ch) in FORBIDDEN_ID_CATEGORIES for ch in text):
        return RULE_BAD_CHARS
    text = unicodedata.normalize("NFC", text).strip()
    if not text:
        return RULE_EMPTY
    if len(text) > max_chars:
        return f"must be at most {max_chars} characters"
    return ""


def normalise_id(value: object) -> str:
    """A valid raw id as the contract's string: NFC, whitespace stripped, whole floats without ``.0``."""
    if isinstance(value, float | np.floating):
        value = int(value)
    return unicodedata.normalize("NFC", str(value)).strip()


def id_violations(series: pd.Series) -> pd.Series:
    """``id_violation`` per row ('' = valid), same index."""
    return series.map(id_violation).astype(object)


def normalise_event_type(value: object) -> str:
    """The contract's spelling of an event type: stripped, lower case (valid only if in ``EVENT_TYPES``)."""
    return str(value).strip().lower()


def event_type_violation(value: object) -> str:
    """'' if the event type (case and surrounding spaces ignored) is in ``EVENT_TYPES``, else the rule."""
    return "" if not _is_null(value) and normalise_event_type(value) in EVENT_TYPES else RULE_EVENT_TYPE


def event_type_violations(series: pd.Series) -> pd.Series:
    """``event_type_violation`` per row ('' = valid), same index."""
    return series.map(event_type_violation).astype(object)


def value_violation(value: object) -> str:
    """'' if the value is null or numeric (a number or a numeric string), else the rule."""
    if _is_null(value):
        return ""
    try:
        float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return RULE_VALUE
    return ""


def value_violations(series: pd.Series) -> pd.Series:
    """``value_violation`` per row ('' = valid), same index."""
    return series.map(value_violation).astype(object)


def parse_timestamps(series: pd.Series, unit: str = "s") -> pd.Series:
    """Parse raw timestamps to ``datetime64[ns, UTC]``; unparsable values become NaT.

    Numbers (and numeric strings) are Unix time in ``unit``; other strings are ISO-like dates
    (naive ones taken as UTC); datetimes are converted to UTC.
    """
    if isinstance(series.dtype, pd.DatetimeTZDtype):
        return series.dt.tz_convert("UTC").astype("datetime64[ns, UTC]")
    if pd.api.types.is_datetime64_dtype(series):
        return series.dt.tz_localize("UTC").astype("datetime64[ns, UTC]")
    num = (
        pd.to_numeric(series, errors="coerce") if not pd.api.types.is_bool_dtype(series) else series * np.nan
    )
    out = pd.Series(pd.NaT, index=series.index, dtype="datetime64[ns, UTC]")
    numeric = num.notna()
    if numeric.any():  # only real numbers: pandas' unit cast of an all-NaN array can raise under np.seterr
        out.loc[numeric] = pd.to_datetime(num[numeric], unit=unit, utc=True, errors="coerce")
    rest = num.isna() & series.notna()
    if rest.any():
        text = series[rest].astype(str)
        out.loc[rest] = pd.to_datetime(text, utc=True, errors="coerce", format="mixed")
    return out.astype("datetime64[ns, UTC]")


def rating_violation(event_type: str, value: float | None, rating_min: float, rating_max: float) -> str:
    """'' unless ``event_type`` is ``rating`` and its value is missing or outside [rating_min, rating_max].

    The validation gate quarantines both (``expectations/events.py``); the API refuses them, so an
    accepted rating always reaches training.
    """
    if event_type != "rating":
        return ""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "a rating needs a value"
    if not rating_min <= value <= rating_max:
        return f"value={value} outside the rating range [{rating_min}, {rating_max}]"
    return ""


RULE_TOO_OLD = "is before the contract's floor"
RULE_FUTURE = "is too far in the future"


def timestamp_bound_violation(ts: datetime, *, now: datetime, floor: datetime, future_skew_s: float) -> str:
    """'' if ``floor <= ts <= now + future_skew_s`` (all tz-aware), else the rule it breaks.

    The bound every accepted event must meet (the API refuses the rest, the validation gate
    quarantines them): it also keeps every stored timestamp inside what pandas can represent.
    """
    if ts < floor:
        return f"{RULE_TOO_OLD} {floor.isoformat()}"
    if ts > now + timedelta(seconds=future_skew_s):
        return f"{RULE_FUTURE}: more than {future_skew_s:g} s after the server's clock"
    return ""


def timestamp_violations(series: pd.Series, unit: str = "s") -> pd.Series:
    """Per row: '' if the timestamp is present and parses (``parse_timestamps``)."""
    parsed = parse_timestamps(series, unit)
    out = np.where(series.isna(), RULE_NULL, np.where(parsed.isna(), RULE_TIMESTAMP, ""))
    return pd.Series(out, index=series.index, dtype=object)


def event_violations(df: pd.DataFrame, *, timestamp_unit: str = "s") -> pd.DataFrame:
    """The row rules of raw events: one column per checked contract column, '' where the cell is valid.

    Columns that are absent are not checked (the schema check reports them).

    Returns:
        (n_rows, n_checked_columns) frame of rule texts, same index as ``df``.
    """
    checks = {
        "user_id": id_violations,
        "item_id": id_violations,
        "event_type": event_type_violations,
        "value": value_violations,
        "timestamp": lambda s: timestamp_violations(s, timestamp_unit),
    }
    return pd.DataFrame({c: fn(df[c]) for c, fn in checks.items() if c in df.columns}, index=df.index)


def _require_columns(df: pd.DataFrame, table: str, required: Iterable[str]) -> None:
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise ContractError(table, missing[0], f"missing column(s) {missing}; got {list(df.columns)}")


def _as_id(series: pd.Series, table: str, column: str) -> pd.Series:
    """Coerce an id column to the contract's strings (``id_violation`` / ``normalise_id``).

    Raises:
        ContractError: naming the first rule broken and up to five offending values (row numbers for nulls).
    """
    problems = id_violations(series)
    bad = problems != ""
    if bad.any():
        rule = problems[bad].iloc[0]
        rows = bad & (problems == rule)
        shown = series.index[rows].tolist() if rule in (RULE_NULL, RULE_EMPTY) else series[rows].tolist()
        suffix = "; at rows" if rule in (RULE_NULL, RULE_EMPTY) else ""
        raise ContractError(table, column, rule + suffix, shown)
    if pd.api.types.is_integer_dtype(series):
        return series.astype(str)  # fast path, same result as normalise_id
    return series.map(normalise_id).astype(object)


def to_utc(series: pd.Series, table: str, column: str, *, unit: str | None = None) -> pd.Series:
    """Parse timestamps to ``datetime64[ns, UTC]``.

    The rules of ``parse_timestamps``: numbers are Unix time in ``unit`` (default seconds); naive
    datetimes are taken as UTC. Null stays NaT (callers decide whether that is allowed).

    Raises:
        ContractError: a value cannot be parsed (the message shows examples).
    """
    out = parse_timestamps(series, unit or "s")
    bad = series[out.isna() & series.notna()]
    if len(bad):
        raise ContractError(table, column, RULE_TIMESTAMP, bad.tolist())
    return out


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
    bad = df["event_type"][event_type_violations(df["event_type"]) != ""]
    if len(bad):
        raise ContractError(table, "event_type", RULE_EVENT_TYPE, bad.unique().tolist())
    out["event_type"] = df["event_type"].astype(str).str.strip().str.lower()
    bad = df["value"][value_violations(df["value"]) != ""]
    if len(bad):
        raise ContractError(table, "value", RULE_VALUE, bad.tolist())
    out["value"] = pd.to_numeric(df["value"], errors="coerce").astype("float64")
    ts = to_utc(df["timestamp"], table, "timestamp")
    if ts.isna().any():
        raise ContractError(table, "timestamp", "must not be null; null at rows", ts.index[ts.isna()][:5].tolist())
    out["timestamp"] = ts
    out["source"] = df["source"].fillna(default_source or "unknown").astype(str)
    if ORDER_COLUMN in df.columns:  # server-assigned; unreadable or missing values fall back to the timestamp
        received = parse_timestamps(df[ORDER_COLUMN].astype(object))
        out[ORDER_COLUMN] = received.where(received.notna(), ts)
    else:
        out[ORDER_COLUMN] = ts
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
            ORDER_COLUMN: pd.Series(dtype="datetime64[ns, UTC]"),
        }
    )

"""Row-level checks of raw event frames: find every bad row before coercion.

``event_problems`` is pure and vectorised; ``load_source`` raises on its first finding, and a
validation step can use it to quarantine rows instead.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from recloop.contract import EVENT_TYPES

PROBLEM_COLUMNS = ["row", "column", "rule", "value"]


def _problems(mask: pd.Series, series: pd.Series, column: str, rule: str) -> pd.DataFrame:
    idx = np.flatnonzero(mask.to_numpy())
    return pd.DataFrame(
        {"row": idx, "column": column, "rule": rule, "value": series.iloc[idx].astype(object).to_numpy()}
    )


def _id_problems(series: pd.Series, column: str) -> list[pd.DataFrame]:
    out = [_problems(series.isna(), series, column, "must not be null")]
    as_str = series.astype(str).str.strip()
    out.append(_problems(series.notna() & (as_str == ""), series, column, "must not be empty"))
    num = pd.to_numeric(series, errors="coerce")
    out.append(_problems(num < 0, series, column, "numeric ids must be >= 0"))
    out.append(_problems(num.notna() & (num % 1 != 0), series, column, "numeric ids must be whole numbers"))
    return out


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
    out = pd.to_datetime(num, unit=unit, utc=True, errors="coerce")
    rest = num.isna() & series.notna()
    if rest.any():
        text = series[rest].astype(str)
        out.loc[rest] = pd.to_datetime(text, utc=True, errors="coerce", format="mixed")
    return out.astype("datetime64[ns, UTC]")


def event_problems(events: pd.DataFrame, *, timestamp_unit: str = "s") -> pd.DataFrame:
    """List every bad cell of a raw events frame (contract column names, raw values).

    Checks: ids null/empty/negative/fractional; ``event_type`` outside ``EVENT_TYPES``; ``value``
    not numeric; ``timestamp`` null or unparsable. Columns that are absent are not checked here
    (the contract reports them).

    Returns:
        A frame with columns ``row`` (0-based position), ``column``, ``rule``, ``value``, sorted
        by row; empty when the frame is clean.
    """
    found: list[pd.DataFrame] = []
    for col in ("user_id", "item_id"):
        if col in events.columns:
            found.extend(_id_problems(events[col], col))
    if "event_type" in events.columns:
        et = events["event_type"].astype(str).str.strip().str.lower()
        found.append(
            _problems(
                ~et.isin(EVENT_TYPES),
                events["event_type"],
                "event_type",
                f"must be one of {list(EVENT_TYPES)}",
            )
        )
    if "value" in events.columns:
        v = events["value"]
        bad = pd.to_numeric(v, errors="coerce").isna() & v.notna()
        found.append(_problems(bad, v, "value", "must be numeric or null"))
    if "timestamp" in events.columns:
        ts = events["timestamp"]
        found.append(_problems(ts.isna(), ts, "timestamp", "must not be null"))
        parsed = parse_timestamps(ts, timestamp_unit)
        found.append(_problems(parsed.isna() & ts.notna(), ts, "timestamp", "unparsable timestamp"))
    if not found:
        return pd.DataFrame(columns=PROBLEM_COLUMNS)
    out = pd.concat(
        [f for f in found if len(f)] or [pd.DataFrame(columns=PROBLEM_COLUMNS)], ignore_index=True
    )
    return out.sort_values("row", kind="stable").reset_index(drop=True)


def conflicting_event_ids(events: pd.DataFrame) -> pd.DataFrame:
    """Rows of a coerced events frame whose ``event_id`` repeats with different content.

    Returns:
        The conflicting rows (all copies), with their 0-based position in column ``row``.
    """
    dup = events[events["event_id"].duplicated(keep=False)]
    if dup.empty:
        return dup.assign(row=pd.Series(dtype=np.int64))
    content = ["user_id", "item_id", "event_type", "value", "timestamp", "source"]
    distinct = dup.drop_duplicates(subset=["event_id", *content]).groupby("event_id").size()
    bad_ids = distinct[distinct > 1].index
    bad = dup[dup["event_id"].isin(bad_ids)]
    return bad.assign(row=bad.index.to_numpy())

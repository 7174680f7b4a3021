"""Row-level checks of raw event frames: find every bad row before coercion.

``event_problems`` is pure and vectorised; ``load_source`` raises on its first finding, and a
validation step can use it to quarantine rows instead.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from recloop.contract import event_violations

PROBLEM_COLUMNS = ["row", "column", "rule", "value"]


def _problems(mask: pd.Series, series: pd.Series, column: str, rules: pd.Series) -> pd.DataFrame:
    idx = np.flatnonzero(mask.to_numpy())
    return pd.DataFrame(
        {"row": idx, "column": column, "rule": rules.iloc[idx].to_numpy(),
         "value": series.iloc[idx].astype(object).to_numpy()}
    )


def event_problems(events: pd.DataFrame, *, timestamp_unit: str = "s") -> pd.DataFrame:
    """List every bad cell of a raw events frame (contract column names, raw values).

    The rules are the data contract's (``recloop.contract.event_violations``): ids null / empty /
    negative / fractional / too long; ``event_type`` outside ``EVENT_TYPES``; ``value`` not numeric;
    ``timestamp`` null or unparsable. Columns that are absent are not checked here (the contract
    reports them).

    Returns:
        A frame with columns ``row`` (0-based position), ``column``, ``rule``, ``value``, sorted
        by row; empty when the frame is clean.
    """
    rules = event_violations(events, timestamp_unit=timestamp_unit)
    found = [_problems(rules[c] != "", events[c], c, rules[c]) for c in rules.columns]
    found = [f for f in found if len(f)]
    if not found:
        return pd.DataFrame(columns=PROBLEM_COLUMNS)
    return pd.concat(found, ignore_index=True).sort_values("row", kind="stable").reset_index(drop=True)


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

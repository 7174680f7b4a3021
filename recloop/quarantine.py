"""Lenient, row-level contract coercion for the validation gate: bad rows are set aside, never dropped.

``recloop.contract.coerce_events`` is strict (one bad row rejects the frame). The gate instead splits
a raw events frame into the rows that satisfy the contract (coerced) and the rows that do not, each
with its original values and a reason, so that the gate can quarantine them and decide by their share.
Structural problems (missing columns) cannot be handled row by row and raise ``DataValidationError``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import NamedTuple

import numpy as np
import pandas as pd

from recloop.contract import EVENT_COLUMNS, ContractError, coerce_events, event_violations

REQUIRED_EVENT_COLUMNS: tuple[str, ...] = ("user_id", "item_id", "event_type", "timestamp")
REJECT_COLUMNS: tuple[str, ...] = ("row", "check", "reason", "action")


class DataValidationError(ValueError):
    """A batch failed the validation gate; ``failing`` lists the failing checks/expectations."""

    def __init__(self, failing: Iterable[str], detail: str = "") -> None:
        self.failing = list(failing)
        msg = "data validation failed: " + "; ".join(self.failing)
        super().__init__(msg + (f" ({detail})" if detail else ""))


class EventSplit(NamedTuple):
    """Result of ``split_events``.

    Attributes:
        good: coerced events (``EVENT_COLUMNS``, RangeIndex), deduplicated, in input order.
        rejected: original rows (all raw columns, values as given) plus ``row`` (0-based position in
            the raw frame), ``check`` (the failed check), ``reason`` (value and rule) and ``action``
            (``quarantined``, or ``deduplicated`` for an exact repeat of an earlier event).
        good_rows: (len(good),) int64 positions of the good rows in the raw frame.
    """

    good: pd.DataFrame
    rejected: pd.DataFrame
    good_rows: np.ndarray


def _row_problems(df: pd.DataFrame) -> pd.DataFrame:
    """(n_rows, n_checks) frame of reasons ('' = ok), one column per contract check (the contract's rules)."""
    rules = event_violations(df)
    return pd.DataFrame(
        {f"contract.{c}": np.where(rules[c] != "", c + ": " + rules[c], "") for c in rules.columns},
        index=df.index,
    )


def _rejects(
    raw: pd.DataFrame, rows: np.ndarray, check: list[str], reason: list[str], action: str
) -> pd.DataFrame:
    out = raw.iloc[rows].copy()
    out["row"] = rows.astype(np.int64)
    out["check"], out["reason"], out["action"] = check, reason, action
    return out.reset_index(drop=True)


def split_events(raw: pd.DataFrame, source: str) -> EventSplit:
    """Split a raw events frame (contract column names, any dtypes) into coerced good rows and rejects.

    Row-level problems reject only their row: null/empty/negative/fractional ids, an unknown or null
    ``event_type``, a non-numeric ``value``, a null or unparsable ``timestamp``. Duplicate
    ``event_id`` values (only possible when the source supplies ids; derived ids are unique):
    exact repeats of an earlier event are dropped and recorded with ``action="deduplicated"``;
    rows sharing an id with different content are all quarantined (which one is true is unknown).

    Args:
        raw: events with at least ``REQUIRED_EVENT_COLUMNS``; ``value``, ``source`` and ``event_id``
            are optional (``source`` defaults to the ``source`` argument).
        source: the source name recorded on rows that have none.
    Returns:
        ``EventSplit(good, rejected, good_rows)``.
    Raises:
        DataValidationError: a required column is missing (schema drift, e.g. a renamed column).
    """
    missing = [c for c in REQUIRED_EVENT_COLUMNS if c not in raw.columns]
    if missing:
        raise DataValidationError(
            [f"events.columns: missing {missing}"], detail=f"got columns {list(raw.columns)}"
        )
    df = raw.reset_index(drop=True)
    if "value" not in df.columns:
        df = df.assign(value=np.nan)
    problems = _row_problems(df)
    reasons_by_check = problems.to_numpy(dtype=object)  # (n_rows, n_checks)
    failed = reasons_by_check != ""
    bad = failed.any(axis=1)
    bad_rows = np.flatnonzero(bad)
    first_check = problems.columns[failed[bad_rows].argmax(axis=1)].tolist()
    reasons = ["; ".join(r for r in reasons_by_check[i] if r) for i in bad_rows]
    rejected = [_rejects(raw, bad_rows, first_check, reasons, "quarantined")]

    good_rows = np.flatnonzero(~bad)
    try:
        good = coerce_events(df.iloc[good_rows], default_source=source)
    except ContractError as err:  # a check above missed a case: surface it as a gate failure
        raise DataValidationError([f"events.contract: {err}"]) from err

    # Exact repeats are dropped (recorded as deduplicated); ids repeated with other content are quarantined.
    duplicate_rules = (
        (lambda g: g.duplicated(subset=list(EVENT_COLUMNS), keep="first"), "exact repeat of event_id={!r}",
         "deduplicated"),
        (lambda g: g["event_id"].duplicated(keep=False), "event_id={!r} repeated with different content",
         "quarantined"),
    )
    for find, reason, action in duplicate_rules:
        mask = find(good).to_numpy()
        if mask.any():
            rows, ids = good_rows[mask], good["event_id"].to_numpy()[mask]
            rejected.append(
                _rejects(raw, rows, ["duplicate.event_id"] * len(rows), [reason.format(i) for i in ids], action)
            )
            good, good_rows = good[~mask].reset_index(drop=True), good_rows[~mask]
    out = pd.concat(rejected, ignore_index=True) if len(rejected) > 1 else rejected[0]
    return EventSplit(good, out, good_rows.astype(np.int64))


def as_text_columns(frame: pd.DataFrame) -> pd.DataFrame:
    """A copy with every object column as str-or-None, so mixed raw values can be written to Parquet."""
    out = frame.copy()
    for column in out.columns:
        if out[column].dtype == object:
            out[column] = [
                None if v is None or (np.isscalar(v) and pd.isna(v)) else str(v) for v in out[column]
            ]
    return out

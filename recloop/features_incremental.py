"""Pure transforms of the incremental feature update: new feature rows from new events only.

A loop turn appends, to the offline feature tables the full build wrote (``recloop.features``), only the rows
its new events change, so a turn costs what its events touch, not what the lake holds:

- user tables (``user_recent_items``, ``user_stats``): the touched users' rows at their new event times,
  recomputed from their own whole history (``incremental_user_rows``): the full build's rows, exactly;
- ``item_stats``: the touched items' rows at their new event times, and snapshot rows at the new ``as_of``,
  from a per-item cumulative state (``item_state_table``: count, rating sum and count, last event) and the
  events of the trailing window only (the last ``max(TRAILING_WINDOWS_DAYS)`` days, ``item_stats_increment``).

The increment applies only when every new event is ordered after ``cut`` (the newest order time the tables
hold); the caller rebuilds in full otherwise (a late event rewrites history). Through a point-in-time join
(latest row with ``event_ts <= t``), the old tables plus the increment give the full rebuild's values at every
``t >= cut`` (tested in ``tests/unit/test_features_incremental.py``). One deliberate difference: an item with
no event in the trailing window gets no new snapshot row at the new ``as_of``; its latest row already has
zero trailing counts and unchanged cumulative ones, which is what the snapshot would say.
"""

from __future__ import annotations

from datetime import datetime, timedelta

import numpy as np
import pandas as pd

from recloop import features as F

#: How far back the trailing item counts look: the window of events an increment reads.
WINDOW = timedelta(days=max(F.TRAILING_WINDOWS_DAYS))
ITEM_STATE_COLUMNS = ("item_id", "popularity", "rated_sum", "rated_n", "last_event_ts")


def order_time(events: pd.DataFrame) -> pd.Series:
    """Each event's order time (``received_at``, else ``timestamp``), UTC: the feature rows' ``event_ts``."""
    ts = pd.to_datetime(events["timestamp"], utc=True)
    if F.ORDER_COLUMN in events.columns:
        ts = pd.to_datetime(events[F.ORDER_COLUMN], utc=True).fillna(ts)
    return ts.astype("datetime64[ns, UTC]")


def item_state_table(positives: pd.DataFrame) -> pd.DataFrame:
    """Per-item cumulative state of the positive events: the full build's starting point for increments.

    Args:
        positives: the event policy's positive events (contract columns), any order.
    Returns:
        Columns ``ITEM_STATE_COLUMNS``: ``popularity`` int64 (events), ``rated_sum`` float64 and ``rated_n``
        int64 (non-null ``value``), ``last_event_ts`` UTC (newest order time); one row per item, sorted by id.
    """
    frame = pd.DataFrame({"item_id": positives["item_id"].astype(str).to_numpy(),
                          "value": pd.to_numeric(positives["value"], errors="coerce").to_numpy(dtype=float)
                          if "value" in positives else np.nan,
                          "ts": order_time(positives).to_numpy()})
    g = frame.groupby("item_id", sort=True)
    out = pd.DataFrame({"popularity": g.size().astype(np.int64), "rated_sum": g["value"].sum(min_count=0),
                        "rated_n": g["value"].count().astype(np.int64), "last_event_ts": g["ts"].max()})
    out["rated_sum"] = out["rated_sum"].fillna(0.0).astype("float64")
    out["last_event_ts"] = pd.to_datetime(out["last_event_ts"], utc=True)
    return out.reset_index()[list(ITEM_STATE_COLUMNS)]


def incremental_user_rows(table: pd.DataFrame, cut: datetime) -> pd.DataFrame:
    """The rows of a user table built from the touched users' whole history that are newer than ``cut``.

    Args:
        table: ``F.user_recent_items_table`` / ``F.user_stats_table`` of the touched users' events.
        cut: the newest order time the existing tables hold (UTC).
    Returns:
        The rows with ``event_ts > cut`` (the full build's rows for those users and times).
    """
    return table[table["event_ts"] > pd.Timestamp(cut)].reset_index(drop=True)


def item_stats_increment(
    state: pd.DataFrame, window: pd.DataFrame, cut: datetime, created_ts: datetime, as_of: datetime
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """New ``item_stats`` rows and the next item state, from the trailing window of positive events.

    Args:
        state: ``item_state_table`` of every positive event ordered at or before ``cut``.
        window: every positive event ordered after ``min(cut, previous as_of) - WINDOW`` (old and new ones).
        cut: the newest order time the existing tables hold; events after it are the new ones.
        created_ts: UTC time the rows are computed (Feast ``created_ts``).
        as_of: the new snapshot time (the newest new event's order time).
    Returns:
        (rows, state): rows in ``F.item_stats_table``'s columns — one per (touched item, new event time), and a
        snapshot at ``as_of`` for every window item whose last event is older; the updated state (all items).
    Raises:
        ValueError: a required column is missing.
    """
    ordered = F._ordered(window, "item_id")  # (n,) by item then order time
    items = ordered["item_id"].astype(str).to_numpy()
    ts = F._naive(ordered["timestamp"])
    n = len(items)
    cut_ns = np.datetime64(pd.Timestamp(cut).tz_convert("UTC").tz_localize(None), "ns")
    at = np.datetime64(pd.Timestamp(as_of).tz_convert("UTC").tz_localize(None), "ns")
    prior = state.set_index("item_id").reindex(items)
    pop0 = prior["popularity"].fillna(0).to_numpy(dtype=np.int64)
    rsum0 = prior["rated_sum"].fillna(0.0).to_numpy(dtype=float)
    rn0 = prior["rated_n"].fillna(0).to_numpy(dtype=np.int64)
    is_new = ts > cut_ns
    value = (pd.to_numeric(ordered["value"], errors="coerce") if "value" in ordered
             else pd.Series(np.nan, index=ordered.index))
    value = value.where(is_new)
    by_item = ordered["item_id"].astype(str)
    popularity = pop0 + pd.Series(is_new.astype(np.int64)).groupby(by_item.to_numpy(), sort=False).cumsum().to_numpy()
    rsum = rsum0 + value.fillna(0.0).groupby(by_item, sort=False).cumsum().to_numpy()
    rn = rn0 + value.notna().astype(np.int64).groupby(by_item, sort=False).cumsum().to_numpy()
    mean = np.where(rn > 0, rsum / np.maximum(rn, 1), np.nan)
    starts = np.flatnonzero(np.r_[True, items[1:] != items[:-1]]) if n else np.zeros(0, np.int64)
    ends = F._group_ends(ordered, "item_id")
    ends = ends[is_new[ends]]  # rows at new event times only
    cols: dict[str, object] = {"item_id": items[ends], "popularity": popularity[ends].astype(np.int64)}
    for days in F.TRAILING_WINDOWS_DAYS:
        cols[f"popularity_{days}d"] = F._trailing_counts(ts, starts, ts, days)[ends]
    cols |= {"mean_rating": mean[ends], "last_event_ts": ts[ends], "event_ts": ts[ends]}
    rows = pd.DataFrame(cols)
    block_end = (np.r_[starts[1:], n] - 1).astype(np.int64) if n else starts
    stale = block_end[ts[block_end] < at]  # every window item whose newest event is older than as_of
    if len(stale):
        snap = pd.DataFrame({"item_id": items[stale], "popularity": popularity[stale].astype(np.int64)})
        at_all = np.full(n, at)
        for days in F.TRAILING_WINDOWS_DAYS:
            snap[f"popularity_{days}d"] = F._trailing_counts(ts, starts, at_all, days)[stale]
        snap["mean_rating"], snap["last_event_ts"], snap["event_ts"] = mean[stale], ts[stale], at
        rows = pd.concat([rows, snap], ignore_index=True).sort_values(["item_id", "event_ts"], kind="stable")
    rows["last_event_ts"] = pd.to_datetime(rows["last_event_ts"]).dt.tz_localize("UTC")
    rows = F._stamp(rows, created_ts)
    touched = pd.DataFrame({"item_id": items[block_end], "popularity": popularity[block_end].astype(np.int64),
                            "rated_sum": rsum[block_end], "rated_n": rn[block_end].astype(np.int64),
                            "last_event_ts": pd.to_datetime(ts[block_end]).tz_localize("UTC")})
    kept = state[~state["item_id"].astype(str).isin(touched["item_id"])]  # items without a window event
    new_state = pd.concat([kept, touched], ignore_index=True).sort_values("item_id", kind="stable")
    new_state = new_state.reset_index(drop=True)
    new_state["popularity"] = new_state["popularity"].astype(np.int64)
    new_state["rated_n"] = new_state["rated_n"].astype(np.int64)
    new_state["last_event_ts"] = pd.to_datetime(new_state["last_event_ts"], utc=True)
    return rows.reset_index(drop=True), new_state[list(ITEM_STATE_COLUMNS)]

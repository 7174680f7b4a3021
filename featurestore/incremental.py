"""The features stage of an incremental loop turn: new events -> new feature rows -> offline parts -> online store.

The full build (``featurestore.materialize.refresh_features``) writes each event view as one base part
(``home/features/<view>/part-base.parquet``) and, when it read the lake, the increment's state
(``home/features/_incremental/``: ``state.json`` with the lake batches it covered, ``cut`` and ``as_of``, and
``item_state.parquet``, ``recloop.features_incremental.item_state_table``). A loop turn then calls
``update_features``: it reads only the lake batches committed since, the touched users' own history and the
trailing window of item events (``recloop.lake.Lake.events_of_users`` / ``events_received_after``), appends the
new rows as one more part per view (Feast's file source reads the view's folder), writes each touched entity's
newest row to the online store (what materialisation would write) and moves the materialisation watermark.

It declines (returns None: the caller runs the full refresh) when there is no state, the lake's batches are not
the ones the state covered plus new ones (a rewrite), a new event is ordered at or before ``cut`` (a late
event changes older rows) or after ``now`` (a future row must not go online), or the recent-items length ``n``
grew past the state's ``history_len`` or the state has none (a tuned or served model reads more: every user's list
must grow). A shorter ``n`` writes the recorded length (lists never shrink).
"""

from __future__ import annotations

import json
import os
import threading
import uuid
from datetime import datetime
from pathlib import Path
from typing import Any

import pandas as pd

from featurestore.materialize import (
    EVENT_VIEWS,
    SOURCE_FILES,
    read_watermark,
    write_watermark,
)
from recloop import features as F
from recloop import features_incremental as FI
from recloop.policy import DEFAULT_POLICY, EventPolicy

STATE_DIR = "_incremental"
STATE_FILE = "state.json"
ITEM_STATE_FILE = "item_state.parquet"


def state_dir(features_dir: Path) -> Path:
    """Where the increment's state lives (``features_dir/_incremental``)."""
    return features_dir / STATE_DIR


def read_state(features_dir: Path) -> tuple[dict[str, Any], pd.DataFrame] | None:
    """(state, item state) of the last full build or increment, or None when there is none."""
    folder = state_dir(features_dir)
    if not (folder / STATE_FILE).exists() or not (folder / ITEM_STATE_FILE).exists():
        return None
    return json.loads((folder / STATE_FILE).read_text()), pd.read_parquet(folder / ITEM_STATE_FILE)


def write_state(features_dir: Path, state: dict[str, Any], item_state: pd.DataFrame) -> None:
    """Persist the item state, then ``state.json`` last (atomic replace each: the json is the commit)."""
    folder = state_dir(features_dir)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".item_state.tmp{os.getpid()}"
    item_state.to_parquet(tmp, index=False)
    os.replace(tmp, folder / ITEM_STATE_FILE)
    tmp = folder / f".state.tmp{os.getpid()}"
    tmp.write_text(json.dumps(state))
    os.replace(tmp, folder / STATE_FILE)


def full_state(events: pd.DataFrame, batch_ids: list[str], as_of: datetime,
               policy: EventPolicy = DEFAULT_POLICY, *, history_len: int
               ) -> tuple[dict[str, Any], pd.DataFrame]:
    """The increment's starting state after a full build over the lake's ``events`` (batches ``batch_ids``).

    Args:
        history_len: the recent-items length the full build wrote (``n``), recorded so that a longer one later
            forces a full rebuild and a shorter one never shrinks the lists (``update_features``).
    Returns:
        ({"lake_batches", "last_batch_id", "cut", "as_of", "history_len"}, ``FI.item_state_table`` of the
        positives).
    """
    order = FI.order_time(events)
    cut = order.max() if len(order) else pd.Timestamp(as_of)
    state = {"lake_batches": len(batch_ids), "last_batch_id": batch_ids[-1] if batch_ids else None,
             "cut": pd.Timestamp(cut).isoformat(), "as_of": pd.Timestamp(as_of).isoformat(),
             "history_len": int(history_len)}
    return state, FI.item_state_table(policy.positives(events))


def incremental_tables(history: pd.DataFrame, window: pd.DataFrame, item_state: pd.DataFrame, cut: datetime, *,
                       n: int, created_ts: datetime, as_of: datetime, policy: EventPolicy = DEFAULT_POLICY
                       ) -> tuple[dict[str, pd.DataFrame], pd.DataFrame]:
    """The new rows of each event view (pure): what ``build_feature_tables`` over the whole lake would add.

    Args:
        history: every event of the users the new events touched (old and new).
        window: every event ordered after ``min(cut, previous as_of) - FI.WINDOW``.
        item_state: the item state at ``cut``.
        cut: the newest order time the existing tables hold.
        n / created_ts / as_of / policy: as ``featurestore.materialize.build_feature_tables``.
    Returns:
        ({view: new rows}, next item state).
    """
    item_rows, next_state = FI.item_stats_increment(item_state, policy.positives(window), cut, created_ts, as_of)
    tables = {
        "user_recent_items": FI.incremental_user_rows(
            F.user_recent_items_table(policy.positives(history), n, created_ts), cut),
        "user_stats": FI.incremental_user_rows(F.user_stats_table(history, created_ts), cut),
        "item_stats": item_rows,
    }
    return tables, next_state


def append_parts(tables: dict[str, pd.DataFrame], features_dir: Path, tag: str) -> dict[str, str]:
    """Write each non-empty table as ``features_dir/<view>/part-<tag>.parquet`` (temporary file + rename)."""
    out = {}
    for view, df in tables.items():
        if not len(df):
            continue
        folder = features_dir / SOURCE_FILES[view]
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"part-{tag}.parquet"
        tmp = folder / f".part.tmp{os.getpid()}.{threading.get_ident()}"  # a dot file: no reader lists it
        df.to_parquet(tmp, index=False)
        os.replace(tmp, path)
        out[view] = str(path)
    return out


def update_features(store: Any, lake: Any, features_dir: Path, now: datetime, *, n: int,
                    policy: EventPolicy = DEFAULT_POLICY) -> dict[str, Any] | None:
    """One incremental features stage (see the module docstring); None when the full refresh must run.

    Args:
        store: the Feast store (its registry already applied by a full build).
        lake: the ``recloop.lake.Lake`` the events are in.
        features_dir: ``home/features``.
        now: UTC time of the run (rows' ``created_ts``; nothing newer goes online).
        n: items of each touched user's recent-items list (``recloop.settings.online_history_len``; the
            features flow's ``materialised_history_len``).
    Returns:
        ``{"mode": "incremental", "new_events", "touched_users", "touched_items", "window_events", "rows",
        "watermark", "views"}``, or None.
    Raises:
        Anything Feast raises; the state and the watermark are then unchanged (a rerun rewrites the same rows).
    """
    loaded = read_state(features_dir)
    if loaded is None or any(not (features_dir / SOURCE_FILES[v]).is_dir() for v in EVENT_VIEWS):
        return None
    state, item_state = loaded
    recorded = state.get("history_len")
    if recorded is None or n > int(recorded):  # unknown (an older state), or the models now read more than
        return None                             # untouched users' lists hold: the full build grows every list
    n = int(recorded)  # never shorter than every other user's list (a failed read of the models' lengths)
    ids = [b["batch_id"] for b in lake.batches()]
    covered = int(state["lake_batches"])
    if covered > len(ids) or (covered and ids[covered - 1] != state["last_batch_id"]):
        return None
    new = lake.events_of_batches(ids[covered:])
    cut, as_of_prev = pd.Timestamp(state["cut"]), pd.Timestamp(state["as_of"])
    order = FI.order_time(new)
    if len(new) and (order.min() <= cut or order.max() > pd.Timestamp(now)):
        return None
    summary: dict[str, Any] = {"mode": "incremental", "new_events": len(new), "touched_users": 0,
                               "touched_items": 0, "window_events": 0, "rows": {}, "views": []}
    if len(new):
        as_of = order.max()
        history = lake.events_of_users(new["user_id"].unique())
        window = lake.events_received_after(min(cut, as_of_prev) - FI.WINDOW)
        tables, item_state = incremental_tables(history, window, item_state, cut.to_pydatetime(), n=n,
                                                created_ts=now, as_of=as_of.to_pydatetime(), policy=policy)
        append_parts(tables, features_dir, f"{pd.Timestamp(now):%Y%m%dT%H%M%S%f}-{uuid.uuid4().hex[:6]}")
        for view, rows in tables.items():
            key = "user_id" if view.startswith("user_") else "item_id"
            latest = F.latest_rows(rows, key, cut, now)
            if len(latest):
                store.write_to_online_store(view, latest)
        summary.update(touched_users=int(new["user_id"].nunique()), touched_items=int(new["item_id"].nunique()),
                       window_events=len(window), rows={v: len(t) for v, t in tables.items()},
                       views=[v for v, t in tables.items() if len(t)])
        state = {**state, "cut": as_of.isoformat(), "as_of": as_of.isoformat()}
        mark = read_watermark(features_dir)
        if mark is None or as_of > pd.Timestamp(mark):
            write_watermark(features_dir, as_of.to_pydatetime())
    state = {**state, "lake_batches": len(ids), "last_batch_id": ids[-1] if ids else None}
    write_state(features_dir, state, item_state)
    mark = read_watermark(features_dir)
    summary["watermark"] = mark.isoformat() if mark else None
    return summary

"""Online metrics from the exposure log: what was shown (exposures) and what the users did with it.

``online_metrics`` is pure (frames in, a JSON-able dict out); ``read_online_inputs`` reads its inputs
from the event-log database (``recloop.exposures.ExposureLog`` and ``recloop.eventlog.EventLog``) and
the lake; ``online_report`` does both (``recloop online-metrics`` and ``flows/monitor.py``).

Definitions (also returned under ``protocol.definitions``):

- a **request** is one exposure (one ``/recommend`` answer: ``exposures`` row); an **impression** is
  one slot shown (an ``exposure_items`` row); ``impressions@k`` counts the slots at position <= k
  (positions are 1-based);
- a **click** is an event whose role under the event policy is ``positive``, linked by its
  ``request_id`` to a slot of that request with the same ``item_id``; the same (request_id, item_id)
  counts once however often it is reported; a **skip** is the same for a ``negative`` event. An item
  both clicked and skipped in one request counts as one click and one skip. ``context`` events are
  neither and are ignored;
- the slot's position is the exposure's: an event whose own ``position`` (when given) differs is still
  attributed to the slot, and counted in ``position_mismatch`` (per event row);
- positive/negative event rows that cannot be attributed are counted in ``unattributed`` (per event
  row, duplicates included) with a reason: ``no_request_id``, ``unknown_request`` (no exposure with that
  id in the frames: never recorded, pruned, or shown before the window) or ``item_not_shown``;
- ``ctr@k`` = clicks at positions <= k / impressions@k; ``ctr`` = clicks / impressions;
  ``ctr_by_position[p - 1]`` = clicks at p / impressions at p; ``skip_rate`` = skips / impressions;
  ``request_ctr`` = share of requests with >= 1 click; ``catalogue_share`` = distinct items shown /
  ``n_catalogue``; ``freshness@k`` = impressions@k of fresh items (added to the catalogue in the last
  ``freshness_days`` before the data's newest timestamp: ``recloop.features.fresh_item_ids``, the
  offline freshness@10's definition) / impressions@k. A rate whose denominator is 0 is None.
"""

from __future__ import annotations

import re
from collections.abc import Collection
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from recloop.policy import EventPolicy

GROUP_BY: dict[str, str | None] = {"variant": "variant", "version": "model_version", "position": None}

DEFINITIONS: dict[str, str] = {
    "request": "one exposure (one recommend answer)",
    "impression": "one slot shown (an exposure_items row); impressions@k: slots at position <= k (1-based)",
    "click": "a positive event (event policy) whose request_id and item_id match a slot shown; "
             "distinct per (request_id, item_id)",
    "skip": "a negative event (event policy) linked the same way; distinct per (request_id, item_id)",
    "position": "the exposure's slot position; an event reporting another position counts in position_mismatch "
                "(per event row)",
    "unattributed": "positive/negative event rows with no request_id, an unknown request_id, or an item that "
                    "request did not show (per event row)",
    "ctr@k": "clicks at positions <= k / impressions@k",
    "ctr": "clicks / impressions",
    "ctr_by_position": "[p - 1]: clicks at position p / impressions at position p",
    "skip_rate": "skips / impressions",
    "request_ctr": "requests with >= 1 click / requests",
    "catalogue_share": "distinct items shown / n_catalogue (None without a catalogue)",
    "freshness@k": "impressions@k of items added to the catalogue in the last freshness_days before the data's "
                   "newest timestamp / impressions@k (None without the fresh set)",
}
UNATTRIBUTED_REASONS = ("no_request_id", "unknown_request", "item_not_shown")

_EXPOSURE_COLUMNS = ("request_id", "user_id", "model_version", "variant")
_ITEM_COLUMNS = ("request_id", "position", "item_id")
_EVENT_COLUMNS = ("request_id", "item_id", "event_type")


def online_metrics(exposures: pd.DataFrame | None, items: pd.DataFrame | None, events: pd.DataFrame | None,
                   policy: EventPolicy, *, by: str = "variant", k: int = 10,
                   n_catalogue: int | None = None, fresh_items: Collection[str] | None = None) -> dict[str, Any]:
    """Online metrics of the exposures shown and the feedback events linked to them. Pure.

    Definitions (the module docstring and ``protocol.definitions`` say the same):

    - requests = exposures (rows of ``exposures``, one per ``request_id``); impressions = slots
      (rows of ``items``); impressions@k = slots with ``position <= k`` (1-based);
    - a click is an event whose ``policy`` role is ``positive`` and whose ``request_id`` has an
      exposure that showed its ``item_id``; duplicates of the same (request_id, item_id) count once.
      A skip is the same for a ``negative`` role. ``context`` events are ignored;
    - the exposure's position is trusted: an attributed event whose own ``position`` is given and
      differs is counted in ``position_mismatch`` (event rows). Should a request show an item twice,
      the slot whose position the event reports is used, else the first one;
    - positive/negative event rows that cannot be attributed are counted (rows, not distinct) in
      ``unattributed`` and, by reason, in ``unattributed_by_reason``: ``no_request_id``,
      ``unknown_request`` (not among ``exposures``), ``item_not_shown``;
    - CTR@k = clicks at positions <= k / impressions@k; ctr = clicks / impressions; CTR by position
      p = clicks at p / impressions at p; skip rate = skips / impressions; request CTR = share of
      requests with >= 1 click; catalogue share = distinct items shown / ``n_catalogue``;
    - a rate whose denominator is 0 is None (never a division error); counts of empty inputs are 0.

    Args:
        exposures: one row per request: ``request_id``, ``user_id``, ``model_version``, ``variant``
            (other columns are ignored; a repeated ``request_id`` keeps its first row).
        items: one row per slot: ``request_id``, ``position`` (1-based), ``item_id``. Slots whose
            request is not in ``exposures`` are left out and counted in ``orphan_impressions``; a
            repeated (request_id, position) counts once.
        events: linked feedback: ``request_id``, ``item_id``, ``event_type``, optional ``value`` (a
            rating's score, for ``rating_negative_below``) and ``position``.
        policy: the event policy (``positive`` = click, ``negative`` = skip).
        by: ``variant`` (the served alias), ``version`` (``model_version``) or ``position``.
        k: the cut-off of ``ctr@k`` (the keys are named with its value: ``ctr@10``).
        n_catalogue: catalogue size for ``catalogue_share`` (None: the share is None).
        fresh_items: the fresh item ids (``recloop.features.fresh_item_ids``) for ``freshness@k`` (None: None).
    Returns:
        ``{"protocol": {**policy.describe(), "k", "by", "n_catalogue", "definitions"},
        "overall": metrics, "groups": {key: metrics}}``. ``metrics`` holds ``requests``, ``users``
        (distinct), ``impressions``, ``impressions@k``, ``clicks``, ``clicks@k``, ``ctr@k``, ``ctr``,
        ``ctr_by_position`` (list, index 0 = position 1, as long as the largest position shown; None
        where nothing was shown), ``skips``, ``skip_rate``, ``request_ctr``, ``items_shown``,
        ``catalogue_share``, ``freshness@k``, ``position_mismatch``, ``model_versions`` and ``variants`` (sorted
        distinct values); ``overall`` adds ``unattributed``, ``unattributed_by_reason`` and
        ``orphan_impressions``. With ``by="position"`` the groups are ``"1"``, ``"2"``, ... (each
        position shown) with ``impressions``, ``clicks``, ``ctr``, ``skips``, ``skip_rate``. Group keys
        are strings ("" for a missing variant/version), in natural order.
    Raises:
        ValueError: an unknown ``by``, ``k < 1``, ``n_catalogue < 1``, or a non-empty frame missing a
            required column.
    """
    if by not in GROUP_BY:
        raise ValueError(f"by={by!r}; expected one of {list(GROUP_BY)}")
    if isinstance(k, bool) or not isinstance(k, int | np.integer) or k < 1:
        raise ValueError(f"k={k!r} must be an integer >= 1")
    if n_catalogue is not None and (isinstance(n_catalogue, bool) or int(n_catalogue) < 1):
        raise ValueError(f"n_catalogue={n_catalogue!r} must be >= 1 or None")
    k = int(k)
    n_catalogue = None if n_catalogue is None else int(n_catalogue)

    ex = _exposures(exposures)
    slots, orphans = _slots(items, ex)
    linked, unattributed = _attribute(_events(events, policy), slots)
    clicks = linked[linked["role"] == "positive"].drop_duplicates(["request_id", "item_id"])
    skips = linked[linked["role"] == "negative"].drop_duplicates(["request_id", "item_id"])
    max_position = int(slots["position"].max()) if len(slots) else 0
    fresh = None if fresh_items is None else frozenset(str(i) for i in fresh_items)

    def metrics(ex_g: pd.DataFrame, slots_g: pd.DataFrame, linked_g: pd.DataFrame, clicks_g: pd.DataFrame,
                skips_g: pd.DataFrame) -> dict[str, Any]:
        return _metrics(ex_g, slots_g, linked_g, clicks_g, skips_g, k, n_catalogue, max_position, fresh)

    overall = metrics(ex, slots, linked, clicks, skips)
    overall.update(unattributed=int(sum(unattributed.values())), unattributed_by_reason=unattributed,
                   orphan_impressions=orphans)
    groups: dict[str, dict[str, Any]] = {}
    column = GROUP_BY[by]
    if column is None:
        for p in sorted(slots["position"].unique()):
            imp = int((slots["position"] == p).sum())
            n_clicks = int((clicks["position"] == p).sum())
            n_skips = int((skips["position"] == p).sum())
            groups[str(int(p))] = {"impressions": imp, "clicks": n_clicks, "ctr": _rate(n_clicks, imp),
                                   "skips": n_skips, "skip_rate": _rate(n_skips, imp)}
    else:
        for key in sorted(ex[column].unique(), key=_natural):
            groups[key] = metrics(ex[ex[column] == key], slots[slots[column] == key], linked[linked[column] == key],
                                  clicks[clicks[column] == key], skips[skips[column] == key])
    protocol = {**policy.describe(), "k": k, "by": by, "n_catalogue": n_catalogue,
                "n_fresh_items": None if fresh is None else len(fresh), "definitions": dict(DEFINITIONS)}
    return {"protocol": protocol, "overall": overall, "groups": groups}


def _metrics(ex: pd.DataFrame, slots: pd.DataFrame, linked: pd.DataFrame, clicks: pd.DataFrame,
             skips: pd.DataFrame, k: int, n_catalogue: int | None, max_position: int,
             fresh: frozenset[str] | None = None) -> dict[str, Any]:
    n_requests = len(ex)
    n_imp = len(slots)
    imp_k = int((slots["position"] <= k).sum())
    clicks_k = int((clicks["position"] <= k).sum())
    imp_by_pos = np.bincount(slots["position"].to_numpy(dtype=np.int64), minlength=max_position + 1)
    clicks_by_pos = np.bincount(clicks["position"].to_numpy(dtype=np.int64), minlength=max_position + 1)
    items_shown = int(slots["item_id"].nunique())
    top = slots["position"] <= k
    fresh_k = None if fresh is None else _rate(int((top & slots["item_id"].isin(fresh)).sum()), imp_k)
    return {
        "requests": n_requests,
        "users": int(ex["user_id"].nunique()),
        "impressions": n_imp,
        f"impressions@{k}": imp_k,
        "clicks": len(clicks),
        f"clicks@{k}": clicks_k,
        f"ctr@{k}": _rate(clicks_k, imp_k),
        "ctr": _rate(len(clicks), n_imp),
        "ctr_by_position": [_rate(int(clicks_by_pos[p]), int(imp_by_pos[p])) for p in range(1, max_position + 1)],
        "skips": len(skips),
        "skip_rate": _rate(len(skips), n_imp),
        "request_ctr": _rate(int(clicks["request_id"].nunique()), n_requests),
        "items_shown": items_shown,
        "catalogue_share": None if n_catalogue is None else items_shown / n_catalogue,
        f"freshness@{k}": fresh_k,
        "position_mismatch": int(linked["mismatch"].sum()),
        "model_versions": sorted(ex["model_version"].unique(), key=_natural),
        "variants": sorted(ex["variant"].unique(), key=_natural),
    }


def _rate(num: int, den: int) -> float | None:
    return num / den if den else None


def _natural(key: str) -> tuple[int, float, str]:
    """Numbers in numeric order first ("2" < "10"), then other strings."""
    return (0, float(key), key) if re.fullmatch(r"\d+(\.\d+)?", key) else (1, 0.0, key)


def frame_with(df: pd.DataFrame | None, required: tuple[str, ...], name: str) -> pd.DataFrame:
    """The frame with at least ``required`` (an empty frame may lack columns; a non-empty one may not)."""
    if df is None or (len(df) == 0 and not set(required) <= set(df.columns)):
        return pd.DataFrame({c: pd.Series(dtype=object) for c in required})
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise ValueError(f"{name} frame lacks columns {missing}; has {list(df.columns)}")
    return df


def _text(s: pd.Series) -> pd.Series:
    """Ids as strings; missing (None/NaN) as ''."""
    return s.astype(object).where(s.notna(), "").map(str)


def _exposures(df: pd.DataFrame | None) -> pd.DataFrame:
    ex = frame_with(df, ("request_id", "user_id"), "exposures")
    out = pd.DataFrame({c: _text(ex[c]) if c in ex.columns else pd.Series("", index=ex.index, dtype=object)
                        for c in _EXPOSURE_COLUMNS})
    return out.drop_duplicates("request_id").reset_index(drop=True)


def _slots(df: pd.DataFrame | None, ex: pd.DataFrame) -> tuple[pd.DataFrame, int]:
    """Slots of known requests with their request's group columns, and how many slots had no request."""
    it = frame_with(df, _ITEM_COLUMNS, "items")
    pos = pd.to_numeric(it["position"], errors="coerce")
    if len(it) and (pos.isna().any() or (pos < 1).any() or (pos != pos.round()).any()):
        raise ValueError("items: position must be an integer >= 1 (1-based slots)")
    slots = pd.DataFrame({"request_id": _text(it["request_id"]), "position": pos.fillna(0).astype(np.int64),
                          "item_id": _text(it["item_id"])})
    slots = slots.drop_duplicates(["request_id", "position"])
    known = slots["request_id"].isin(ex["request_id"])
    slots = slots[known].merge(ex[["request_id", "model_version", "variant"]], on="request_id", how="left")
    return slots.reset_index(drop=True), int((~known).sum())


def _events(df: pd.DataFrame | None, policy: EventPolicy) -> pd.DataFrame:
    """Positive and negative events: request_id, item_id, role, position (NaN when not given)."""
    ev = frame_with(df, _EVENT_COLUMNS, "events")
    roles = policy.roles(ev["event_type"], ev["value"] if "value" in ev.columns else None)
    pos = (pd.to_numeric(ev["position"], errors="coerce") if "position" in ev.columns
           else pd.Series(np.nan, index=ev.index))
    out = pd.DataFrame({"request_id": _text(ev["request_id"]).to_numpy(), "item_id": _text(ev["item_id"]).to_numpy(),
                        "role": roles, "event_position": pos.astype("float64").to_numpy()})
    return out[out["role"].isin(["positive", "negative"])].reset_index(drop=True)


def _attribute(ev: pd.DataFrame, slots: pd.DataFrame) -> tuple[pd.DataFrame, dict[str, int]]:
    """Events joined to their slot (``position``, group columns, ``mismatch``) and the unattributed counts."""
    no_id = ev["request_id"] == ""
    unknown = ~no_id & ~ev["request_id"].isin(slots["request_id"])
    ev = ev.assign(_row=np.arange(len(ev)))
    joined = ev[~no_id & ~unknown].merge(slots, on=["request_id", "item_id"], how="inner")
    joined["_agrees"] = joined["event_position"] == joined["position"]
    joined = (joined.sort_values(["_row", "_agrees", "position"], ascending=[True, False, True], kind="stable")
              .drop_duplicates("_row"))
    not_shown = int((~no_id & ~unknown).sum()) - len(joined)
    joined["mismatch"] = joined["event_position"].notna() & ~joined["_agrees"]
    joined = joined.sort_values("_row", kind="stable").drop(columns=["_row", "_agrees"]).reset_index(drop=True)
    counts = {"no_request_id": int(no_id.sum()), "unknown_request": int(unknown.sum()), "item_not_shown": not_shown}
    return joined, counts


# ---- reading the inputs (I/O; the CLI and flows/monitor.py) -----------------------------------------------------


@dataclass(frozen=True)
class OnlineInputs:
    """What ``online_metrics`` reads: the exposures, their slots, the linked events, the catalogue size and
    the fresh item ids (None when the lake has no events)."""

    exposures: pd.DataFrame
    items: pd.DataFrame
    events: pd.DataFrame
    n_catalogue: int | None
    fresh_items: frozenset[str] | None = None


def parse_since(since: str | datetime | None) -> pd.Timestamp | None:
    """An ISO time (naive = UTC) as a UTC timestamp; None stays None.

    Raises:
        ValueError: not an ISO time.
    """
    if since is None or (isinstance(since, str) and not since.strip()):
        return None
    try:
        ts = pd.Timestamp(since)
    except (ValueError, TypeError) as err:
        raise ValueError(f"since={since!r} is not an ISO time (e.g. 2024-05-01T00:00:00Z)") from err
    if pd.isna(ts):
        raise ValueError(f"since={since!r} is not an ISO time")
    return ts.tz_localize("UTC") if ts.tzinfo is None else ts.tz_convert("UTC")


def read_online_inputs(event_log_uri: str, lake_path: Path | str, since: pd.Timestamp | None = None,
                       freshness_days: float = 30.0) -> OnlineInputs:
    """Read the exposures and slots (``ExposureLog.read``), the linked events (``EventLog.linked``) since
    ``since``, the catalogue size (the lake's items; None for an empty lake) and the fresh items (added in the
    last ``freshness_days`` before the newest event of the lake and the log: ``recloop.features.fresh_item_ids``).

    A click received after ``since`` on an exposure shown before it is ``unattributed``
    (``unknown_request``), as is one on an exposure already pruned.
    """
    from recloop.eventlog import EventLog
    from recloop.exposures import ExposureLog
    from recloop.lake import Lake

    since_dt = None if since is None else since.to_pydatetime()
    exposure_log = ExposureLog(event_log_uri)
    try:
        exposures, items = exposure_log.read(since=since_dt)
    finally:
        exposure_log.close()
    event_log = EventLog(event_log_uri)
    try:
        events = event_log.linked(since=since_dt)
    finally:
        event_log.close()
    lake = Lake(Path(lake_path))
    catalogue = lake.items()
    fresh = _fresh(lake, catalogue, event_log_uri, freshness_days)
    return OnlineInputs(exposures, items, events, len(catalogue) or None, fresh)


def _fresh(lake: Any, catalogue: pd.DataFrame, event_log_uri: str, days: float) -> frozenset[str] | None:
    """Fresh item ids over the lake's events and the event log's newer ones (None when there are none)."""
    from recloop.eventlog import EventLog
    from recloop.features import fresh_item_ids

    frames = [lake.events()]
    log = EventLog(event_log_uri)
    try:
        frames.append(log.since())
    finally:
        log.close()
    parts = [f[["item_id", "timestamp"]] for f in frames if f is not None and len(f)]
    if not parts:
        return None
    return fresh_item_ids(pd.concat(parts, ignore_index=True), catalogue, days)


def online_report(event_log_uri: str, lake_path: Path | str, policy: EventPolicy, *,
                  since: str | datetime | None = None, by: str = "variant", k: int = 10,
                  freshness_days: float = 30.0) -> dict[str, Any]:
    """``online_metrics`` over the event-log database and the lake since ``since`` (ISO; None: all).

    The result's ``protocol`` also states the window: ``since`` (ISO or None) and ``until`` (when it
    was read, ISO UTC). Used by ``recloop online-metrics`` and ``flows/monitor.py``.

    Raises:
        ValueError: a bad ``since``, ``by`` or ``k``.
    """
    since_ts = parse_since(since)
    if by not in GROUP_BY:  # before touching the database
        raise ValueError(f"by={by!r}; expected one of {list(GROUP_BY)}")
    until = datetime.now(UTC)
    inputs = read_online_inputs(event_log_uri, lake_path, since_ts, freshness_days)
    report = online_metrics(inputs.exposures, inputs.items, inputs.events, policy, by=by, k=k,
                            n_catalogue=inputs.n_catalogue, fresh_items=inputs.fresh_items)
    report["protocol"]["freshness_days"] = freshness_days
    report["protocol"].update(since=None if since_ts is None else since_ts.isoformat(), until=until.isoformat())
    return report

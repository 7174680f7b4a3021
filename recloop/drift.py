"""Data drift between the champion's training window and the events that arrived since. Pure.

Four statistics compare a window of new events with a reference (the lake the champion was trained on):

- ``popularity_js``: Jensen–Shannon distance (base 2, in [0, 1]) between the item distributions of the
  window and of the reference (Lin, "Divergence measures based on the Shannon entropy", IEEE Trans. Inf.
  Theory 1991; ``scipy.spatial.distance.jensenshannon`` is the square root of the divergence). Items the
  reference never saw count as their own entries;
- ``activity_js``: the same distance between the share of events coming from users of each activity
  class: new users (absent from the reference) and users with 1, 2–3, 4–7, ... 2^k..2^(k+1)-1 reference
  events (log2 bins, the last one open). More new or lighter users move it;
- ``new_item_share``: the share of the window's events on items the reference never saw;
- ``event_mix_js``: the distance between the event-type mixes.

**Thresholds** come from the statistics' own no-drift distribution (``no_drift_thresholds``): windows of
the same size are drawn from the reference at random start positions (contiguous in time, seeded: a block
bootstrap, so the reference's natural drift counts as no drift), each compared with the rest of the
reference (the reference minus the window), and the ``quantile`` (0.99 by default) of each statistic over
those windows is its threshold. A window past any threshold has drifted. Because the window's size is
the same in both, sampling noise (a small window always looks different) is priced in.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from scipy.spatial.distance import jensenshannon

#: The statistics, in report order.
STATISTICS = ("popularity_js", "activity_js", "new_item_share", "event_mix_js")
#: Activity classes: 0 = new user, then log2 bins of reference events (1, 2-3, 4-7, ...), the last open.
N_ACTIVITY_BINS = 12


@dataclass(frozen=True)
class ReferenceProfile:
    """Codes and counts of a reference event frame, reused by every comparison (``reference_profile``).

    ``item_index``/``user_index``/``type_index`` map ids to codes; ``item_codes``/``user_codes``/
    ``type_codes`` are the events' codes in time order; ``*_counts`` count events per code.
    """

    item_index: pd.Index
    user_index: pd.Index
    type_index: pd.Index
    item_codes: np.ndarray
    user_codes: np.ndarray
    type_codes: np.ndarray
    item_counts: np.ndarray
    user_counts: np.ndarray
    type_counts: np.ndarray

    @property
    def n_events(self) -> int:
        return int(len(self.item_codes))


def reference_profile(events: pd.DataFrame) -> ReferenceProfile:
    """Factorise a reference frame (``user_id``, ``item_id``, ``event_type``, ``timestamp``) once.

    Raises:
        ValueError: a missing column, or no events.
    """
    _require(events, "reference")
    if "timestamp" not in events.columns:
        raise ValueError("the reference frame lacks columns ['timestamp']")
    if events.empty:
        raise ValueError("the reference has no events")
    ordered = events.sort_values("timestamp", kind="stable")
    item_codes, items = pd.factorize(ordered["item_id"].astype(str))
    user_codes, users = pd.factorize(ordered["user_id"].astype(str))
    type_codes, types = pd.factorize(ordered["event_type"].astype(str))
    return ReferenceProfile(
        pd.Index(items), pd.Index(users), pd.Index(types), item_codes, user_codes, type_codes,
        np.bincount(item_codes, minlength=len(items)), np.bincount(user_codes, minlength=len(users)),
        np.bincount(type_codes, minlength=len(types)),
    )


def activity_bin(counts: np.ndarray) -> np.ndarray:
    """Activity class of users with ``counts`` reference events: 0 for none, 1 + floor(log2(count)), capped."""
    counts = np.asarray(counts, dtype=np.int64)
    out = np.zeros(len(counts), dtype=np.int64)
    seen = counts > 0
    out[seen] = np.minimum(1 + np.floor(np.log2(counts[seen])).astype(np.int64), N_ACTIVITY_BINS - 1)
    return out


def _js(p: np.ndarray, q: np.ndarray) -> float:
    """Jensen–Shannon distance in base 2 of two count vectors (0 when both are empty)."""
    if p.sum() <= 0 or q.sum() <= 0:
        return 0.0
    return float(jensenshannon(p, q, base=2))


def _statistics(win_items: np.ndarray, n_new_items: np.ndarray, ref_items: np.ndarray,
                win_activity: np.ndarray, ref_activity: np.ndarray,
                win_types: np.ndarray, ref_types: np.ndarray) -> dict[str, float]:
    """The four statistics from count vectors (window items over reference codes plus new items' counts)."""
    n = win_items.sum() + n_new_items.sum()
    return {
        "popularity_js": _js(np.r_[win_items, n_new_items], np.r_[ref_items, np.zeros(len(n_new_items))]),
        "activity_js": _js(win_activity, ref_activity),
        "new_item_share": float(n_new_items.sum() / n) if n else 0.0,
        "event_mix_js": _js(win_types, ref_types),
    }


def _activity_mass(user_counts_in_ref: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Events per activity class: each event weighs 1 in its user's class."""
    return np.bincount(activity_bin(user_counts_in_ref), weights=weights, minlength=N_ACTIVITY_BINS)


def drift_statistics(profile: ReferenceProfile, window: pd.DataFrame) -> dict[str, float]:
    """The four drift statistics of a window of new events against the reference (module docstring).

    Args:
        profile: ``reference_profile`` of the champion's training events.
        window: the new events (``user_id``, ``item_id``, ``event_type``; ``timestamp`` unused).
    Returns:
        ``{"popularity_js", "activity_js", "new_item_share", "event_mix_js"}``, each in [0, 1].
    Raises:
        ValueError: a missing column, or an empty window.
    """
    _require(window, "window")
    if window.empty:
        raise ValueError("the window has no events")
    item_codes = profile.item_index.get_indexer(window["item_id"].astype(str))
    known = item_codes >= 0
    win_items = np.bincount(item_codes[known], minlength=len(profile.item_index))
    new_items = pd.Series(window["item_id"].astype(str).to_numpy()[~known]).value_counts().to_numpy()
    user_codes = profile.user_index.get_indexer(window["user_id"].astype(str))
    user_ref = np.where(user_codes >= 0, profile.user_counts[np.maximum(user_codes, 0)], 0)
    type_codes = profile.type_index.get_indexer(window["event_type"].astype(str))
    n_types = len(profile.type_index)
    win_types = np.r_[np.bincount(type_codes[type_codes >= 0], minlength=n_types),
                      pd.Series(window["event_type"].astype(str).to_numpy()[type_codes < 0]).value_counts().to_numpy()]
    ref_types = np.r_[profile.type_counts, np.zeros(len(win_types) - n_types)]
    ref_activity = _activity_mass(profile.user_counts, profile.user_counts.astype(float))
    win_activity = _activity_mass(user_ref, np.ones(len(window)))
    return _statistics(win_items, new_items.astype(float), profile.item_counts, win_activity, ref_activity,
                       win_types, ref_types)


def no_drift_distribution(profile: ReferenceProfile, window_size: int, n_windows: int, seed: int) -> pd.DataFrame:
    """Each statistic over ``n_windows`` contiguous windows of the reference against the rest of it.

    A window is ``window_size`` consecutive reference events (time order) from a seeded random start; the
    rest is the reference minus those events (its users' and items' counts reduced by the window's), so an
    item seen only inside the window is new, as it would be for a real window.

    Returns:
        One row per window, one column per statistic (``STATISTICS``).
    Raises:
        ValueError: ``window_size`` < 1 or not below the reference's size, or ``n_windows`` < 1.
    """
    n = profile.n_events
    if window_size < 1 or window_size >= n:
        raise ValueError(f"window_size={window_size} must be in [1, {n - 1}] (the reference has {n} events)")
    if n_windows < 1:
        raise ValueError(f"n_windows={n_windows} must be >= 1")
    rng = np.random.default_rng(seed)
    starts = rng.integers(0, n - window_size + 1, size=n_windows)
    n_items, n_types = len(profile.item_index), len(profile.type_index)
    rows = []
    for start in starts:
        sl = slice(int(start), int(start) + window_size)
        items = np.bincount(profile.item_codes[sl], minlength=n_items)
        rest_items = profile.item_counts - items
        new = rest_items == 0
        users = profile.user_codes[sl]
        win_user_counts = np.bincount(users, minlength=len(profile.user_index))
        rest_users = profile.user_counts - win_user_counts
        types = np.bincount(profile.type_codes[sl], minlength=n_types)
        rows.append(_statistics(
            np.where(new, 0, items), items[new & (items > 0)].astype(float), rest_items,
            _activity_mass(rest_users[users], np.ones(window_size)),
            _activity_mass(rest_users, rest_users.astype(float)), types, profile.type_counts - types,
        ))
    return pd.DataFrame(rows, columns=list(STATISTICS))


def no_drift_thresholds(profile: ReferenceProfile, window_size: int, *, n_windows: int = 200,
                        quantile: float = 0.99, seed: int = 0) -> dict[str, float]:
    """The ``quantile`` of each statistic's no-drift distribution (``no_drift_distribution``).

    Raises:
        ValueError: ``quantile`` outside (0, 1], or as ``no_drift_distribution``.
    """
    if not 0 < quantile <= 1:
        raise ValueError(f"quantile={quantile} must be in (0, 1]")
    dist = no_drift_distribution(profile, window_size, n_windows, seed)
    return {name: float(np.quantile(dist[name].to_numpy(), quantile)) for name in STATISTICS}


def drift_verdict(stats: dict[str, float], thresholds: dict[str, float],
                  overrides: dict[str, float | None] | None = None) -> dict[str, Any]:
    """Which statistics exceed their threshold (an override replaces a derived threshold when not None).

    Returns:
        ``{"drifted": bool, "exceeded": [names], "thresholds": {name: value}}``.
    """
    used = {name: (overrides or {}).get(name) if (overrides or {}).get(name) is not None else thresholds[name]
            for name in STATISTICS}
    exceeded = [name for name in STATISTICS if stats[name] > used[name]]
    return {"drifted": bool(exceeded), "exceeded": exceeded, "thresholds": used}


def _require(frame: pd.DataFrame, what: str) -> None:
    missing = [c for c in ("user_id", "item_id", "event_type") if c not in frame.columns]
    if missing:
        raise ValueError(f"the {what} frame lacks columns {missing}")

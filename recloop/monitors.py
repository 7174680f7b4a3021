"""The monitor flow's checks other than data drift (``recloop.drift``): online CTR, feature freshness and
serving health. Pure: frames, lists and text in, JSON-able dicts out (``flows/monitor.py`` reads the inputs).

- **online CTR** (``ctr_check``): the served version's CTR@k in the monitor's window against the same
  version's first ``baseline_exposures`` exposures after it started serving (its promotion), both from the
  exposure log through ``recloop.online_metrics.online_metrics`` (the same definitions), each with a Wilson
  95% interval (``recloop.experiment_analysis.wilson_interval``). It has **dropped** when the window's upper
  bound lies below the baseline's lower bound (the intervals do not overlap).
- **feature freshness** (``freshness_check``): for the users of the event log's newest events, the user's
  newest positive event (the event policy) must be the last item of the user's online list. A user whose
  newest positive was received more than ``max_lag_s`` ago and whose online list does not end with it (or
  who has no online row) is **behind**: a push or a materialisation that did not land. One behind user
  makes the store stale. ``lag_s`` is the age of the oldest missed write; the report also gives the online
  store's newest row time against the log's newest receive time.
- **serving health** (``parse_serving_metrics``, ``serving_health``): BentoML's Prometheus counters of the
  API routes: the error rate (5xx / requests) and the p99 latency (interpolated in the histogram's buckets,
  as Prometheus' ``histogram_quantile``) over the requests since the previous reading.
"""

from __future__ import annotations

import math
from datetime import datetime
from typing import Any

import pandas as pd

from recloop.experiment_analysis import wilson_interval
from recloop.online_metrics import online_metrics
from recloop.policy import EventPolicy

#: The service's API routes whose requests count for serving health (not /metrics, /health, ...).
API_ROUTES = ("/recommend", "/feedback", "/similar_items")


def ctr_check(exposures: pd.DataFrame, items: pd.DataFrame, events: pd.DataFrame, policy: EventPolicy, *,
              version: str, since: pd.Timestamp | None, baseline_exposures: int = 1000, k: int = 10,
              confidence: float = 0.95) -> dict[str, Any]:
    """The served version's online CTR@k in the window against its first exposures (module docstring).

    Args:
        exposures, items, events: ``ExposureLog.read`` and ``EventLog.linked`` frames (all retained).
        policy: the event policy (positive = click).
        version: the served model version.
        since: start of the window (exposures shown after it); None: every exposure after the baseline.
        baseline_exposures: how many of the version's first exposures make the baseline (>= 1).
        k: the CTR cut-off.
    Returns:
        ``{"version", "baseline": {"exposures", "impressions", "clicks", "ctr", "ci"}, "window": {...},
        "dropped": bool, "status"}``; ``status`` is ``ok``, ``dropped`` or ``insufficient`` (no baseline
        or no window exposures: nothing is concluded).
    Raises:
        ValueError: ``baseline_exposures`` < 1.
    """
    if baseline_exposures < 1:
        raise ValueError(f"baseline_exposures={baseline_exposures} must be >= 1")
    mine = exposures[exposures["model_version"].astype(str) == str(version)].sort_values(["ts", "request_id"])
    baseline = mine.iloc[:baseline_exposures]
    window = mine.iloc[baseline_exposures:]
    if since is not None:
        window = window[window["ts"] > since]
    out: dict[str, Any] = {"version": str(version), "k": k, "baseline_exposures": baseline_exposures,
                           "baseline": _ctr(baseline, items, events, policy, k, confidence),
                           "window": _ctr(window, items, events, policy, k, confidence)}
    b, w = out["baseline"]["ci"], out["window"]["ci"]
    out["dropped"] = bool(b is not None and w is not None and w[1] < b[0])
    out["status"] = "insufficient" if b is None or w is None else "dropped" if out["dropped"] else "ok"
    return out


def _ctr(exp: pd.DataFrame, items: pd.DataFrame, events: pd.DataFrame, policy: EventPolicy, k: int,
         confidence: float) -> dict[str, Any]:
    ids = set(exp["request_id"])
    report = online_metrics(exp, items[items["request_id"].isin(ids)], events[events["request_id"].isin(ids)],
                            policy, by="version", k=k)["overall"]
    clicks, shown = int(report[f"clicks@{k}"]), int(report[f"impressions@{k}"])
    ci = wilson_interval(clicks, shown, confidence)
    return {"exposures": len(exp), "impressions": shown, "clicks": clicks,
            "ctr": clicks / shown if shown else None, "ci": list(ci) if ci else None}


def freshness_check(log_rows: pd.DataFrame, online_lists: dict[str, list[str] | None],
                    online_times: dict[str, datetime | None], policy: EventPolicy, *, now: datetime,
                    max_lag_s: float) -> dict[str, Any]:
    """Whether the online store reflects the event log's newest events (module docstring).

    Args:
        log_rows: the log's newest events: ``user_id``, ``item_id``, ``event_type``, ``value``, ``seq``,
            ``ingested_at`` (tz-aware UTC).
        online_lists: user_id -> the user's online recent-items list (None: no row) for the users of
            ``log_rows``'s positives.
        online_times: user_id -> the online row's event time (None: no row).
        policy: the event policy (only positives enter an online list).
        now: the reference time (tz-aware UTC).
        max_lag_s: a write older than this that has not landed makes the store stale.
    Returns:
        ``{"stale", "users_checked", "users_behind", "behind" (up to 10 user ids), "lag_s",
        "log_newest", "online_newest", "online_behind_s", "max_lag_s"}``.
    """
    roles = policy.roles(log_rows["event_type"], log_rows["value"] if "value" in log_rows.columns else None)
    pos = log_rows[pd.Series(roles, index=log_rows.index) == "positive"].sort_values("seq")
    newest = pos.drop_duplicates("user_id", keep="last")
    received = pd.to_datetime(newest["ingested_at"], utc=True)
    due = newest[received <= pd.Timestamp(now) - pd.Timedelta(seconds=max_lag_s)]
    behind = [(u, t) for u, item, t in zip(due["user_id"], due["item_id"], pd.to_datetime(due["ingested_at"], utc=True),
                                            strict=True)
              if not online_lists.get(u) or str(online_lists[u][-1]) != str(item)]
    times = [t for t in online_times.values() if t is not None]
    log_newest = pd.to_datetime(log_rows["ingested_at"], utc=True).max() if len(log_rows) else None
    online_newest = max(times) if times else None
    lag_s = max(((pd.Timestamp(now) - t).total_seconds() for _, t in behind), default=0.0)
    gap = None
    if log_newest is not None and online_newest is not None:
        gap = max(0.0, (log_newest - pd.Timestamp(online_newest)).total_seconds())
    return {"stale": bool(behind), "users_checked": len(due), "users_behind": len(behind),
            "behind": [u for u, _ in behind[:10]], "lag_s": lag_s, "max_lag_s": max_lag_s,
            "log_newest": None if log_newest is None else log_newest.isoformat(),
            "online_newest": None if online_newest is None else pd.Timestamp(online_newest).isoformat(),
            "online_behind_s": gap}


def parse_serving_metrics(text: str, routes: tuple[str, ...] = API_ROUTES) -> dict[str, Any]:
    """BentoML's request counters of ``routes`` from a Prometheus text exposition (``GET /metrics``).

    Reads the families whose names end in ``request_total`` (by ``http_response_code``) and
    ``request_duration_seconds`` (histogram buckets by ``le``), summed over routes, workers and versions.

    Returns:
        ``{"requests": {code: count}, "buckets": {le (float, inf last): cumulative count}}``.
    Raises:
        ValueError: the text is not a Prometheus exposition.
    """
    from prometheus_client.parser import text_string_to_metric_families

    requests: dict[str, float] = {}
    buckets: dict[float, float] = {}
    try:
        families = list(text_string_to_metric_families(text))
    except (ValueError, TypeError) as err:
        raise ValueError(f"not a Prometheus text exposition: {err}") from err
    for family in families:
        for sample in family.samples:
            if sample.labels.get("endpoint") not in routes:
                continue
            if sample.name.endswith("request_total"):
                code = str(sample.labels.get("http_response_code", ""))
                requests[code] = requests.get(code, 0.0) + sample.value
            elif sample.name.endswith("request_duration_seconds_bucket"):
                le = float(sample.labels["le"])
                buckets[le] = buckets.get(le, 0.0) + sample.value
    return {"requests": requests, "buckets": dict(sorted(buckets.items()))}


def histogram_quantile(q: float, buckets: dict[float, float]) -> float | None:
    """The ``q`` quantile of cumulative histogram ``buckets`` (upper bound -> count), interpolated linearly
    inside the bucket as Prometheus' ``histogram_quantile`` does; None without observations; the largest
    finite bound when it falls in the open bucket."""
    bounds = sorted(buckets)
    if not bounds or buckets[bounds[-1]] <= 0:
        return None
    rank = q * buckets[bounds[-1]]
    lower, below = 0.0, 0.0
    for le in bounds:
        count = buckets[le]
        if count >= rank:
            if math.isinf(le):
                return lower
            width = count - below
            return le if width <= 0 else lower + (le - lower) * (rank - below) / width
        lower, below = le, count
    return lower


def serving_health(current: dict[str, Any], previous: dict[str, Any] | None, *, max_error_rate: float,
                   max_p99_ms: float) -> dict[str, Any]:
    """Error rate and p99 of the requests between two ``parse_serving_metrics`` readings.

    A counter that went down (the service restarted) is read from zero. No previous reading: since start.

    Returns:
        ``{"requests", "errors" (5xx), "client_errors" (4xx), "error_rate", "p99_ms", "unhealthy",
        "exceeded": [...]}``; rates are None without requests.
    """
    def delta(now: dict[Any, float], before: dict[Any, float]) -> dict[Any, float]:
        restarted = any(now.get(key, 0.0) < value for key, value in before.items())
        return dict(now) if restarted else {key: value - before.get(key, 0.0) for key, value in now.items()}

    prev = previous or {"requests": {}, "buckets": {}}
    reqs = delta(current["requests"], prev.get("requests", {}))
    bks = delta({float(k): v for k, v in current["buckets"].items()},
                {float(k): v for k, v in prev.get("buckets", {}).items()})
    total = sum(reqs.values())
    errors = sum(v for code, v in reqs.items() if code.startswith("5"))
    client = sum(v for code, v in reqs.items() if code.startswith("4"))
    p99 = histogram_quantile(0.99, bks)
    out: dict[str, Any] = {"requests": int(total), "errors": int(errors), "client_errors": int(client),
                           "error_rate": errors / total if total else None,
                           "p99_ms": None if p99 is None else 1000.0 * p99,
                           "max_error_rate": max_error_rate, "max_p99_ms": max_p99_ms}
    out["exceeded"] = [name for name, value, limit in (("error_rate", out["error_rate"], max_error_rate),
                                                       ("p99_ms", out["p99_ms"], max_p99_ms))
                       if value is not None and value > limit]
    out["unhealthy"] = bool(out["exceeded"])
    return out

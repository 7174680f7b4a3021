"""The ``monitor`` flow: watch the loop (data drift, online CTR, feature freshness, serving health).

Each run (``settings.monitor_cron``, every 10 minutes by default; ``recloop monitor`` by hand):

1. **drift** (``recloop.drift``): the events of the log the loop has not consumed yet (past its cursor's
   watermark: what arrived since the champion's training window) against the newest
   ``monitor_reference_events`` lake events, with thresholds from the reference's own no-drift
   distribution (the ``monitor_drift_quantile`` over ``monitor_bootstrap_windows`` windows of the same
   size) unless a ``monitor_*_max`` setting fixes one;
2. **ctr** (``recloop.monitors.ctr_check``): the served version's CTR@10 since the previous run against its
   first ``monitor_ctr_baseline_exposures`` exposures, from the exposure log, with Wilson intervals;
3. **freshness** (``recloop.monitors.freshness_check``): the online store against the log's newest events;
4. **health** (``recloop.monitors.serving_health``): 5xx rate and p99 of the service's ``/metrics`` since
   the previous run.

Past a threshold it emits a Prefect event (``EVENTS``): ``recloop.monitor.drift`` and
``recloop.monitor.freshness`` start the loop deployment through its triggers (``loop_triggers``: a cooldown
of ``loop_trigger_cooldown_s`` each; the deployment runs one loop at a time), ``recloop.monitor.ctr`` and
``recloop.monitor.health`` are for notifications. The results go to one MLflow run of
``recloop-monitoring`` tagged with the served version (``monitor.kind=checks``) and to the markdown
artifact ``recloop-monitor``.
"""

from __future__ import annotations

import json
import math
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import prefect  # noqa: F401  (before mlflow: keeps Prefect's console log format)
from prefect import flow, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.events import DeploymentEventTrigger, emit_event

from flows.monitor import MONITORING_EXPERIMENT, _logger
from recloop.cursor import LogCursor, loop_state_path
from recloop.drift import STATISTICS, drift_statistics, drift_verdict, no_drift_thresholds, reference_profile
from recloop.eventlog import EventLog
from recloop.exposures import ExposureLog
from recloop.lake import Lake
from recloop.monitors import ctr_check, freshness_check, parse_serving_metrics, serving_health
from recloop.settings import Settings, get_settings

CHECKS = ("drift", "ctr", "freshness", "health")
#: check -> the Prefect event it emits past its threshold.
EVENTS = {"drift": "recloop.monitor.drift", "freshness": "recloop.monitor.freshness",
          "ctr": "recloop.monitor.ctr", "health": "recloop.monitor.health"}
#: The events that start a loop turn, with the turn's ``trigger`` parameter.
LOOP_TRIGGER_EVENTS = {"drift": EVENTS["drift"], "freshness": EVENTS["freshness"]}
ARTIFACT_KEY = "recloop-monitor"
RESOURCE_PREFIX = "recloop.model."


def monitor_state_path(home: Path) -> Path:
    """The monitor's own state: the previous run's time and serving counters."""
    return home / "state" / "monitor.json"


def _read_state(home: Path) -> dict[str, Any]:
    path = monitor_state_path(home)
    return json.loads(path.read_text()) if path.exists() else {}


def _write_state(home: Path, state: dict[str, Any]) -> None:
    path = monitor_state_path(home)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(state))
    tmp.replace(path)


def loop_triggers(settings: Settings) -> list[DeploymentEventTrigger]:
    """The loop deployment's triggers: one per event of ``LOOP_TRIGGER_EVENTS``, reactive, with a cooldown.

    A reactive trigger with ``within=cooldown`` fires on the first matching event and then ignores the same
    event until the window has passed (Prefect's bucket rule), which is the cooldown. The same triggers are
    written in ``infra/prefect.yaml``.
    """
    cooldown = timedelta(seconds=settings.loop_trigger_cooldown_s)
    return [
        DeploymentEventTrigger(
            name=f"recloop-loop-on-{why}", description=f"run the loop when the monitor reports {why}",
            expect={event}, match={"prefect.resource.id": f"{RESOURCE_PREFIX}*"}, posture="Reactive",
            threshold=1, within=cooldown, parameters={"trigger": why},
        )
        for why, event in LOOP_TRIGGER_EVENTS.items()
    ]


@task(name="drift-check", cache_policy=NO_CACHE)
def drift_task(settings: Settings) -> dict[str, Any]:
    """``recloop.drift`` on the unconsumed log events against the newest lake events (module docstring)."""
    path = loop_state_path(settings.home)
    cursor = LogCursor.from_json(json.loads(path.read_text())) if path.exists() else LogCursor()
    log = EventLog(settings.event_log_uri)
    try:
        high = log.max_seq() or 0
        window = log.since(after_seq=max(cursor.watermark, high - settings.monitor_window_max_events))
    finally:
        log.close()
    ref = Lake(settings.lake_path).events()
    ref = ref.iloc[-settings.monitor_reference_events:]
    protocol = {"window_events": len(window), "reference_events": len(ref), "after_seq": cursor.watermark,
                "quantile": settings.monitor_drift_quantile, "bootstrap_windows": settings.monitor_bootstrap_windows,
                "seed": settings.seed}
    if len(window) < settings.monitor_min_events or len(ref) <= len(window):
        return {"status": "insufficient", "alert": False, "protocol": protocol}
    profile = reference_profile(ref)
    stats = drift_statistics(profile, window)
    derived = no_drift_thresholds(profile, len(window), n_windows=settings.monitor_bootstrap_windows,
                                  quantile=settings.monitor_drift_quantile, seed=settings.seed)
    overrides = {name: getattr(settings, f"monitor_{name}_max") for name in STATISTICS}
    verdict = drift_verdict(stats, derived, overrides)
    return {"status": "drift" if verdict["drifted"] else "ok", "alert": verdict["drifted"], "stats": stats,
            "derived_thresholds": derived, **verdict, "protocol": protocol}


@task(name="ctr-check", cache_policy=NO_CACHE)
def ctr_task(settings: Settings, version: str | None, since: str | None) -> dict[str, Any]:
    """``recloop.monitors.ctr_check`` for the served version over the retained exposures."""
    import pandas as pd

    if version is None:
        return {"status": "insufficient", "alert": False, "reason": "no served version"}
    exposures_log = ExposureLog(settings.event_log_uri)
    try:
        exposures, items = exposures_log.read()
    finally:
        exposures_log.close()
    log = EventLog(settings.event_log_uri)
    try:
        events = log.linked()
    finally:
        log.close()
    out = ctr_check(exposures, items, events, settings.event_policy, version=version,
                    since=None if since is None else pd.Timestamp(since),
                    baseline_exposures=settings.monitor_ctr_baseline_exposures)
    return {**out, "alert": out["dropped"]}


@task(name="freshness-check", cache_policy=NO_CACHE)
def freshness_task(settings: Settings, online: Any = None) -> dict[str, Any]:
    """``recloop.monitors.freshness_check`` over the log's ``monitor_freshness_sample`` newest events.

    Args:
        online: an ``featurestore.online.OnlineFeatures`` (default: one opened on the settings' store).
    """
    from featurestore.online import OnlineFeatures, OnlineStoreUnavailable

    log = EventLog(settings.event_log_uri)
    try:
        high = log.max_seq() or 0
        rows = log.since(after_seq=max(0, high - settings.monitor_freshness_sample), with_seq=True)
    finally:
        log.close()
    if rows.empty:
        return {"status": "insufficient", "alert": False, "reason": "empty event log"}
    own = online is None
    try:
        online = online or OnlineFeatures(settings=settings, freshness_s=math.inf)
    except KeyError as err:  # no feature service yet: the features flow never ran
        return {"status": "insufficient", "alert": False, "reason": str(err)}
    lists: dict[str, list[str] | None] = {}
    times: dict[str, datetime | None] = {}
    try:
        for user in rows["user_id"].drop_duplicates():
            state = online.user(str(user))
            lists[user], times[user] = state.recent_item_ids, state.event_ts
    except OnlineStoreUnavailable as err:
        return {"status": "stale", "alert": True, "stale": True, "reason": f"online store unreachable: {err}"}
    finally:
        if own:
            online.close()
    out = freshness_check(rows, lists, times, settings.event_policy, now=datetime.now(UTC),
                          max_lag_s=settings.monitor_freshness_max_lag_s)
    return {**out, "status": "stale" if out["stale"] else "ok", "alert": out["stale"]}


@task(name="health-check", cache_policy=NO_CACHE)
def health_task(settings: Settings, previous: dict[str, Any] | None) -> dict[str, Any]:
    """``recloop.monitors.serving_health`` from the service's ``/metrics`` since the previous reading."""
    import httpx

    from flows.deploy import service_url

    try:
        resp = httpx.get(f"{service_url(settings)}/metrics", timeout=5.0)
        resp.raise_for_status()
        current = parse_serving_metrics(resp.text)
    except (httpx.HTTPError, ValueError) as err:
        return {"status": "unreachable", "alert": True, "unhealthy": True, "reason": str(err)[:200]}
    out = serving_health(current, previous, max_error_rate=settings.monitor_max_error_rate,
                         max_p99_ms=settings.monitor_max_p99_ms)
    return {**out, "status": "unhealthy" if out["unhealthy"] else "ok", "alert": out["unhealthy"],
            "reading": {"requests": current["requests"], "buckets": {str(k): v for k, v in current["buckets"].items()}}}


def _served_version(settings: Settings) -> str | None:
    from registry.aliases import get_alias_version
    from registry.tracking import configure_tracking

    return get_alias_version(configure_tracking(settings), settings.model_name, settings.model_alias)


def emit_alerts(results: dict[str, dict[str, Any]], settings: Settings, version: str | None) -> list[str]:
    """Emit ``EVENTS[check]`` for every check that raised an alert; returns the event names."""
    resource = {"prefect.resource.id": f"{RESOURCE_PREFIX}{settings.model_name}",
                "prefect.resource.name": settings.model_name, "recloop.model.version": version or ""}
    emitted = []
    for check, result in results.items():
        if result.get("alert"):
            payload = {k: v for k, v in result.items() if k not in ("reading", "protocol")}
            emit_event(event=EVENTS[check], resource=resource, payload=json.loads(json.dumps(payload, default=str)))
            emitted.append(EVENTS[check])
    return emitted


def scalar_results(results: dict[str, dict[str, Any]]) -> dict[str, float]:
    """The finite numbers of the results as MLflow metrics (``drift.popularity_js``, ``ctr.window``, ...)."""
    out: dict[str, float] = {}
    drift = results.get("drift", {})
    for name, value in (drift.get("stats") or {}).items():
        out[f"drift.{name}"] = value
        out[f"drift.{name}.threshold"] = drift["thresholds"][name]
    ctr = results.get("ctr", {})
    for part in ("baseline", "window"):
        if (ctr.get(part) or {}).get("ctr") is not None:
            out[f"ctr.{part}"] = ctr[part]["ctr"]
    fresh = results.get("freshness", {})
    for name in ("lag_s", "users_behind", "users_checked", "online_behind_s"):
        if isinstance(fresh.get(name), int | float):
            out[f"freshness.{name}"] = fresh[name]
    health = results.get("health", {})
    for name in ("requests", "error_rate", "p99_ms"):
        if isinstance(health.get(name), int | float):
            out[f"health.{name}"] = health[name]
    return {k: float(v) for k, v in out.items() if math.isfinite(float(v))}


def log_monitor_run(settings: Settings, results: dict[str, dict[str, Any]], version: str | None,
                    emitted: list[str]) -> str:
    """One MLflow run of ``recloop-monitoring`` tagged with the served version; the results as JSON."""
    from registry import tracking

    client = tracking.configure_tracking(settings)
    experiment_id = tracking.ensure_experiment(client, MONITORING_EXPERIMENT, settings)
    tags = {"monitor.kind": "checks", "model_name": settings.model_name, "model_version": version or "",
            "monitor.alerts": ",".join(emitted),
            **{f"monitor.{check}": str(result.get("status")) for check, result in results.items()}}
    run = client.create_run(experiment_id, tags=tags, run_name="monitor")
    for name, value in scalar_results(results).items():
        client.log_metric(run.info.run_id, name, value)
    client.log_dict(run.info.run_id, json.loads(json.dumps(results, default=str)), "monitor.json")
    client.set_terminated(run.info.run_id)
    return run.info.run_id


def markdown(results: dict[str, dict[str, Any]], version: str | None, emitted: list[str]) -> str:
    """The artifact: one row per check, then the drift statistics against their thresholds."""
    lines = [f"# Monitor (served version {version or '-'})", "", "| check | status |", "|---|---|"]
    lines += [f"| {check} | {result.get('status')} |" for check, result in results.items()]
    drift = results.get("drift", {})
    if drift.get("stats"):
        lines += ["", "| statistic | value | threshold |", "|---|---:|---:|"]
        lines += [f"| {n} | {drift['stats'][n]:.4f} | {drift['thresholds'][n]:.4f} |" for n in STATISTICS]
    lines += ["", f"events emitted: {', '.join(emitted) or 'none'}"]
    return "\n".join(lines) + "\n"


@flow(name="monitor")
def monitor_flow(checks: list[str] | None = None, log_to_mlflow: bool = True) -> dict[str, Any]:
    """Run the monitors, emit an event for each alert, log the results (module docstring).

    Args:
        checks: a subset of ``CHECKS`` (default all).
        log_to_mlflow: write the ``recloop-monitoring`` run (off in tests without a registry).
    Returns:
        ``{"version", "checks": {check: result}, "emitted": [event names], "run_id"}``.
    Raises:
        ValueError: an unknown check.
    """
    chosen = list(checks or CHECKS)
    unknown = [c for c in chosen if c not in CHECKS]
    if unknown:
        raise ValueError(f"checks={unknown}; expected a subset of {list(CHECKS)}")
    logger = _logger()
    settings = get_settings()
    now = datetime.now(UTC)
    state = _read_state(settings.home)
    version = _served_version(settings) if ("ctr" in chosen or log_to_mlflow) else None
    results: dict[str, dict[str, Any]] = {}
    if "drift" in chosen:
        results["drift"] = drift_task(settings)
    if "ctr" in chosen:
        results["ctr"] = ctr_task(settings, version, state.get("last_run"))
    if "freshness" in chosen:
        results["freshness"] = freshness_task(settings)
    if "health" in chosen:
        results["health"] = health_task(settings, state.get("serving_metrics"))
    emitted = emit_alerts(results, settings, version)
    run_id = log_monitor_run(settings, results, version, emitted) if log_to_mlflow else None
    create_markdown_artifact(key=ARTIFACT_KEY, markdown=markdown(results, version, emitted),
                             description=f"monitor of version {version or '-'}")
    reading = results.get("health", {}).get("reading")
    _write_state(settings.home, {"last_run": now.isoformat(),
                                 "serving_metrics": reading or state.get("serving_metrics")})
    logger.info("monitor version=%s %s emitted=%s", version,
                " ".join(f"{c}={r.get('status')}" for c, r in results.items()), emitted)
    return {"version": version, "checks": results, "emitted": emitted, "run_id": run_id}

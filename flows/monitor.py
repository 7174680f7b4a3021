"""The ``online-metrics`` flow: online metrics of what was served, logged for monitoring, then retention.

Reads the exposure log and the feedback events linked to it (``recloop.online_metrics``), and
1. logs the metrics on MLflow runs of the experiment ``recloop-monitoring``: one run for the whole window
   (``monitor.group=overall``) and, with ``by="variant"``/``"version"``, one run per group, each tagged
   with the model version(s) and variant(s) it covers (``model_version``, ``variant``; comma separated
   when the alias moved during the window). Model versions keep tags only, never metrics;
2. applies retention: exposures older than ``settings.exposure_retention_days`` are pruned
   (``ExposureLog.prune``; after the metrics were read);
3. writes the report, with what was pruned, as a Prefect markdown artifact (key ``online-metrics``).

Served on ``MONITOR_CRON`` (hourly) next to the loop by ``python -m flows.loop serve`` (``recloop up``)
and declared in ``infra/prefect.yaml``.
"""

from __future__ import annotations

import logging
import math
from datetime import UTC, datetime, timedelta
from typing import Any

import prefect  # noqa: F401  (before mlflow: keeps Prefect's console log format)
from mlflow.tracking import MlflowClient
from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact
from prefect.exceptions import MissingContextError

from flows.train import mlflow_key
from recloop.exposures import ExposureLog
from recloop.online_metrics import online_report
from recloop.settings import Settings, get_settings
from registry import tracking

MONITORING_EXPERIMENT = "recloop-monitoring"
MONITOR_CRON = "0 * * * *"
ARTIFACT_KEY = "online-metrics"
#: The scalar metrics of a group, in the order the report shows them (``@k`` gets the run's k).
SCALARS = ("requests", "users", "impressions", "impressions@k", "clicks", "clicks@k", "ctr@k", "ctr", "skips",
           "skip_rate", "request_ctr", "items_shown", "catalogue_share", "freshness@k", "position_mismatch")


def compute_online_metrics(settings: Settings, since: str | None = None, by: str = "variant",
                           k: int = 10) -> dict[str, Any]:
    """``recloop.online_metrics.online_report`` over the configured event-log database, lake and policy."""
    return online_report(settings.event_log_uri, settings.lake_path, settings.event_policy, since=since, by=by, k=k,
                         freshness_days=settings.freshness_days)


def scalar_metrics(metrics: dict[str, Any], k: int) -> dict[str, float]:
    """The finite numbers of one group as MLflow metric keys (``ctr@10`` -> ``ctr_at_10``, ``ctr.pos1``...)."""
    out: dict[str, float] = {}
    for name in SCALARS:
        key = name.replace("@k", f"@{k}")
        value = metrics.get(key)
        if isinstance(value, int | float) and math.isfinite(value):
            out[mlflow_key(key)] = float(value)
    for p, value in enumerate(metrics.get("ctr_by_position", []), start=1):
        if value is not None:
            out[f"ctr.pos{p}"] = float(value)
    for reason, n in metrics.get("unattributed_by_reason", {}).items():
        out[f"unattributed.{reason}"] = float(n)
    if "unattributed" in metrics:
        out["unattributed"] = float(metrics["unattributed"])
    return out


def markdown_report(report: dict[str, Any], pruned: dict[str, int] | None = None) -> str:
    """The report as markdown: one row per group (or per position) plus the overall row."""
    p, k = report["protocol"], report["protocol"]["k"]
    lines = [f"# Online metrics by {p['by']}", "",
             f"window: {p.get('since') or 'all'} .. {p.get('until', 'now')}; k={k}; clicks = {p['positive']}, "
             f"skips = {p['negative']}" + (f" (ratings below {p['rating_negative_below']} are skips)"
                                           if p["rating_negative_below"] is not None else ""), ""]
    if p["by"] == "position":
        cols = ("impressions", "clicks", "ctr", "skips", "skip_rate")
        rows = [(f"position {key}", g) for key, g in report["groups"].items()]
    else:
        cols = ("requests", "users", "impressions", f"ctr@{k}", "ctr", "request_ctr", "skip_rate",
                "catalogue_share", f"freshness@{k}", "model_versions")
        rows = [(f"{p['by']} {key or '(none)'}", g) for key, g in report["groups"].items()]
    rows.append(("**overall**", report["overall"]))
    lines += ["| group | " + " | ".join(cols) + " |", "|---|" + "---:|" * len(cols)]
    lines += [f"| {name} | " + " | ".join(_cell(g.get(c)) for c in cols) + " |" for name, g in rows]
    overall = report["overall"]
    lines += ["", f"unattributed events: {overall['unattributed']} {overall['unattributed_by_reason']}; "
              f"position mismatches: {overall['position_mismatch']}; slots without exposure: "
              f"{overall['orphan_impressions']}"]
    if pruned is not None:
        lines.append(f"retention: pruned {pruned.get('exposures', 0)} exposures and {pruned.get('items', 0)} slots "
                     f"older than {pruned.get('older_than', '?')}")
    return "\n".join(lines) + "\n"


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4f}"
    if isinstance(value, list):
        return ",".join(map(str, value)) or "-"
    return f"{value:,}" if isinstance(value, int) else str(value)


def log_monitoring_runs(client: MlflowClient, settings: Settings, report: dict[str, Any]) -> list[str]:
    """One MLflow run for the window and one per variant/version group; returns their run ids."""
    experiment_id = tracking.ensure_experiment(client, MONITORING_EXPERIMENT, settings)
    p, k = report["protocol"], report["protocol"]["k"]
    common = {"monitor.by": p["by"], "monitor.k": str(k), "monitor.since": p.get("since") or "all",
              "monitor.until": p.get("until", ""), "model_name": settings.model_name}
    groups = [("overall", report["overall"])]
    if p["by"] != "position":
        groups += list(report["groups"].items())
    run_ids = []
    for key, metrics in groups:
        tags = {**common, "monitor.group": key if key == "overall" else f"{p['by']}={key}",
                "model_version": ",".join(metrics["model_versions"]),
                "variant": ",".join(metrics["variants"])}
        run = client.create_run(experiment_id, tags=tags, run_name=f"online-{p['by']}-{key or 'none'}")
        values = scalar_metrics(metrics, k)
        if p["by"] == "position" and key == "overall":  # the groups are the positions: ctr.pos<p> already
            values.update({f"impressions.pos{pos}": float(g["impressions"]) for pos, g in report["groups"].items()})
        for name, value in values.items():
            client.log_metric(run.info.run_id, name, value)
        client.set_terminated(run.info.run_id)
        run_ids.append(run.info.run_id)
    return run_ids


def prune_exposures(settings: Settings, now: datetime) -> dict[str, Any]:
    """Delete exposures older than ``now - settings.exposure_retention_days``; what went and the cut-off."""
    cutoff = now - timedelta(days=settings.exposure_retention_days)
    log = ExposureLog(settings.event_log_uri)
    try:
        pruned = log.prune(cutoff)
    finally:
        log.close()
    return {**pruned, "older_than": cutoff.isoformat()}


def _logger() -> logging.Logger | logging.LoggerAdapter:
    try:
        return get_run_logger()
    except MissingContextError:  # called as online_metrics_flow.fn(...)
        return logging.getLogger("recloop.flows.monitor")


@flow(name="online-metrics")
def online_metrics_flow(since: str | None = None, by: str = "variant", k: int = 10) -> dict[str, Any]:
    """Online metrics of the exposure log since ``since``, logged for monitoring; then exposure retention.

    Args:
        since: ISO time (naive = UTC); only exposures shown, and events received, after it. None: all
            (the retained exposures).
        by: ``variant``, ``version`` or ``position`` (``recloop.online_metrics.online_metrics``).
        k: the cut-off of ``ctr@k``.
    Returns:
        ``{"metrics": report, "runs": [MLflow run ids], "pruned": {"exposures", "items", "older_than"},
        "report_md": str}``.
    Raises:
        ValueError: a bad ``since``, ``by`` or ``k``.
    """
    logger = _logger()
    settings = get_settings()
    report = compute_online_metrics(settings, since, by, k)
    client = tracking.configure_tracking(settings)
    run_ids = log_monitoring_runs(client, settings, report)
    pruned = prune_exposures(settings, datetime.now(UTC))
    report_md = markdown_report(report, pruned)
    create_markdown_artifact(key=ARTIFACT_KEY, markdown=report_md,
                             description=f"online metrics by {by} since {since or 'the start'}")
    overall = report["overall"]
    logger.info("online metrics by=%s requests=%d clicks=%d ctr@%d=%s unattributed=%d; pruned %d exposures",
                by, overall["requests"], overall["clicks"], k, overall[f"ctr@{k}"], overall["unattributed"],
                pruned["exposures"])
    return {"metrics": report, "runs": run_ids, "pruned": pruned, "report_md": report_md}

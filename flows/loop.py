"""The continuous-optimisation loop: new feedback → validate → lake → features → warm retrain → gate → redeploy.

Each run takes only the event-log rows past the loop's watermark (the log's insertion sequence
``seq``, kept in ``home/state/loop.json``), optionally a new source batch as well, and advances the
watermark only after every stage succeeded — a failed run is simply retried from the same place.

Serve the deployments locally (``recloop up`` does this): ``python -m flows.loop serve``. The loop
deployment runs on ``settings.loop_cron`` and can be started by hand in the Prefect UI.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, serve, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from flows.experiment import experiment_report_flow
from flows.forget import honour_receipts, unhonoured_receipts
from flows.ingest import accepted_frames, ingest_flow, lake_ingest_task, validate_frame_task
from flows.loop_incremental import run_incremental_stages
from flows.monitor import MONITOR_CRON, online_metrics_flow
from flows.pipeline import pipeline_flow, run_training_stages, summary_markdown
from recloop.cursor import LogCursor, loop_state_path, read_new
from recloop.eventlog import EventLog
from recloop.forget import holds_loop_lock
from recloop.quarantine import DataValidationError
from recloop.settings import get_settings

FEEDBACK_SOURCE = "feedback"
#: Training budget of a warm-started retrain (overridable per run through ``train_params``).
WARM_TRAIN_PARAMS: dict[str, Any] = {"epochs": 10, "patience": 3}


def state_path(home: Path) -> Path:
    """Where the loop keeps its watermark."""
    return loop_state_path(home)


def read_watermark(home: Path) -> int:
    """The last event-log ``seq`` the loop has consumed (0 when it never ran)."""
    path = state_path(home)
    return int(json.loads(path.read_text())["event_log_seq"]) if path.exists() else 0


def read_cursor(home: Path) -> LogCursor:
    """The loop's event-log cursor: the watermark and the open gaps below it (``recloop.cursor``)."""
    path = state_path(home)
    return LogCursor.from_json(json.loads(path.read_text())) if path.exists() else LogCursor()


def write_cursor(home: Path, cursor: LogCursor) -> None:
    """Atomically record the cursor (``read_watermark`` reads its watermark)."""
    path = state_path(home)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(cursor.to_json()))
    tmp.replace(path)


#: Why a loop turn ran (its ``trigger`` parameter and the run's ``trigger:<why>`` tag).
TRIGGERS = ("schedule", "drift", "freshness", "manual")


def tag_run_with_trigger(trigger: str) -> None:
    """Add ``trigger:<trigger>`` to the current flow run's tags (nothing outside a tracked run)."""
    from prefect.client.orchestration import get_client
    from prefect.runtime import flow_run

    run_id = flow_run.get_id()
    if not run_id:
        return
    tags = sorted({*flow_run.get_tags(), f"trigger:{trigger}"})
    with get_client(sync_client=True) as client:
        client.update_flow_run(run_id, tags=tags)


@task(name="read-feedback", retries=2, retry_delay_seconds=[2, 10], cache_policy=NO_CACHE)
def read_feedback(cursor: LogCursor) -> tuple[Any, LogCursor, list[int]]:
    """The log's events the cursor has not consumed, as a contract frame, the cursor after them, and the
    seqs among them that filled a gap below the watermark (late commits).

    Rows past the watermark and rows that filled an open gap (a late PostgreSQL commit) are both read, each
    exactly once (``recloop.cursor``; gaps stay open ``settings.loop_gap_grace_s``).
    """
    import pandas as pd

    settings = get_settings()
    log = EventLog(settings.event_log_uri)
    try:
        frame, nxt = read_new(log, cursor, pd.Timestamp.now(tz="UTC"), settings.loop_gap_grace_s)
    finally:
        log.close()
    late = [int(s) for s in frame["seq"] if s <= cursor.watermark]
    return frame.drop(columns=[c for c in ("seq", "ingested_at") if c in frame.columns]), nxt, late


def ingest_feedback(events: Any, batch_id: str) -> dict[str, Any]:
    """Validate a feedback batch read from the log and append the accepted rows to the lake.

    Rows the API accepted are valid by construction; rows written around the API (or written by an
    older version) that break the contract are quarantined with their reason, never stop the loop.
    A feedback batch stops only on a structural failure while some rows were still readable.

    Returns:
        The lake's ingest report as a dict plus ``rows_ok`` (rows that passed the gate, including rows
        a failed earlier turn already put in the lake: they are retrained on, not skipped),
        ``rows_quarantined`` and ``bad_share``.
    Raises:
        DataValidationError: a structural failure of the batch (schema), not a bad row.
    """
    outcome = validate_frame_task(events, FEEDBACK_SOURCE, batch_id)
    counts = {"rows_ok": outcome.rows_ok, "rows_quarantined": outcome.rows_quarantined,
              "bad_share": outcome.bad_share,
              "results_path": str(outcome.results_path) if outcome.results_path else None}
    if outcome.rows_ok == 0 and outcome.rows_quarantined + outcome.rows_deduplicated == outcome.rows_in:
        return {"new_events": 0, **counts}
    if outcome.stopped:
        raise DataValidationError(outcome.failing, detail=f"see {outcome.results_path}")
    report = lake_ingest_task(accepted_frames(outcome, FEEDBACK_SOURCE))
    return {**report.model_dump(mode="json"), **counts}


def incremental_turn(settings: Any, source: str | None, receipts: Any, new_events: int) -> bool:
    """Whether a turn runs the incremental stages (``flows.loop_incremental``): ``settings.loop_incremental``, new
    feedback, no new source batch (it may rewrite history), no forget receipt (a forget retrains cold on the
    whole lake without the user) and a served champion to warm-start from."""
    from flows.pipeline import champion_version

    return bool(settings.loop_incremental and new_events and not source and not receipts
                and champion_version() is not None)


@flow(name="loop")
@holds_loop_lock  # a forget (recloop/forget.py) waits for the turn to end, and a turn for a forget
def loop_flow(source: str | None = None, path: str | None = None, train_params: dict[str, Any] | None = None,
              deploy: bool = True, start_service: bool = True, min_new_events: int = 1,
              trigger: str = "schedule") -> dict[str, Any]:
    """One turn of the continuous loop.

    Args:
        source / path: an optional new source batch to ingest as well (e.g. a new export file).
        train_params: ``TrainConfig`` overrides for the warm-started retrain (default ``WARM_TRAIN_PARAMS``).
        deploy / start_service: as in ``pipeline_flow``.
        min_new_events: skip retraining when fewer new events arrived (nothing is consumed then).
        trigger: why the turn runs (``TRIGGERS``: the cron schedule, a monitor's drift or freshness event
            through the deployment's automation, or by hand); recorded as the run's ``trigger:<why>`` tag.
    Returns:
        ``{"status", "trigger", "new_events", "watermark_from", "watermark_to", "mode", ...stage results}``;
        ``mode`` is "incremental" (``incremental_turn``: ``flows.loop_incremental``) or "full" (the whole lake).
    Raises:
        DataValidationError: the feedback batch was stopped by the gate (the watermark stays).
        ValueError: an unknown ``trigger``.
    """
    if trigger not in TRIGGERS:
        raise ValueError(f"trigger={trigger!r}; expected one of {list(TRIGGERS)}")
    logger = get_run_logger()
    settings = get_settings()
    tag_run_with_trigger(trigger)
    cursor = read_cursor(settings.home)
    after = cursor.watermark
    events, nxt, late = read_feedback(cursor)
    high = nxt.watermark
    stages: dict[str, Any] = {"trigger": trigger, "watermark_from": after, "new_events": len(events)}
    receipts = unhonoured_receipts(settings)  # forgotten users: this turn retrains cold without them
    if source:
        stages["ingest_source"] = ingest_flow(source, path)
    if len(events) < min_new_events and not source and not receipts:
        logger.info("no new feedback after seq=%d; nothing to do", after)
        return {**stages, "status": "skipped", "watermark_to": after}
    if len(events):
        batch_id = f"feedback-{after + 1}-{high}" + (f"-late{min(late)}" if late else "")
        ingested = ingest_feedback(events, batch_id)
        stages["ingest"] = ingested
        if ingested["rows_ok"] == 0 and not source:
            # Every row the log held was quarantined (or already in the lake): nothing to learn, but the
            # rows are recorded with their reasons, so the watermark moves on and the loop never wedges.
            write_cursor(settings.home, nxt)
            logger.warning("feedback batch fully quarantined n=%d; watermark=%d->%d", len(events), after, high)
            return {**stages, "status": "quarantined", "watermark_to": high}
    batch = next((st["batch_id"] for st in (stages.get("ingest"), stages.get("ingest_source"))
                  if st and st.get("batch_id")), None)
    # Warm-started from the champion, a short budget is enough to absorb the new events.
    warm_params = {**WARM_TRAIN_PARAMS, **(train_params or {})}
    if incremental_turn(settings, source, receipts, len(events)):  # cost follows the new events (loop_incremental)
        stages["mode"] = "incremental"
        turn = batch or f"feedback-{after + 1}-{high}"
        touched = sorted({str(u) for u in events["user_id"]})
        stages.update(run_incremental_stages(warm_params, touched, turn, deploy, start_service))
    else:
        stages["mode"] = "full"
        stages.update(run_training_stages(warm_params, None, not receipts, batch, deploy, start_service))
    if receipts:
        stages["forget"] = honour_receipts(settings, stages["train"]["run_id"], receipts)
    write_cursor(settings.home, nxt)
    stages.update(status="done", watermark_to=high)
    logger.info("loop done new_events=%d watermark=%d->%d", len(events), after, high)
    create_markdown_artifact(key="recloop-loop", markdown=summary_markdown("recloop continuous loop", stages),
                             description=f"feedback seq {after + 1}..{high}")
    return stages


def loop_deployment(settings: Any) -> Any:
    """The loop deployment: ``settings.loop_cron``, plus the monitor's drift/freshness events (``flows.watch``
    ``loop_triggers``, each with a cooldown), at most one run at a time (a new one is cancelled while one runs).
    """
    from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy

    from flows.watch import loop_triggers

    return loop_flow.to_deployment(
        name="recloop-loop", cron=settings.loop_cron, tags=["recloop", "loop"],
        description="continuous optimisation on new feedback", triggers=loop_triggers(settings),
        concurrency_limit=ConcurrencyLimitConfig(limit=1, collision_strategy=ConcurrencyLimitStrategy.CANCEL_NEW),
    )


def serve_deployments() -> None:
    """Serve the pipeline and the hyper-parameter search (by hand), the scheduled and event-triggered loop, the
    monitor, online metrics and the online-experiment report (blocks): ``infra/prefect.yaml``'s deployments."""
    from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy

    from flows.tune import tune_flow
    from flows.watch import monitor_flow

    settings = get_settings()
    serve(
        pipeline_flow.to_deployment(name="recloop-pipeline", tags=["recloop", "pipeline"],
                                    description="ingest → validate → features → train → gate → deploy"),
        tune_flow.to_deployment(name="recloop-tune", tags=["recloop", "tune"],
                                parameters={"source": "lake", "trials": 20},
                                description="Optuna search → the tune.best run the next cold train applies",
                                concurrency_limit=ConcurrencyLimitConfig(
                                    limit=1, collision_strategy=ConcurrencyLimitStrategy.ENQUEUE)),
        loop_deployment(settings),
        monitor_flow.to_deployment(name="recloop-monitor", cron=settings.monitor_cron, tags=["recloop", "monitor"],
                                   description="drift, online CTR, feature freshness, serving health → events"),
        online_metrics_flow.to_deployment(name="recloop-online-metrics", cron=MONITOR_CRON,
                                          tags=["recloop", "monitor"],
                                          description="online metrics of the exposure log → MLflow; retention"),
        experiment_report_flow.to_deployment(name="recloop-online-experiment", cron=MONITOR_CRON,
                                             tags=["recloop", "experiment"],
                                             description="report on the running (else latest) online experiment"),
        pause_on_shutdown=False,
    )


if __name__ == "__main__":
    if sys.argv[1:] == ["serve"]:
        serve_deployments()
    else:
        loop_flow()

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
from flows.ingest import accepted_frames, ingest_flow, lake_ingest_task, validate_frame_task
from flows.monitor import MONITOR_CRON, online_metrics_flow
from flows.pipeline import pipeline_flow, run_training_stages, summary_markdown
from recloop.eventlog import EventLog
from recloop.quarantine import DataValidationError
from recloop.settings import get_settings

FEEDBACK_SOURCE = "feedback"
#: Training budget of a warm-started retrain (overridable per run through ``train_params``).
WARM_TRAIN_PARAMS: dict[str, Any] = {"epochs": 10, "patience": 3}


def state_path(home: Path) -> Path:
    """Where the loop keeps its watermark."""
    return home / "state" / "loop.json"


def read_watermark(home: Path) -> int:
    """The last event-log ``seq`` the loop has consumed (0 when it never ran)."""
    path = state_path(home)
    return int(json.loads(path.read_text())["event_log_seq"]) if path.exists() else 0


def write_watermark(home: Path, seq: int) -> None:
    """Atomically record ``seq`` as consumed."""
    path = state_path(home)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"event_log_seq": int(seq)}))
    tmp.replace(path)


#: A gap in the log's sequence younger than this may be a transaction still committing (PostgreSQL hands
#: out ``seq`` at insert time, so seq 11 can commit before seq 10): the loop stops reading before it and
#: takes it next turn. An older gap is a rolled-back insert and is passed over.
SEQ_GAP_GRACE_S = 30.0


def committed_prefix(frame: Any, after_seq: int, now: Any, grace_s: float = SEQ_GAP_GRACE_S) -> Any:
    """The rows of ``frame`` (log rows with ``seq`` and ``ingested_at``, any order) the loop may consume.

    Reads in ``seq`` order from ``after_seq`` and stops before the first gap whose next row was received
    less than ``grace_s`` before ``now``, so a late-committing insert is never skipped. Pure.

    Returns:
        The prefix, sorted by ``seq``.
    """
    import pandas as pd

    rows = frame[frame["seq"] > after_seq].sort_values("seq", kind="stable").reset_index(drop=True)
    if rows.empty:
        return rows
    seqs = rows["seq"].to_numpy()
    expected = after_seq + 1
    received = pd.to_datetime(rows["ingested_at"], utc=True, errors="coerce")
    for i, seq in enumerate(seqs):
        if seq != expected:
            recent = pd.isna(received.iloc[i]) or received.iloc[i] > now - pd.Timedelta(seconds=grace_s)
            if recent:
                return rows.iloc[:i]
        expected = int(seq) + 1
    return rows


@task(name="read-new-feedback", retries=2, retry_delay_seconds=[2, 10], cache_policy=NO_CACHE)
def read_new_feedback(after_seq: int) -> tuple[Any, int]:
    """Events of the log with ``seq > after_seq`` up to the first possibly uncommitted gap
    (``committed_prefix``), as a contract frame, and the highest seq among them."""
    import pandas as pd

    log = EventLog(get_settings().event_log_uri)
    try:
        frame = committed_prefix(log.since(after_seq=after_seq, with_seq=True), after_seq, pd.Timestamp.now(tz="UTC"))
    finally:
        log.close()
    high = int(frame["seq"].max()) if len(frame) else after_seq
    return frame.drop(columns=[c for c in ("seq", "ingested_at") if c in frame.columns]), high


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


@flow(name="loop")
def loop_flow(source: str | None = None, path: str | None = None, train_params: dict[str, Any] | None = None,
              deploy: bool = True, start_service: bool = True, min_new_events: int = 1) -> dict[str, Any]:
    """One turn of the continuous loop.

    Args:
        source / path: an optional new source batch to ingest as well (e.g. a new export file).
        train_params: ``TrainConfig`` overrides for the warm-started retrain (default ``WARM_TRAIN_PARAMS``).
        deploy / start_service: as in ``pipeline_flow``.
        min_new_events: skip retraining when fewer new events arrived (nothing is consumed then).
    Returns:
        ``{"status", "new_events", "watermark_from", "watermark_to", ...stage results}``.
    Raises:
        DataValidationError: the feedback batch was stopped by the gate (the watermark stays).
    """
    logger = get_run_logger()
    settings = get_settings()
    after = read_watermark(settings.home)
    events, high = read_new_feedback(after)
    stages: dict[str, Any] = {"watermark_from": after, "new_events": len(events)}
    if source:
        stages["ingest_source"] = ingest_flow(source, path)
    if len(events) < min_new_events and not source:
        logger.info("no new feedback after seq=%d; nothing to do", after)
        return {**stages, "status": "skipped", "watermark_to": after}
    if len(events):
        ingested = ingest_feedback(events, f"feedback-{after + 1}-{high}")
        stages["ingest"] = ingested
        if ingested["rows_ok"] == 0 and not source:
            # Every row the log held was quarantined (or already in the lake): nothing to learn, but the
            # rows are recorded with their reasons, so the watermark moves on and the loop never wedges.
            write_watermark(settings.home, high)
            logger.warning("feedback batch fully quarantined n=%d; watermark=%d->%d", len(events), after, high)
            return {**stages, "status": "quarantined", "watermark_to": high}
    batch = next((st["batch_id"] for st in (stages.get("ingest"), stages.get("ingest_source"))
                  if st and st.get("batch_id")), None)
    # Warm-started from the champion, a short budget is enough to absorb the new events.
    warm_params = {**WARM_TRAIN_PARAMS, **(train_params or {})}
    stages.update(run_training_stages(warm_params, None, True, batch, deploy, start_service))
    write_watermark(settings.home, high)
    stages.update(status="done", watermark_to=high)
    logger.info("loop done new_events=%d watermark=%d->%d", len(events), after, high)
    create_markdown_artifact(key="recloop-loop", markdown=summary_markdown("recloop continuous loop", stages),
                             description=f"feedback seq {after + 1}..{high}")
    return stages


def serve_deployments() -> None:
    """Serve the pipeline (by hand), the scheduled loop, online metrics and the online-experiment report (blocks)."""
    settings = get_settings()
    serve(
        pipeline_flow.to_deployment(name="recloop-pipeline", tags=["recloop", "pipeline"],
                                    description="ingest → validate → features → train → gate → deploy"),
        loop_flow.to_deployment(name="recloop-loop", cron=settings.loop_cron, tags=["recloop", "loop"],
                                description="continuous optimisation on new feedback"),
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

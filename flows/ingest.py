"""Ingest stage: read a source, pass it through the validation gate, append the accepted rows to the lake.

Bad rows never reach the lake: the gate quarantines them (with their reason) under
``home/quarantine/<batch>/`` or stops the run; only accepted rows are written, as one lake batch.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pandas as pd
from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from flows.validate import (
    GateConfig,
    ValidationOutcome,
    read_and_validate,
    validate_batch,
    validate_flow,
    write_outcome,
)
from recloop.forget import drop_forgotten, tombstone_filter
from recloop.lake import IngestReport, Lake
from recloop.quarantine import DataValidationError
from recloop.settings import get_settings
from recloop.sources import SourceFrames
from recloop.sources.base import empty_items, empty_users


def accepted_frames(outcome: ValidationOutcome, source: str) -> SourceFrames:
    """The accepted (coerced) frames of a passed validation outcome, ready for ``Lake.ingest``.

    Raises:
        DataValidationError: the outcome stopped the batch.
    """
    if outcome.stopped or outcome.events is None:
        raise DataValidationError(outcome.failing or ["no accepted events"], detail=f"batch {outcome.batch_id}")
    items = outcome.items if outcome.items is not None and len(outcome.items) else None
    users = outcome.users if outcome.users is not None and len(outcome.users) else None
    from recloop.contract import coerce_items, coerce_users

    return SourceFrames(
        events=outcome.events,
        items=items if items is not None else coerce_items(empty_items()),
        users=users if users is not None else coerce_users(empty_users()),
        meta={"source": source, "validation_batch": outcome.batch_id},
    )


@task(name="lake-ingest", retries=2, retry_delay_seconds=[2, 10], cache_policy=NO_CACHE)
def lake_ingest_task(frames: SourceFrames, batch_id: str | None = None) -> IngestReport:
    """Append accepted frames to the lake as one batch (idempotent on event_id)."""
    return Lake(get_settings().lake_path).ingest(frames, batch_id=batch_id)


def ingest_summary(report: IngestReport, outcome: ValidationOutcome) -> dict[str, Any]:
    """The lake's report plus the gate's counts, as one JSON-ready dict."""
    return {
        **report.model_dump(mode="json"),
        "rows_quarantined": outcome.rows_quarantined,
        "rows_forgotten": outcome.rows_forgotten,
        "bad_share": outcome.bad_share,
        "data_docs_path": outcome.data_docs_path,
    }


def validated_ingest(source: str, path: str | None, batch_id: str | None = None, **options: Any) -> dict[str, Any]:
    """``ingest_flow`` without Prefect (the CLI's ``recloop ingest``): gate, quarantine, then the lake.

    Raises:
        DataValidationError: the gate stopped the batch (nothing is written to the lake).
    """
    settings = get_settings()
    outcome = read_and_validate(source, path, datetime.now(UTC), batch_id, **options)
    outcome = write_outcome(outcome, settings.home)
    report = Lake(settings.lake_path).ingest(accepted_frames(outcome, source), batch_id=batch_id)
    return ingest_summary(report, outcome)


@flow(name="ingest")
def ingest_flow(source: str = "synthetic", path: str | None = None, batch_id: str | None = None) -> dict[str, Any]:
    """Read ``source`` (at ``path``), validate it with the GX gate, append the accepted rows to the lake.

    Returns:
        The lake's ``IngestReport`` as a dict plus the validation counts (``rows_quarantined``,
        ``bad_share``, ``data_docs_path``).
    Raises:
        DataValidationError: the gate stopped the batch (nothing is written to the lake).
    """
    logger = get_run_logger()
    outcome = validate_flow(source, path, batch_id=batch_id)
    report = lake_ingest_task(accepted_frames(outcome, source), batch_id=batch_id)
    logger.info("ingested source=%s new_events=%d quarantined=%d watermark=%s", source, report.new_events,
                outcome.rows_quarantined, report.watermark)
    return ingest_summary(report, outcome)


@task(name="validate-feedback", cache_policy=NO_CACHE)
def validate_frame_task(events: pd.DataFrame, source: str, batch_id: str) -> ValidationOutcome:
    """Validate an in-memory batch (e.g. events from the feedback log) against the lake's catalogue."""
    settings = get_settings()
    lake = Lake(settings.lake_path)
    items = lake.items()
    # The API already accepted these events, and feedback may name items the catalogue does not know yet
    # (they are used after the next retrain). So a feedback batch never stops on its bad-row share or on
    # unknown items: bad rows are quarantined (kept, with their reason) and the rest continue. Structural
    # failures (schema, types, empty batch) still stop.
    # The bot guard does not stop feedback either: one busy user in an hour of feedback (a demo, a load test,
    # a power user) must not wedge the loop; such traffic belongs to monitoring, not to the gate.
    config = GateConfig.from_settings(settings, None).model_copy(
        update={"max_bad_row_share": 1.0, "unknown_item_max_share": 1.0, "bot_max_user_share": 1.0}
    )
    events, n_forgotten = drop_forgotten(events, tombstone_filter(settings))  # forgotten users: dropped, counted
    outcome = validate_batch(events, items if len(items) else None, None, source=source,
                             as_of=datetime.now(UTC), config=config, batch_id=batch_id)
    if n_forgotten:
        outcome = outcome.model_copy(update={"rows_forgotten": n_forgotten})
    return write_outcome(outcome, settings.home)

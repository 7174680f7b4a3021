"""Features stage flow: lake -> Parquet feature sources -> Feast registry -> online store.

A loop turn runs ``incremental_features_flow``: only the new lake batches (``featurestore.incremental``).

The work is ``featurestore.materialize.refresh_features`` (one process: tables, apply, incremental
materialisation behind a watermark); this module is the Prefect flow and its task.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pandas as pd
from prefect import flow, get_run_logger, task

from featurestore.incremental import full_state, update_features, write_state
from featurestore.materialize import load_text_encoder, refresh_features
from recloop.settings import get_settings


@task(retries=2, retry_delay_seconds=[2, 10])
def refresh_features_task(events_uri: str | None, items_uri: str | None, overlap_s: float) -> dict[str, Any]:
    """Read the lake (or the given Parquet files) and run ``refresh_features`` on the configured store."""
    from featurestore.online import open_feature_store
    from recloop.lake import Lake

    logger = get_run_logger()
    settings = get_settings()
    now = datetime.now(UTC)
    lake = Lake(settings.lake_path)
    batch_ids = [b["batch_id"] for b in lake.batches()]  # what an incremental turn continues from
    events = pd.read_parquet(events_uri) if events_uri else lake.events()  # ordered by (timestamp, seq)
    items = pd.read_parquet(items_uri) if items_uri else lake.items()
    items = items if len(items) else None
    future = int((events["timestamp"] > pd.Timestamp(now)).sum())
    if future:
        logger.warning("events stamped in the future kept offline only n=%d", future)
    cache = settings.home / "features" / "embedding_cache.parquet"
    encoder = load_text_encoder(cache_path=cache) if items is not None else None
    store = open_feature_store(settings)
    summary = refresh_features(store, settings, events, items, encoder, now, overlap_s=overlap_s)
    if not events_uri and [b["batch_id"] for b in lake.batches()] == batch_ids:  # no ingest raced the read
        past = events.loc[events["timestamp"] <= pd.Timestamp(now), "timestamp"]
        as_of = past.max().to_pydatetime() if len(past) else now  # as refresh_features' item snapshots
        write_state(settings.home / "features", *full_state(events, batch_ids, as_of, settings.event_policy))
    logger.info("features materialised start=%s end=%s", summary["start"], summary["end"])
    return summary


@task(retries=2, retry_delay_seconds=[2, 10])
def update_features_task() -> dict[str, Any] | None:
    """The incremental features stage of a loop turn (``featurestore.incremental.update_features``: the new lake
    batches only); None when it does not apply and the full ``refresh_features_task`` must run."""
    from featurestore.online import open_feature_store
    from recloop.lake import Lake

    settings = get_settings()
    summary = update_features(open_feature_store(settings), Lake(settings.lake_path), settings.home / "features",
                              datetime.now(UTC), n=settings.max_seq_len, policy=settings.event_policy)
    if summary is None:
        get_run_logger().info("incremental features do not apply; rebuilding in full")
    else:
        get_run_logger().info("features updated incrementally new_events=%d touched_users=%d rows=%s",
                              summary["new_events"], summary["touched_users"], summary["rows"])
    return summary


@flow(name="features")
def features_flow(
    events_uri: str | None = None, items_uri: str | None = None, overlap_s: float = 3600.0
) -> dict[str, Any]:
    """Lake -> feature sources -> Feast apply -> incremental materialisation. Returns the summary.

    Args:
        events_uri, items_uri: Parquet overrides of the lake's events/items (default: ``Lake``).
        overlap_s: how far before the watermark each window starts (late events).
    """
    return refresh_features_task(events_uri, items_uri, overlap_s)


@flow(name="features-incremental")
def incremental_features_flow(overlap_s: float = 3600.0) -> dict[str, Any]:
    """A loop turn's features stage: the new lake batches only (``update_features_task``), else the full
    ``refresh_features_task`` (no state yet, a late event, a rewritten lake). Returns the summary (``mode``)."""
    summary = update_features_task()
    return summary if summary is not None else {"mode": "full", **refresh_features_task(None, None, overlap_s)}

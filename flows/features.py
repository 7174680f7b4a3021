"""Features stage flow: lake -> Parquet feature sources -> Feast registry -> online store.

The work is ``featurestore.materialize.refresh_features`` (one process: tables, apply, incremental
materialisation behind a watermark); this module is the Prefect flow and its task.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pandas as pd
from prefect import flow, get_run_logger, task

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
    logger.info("features materialised start=%s end=%s", summary["start"], summary["end"])
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

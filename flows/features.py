"""Features stage flow: lake -> Parquet feature sources -> Feast registry -> online store.

A loop turn runs ``incremental_features_flow``: only the new lake batches (``featurestore.incremental``).

Each user's recent-items list holds ``materialised_history_len`` items: ``settings.max_seq_len`` or more when the
served or the newest tuned model reads a longer history, so the online store holds what the model needs.

The work is ``featurestore.materialize.refresh_features`` (one process: tables, apply, incremental
materialisation behind a watermark); this module is the Prefect flow and its task.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pandas as pd
from prefect import flow, get_run_logger, task

from featurestore.incremental import full_state, update_features, write_state
from featurestore.materialize import load_text_encoder, refresh_features
from recloop.settings import Settings, get_settings, online_history_len

logger = logging.getLogger(__name__)

#: The training run's param holding the model's ``max_seq_len`` (``flows.train`` logs ``model.<field>``).
MAX_SEQ_LEN_PARAM = "model.max_seq_len"


def materialised_history_len(settings: Settings, client: Any = None) -> int:
    """Items of each user's recent history the features stage writes (``user_recent_items``).

    ``recloop.settings.online_history_len`` over ``settings.max_seq_len``, the served model (the version of
    ``settings.serve_model_version``, else of the alias ``settings.model_alias``: the ``model.max_seq_len``
    param of its training run) and the newest tuned run of ``settings.model_class``
    (``flows.train.latest_tuned``: the length the next cold ``train`` uses). The champion covers what serves
    now and warm retrains (they keep its architecture); the tuned run covers a cold train that follows a
    ``recloop tune`` before that model is promoted. Serving itself pushes what its models read
    (``serving.runtime.served_history_len``), so a model from elsewhere (another class, explicit parameters)
    gets its longer lists on feedback and at the next materialisation after it serves.

    Args:
        settings: the process settings (tracking URI, model name, alias and class).
        client: an ``MlflowClient``; default ``registry.tracking.configure_tracking(settings)``.
    Returns:
        The history length in items, >= ``settings.max_seq_len``; just that when the local SQLite tracking
        store does not exist yet (no tuned or registered model can exist) or MLflow cannot be read (logged).
    """
    from mlflow.exceptions import MlflowException

    uri = settings.mlflow_uri
    if client is None and uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).exists():
        return settings.max_seq_len
    lengths: list[int | None] = []
    try:
        from flows.train import latest_tuned
        from registry.aliases import get_alias_version
        from registry.tracking import configure_tracking

        client = client or configure_tracking(settings)
        version = settings.serve_model_version or get_alias_version(client, settings.model_name,
                                                                    settings.model_alias)
        if version is not None:
            run_id = client.get_model_version(settings.model_name, str(version)).run_id
            param = client.get_run(run_id).data.params.get(MAX_SEQ_LEN_PARAM) if run_id else None
            lengths.append(int(param) if param else None)
        tuned = latest_tuned(client, settings.model_class)
        if tuned is not None:
            lengths.append(tuned["model"].get("max_seq_len"))
    except (MlflowException, OSError, ValueError) as err:
        logger.warning("served/tuned max_seq_len not read; materialising settings.max_seq_len=%d error=%s",
                       settings.max_seq_len, err)
    return online_history_len(settings.max_seq_len, lengths)


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
    history_len = materialised_history_len(settings)
    summary = refresh_features(store, settings, events, items, encoder, now, overlap_s=overlap_s,
                               history_len=history_len)
    if not events_uri and [b["batch_id"] for b in lake.batches()] == batch_ids:  # no ingest raced the read
        past = events.loc[events["timestamp"] <= pd.Timestamp(now), "timestamp"]
        as_of = past.max().to_pydatetime() if len(past) else now  # as refresh_features' item snapshots
        write_state(settings.home / "features", *full_state(events, batch_ids, as_of, settings.event_policy,
                                                            history_len=history_len))
    logger.info("features materialised start=%s end=%s history_len=%d", summary["start"], summary["end"],
                history_len)
    return summary


@task(retries=2, retry_delay_seconds=[2, 10])
def update_features_task() -> dict[str, Any] | None:
    """The incremental features stage of a loop turn (``featurestore.incremental.update_features``: the new lake
    batches only); None when it does not apply and the full ``refresh_features_task`` must run."""
    from featurestore.online import open_feature_store
    from recloop.lake import Lake

    settings = get_settings()
    summary = update_features(open_feature_store(settings), Lake(settings.lake_path), settings.home / "features",
                              datetime.now(UTC), n=materialised_history_len(settings), policy=settings.event_policy)
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

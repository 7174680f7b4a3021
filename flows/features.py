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

from featurestore.incremental import full_state, read_state, update_features, write_state
from featurestore.materialize import load_text_encoder, read_watermark, refresh_features
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

        def version_len(version: Any) -> int | None:  # the ``model.max_seq_len`` param of the version's run
            run_id = client.get_model_version(settings.model_name, str(version)).run_id
            param = client.get_run(run_id).data.params.get(MAX_SEQ_LEN_PARAM) if run_id else None
            return int(param) if param else None

        version = settings.serve_model_version or get_alias_version(client, settings.model_name,
                                                                    settings.model_alias)
        if version is not None:
            lengths.append(version_len(version))
        tuned = latest_tuned(client, settings.model_class)
        if tuned is not None:
            lengths.append(tuned["model"].get("max_seq_len"))
        # serving pushes what a running experiment's arms read: never write less
        lengths.extend(version_len(arm) for arm in _experiment_arm_versions(settings))
    except (MlflowException, OSError, ValueError) as err:
        logger.warning("served/tuned max_seq_len not read; materialising settings.max_seq_len=%d error=%s",
                       settings.max_seq_len, err)
    return online_history_len(settings.max_seq_len, lengths)


def _experiment_arm_versions(settings: Settings) -> list[str]:
    """Registry versions of the running online experiment's arms (the shared experiment store), or []."""
    from sqlalchemy.exc import SQLAlchemyError

    from recloop.experiments import ExperimentStore

    try:
        with ExperimentStore(settings.event_log_uri) as store:
            exp = store.active()
    except (SQLAlchemyError, OSError) as err:
        logger.warning("running experiment not read for the history length: %s", err)
        return []
    return [] if exp is None else [str(exp.champion_version), str(exp.challenger_version)]


def recorded_history_len(settings: Settings) -> int | None:
    """The recent-items length the last features build recorded (``featurestore.incremental`` state): None when
    nothing was materialised yet; ``settings.max_seq_len`` for a state written before lengths were recorded
    (what every build wrote then)."""
    features_dir = settings.home / "features"
    loaded = read_state(features_dir)
    if loaded is not None:
        return int(loaded[0].get("history_len", settings.max_seq_len))
    return settings.max_seq_len if read_watermark(features_dir) is not None else None


def resync_online_history(settings: Settings, history_len: int) -> dict[str, Any]:
    """Rewrite every user's online recent-items list at ``history_len`` from the lake snapshot plus the event-log
    tail (``serving.recommender.resync_online``: concurrent feedback is re-read, never overwritten by an older
    list). What ``recloop online resync`` runs, and what the features stage runs when the length grew: a
    materialisation writes only the rows of its time window, so users without new events would keep shorter lists.

    Raises:
        KeyError: the feature service is not applied yet.
        featurestore.online.OnlineStoreUnavailable: a push failed (rows already pushed stay).
    """
    from featurestore.online import OnlineFeatures
    from recloop.eventlog import EventLog
    from serving.recommender import resync_online
    from serving.runtime import load_catalogue

    catalogue = load_catalogue(settings.lake_path, history_len, settings.event_policy)
    online = OnlineFeatures(settings=settings)
    events = EventLog(settings.event_log_uri)
    try:
        return resync_online(online, events, catalogue.base_history, history_len)
    finally:
        online.close()
        events.close()


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
    recorded = recorded_history_len(settings)
    # never shorter than what was written: a model-length read that failed must not shrink the lists
    history_len = max(materialised_history_len(settings), recorded or 0)
    summary = refresh_features(store, settings, events, items, encoder, now, overlap_s=overlap_s,
                               history_len=history_len)
    if recorded is not None and history_len > recorded:  # inactive users' online lists must grow too
        # before the state records the new length: a failed re-sync is retried (task retry, next run)
        report = resync_online_history(settings, history_len)
        summary["resync"] = report
        logger.info("history length grew from %d to %d: %d users' online lists rewritten", recorded, history_len,
                    report["users"])
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

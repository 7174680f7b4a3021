"""The incremental loop turn: features, retrain and evaluation whose cost follows the new events, not the lake.

``flows/loop.py`` runs it for a warm turn on feedback (a champion to start from, no new source batch, no
forget receipt: a cold retrain after a forget uses the whole lake without the user, ``run_training_stages``):

1. features: ``flows.features.incremental_features_flow`` (the new lake batches only; the full refresh when it
   does not apply);
2. training set: the users the new events touched plus ``settings.loop_replay_users`` others drawn uniformly
   (``recloop.loop_sample.replay_sample``, seeded by ``settings.seed`` and the turn), their whole histories read
   from the lake by user (``Lake.events_of_users``), written as one Parquet file under
   ``home/features/_loop_training/`` (``train_flow(source="parquet")`` records it, so ``evaluate_flow`` re-reads
   and fingerprints exactly these events; forgetting a user covers the folder, and a turn removes the file
   when it ends);
3. a warm-started retrain from the served alias on that set;
4. evaluation of candidate, champion and baselines on ``settings.loop_eval_users`` of its users (a seeded
   fixed-size sample, ``flows.evaluate.sample_split``), then the gate and deploy as in the pipeline.

The run also carries the lake's incremental fingerprint (``Lake.fingerprint``, tag ``data.lake_sha256``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from recloop.settings import get_settings

TRAINING_DIR = "_loop_training"


def training_dir(home: Path) -> Path:
    """Where an incremental turn writes its training set (under ``home/features``: forgetting covers it)."""
    return Path(home) / "features" / TRAINING_DIR


@task(retries=2, retry_delay_seconds=[2, 10], cache_policy=NO_CACHE)
def build_training_set(touched: list[str], turn: str) -> dict[str, Any]:
    """Write the turn's training set (touched users + the replay sample, whole histories) and return its summary.

    Returns:
        ``{"path", "touched_users", "replay_users", "events", "lake_users", "lake_sha256"}``.
    """
    from recloop.lake import Lake
    from recloop.loop_sample import replay_sample

    settings = get_settings()
    lake = Lake(settings.lake_path)
    lake_users = lake.user_ids()
    touched_known = sorted(set(touched) & set(lake_users.tolist()))
    replay = replay_sample(lake_users, touched_known, settings.loop_replay_users, settings.seed, turn)
    events = lake.events_of_users([*touched_known, *replay])
    folder = training_dir(settings.home)
    for old in folder.glob("train-*.parquet"):  # a crashed turn's set (nothing else reads it)
        old.unlink(missing_ok=True)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"train-{turn}.parquet"
    events.to_parquet(path, index=False)
    summary = {"path": str(path), "touched_users": len(touched_known), "replay_users": len(replay),
               "events": len(events), "lake_users": len(lake_users), "lake_sha256": lake.fingerprint()}
    get_run_logger().info("incremental training set touched_users=%d replay_users=%d events=%d lake_users=%d",
                          len(touched_known), len(replay), len(events), len(lake_users))
    return summary


def run_incremental_stages(train_params: dict[str, Any], touched: list[str], turn: str, deploy: bool,
                           start_service: bool) -> dict[str, Any]:
    """features (incremental) → training set → warm retrain → sampled evaluation/gate → deploy.

    Args:
        train_params: ``TrainConfig`` overrides of the warm retrain.
        touched: user ids of the turn's new events.
        turn: the turn's label (its lake batch id): seeds the samples and names the training set.
        deploy / start_service: as ``flows.pipeline.run_training_stages``.
    Returns:
        ``{"features", "training_set", "train", "evaluate", "deploy"}``.
    """
    from flows.deploy import deploy_flow
    from flows.evaluate import evaluate_flow
    from flows.features import incremental_features_flow
    from flows.pipeline import champion_version
    from flows.train import train_flow
    from registry import tracking

    settings = get_settings()
    stages: dict[str, Any] = {"features": incremental_features_flow()}
    stages["training_set"] = training = build_training_set(touched, turn)
    try:
        stages["train"] = train_flow(source="parquet", path=training["path"], train_params=train_params,
                                     warm_start_from="@" + settings.model_alias, data_version=turn)
        tracking.configure_tracking(settings).set_tag(stages["train"]["run_id"], "data.lake_sha256",
                                                      training["lake_sha256"])
        stages["evaluate"] = evaluate_flow(stages["train"]["run_id"], eval_users=settings.loop_eval_users,
                                           eval_turn=turn)
    finally:
        Path(training["path"]).unlink(missing_ok=True)  # user rows outside the lake live only for the turn
    if deploy and champion_version() is not None:
        stages["deploy"] = deploy_flow(start_if_down=start_service)
    else:
        stages["deploy"] = None
        get_run_logger().info("deploy skipped deploy=%s", deploy)
    return stages

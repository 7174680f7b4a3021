"""The ``tune`` flow: hyper-parameter search with Optuna on the validation split; the next cold ``train`` uses the best.

- Sampler: TPE (Bergstra et al., NeurIPS 2011), seeded; pruner: median (a trial whose validation NDCG@10
  after an epoch is below the median of earlier trials at that epoch stops; Google Vizier's rule).
- Search space (``suggest_params``), from the literature: width 32-128 and 1-3 blocks, 1-4 heads, dropout
  0-0.5 (SASRec, Kang & McAuley 2018: d=50, 2 blocks, dropout 0.2-0.5; SASRec+ / RecBole's grids), lr
  3e-4-1e-2 log-uniform, max length 50-200, AdamW weight decay 0 / 0.01 / 0.1 (matrices only; nanoGPT's 0.1),
  batch 32-128, and, when the catalogue trains with the sampled softmax, 256-4096 negatives (Klenitskiy &
  Vasilev 2023; gSASRec, Petrov & Macdonald 2023). Training knobs the caller fixes (``train_params``) are not
  searched.
- The first trial of a new study is the defaults (``default_point``, enqueued): the search starts from the
  configuration it has to beat, as Optuna's ``enqueue_trial`` is meant for.
- The study lives in a database, so a rerun continues it and several workers can share it: SQLite under
  the home locally, the event log's PostgreSQL in prod (``study_storage``). ``--trials N`` means N evaluated
  (complete or pruned) trials in total, over every worker (``MaxTrialsCallback``; a worker finishes the trial it
  is running, so two workers may end at N + 1).
- MLflow: one parent run per call in experiment ``recloop-tune``, each trial a nested run (params, per-epoch
  ``val.ndcg_at_10``, state); then one run tagged ``tune.best=true`` holding the best parameters
  (``tune.params``), which ``flows.train.latest_tuned`` hands to the next cold ``train`` (warm starts keep the
  champion's architecture). The best parameters are trained once more and evaluated on the test split
  once (``test.ndcg_at_10``).
"""

from __future__ import annotations

import json
import logging
import math
import os
import statistics
import time
import warnings
from collections.abc import Callable
from typing import Any

import optuna
import prefect  # noqa: F401  (import before mlflow: keeps Prefect's console log format)
from mlflow.tracking import MlflowClient
from prefect import flow

from flows.train import TUNE_EXPERIMENT, TUNED_TAG, data_fingerprint, flat_params, load_events, prepare_split
from models.factory import build_config, config_fields, model_class
from models.losses import choose_loss
from models.metrics import evaluate
from models.sequences import Split
from models.trainer import TrainConfig, train_model, val_keys
from models.vocab import ItemVocabulary
from recloop.settings import Settings, get_settings
from registry import tracking

logger = logging.getLogger(__name__)

#: The categorical choices of the search space (``suggest_params``).
D_MODEL = (32, 64, 128)
N_HEADS = (1, 2, 4)
MAX_SEQ_LEN = (50, 100, 200)
N_NEGATIVES = (256, 1024, 4096)
WEIGHT_DECAY = (0.0, 0.01, 0.1)
BATCH_SIZE = (32, 64, 128)
#: The numeric ranges of the search space (``suggest_params``; ``default_point`` checks the defaults against them).
N_LAYERS = (1, 3)
DROPOUT = (0.0, 0.5)
LR = (3e-4, 1e-2)
#: User attribute of the enqueued defaults trial: the caller's fixed training knobs it ran with (the defaults'
#: first seed is taken from it only when they are the current call's).
DEFAULTS_ATTR = "recloop.defaults_fixed"
#: Trial states that count towards ``--trials``: evaluated (complete, or pruned on its validation curve). A failed
#: trial (its process died) does not count; the heartbeat re-runs it once.
FINISHED_STATES = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)


def study_storage(settings: Settings) -> str:
    """Where the study lives: the event log's database when it is PostgreSQL (prod), else
    ``sqlite:///<home>/optuna.db``."""
    uri = settings.event_log_uri
    if uri.startswith("postgresql"):
        return uri
    settings.home.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{settings.home / 'optuna.db'}"


def process_sampler(seed: int, n_existing: int, joining: bool = False
                    ) -> tuple[optuna.samplers.TPESampler, int]:
    """This process's TPE sampler: seeded ``seed`` in the process that created the study (reproducible with one
    worker); a process that joins an existing study (a rerun, another worker) adds the trials the study holds and,
    so that two workers joining at the same moment differ too, its process id.

    With the same seed in every process, each would repeat the first process's random start-up points (TPE samples
    its first 10 trials at random) and train the same configurations again.

    Returns ``(sampler, its seed)``; the seed is recorded on the study's parent run (``tune.sampler_seed``).
    """
    used = seed + n_existing + (os.getpid() if joining else 0)
    return optuna.samplers.TPESampler(seed=used), used


def suggest_params(trial: optuna.Trial, model: str, sampled: bool, fixed: frozenset[str] = frozenset()
                   ) -> tuple[dict[str, Any], dict[str, Any]]:
    """One point of the search space: ``(model_params, train_params)`` (only fields ``model`` takes; no training
    knob named in ``fixed``, the ones the caller set)."""
    fields = set(config_fields(model))
    space: dict[str, Any] = {
        "d_model": lambda: trial.suggest_categorical("d_model", D_MODEL),
        "n_layers": lambda: trial.suggest_int("n_layers", *N_LAYERS),
        "n_heads": lambda: trial.suggest_categorical("n_heads", N_HEADS),
        "dropout": lambda: trial.suggest_float("dropout", *DROPOUT, step=0.1),
        "max_seq_len": lambda: trial.suggest_categorical("max_seq_len", MAX_SEQ_LEN),
    }
    model_params = {name: suggest() for name, suggest in space.items() if name in fields}
    train_space: dict[str, Any] = {
        "lr": lambda: trial.suggest_float("lr", *LR, log=True),
        "weight_decay": lambda: trial.suggest_categorical("weight_decay", WEIGHT_DECAY),
        "batch_size": lambda: trial.suggest_categorical("batch_size", BATCH_SIZE),
    }
    if sampled:
        train_space["n_negatives"] = lambda: trial.suggest_categorical("n_negatives", N_NEGATIVES)
    train_params = {name: suggest() for name, suggest in train_space.items() if name not in fixed}
    return model_params, train_params


def default_point(model: str, base_model: dict[str, Any], fixed: dict[str, Any], sampled: bool) -> dict[str, Any]:
    """The untuned defaults as a point of the search space (Optuna parameter names -> values): the model config's
    defaults (with ``base_model``, e.g. ``settings.max_seq_len``) and ``TrainConfig``'s with the model's
    ``train_defaults`` and the caller's ``fixed`` values; knobs the caller fixed, or whose default lies outside
    the space, are left out (Optuna samples those)."""
    import dataclasses

    cfg_cls = model_class(model).config_class
    model_defaults = {f.name: f.default for f in dataclasses.fields(cfg_cls)
                      if f.default is not dataclasses.MISSING}
    train_defaults = {**TrainConfig().model_dump(), **model_class(model).train_defaults, **fixed}
    choices: dict[str, tuple[Any, ...]] = {"d_model": D_MODEL, "n_heads": N_HEADS, "max_seq_len": MAX_SEQ_LEN,
                                          "weight_decay": WEIGHT_DECAY, "batch_size": BATCH_SIZE,
                                          "n_negatives": N_NEGATIVES}
    ranges: dict[str, tuple[float, float]] = {"n_layers": N_LAYERS, "dropout": DROPOUT, "lr": LR}
    fields = set(config_fields(model))
    point: dict[str, Any] = {}
    for name in ("d_model", "n_layers", "n_heads", "dropout", "max_seq_len"):
        if name in fields:
            point[name] = {**model_defaults, **base_model}.get(name)
    for name in ("lr", "weight_decay", "batch_size") + (("n_negatives",) if sampled else ()):
        if name not in fixed:
            point[name] = train_defaults.get(name)
    inside = lambda name, value: (value is not None  # noqa: E731
                                  and (name not in choices or value in choices[name])
                                  and (name not in ranges or ranges[name][0] <= value <= ranges[name][1]))
    return {name: value for name, value in point.items() if inside(name, value)}


def _fit(split: Split, vocab: ItemVocabulary, model: str, model_params: dict[str, Any], train_params: dict[str, Any],
         on_epoch: Callable[[dict[str, Any]], None] | None = None) -> Any:
    config = build_config(model, n_items=len(vocab), **model_params)
    return train_model(split, vocab, config, TrainConfig(**train_params), progress=False, on_epoch=on_epoch)


def run_study(source: str, path: str | None, trials: int, *, model: str | None = None,
              train_params: dict[str, Any] | None = None, defaults_seeds: int = 0, study_name: str | None = None,
              settings: Settings | None = None) -> dict[str, Any]:
    """Run (or continue) the study until it has ``trials`` finished trials; record the best (see module doc).

    Args:
        source / path: the data (``flows.train.load_events``).
        trials: finished trials the study should have in total (>= 1).
        model: a ``models.factory`` name (default ``settings.model_class``).
        train_params: fixed ``TrainConfig`` values for every trial (e.g. ``max_train_seconds``, ``epochs``).
        defaults_seeds: also train the untuned defaults with this many seeds and report their validation
            NDCG@10 mean and standard deviation (the bar the best trial must clear).
        study_name: default ``recloop-<model>-<data sha256[:12]>`` (same data: the same study).
    Returns:
        ``{"study", "storage", "trials", "best": {"value", "params", "trial"}, "test": {...}, "defaults": {...},
        "best_run_id", "parent_run_id", "protocol"}``.
    Raises:
        ValueError: trials < 1, an unknown model, or a source without events.
    """
    if trials < 1:
        raise ValueError(f"trials={trials}; expected >= 1")
    settings = settings or get_settings()
    model = model or settings.model_class
    cls = model_class(model)
    client = tracking.configure_tracking(settings)
    experiment_id = tracking.ensure_experiment(client, TUNE_EXPERIMENT, settings)
    events, _, _ = load_events(source, path)
    vocab, split = prepare_split(events)
    sha = data_fingerprint(events, source, path)["data.sha256"]
    sampled = choose_loss((train_params or {}).get("loss", "auto"), len(vocab)) == "sampled"
    fixed = {"seed": settings.seed, **cls.train_defaults, **(train_params or {})}
    base_model = {"max_seq_len": settings.max_seq_len}
    ndcg_key = val_keys(10)[0]
    name = study_name or f"recloop-{model}-{sha[:12]}"
    storage = study_storage(settings)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    # Heartbeats: a trial whose process died (killed run) is marked failed on the next call and re-run once.
    with warnings.catch_warnings():  # heartbeats are marked experimental in Optuna 5
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        rdb = optuna.storages.RDBStorage(storage, heartbeat_interval=60, grace_period=180,
                                         heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(
                                             max_retry=1))
    pruner = optuna.pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=3)
    defaults_point = default_point(model, base_model, train_params or {}, sampled)
    defaults_key = json.dumps({k: v for k, v in sorted((train_params or {}).items())}, default=str)
    try:  # exactly one process creates the study: it alone enqueues the defaults and samples from ``seed``
        study = optuna.create_study(study_name=name, storage=rdb, direction="maximize", pruner=pruner)
        study.sampler, seed_used = process_sampler(settings.seed, 0)
        study.enqueue_trial(defaults_point, user_attrs={DEFAULTS_ATTR: defaults_key})
    except optuna.exceptions.DuplicatedStudyError:  # a rerun, or another worker: a stream of its own
        study = optuna.load_study(study_name=name, storage=rdb, pruner=pruner)
        study.sampler, seed_used = process_sampler(settings.seed, len(study.trials), joining=True)
    finished = lambda: [t for t in study.trials if t.state in FINISHED_STATES]  # noqa: E731
    parent = client.create_run(experiment_id, run_name=f"tune-{name}",
                               tags={"tune.study": name, "model.class": model, "data.sha256": sha,
                                     "tune.storage": storage.split("://")[0],
                                     "tune.sampler_seed": str(seed_used)})
    parent_id = parent.info.run_id
    best_model: dict[str, Any] = {}
    started = time.perf_counter()
    todo = max(trials - len(finished()), 0)

    def objective(trial: optuna.Trial) -> float:
        model_params, tuned_train = suggest_params(trial, model, sampled, frozenset(train_params or {}))
        params = {**fixed, **tuned_train}
        child = client.create_run(experiment_id, run_name=f"trial-{trial.number}",
                                  tags={"mlflow.parentRunId": parent_id, "tune.study": name,
                                        "tune.trial": str(trial.number), "model.class": model})
        for key, value in {**flat_params("model", model_params), **flat_params("train", params)}.items():
            client.log_param(child.info.run_id, key, value)

        def on_epoch(row: dict[str, Any]) -> None:
            value = row.get(ndcg_key)
            if value is None or not math.isfinite(value):
                return
            client.log_metric(child.info.run_id, "val.ndcg_at_10", float(value), step=int(row["epoch"]))
            trial.report(float(value), int(row["epoch"]))
            if trial.should_prune():
                raise optuna.TrialPruned(f"epoch {row['epoch']}: val NDCG@10 {value:.4f} below the median")

        try:
            result = _fit(split, vocab, model, {**base_model, **model_params}, params, on_epoch)
        except optuna.TrialPruned as pruned:
            client.set_terminated(child.info.run_id, status="KILLED")
            client.set_tag(child.info.run_id, "tune.state", "pruned")
            logger.info("trial %d pruned (%d/%d): %s", trial.number, len(finished()) + 1, trials, pruned)
            raise
        except BaseException:
            client.set_terminated(child.info.run_id, status="FAILED")
            raise
        client.log_metric(child.info.run_id, "best.val_ndcg_at_10", result.best_val_ndcg)
        client.set_tag(child.info.run_id, "tune.state", "complete")
        client.set_terminated(child.info.run_id)
        if result.best_val_ndcg > best_model.get("value", -1.0):
            best_model.update(value=result.best_val_ndcg, number=trial.number, model=result.model)
        done = len(finished()) + 1
        per_trial = (time.perf_counter() - started) / max(done - (trials - todo), 1)
        logger.info("trial %d done (%d/%d) val_ndcg@10=%.4f best=%.4f epochs=%d eta_s=%.0f", trial.number, done,
                    trials, result.best_val_ndcg, max(best_model["value"], _best_value(study)), len(result.history),
                    per_trial * max(trials - done, 0))
        return result.best_val_ndcg

    try:
        if todo:
            # the study's total, not this process's: several workers sharing the study stop together (each may
            # finish the trial it is running, so the total can exceed ``trials`` by the workers less one)
            total = optuna.study.MaxTrialsCallback(trials, states=FINISHED_STATES)
            study.optimize(objective, n_trials=todo, catch=(RuntimeError,), callbacks=[total])
        report = _record_best(client, experiment_id, parent_id, study, split, vocab, model, fixed, base_model,
                              best_model, sha, defaults_seeds, source, path, defaults_point, defaults_key)
    except BaseException:
        client.set_terminated(parent_id, status="FAILED")
        raise
    client.set_terminated(parent_id)
    return {**report, "study": name, "storage": storage.split("://")[0], "parent_run_id": parent_id,
            "sampler_seed": seed_used,
            "trials": {"finished": len(finished()), "run_now": todo,
                       "pruned": sum(t.state == optuna.trial.TrialState.PRUNED for t in study.trials),
                       "complete": sum(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials)}}


def _best_value(study: optuna.Study) -> float:
    try:
        return float(study.best_value)
    except ValueError:  # no complete trial yet
        return -1.0


def _record_best(client: MlflowClient, experiment_id: str, parent_id: str, study: optuna.Study, split: Split,
                 vocab: ItemVocabulary, model: str, fixed: dict[str, Any], base_model: dict[str, Any],
                 best_model: dict[str, Any], sha: str, defaults_seeds: int, source: str,
                 path: str | None, point: dict[str, Any] | None = None, defaults_key: str | None = None
                 ) -> dict[str, Any]:
    """The tagged best-parameters run, the test split touched once, and the defaults' seed spread (the first seed's
    value taken from the trial that trained exactly the defaults, ``point``, when the study has one)."""
    if not any(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials):
        raise ValueError(f"study {study.study_name!r} has no complete trial (all pruned or failed); run more trials")
    best = study.best_trial
    model_keys = set(config_fields(model)) - {"n_items"}
    best_model_params = {**base_model, **{k: v for k, v in best.params.items() if k in model_keys}}
    best_train = {k: v for k, v in best.params.items() if k not in model_keys}
    if best_model.get("number") == best.number:
        scorer = best_model["model"]
    else:  # the best trial ran in an earlier session: train its parameters once more
        scorer = _fit(split, vocab, model, best_model_params, {**fixed, **best_train}).model
    test = evaluate(scorer, split.test, n_items=len(vocab), k=10)["metrics"]
    defaults: dict[str, Any] = {}
    if defaults_seeds > 0:
        # the enqueued first trial trained the defaults with the first seed: its value is that seed's run
        first = next((t.value for t in study.trials if point and t.state == optuna.trial.TrialState.COMPLETE
                      and t.params == point and t.user_attrs.get(DEFAULTS_ATTR) == defaults_key), None)
        values = [first if i == 0 and first is not None else
                  _fit(split, vocab, model, base_model, {**fixed, "seed": fixed["seed"] + i}).best_val_ndcg
                  for i in range(defaults_seeds)]
        mean = statistics.fmean(values)
        sd = statistics.stdev(values) if len(values) > 1 else 0.0
        defaults = {"val_ndcg@10": values, "mean": mean, "sd": sd, "seeds": defaults_seeds,
                    "first_seed_from_trial": first is not None,
                    "best_minus_mean_in_sd": (best.value - mean) / sd if sd > 0 else None,
                    "best_exceeds_mean_plus_2sd": bool(best.value > mean + 2 * sd)}
    params = {"model": best_model_params, "train": best_train}
    run = client.create_run(experiment_id, run_name=f"tune-best-{model}",
                            tags={TUNED_TAG: "true", "model.class": model, "tune.params": json.dumps(params),
                                  "tune.study": study.study_name, "tune.best_trial": str(best.number),
                                  "tune.parent_run_id": parent_id, "data.sha256": sha, "data.source": source,
                                  "data.path": str(path or ""),
                                  "serving.max_seq_len": str(best_model_params.get("max_seq_len", ""))})
    client.log_metric(run.info.run_id, "val.ndcg_at_10", float(best.value))
    for key, value in test.items():
        if math.isfinite(value):
            client.log_metric(run.info.run_id, "test." + key.replace("@", "_at_"), float(value))
    if defaults:
        client.log_metric(run.info.run_id, "defaults.val_ndcg_at_10.mean", defaults["mean"])
        client.log_metric(run.info.run_id, "defaults.val_ndcg_at_10.sd", defaults["sd"])
    client.set_terminated(run.info.run_id)
    logger.info("best trial %d val_ndcg@10=%.4f test_ndcg@10=%.4f params=%s", best.number, best.value,
                test["ndcg@10"], params)
    return {"best": {"trial": best.number, "value": float(best.value), "params": params},
            "test": {"ndcg@10": test["ndcg@10"], "hr@10": test["hr@10"], "touched": "once, best parameters"},
            "defaults": defaults, "best_run_id": run.info.run_id,
            "protocol": {**split.protocol, "selection": "validation NDCG@10 (full ranking, seen excluded)",
                         "sampler": "TPE (seeded)", "pruner": "median (5 startup trials, 3 warm-up epochs)",
                         "fixed_train_params": fixed, "data.sha256": sha, "n_items": len(vocab)}}


@flow(name="tune")
def tune_flow(source: str = "lake", path: str | None = None, trials: int = 20, model: str | None = None,
              train_params: dict[str, Any] | None = None, defaults_seeds: int = 0,
              study_name: str | None = None) -> dict[str, Any]:
    """Hyper-parameter search (``run_study``) as a Prefect flow; a rerun continues the same study."""
    return run_study(source, path, trials, model=model, train_params=train_params, defaults_seeds=defaults_seeds,
                     study_name=study_name)

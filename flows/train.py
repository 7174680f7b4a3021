"""The ``train`` flow: events -> sequences -> a sequential model -> one MLflow run with everything to explain it.

The model is any class registered in ``models.factory`` (``sasrec`` by default, ``settings.model_class``);
the flow uses only the model contract.

The run records: params (model config, train config, seed, data source), per-epoch metrics
(``loss``, ``val.ndcg_at_10``, ``val.hr_at_10``, ``seq_per_s`` with ``step=epoch``), system tags
(device, torch version, CPU/GPU name), a data fingerprint (sha256 of event ids and timestamps,
counts, time range, source, watermark), the git commit, artifacts (vocabulary, configs, checkpoint,
learning curve) and the model itself as a pyfunc (``registry.store.log_model``). Evaluation
and registration happen in ``flows.evaluate``; training never promotes anything.
"""

from __future__ import annotations

import hashlib
import json
import math
import platform
import shutil
import subprocess
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd
import prefect  # noqa: F401  (import before mlflow: keeps Prefect's console log format)
import torch
from mlflow.tracking import MlflowClient
from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from models.factory import build_config, config_fields, model_class
from models.sequences import Split, build_sequences, leave_one_out
from models.trainer import val_keys
from models.vocab import ItemVocabulary
from recloop.contract import coerce_events, coerce_items
from recloop.policy import EventPolicy
from recloop.settings import Settings, get_settings
from registry import plots, store, tracking

REPO_ROOT = Path(__file__).resolve().parents[1]


def epoch_metrics(k: int) -> dict[str, str]:
    """models.trainer history key -> MLflow metric name (logged with step=epoch), for validation K = k."""
    ndcg, hr = val_keys(k)
    return {"loss": "loss", ndcg: f"val.ndcg_at_{k}", hr: f"val.hr_at_{k}", "seqs_per_s": "seq_per_s",
            "seconds": "epoch_seconds"}


def mlflow_key(name: str) -> str:
    """A metric/param/tag key MLflow accepts: ``ndcg@10`` -> ``ndcg_at_10``."""
    return name.replace("@", "_at_")


def load_events(source: str, path: str | None) -> tuple[pd.DataFrame, pd.DataFrame | None, str | None]:
    """Contract events, the items table (None if the source has none) and the source's watermark.

    Args:
        source: ``"lake"`` (``recloop.lake.Lake``; ``path`` defaults to ``settings.lake_path``),
            ``"parquet"`` (a contract events file or folder), or any ``recloop.sources`` name
            (e.g. ``"movielens-100k"``; ``path`` is its folder).
        path: where the data lies.
    Raises:
        ValueError: the source yields no events.
    """
    watermark: str | None = None
    items: pd.DataFrame | None = None
    if source == "lake":
        from recloop.lake import Lake

        lake = Lake(Path(path) if path else get_settings().lake_path)
        events = lake.events()
        items = lake.items() if hasattr(lake, "items") else None
        marks = getattr(lake, "watermarks", None)
        if callable(marks):
            watermark = json.dumps({str(k): str(v) for k, v in dict(marks()).items()}, sort_keys=True)
    elif source == "parquet":
        if path is None:
            raise ValueError("source='parquet' needs a path")
        events = coerce_events(pd.read_parquet(path))
    else:
        from recloop.sources import load_source

        frames = load_source(source, Path(path) if path else None)
        events = coerce_events(frames.events, default_source=source)
        items = coerce_items(frames.items)
    if events.empty:
        raise ValueError(f"source={source!r} path={path!r} yielded no events")
    return events, items, watermark


def data_fingerprint(events: pd.DataFrame, source: str, path: str | None = None,
                     watermark: str | None = None) -> dict[str, str]:
    """Identify a training set: sha256 over (event_id, timestamp ns) sorted by event_id, plus counts.

    The hash does not depend on row order, so the same events always give the same fingerprint.
    """
    frame = events[["event_id", "timestamp"]].sort_values("event_id", kind="stable")
    digest = hashlib.sha256()
    digest.update("\n".join(frame["event_id"].astype(str)).encode())
    digest.update(frame["timestamp"].astype("int64").to_numpy().tobytes())
    ts = events["timestamp"]
    return {
        "data.sha256": digest.hexdigest(),
        "data.n_events": str(len(events)),
        "data.n_users": str(events["user_id"].nunique()),
        "data.n_items": str(events["item_id"].nunique()),
        "data.time_min": ts.min().isoformat(),
        "data.time_max": ts.max().isoformat(),
        "data.source": source,
        "data.path": str(path) if path else "",
        "data.watermark": watermark or ts.max().isoformat(),
    }


def system_info(device: str) -> dict[str, str]:
    """Tags describing where a run trained: device, torch/python versions, CPU and GPU names."""
    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text(errors="replace").splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    return {
        "sys.device": str(device),
        "sys.torch": torch.__version__,
        "sys.python": platform.python_version(),
        "sys.cpu": cpu,
        "sys.cpu_count": str(torch.get_num_threads()),
        "sys.gpu": gpu,
        "sys.host_os": platform.platform(),
    }


def git_commit(repo: Path = REPO_ROOT) -> str:
    """The HEAD commit of ``repo`` (suffixed ``-dirty`` with uncommitted changes), else ``"unknown"``."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True,
                              timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=repo,
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return f"{head}-dirty" if dirty else head


def prepare_split(events: pd.DataFrame, base_vocab: ItemVocabulary | None = None,
                  policy: EventPolicy | None = None, extra_ids: Any = ()) -> tuple[ItemVocabulary, Split]:
    """Vocabulary and leave-one-out split of the policy's positive events (``recloop.policy``: a
    negative or context-only event is never a history item nor a target). With ``base_vocab`` (warm
    start) new items are appended. ``extra_ids`` (the new-item catalogue, ``recloop.catalog``) join the
    vocabulary even without events, so the retrain gives them ID embeddings. The split's protocol records the
    policy (``event_policy``)."""
    policy = policy or get_settings().event_policy
    positives = policy.positives(events)
    ids = list(dict.fromkeys([*positives["item_id"].astype(str).unique(), *(str(i) for i in extra_ids)]))
    vocab = base_vocab.extend(ids) if base_vocab is not None else ItemVocabulary.from_ids(ids)
    split = leave_one_out(build_sequences(positives, vocab))
    split.protocol["event_policy"] = policy.describe()
    return vocab, split


def flat_params(prefix: str, values: Mapping[str, Any]) -> dict[str, str]:
    """``{"lr": 0.001}`` -> ``{"train.lr": "0.001"}`` (MLflow params are strings, <= 6000 chars)."""
    return {f"{prefix}.{mlflow_key(k)}": str(v)[:6000] for k, v in values.items()}


@task(retries=2, retry_delay_seconds=[2, 10], cache_policy=NO_CACHE)
def load_events_task(source: str, path: str | None) -> tuple[pd.DataFrame, pd.DataFrame | None, str | None]:
    """Read the training events (storage: may retry)."""
    events, items, watermark = load_events(source, path)
    get_run_logger().info("events loaded source=%s n=%d", source, len(events))
    return events, items, watermark


@task(retries=1, retry_delay_seconds=5, cache_policy=NO_CACHE)
def fit_task(run_id: str, split: Split, vocab: ItemVocabulary, model: str, model_params: dict[str, Any],
             train_params: dict[str, Any], init_model: Any | None = None,
             init_vocab: ItemVocabulary | None = None, item_text: Any = None,
             init_train_state: dict[str, Any] | None = None, checkpoint_dir: str | None = None) -> Any:
    """Train model ``model`` and stream per-epoch metrics into the run.

    Resumable: every epoch is checkpointed to ``checkpoint_dir`` (``resume_dir``), so a retry of this task
    (or a rerun of the flow on the same data and settings) continues after the last finished epoch.
    ``init_train_state``: the warm-start model's optimiser state (``training/train_state.pt``), continued
    with its item rows remapped to ``vocab``.

    ``item_text``: (n_items + 1, d_text) text embeddings of ``vocab`` for a text-aware model (``item_text_task``)."""
    from models.checkpoint import checkpoint_dict
    from models.trainer import TrainConfig, train_model

    client = MlflowClient()
    logger = get_run_logger()
    model_config = build_config(model, n_items=len(vocab), **model_params)
    train_config = TrainConfig(**train_params)
    names = epoch_metrics(train_config.eval_k)
    ndcg_key = val_keys(train_config.eval_k)[0]

    def on_epoch(record: Mapping[str, Any]) -> None:
        step = int(record["epoch"])
        for key, name in names.items():
            value = record.get(key)
            if isinstance(value, int | float) and math.isfinite(value):
                client.log_metric(run_id, name, float(value), step=step)
        logger.info("epoch done model=%s epoch=%d/%d loss=%.4f %s=%.4f seqs_per_s=%.0f eta_s=%.0f", model, step,
                    train_config.epochs, record.get("loss", math.nan), ndcg_key, record.get(ndcg_key, math.nan),
                    record.get("seqs_per_s", math.nan), record.get("eta_s", math.nan))

    init_state = checkpoint_dict(init_model, init_vocab) if init_model is not None else None
    if init_state is not None and init_train_state:
        init_state["train_state"] = init_train_state
    return train_model(split, vocab, model_config, train_config, init_state=init_state,
                       progress=False, on_epoch=on_epoch, item_text=item_text, checkpoint_dir=checkpoint_dir)


@task(retries=2, retry_delay_seconds=[2, 10], cache_policy=NO_CACHE)
def catalog_items_task() -> pd.DataFrame:
    """The new-item catalogue (``recloop.catalog``: items added through ``POST /items`` or ``recloop catalog
    add``) as a contract items frame; empty, with a warning, when the event-log database is unreadable (the
    retrain then waits for them; storage: may retry)."""
    from sqlalchemy.exc import SQLAlchemyError

    from recloop.catalog import CatalogStore, items_frame

    try:
        with CatalogStore(get_settings().event_log_uri) as store:
            return store.items_frame()
    except SQLAlchemyError as err:
        get_run_logger().warning("new-item catalogue not read; retraining without it error=%s", err)
        return items_frame([])


@task(cache_policy=NO_CACHE)
def item_text_task(vocab: ItemVocabulary, items: pd.DataFrame | None, catalog: pd.DataFrame) -> Any:
    """(n_items + 1, d_text) text embeddings of ``vocab``'s items (title, genres, text; the packaged encoder
    behind the features stage's embedding cache, ``featurestore.text``); an item without text gets a zero row.

    A training source without an items table (the loop's incremental training set, a contract Parquet file) takes
    the lake's items table, the catalogue the platform serves.

    Raises:
        ValueError: no item has text (a text-aware model needs the items table).
    """
    from featurestore.materialize import load_text_encoder
    from featurestore.text import embedding_cache_path, item_text_embeddings
    from models.text_items import text_matrix

    if items is None or not len(items):
        from recloop.lake import Lake

        items = Lake(get_settings().lake_path).items()
    frames = [f for f in (items, catalog) if f is not None and len(f)]
    if not frames:
        raise ValueError("a text-aware model (item_repr 'id+text' or 'text') needs item texts; the source has none")
    encoder = load_text_encoder(cache_path=embedding_cache_path(get_settings().home))
    texts = item_text_embeddings(pd.concat(frames, ignore_index=True), encoder)
    d_text = len(next(iter(texts.values())))
    matrix = text_matrix(vocab.ids, texts, d_text)
    get_run_logger().info("item texts embedded n_items=%d with_text=%d", len(vocab),
                          sum(i in texts for i in vocab.ids))
    return matrix


#: Tags of the MLflow run that records a tuning study's best parameters (``flows.tune``); a cold ``train``
#: of that model class reads the newest one (``latest_tuned``).
TUNED_TAG = "tune.best"
TUNE_EXPERIMENT = "recloop-tune"


def text_path_params(item_repr: str, settings: Settings, given: dict[str, Any] | None = None) -> dict[str, Any]:
    """The text path's fixes a text-aware model trained from scratch takes from the settings (``text_norm``;
    ``id_dropout``, ``cold_id`` and ``id_expectation`` for "id+text" only), under the ``given`` (explicit or tuned)
    model parameters, which win. ``cold_id`` and ``id_expectation`` from the settings apply only where the resulting
    ``id_dropout`` is > 0 (both are about the dropped IDs); values the caller gives are kept as given. Just
    ``given`` for "id"."""
    given = dict(given or {})
    if item_repr == "id":
        return given
    out: dict[str, Any] = {"text_norm": settings.text_norm}
    if item_repr == "id+text":
        out["id_dropout"] = settings.id_dropout
        dropout = float(given.get("id_dropout", settings.id_dropout))
        out["cold_id"] = bool(settings.cold_id and dropout > 0)
        out["id_expectation"] = bool(settings.id_expectation and dropout > 0)
    return {**out, **given}


def latest_tuned(client: MlflowClient, model: str) -> dict[str, Any] | None:
    """The newest tuned parameters of ``model``: ``{"run_id", "model": {...}, "train": {...}}`` from the run
    tagged ``tune.best=true`` and ``model.class=<model>`` in experiment ``recloop-tune``, else None."""
    exp = client.get_experiment_by_name(TUNE_EXPERIMENT)
    if exp is None:
        return None
    runs = client.search_runs([exp.experiment_id], filter_string=f"tags.`{TUNED_TAG}` = 'true' and "
                              f"tags.`model.class` = '{model}'", order_by=["attributes.start_time DESC"],
                              max_results=1)
    if not runs:
        return None
    params = json.loads(runs[0].data.tags.get("tune.params", "{}"))
    return {"run_id": runs[0].info.run_id, "model": dict(params.get("model", {})),
            "train": dict(params.get("train", {}))}


def resume_dir(home: Path, data_sha: str, model: str, model_params: Mapping[str, Any],
               train_params: Mapping[str, Any], init_version: str | None) -> Path:
    """``<home>/checkpoints/train-<key>``: the same data, model, parameters and warm-start version give the
    same folder, so a retried or rerun training finds its last epoch there (``models.trainer``)."""
    key = json.dumps({"data": data_sha, "model": model, "model_params": dict(model_params),
                      "train_params": dict(train_params), "init": init_version}, sort_keys=True, default=str)
    return home / "checkpoints" / f"train-{hashlib.sha256(key.encode()).hexdigest()[:16]}"


def init_train_state(client: MlflowClient, run_id: str | None) -> dict[str, Any] | None:
    """The optimiser state a run saved with its best model (``training/train_state.pt``), or None when the
    run has none (trained before it was recorded: the warm start then begins with a fresh optimiser)."""
    from mlflow.exceptions import MlflowException

    from models.checkpoint import load_train_state

    if not run_id:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        try:
            path = client.download_artifacts(run_id, "training/train_state.pt", tmp)
        except (MlflowException, OSError):
            return None
        return load_train_state(path)


@flow(name="train")
def train_flow(source: str = "lake", path: str | None = None, model_params: dict[str, Any] | None = None,
               train_params: dict[str, Any] | None = None, warm_start_from: str | None = None,
               data_version: str | None = None, experiment: str = tracking.DEFAULT_EXPERIMENT,
               model: str | None = None) -> dict[str, str]:
    """Train a candidate and log one MLflow run. Returns ids to evaluate it (nothing is promoted).

    Args:
        source / path: where the events come from (see ``load_events``).
        model_params: config fields of the model except ``n_items`` (default ``max_seq_len`` from
            settings; when warm-starting, the initial model's architecture).
        train_params: ``TrainConfig`` fields (lr, epochs, seed, ...) over the model's ``train_defaults``.
        warm_start_from: a registered version number or ``@alias`` to initialise from (e.g. ``@champion``).
        data_version: a label recorded with the run (e.g. the lake batch id).
        experiment: MLflow experiment name.
        model: a name in ``models.factory.MODELS`` (default: the warm-start model's class, else
            ``settings.model_class``).
    Returns:
        ``{"run_id", "model_uri", "model_id", "checkpoint_uri"}``.
    Raises:
        ValueError: unknown model name or a parameter the model does not take.
    """
    settings = get_settings()
    logger = get_run_logger()
    client = tracking.configure_tracking(settings)
    experiment_id = tracking.ensure_experiment(client, experiment, settings)

    init = None
    if warm_start_from:
        ref = warm_start_from.lstrip("@")
        which = {"alias": ref} if warm_start_from.startswith("@") else {"version": ref}
        init = store.load_version(settings.model_name, client=client, **which)
    architecture: dict[str, Any] = {"max_seq_len": settings.max_seq_len}
    if model is None and init is not None:
        model = init.model.name
        architecture = {k: v for k, v in init.model.config_dict().items() if k != "n_items"}
    model = model or settings.model_class
    cls = model_class(model)  # fails here, before any data is read, on an unknown name
    tuned = latest_tuned(client, model) if init is None else None  # warm starts keep the champion's architecture
    model_params = {**architecture, **(tuned or {}).get("model", {}), **(model_params or {})}
    train_params = {"seed": settings.seed, **cls.train_defaults, **(tuned or {}).get("train", {}),
                    **(train_params or {})}

    events, items, watermark = load_events_task(source, path)
    catalog = catalog_items_task()  # new items join the vocabulary: this retrain learns their ID embeddings
    vocab, split = prepare_split(events, init.vocab if init is not None else None, extra_ids=catalog["item_id"])
    if init is None and "item_repr" not in model_params and settings.item_repr != "id":
        model_params["item_repr"] = settings.item_repr
    if init is None:
        fields = set(config_fields(model))
        merged = text_path_params(model_params.get("item_repr", "id"), settings, model_params)
        model_params = {k: v for k, v in merged.items() if k in fields or k in model_params}
    item_text = None
    if model_params.get("item_repr", "id") != "id":
        item_text = item_text_task(vocab, items, catalog)
        model_params["d_text"] = int(item_text.shape[1])

    tags = {**data_fingerprint(events, source, path, watermark), "git.commit": git_commit(),
            "data.version": data_version or "", "vocab.version": vocab.version, "stage": "trained",
            "model.class": model,
            "warm_start_from": f"{settings.model_name}/{init.version}" if init is not None else "none"}
    run = client.create_run(experiment_id, tags=tags, run_name=f"{model}-{tags['data.sha256'][:8]}")
    run_id = run.info.run_id
    params = {**flat_params("model", model_params), **flat_params("train", train_params),
              **flat_params("split", split.protocol), "model.n_items": str(len(vocab))}
    for key, value in params.items():
        client.log_param(run_id, key, value)

    if tuned is not None:
        client.set_tag(run_id, "tuned_from", tuned["run_id"])
        if int(model_params.get("max_seq_len", 0)) > settings.max_seq_len:
            # serving and materialisation keep the longer history (recloop.settings.online_history_len)
            logger.info("tuned max_seq_len=%s exceeds RECLOOP_MAX_SEQ_LEN=%d: the served history follows the "
                        "model", model_params["max_seq_len"], settings.max_seq_len)
    resume = resume_dir(settings.home, tags["data.sha256"], model, model_params, train_params,
                        init.version if init is not None else None)
    client.set_tag(run_id, "train.resume_dir", str(resume))
    try:
        result = fit_task(run_id, split, vocab, model, model_params, train_params,
                          init.model if init else None, init.vocab if init else None, item_text,
                          init_train_state(client, init.run_id) if init is not None else None, str(resume))
        info = _log_training_outputs(client, run_id, result, vocab, model_params, train_params)
    except BaseException:
        client.set_terminated(run_id, status="FAILED")
        raise
    shutil.rmtree(resume, ignore_errors=True)  # done: the next train on the same data starts afresh
    logger.info("trained run_id=%s best_epoch=%s", run_id, getattr(result, "best_epoch", "?"))
    return {"run_id": run_id, **info}


def _log_training_outputs(client: MlflowClient, run_id: str, result: Any, vocab: ItemVocabulary,
                          model_params: dict[str, Any], train_params: dict[str, Any]) -> dict[str, str]:
    """Checkpoint, vocabulary, configs, learning curve and the pyfunc model into run ``run_id``."""
    import mlflow

    from models.checkpoint import save_checkpoint

    history = [dict(h) for h in getattr(result, "history", [])]
    client.set_tag(run_id, "sys.device", str(getattr(result, "device", "cpu")))
    for key, value in system_info(str(getattr(result, "device", "cpu"))).items():
        client.set_tag(run_id, key, value)
    client.log_param(run_id, "train.seed_used", str(getattr(result, "seed", train_params.get("seed"))))
    client.log_param(run_id, "train.best_epoch", str(getattr(result, "best_epoch", "")))
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        ckpt = out / "checkpoint.pt"
        text_extra = {"text_encoder": "all-MiniLM-L6-v2"} if getattr(result.model, "uses_text", False) else {}
        save_checkpoint(ckpt, result.model, vocab, {"run_id": run_id, "best_epoch": result.best_epoch,
                                                    "history": history, "seed": result.seed, **text_extra})
        (out / "vocab.json").write_text(json.dumps(vocab.to_dict()))
        (out / "config.json").write_text(json.dumps({"model": {**model_params, "n_items": len(vocab)},
                                                     "model_class": result.model.name,
                                                     "train": train_params}, indent=2, default=str))
        (out / "history.json").write_text(json.dumps(history, indent=2, default=str))
        for name in ("checkpoint.pt", "vocab.json", "config.json", "history.json"):
            client.log_artifact(run_id, str(out / name), artifact_path="training")
        if getattr(result, "train_state", None):  # the best epoch's optimiser state: warm starts continue it
            from models.checkpoint import save_train_state

            save_train_state(out / "train_state.pt", result.train_state)
            client.log_artifact(run_id, str(out / "train_state.pt"), artifact_path="training")
        if history:
            plots.learning_curve(history, out / "learning_curve.png", getattr(result, "best_epoch", None))
            client.log_artifact(run_id, str(out / "learning_curve.png"), artifact_path="plots")
        with mlflow.start_run(run_id=run_id):
            info = store.log_model(ckpt, tags={"vocab.version": vocab.version, "model.class": result.model.name})
        client.set_tag(run_id, "model.uri", info.model_uri)
    return {"model_uri": info.model_uri, "model_id": str(info.model_id),
            "checkpoint_uri": f"runs:/{run_id}/training/checkpoint.pt"}

"""MLflow glue shared by serving and the flows: tracking set-up, the pyfunc wrapper, load by alias.

Why a pyfunc and not ``mlflow.pytorch``: MLflow 3 saves PyTorch models with torch.export by default,
which freezes the sequence length and breaks ``.eval()`` (STACK_NOTES.md). So a model version is a
pyfunc whose only artifact is our own checkpoint (``models.checkpoint``: config + state_dict +
vocabulary); loading rebuilds the original ``SASRec`` module on CPU, and
``unwrap_python_model()`` hands back that module and its vocabulary.

Backends: SQLite under ``home`` by default, PostgreSQL (or any SQLAlchemy URL / server) when
``RECLOOP_MLFLOW_TRACKING_URI`` is set. The artifact location of every experiment is explicit.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
import torch
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from recloop.settings import Settings, get_settings

logger = logging.getLogger(__name__)

CHECKPOINT_ARTIFACT = "checkpoint"
MODEL_ARTIFACT_NAME = "model"
DEFAULT_EXPERIMENT = "recloop"


def pip_requirements() -> list[str]:
    """Explicit pip requirements of a logged model (inference takes ~20 s and adds noise)."""
    import importlib.metadata as md

    reqs = [f"torch=={torch.__version__.split('+')[0]}", f"mlflow=={mlflow.__version__}"]
    for dist in ("numpy", "pandas", "cloudpickle"):
        reqs.append(f"{dist}=={md.version(dist)}")
    return reqs


def configure_tracking(settings: Settings | None = None) -> MlflowClient:
    """Point this process's MLflow tracking and registry at the configured backend.

    For SQLite the parent folder is created and the schema initialised here, once, before any
    concurrent use (creating it from several processes at once fails, STACK_NOTES.md).

    Args:
        settings: defaults to ``get_settings()``.
    Returns:
        An ``MlflowClient`` bound to the tracking URI.
    """
    settings = settings or get_settings()
    uri = settings.mlflow_uri
    if uri.startswith("sqlite:///"):
        Path(uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    client.search_experiments(max_results=1)  # creates / migrates the schema now, in one process
    return client


def ensure_experiment(client: MlflowClient, name: str = DEFAULT_EXPERIMENT,
                      settings: Settings | None = None) -> str:
    """Return the id of experiment ``name``, creating it with an explicit artifact location.

    The location is ``<settings.mlflow_artifacts>/<name>`` (a ``file://`` URI under home by default).
    """
    settings = settings or get_settings()
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    location = f"{settings.mlflow_artifacts.rstrip('/')}/{name}"
    try:
        return client.create_experiment(name, artifact_location=location)
    except MlflowException:  # created concurrently by another process
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


class SASRecPyfunc(mlflow.pyfunc.PythonModel):
    """A registered recloop model: our checkpoint, rebuilt as the original torch module on load.

    ``predict`` takes a DataFrame with a ``history`` column (list of item_id strings, oldest first)
    and returns, per row, the top-``k`` item ids and scores (``params={"k": 10}``), seen items
    excluded. ``unwrap_python_model()`` exposes ``model`` (``models.sasrec.SASRec``, eval mode, CPU),
    ``vocab`` (``models.vocab.ItemVocabulary``) and ``extra`` (the checkpoint's metadata dict).
    """

    def __init__(self) -> None:
        self.model: Any = None
        self.vocab: Any = None
        self.extra: dict[str, Any] = {}

    def load_context(self, context: Any) -> None:
        """Rebuild the module from the checkpoint artifact (always on CPU)."""
        from models.checkpoint import load_checkpoint

        self.model, self.vocab, self.extra = load_checkpoint(Path(context.artifacts[CHECKPOINT_ARTIFACT]))
        self.model = self.model.to("cpu").eval()

    def predict(self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None
                ) -> pd.DataFrame:
        """Top-k item ids per history (column ``history``: list[str]) -> ``item_ids``, ``scores``."""
        if "history" not in model_input.columns:
            raise ValueError(f"model_input needs a 'history' column; got {list(model_input.columns)}")
        k = int((params or {}).get("k", 10))
        histories = [list(h) if h is not None else [] for h in model_input["history"]]
        scores = score_histories(self.model, self.vocab, histories)  # (batch, n_items + 1)
        top = torch.topk(scores, k=min(k, scores.shape[1] - 1), dim=1)
        ids = [self.vocab.decode(row) for row in top.indices.tolist()]
        return pd.DataFrame({"item_ids": ids, "scores": top.values.tolist()})


def encode_histories(vocab: Any, histories: list[list[str]], max_seq_len: int) -> torch.Tensor:
    """Left-padded (batch, max_seq_len) int64 item_idx from item_id lists; unknown ids are dropped."""
    out = np.zeros((len(histories), max_seq_len), dtype=np.int64)
    for row, hist in enumerate(histories):
        idx = vocab.encode(hist, unknown="pad") if hist else np.zeros(0, dtype=np.int64)
        idx = idx[idx > 0][-max_seq_len:]
        if len(idx):
            out[row, max_seq_len - len(idx):] = idx
    return torch.from_numpy(out)


@torch.inference_mode()
def score_histories(model: Any, vocab: Any, histories: list[list[str]]) -> torch.Tensor:
    """Scores (batch, n_items + 1) over the full catalogue; padding and seen items set to -inf."""
    item_idx = encode_histories(vocab, histories, int(model.config.max_seq_len))
    scores = model.score(item_idx).float().clone()  # (batch, n_items + 1)
    scores[:, 0] = -torch.inf
    seen = item_idx > 0
    rows = torch.arange(item_idx.shape[0]).unsqueeze(1).expand_as(item_idx)
    scores[rows[seen], item_idx[seen]] = -torch.inf
    return scores


def model_signature() -> Any:
    """The pyfunc signature: input ``history`` (list of item ids), output ids and scores, param ``k``."""
    from mlflow.models import infer_signature

    return infer_signature(pd.DataFrame({"history": [["1", "2"]]}),
                           pd.DataFrame({"item_ids": [["3"]], "scores": [[0.5]]}), params={"k": 10})


def log_model(checkpoint_path: Path, *, name: str = MODEL_ARTIFACT_NAME,
              registered_model_name: str | None = None, tags: dict[str, str] | None = None,
              code_paths: list[str] | None = None) -> Any:
    """Log a checkpoint as a pyfunc model in the active run.

    Args:
        checkpoint_path: file written by ``models.checkpoint.save_checkpoint``.
        name: the logged model's name in the run.
        registered_model_name: also register a version of this registered model when given.
        tags: tags for the logged model.
        code_paths: extra source to ship with the model (none by default: the host has recloop).
    Returns:
        The ``mlflow.models.model.ModelInfo`` (``.model_uri``, ``.model_id``, ``.registered_model_version``).
    Raises:
        FileNotFoundError: ``checkpoint_path`` does not exist.
    """
    checkpoint_path = Path(checkpoint_path)
    if not checkpoint_path.exists():
        raise FileNotFoundError(f"checkpoint not found: {checkpoint_path}")
    return mlflow.pyfunc.log_model(
        name=name,
        python_model=SASRecPyfunc(),
        artifacts={CHECKPOINT_ARTIFACT: str(checkpoint_path)},
        pip_requirements=pip_requirements(),
        signature=model_signature(),
        code_paths=code_paths,
        registered_model_name=registered_model_name,
        tags=tags,
    )


@dataclass
class LoadedModel:
    """A model version loaded from the registry: the torch module, its vocabulary and provenance."""

    model: Any
    vocab: Any
    version: str
    run_id: str | None
    extra: dict[str, Any] = field(default_factory=dict)
    name: str = ""
    tags: dict[str, str] = field(default_factory=dict)


def get_alias_version(client: MlflowClient, name: str, alias: str) -> str | None:
    """The version number an alias points to, or None when the alias (or the model) does not exist."""
    try:
        return str(client.get_model_version_by_alias(name, alias).version)
    except MlflowException as err:
        if err.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            return None
        raise


def set_alias(client: MlflowClient, name: str, alias: str, version: str | int) -> None:
    """Point ``alias`` of registered model ``name`` at ``version``."""
    client.set_registered_model_alias(name, alias, str(version))
    logger.info("alias set model=%s alias=%s version=%s", name, alias, version)


def load_version(name: str, version: str | int | None = None, alias: str | None = None,
                 client: MlflowClient | None = None) -> LoadedModel:
    """Load a registered model version by number or alias, pinned to the resolved version.

    Args:
        name: registered model name (``settings.model_name``).
        version: the version number; exclusive with ``alias``.
        alias: e.g. ``"champion"``; resolved once to a version, so the result never changes under you.
        client: defaults to a client on the current tracking URI.
    Returns:
        LoadedModel with the CPU module in eval mode.
    Raises:
        ValueError: neither or both of ``version`` and ``alias`` given.
        LookupError: the alias does not exist.
    """
    if (version is None) == (alias is None):
        raise ValueError(f"give exactly one of version={version!r} and alias={alias!r}")
    client = client or MlflowClient()
    if alias is not None:
        resolved = get_alias_version(client, name, alias)
        if resolved is None:
            raise LookupError(f"registered model {name!r} has no alias {alias!r}")
        version = resolved
    mv = client.get_model_version(name, str(version))
    pyfunc = mlflow.pyfunc.load_model(f"models:/{name}/{mv.version}")
    inner: SASRecPyfunc = pyfunc.unwrap_python_model()
    return LoadedModel(model=inner.model, vocab=inner.vocab, version=str(mv.version), run_id=mv.run_id,
                       extra=dict(inner.extra), name=name, tags=dict(mv.tags))

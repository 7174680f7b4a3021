"""The pyfunc model store: log a checkpoint as a registered model, load a version by number or alias.

Why a pyfunc and not ``mlflow.pytorch``: MLflow 3 saves PyTorch models with torch.export by default,
which freezes the sequence length and breaks ``.eval()`` (docs/architecture.md, "stack pitfalls").
So a model version is a pyfunc whose only artifact is our own checkpoint (``models.checkpoint``:
model class + config + state_dict + vocabulary); loading rebuilds the original module of whatever
registered model class it records (``models.factory``) on CPU, and ``unwrap_python_model()`` hands
back that module and its vocabulary. Nothing here names a model class.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
import torch
from mlflow.tracking import MlflowClient

from registry.aliases import get_alias_version

logger = logging.getLogger(__name__)

CHECKPOINT_ARTIFACT = "checkpoint"
MODEL_ARTIFACT_NAME = "model"


def pip_requirements() -> list[str]:
    """Explicit pip requirements of a logged model (inference takes ~20 s and adds noise)."""
    import importlib.metadata as md

    reqs = [f"torch=={torch.__version__.split('+')[0]}", f"mlflow=={mlflow.__version__}"]
    for dist in ("numpy", "pandas", "cloudpickle"):
        reqs.append(f"{dist}=={md.version(dist)}")
    return reqs


class CheckpointPyfunc(mlflow.pyfunc.PythonModel):
    """A registered recloop model: our checkpoint, rebuilt as the original torch module on load.

    Model-agnostic: the checkpoint records its model class (``models.factory``). ``predict`` takes a
    DataFrame with a ``history`` column (list of item_id strings, oldest first) and returns, per
    row, the top-``k`` item ids and scores (``params={"k": 10}``), seen items excluded, through the
    one ranking path (``models.ranking.recommend``). ``unwrap_python_model()`` exposes ``model``
    (eval mode, CPU), ``vocab`` (``models.vocab.ItemVocabulary``) and ``extra`` (the checkpoint's
    metadata dict).
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
        """Top-k item ids per history (column ``history``: list[str]) -> ``item_ids``, ``scores``.

        Raises:
            ValueError: no ``history`` column, or k < 1.
        """
        from models.ranking import recommend

        if "history" not in model_input.columns:
            raise ValueError(f"model_input needs a 'history' column; got {list(model_input.columns)}")
        k = int((params or {}).get("k", 10))
        histories = [list(h) if h is not None else [] for h in model_input["history"]]
        ranked = recommend(self.model, self.vocab, histories, k)
        return pd.DataFrame({"item_ids": [[i for i, _ in row] for row in ranked],
                             "scores": [[s for _, s in row] for row in ranked]})


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
        python_model=CheckpointPyfunc(),
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
    inner: CheckpointPyfunc = pyfunc.unwrap_python_model()
    return LoadedModel(model=inner.model, vocab=inner.vocab, version=str(mv.version), run_id=mv.run_id,
                       extra=dict(inner.extra), name=name, tags=dict(mv.tags))

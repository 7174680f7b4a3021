"""The registry of sequential model classes by name: a new model is one file and one line here.

The trainer, the checkpoint, the train flow, evaluation and the MLflow pyfunc look models up here
and use only the contract of ``models.contract``; nothing else names a model class.
"""

from __future__ import annotations

from dataclasses import fields
from typing import Any

from models.contract import ItemSequenceModel
from models.gru4rec import GRU4Rec
from models.sasrec import SASRec

#: name -> class; the name is what ``recloop train --model`` takes and what a checkpoint records.
MODELS: dict[str, type[ItemSequenceModel]] = {
    SASRec.name: SASRec,
    GRU4Rec.name: GRU4Rec,
}

#: A checkpoint without a class name was written before the contract existed: it is SASRec.
LEGACY_MODEL = SASRec.name


def model_class(name: str) -> type[ItemSequenceModel]:
    """The class registered under ``name``.

    Raises:
        ValueError: unknown name (lists the registered ones).
    """
    try:
        return MODELS[name]
    except KeyError:
        raise ValueError(f"model={name!r}; expected one of {sorted(MODELS)}") from None


def config_fields(name: str) -> list[str]:
    """The config field names of model ``name`` (e.g. to filter CLI or flow parameters)."""
    return [f.name for f in fields(model_class(name).config_class)]


def build_config(name: str, **params: Any) -> Any:
    """The frozen config of model ``name`` from plain values (``n_items`` and ``max_seq_len`` required).

    Raises:
        ValueError: unknown model or a parameter the model does not take (names both).
    """
    allowed = config_fields(name)
    unknown = sorted(set(params) - set(allowed))
    if unknown:
        raise ValueError(f"model={name!r} takes no parameter(s) {unknown}; expected a subset of {allowed}")
    return model_class(name).config_class(**params)


def build_model(config: Any) -> ItemSequenceModel:
    """A fresh model for ``config`` (the class is found from the config's type).

    Raises:
        TypeError: no registered model uses this config type.
    """
    for cls in MODELS.values():
        if type(config) is cls.config_class:
            return cls(config)
    raise TypeError(f"no registered model takes a {type(config).__name__}; registered: {sorted(MODELS)}")

"""Checkpoints (model class + config + weights + vocabulary) and warm starts, for any registered model."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from models.contract import ItemSequenceModel
from models.factory import LEGACY_MODEL, model_class
from models.vocab import PAD_IDX, ItemVocabulary

FORMAT_VERSION = 2  # 2: records "model_class"; a payload without it is SASRec (format 1)


def checkpoint_dict(
    model: ItemSequenceModel, vocab: ItemVocabulary, extra: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The checkpoint payload: ``{"format_version", "model_class", "config", "state_dict", "vocab",
    "item_vocab_version", "extra"}``; tensors are moved to CPU.

    Raises:
        ValueError: the model's n_items differs from the vocabulary size.
    """
    if model.config.n_items != len(vocab):
        raise ValueError(f"model n_items={model.config.n_items} but len(vocab)={len(vocab)}")
    return {
        "format_version": FORMAT_VERSION,
        "model_class": model.name,
        "config": asdict(model.config),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "vocab": vocab.to_dict(),
        "item_vocab_version": vocab.version,
        "extra": dict(extra or {}),
    }


def model_from_dict(
    payload: dict[str, Any], map_location: str | torch.device = "cpu"
) -> tuple[ItemSequenceModel, ItemVocabulary]:
    """Rebuild (model in eval mode, vocab) from a ``checkpoint_dict`` payload.

    The class comes from ``payload["model_class"]`` (``models.factory.MODELS``); a payload without
    it (format 1) is SASRec.

    Raises:
        KeyError: a required key is missing (names it).
        ValueError: the recorded class is not registered.
    """
    for key in ("config", "state_dict", "vocab"):
        if key not in payload:
            raise KeyError(f"checkpoint lacks {key!r}; has {sorted(payload)}")
    cls = model_class(str(payload.get("model_class") or LEGACY_MODEL))
    model = cls(cls.config_class(**payload["config"]))
    model.load_state_dict(payload["state_dict"])
    return model.to(map_location).eval(), ItemVocabulary.from_dict(payload["vocab"])


def save_checkpoint(
    path: str | Path, model: ItemSequenceModel, vocab: ItemVocabulary, extra: dict[str, Any] | None = None
) -> Path:
    """Write the checkpoint to ``path`` (torch.save; ``extra`` must hold plain Python values)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(checkpoint_dict(model, vocab, extra), path)
    return path


def load_checkpoint(
    path: str | Path, map_location: str | torch.device = "cpu"
) -> tuple[ItemSequenceModel, ItemVocabulary, dict[str, Any]]:
    """Load ``(model, vocab, extra)``; works on a CPU-only host (``weights_only`` unpickling).

    Raises:
        FileNotFoundError: ``path`` does not exist.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    payload = torch.load(path, map_location=map_location, weights_only=True)
    model, vocab = model_from_dict(payload, map_location)
    return model, vocab, payload.get("extra", {})


def warm_start_state(
    init_state: dict[str, Any], model: ItemSequenceModel, vocab: ItemVocabulary
) -> dict[str, torch.Tensor]:
    """A state dict for ``model`` (built for ``vocab``) initialised from an older checkpoint payload.

    Item embedding rows are copied by item id (so new items keep their fresh initialisation and
    dropped items are ignored); position rows are copied right-aligned (the most recent position
    matches); every other tensor with the same shape is copied. A checkpoint of another model
    class shares only what matches by name and shape.

    Raises:
        KeyError: ``init_state`` lacks "state_dict" or "vocab".
    """
    if "state_dict" not in init_state or "vocab" not in init_state:
        raise KeyError(
            f"warm start needs a checkpoint dict with 'state_dict' and 'vocab'; got {sorted(init_state)}"
        )
    old_vocab = ItemVocabulary.from_dict(init_state["vocab"])
    old = init_state["state_dict"]
    new = {k: v.detach().clone() for k, v in model.state_dict().items()}
    for name, tensor in old.items():
        if name == "item_emb.weight":
            new_idx = vocab.encode(old_vocab.ids, unknown="pad")  # (old n_items,) 0 where dropped
            keep = new_idx != PAD_IDX
            rows = torch.from_numpy(np.flatnonzero(keep) + 1)
            new[name][torch.from_numpy(new_idx[keep])] = tensor.to(new[name].dtype)[rows]
        elif name == "pos_emb.weight":
            n = min(len(tensor), len(new[name]))
            new[name][-n:] = tensor[-n:].to(new[name].dtype)
        elif name in new and new[name].shape == tensor.shape:
            new[name] = tensor.to(new[name].dtype).clone()
    return new

"""Checkpoints (model class + config + weights + vocabulary) and warm starts, for any registered model."""

from __future__ import annotations

import os
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
    class shares only what matches by name and shape. When both models learn a shared cold ID vector
    (``cold_id_emb``, config ``cold_id``), the new items' ID rows start at it: the vector they were served
    with before this retrain (``models.text_items.cold_vectors``), so their scores continue from there.

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
        if name in new:
            remapped = remap_tensor(name, tensor, new[name], old_vocab, vocab)
            if remapped is not None:
                new[name] = remapped
    if "cold_id_emb" in old and "cold_id_emb" in new and "item_emb.weight" in new:
        known = set(old_vocab.ids)
        rows = torch.tensor([k for k, item in enumerate(vocab.ids, start=1) if item not in known], dtype=torch.long)
        new["item_emb.weight"][rows] = old["cold_id_emb"].to(new["item_emb.weight"].dtype)  # the new items' rows
    return new


def remap_tensor(
    name: str, old: torch.Tensor, template: torch.Tensor, old_vocab: ItemVocabulary, vocab: ItemVocabulary
) -> torch.Tensor | None:
    """The warm-start rule for one tensor named ``name`` (a weight, or an optimiser moment of that weight).

    ``item_emb.weight``: rows copied by item id into a copy of ``template`` (new items keep the
    template's rows, dropped items are ignored); ``pos_emb.weight``: rows copied right-aligned; any other
    tensor: copied when the shape matches. Returns None when nothing can be copied.
    """
    out = template.detach().clone()
    if name == "item_emb.weight":
        new_idx = vocab.encode(old_vocab.ids, unknown="pad")  # (old n_items,) 0 where dropped
        keep = new_idx != PAD_IDX
        rows = torch.from_numpy(np.flatnonzero(keep) + 1)
        out[torch.from_numpy(new_idx[keep])] = old.to(out.dtype)[rows]
        return out
    if name == "pos_emb.weight":
        n = min(len(old), len(out))
        out[-n:] = old[-n:].to(out.dtype)
        return out
    if out.shape == old.shape:
        return old.to(out.dtype).clone()
    return None


def named_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, dict[str, Any]]:
    """The optimiser's per-parameter state keyed by parameter name (CPU copies), e.g. AdamW's
    ``{"item_emb.weight": {"step": 120.0, "exp_avg": (n_items + 1, d), "exp_avg_sq": (n_items + 1, d)}}``.

    Keyed by name rather than by position so it survives a vocabulary change (``remap_optimizer_state``).
    """
    out: dict[str, dict[str, Any]] = {}
    for name, param in model.named_parameters():
        state = optimizer.state.get(param)
        if state:
            out[name] = {k: (v.detach().cpu().clone() if isinstance(v, torch.Tensor) else v) for k, v in state.items()}
    return out


def load_named_optimizer_state(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, named: dict[str, dict[str, Any]]
) -> list[str]:
    """Put ``named`` (``named_optimizer_state``) into ``optimizer`` for ``model``'s parameters.

    A parameter whose recorded moments do not match its shape keeps a fresh state (AdamW starts it
    at the first step). ``step`` goes where the optimiser keeps it (the parameter's device for fused).

    Returns:
        The parameter names that received a state.
    """
    on_device_step = bool(optimizer.defaults.get("fused") or optimizer.defaults.get("capturable"))
    loaded = []
    for name, param in model.named_parameters():
        state = named.get(name)
        if not state or any(isinstance(v, torch.Tensor) and v.dim() and v.shape != param.shape
                            for v in state.values()):
            continue
        placed: dict[str, Any] = {}
        for key, value in state.items():
            if not isinstance(value, torch.Tensor):
                placed[key] = value
            elif value.dim() == 0:  # "step": on CPU unless the optimiser is fused or capturable
                placed[key] = value.to(param.device if on_device_step else "cpu", torch.float32, copy=True)
            else:
                placed[key] = value.to(param.device, param.dtype, copy=True)  # never shares the caller's tensor
        optimizer.state[param] = placed
        loaded.append(name)
    return loaded


def remap_optimizer_state(
    named: dict[str, dict[str, Any]], old_vocab: ItemVocabulary, model: torch.nn.Module, vocab: ItemVocabulary
) -> dict[str, dict[str, Any]]:
    """Carry an optimiser state (``named_optimizer_state``) over to ``model`` built for a new ``vocab``.

    Each moment tensor follows its weight's rule (``remap_tensor``): item-embedding rows move by item id,
    position rows right-aligned, other tensors when the shape matches. Rows of items new in ``vocab`` get
    ``exp_avg`` 0 and ``exp_avg_sq`` equal to the mean of the known rows' (zero second moments under the
    inherited step count would give new rows several times larger first updates than known rows). The
    step count is kept (no new bias-correction warm-up). The learning-rate schedule is not carried: a
    warm start runs its own warm-up and decay.
    """
    params = dict(model.named_parameters())
    out: dict[str, dict[str, Any]] = {}
    for name, state in named.items():
        if name not in params:
            continue
        template = torch.zeros_like(params[name], device="cpu")
        new_state: dict[str, Any] = {}
        for key, value in state.items():
            if not isinstance(value, torch.Tensor) or value.dim() == 0:
                new_state[key] = value
                continue
            fill = template
            if name == "item_emb.weight" and key == "exp_avg_sq" and len(value) > 1:
                fill = template + value[1:].mean(dim=0, keepdim=True).to(template.dtype)
                fill[PAD_IDX] = 0.0
            remapped = remap_tensor(name, value, fill, old_vocab, vocab)
            if remapped is None:
                new_state = {}
                break
            new_state[key] = remapped
        if new_state:
            out[name] = new_state
    return out


def save_train_state(path: str | Path, payload: dict[str, Any]) -> Path:
    """Atomically write a training-state payload (optimiser, scheduler, epoch, ...; tensors and plain
    values only) to ``path``: written beside it first, then renamed, so a kill leaves the old file whole."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)
    return path


def load_train_state(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any] | None:
    """The payload ``save_train_state`` wrote, or None when ``path`` does not exist."""
    path = Path(path)
    if not path.exists():
        return None
    return torch.load(path, map_location=map_location, weights_only=True)

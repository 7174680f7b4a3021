"""The model contract: what the trainer, the checkpoint, evaluation, the pyfunc and serving rely on.

Every sequential model is one file that subclasses ``ItemSequenceModel`` (an ``nn.Module`` with a
tied output layer), declares a frozen config dataclass with at least ``n_items`` and ``max_seq_len``
(required: its one default is ``recloop.settings.Settings.max_seq_len``, passed in as a plain value,
since models/ never imports the kernel), implements ``encode(item_idx) -> (batch, seq_len, d_model)``,
and registers itself in ``models/factory.py``. Everything else (losses, scoring, item embeddings) is
shared here, so a new model needs no edit of the trainer, the checkpoint, the train flow or the pyfunc.

Conventions (stated once, tested in tests/unit): item_idx 0 is padding; sequences are left-padded
with the most recent item last; score column 0 is ``-inf``; the item embedding row 0 is zero.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, ClassVar, Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from models.losses import full_softmax_ce, sampled_softmax_ce
from models.vocab import PAD_IDX


@dataclass(frozen=True)
class Batch:
    """One training batch of next-item windows.

    Attributes:
        inputs: (batch, seq_len) int64 left-padded item_idx.
        targets: (batch, seq_len) int64 next item at each position; 0 = ignore.
        n_negatives: None for the full-softmax cross-entropy over the catalogue, else the number of
            uniform negatives of the sampled softmax.
        generator: CPU generator for the negatives (determinism).
    """

    inputs: Tensor
    targets: Tensor
    n_negatives: int | None = None
    generator: torch.Generator | None = None


@runtime_checkable
class Scorer(Protocol):
    """Anything that ranks items after a history: every model and every baseline."""

    def score(self, item_idx: Tensor, candidate_idx: Tensor | None = None) -> Tensor: ...


@runtime_checkable
class SequentialModel(Scorer, Protocol):
    """The contract of a trainable sequential model (see the module docstring)."""

    name: ClassVar[str]
    config: Any  # frozen dataclass with n_items and max_seq_len, saved in the checkpoint

    def loss(self, batch: Batch) -> Tensor: ...

    def item_embeddings(self) -> Tensor: ...


def check_config(n_items: int, max_seq_len: int, dropout: float = 0.0) -> None:
    """The checks every model config shares.

    Raises:
        ValueError: n_items < 1, max_seq_len < 1 or dropout outside [0, 1).
    """
    if n_items < 1:
        raise ValueError(f"n_items={n_items}; expected >= 1")
    if max_seq_len < 1:
        raise ValueError(f"max_seq_len={max_seq_len}; expected >= 1")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout={dropout}; expected in [0, 1)")


def select_candidates(scores: Tensor, candidate_idx: Tensor | None) -> Tensor:
    """Gather (batch, n_candidates) from (batch, n_items + 1) scores; None returns all columns."""
    if candidate_idx is None:
        return scores
    cand = torch.as_tensor(candidate_idx, dtype=torch.long, device=scores.device)
    if cand.dim() == 1:
        cand = cand.unsqueeze(0).expand(scores.shape[0], -1)  # (batch, n_candidates)
    return scores.gather(1, cand)


class ItemSequenceModel(nn.Module):
    """Base of every sequential model: an item embedding table tied to the output layer.

    Subclasses set ``name`` and ``config_class``, build ``self.item_emb``
    (``nn.Embedding(n_items + 1, d_model, padding_idx=0)``) and implement ``encode``.
    """

    name: ClassVar[str] = ""
    config_class: ClassVar[type] = object
    #: ``models.trainer.TrainConfig`` values this model was tuned with (on validation), e.g. its lr;
    #: the train flow and the benchmarks apply them under the caller's own values.
    train_defaults: ClassVar[dict[str, Any]] = {}
    item_emb: nn.Embedding

    def __init__(self, config: Any) -> None:
        super().__init__()
        if not isinstance(config, self.config_class):
            raise TypeError(f"{type(self).__name__} needs a {self.config_class.__name__}; got {type(config).__name__}")
        self.config = config

    def check_input(self, item_idx: Tensor) -> tuple[int, int]:
        """The shape checks every ``encode`` starts with; returns ``(batch, seq_len)``.

        Raises:
            ValueError: ``item_idx`` is not 2-D or seq_len > config.max_seq_len.
        """
        if item_idx.dim() != 2:
            raise ValueError(f"item_idx must be (batch, seq_len); got shape {tuple(item_idx.shape)}")
        batch, seq_len = item_idx.shape
        if seq_len > self.config.max_seq_len:
            raise ValueError(f"seq_len={seq_len} exceeds max_seq_len={self.config.max_seq_len}")
        return batch, seq_len

    def encode(self, item_idx: Tensor) -> Tensor:
        """(batch, seq_len) int64 left-padded histories -> (batch, seq_len, d_model) hidden states."""
        raise NotImplementedError  # pragma: no cover - abstract

    def forward(self, item_idx: Tensor) -> Tensor:
        """Same as ``encode`` (so ``model(item_idx)`` works)."""
        return self.encode(item_idx)

    def item_embeddings(self) -> Tensor:
        """(n_items + 1, d_model) item vectors the output layer scores with; row 0 is padding."""
        return self.item_emb.weight

    def logits(self, hidden: Tensor) -> Tensor:
        """Tied output layer: (..., d_model) -> (..., n_items + 1); column 0 (padding) is -inf."""
        out = hidden @ self.item_embeddings().T  # (..., n_items + 1)
        out[..., PAD_IDX] = float("-inf")
        return out

    def loss(self, batch: Batch) -> Tensor:
        """Next-item cross-entropy at every non-padding target position, shape ().

        Full softmax over the catalogue (Klenitskiy & Vasilev, RecSys 2023) when
        ``batch.n_negatives`` is None, else the sampled softmax of ``models.losses``.
        """
        hidden = self.encode(batch.inputs)  # (batch, seq_len, d_model)
        weight = self.item_embeddings()  # (n_items + 1, d_model)
        if batch.n_negatives is None:
            return full_softmax_ce(hidden, batch.targets, weight)
        return sampled_softmax_ce(hidden, batch.targets, weight, batch.n_negatives, batch.generator)

    @torch.inference_mode()
    def score(self, item_idx: Tensor, candidate_idx: Tensor | None = None) -> Tensor:
        """Next-item scores after each history.

        Args:
            item_idx: (batch, seq_len) int64 left-padded histories; only the last max_seq_len are used.
            candidate_idx: optional (n_candidates,) or (batch, n_candidates) item_idx to score.
        Returns:
            (batch, n_items + 1) float32 scores with column 0 = -inf, or (batch, n_candidates).
        """
        device = self.item_embeddings().device
        item_idx = torch.as_tensor(item_idx, dtype=torch.long, device=device)
        item_idx = item_idx[:, -self.config.max_seq_len :]
        last = self.encode(item_idx)[:, -1, :]  # (batch, d_model)
        scores = self.logits(last).float()  # (batch, n_items + 1)
        return select_candidates(scores, candidate_idx)

    def config_dict(self) -> dict[str, Any]:
        """The config as plain values (what the checkpoint stores)."""
        return asdict(self.config)

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
import torch.nn.functional as F
from torch import Tensor, nn

from models.losses import full_softmax_ce, in_batch_sampled_ce, sampled_softmax_ce
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
        item_prob: optional (n_items + 1,) training target frequency; with ``n_negatives`` set, the loss
            is the in-batch + uniform sampled softmax with the logQ correction (``models.losses``).
        n_in_batch: with ``item_prob``, how many of the batch's targets serve as negatives (None: all).
    """

    inputs: Tensor
    targets: Tensor
    n_negatives: int | None = None
    generator: torch.Generator | None = None
    item_prob: Tensor | None = None
    n_in_batch: int | None = None


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


#: How an item's vector is made (``item_repr`` of a model config): its ID embedding only; the ID embedding plus
#: a learned linear projection of its frozen text embedding; or the projection alone (no ID embedding in the
#: vectors; UniSRec, Hou et al. KDD 2022, and Recformer, Li et al. KDD 2023, use text without IDs).
ITEM_REPRS: tuple[str, ...] = ("id", "id+text", "text")
#: Initial gain of the LayerNorm on the projected text (``text_norm``): the ID embeddings' init scale (trunc-normal
#: std 0.02), so the text part starts as large as the ID part instead of dominating it (LayerNorm output has unit
#: variance). The gain is learned: the text part's scale relative to the ID part.
TEXT_NORM_INIT = 0.02


def check_item_repr(item_repr: str, d_text: int, text_dropout: float = 0.0, id_dropout: float = 0.0,
                    text_norm: bool = False, cold_id: bool = False, id_expectation: bool = False) -> None:
    """The checks of the text-aware item fields every model config shares.

    Raises:
        ValueError: unknown ``item_repr`` (lists them), ``d_text`` < 1 with text (or != 0 without), a dropout
            outside [0, 1), ``text_norm`` without text, ``cold_id`` or ``id_expectation`` without "id+text" and
            ``id_dropout`` > 0 (the vector is learned only from the items whose ID is dropped; without dropout the
            expectation is the ID itself).
    """
    if item_repr not in ITEM_REPRS:
        raise ValueError(f"item_repr={item_repr!r}; expected one of {list(ITEM_REPRS)}")
    if item_repr != "id" and d_text < 1:
        raise ValueError(f"item_repr={item_repr!r} needs d_text >= 1 (the text embedding width); got {d_text}")
    if item_repr == "id" and d_text != 0:
        raise ValueError(f"item_repr='id' takes no text; got d_text={d_text} (expected 0)")
    if item_repr == "id" and text_norm:
        raise ValueError("text_norm=True needs a text-aware item_repr ('id+text' or 'text'); got 'id'")
    for name, value in (("text_dropout", text_dropout), ("id_dropout", id_dropout)):
        if not 0.0 <= value < 1.0:
            raise ValueError(f"{name}={value}; expected in [0, 1)")
    if cold_id and (item_repr != "id+text" or id_dropout <= 0):
        raise ValueError(f"cold_id=True needs item_repr='id+text' and id_dropout > 0 (it is learned from the items "
                         f"whose ID is dropped); got item_repr={item_repr!r}, id_dropout={id_dropout}")
    if id_expectation and (item_repr != "id+text" or id_dropout <= 0):
        raise ValueError(f"id_expectation=True needs item_repr='id+text' and id_dropout > 0 (the expectation is over "
                         f"the ID dropout); got item_repr={item_repr!r}, id_dropout={id_dropout}")


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
    (``nn.Embedding(n_items + 1, d_model, padding_idx=0)``) and implement ``encode(item_idx, item_table=None)``,
    embedding their input with ``self.embed_items(item_idx, item_table)``.

    Text-aware items (config ``item_repr`` "id+text" or "text", ``d_text`` > 0): the model holds the frozen text
    embeddings of its items as a buffer ``item_text`` ((n_items + 1, d_text), row 0 zero; saved in the
    checkpoint, set with ``set_item_text``) and a learned ``text_proj`` (Linear d_text -> d_model, no bias, so
    the padding row stays zero). An item's vector is ``item_emb + text_proj(item_text)`` ("id+text") or
    ``text_proj(item_text)`` ("text"), used for the input and, tied, for the output layer, and trained by the
    same ``loss``. With ``text_norm`` the projected text goes through a LayerNorm (no bias) whose learned gain
    starts at ``TEXT_NORM_INIT``: a learned scale of the text part against the ID part, started small.
    ``text_dropout`` drops text features in training; ``id_dropout`` zeroes the ID part of a
    random share of items per step (DropoutNet, Volkovs et al., NeurIPS 2017), so that the text part alone
    scores well: what an item without an ID embedding (a new one) gets at serving time
    (``models.text_items``). With ``cold_id`` the dropped ID part is not zero but one learned vector
    ``cold_id_emb`` (d_model,) shared by every item without its own ID embedding (DropoutNet's "mean" input for a
    missing preference vector, learned): in training the dropped items, in serving the new items
    (``cold_item_vectors``) and the vocabulary's items no training sequence held (``adopt_cold_id``, at the end of
    training). A zero ID part scores a new item as if it had no popularity at all, so full ranking
    puts it below every warm item; the shared vector gives it what a typical item of the training targets has.
    With ``id_expectation`` an item's ID part outside training is its expected value under the ID dropout,
    ``(1 - id_dropout) * item_emb + id_dropout * cold`` (``cold`` = ``cold_id_emb``, or zero without ``cold_id``):
    the weight-scaling inference rule of dropout (Srivastava et al., JMLR 2014), exact for the tied output layer
    (a logit is linear in the item vector). With the full ID part a warm item is scored as in the steps that kept
    its ID only, against new items scored as dropped ones: that over-weights the ID part and pushes new items out
    of full ranking (``bench/text_quality.py`` measures both).
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
        self.text_proj: nn.Linear | None = None
        if getattr(config, "item_repr", "id") != "id":
            self.register_buffer("item_text", torch.zeros(config.n_items + 1, config.d_text))
            self.text_proj = nn.Linear(config.d_text, config.d_model, bias=False)
            nn.init.trunc_normal_(self.text_proj.weight, std=0.02)
            self.text_drop = nn.Dropout(getattr(config, "text_dropout", 0.0))
            self.text_norm: nn.LayerNorm | None = None
            if getattr(config, "text_norm", False):
                self.text_norm = nn.LayerNorm(config.d_model, bias=False)  # no bias: a zero (padding) row stays zero
                nn.init.constant_(self.text_norm.weight, TEXT_NORM_INIT)
            self.cold_id_emb: nn.Parameter | None = None
            if getattr(config, "cold_id", False):
                self.cold_id_emb = nn.Parameter(torch.zeros(config.d_model))  # zero: starts as DropoutNet's zero input

    @property
    def uses_text(self) -> bool:
        """True when item vectors include the projected text embedding (``item_repr`` "id+text" or "text")."""
        return self.text_proj is not None

    def set_item_text(self, item_text: Tensor | Any) -> None:
        """Copy the items' frozen text embeddings into the ``item_text`` buffer.

        Args:
            item_text: (n_items + 1, d_text) float array or tensor, row k = item_idx k (row 0, padding, is zeroed;
                an item without text may have a zero row).
        Raises:
            ValueError: the model takes no text, or the shape is not (n_items + 1, d_text).
        """
        if not self.uses_text:
            raise ValueError(f"{type(self).__name__} with item_repr='id' takes no item text")
        text = torch.as_tensor(item_text, dtype=torch.float32)
        if tuple(text.shape) != tuple(self.item_text.shape):
            raise ValueError(f"item_text shape {tuple(text.shape)}; expected {tuple(self.item_text.shape)}")
        with torch.no_grad():
            self.item_text.copy_(text.to(self.item_text.device))
            self.item_text[PAD_IDX].zero_()

    def project_text(self, text: Tensor) -> Tensor:
        """``text_proj`` of text embeddings (then ``text_norm`` when set): (..., d_text) -> (..., d_model); a zero
        row stays zero.

        Raises:
            ValueError: the model takes no text.
        """
        if self.text_proj is None:
            raise ValueError(f"{type(self).__name__} with item_repr='id' takes no item text")
        out = self.text_proj(text.to(self.text_proj.weight.dtype))
        return out if self.text_norm is None else self.text_norm(out)

    @torch.no_grad()
    def adopt_cold_id(self, item_idx: Tensor) -> None:
        """Set the ID rows of ``item_idx`` ((n,) int64: items the training data never showed, e.g. catalogue items
        without an event) to ``cold_id_emb``: unseen in training their rows were only pushed down as negatives, and
        they are served like new items (text plus the shared cold vector). No-op without ``cold_id``."""
        cold = getattr(self, "cold_id_emb", None)
        idx = torch.as_tensor(item_idx, dtype=torch.long, device=self.item_emb.weight.device)
        if cold is not None and idx.numel():
            self.item_emb.weight[idx[idx != PAD_IDX]] = cold.to(self.item_emb.weight.dtype)

    def cold_item_vectors(self, text: Tensor) -> Tensor:
        """Vectors of items without an ID embedding (new items): ``project_text(text)`` plus ``cold_id_emb`` when
        the model has one (``cold_id``); (n, d_text) -> (n, d_model).

        Raises:
            ValueError: the model takes no text.
        """
        out = self.project_text(text)
        cold = getattr(self, "cold_id_emb", None)
        return out if cold is None else out + cold.to(out.dtype)

    def embed_items(self, item_idx: Tensor, item_table: Tensor | None = None) -> Tensor:
        """Input vectors of ``item_idx`` (any shape) -> (..., d_model): rows of ``item_table`` when given (it may
        hold more rows than the catalogue: serving appends new items), else of ``item_embeddings()``."""
        if item_table is None:
            if self.text_proj is None:
                return self.item_emb(item_idx)
            item_table = self.item_embeddings()
        return F.embedding(item_idx, item_table, padding_idx=PAD_IDX)

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

    def encode(self, item_idx: Tensor, item_table: Tensor | None = None) -> Tensor:
        """(batch, seq_len) int64 left-padded histories -> (batch, seq_len, d_model) hidden states (input vectors
        from ``embed_items(item_idx, item_table)``)."""
        raise NotImplementedError  # pragma: no cover - abstract

    def forward(self, item_idx: Tensor) -> Tensor:
        """Same as ``encode`` (so ``model(item_idx)`` works)."""
        return self.encode(item_idx)

    def item_embeddings(self) -> Tensor:
        """(n_items + 1, d_model) item vectors the output layer scores with; row 0 is padding.

        ID-only: the ID embedding table. Text-aware: ``item_emb + text_proj(item_text)`` or, for "text",
        ``text_proj(item_text)`` (see the class docstring; in training with dropout on the text path and on IDs;
        outside training with ``id_expectation`` the ID part's expected value under that dropout).
        """
        if self.text_proj is None:
            return self.item_emb.weight
        text = self.project_text(self.text_drop(self.item_text))  # (n_items + 1, d_model), row 0 zero
        if self.config.item_repr == "text":
            return text
        ids = self.item_emb.weight  # (n_items + 1, d_model)
        p = float(getattr(self.config, "id_dropout", 0.0))
        if not self.training and p > 0 and getattr(self.config, "id_expectation", False):
            cold = getattr(self, "cold_id_emb", None)
            expected = (1.0 - p) * ids if cold is None else (1.0 - p) * ids + p * cold.unsqueeze(0)
            ids = torch.cat([ids[:1], expected[1:]], dim=0)  # the padding row stays zero
        elif self.training and p > 0:
            keep = torch.rand(ids.shape[0], 1, device=ids.device) >= p  # (n_items + 1, 1) items keeping their ID
            cold = getattr(self, "cold_id_emb", None)
            if cold is None:
                ids = ids * keep
            else:
                keep[PAD_IDX] = True  # the padding row stays zero
                ids = torch.where(keep, ids, cold.unsqueeze(0))
        return ids + text

    def logits(self, hidden: Tensor, item_table: Tensor | None = None) -> Tensor:
        """Tied output layer: (..., d_model) -> (..., n_rows); column 0 (padding) is -inf.

        ``item_table``: the (n_rows, d_model) item vectors to score (default ``item_embeddings()``, n_rows =
        n_items + 1; serving passes a frozen table with new items appended).
        """
        table = self.item_embeddings() if item_table is None else item_table
        out = hidden @ table.T  # (..., n_rows)
        out[..., PAD_IDX] = float("-inf")
        return out

    def loss(self, batch: Batch) -> Tensor:
        """Next-item cross-entropy at every non-padding target position, shape ().

        Full softmax over the catalogue (Klenitskiy & Vasilev, RecSys 2023) when
        ``batch.n_negatives`` is None, else the sampled softmax of ``models.losses``. A text-aware model builds
        its item vectors once per batch, for its input and its tied output layer.
        """
        if self.text_proj is None:
            hidden = self.encode(batch.inputs)  # (batch, seq_len, d_model)
            weight = self.item_embeddings()  # (n_items + 1, d_model)
        else:
            weight = self.item_embeddings()  # (n_items + 1, d_model), one ID-dropout draw for the batch
            hidden = self.encode(batch.inputs, item_table=weight)  # (batch, seq_len, d_model)
        if batch.n_negatives is None:
            return full_softmax_ce(hidden, batch.targets, weight)
        if batch.item_prob is not None:
            return in_batch_sampled_ce(hidden, batch.targets, weight, batch.n_negatives, batch.item_prob,
                                       batch.generator, batch.n_in_batch)
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
        return self.score_with_table(item_idx, None, candidate_idx)

    @torch.inference_mode()
    def score_with_table(self, item_idx: Tensor, item_table: Tensor | None,
                         candidate_idx: Tensor | None = None) -> Tensor:
        """``score`` against given item vectors (serving's frozen table, new items appended; ``models.text_items``).

        Args:
            item_idx: (batch, seq_len) int64 left-padded histories; indices may reach ``n_rows - 1``.
            item_table: (n_rows, d_model) item vectors, or None for ``item_embeddings()`` (``score``).
            candidate_idx: optional (n_candidates,) or (batch, n_candidates) item_idx to score.
        Returns:
            (batch, n_rows) float32 scores with column 0 = -inf, or (batch, n_candidates).
        """
        device = self.item_emb.weight.device
        item_idx = torch.as_tensor(item_idx, dtype=torch.long, device=device)
        item_idx = item_idx[:, -self.config.max_seq_len :]
        if item_table is None and self.text_proj is not None:
            item_table = self.item_embeddings()  # once for the input and the output layer
        if item_table is None:
            last = self.encode(item_idx)[:, -1, :]  # (batch, d_model)
        else:
            last = self.encode(item_idx, item_table=item_table)[:, -1, :]  # (batch, d_model)
        scores = self.logits(last, item_table).float()  # (batch, n_rows)
        return select_candidates(scores, candidate_idx)

    def config_dict(self) -> dict[str, Any]:
        """The config as plain values (what the checkpoint stores)."""
        return asdict(self.config)

"""GRU4Rec: a recurrent (GRU) next-item model over user sequences, output tied to the item embeddings.

Follows Hidasi, Karatzoglou, Baltrunas & Tikk, "Session-based Recommendations with Recurrent Neural
Networks", ICLR 2016: item embedding -> stacked GRU -> scores over the whole catalogue after each
item. Deviations:

* Trained like every model of the contract (``ItemSequenceModel.loss``): left-padded next-item
  windows of user sequences with the full-softmax cross-entropy at every position, not the paper's
  session-parallel mini-batches with BPR / TOP1 losses over in-batch negatives. Hidasi & Czapp,
  "The Effect of Third Party Implementations on Reproducibility", RecSys 2023, show that the
  cross-entropy loss is the best choice for GRU4Rec.
* The output layer is tied to the input item embeddings (the contract), so the GRU width equals
  the embedding width ``d_model``; the paper uses separate input/output weights (or one-hot input).
* Dropout on the embeddings and on the GRU outputs (and between GRU layers when ``n_layers > 1``).
* Left padding is skipped, not fed: the leading padding of each row is removed with
  ``pack_padded_sequence`` so the GRU starts from a zero state at the first real item. The
  hidden state, and so every score, does not depend on how much padding precedes a history.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from models.contract import ItemSequenceModel, check_config, check_item_repr
from models.vocab import PAD_IDX

#: Training knobs chosen with the config defaults on ML-100K validation NDCG@10 (``bench/tune_gru4rec.py``;
#: batch 64, patience 8, seed 42): d_model 64, 1 layer, dropout 0.5, lr 3e-3 gave 0.139 (dropout 0.1: 0.120,
#: 0.3: 0.125; d_model 128: 0.124 / 0.131; lr 1e-3: 0.110).
GRU4REC_TRAIN: dict[str, Any] = {"lr": 3e-3}


@dataclass(frozen=True)
class GRU4RecConfig:
    """The architecture, saved inside every checkpoint so every stage builds the same network.

    Attributes:
        n_items: catalogue size, padding excluded (embedding rows = n_items + 1).
        max_seq_len: most recent items the model sees (the platform passes ``settings.max_seq_len``).
        d_model: item embedding width = GRU hidden width (equal, since the output layer is tied to
            the item embeddings).
        n_layers: stacked GRU layers.
        dropout: dropout on the item embeddings, between GRU layers and on the GRU outputs.
        item_repr, d_text, text_dropout, id_dropout, text_norm, cold_id, id_expectation: text-aware items, as in
            ``models.sasrec.SASRecConfig``.
    """

    n_items: int
    max_seq_len: int
    d_model: int = 64
    n_layers: int = 1
    dropout: float = 0.5
    item_repr: str = "id"
    d_text: int = 0
    text_dropout: float = 0.0
    id_dropout: float = 0.0
    text_norm: bool = False
    cold_id: bool = False
    id_expectation: bool = False

    def __post_init__(self) -> None:
        check_config(self.n_items, self.max_seq_len, self.dropout)
        check_item_repr(self.item_repr, self.d_text, self.text_dropout, self.id_dropout, self.text_norm,
                        self.cold_id, self.id_expectation)
        if self.d_model < 1:
            raise ValueError(f"d_model={self.d_model}; expected >= 1")
        if self.n_layers < 1:
            raise ValueError(f"n_layers={self.n_layers}; expected >= 1")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class GRU4Rec(ItemSequenceModel):
    """Recurrent sequential recommender (see module docstring for the source and deviations)."""

    name = "gru4rec"
    config_class = GRU4RecConfig
    train_defaults = GRU4REC_TRAIN

    def __init__(self, config: GRU4RecConfig) -> None:
        super().__init__(config)
        self.item_emb = nn.Embedding(config.n_items + 1, config.d_model, padding_idx=PAD_IDX)
        self.emb_drop = nn.Dropout(config.dropout)
        self.gru = nn.GRU(
            config.d_model,
            config.d_model,
            num_layers=config.n_layers,
            batch_first=True,
            dropout=config.dropout if config.n_layers > 1 else 0.0,
        )
        self.out_drop = nn.Dropout(config.dropout)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Truncated-normal(0.02) item embeddings with a zero padding row; PyTorch's GRU default."""
        nn.init.trunc_normal_(self.item_emb.weight, std=0.02)
        with torch.no_grad():
            self.item_emb.weight[PAD_IDX].zero_()
        self.gru.reset_parameters()

    def encode(self, item_idx: Tensor, item_table: Tensor | None = None) -> Tensor:
        """Run the GRU over each history from its first real item.

        Args:
            item_idx: (batch, seq_len) int64, left-padded with 0, most recent item last.
            item_table: optional (n_rows, d_model) item vectors to embed the input with (``embed_items``).
        Returns:
            (batch, seq_len, d_model) hidden states; position t depends only on items <= t and not
            on the amount of leading padding; rows at leading-padding positions are zero.
        Raises:
            ValueError: seq_len > config.max_seq_len or item_idx is not 2-D.
        """
        batch, seq_len = self.check_input(item_idx)
        keep = item_idx != PAD_IDX  # (batch, seq_len)
        # A history starts at its first real item; everything before it is left padding.
        lengths = seq_len - torch.where(keep.any(1), keep.int().argmax(1), seq_len)  # (batch,)
        positions = torch.arange(seq_len, device=item_idx.device)  # (seq_len,)
        # Rotate each row left by its padding so the history starts at column 0 (right padding).
        to_right = (positions + (seq_len - lengths).unsqueeze(1)) % seq_len  # (batch, seq_len)
        h = self.emb_drop(self.embed_items(item_idx.gather(1, to_right), item_table))  # (batch, seq_len, d_model)
        # All-padding rows run one step over the zero padding embedding; their output is masked below.
        packed = pack_padded_sequence(h, lengths.clamp(min=1).cpu(), batch_first=True, enforce_sorted=False)
        out, _ = self.gru(packed)
        h, _ = pad_packed_sequence(out, batch_first=True, total_length=seq_len)  # (batch, seq_len, d_model)
        to_left = (positions - (seq_len - lengths).unsqueeze(1)) % seq_len  # (batch, seq_len)
        h = h.gather(1, to_left.unsqueeze(-1).expand(-1, -1, h.shape[-1]))  # (batch, seq_len, d_model)
        return self.out_drop(h) * (positions >= seq_len - lengths.unsqueeze(1)).unsqueeze(-1)

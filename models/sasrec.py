"""SASRec: a causal Transformer over item sequences, output tied to the item embeddings.

Follows Kang & McAuley, "Self-Attentive Sequential Recommendation", ICDM 2018, trained with the
full-softmax cross-entropy of Klenitskiy & Vasilev, "Turning Dross Into Gold Loss: is BERT4Rec
really better than SASRec?", RecSys 2023 ("SASRec+"). Deviations: pre-LayerNorm blocks with GELU and
nn.Linear feed-forward (equivalent to 1x1 Conv1d); no dropout on the attention weights (it
doubled CPU step time), only on the embeddings, the feed-forward hidden layer and the block outputs;
learned positions are anchored at
the most recent item (position ``max_seq_len - 1`` is always the last input), so any left-padded
length works.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.contract import ItemSequenceModel, check_config, check_item_repr
from models.vocab import PAD_IDX


@dataclass(frozen=True)
class SASRecConfig:
    """The architecture, saved inside every checkpoint so every stage builds the same network.

    Attributes:
        n_items: catalogue size, padding excluded (embedding rows = n_items + 1).
        max_seq_len: most recent items the model sees (the platform passes ``settings.max_seq_len``).
        d_model: embedding / hidden width. n_heads must divide it.
        n_heads, n_layers: attention heads per block and number of blocks.
        dropout: dropout on the embeddings, the feed-forward hidden layer and the block outputs
            (not on the attention weights, see the module docstring).
        ff_mult: feed-forward width = ff_mult * d_model.
        item_repr: "id" (ID embeddings), "id+text" or "text" (``models.contract.ITEM_REPRS``: the projected
            frozen text embedding of each item is added to, or replaces, its ID embedding).
        d_text: width of the text embeddings (384 for all-MiniLM-L6-v2); 0 with "id".
        text_dropout: dropout on the text embeddings in training (text-aware only).
        id_dropout: share of items whose ID part is zeroed per training step ("id+text" only; DropoutNet).
        text_norm: a LayerNorm with a learned gain (started at ``models.contract.TEXT_NORM_INIT``) on the
            projected text (text-aware only).
        cold_id: one learned ID vector for items without their own (dropped in training, new in serving) instead
            of a zero ID part ("id+text" with ``id_dropout`` > 0; ``models.contract.ItemSequenceModel``).
        id_expectation: outside training, an item's ID part is its expected value under ``id_dropout``
            (``models.contract.ItemSequenceModel.item_embeddings``; "id+text" with ``id_dropout`` > 0).
    """

    n_items: int
    max_seq_len: int
    d_model: int = 64
    n_heads: int = 1
    n_layers: int = 2
    dropout: float = 0.3
    ff_mult: int = 1
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
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class _Block(nn.Module):
    """Pre-LN Transformer block: masked multi-head self-attention then a feed-forward layer."""

    def __init__(self, cfg: SASRecConfig) -> None:
        super().__init__()
        self.n_heads, self.head_dim = cfg.n_heads, cfg.d_model // cfg.n_heads
        self.attn_norm = nn.LayerNorm(cfg.d_model)
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.out = nn.Linear(cfg.d_model, cfg.d_model)
        self.ff_norm = nn.LayerNorm(cfg.d_model)
        self.ff = nn.Sequential(
            nn.Linear(cfg.d_model, cfg.ff_mult * cfg.d_model),
            nn.GELU(),
            nn.Dropout(cfg.dropout),
            nn.Linear(cfg.ff_mult * cfg.d_model, cfg.d_model),
        )
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, h: Tensor, attn_mask: Tensor) -> Tensor:
        batch, seq_len, d_model = h.shape
        qkv = self.qkv(self.attn_norm(h))  # (batch, seq_len, 3 * d_model)
        q, k, v = qkv.view(batch, seq_len, 3, self.n_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        att = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask
        )  # (batch, n_heads, seq_len, head_dim)
        h = h + self.drop(self.out(att.transpose(1, 2).reshape(batch, seq_len, d_model)))
        return h + self.drop(self.ff(self.ff_norm(h)))


class SASRec(ItemSequenceModel):
    """Causal self-attentive sequential recommender (see module docstring for the source)."""

    name = "sasrec"
    config_class = SASRecConfig

    def __init__(self, config: SASRecConfig) -> None:
        super().__init__(config)
        self.item_emb = nn.Embedding(config.n_items + 1, config.d_model, padding_idx=PAD_IDX)
        self.pos_emb = nn.Embedding(config.max_seq_len, config.d_model)
        self.emb_drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList([_Block(config) for _ in range(config.n_layers)])
        self.final_norm = nn.LayerNorm(config.d_model)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Truncated-normal(0.02) embeddings and linears, zero biases, zero padding row."""
        for module in self.modules():
            if isinstance(module, nn.Linear | nn.Embedding):
                nn.init.trunc_normal_(module.weight, std=0.02)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
        with torch.no_grad():
            self.item_emb.weight[PAD_IDX].zero_()

    def encode(self, item_idx: Tensor, item_table: Tensor | None = None) -> Tensor:
        """Encode item histories with causal self-attention.

        Args:
            item_idx: (batch, seq_len) int64, left-padded with 0, most recent item last.
            item_table: optional (n_rows, d_model) item vectors to embed the input with (``embed_items``).
        Returns:
            (batch, seq_len, d_model) hidden states; position t depends only on items <= t;
            rows at padded positions are zero.
        Raises:
            ValueError: seq_len > config.max_seq_len or item_idx is not 2-D.
        """
        batch, seq_len = self.check_input(item_idx)
        keep = item_idx != PAD_IDX  # (batch, seq_len)
        positions = torch.arange(
            self.config.max_seq_len - seq_len, self.config.max_seq_len, device=item_idx.device
        )
        h = self.embed_items(item_idx, item_table) * self.config.d_model**0.5 + self.pos_emb(
            positions
        )  # (batch, seq_len, d_model)
        h = self.emb_drop(h) * keep.unsqueeze(-1)
        causal = torch.ones(seq_len, seq_len, dtype=torch.bool, device=item_idx.device).tril()
        eye = torch.eye(seq_len, dtype=torch.bool, device=item_idx.device)
        # Query t sees non-padding keys <= t, and always itself (so all-padding rows stay finite).
        attn_mask = ((causal & keep.unsqueeze(1)) | eye).unsqueeze(1)  # (batch, 1, seq_len, seq_len)
        for block in self.blocks:
            h = block(h, attn_mask) * keep.unsqueeze(-1)
        return self.final_norm(h) * keep.unsqueeze(-1)

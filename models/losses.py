"""Training losses for next-item prediction, as pure functions of hidden states and targets.

Full softmax: Klenitskiy & Vasilev, RecSys 2023 (SASRec+). Sampled softmax with uniform negatives
and log-Q correction (Bengio & Senecal 2008; Yi et al. 2019) for catalogues too large for the full one.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from models.vocab import PAD_IDX


def full_softmax_ce(hidden: Tensor, targets: Tensor, item_weight: Tensor) -> Tensor:
    """Cross-entropy over the whole catalogue at every non-padding target position.

    Args:
        hidden: (batch, seq_len, d_model) model outputs.
        targets: (batch, seq_len) int64 next items; 0 = ignore.
        item_weight: (n_items + 1, d_model) tied output embeddings (row 0 = padding, never a class).
    Returns:
        Scalar mean loss over the non-padding targets (0.0 if there are none).
    """
    mask = targets != PAD_IDX  # (batch, seq_len)
    if not mask.any():
        return hidden.sum() * 0.0
    h = hidden[mask]  # (n_targets, d_model)
    logits = (h @ item_weight.T).float()  # (n_targets, n_items + 1)
    logits[:, PAD_IDX] = float("-inf")
    return F.cross_entropy(logits, targets[mask])


def sampled_softmax_ce(
    hidden: Tensor,
    targets: Tensor,
    item_weight: Tensor,
    n_negatives: int,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Softmax over the target plus ``n_negatives`` uniform negatives shared by the batch.

    Negatives equal to a row's target are masked out; uniform sampling makes the log-Q correction
    a constant, so it is omitted.

    Args:
        hidden: (batch, seq_len, d_model); targets: (batch, seq_len) int64, 0 = ignore;
        item_weight: (n_items + 1, d_model); n_negatives: >= 1 sampled items in 1..n_items.
    Returns:
        Scalar mean loss over the non-padding targets.
    Raises:
        ValueError: n_negatives < 1.
    """
    if n_negatives < 1:
        raise ValueError(f"n_negatives={n_negatives}; expected >= 1")
    mask = targets != PAD_IDX
    if not mask.any():
        return hidden.sum() * 0.0
    h, tgt = hidden[mask], targets[mask]  # (n_targets, d_model), (n_targets,)
    n_items = item_weight.shape[0] - 1
    neg = torch.randint(1, n_items + 1, (n_negatives,), generator=generator).to(h.device)
    pos_logit = (h * item_weight[tgt]).sum(-1, keepdim=True)  # (n_targets, 1)
    neg_logit = h @ item_weight[neg].T  # (n_targets, n_negatives)
    neg_logit = neg_logit.masked_fill(neg.unsqueeze(0) == tgt.unsqueeze(1), float("-inf"))
    logits = torch.cat([pos_logit, neg_logit], dim=1).float()  # (n_targets, 1 + n_negatives)
    zeros = torch.zeros(len(tgt), dtype=torch.long, device=h.device)
    return F.cross_entropy(logits, zeros)

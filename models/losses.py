"""Training losses for next-item prediction, as pure functions of hidden states and targets.

Full softmax: Klenitskiy & Vasilev, RecSys 2023 (SASRec+). Sampled softmax with uniform negatives
and log-Q correction (Bengio & Senecal 2008; Yi et al. 2019) for catalogues too large for the full one.
"""

from __future__ import annotations

import math

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


#: Catalogues with more items than this train with the sampled softmax when ``TrainConfig.loss='auto'``
#: (the one place this threshold lives). Measured here: at ~12,000 items the full softmax over the
#: catalogue at every position dominates a CPU epoch (issue 19); Klenitskiy & Vasilev (RecSys 2023) and
#: gSASRec (Petrov & Macdonald, RecSys 2023) keep SASRec+ quality with a few thousand negatives.
SAMPLED_SOFTMAX_MIN_ITEMS = 10_000


def choose_loss(loss: str, n_items: int) -> str:
    """Resolve ``TrainConfig.loss``: ``'auto'`` is ``'sampled'`` above ``SAMPLED_SOFTMAX_MIN_ITEMS`` items,
    else ``'full'``; ``'full'`` and ``'sampled'`` are returned as given.

    Raises:
        ValueError: an unknown loss name.
    """
    if loss not in ("auto", "full", "sampled"):
        raise ValueError(f"loss={loss!r}; expected 'auto', 'full' or 'sampled'")
    if loss == "auto":
        return "sampled" if n_items > SAMPLED_SOFTMAX_MIN_ITEMS else "full"
    return loss


def candidate_log_q(candidates: Tensor, item_prob: Tensor, n_targets: int, n_uniform: int, n_items: int) -> Tensor:
    """log Q(j): the log-probability that item j is among the candidates of ``in_batch_sampled_ce``.

    Candidates are the batch's ``n_targets`` targets (taken as i.i.d. draws from the training target
    frequency ``item_prob``) plus ``n_uniform`` uniform draws from 1..n_items, deduplicated, so
    ``Q(j) = 1 - (1 - p_j)^n_targets * (1 - 1/n_items)^n_uniform`` (the unique-sampling expected count
    of TensorFlow's ``sampled_softmax_loss``; Yi et al., RecSys 2019, estimate p_j by streaming frequency).

    Args:
        candidates: (n_cand,) int64 item_idx in 1..n_items.
        item_prob: (n_items + 1,) float, sums to 1 over 1..n_items (row 0 unused).
        n_targets / n_uniform / n_items: draws and catalogue size.
    Returns:
        (n_cand,) float32 log Q(j) <= 0.
    """
    p = item_prob.to(candidates.device, torch.float64)[candidates].clamp(0.0, 1.0 - 1e-12)
    log_miss = n_targets * torch.log1p(-p) + n_uniform * math.log1p(-1.0 / max(n_items, 2))
    return torch.log(-torch.expm1(log_miss)).float()


def in_batch_sampled_ce(
    hidden: Tensor,
    targets: Tensor,
    item_weight: Tensor,
    n_negatives: int,
    item_prob: Tensor,
    generator: torch.Generator | None = None,
    n_in_batch: int | None = None,
) -> Tensor:
    """Sampled softmax over in-batch plus uniform negatives, with the logQ correction.

    Negatives, shared by the batch: ``n_in_batch`` of the batch's own targets (drawn without replacement
    among its target positions, so popular items come up as often as they are targets: in-batch
    negatives, Hidasi et al. 2016; Yi et al., "Sampling-Bias-Corrected Neural Modeling for Large Corpus
    Item Recommendations", RecSys 2019; None = every target) and ``n_negatives`` uniform draws (mixed
    negative sampling, Yang et al., WWW 2020), deduplicated. Each row scores its target and the negatives;
    a negative equal to the row's target is masked. Every logit ``s(x, j)`` becomes ``s(x, j) - log Q(j)``
    (``candidate_log_q``, the same rule for the target), which removes the popularity bias of in-batch
    negatives (otherwise popular items are pushed down too hard). Cost: O(n_targets * (n_in_batch +
    n_negatives)) instead of the full softmax's O(n_targets * n_items).

    Args:
        hidden: (batch, seq_len, d_model); targets: (batch, seq_len) int64, 0 = ignore.
        item_weight: (n_items + 1, d_model) tied output embeddings.
        n_negatives: >= 0 uniform negatives.
        item_prob: (n_items + 1,) training target frequency (``item_target_prob``).
        generator: CPU generator for the draws (determinism).
        n_in_batch: >= 0 in-batch targets used as negatives (None: all of them).
    Returns:
        Scalar mean loss over the non-padding targets (0.0 if there are none).
    Raises:
        ValueError: a negative count < 0 or item_prob of the wrong length.
    """
    if n_negatives < 0 or (n_in_batch is not None and n_in_batch < 0):
        raise ValueError(f"n_negatives={n_negatives}, n_in_batch={n_in_batch}; expected >= 0")
    if item_prob.shape[0] != item_weight.shape[0]:
        raise ValueError(f"item_prob has {item_prob.shape[0]} rows; expected n_items + 1 = {item_weight.shape[0]}")
    mask = targets != PAD_IDX
    if not mask.any():
        return hidden.sum() * 0.0
    h, tgt = hidden[mask], targets[mask]  # (n_targets, d_model), (n_targets,)
    n_items = item_weight.shape[0] - 1
    drawn = len(tgt) if n_in_batch is None else min(n_in_batch, len(tgt))
    pick = torch.randperm(len(tgt), generator=generator)[:drawn].to(tgt.device) if drawn < len(tgt) else None
    in_batch = tgt if pick is None else tgt[pick]
    uniform = torch.randint(1, n_items + 1, (n_negatives,), generator=generator).to(h.device)
    negatives = torch.unique(torch.cat([in_batch, uniform]))  # (n_neg,) sorted, deduplicated
    q_neg = candidate_log_q(negatives, item_prob, drawn, n_negatives, n_items)  # (n_neg,)
    q_pos = candidate_log_q(tgt, item_prob, drawn, n_negatives, n_items)  # (n_targets,)
    pos_logit = (h * item_weight[tgt]).sum(-1, keepdim=True).float() - q_pos.unsqueeze(1)  # (n_targets, 1)
    neg_logit = (h @ item_weight[negatives].T).float() - q_neg.unsqueeze(0)  # (n_targets, n_neg)
    neg_logit = neg_logit.masked_fill(negatives.unsqueeze(0) == tgt.unsqueeze(1), float("-inf"))
    logits = torch.cat([pos_logit, neg_logit], dim=1)  # (n_targets, 1 + n_neg), the target in column 0
    return F.cross_entropy(logits, torch.zeros(len(tgt), dtype=torch.long, device=h.device))


def item_target_prob(targets: Tensor, n_items: int) -> Tensor:
    """(n_items + 1,) float32 share of the non-padding training targets that are each item (row 0 = 0).

    Items never a target get a floor of half a count, so their log Q stays finite.
    """
    counts = torch.bincount(targets[targets != PAD_IDX].flatten().cpu(), minlength=n_items + 1).double()
    counts[1:] = counts[1:].clamp(min=0.5)
    counts[PAD_IDX] = 0.0
    return (counts / counts.sum()).float()

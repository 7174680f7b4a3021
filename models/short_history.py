"""Users with one or two events: a neighbours-plus-popularity blend, and the validation choice against the model.

A sequential model sees almost nothing in a one- or two-item history; item-based neighbours of those items
(Sarwar et al., "Item-Based Collaborative Filtering Recommendation Algorithms", WWW 2001: cosine of the
binary user-item matrix, ``models.baselines.ItemKNN``) blended with popularity (``MostPop``) often rank the
next item better. ``choose_short_history`` decides, per model, on validation users with at most
``SHORT_HISTORY_MAX`` events, which of the two serves such users (and the blend's weight); serving then
answers them with ``strategy="short_history_blend"`` when the blend won.

Blend: ``w · nb_i + (1 - w) · pop_i`` with ``nb_i`` = the summed cosine of item i to the history items,
divided by its maximum over the catalogue (so in [0, 1]), and ``pop_i`` = count / max count (in [0, 1]).
Pure numpy/torch: arrays in, arrays out.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor

from models.baselines import ItemKNN, MostPop, SeqInput
from models.contract import select_candidates
from models.ranking import mask_scores, score_histories, seen_mask, target_ranks
from models.sequences import EvalSet
from models.vocab import PAD_IDX

#: Users with at most this many (distinct, known) history items are "short-history" users.
SHORT_HISTORY_MAX = 2
#: The blend weights tried on validation (w = 0: popularity only; w = 1: neighbours only).
BLEND_WEIGHTS: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 0.9, 1.0)
#: Neighbours kept per item (a sparse table: (n_items + 1, K_NEIGHBOURS) indices and cosines).
K_NEIGHBOURS = 50
#: Fewer real short-history validation users than this: use each validation user's first 1-2 events instead.
MIN_SHORT_USERS = 50


def neighbour_table(train_seqs: SeqInput, n_items: int, k_neighbours: int = K_NEIGHBOURS
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each item's ``k_neighbours`` most similar items (``ItemKNN`` cosine) and normalised popularity.

    Args:
        train_seqs: user -> (or a list of) int64 item_idx sequences.
        n_items: catalogue size (padding excluded).
        k_neighbours: neighbours kept per item (>= 1).
    Returns:
        (neighbours, sims, popularity): (n_items + 1, k') int64 item_idx and float32 cosine (0 = none),
        k' = min(k_neighbours, n_items); (n_items + 1,) float32 count / max count, column 0 = 0.
        Memory while fitting: dense n_items² (``ItemKNN``'s limit, ~30k items).
    Raises:
        ValueError: k_neighbours < 1 or an item_idx beyond n_items.
    """
    if k_neighbours < 1:
        raise ValueError(f"k_neighbours={k_neighbours}; expected >= 1")
    sim = ItemKNN(k_neighbours=0).fit(train_seqs, n_items).sim  # (n_items + 1, n_items + 1)
    kk = min(k_neighbours, n_items)
    nb = np.argpartition(-sim, kk - 1, axis=1)[:, :kk]  # (n_items + 1, k') unordered
    sims = np.take_along_axis(sim, nb, axis=1).astype(np.float32)
    counts = MostPop().fit(train_seqs, n_items).counts.astype(np.float32)
    counts[PAD_IDX] = 0.0
    top = float(counts.max(initial=0.0))
    return nb.astype(np.int64), sims, counts / top if top > 0 else counts


def blend_scores(histories: np.ndarray, neighbours: np.ndarray, sims: np.ndarray, popularity: np.ndarray,
                 weight: float) -> np.ndarray:
    """The blend's scores of a batch of (short) histories.

    Args:
        histories: (batch, seq_len) int64 item_idx, left-padded with 0.
        neighbours, sims: (n_items + 1, k) the neighbour table (``neighbour_table``).
        popularity: (n_items + 1,) in [0, 1].
        weight: w in [0, 1] (1 = neighbours only).
    Returns:
        (batch, n_items + 1) float32 ``w · nb + (1 - w) · pop``; column 0 = -inf.
    Raises:
        ValueError: weight outside [0, 1].
    """
    if not 0.0 <= weight <= 1.0:
        raise ValueError(f"weight={weight}; expected a value in [0, 1]")
    h = np.asarray(histories, dtype=np.int64)
    batch, n_cols = h.shape[0], popularity.shape[0]
    nb = np.zeros((batch, n_cols), dtype=np.float32)  # (batch, n_items + 1)
    for pos in range(h.shape[1]):  # seq_len steps, vectorised over the batch
        rows = neighbours[h[:, pos]]  # (batch, k)
        vals = np.where(h[:, pos, None] != PAD_IDX, sims[h[:, pos]], 0.0)  # (batch, k)
        np.add.at(nb, (np.repeat(np.arange(batch), rows.shape[1]), rows.ravel()), vals.ravel())
    top = nb.max(axis=1, keepdims=True)
    nb = np.divide(nb, top, out=np.zeros_like(nb), where=top > 0)
    out = weight * nb + (1.0 - weight) * popularity[None, :].astype(np.float32)
    out[:, PAD_IDX] = -np.inf
    return out


class ShortHistoryBlend:
    """The blend as a scorer (``score(item_idx) -> (batch, n_items + 1)``), for evaluation."""

    def __init__(self, neighbours: np.ndarray, sims: np.ndarray, popularity: np.ndarray, weight: float) -> None:
        self.neighbours, self.sims, self.popularity, self.weight = neighbours, sims, popularity, weight

    def score(self, item_idx: Tensor | np.ndarray, candidate_idx: Tensor | None = None) -> Tensor:
        """(batch, seq_len) histories -> (batch, n_items + 1) float32 scores (or (batch, n_candidates))."""
        idx = item_idx.cpu().numpy() if isinstance(item_idx, Tensor) else np.asarray(item_idx)
        out = torch.from_numpy(blend_scores(idx, self.neighbours, self.sims, self.popularity, self.weight))
        return select_candidates(out, candidate_idx)


def short_history_users(valid: EvalSet, max_events: int = SHORT_HISTORY_MAX, min_users: int = MIN_SHORT_USERS
                        ) -> tuple[EvalSet, str]:
    """The validation users with at most ``max_events`` history items, or a stand-in when there are too few.

    Stand-in (e.g. MovieLens, where every user has >= 20 ratings): each validation user's first 1 or 2 events
    (alternating by user) as the history and the next event as the target: the user as they were when new.
    Both the model and the blend were fitted on these events, so neither is favoured.

    Returns:
        (eval set, population): population is "validation users with <= 2 events (n)" or
        "first 1-2 events of validation users (n)".
    """
    short = [i for i, h in enumerate(valid.histories) if 1 <= len(h) <= max_events]
    if len(short) >= min_users:
        return (EvalSet(valid.user_ids[short], [valid.histories[i] for i in short], valid.targets[short]),
                f"validation users with <= {max_events} events ({len(short)})")
    users, hists, targets = [], [], []
    for u, (user, h) in enumerate(zip(valid.user_ids, valid.histories, strict=True)):
        full = np.append(h, valid.targets[u])
        m = 1 + u % max_events
        if len(full) > m:
            users.append(user)
            hists.append(full[:m])
            targets.append(full[m])
    return (EvalSet(np.asarray(users, dtype=object), hists, np.asarray(targets, dtype=np.int64)),
            f"first 1-{max_events} events of validation users ({len(users)})")


def _ndcg10(scorer: Any, eval_set: EvalSet, n_items: int) -> float:
    scores = score_histories(scorer, eval_set.histories)  # (n_users, n_items + 1)
    scores = mask_scores(scores, seen_mask(eval_set.histories, n_items))
    ranks = target_ranks(scores, eval_set.targets)
    return float(np.mean(np.where(ranks <= 10, 1.0 / np.log2(ranks + 1), 0.0))) if len(ranks) else 0.0


def choose_short_history(model: Any, valid: EvalSet, train_seqs: SeqInput, n_items: int,
                         weights: tuple[float, ...] = BLEND_WEIGHTS) -> dict[str, Any]:
    """Which of the model and the blend serves users with 1-2 events: the higher NDCG@10 on validation.

    Args:
        model: the candidate scorer (``score(item_idx)``).
        valid: the split's validation set (``short_history_users`` picks the short histories).
        train_seqs: the training sequences (the blend's neighbours and popularity).
        n_items: catalogue size.
        weights: blend weights tried (the best on the same users is the blend's).
    Returns:
        {"strategy": "model" | "short_history_blend", "weight": the best blend weight, "population",
        "n_users", "ndcg@10": {"model": x, "blend": {w: x}}}. With no usable user: "model".
    """
    eval_set, population = short_history_users(valid)
    out: dict[str, Any] = {"strategy": "model", "weight": None, "population": population, "n_users": len(eval_set),
                           "ndcg@10": {}}
    if not len(eval_set):
        return out
    nb, sims, pop = neighbour_table(train_seqs, n_items)
    model_ndcg = _ndcg10(model, eval_set, n_items)
    blend = {w: _ndcg10(ShortHistoryBlend(nb, sims, pop, w), eval_set, n_items) for w in weights}
    best = max(blend, key=lambda w: (blend[w], -abs(w - 0.5)))
    out.update(weight=best, ndcg_at_10={"model": model_ndcg, "blend": blend})
    out["ndcg@10"] = out.pop("ndcg_at_10")
    if blend[best] > model_ndcg:
        out["strategy"] = "short_history_blend"
    return out

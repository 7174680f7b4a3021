"""Full-ranking top-K metrics with per-user arrays, and an ``evaluate`` helper.

Protocol: every item of the catalogue is ranked (no sampled negatives). Items in the user's
history are excluded through an explicit mask (``exclude_seen=True``) by setting their score to
-inf; a target that is itself in the history then counts as a miss. Column 0 (padding) is never
ranked. Scoring, masking, top-k and the pessimistic tie rule of the target's rank are
``models.ranking``'s (the one ranking path); this module turns ranks and lists into metrics.

Each user has exactly one held-out target, so Recall@K == HR@K, Precision@K == HR@K / K and
F1@K == 2 * P * R / (P + R). Formulas, per user with rank r:
HR@K = [r <= K]; NDCG@K = [r <= K] / log2(r + 1) (ideal DCG is 1); MRR@K = [r <= K] / r.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from models.contract import Scorer
from models.ranking import mask_scores, score_histories, seen_mask, target_ranks, top_k
from models.sequences import EvalSet
from models.vocab import PAD_IDX


def hit_rate(ranks: np.ndarray, k: int) -> np.ndarray:
    """Per-user HR@K = [rank <= K]."""
    return (ranks <= k).astype(np.float64)


def ndcg(ranks: np.ndarray, k: int) -> np.ndarray:
    """Per-user NDCG@K with one relevant item: 1 / log2(rank + 1) if rank <= K else 0."""
    return np.where(ranks <= k, 1.0 / np.log2(ranks + 1.0), 0.0)


def mrr(ranks: np.ndarray, k: int) -> np.ndarray:
    """Per-user MRR@K = 1 / rank if rank <= K else 0."""
    return np.where(ranks <= k, 1.0 / ranks, 0.0)


def recall(ranks: np.ndarray, k: int) -> np.ndarray:
    """Per-user Recall@K (one target: equals HR@K)."""
    return hit_rate(ranks, k)


def precision(ranks: np.ndarray, k: int) -> np.ndarray:
    """Per-user Precision@K = hits / K."""
    return hit_rate(ranks, k) / k


def f1(ranks: np.ndarray, k: int) -> np.ndarray:
    """Per-user F1@K = 2PR / (P + R), 0 when there is no hit."""
    p, r = precision(ranks, k), recall(ranks, k)
    return np.where(p + r > 0, 2 * p * r / np.maximum(p + r, 1e-12), 0.0)


def coverage(topk: np.ndarray, n_items: int) -> float:
    """Catalogue coverage@K: share of the n_items that appear in at least one top-K list."""
    items = np.unique(topk)
    return float(len(items[items != PAD_IDX]) / n_items)


def novelty(topk: np.ndarray, item_counts: np.ndarray, n_users: int) -> np.ndarray:
    """Per-user mean self-information -log2(p(i)) of recommended items (Zhou et al., PNAS 2010).

    p(i) = (count(i) + 1) / (n_users + 1): the share of training users who saw i, add-one smoothed
    so never-seen items are finite.
    """
    p = (np.asarray(item_counts, dtype=np.float64)[topk] + 1.0) / (n_users + 1.0)
    return (-np.log2(p)).mean(axis=1)


def mean_popularity(topk: np.ndarray, item_counts: np.ndarray) -> np.ndarray:
    """Per-user mean training interaction count of the recommended items."""
    return np.asarray(item_counts, dtype=np.float64)[topk].mean(axis=1)


def intra_list_diversity(topk: np.ndarray, item_genres: Mapping[int, Sequence[str]] | Sequence) -> np.ndarray:
    """Per-user ILD: mean over item pairs of 1 - Jaccard(genres_i, genres_j) (Ziegler et al., WWW 2005).

    Args:
        topk: (n_users, K) item_idx.
        item_genres: item_idx -> genres (a mapping, or a sequence indexed by item_idx); missing = no genre.
    Returns:
        (n_users,) values in [0, 1]; 0 for lists shorter than 2. Two genre-less items have distance 0.
    """
    genres = sorted({g for i in np.unique(topk) for g in _genres_of(item_genres, int(i))})
    col = {g: j for j, g in enumerate(genres)}
    onehot = np.zeros((int(topk.max(initial=0)) + 1, max(len(genres), 1)), dtype=np.float64)
    for i in np.unique(topk):
        for g in _genres_of(item_genres, int(i)):
            onehot[i, col[g]] = 1.0
    g = onehot[topk]  # (n_users, K, n_genres)
    inter = g @ g.transpose(0, 2, 1)  # (n_users, K, K)
    size = g.sum(-1)
    union = size[:, :, None] + size[:, None, :] - inter
    dist = np.where(union > 0, 1.0 - inter / np.maximum(union, 1e-12), 0.0)
    k = topk.shape[1]
    if k < 2:
        return np.zeros(len(topk))
    return dist.sum(axis=(1, 2)) / (k * (k - 1))


def embedding_ild(topk: np.ndarray, item_emb: np.ndarray) -> np.ndarray:
    """Per-user ILD by embeddings: mean over item pairs of the cosine distance 1 - cos(e_i, e_j).

    The embedding counterpart of ``intra_list_diversity`` (Ziegler et al., WWW 2005, with the model's
    item embeddings as the item representation; Carbonell & Goldstein's and Chen et al.'s re-rankers use
    the same similarity).

    Args:
        topk: (n_users, K) item_idx.
        item_emb: (n_items + 1, d_model) item embeddings (rows are L2-normalised here; a zero row has
            cosine 0 to every item, distance 1).
    Returns:
        (n_users,) values in [0, 2]; 0 for lists shorter than 2.
    """
    topk = np.asarray(topk)
    n_users, k = topk.shape
    if k < 2:
        return np.zeros(n_users)
    e = np.asarray(item_emb, dtype=np.float64)
    norms = np.linalg.norm(e, axis=1, keepdims=True)
    unit = np.divide(e, norms, out=np.zeros_like(e), where=norms > 0)
    g = unit[topk]  # (n_users, K, d_model)
    cos = g @ g.transpose(0, 2, 1)  # (n_users, K, K)
    off = (1.0 - cos).sum(axis=(1, 2)) - (1.0 - np.einsum("ukk->uk", cos)).sum(axis=1)
    return off / (k * (k - 1))


def fresh_items(added_at: np.ndarray, as_of: np.datetime64 | float, window_days: float) -> np.ndarray:
    """Which items were added to the catalogue in the last ``window_days`` before ``as_of``.

    ``as_of`` is the data's newest timestamp (not today), so a replayed or old data set has fresh items.

    Args:
        added_at: (n_items + 1,) catalogue-addition times as Unix seconds (float; NaN = unknown, not fresh).
        as_of: the reference time, Unix seconds.
        window_days: N >= 0 days.
    Returns:
        (n_items + 1,) bool: as_of - N days <= added_at <= as_of.
    Raises:
        ValueError: window_days < 0.
    """
    if window_days < 0:
        raise ValueError(f"window_days={window_days}; expected >= 0")
    t = np.asarray(added_at, dtype=np.float64)
    ref = float(as_of)
    with np.errstate(invalid="ignore"):
        return (t >= ref - window_days * 86_400.0) & (t <= ref)


def freshness(topk: np.ndarray, fresh: np.ndarray) -> np.ndarray:
    """Per-user freshness@K: share of the K recommended items that are fresh (``fresh_items``).

    Args:
        topk: (n_users, K) item_idx.
        fresh: (n_items + 1,) bool per item_idx.
    Returns:
        (n_users,) values in [0, 1]; 0 for an empty list.
    """
    topk = np.asarray(topk)
    if topk.shape[1] == 0:
        return np.zeros(topk.shape[0])
    return np.asarray(fresh, dtype=np.float64)[topk].mean(axis=1)


def _genres_of(item_genres: Mapping[int, Sequence[str]] | Sequence, i: int) -> Sequence[str]:
    if isinstance(item_genres, Mapping):
        return item_genres.get(i, ())
    return item_genres[i] if i < len(item_genres) and item_genres[i] is not None else ()


def rank_in_chunks(
    scorer: Scorer, eval_set: EvalSet, *, n_items: int, k: int, exclude_seen: bool = True, batch_size: int = 512
) -> tuple[np.ndarray, np.ndarray]:
    """Pessimistic target ranks and top-k lists of every user, ``batch_size`` users at a time.

    Each chunk is scored, masked and ranked by ``models.ranking`` exactly as the whole set would be, so
    the result equals the unchunked one while memory stays O(batch_size * n_items), not
    O(n_users * n_items) (a 6,000-user, 50,000-item float64 score matrix alone is 2.4 GB).

    Returns:
        ``(ranks (n_users,) int64, lists (n_users, min(k, n_items + 1)) int64)``.
    Raises:
        ValueError: the scorer returns other than ``n_items + 1`` columns, or ``batch_size < 1``.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size}; expected >= 1")
    ranks, lists = [], []
    for start in range(0, max(len(eval_set), 1), batch_size):
        histories = eval_set.histories[start : start + batch_size]
        if not histories:
            break
        scores = score_histories(scorer, histories, batch_size=batch_size)
        if scores.shape[1] != n_items + 1:
            raise ValueError(f"scorer returned {scores.shape[1]} columns; expected n_items + 1 = {n_items + 1}")
        masked = mask_scores(scores, seen_mask(histories, n_items) if exclude_seen else None)
        ranks.append(target_ranks(masked, eval_set.targets[start : start + batch_size]))
        lists.append(top_k(masked, k))
    if not ranks:
        raise ValueError("score_histories needs at least one history")
    return np.concatenate(ranks), np.concatenate(lists, axis=0)


def evaluate(
    scorer: Scorer,
    eval_set: EvalSet,
    *,
    n_items: int,
    k: int = 10,
    exclude_seen: bool = True,
    item_counts: np.ndarray | None = None,
    n_train_users: int | None = None,
    item_genres: Mapping[int, Sequence[str]] | Sequence | None = None,
    batch_size: int = 512,
    fresh: np.ndarray | None = None,
) -> dict[str, Any]:
    """Full-ranking evaluation of ``scorer`` on one ``EvalSet``.

    Args:
        scorer: object with ``score(item_idx) -> (batch, n_items + 1)``.
        eval_set: histories and single targets.
        n_items: catalogue size (padding excluded).
        k: cut-off K.
        exclude_seen: mask each user's history items (the default, as in RecBole / SASRec+ papers).
        item_counts: (n_items + 1,) training counts; enables novelty and mean popularity.
        n_train_users: users behind ``item_counts`` (for novelty); default = len(eval_set).
        item_genres: item_idx -> genres; enables intra-list diversity.
        fresh: (n_items + 1,) bool fresh items (``fresh_items``); enables freshness@K.
        batch_size: users scored, masked and ranked at once (memory is O(batch_size * n_items)).
    Returns:
        ``{"metrics": {name: mean}, "per_user": {name: (n_users,) array}, "protocol": {...}}`` with
        names like ``ndcg@10``, ``hr@10``, ``recall@10``, ``precision@10``, ``mrr@10``, ``f1@10``,
        ``coverage@10``, ``novelty@10``, ``ild@10``, ``mean_pop@10``, ``freshness@10``.
    """
    ranks, lists = rank_in_chunks(scorer, eval_set, n_items=n_items, k=k, exclude_seen=exclude_seen,
                                  batch_size=batch_size)
    per_user = {
        f"hr@{k}": hit_rate(ranks, k),
        f"ndcg@{k}": ndcg(ranks, k),
        f"mrr@{k}": mrr(ranks, k),
        f"recall@{k}": recall(ranks, k),
        f"precision@{k}": precision(ranks, k),
        f"f1@{k}": f1(ranks, k),
    }
    if item_counts is not None:
        per_user[f"novelty@{k}"] = novelty(lists, item_counts, n_train_users or len(eval_set))
        per_user[f"mean_pop@{k}"] = mean_popularity(lists, item_counts)
    if item_genres is not None:
        per_user[f"ild@{k}"] = intra_list_diversity(lists, item_genres)
    if fresh is not None:
        per_user[f"freshness@{k}"] = freshness(lists, fresh)
    metrics = {name: float(v.mean()) if len(v) else float("nan") for name, v in per_user.items()}
    metrics[f"coverage@{k}"] = coverage(lists, n_items)
    protocol = {
        "ranking": "full",
        "k": k,
        "exclude_seen": exclude_seen,
        "ties": "pessimistic",
        "n_eval_users": len(eval_set),
        "n_items": n_items,
    }
    return {"metrics": metrics, "per_user": {**per_user, "rank": ranks}, "protocol": protocol}

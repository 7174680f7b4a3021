"""Ranking metrics: hand-worked values, the pessimistic tie rule, and an independent implementation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from models.metrics import (
    coverage,
    evaluate,
    f1,
    hit_rate,
    intra_list_diversity,
    mean_popularity,
    mrr,
    ndcg,
    novelty,
    precision,
    recall,
)
from models.ranking import mask_scores, seen_mask, target_ranks, top_k
from models.sequences import EvalSet


def test_ndcg_at_3_of_target_at_rank_2() -> None:
    # Ranking [0, 1, 0]: the only relevant item is second.
    scores = mask_scores(np.array([[0.0, 0.9, 0.5, 0.1]]))
    ranks = target_ranks(scores, np.array([2]))
    assert ranks.tolist() == [2]
    assert ndcg(ranks, 3)[0] == pytest.approx(1 / math.log2(3))
    assert hit_rate(ranks, 1)[0] == 0.0 and hit_rate(ranks, 3)[0] == 1.0
    assert mrr(ranks, 3)[0] == pytest.approx(0.5)
    assert recall(ranks, 3)[0] == 1.0 and precision(ranks, 3)[0] == pytest.approx(1 / 3)
    assert f1(ranks, 3)[0] == pytest.approx(2 * (1 / 3) / (1 / 3 + 1))


def test_ties_never_favour_the_target() -> None:
    scores = mask_scores(np.array([[0.0, 1.0, 1.0, 1.0, 0.2]]))
    assert target_ranks(scores, np.array([1])).tolist() == [3]  # tied with two others -> after both
    constant = mask_scores(np.zeros((1, 6)))
    assert target_ranks(constant, np.array([2])).tolist() == [5]  # last of the 5 real items


def test_seen_items_are_masked_and_can_be_kept() -> None:
    raw = np.array([[0.0, 0.9, 0.8, 0.1]])
    seen = seen_mask([np.array([1])], n_items=3)
    assert target_ranks(mask_scores(raw, seen), np.array([2])).tolist() == [1]
    assert target_ranks(mask_scores(raw), np.array([2])).tolist() == [2]


def _reference_metrics(
    scores: np.ndarray, targets: np.ndarray, seen: list[set[int]], k: int
) -> dict[str, float]:
    """Straightforward loops: build each top-K list by sorting, tie-break putting the target last."""
    hr, nd, rr = [], [], []
    for row, target, hist in zip(scores, targets, seen, strict=True):
        candidates = [i for i in range(1, len(row)) if i not in hist]
        ordered = sorted(candidates, key=lambda i: (-row[i], i == target))
        pos = ordered.index(target) + 1 if target in ordered else len(row)
        hr.append(1.0 if pos <= k else 0.0)
        nd.append(1.0 / math.log2(pos + 1) if pos <= k else 0.0)
        rr.append(1.0 / pos if pos <= k else 0.0)
    return {"hr": float(np.mean(hr)), "ndcg": float(np.mean(nd)), "mrr": float(np.mean(rr))}


class _Table:
    def __init__(self, table: np.ndarray) -> None:
        self.table = torch.from_numpy(table)
        self.row = 0

    def score(self, item_idx: torch.Tensor, candidate_idx: torch.Tensor | None = None) -> torch.Tensor:
        out = self.table[self.row : self.row + len(item_idx)]
        self.row += len(item_idx)
        return out


def test_evaluate_matches_independent_implementation_on_random_data() -> None:
    rng = np.random.default_rng(7)
    n_users, n_items, k = 60, 30, 5
    scores = rng.integers(0, 6, size=(n_users, n_items + 1)).astype(np.float32)  # many ties
    histories = [
        rng.choice(np.arange(1, n_items + 1), size=rng.integers(1, 6), replace=False) for _ in range(n_users)
    ]
    targets = np.array([rng.choice([i for i in range(1, n_items + 1) if i not in set(h)]) for h in histories])
    eval_set = EvalSet(np.arange(n_users).astype(object), histories, targets)
    got = evaluate(_Table(scores), eval_set, n_items=n_items, k=k)
    ref = _reference_metrics(scores, targets, [set(h.tolist()) for h in histories], k)
    assert got["metrics"][f"hr@{k}"] == pytest.approx(ref["hr"])
    assert got["metrics"][f"ndcg@{k}"] == pytest.approx(ref["ndcg"])
    assert got["metrics"][f"mrr@{k}"] == pytest.approx(ref["mrr"])
    assert got["per_user"][f"ndcg@{k}"].shape == (n_users,)
    assert got["protocol"]["exclude_seen"] is True
    unfiltered = evaluate(_Table(scores), eval_set, n_items=n_items, k=k, exclude_seen=False)
    ref_unf = _reference_metrics(scores, targets, [set()] * n_users, k)
    assert unfiltered["metrics"][f"ndcg@{k}"] == pytest.approx(ref_unf["ndcg"])


def test_beyond_accuracy_metrics_by_hand() -> None:
    lists = np.array([[1, 2], [1, 3]])
    assert coverage(lists, n_items=4) == pytest.approx(3 / 4)
    counts = np.array([0, 3, 1, 0, 0])
    assert mean_popularity(lists, counts).tolist() == [2.0, 1.5]
    nov = novelty(lists, counts, n_users=3)
    assert nov[0] == pytest.approx((-math.log2(4 / 4) - math.log2(2 / 4)) / 2)
    genres = {1: ["Drama"], 2: ["Drama", "War"], 3: ["Comedy"]}
    ild = intra_list_diversity(lists, genres)
    assert ild.tolist() == pytest.approx([0.5, 1.0])  # Jaccard distance 1 - 1/2, then disjoint


def test_top_k_excludes_masked_items_and_orders_best_first() -> None:
    scores = mask_scores(np.array([[0.0, 0.1, 0.9, 0.5, 0.7]]), seen_mask([np.array([2])], 4))
    assert top_k(scores, 2).tolist() == [[4, 3]]


def test_bad_targets_are_rejected() -> None:
    with pytest.raises(ValueError, match="targets must be in 1..3"):
        target_ranks(mask_scores(np.zeros((1, 4))), np.array([0]))


def test_embedding_ild_is_the_mean_pairwise_cosine_distance() -> None:
    from models.metrics import embedding_ild

    emb = np.array([[0.0, 0.0], [1.0, 0.0], [0.0, 2.0], [3.0, 0.0]])  # item 3 points like item 1
    assert embedding_ild(np.array([[1, 2], [1, 3]]), emb).tolist() == pytest.approx([1.0, 0.0])
    assert embedding_ild(np.array([[1, 2, 3]]), emb).tolist() == pytest.approx([2 / 3])  # (1 + 0 + 1) / 3
    assert embedding_ild(np.array([[1]]), emb).tolist() == [0.0]


def test_freshness_counts_back_from_the_datas_newest_time() -> None:
    from models.metrics import fresh_items, freshness

    day = 86_400.0
    added = np.array([np.nan, 0.0, 95 * day, 90 * day, np.nan])
    fresh = fresh_items(added, as_of=100 * day, window_days=10)
    assert fresh.tolist() == [False, False, True, True, False]
    assert freshness(np.array([[1, 2], [3, 2], [4, 1]]), fresh).tolist() == [0.5, 1.0, 0.0]

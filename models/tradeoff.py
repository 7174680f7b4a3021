"""The accuracy/diversity trade-off of diversity re-ranking, measured offline (pure: arrays in, dicts out).

For a grid of diversity values, each re-ranker of ``models.rerank`` (MMR, Carbonell & Goldstein, SIGIR 1998;
DPP greedy MAP, Chen, Zhang & Zhou, NeurIPS 2018) reorders every evaluated user's top-N candidates (the full
ranking after masking the history, ``models.ranking``), and the re-ranked top-k is scored: NDCG@10 of the
held-out item (0 when it is not among the candidates), ILD@10 by genres (Jaccard distance; Ziegler et al.,
WWW 2005) and by embeddings (cosine distance over the model's item embeddings, the similarity the re-rankers
use), coverage@10 and freshness@10. The default diversity of each re-ranker is chosen on the **validation**
curve (the largest grid value whose NDCG@10 stays within ``max_drop``, relative, of the model's own order), and
the test split is evaluated once at it (and at 0 for reference). Two curves are compared at equal NDCG@10 by
linear interpolation (``at_equal_ndcg``).

Used by ``flows/evaluate.py`` (every evaluation: a table, a plot and tags on the run) and
``bench/rerank_study.py`` (the ml-100k study with its training and overheads).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from models.metrics import coverage, embedding_ild, freshness, intra_list_diversity, ndcg
from models.ranking import mask_scores, score_histories, seen_mask, top_k
from models.rerank import RERANKERS, rerank
from models.sequences import EvalSet

#: The diversity grid of the studies (MMR's λ; DPP's θ = 1 - diversity).
GRID: tuple[float, ...] = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
#: The coarser grid the evaluate flow uses on every evaluation (cost: about one re-rank per user and point).
EVAL_GRID: tuple[float, ...] = (0.0, 0.2, 0.4, 0.6, 0.8)
N_CANDIDATES = 100
K = 10
#: Relative NDCG@10 loss allowed when choosing the default diversity on validation.
DEFAULT_MAX_DROP = 0.05


def rerank_lists(scores: np.ndarray, emb: np.ndarray, method: str, diversity: float, n_candidates: int = N_CANDIDATES,
                 k: int = K) -> np.ndarray:
    """Re-ranked top-k per user from masked full-catalogue scores.

    Args:
        scores: (n_users, n_items + 1) masked scores (-inf = masked).
        emb: (n_items + 1, d_model) item embeddings.
        method: "mmr" | "dpp"; diversity in [0, 1].
    Returns:
        (n_users, k) item_idx (padding 0 where fewer than k candidates were finite).
    """
    cand = top_k(scores, n_candidates)  # (n_users, n_candidates) best first
    out = np.zeros((scores.shape[0], k), dtype=np.int64)
    for u in range(scores.shape[0]):
        c = cand[u][np.isfinite(scores[u, cand[u]])]
        pos = rerank(scores[u, c], emb[c], min(k, len(c)), method, diversity)  # (k',) positions
        out[u, : len(pos)] = c[pos]
    return out


def curve_point(lists: np.ndarray, targets: np.ndarray, emb: np.ndarray,
                genres: Mapping[int, Sequence[str]] | Sequence | None, n_items: int,
                fresh: np.ndarray | None) -> dict[str, float]:
    """NDCG@10, ILD@10 (genres, embeddings), coverage@10 and freshness@10 of (n_users, k) lists.

    ``ild_genre@10`` is None without genres, ``freshness@10`` None without the fresh set.
    """
    hit = lists == targets[:, None]  # (n_users, k)
    ranks = np.where(hit.any(axis=1), hit.argmax(axis=1) + 1, lists.shape[1] + 1)
    return {
        "ndcg@10": float(ndcg(ranks, K).mean()),
        "ild_genre@10": None if genres is None else float(intra_list_diversity(lists, genres).mean()),
        "ild_emb@10": float(embedding_ild(lists, emb).mean()),
        "coverage@10": coverage(lists, n_items),
        "freshness@10": None if fresh is None else float(freshness(lists, fresh).mean()),
    }


def curves(scores: np.ndarray, targets: np.ndarray, emb: np.ndarray,
           genres: Mapping[int, Sequence[str]] | Sequence | None, n_items: int, fresh: np.ndarray | None,
           grid: tuple[float, ...] = GRID) -> dict[str, list[dict[str, float]]]:
    """{method: [{diversity, ndcg@10, ild_genre@10, ild_emb@10, coverage@10, freshness@10}, ...]} per grid value."""
    out: dict[str, list[dict[str, float]]] = {}
    for method in RERANKERS:
        out[method] = []
        for d in grid:
            lists = rerank_lists(scores, emb, method, d)
            out[method].append({"diversity": d, **curve_point(lists, targets, emb, genres, n_items, fresh)})
    return out


def choose_default(curve: list[dict[str, float]], max_drop: float) -> float:
    """The largest diversity whose NDCG@10 >= (1 - max_drop) x NDCG@10 at diversity 0 (0 when none)."""
    base = next(p["ndcg@10"] for p in curve if p["diversity"] == 0.0)
    ok = [p["diversity"] for p in curve if p["ndcg@10"] >= (1.0 - max_drop) * base]
    return max(ok) if ok else 0.0


def at_equal_ndcg(a: list[dict[str, float]], b: list[dict[str, float]], metric: str, n_levels: int = 20
                  ) -> dict[str, Any]:
    """Mean ``metric`` of curve b minus curve a at equal NDCG@10 (linear interpolation, common range).

    Returns:
        dict: ndcg_range [lo, hi], levels, mean_a, mean_b, delta (b - a), relative (delta / mean_a); delta
        None when the two curves share no NDCG@10 range or the metric is missing.
    """
    if any(p.get(metric) is None for p in (*a, *b)):
        return {"ndcg_range": None, "levels": 0, "delta": None, "relative": None}

    def xy(c: list[dict[str, float]]) -> tuple[np.ndarray, np.ndarray]:
        pts = sorted((p["ndcg@10"], p[metric]) for p in c)
        return np.array([x for x, _ in pts]), np.array([y for _, y in pts])

    xa, ya = xy(a)
    xb, yb = xy(b)
    lo, hi = max(xa.min(), xb.min()), min(xa.max(), xb.max())
    if not hi > lo:
        return {"ndcg_range": [float(lo), float(hi)], "levels": 0, "delta": None, "relative": None}
    levels = np.linspace(lo, hi, n_levels)
    ia, ib = np.interp(levels, xa, ya), np.interp(levels, xb, yb)
    return {"ndcg_range": [round(float(lo), 5), round(float(hi), 5)], "levels": n_levels,
            "mean_a": float(ia.mean()), "mean_b": float(ib.mean()), "delta": float((ib - ia).mean()),
            "relative": float((ib - ia).mean() / ia.mean()) if ia.mean() else None}


def sample_users(eval_set: EvalSet, max_users: int | None, seed: int) -> EvalSet:
    """At most ``max_users`` users of ``eval_set`` (a seeded sample without replacement; all when None)."""
    n = len(eval_set.targets)
    if max_users is None or n <= max_users:
        return eval_set
    keep = np.sort(np.random.default_rng(seed).choice(n, size=max_users, replace=False))
    return EvalSet(eval_set.user_ids[keep], [eval_set.histories[i] for i in keep], eval_set.targets[keep])


def tradeoff_study(model: Any, valid: EvalSet, test: EvalSet, n_items: int, *,
                   genres: Mapping[int, Sequence[str]] | Sequence | None = None, fresh: np.ndarray | None = None,
                   grid: tuple[float, ...] = GRID, max_drop: float = DEFAULT_MAX_DROP,
                   max_users: int | None = None, seed: int = 0) -> dict[str, Any]:
    """Validation curves of both re-rankers, the default diversity chosen on them, test once at it.

    Args:
        model: a ``models.contract.Scorer`` (scores histories; ``item_embeddings()`` gives the similarity).
        valid / test: the leave-one-out validation and test users (``models.sequences.Split``).
        n_items: catalogue size (coverage's denominator).
        genres: item_idx → genres (ILD by genres; None: not reported), fresh: (n_items + 1,) bool or None.
        grid: diversity values (must hold 0); max_drop: relative NDCG@10 loss allowed for the default.
        max_users: evaluate at most this many users of each split (seeded sample), None = all.
        seed: the sample's seed.
    Returns:
        ``{"protocol", "valid_curves", "default_diversity", "test_once", "equal_ndcg_comparison"}``.
    Raises:
        ValueError: the grid lacks 0 or a value outside [0, 1].
    """
    if 0.0 not in grid or any(not 0.0 <= d <= 1.0 for d in grid):
        raise ValueError(f"grid={grid}; expected values in [0, 1] including 0")
    emb = model.item_embeddings().detach().float().cpu().numpy()  # (n_items + 1, d_model)

    def masked(eval_set: EvalSet) -> np.ndarray:
        return mask_scores(score_histories(model, eval_set.histories), seen_mask(eval_set.histories, n_items))

    v = sample_users(valid, max_users, seed)
    t = sample_users(test, max_users, seed + 1)
    valid_curves = curves(masked(v), v.targets, emb, genres, n_items, fresh, grid)
    defaults = {m: choose_default(valid_curves[m], max_drop) for m in RERANKERS}
    test_scores = masked(t)
    test_once: dict[str, dict[str, dict[str, float]]] = {}
    for m in RERANKERS:
        test_once[m] = {}
        for d in sorted({0.0, defaults[m]}):
            lists = rerank_lists(test_scores, emb, m, d)
            test_once[m][f"diversity={d:g}"] = curve_point(lists, t.targets, emb, genres, n_items, fresh)
    compare = {metric: at_equal_ndcg(valid_curves["mmr"], valid_curves["dpp"], metric)
               for metric in ("ild_genre@10", "ild_emb@10")}
    more = {metric: (None if c["delta"] is None else ("dpp" if c["delta"] > 0 else "mmr"))
            for metric, c in compare.items()}
    protocol = {"n_candidates": N_CANDIDATES, "k": K, "grid": list(grid), "max_ndcg_drop": max_drop,
                "valid_users": len(v.targets), "test_users": len(t.targets), "sample_seed": seed,
                "selection": "default diversity chosen on validation; test evaluated once at it"}
    return {"protocol": protocol, "valid_curves": valid_curves, "default_diversity": defaults,
            "test_once": test_once,
            "equal_ndcg_comparison": {"b_minus_a": "dpp - mmr", **compare, "more_diverse": more}}

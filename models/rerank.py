"""Diversity re-ranking of a candidate list: MMR and DPP greedy MAP inference, with a freshness boost.

A serving stage (``serving/recommender.py``: route → candidates → mask → **rerank** → explore → explain)
and an evaluation tool (``bench/rerank_study.py``). Pure numpy: arrays in, positions out.

Inputs are the top-N candidates of one request, best first by the model's score (``n_candidates`` = N,
e.g. 100), their item features (the model's item embeddings, or genre multi-hot rows) and the number of
slots k. Both re-rankers return positions into the candidate list (``(k',) int64``, k' = min(k, finite
candidates)), never repeat a candidate and never pick one whose score is not finite (a masked item:
seen, suppressed, excluded or blocked).

Relevance: the scores are min-max normalised over the finite candidates to r in [0, 1], so the
relevance term and the similarity term share a scale whatever the model's score scale. Similarity:
cosine of the feature rows (a zero row, e.g. an item without genres, is similar to nothing).

``diversity`` in [0, 1] is the one knob a request sets (``diversity_to_lambda`` / ``diversity_to_theta``):
0 keeps the model's order exactly; 1 is the most diverse each re-ranker allows.
"""

from __future__ import annotations

from typing import Literal

import numpy as np

RERANKERS: tuple[str, ...] = ("mmr", "dpp")
Reranker = Literal["mmr", "dpp"]
#: Diagonal jitter of the DPP similarity kernel: S' = (S + δI) / (1 + δ) is full rank, so greedy MAP can
#: fill k slots even when k exceeds the rank of the feature matrix (d_model or the number of genres).
DPP_JITTER = 1e-6
_TINY = 1e-300


def normalise_relevance(scores: np.ndarray) -> np.ndarray:
    """Min-max normalise the finite scores to [0, 1]; non-finite stay -inf.

    Args:
        scores: (n_candidates,) float model scores; -inf (or NaN) = masked.
    Returns:
        (n_candidates,) float64: (s - min) / (max - min) over the finite scores (all 1.0 when they are
        equal), -inf elsewhere.
    """
    s = np.asarray(scores, dtype=np.float64)
    finite = np.isfinite(s)
    out = np.full(s.shape, -np.inf)
    if not finite.any():
        return out
    lo, hi = s[finite].min(), s[finite].max()
    out[finite] = (s[finite] - lo) / (hi - lo) if hi > lo else 1.0
    return out


def unit_rows(features: np.ndarray) -> np.ndarray:
    """L2-normalised rows (zero rows stay zero). (n, d) -> (n, d) float64."""
    f = np.asarray(features, dtype=np.float64)
    norms = np.linalg.norm(f, axis=1, keepdims=True)
    return np.divide(f, norms, out=np.zeros_like(f), where=norms > 0)


def _check(scores: np.ndarray, features: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, int]:
    s = np.asarray(scores, dtype=np.float64)
    f = np.asarray(features)
    if s.ndim != 1 or f.ndim != 2 or f.shape[0] != s.shape[0]:
        raise ValueError(f"scores {s.shape} and features {f.shape}: expected (n_candidates,) and (n_candidates, d)")
    if k < 1:
        raise ValueError(f"k={k}; expected k >= 1")
    valid = np.isfinite(s)
    return s, valid, min(k, int(valid.sum()))


def mmr(scores: np.ndarray, features: np.ndarray, k: int, lam: float) -> np.ndarray:
    """Maximal Marginal Relevance re-ranking (Carbonell & Goldstein, SIGIR 1998).

    Greedily picks ``argmax_{i not in S} (1 - λ) r_i - λ max_{j in S} cos(f_i, f_j)`` (the max is 0 while
    S is empty). Deviation from the paper: λ weighs *diversity* here (λ = 0 is the model's own order),
    the paper's λ weighs relevance; r is the min-max normalised score (``normalise_relevance``). Ties go
    to the earlier candidate (the model's order). O(n_candidates · k · d).

    Args:
        scores: (n_candidates,) model scores, best first is not required; -inf = masked (never picked).
        features: (n_candidates, d) item features (embeddings, genre multi-hot); rows are L2-normalised.
        k: slots wanted (>= 1).
        lam: diversity weight in [0, 1].
    Returns:
        (k',) int64 positions into the candidates, k' = min(k, finite scores), no repeats.
    Raises:
        ValueError: lam outside [0, 1], k < 1, or shapes that do not match.
    """
    if not 0.0 <= lam <= 1.0:
        raise ValueError(f"lam={lam}; expected a value in [0, 1]")
    s, valid, kk = _check(scores, features, k)
    r = np.where(valid, normalise_relevance(s), 0.0)
    if lam == 0.0:  # exactly the model's order (stable: ties to the earlier candidate)
        return np.argsort(-np.where(valid, s, -np.inf), kind="stable")[:kk].astype(np.int64)
    f = unit_rows(features)
    rel = np.where(valid, (1.0 - lam) * r, -np.inf)  # (n_candidates,) -inf = masked or already picked
    max_sim = np.zeros(s.shape[0])  # (n_candidates,) max cosine to the selected items
    gain = rel.copy()  # the max is 0 before the first pick
    out = np.empty(kk, dtype=np.int64)
    for t in range(kk):  # k steps, each O(n_candidates · d); no loop over the candidates
        j = int(np.argmax(gain))
        out[t], rel[j] = j, -np.inf
        if t == kk - 1:
            break
        sim = f @ f[j]  # (n_candidates,)
        if t:
            np.maximum(max_sim, sim, out=max_sim)
        else:
            max_sim = sim
        np.multiply(max_sim, -lam, out=gain)
        gain += rel
    return out


def dpp_greedy(scores: np.ndarray, features: np.ndarray, k: int, theta: float, jitter: float = DPP_JITTER
               ) -> np.ndarray:
    """Greedy MAP inference of a DPP by incremental Cholesky (Chen, Zhang & Zhou, "Fast Greedy MAP
    Inference for Determinantal Point Process to Improve Recommendation Diversity", NeurIPS 2018, Alg. 1).

    Kernel (their Section 4, relevance-diversity trade-off): L = Diag(exp(α r)) S Diag(exp(α r)) with
    α = θ / (2 (1 - θ)), so ``log det L_Y ∝ θ Σ_{i∈Y} r_i + (1 - θ) log det S_Y``; S is the cosine kernel
    of the feature rows (diagonal 1) with jitter δ: S' = (S + δI) / (1 + δ). Algorithm 1 keeps, for every
    candidate i, the Cholesky row c_i and d_i² = S'_ii - ||c_i||²; adding j to Y updates
    ``e_i = (S'_ji - <c_j, c_i>) / d_j``, ``c_i ← [c_i, e_i]``, ``d_i² ← d_i² - e_i²``, and the next pick is
    ``argmax_i log d_i²(L) = 2α r_i + log d_i²(S')``, computed in log space (the same argmax, no overflow
    of exp(α r) as θ → 1). O(n_candidates · k²) for the updates plus O(n_candidates · k · d) for the kernel
    rows, which are computed on demand. Deviation: the paper stops when d_j² < ε; the jitter keeps every
    d_j² > 0 so k slots are always filled. θ = 1 is the model's order; ties go to the earlier candidate.

    Args:
        scores: (n_candidates,) model scores; -inf = masked (never picked).
        features: (n_candidates, d) item features; rows are L2-normalised.
        k: slots wanted (>= 1).
        theta: relevance weight in [0, 1] (1 = relevance only, 0 = log det S only).
        jitter: δ >= 0 added to the kernel's diagonal.
    Returns:
        (k',) int64 positions into the candidates, k' = min(k, finite scores), no repeats.
    Raises:
        ValueError: theta outside [0, 1], jitter < 0, k < 1, or shapes that do not match.
    """
    if not 0.0 <= theta <= 1.0:
        raise ValueError(f"theta={theta}; expected a value in [0, 1]")
    if jitter < 0:
        raise ValueError(f"jitter={jitter}; expected >= 0")
    s, valid, kk = _check(scores, features, k)
    if theta == 1.0:
        return mmr(s, features, k, 0.0)
    f = unit_rows(features)  # (n_candidates, d) float64: d² must stay accurate near the jitter
    n = s.shape[0]
    inv = 1.0 / (1.0 + jitter)
    rel = np.full(n, -np.inf)  # (n_candidates,) θ r_i; -inf = masked or already picked
    rel[valid] = theta * normalise_relevance(s)[valid]
    c = np.empty((kk, n))  # (k, n_candidates) Cholesky rows c_i, one column entry per step
    d2 = np.ones(n)  # (n_candidates,) d_i² of S' (its diagonal is 1)
    log_d2 = np.empty(n)
    gain = rel.copy()  # every log d_i² is 0 before the first pick
    out = np.empty(kk, dtype=np.int64)
    for t in range(kk):  # k steps, each O(n_candidates · (d + t)); no loop over the candidates
        j = int(np.argmax(gain))
        out[t], rel[j] = j, -np.inf
        if t == kk - 1:
            break
        e = f @ f[j]  # (n_candidates,) row j of S, computed on demand
        e *= inv
        e[j] = 1.0  # (S_jj + δ) / (1 + δ), S_jj = 1 even for a zero feature row
        if t:
            e -= c[:t, j] @ c[:t]
        e /= np.sqrt(max(d2[j], _TINY))
        c[t] = e
        d2 -= e * e
        np.maximum(d2, _TINY, out=log_d2)
        np.log(log_d2, out=log_d2)
        np.multiply(log_d2, 1.0 - theta, out=gain)
        gain += rel  # masked and picked stay -inf
    return out


def diversity_to_lambda(diversity: float) -> float:
    """MMR's λ for a request's ``diversity`` in [0, 1]: λ = diversity (0 = the model's order)."""
    return float(diversity)


def diversity_to_theta(diversity: float) -> float:
    """DPP's θ for a request's ``diversity`` in [0, 1]: θ = 1 - diversity (1 = the model's order)."""
    return 1.0 - float(diversity)


def freshness_boost(scores: np.ndarray, fresh: np.ndarray, weight: float) -> np.ndarray:
    """Relevance with a freshness boost: ``r + weight · fresh`` (r = ``normalise_relevance(scores)``).

    Applied before re-ranking, so a boost of ``weight`` lifts a new item by that share of the candidates'
    score range.

    Args:
        scores: (n_candidates,) model scores; -inf = masked (stays -inf).
        fresh: (n_candidates,) bool or float in [0, 1]: the item was added to the catalogue recently
            (``models.metrics.fresh_items``).
        weight: boost >= 0 in units of the normalised score range.
    Returns:
        (n_candidates,) float64 boosted relevance; -inf where masked.
    Raises:
        ValueError: weight < 0 or shapes that differ.
    """
    if weight < 0:
        raise ValueError(f"weight={weight}; expected >= 0")
    fr = np.asarray(fresh, dtype=np.float64)
    if fr.shape != np.shape(scores):
        raise ValueError(f"fresh {fr.shape} and scores {np.shape(scores)} differ")
    r = normalise_relevance(scores)
    return np.where(np.isfinite(r), r + weight * fr, -np.inf)


def rerank(scores: np.ndarray, features: np.ndarray, k: int, method: Reranker, diversity: float,
           fresh: np.ndarray | None = None, freshness_weight: float = 0.0) -> np.ndarray:
    """Re-rank candidates with ``method`` at ``diversity`` (with an optional freshness boost).

    Args:
        scores: (n_candidates,) model scores; -inf = masked.
        features: (n_candidates, d) item features.
        k: slots wanted (>= 1).
        method: "mmr" (λ = diversity) or "dpp" (θ = 1 - diversity).
        diversity: in [0, 1]; 0 with no boost returns the model's order.
        fresh / freshness_weight: ``freshness_boost`` (ignored when the weight is 0 or fresh is None).
    Returns:
        (k',) int64 positions into the candidates (no repeats, finite scores only).
    Raises:
        ValueError: an unknown method (lists the allowed ones) or a value out of range.
    """
    if method not in RERANKERS:
        raise ValueError(f"reranker={method!r}; expected one of {list(RERANKERS)}")
    if not 0.0 <= diversity <= 1.0:
        raise ValueError(f"diversity={diversity}; expected a value in [0, 1]")
    if fresh is not None and freshness_weight > 0:
        scores = freshness_boost(scores, fresh, freshness_weight)
    if method == "mmr":
        return mmr(scores, features, k, diversity_to_lambda(diversity))
    return dpp_greedy(scores, features, k, diversity_to_theta(diversity))

"""models/rerank.py: MMR and DPP greedy MAP re-ranking, by hand and against a brute-force log-det search."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from models.rerank import (
    DPP_JITTER,
    diversity_to_theta,
    dpp_greedy,
    freshness_boost,
    mmr,
    normalise_relevance,
    rerank,
    unit_rows,
)

# Two near-duplicates (0, 1) and one item of another kind (2); candidates best first.
SCORES = np.array([1.0, 0.9, 0.0])
FEATURES = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])


def test_normalise_relevance_is_min_max_over_finite_scores() -> None:
    assert normalise_relevance(np.array([2.0, -np.inf, 4.0, 3.0])).tolist() == [0.0, -np.inf, 1.0, 0.5]
    assert normalise_relevance(np.array([5.0, 5.0])).tolist() == [1.0, 1.0]


def test_mmr_with_lambda_zero_returns_the_models_own_order() -> None:
    rng = np.random.default_rng(0)
    scores, feats = rng.normal(size=40), rng.normal(size=(40, 8))
    assert mmr(scores, feats, 10, 0.0).tolist() == np.argsort(-scores)[:10].tolist()
    assert rerank(np.sort(scores)[::-1], feats, 10, "mmr", 0.0).tolist() == list(range(10))
    assert rerank(np.sort(scores)[::-1], feats, 10, "dpp", 0.0).tolist() == list(range(10))


def test_mmr_by_hand() -> None:
    # λ = 0.5: step 1 gains 0.5·r = [0.5, 0.45, 0] → 0; step 2: item 1: 0.45 - 0.5·1 = -0.05, item 2: 0 → 2.
    assert mmr(SCORES, FEATURES, 3, 0.5).tolist() == [0, 2, 1]
    # λ = 0.1: item 1: 0.9·0.9 - 0.1·1 = 0.71 beats item 2's 0 → the model's order.
    assert mmr(SCORES, FEATURES, 3, 0.1).tolist() == [0, 1, 2]


def test_dpp_by_hand_skips_the_near_duplicate() -> None:
    # θ = 0.5: first pick argmax r (every d² = 1) → 0; then d_1² = 1 - 1/(1+δ)² ≈ 2δ, d_2² = 1 → 2.
    assert dpp_greedy(SCORES, FEATURES, 3, 0.5).tolist() == [0, 2, 1]
    assert dpp_greedy(SCORES, FEATURES, 3, 1.0).tolist() == [0, 1, 2]


def _objective(idx: tuple[int, ...], r: np.ndarray, kernel: np.ndarray, theta: float) -> float:
    sign, logdet = np.linalg.slogdet(kernel[np.ix_(idx, idx)])
    assert sign > 0
    return theta * r[list(idx)].sum() + (1 - theta) * logdet


@pytest.mark.parametrize("theta", [0.2, 0.5, 0.8])
def test_dpp_greedy_equals_a_brute_force_greedy_log_det_search(theta: float) -> None:
    rng = np.random.default_rng(1)
    scores, feats = rng.normal(size=9), rng.normal(size=(9, 4))
    f = unit_rows(feats)
    kernel = (f @ f.T + DPP_JITTER * np.eye(9)) / (1 + DPP_JITTER)
    r = normalise_relevance(scores)
    chosen: list[int] = []
    for _ in range(6):  # k = 6 > rank 4: the jitter keeps every step defined
        rest = [i for i in range(9) if i not in chosen]
        chosen.append(max(rest, key=lambda i: _objective((*chosen, i), r, kernel, theta)))
    assert dpp_greedy(scores, feats, 6, theta).tolist() == chosen


def test_dpp_greedy_reaches_the_exact_map_on_a_tiny_kernel() -> None:
    rng = np.random.default_rng(2)
    scores, feats = rng.normal(size=7), rng.normal(size=(7, 5))
    f = unit_rows(feats)
    kernel = (f @ f.T + DPP_JITTER * np.eye(7)) / (1 + DPP_JITTER)
    r = normalise_relevance(scores)
    best = max(itertools.combinations(range(7), 2), key=lambda s: _objective(s, r, kernel, 0.5))
    greedy = tuple(dpp_greedy(scores, feats, 2, 0.5).tolist())
    # Greedy is a (1 - 1/e)-style approximation in general; on this kernel it finds the optimum.
    assert _objective(greedy, r, kernel, 0.5) == pytest.approx(_objective(best, r, kernel, 0.5))


@pytest.mark.parametrize("method", ["mmr", "dpp"])
@pytest.mark.parametrize("diversity", [0.0, 0.3, 0.7, 1.0])
def test_rerankers_never_repeat_and_never_pick_a_masked_candidate(method: str, diversity: float) -> None:
    rng = np.random.default_rng(3)
    scores, feats = rng.normal(size=100), rng.normal(size=(100, 16))
    masked = rng.choice(100, 60, replace=False)
    scores[masked] = -np.inf
    out = rerank(scores, feats, 10, method, diversity)
    assert len(out) == 10 and len(set(out.tolist())) == 10
    assert not set(out.tolist()) & set(masked.tolist())
    few = rerank(scores, feats, 50, method, diversity)  # k larger than the 40 finite candidates
    assert sorted(few.tolist()) == sorted(set(range(100)) - set(masked.tolist()))


def test_diversity_raises_the_lists_spread() -> None:
    rng = np.random.default_rng(4)
    scores, feats = np.sort(rng.normal(size=100))[::-1], unit_rows(rng.normal(size=(100, 8)))

    def ild(pos: np.ndarray) -> float:
        sims = feats[pos] @ feats[pos].T
        return float((1 - sims).sum() / (len(pos) * (len(pos) - 1)))

    base = ild(np.arange(10))
    for method in ("mmr", "dpp"):
        assert ild(rerank(scores, feats, 10, method, 0.5)) > base


def test_freshness_boost_lifts_a_fresh_item_by_its_share_of_the_score_range() -> None:
    boosted = freshness_boost(np.array([3.0, 2.0, 1.0, -np.inf]), np.array([0, 0, 1, 1]), 0.6)
    assert boosted.tolist() == [1.0, 0.5, 0.6, -np.inf]
    pos = rerank(np.array([3.0, 2.0, 1.0]), np.eye(3), 3, "mmr", 0.0, np.array([0, 0, 1]), 0.6)
    assert pos.tolist() == [0, 2, 1]


def test_bad_arguments_name_the_value() -> None:
    with pytest.raises(ValueError, match="reranker='x'"):
        rerank(SCORES, FEATURES, 2, "x", 0.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="diversity=1.5"):
        rerank(SCORES, FEATURES, 2, "mmr", 1.5)
    with pytest.raises(ValueError, match="scores"):
        mmr(SCORES, FEATURES[:2], 2, 0.5)
    assert diversity_to_theta(0.25) == 0.75

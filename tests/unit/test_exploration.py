"""Slate exploration (models/exploration.py): logged propensities equal the empirical (item, position) frequencies."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from models.exploration import (
    MC_SEED,
    DeferredPropensities,
    ExplorationPolicy,
    epsilon_marginals,
    explore,
    marginal_propensities,
    plackett_luce_marginals,
)
from models.ranking import top_k_items

N_DRAWS = 100_000
K = 5
#: A masked row: padding and masked items at -inf, ties inside the top 5 and across its boundary (4.0 x 3).
SCORES = np.array([-np.inf, 2.0, 4.0, 4.0, -np.inf, 1.0, 3.0, 4.0, 0.5, 2.0, 2.0, -1.0, -np.inf, 0.0, 1.5, 2.0])
FINITE = int(np.isfinite(SCORES).sum())  # 13


def frequencies(scores: np.ndarray, k: int, policy: ExplorationPolicy, n: int, seed: int = 0) -> tuple:
    """(empirical (n_items, k) frequencies, one logged marginal matrix) over n explore() draws."""
    rng = np.random.default_rng(seed)
    expected = marginal_propensities(scores, k, policy)
    items = np.full((n, k), -1)
    logged = np.zeros((n, k))
    for i in range(n):
        slate = explore(scores, k, policy, rng)
        items[i, : slate.items.shape[0]] = slate.items
        logged[i, : slate.items.shape[0]] = slate.propensities
        assert slate.pool_size == int(np.isfinite(scores).sum())
    assert (items >= 0).all()  # every draw fills min(k, finite) = k slots here
    positions = np.broadcast_to(np.arange(k), items.shape)
    np.testing.assert_allclose(logged, expected[items, positions])  # logged == the marginal of (item, position)
    counts = np.zeros((scores.shape[0], k))
    np.add.at(counts, (items, positions), 1)
    return counts / n, expected


def assert_within_sampling_error(emp: np.ndarray, p: np.ndarray, n: int, mc_se: np.ndarray | float = 0.0) -> None:
    tolerance = 4 * np.sqrt(p * (1 - p) / n) + 4 * mc_se + 1e-12
    worst = np.max(np.abs(emp - p) - tolerance)
    assert worst <= 0, f"empirical frequency off by {worst:.4g} beyond 4 sigma"
    assert (emp[p == 0] == 0).all()  # never drawn where the marginal is 0 (masked, or out of reach)


@pytest.mark.parametrize("policy", [ExplorationPolicy(), ExplorationPolicy("epsilon", 0.1),
                                    ExplorationPolicy("epsilon", 0.3)], ids=["greedy", "eps0.1", "eps0.3"])
def test_exact_policies_match_empirical_frequencies(policy: ExplorationPolicy) -> None:
    emp, p = frequencies(SCORES, K, policy, N_DRAWS)
    assert_within_sampling_error(emp, p, N_DRAWS)
    assert (emp[~np.isfinite(SCORES)] == 0).all()  # -inf items never drawn
    np.testing.assert_allclose(p.sum(axis=0), 1.0)
    greedy = top_k_items(SCORES, K)  # the ranking path's rule: ties by the lower index
    assert greedy.tolist() == [2, 3, 7, 6, 1]
    np.testing.assert_allclose(p[greedy, np.arange(K)], 1.0 - policy.epsilon)
    below = np.setdiff1d(np.flatnonzero(np.isfinite(SCORES)), greedy)
    np.testing.assert_allclose(p[below], policy.epsilon / below.shape[0])


def test_bounded_epsilon_draws_from_ranks_k_plus_1_to_n_only() -> None:
    """``epsilon:0.3,n=8``: the pool is ranks 6..8 of the 13 finite items (ties by the lower index)."""
    policy = ExplorationPolicy("epsilon", 0.3, top_n=8)
    emp, p = frequencies(SCORES, K, policy, N_DRAWS, seed=2)
    assert_within_sampling_error(emp, p, N_DRAWS)
    np.testing.assert_allclose(p.sum(axis=0), 1.0)
    ranked = top_k_items(SCORES, FINITE)
    greedy, pool, beyond = ranked[:K], ranked[K:8], ranked[8:]
    assert pool.tolist() == [9, 10, 15]  # the three 2.0s below the top 5, lower index first
    keep, below = epsilon_marginals(K, 3, 0.3)  # n_B = 3 < k: later slots may find B used up
    np.testing.assert_allclose(p[greedy, np.arange(K)], keep)
    np.testing.assert_allclose(p[pool], np.broadcast_to(below, (3, K)))
    np.testing.assert_allclose(below[:3], 0.3 / 3)
    assert (p[beyond] == 0).all() and (emp[beyond] == 0).all()  # never explored beyond rank N
    assert ExplorationPolicy.parse("epsilon:0.3,n=8") == policy
    assert ExplorationPolicy.parse("epsilon:eps=0.3, top_n=8") == policy
    assert policy.describe() == {"name": "epsilon", "epsilon": 0.3, "propensities": "exact", "top_n": 8}
    wide = ExplorationPolicy("epsilon", 0.3, top_n=FINITE)  # N >= the pool: the unbounded policy
    np.testing.assert_allclose(marginal_propensities(SCORES, K, wide),
                               marginal_propensities(SCORES, K, ExplorationPolicy("epsilon", 0.3)))
    for bad in ("epsilon:0.1,n=0", "epsilon:0.1,m=5", "epsilon:0.1,n="):
        with pytest.raises(ValueError):
            ExplorationPolicy.parse(bad)


def test_epsilon_when_the_pool_below_runs_out() -> None:
    """n_B = 2 below a top 5: later slots may find B used up (q_p = P(Binomial(p-1, ε) >= 2))."""
    scores = np.array([-np.inf, 5.0, 4.0, 3.0, 2.0, 1.0, 0.0, -1.0, -np.inf])
    policy = ExplorationPolicy("epsilon", 0.3)
    keep, below = epsilon_marginals(5, 2, 0.3)
    q = np.array([0, 0, 0.09, 0.216, 0.3483])  # P(Bin(p, 0.3) >= 2), p = 0..4
    np.testing.assert_allclose(keep, 0.7 + 0.3 * q)
    np.testing.assert_allclose(below, 0.3 * (1 - q) / 2)
    emp, p = frequencies(scores, 5, policy, 50_000, seed=1)
    assert_within_sampling_error(emp, p, 50_000)


def test_epsilon_hand_computed_marginals() -> None:
    keep, below = epsilon_marginals(3, 2, 0.5)  # q = [0, 0, P(Bin(2, .5) >= 2) = .25]
    np.testing.assert_allclose(keep, [0.5, 0.5, 0.625])
    np.testing.assert_allclose(below, [0.25, 0.25, 0.1875])
    keep, below = epsilon_marginals(3, 0, 0.5)  # nothing below the top k: no replacement
    np.testing.assert_allclose(keep, 1.0)
    np.testing.assert_allclose(below, 0.0)


def exact_plackett_luce(scores: np.ndarray, k: int, tau: float, top_n: int) -> np.ndarray:
    """(n, k) marginals by enumerating every ordered k-prefix of the top-N candidates."""
    cand = top_k_items(scores, top_n)
    w = np.exp((scores[cand] - scores[cand].max()) / tau)
    out = np.zeros((scores.shape[0], k))
    for perm in itertools.permutations(range(cand.shape[0]), k):
        prob, rest = 1.0, w.sum()
        for a in perm:
            prob *= w[a] / rest
            rest -= w[a]
        out[cand[list(perm)], np.arange(k)] += prob
    return out


def test_plackett_luce_matches_enumeration_and_empirical_frequencies() -> None:
    policy = ExplorationPolicy("plackett_luce", temperature=0.7, top_n=8)
    mc, se = plackett_luce_marginals(SCORES, K, policy)
    exact = exact_plackett_luce(SCORES, K, 0.7, 8)
    assert (np.abs(mc - exact) <= 4 * se + 1e-12).all()  # Monte Carlo within its stated standard error
    assert se.max() <= 0.5 / np.sqrt(policy.mc_samples)
    np.testing.assert_allclose(mc[:, 0], exact[:, 0], atol=1e-12)  # position 1: the exact softmax
    assert (se[:, 0] < 1e-12).all()
    outside = np.setdiff1d(np.arange(SCORES.shape[0]), top_k_items(SCORES, 8))
    assert (mc[outside] == 0).all()  # only the top N are candidates
    emp, logged = frequencies(SCORES, K, policy, N_DRAWS)
    np.testing.assert_array_equal(logged, mc)
    assert_within_sampling_error(emp, exact, N_DRAWS)  # the sampler draws the Plackett-Luce law
    assert_within_sampling_error(emp, logged, N_DRAWS, se)  # and the logged propensities, within MC error
    # seeded: the same scores give the same logged propensities; another generator gives other estimates
    again, _ = plackett_luce_marginals(SCORES, K, policy, np.random.default_rng(MC_SEED))
    np.testing.assert_array_equal(again, mc)


def test_deferred_plackett_luce_propensities_are_the_eager_ones_computed_on_first_read() -> None:
    policy = ExplorationPolicy("plackett_luce", temperature=0.3, top_n=12, mc_samples=300)
    scores = SCORES + 1e-3  # a score vector no other test memoised
    eager = explore(scores, K, policy, np.random.default_rng(7))
    lazy = explore(scores, K, policy, np.random.default_rng(7), defer=True)
    assert isinstance(lazy.propensities, DeferredPropensities) and lazy.propensities._values is None
    assert len(lazy.propensities) == K and lazy.propensities._values is None  # len does not compute
    np.testing.assert_array_equal(lazy.items, eager.items)
    assert list(lazy.propensities) == eager.propensities.tolist()
    assert lazy.propensities[0] == eager.propensities[0]
    eps = explore(scores, K, ExplorationPolicy("epsilon", 0.2), np.random.default_rng(7), defer=True)
    assert isinstance(eps.propensities, np.ndarray)  # the exact policies are cheap: never deferred


def test_greedy_is_the_ranking_top_k() -> None:
    rng = np.random.default_rng(7)
    for _ in range(300):
        scores = rng.integers(0, 6, size=40).astype(float)  # many ties
        scores[rng.random(40) < 0.3] = -np.inf
        k = int(rng.integers(1, 15))
        slate = explore(scores, k, ExplorationPolicy(), rng)
        assert slate.items.tolist() == top_k_items(scores, k).tolist()
        assert (slate.propensities == 1.0).all()


def test_edges() -> None:
    rng = np.random.default_rng(0)
    empty = explore(np.full(6, -np.inf), 3, ExplorationPolicy("epsilon", 0.5), rng)
    assert empty.items.shape == (0,) and empty.pool_size == 0
    short = explore(np.array([-np.inf, 1.0, 2.0]), 5, ExplorationPolicy("epsilon", 0.5), rng)
    assert short.items.tolist() == [2, 1] and short.propensities.tolist() == [1.0, 1.0]  # nothing below
    m = marginal_propensities(np.array([-np.inf, 1.0, 2.0]), 5, ExplorationPolicy("plackett_luce"))
    assert m.shape == (3, 5) and (m[:, 2:] == 0).all()
    always = explore(np.arange(20.0), 3, ExplorationPolicy("epsilon", 1.0), rng)
    assert set(always.items.tolist()) <= set(range(17)) and np.allclose(always.propensities, 1 / 17)
    for bad in (np.array([1.0, np.nan]), np.array([1.0, np.inf]), np.zeros((2, 3))):
        with pytest.raises(ValueError):
            explore(bad, 2, ExplorationPolicy(), rng)
    with pytest.raises(ValueError):
        explore(np.zeros(3), 0, ExplorationPolicy(), rng)


def test_parse_and_describe() -> None:
    assert ExplorationPolicy.parse("greedy") == ExplorationPolicy()
    assert ExplorationPolicy.parse("epsilon:0.1") == ExplorationPolicy("epsilon", 0.1)
    assert ExplorationPolicy.parse(" Epsilon:eps=0.2 ") == ExplorationPolicy("epsilon", 0.2)
    pl = ExplorationPolicy.parse("plackett_luce:tau=0.5,n=50")
    assert pl == ExplorationPolicy("plackett_luce", temperature=0.5, top_n=50)
    assert ExplorationPolicy.parse("plackett_luce:temperature=2,top_n=10,mc=500").mc_samples == 500
    assert pl.describe() == {"name": "plackett_luce", "temperature": 0.5, "top_n": 50, "mc_samples": 2000,
                             "propensities": "monte_carlo"}
    assert ExplorationPolicy("epsilon", 0.1).describe() == {"name": "epsilon", "epsilon": 0.1,
                                                            "propensities": "exact"}
    assert explore(SCORES, 2, pl, np.random.default_rng(0)).policy == pl.describe()
    for bad in ("softmax", "epsilon:1.5", "epsilon:x", "plackett_luce:tau=0", "plackett_luce:beta=1",
                "greedy:0.1"):
        with pytest.raises(ValueError):
            ExplorationPolicy.parse(bad)

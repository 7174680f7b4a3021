"""Off-policy estimators (models/ope.py): hand-computed values, support flags, synthetic studies with known truth."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from models.exploration import ExplorationPolicy, explore, marginal_propensities
from models.ope import (
    doubly_robust,
    effective_sample_size,
    iips,
    ips,
    pseudo_inverse,
    snips,
    support_gap,
)

N_SEEDS = 200


def within_two_se(estimates: np.ndarray, truth: float) -> bool:
    return abs(estimates.mean() - truth) <= 2 * estimates.std(ddof=1) / math.sqrt(len(estimates))


# --- hand-computed -------------------------------------------------------------------------------------------

R = [1.0, 0.0, 1.0, 0.0]
MU = [0.5, 0.25, 0.2, 1.0]
PI = [1.0, 0.5, 0.0, 0.5]  # w = [2, 2, 0, 0.5]


def test_ips_snips_dr_by_hand() -> None:
    est = ips(R, MU, PI, n_boot=0)
    assert est.value == pytest.approx(2.0 / 4)  # (2·1 + 2·0 + 0·1 + 0.5·0) / 4
    assert est.ess == pytest.approx(4.5**2 / 8.25)  # (Σw)² / Σw² = 20.25 / (4 + 4 + 0 + 0.25)
    assert (est.n, est.n_unsupported, est.estimator) == (4, 0, "ips")
    assert math.isnan(est.ci_low) and math.isnan(est.ci_high)
    assert snips(R, MU, PI, n_boot=0).value == pytest.approx(2.0 / 4.5)
    # DR: r̂_π + w (r − r̂): 0.6 + 2(0.5) = 1.6; 0.4 + 2(−0.5) = −0.6; 0.5 + 0 = 0.5; 0.3 + 0.5(−0.5) = 0.05
    dr = doubly_robust(R, MU, PI, [0.5] * 4, [0.6, 0.4, 0.5, 0.3], n_boot=0)
    assert dr.value == pytest.approx(1.55 / 4) and dr.estimator == "dr"


def test_slate_estimators_by_hand() -> None:
    clicks = [[1.0, 1.0], [0.0, 1.0]]
    mu = [[0.5, 0.25], [1.0, 0.5]]
    pi = [[1.0, 0.5], [0.5, 0.25]]  # w = [[2, 2], [0.5, 0.5]]
    est = iips(clicks, mu, pi, n_boot=0)
    assert est.value == pytest.approx((2 + 2 + 0 + 0.5) / 2)
    assert est.ess == pytest.approx(2.5**2 / (4 + 0.25))  # per-slate mean weights [2, 0.5]
    # PI: Γ = Σ_p w − (ℓ − 1) = [3, 0]; slate rewards [2, 1] -> (6 + 0) / 2
    pi_est = pseudo_inverse(clicks, mu, pi, n_boot=0)
    assert pi_est.value == pytest.approx(3.0) and pi_est.ess == pytest.approx(1.0)
    assert pseudo_inverse([2.0, 1.0], mu, pi, n_boot=0).value == pytest.approx(3.0)  # (n,) slate rewards


def test_pi_weights_equal_the_papers_pseudo_inverse_for_product_logging() -> None:
    """q_πᵀ Γ_μ^† 1_s (numpy pinv, Swaminathan et al. 2017) == Σ_p π_p/μ_p − (ℓ − 1) when positions are independent."""
    rng = np.random.default_rng(3)
    m, ell = 4, 3
    slot_mu = rng.dirichlet(np.ones(m), size=ell)  # (ℓ, m) independent positions (repeats allowed)
    slates = list(itertools.product(range(m), repeat=ell))
    ind = np.zeros((len(slates), ell * m))
    for row, s in enumerate(slates):
        ind[row, [p * m + a for p, a in enumerate(s)]] = 1
    mu = np.array([np.prod([slot_mu[p, a] for p, a in enumerate(s)]) for s in slates])
    target = rng.dirichlet(np.ones(len(slates)))  # any target law over slates, not a product
    gamma = (ind * mu[:, None]).T @ ind
    q = target @ ind  # (ℓ·m,) target marginals
    paper = ind @ (np.linalg.pinv(gamma) @ q)
    slot_q = q.reshape(ell, m)
    mine = np.array([sum(slot_q[p, a] / slot_mu[p, a] for p, a in enumerate(s)) - (ell - 1) for s in slates])
    np.testing.assert_allclose(mine, paper, atol=1e-8)
    # and the estimator's slate weights are these: one slate, reward 1
    s = slates[5]
    est = pseudo_inverse([1.0], [[slot_mu[p, a] for p, a in enumerate(s)]], [[slot_q[p, a] for p, a in enumerate(s)]],
                         n_boot=0)
    assert est.value == pytest.approx(paper[5])


def test_support_is_flagged_never_dropped() -> None:
    mu, pi = [0.5, 0.0, 0.5, 1.0], [1.0, 0.3, 0.0, 0.5]  # row 1: logged with μ = 0 while π > 0
    est = ips(R, mu, pi, n_boot=0)
    assert est.n == 4 and est.n_unsupported == 1 and est.unsupported_share == 0.25
    assert est.value == pytest.approx(2.0 / 4)  # row 1 kept with weight 0
    flagged = snips(R, MU, PI, unsupported_mass=[0.0, 0.2, 0.0, 0.0], n_boot=0)
    assert flagged.n_unsupported == 1 and flagged.as_dict()["unsupported_share"] == 0.25
    slate = iips([[1.0, 0.0]], [[0.5, 0.0]], [[0.5, 0.2]], n_boot=0)
    assert slate.n_unsupported == 1 and slate.value == pytest.approx(1.0)
    logging = np.array([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]])  # (items, positions)
    target = np.array([[0.5, 0.5], [0.5, 0.0], [0.0, 0.5]])
    assert support_gap(logging, target) == pytest.approx(1.5)  # item 0 at p2, item 1 at p1, item 2 at p2


def test_bootstrap_is_seeded_and_brackets_the_value() -> None:
    rng = np.random.default_rng(0)
    r = rng.random(500) < 0.3
    mu = rng.uniform(0.2, 1.0, 500)
    pi = rng.uniform(0.0, 1.0, 500)
    a, b = ips(r, mu, pi, n_boot=300, seed=4), ips(r, mu, pi, n_boot=300, seed=4)
    assert a == b and a.ci_low < a.value < a.ci_high
    assert ips(r, mu, pi, n_boot=300, seed=5).ci_low != a.ci_low
    s = snips(r, mu, pi, n_boot=300)
    assert s.ci_low < s.value < s.ci_high


def test_validation() -> None:
    with pytest.raises(ValueError):
        ips([1.0, 0.0], [0.5], [0.5, 0.5])
    with pytest.raises(ValueError):
        ips([1.0], [1.5], [0.5])
    with pytest.raises(ValueError):
        ips([], [], [])
    with pytest.raises(ValueError):
        iips([1.0, 0.0], [0.5, 0.5], [0.5, 0.5])  # slates need (n, ℓ)
    with pytest.raises(ValueError):
        ips([1.0], [0.5], [0.5], unsupported_mass=[-1.0])
    assert effective_sample_size(np.zeros(3)) == 0.0
    assert math.isnan(snips([1.0], [0.5], [0.0], n_boot=0).value)  # Σw = 0


# --- the synthetic bandit: 20 arms, known click probabilities --------------------------------------------------

ARMS = 20
CLICK = np.random.default_rng(11).uniform(0.02, 0.3, ARMS)  # true click probability per arm


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max())
    return e / e.sum()


LOGGING = softmax(np.linspace(1.0, -1.0, ARMS))  # prefers the low arms
TARGET = 0.8 * np.eye(ARMS)[int(np.argmax(CLICK))] + 0.2 / ARMS  # ε-greedy (ε = 0.2) on the best arm
TRUTH = float(TARGET @ CLICK)


def bandit_run(seed: int, n: int = 2000, logging: np.ndarray = LOGGING) -> tuple[np.ndarray, ...]:
    rng = np.random.default_rng(seed)
    arms = rng.choice(ARMS, size=n, p=logging)
    rewards = (rng.random(n) < CLICK[arms]).astype(float)
    return arms, rewards


def test_bandit_ips_is_unbiased_and_snips_dr_have_lower_variance() -> None:
    model = 0.7 * CLICK + 0.03  # a misspecified reward model (DR stays unbiased)
    values = {"ips": [], "snips": [], "dr": []}
    covered = 0
    for seed in range(N_SEEDS):
        arms, r = bandit_run(seed)
        mu, pi = LOGGING[arms], TARGET[arms]
        est = ips(r, mu, pi, n_boot=200, seed=seed)
        covered += est.ci_low <= TRUTH <= est.ci_high
        assert est.n_unsupported == 0
        values["ips"].append(est.value)
        values["snips"].append(snips(r, mu, pi, n_boot=0).value)
        values["dr"].append(doubly_robust(r, mu, pi, model[arms], np.full(len(r), TARGET @ model), n_boot=0).value)
    v = {name: np.array(x) for name, x in values.items()}
    assert within_two_se(v["ips"], TRUTH)
    assert within_two_se(v["dr"], TRUTH)
    assert v["snips"].var() < v["ips"].var()
    assert v["dr"].var() < v["ips"].var()
    assert covered / N_SEEDS >= 0.88  # the bootstrap 95% interval covers the truth about 95% of the time


def test_bandit_without_support_is_flagged_and_ips_estimates_the_supported_part() -> None:
    logging = LOGGING.copy()
    logging[15:] = 0.0
    logging /= logging.sum()  # arms 15..19 are never logged
    gap = support_gap(logging, TARGET)
    supported_value = float(TARGET[:15] @ CLICK[:15])  # unsupported mass counts as reward 0
    values = []
    for seed in range(N_SEEDS):
        arms, r = bandit_run(seed, logging=logging)
        est = ips(r, logging[arms], TARGET[arms], unsupported_mass=np.full(len(r), gap), n_boot=0)
        assert est.unsupported_share == 1.0
        values.append(est.value)
    assert gap > 0 and within_two_se(np.array(values), supported_value)


# --- slates under a position-based click model (Craswell et al. 2008): P(click at p) = θ_p · α(item) -----------

THETA = np.array([0.9, 0.6, 0.35])


def test_slate_product_logging_iips_and_pi_are_unbiased() -> None:
    """Each position picks independently from its own 6 items (a product policy: PI is exact)."""
    ell, m = 3, 6
    alpha = np.random.default_rng(2).uniform(0.05, 0.6, (ell, m))  # attractiveness of slot p's item a
    mu = np.array([softmax(np.linspace(0.5, -0.5, m))] * ell)  # (ℓ, m)
    pi = np.array([softmax(2.0 * alpha[p]) for p in range(ell)])
    truth = float(sum(THETA[p] * pi[p] @ alpha[p] for p in range(ell)))
    n = 1000
    est_iips, est_pi = [], []
    for seed in range(N_SEEDS):
        rng = np.random.default_rng(seed)
        items = np.stack([rng.choice(m, size=n, p=mu[p]) for p in range(ell)], axis=1)  # (n, ℓ)
        pos = np.arange(ell)
        clicks = (rng.random((n, ell)) < THETA * alpha[pos, items]).astype(float)
        lp, tp = mu[pos, items], pi[pos, items]
        est_iips.append(iips(clicks, lp, tp, n_boot=0).value)
        est_pi.append(pseudo_inverse(clicks, lp, tp, n_boot=0).value)
    assert within_two_se(np.array(est_iips), truth)
    assert within_two_se(np.array(est_pi), truth)


def test_slate_epsilon_greedy_logging_iips_is_unbiased_and_support_is_flagged() -> None:
    """Logged by explore(ε = 0.3) on a masked row (draws without replacement); target: ε = 0.1 on the same row."""
    scores = np.r_[-np.inf, np.linspace(2.0, -1.0, 24)]
    scores[[5, 9]] = -np.inf
    alpha = np.random.default_rng(4).uniform(0.05, 0.5, scores.shape[0])
    k = 3
    logging = ExplorationPolicy("epsilon", 0.3)
    target_m = marginal_propensities(scores, k, ExplorationPolicy("epsilon", 0.1))  # (n_items, k)
    truth = float(sum(THETA[p] * target_m[:, p] @ alpha for p in range(k)))
    assert support_gap(marginal_propensities(scores, k, logging), target_m) == 0.0
    est = []
    for seed in range(N_SEEDS):
        rng = np.random.default_rng(seed)
        slates = [explore(scores, k, logging, rng) for _ in range(300)]
        items = np.stack([s.items for s in slates])  # (n, k)
        lp = np.stack([s.propensities for s in slates])
        clicks = (rng.random(items.shape) < THETA * alpha[items]).astype(float)
        est.append(iips(clicks, lp, target_m[items, np.arange(k)], n_boot=0).value)
    assert within_two_se(np.array(est), truth)
    # a target that moves a greedy item to another position has no logging support there: flagged
    reordered = scores.copy()
    reordered[1], reordered[2] = reordered[2], reordered[1]
    greedy_m = marginal_propensities(reordered, k, ExplorationPolicy())
    gap = support_gap(marginal_propensities(scores, k, logging), greedy_m)
    assert gap == pytest.approx(2.0)  # slots 1 and 2 swap: two (item, position) pairs never logged
    lp = np.stack([s.propensities for s in slates])
    flagged = iips(clicks, lp, greedy_m[items, np.arange(k)], unsupported_mass=np.full(len(slates), gap), n_boot=0)
    assert flagged.unsupported_share == 1.0

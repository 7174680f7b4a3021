"""Off-policy estimators: the value of a target policy from exposures logged under another (exploring) policy.

Pure numpy on logged arrays; the propensities come from ``models/exploration.py`` (logged with each exposure,
``Slate.propensities``; a target policy's marginals by ``marginal_propensities(...)[item, position]``).

One logged unit per row (a request; for slates, one slate of ℓ positions). Every estimator returns an
``Estimate``: the value, a seeded percentile-bootstrap 95% interval over units (``n_boot`` resamples;
``n_boot=0`` skips it and gives NaN bounds), the effective sample size of its importance weights
(Kish: (Σw)² / Σw²; equal to n when every weight is 1), n, and the support count.

Single action (the top slot, or one position treated on its own; rewards (n,), propensities (n,)):

- ``ips``: inverse propensity scoring, (1/n) Σ w_i r_i with w_i = π(a_i|x_i) / μ(a_i|x_i) (Horvitz &
  Thompson, JASA 1952; for bandits e.g. Li, Chu, Langford & Wang, "Unbiased offline evaluation of
  contextual-bandit-based news article recommendation algorithms", WSDM 2011). Unbiased under support.
- ``snips``: self-normalised IPS, Σ w_i r_i / Σ w_i (Swaminathan & Joachims, "The self-normalized estimator
  for counterfactual learning", NeurIPS 2015). Biased O(1/n), lower variance, bounded by the reward range.
- ``doubly_robust``: (1/n) Σ [r̂_π(x_i) + w_i (r_i − r̂(x_i, a_i))] with r̂_π(x) = Σ_a π(a|x) r̂(x, a)
  (Dudík, Langford & Li, "Doubly robust policy evaluation and learning", ICML 2011). Unbiased when the
  propensities are right, whatever the reward model; lower variance the better the model.

Slates of ℓ positions under a click model (clicks (n, ℓ); per (logged item, position) marginals (n, ℓ)):

- ``iips``: Σ_p c_ip · π_p(a_ip) / μ_p(a_ip), averaged over slates, where μ_p(a) / π_p(a) are the logging /
  target probabilities that item a is shown at position p. This is the item-position-model estimator of
  Li, Abbasi-Yadkori, Kveton, Muthukrishnan, Vinay & Wen, "Offline evaluation of ranking policies with
  click models", KDD 2018, called IIPS (independent-item IPS) in later work (e.g. Kiyohara et al., WSDM
  2022). Unbiased for the expected clicks summed over positions
  whenever P(click at p | slate) depends only on (item, position) at p (their item-position model, of which
  the position-based model is a special case), for any logging policy with support.
- ``pseudo_inverse``: the PI estimator of Swaminathan, Krishnamurthy, Agarwal, Dudík, Langford, Jose &
  Zitouni, "Off-policy evaluation for slate recommendation", NeurIPS 2017:
  V̂ = (1/n) Σ_i r_i · q_π(x_i)ᵀ Γ_μ(x_i)^† 1_{s_i}, for a slate reward r that is additive over
  (position, item) (their linearity assumption), with q_π = E_π[1_s] the target's (position, item)
  marginals and Γ_μ = E_μ[1_s 1_sᵀ]. Γ_μ needs the logging policy's pairwise joint probabilities; from
  per-(item, position) marginals alone it is known only when the logging policy draws its positions
  independently (a product of its slot marginals). That is the form implemented:

      Γ_μ^† form = Σ_p π_p(a_ip) / μ_p(a_ip) − (ℓ − 1),

  exact for product logging policies (proof in ``pseudo_inverse``; a test checks it against numpy's
  pseudo-inverse), e.g. uniform logging where each position draws independently. Under logging policies
  that draw without replacement (ε-greedy below the top k, Plackett-Luce, uniform over ordered ℓ-subsets)
  the positions are dependent, the exact Γ_μ^† weight differs, and this form is an approximation (small when
  the pool is large: draws from n_B items without replacement are nearly independent); IIPS stays unbiased
  there under its own assumption.

Support: an action with logging probability 0 is never logged, so its reward cannot be reweighted. Each
estimator counts the units where the target puts mass the logging policy cannot produce — a logged row
with μ = 0 < π (corrupt or mismatched propensities), or ``unsupported_mass`` > 0 given by the caller (the
target's mass on actions, or (item, position) pairs, with logging probability 0 in that context, e.g.
``support_gap``) — as ``n_unsupported`` (``Estimate.unsupported_share``), and never drops a unit: a μ = 0 row
keeps its place with weight 0. By their definitions IPS and IIPS/PI then estimate the value on the supported
part only (unsupported mass counts as reward 0: biased low), SNIPS the target's mean reward renormalised to
its supported part, and DR covers the unsupported mass with the reward model alone (r̂_π) — each is flagged.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

#: Bootstrap resamples by default, and the elements drawn per bootstrap chunk (memory bound).
DEFAULT_N_BOOT = 1000
_CHUNK = 2_000_000


@dataclass(frozen=True)
class Estimate:
    """An off-policy estimate.

    Attributes:
        value: the estimated value of the target policy (per unit: per request, or per slate).
        ci_low, ci_high: percentile-bootstrap 95% interval over units (NaN when ``n_boot=0``).
        ess: effective sample size of the importance weights, (Σw)² / Σw² (0 when all weights are 0).
        n: logged units.
        n_unsupported: units where the target has mass outside the logging support (flagged, kept).
        estimator: ``ips`` | ``snips`` | ``dr`` | ``iips`` | ``pi``.
    """

    value: float
    ci_low: float
    ci_high: float
    ess: float
    n: int
    n_unsupported: int
    estimator: str = ""

    @property
    def unsupported_share(self) -> float:
        """n_unsupported / n: the share of units whose target mass is partly outside the logging support."""
        return self.n_unsupported / self.n if self.n else 0.0

    def as_dict(self) -> dict[str, Any]:
        """Plain fields plus ``unsupported_share`` (for logging)."""
        return {**asdict(self), "unsupported_share": self.unsupported_share}


def effective_sample_size(weights: np.ndarray) -> float:
    """Kish's effective sample size (Σw)² / Σw² of (n,) importance weights (0 when every weight is 0)."""
    w = np.asarray(weights, dtype=np.float64)
    sq = float(np.dot(w, w))
    return float(w.sum()) ** 2 / sq if sq > 0 else 0.0


def support_gap(logging_marginals: np.ndarray, target_marginals: np.ndarray) -> float:
    """The target's probability mass where the logging probability is 0 (summed over positions).

    Args:
        logging_marginals, target_marginals: the same shape: (n_items,) action probabilities of one
            context, or (n_items, k) per-(item, position) marginals (``marginal_propensities``).
    Returns:
        Σ π over entries with μ = 0 (in [0, k]); pass it per context as ``unsupported_mass``.
    """
    mu = np.asarray(logging_marginals, dtype=np.float64)
    pi = np.asarray(target_marginals, dtype=np.float64)
    if mu.shape != pi.shape:
        raise ValueError(f"logging {mu.shape} and target {pi.shape} marginals disagree")
    return float(pi[mu <= 0].sum())


def _prob(name: str, values: Any, shape: tuple[int, ...] | None = None) -> np.ndarray:
    a = np.asarray(values, dtype=np.float64)
    if shape is not None and a.shape != shape:
        raise ValueError(f"{name} has shape {a.shape}; expected {shape}")
    if not np.isfinite(a).all() or (a < 0).any() or (a > 1).any():
        raise ValueError(f"{name} must be probabilities in [0, 1]")
    return a


def _finite(name: str, values: Any, shape: tuple[int, ...]) -> np.ndarray:
    a = np.asarray(values, dtype=np.float64)
    if a.shape != shape:
        raise ValueError(f"{name} has shape {a.shape}; expected {shape}")
    if not np.isfinite(a).all():
        raise ValueError(f"{name} must be finite")
    return a


def _weights(logging_p: np.ndarray, target_p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(w, unsupported): π/μ where μ > 0, else 0; unsupported where μ = 0 < π (any shape)."""
    supported = logging_p > 0
    w = np.divide(target_p, logging_p, out=np.zeros_like(target_p), where=supported)
    return w, ~supported & (target_p > 0)


def _unsupported(rows: np.ndarray, unsupported_mass: Any, n: int) -> int:
    """Units flagged: a μ = 0 < π row (rows: (n,) bool) or a positive caller-given unsupported mass."""
    flagged = rows.copy()
    if unsupported_mass is not None:
        mass = np.asarray(unsupported_mass, dtype=np.float64)
        if mass.shape != (n,) or not np.isfinite(mass).all() or (mass < 0).any():
            raise ValueError(f"unsupported_mass must be (n,) = ({n},) non-negative values; got {mass.shape}")
        flagged |= mass > 0
    return int(flagged.sum())


def _bootstrap(num: np.ndarray, den: np.ndarray | None, n_boot: int, seed: int) -> tuple[float, float]:
    """Percentile 95% interval of Σnum/Σden (den None: the mean of num) over n_boot unit resamples."""
    if n_boot < 0:
        raise ValueError(f"n_boot={n_boot}; expected >= 0")
    if n_boot == 0:
        return math.nan, math.nan
    rng = np.random.default_rng(seed)
    n = num.shape[0]
    stats = []
    per = max(1, _CHUNK // n)
    for start in range(0, n_boot, per):
        idx = rng.integers(0, n, size=(min(per, n_boot - start), n))  # (b, n) resampled units
        with np.errstate(divide="ignore", invalid="ignore"):
            stats.append(num[idx].sum(axis=1) / (den[idx].sum(axis=1) if den is not None else n))
    values = np.concatenate(stats)
    values = values[np.isfinite(values)]  # SNIPS: a resample with Σw = 0 has no value
    if not values.size:
        return math.nan, math.nan
    low, high = np.percentile(values, [2.5, 97.5])
    return float(low), float(high)


def _estimate(
    name: str, num: np.ndarray, den: np.ndarray | None, weights: np.ndarray, n_unsupported: int, n_boot: int,
    seed: int,
) -> Estimate:
    total = den.sum() if den is not None else num.shape[0]
    value = float(num.sum() / total) if total != 0 else math.nan
    low, high = _bootstrap(num, den, n_boot, seed)
    return Estimate(value, low, high, effective_sample_size(weights), int(num.shape[0]), n_unsupported, name)


def _bandit_inputs(rewards: Any, logging_p: Any, target_p: Any) -> tuple[np.ndarray, ...]:
    r = np.asarray(rewards, dtype=np.float64)
    if r.ndim != 1 or r.shape[0] == 0:
        raise ValueError(f"rewards must be a non-empty (n,) array; got shape {r.shape}")
    r = _finite("rewards", r, r.shape)
    mu = _prob("logging_p", logging_p, r.shape)
    pi = _prob("target_p", target_p, r.shape)
    w, unsupported = _weights(mu, pi)
    return r, w, unsupported


def ips(
    rewards: Any, logging_p: Any, target_p: Any, *, unsupported_mass: Any = None, n_boot: int = DEFAULT_N_BOOT,
    seed: int = 0,
) -> Estimate:
    """Inverse propensity scoring: (1/n) Σ π_i/μ_i · r_i (Horvitz & Thompson 1952).

    Args:
        rewards: (n,) observed rewards of the logged actions (clicks: 0/1).
        logging_p: (n,) μ(a_i|x_i), the logged propensity of the logged action.
        target_p: (n,) π(a_i|x_i), the target policy's probability of that action.
        unsupported_mass: optional (n,) target mass on actions with μ = 0 in context i (flag only).
        n_boot: bootstrap resamples (0: no interval).
        seed: bootstrap seed.
    Returns:
        ``Estimate`` (ESS of w = π/μ).
    """
    r, w, unsupported = _bandit_inputs(rewards, logging_p, target_p)
    n_unsup = _unsupported(unsupported, unsupported_mass, r.shape[0])
    return _estimate("ips", w * r, None, w, n_unsup, n_boot, seed)


def snips(
    rewards: Any, logging_p: Any, target_p: Any, *, unsupported_mass: Any = None, n_boot: int = DEFAULT_N_BOOT,
    seed: int = 0,
) -> Estimate:
    """Self-normalised IPS: Σ w_i r_i / Σ w_i (Swaminathan & Joachims, NeurIPS 2015). Arguments as ``ips``.

    The value is NaN when every weight is 0 (the target never picks a logged action).
    """
    r, w, unsupported = _bandit_inputs(rewards, logging_p, target_p)
    n_unsup = _unsupported(unsupported, unsupported_mass, r.shape[0])
    return _estimate("snips", w * r, w, w, n_unsup, n_boot, seed)


def doubly_robust(
    rewards: Any, logging_p: Any, target_p: Any, reward_hat_logged: Any, reward_hat_target: Any, *,
    unsupported_mass: Any = None, n_boot: int = DEFAULT_N_BOOT, seed: int = 0,
) -> Estimate:
    """Doubly robust: (1/n) Σ [r̂_π(x_i) + w_i (r_i − r̂(x_i, a_i))] (Dudík, Langford & Li, ICML 2011).

    Args:
        rewards, logging_p, target_p: as ``ips``.
        reward_hat_logged: (n,) the reward model's prediction r̂(x_i, a_i) for the logged action.
        reward_hat_target: (n,) r̂_π(x_i) = Σ_a π(a|x_i) r̂(x_i, a), the model's value of the target in context i
            (it covers unsupported target mass too).
        unsupported_mass, n_boot, seed: as ``ips``.
    Returns:
        ``Estimate`` (ESS of w = π/μ).
    """
    r, w, unsupported = _bandit_inputs(rewards, logging_p, target_p)
    hat_logged = _finite("reward_hat_logged", reward_hat_logged, r.shape)
    hat_target = _finite("reward_hat_target", reward_hat_target, r.shape)
    n_unsup = _unsupported(unsupported, unsupported_mass, r.shape[0])
    return _estimate("dr", hat_target + w * (r - hat_logged), None, w, n_unsup, n_boot, seed)


def _slate_inputs(clicks: Any, logging_p: Any, target_p: Any) -> tuple[np.ndarray, ...]:
    c = np.asarray(clicks, dtype=np.float64)
    if c.ndim != 2 or c.shape[0] == 0 or c.shape[1] == 0:
        raise ValueError(f"clicks must be a non-empty (n, slate_len) array; got shape {c.shape}")
    c = _finite("clicks", c, c.shape)
    mu = _prob("logging_p", logging_p, c.shape)
    pi = _prob("target_p", target_p, c.shape)
    w, unsupported = _weights(mu, pi)
    return c, w, unsupported.any(axis=1)


def iips(
    clicks: Any, logging_p: Any, target_p: Any, *, unsupported_mass: Any = None, n_boot: int = DEFAULT_N_BOOT,
    seed: int = 0,
) -> Estimate:
    """Independent-item IPS: (1/n) Σ_i Σ_p c_ip · π_p(a_ip)/μ_p(a_ip) (Li et al., KDD 2018, item-position model).

    Estimates the expected clicks per slate summed over positions; unbiased when a position's click
    probability depends only on the (item, position) there (position-based model included) and every target
    (item, position) has logging marginal > 0.

    Args:
        clicks: (n, ℓ) clicks (or any per-position rewards) of the logged slates.
        logging_p: (n, ℓ) μ_p(a_ip): P(logged item at its position) under the logging policy
            (``Slate.propensities``).
        target_p: (n, ℓ) π_p(a_ip): the target's marginal of the same (item, position)
            (``marginal_propensities(target)[items, arange(ℓ)]``).
        unsupported_mass: optional (n,) target mass on (item, position) pairs with logging marginal 0
            (``support_gap``), flag only.
        n_boot, seed: bootstrap over slates.
    Returns:
        ``Estimate``; ESS of the per-slate mean weight (1/ℓ) Σ_p π_p/μ_p.
    """
    c, w, unsupported = _slate_inputs(clicks, logging_p, target_p)
    n_unsup = _unsupported(unsupported, unsupported_mass, c.shape[0])
    return _estimate("iips", (w * c).sum(axis=1), None, w.mean(axis=1), n_unsup, n_boot, seed)


def pseudo_inverse(
    rewards: Any, logging_p: Any, target_p: Any, *, unsupported_mass: Any = None, n_boot: int = DEFAULT_N_BOOT,
    seed: int = 0,
) -> Estimate:
    """Pseudo-inverse estimator (Swaminathan et al., NeurIPS 2017) with per-(item, position) marginals.

    V̂ = (1/n) Σ_i r_i · Γ_i with Γ_i = Σ_p π_p(a_ip)/μ_p(a_ip) − (ℓ − 1), which is the paper's
    q_πᵀ Γ_μ^† 1_s when the logging policy draws its ℓ positions independently. Proof: for such μ,
    Γ_μ[(p, a), (p', a')] = μ_p(a) 1{a = a'} when p = p', and μ_p(a) μ_p'(a') otherwise. Take
    v_p(a) = π_p(a)/μ_p(a) − (ℓ − 1)/ℓ. Then (Γ_μ v)_(p, a) = μ_p(a) v_p(a) + μ_p(a) Σ_{p' ≠ p} E_μ[v_p'(a_p')]
    = π_p(a) − μ_p(a)(ℓ − 1)/ℓ + μ_p(a)(ℓ − 1)(1 − (ℓ − 1)/ℓ) = π_p(a), using Σ_a π_p'(a) = 1 on the support.
    So v solves Γ_μ v = q_π, and any two solutions give the same 1_sᵀ v on the logging support (they differ
    by u with uᵀ Γ_μ u = E_μ[(1_sᵀ u)²] = 0), so 1_sᵀ Γ_μ^† q_π = Σ_p v_p(a_p) = Γ_i above.

    Assumptions: (1) the slate reward is additive over (position, item) in expectation (e.g. the sum of
    clicks under the position-based model); (2) the logging positions are independent given the context
    (otherwise this is an approximation, see the module docstring); (3) target support within logging support.
    Unbiased under (1)–(3). The weight Γ_i can be negative; its mean under μ is 1. A logged position with
    μ = 0 (outside the logging support) contributes ratio 0 and flags its slate.

    Args:
        rewards: (n,) slate rewards, or (n, ℓ) per-position clicks (summed per slate).
        logging_p, target_p: (n, ℓ) marginals of the logged (item, position) pairs, as ``iips``.
        unsupported_mass, n_boot, seed: as ``iips``.
    Returns:
        ``Estimate``; ESS of the slate weights Γ_i.
    """
    mu = np.asarray(logging_p, dtype=np.float64)
    if mu.ndim != 2:
        raise ValueError(f"logging_p must be (n, slate_len); got shape {mu.shape}")
    r = np.asarray(rewards, dtype=np.float64)
    if r.ndim == 2:
        r = _finite("rewards", r, mu.shape).sum(axis=1)
    r = _finite("rewards", r, (mu.shape[0],))
    _, w, unsupported = _slate_inputs(np.zeros(mu.shape), mu, target_p)
    n_unsup = _unsupported(unsupported, unsupported_mass, mu.shape[0])
    gamma = w.sum(axis=1) - (mu.shape[1] - 1)
    return _estimate("pi", gamma * r, None, gamma, n_unsup, n_boot, seed)

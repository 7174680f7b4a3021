"""Off-policy estimates of a model's online CTR from the exposure log, and the gate rule on them.

The evaluate flow (``flows/evaluate.py``) calls ``ope_task`` after the offline gate. It reads the exposure
log with the linked feedback (``recloop.exposures.ExposureLog.read``, ``recloop.eventlog.EventLog.linked``),
estimates what the candidate and the champion would earn online if they answered the logged requests
greedily, and applies ``ope_gate``. The pure helpers are tested by hand in ``tests/unit/test_ope_gate.py``.

**What is used** (``logged_requests``). One unit per logged request (exposure) with at least one slot and a
non-empty ``context`` (a cold start is answered by popularity whatever the model, so it cannot tell two
models apart):

- the context: the exposure's history item ids (oldest first), what the logging model scored;
- the logged slate: item ids by position; the logging marginal propensity of each slot, P(item at position)
  under the logging policy (``models.exploration``), as logged; the pool size (candidates left after
  masking); the logging policy's text (``greedy``, ``epsilon:0.1``, ``plackett_luce:tau=0.5,n=50``);
- the click per slot: a ``positive`` event of the event policy linked to the request (``request_id``) whose
  ``item_id`` is the slot's item (repeated reports count once).

A ``greedy`` exposure is deterministic logging: its slots' propensity is 1 (the logged value when there is
one). Any other policy counts only when every slot has a logged propensity in [0, 1]; the rest (e.g.
``interleaving``, whose merged slots carry none) are left out and counted by reason in ``excluded``.
"Exploratory" requests are those whose policy is not ``greedy``.

**The target policy** (``estimate_online_ctr``): the model's greedy top k on each logged context, as
serving would answer: the context ids the model's vocabulary knows are scored (``models.ranking``:
``score_histories``, the model's own window), what serving masked is masked (the exposure's ``masked``:
everything the user had consumed, not only the window, and the suppressed items; ``seen_mask`` +
``mask_scores``; exposures recorded before revision 0005 have no ``masked`` and mask the context only) and
``top_k`` takes the slate. It is deterministic: π_p(a) = 1 for the target's
item at position p, 0 otherwise.

**Estimators** (``models/ope.py``; bootstrap 95% intervals over requests, seeded; Kish ESS):

- ``snips`` (top slot): the self-normalised IPS of the click at position 1, Σ w r / Σ w with
  w = π_1(logged item) / μ_1(logged item): a CTR of the first slot.
- ``dr`` (top slot): doubly robust (Dudík, Langford & Li, ICML 2011) with a reward model fitted on the logged
  clicks of position 1 (``fit_reward_model``): P(click | item a at position 1, context x) =
  σ(b0 + b1 · log rank(a) + b2 · log P(a | x)), where rank is the item's rank (1 = best) under the evaluated
  model's masked scores and P its softmax probability over the masked catalogue, fitted by ridge-regularised
  logistic regression (Newton steps, numpy) on the logged (features, click) pairs, with b1 <= 0 and b2 >= 0
  (a coefficient of the wrong sign is held at 0). The target's own item has rank 1, so
  r̂_π(x) = σ(b0 + b2 · log max_a P(a | x)): it depends on how sure the model is for that user, so the
  requests where the target and the logger disagree (no support) are not all given the agreeing requests'
  CTR (those are the users the models find easy). Measured in ``bench.ope_study`` (20 seeds, peer target):
  bias +1.1 pt and 20/20 seeds covered, against +3.3 pt and 16/20 with the rank-only model. Fitted on the same log it
  corrects (no cross-fitting); its bootstrap interval refits the model in every resample (``dr_refit_interval``), so the
  model's own estimation error is in the interval.
- ``iips`` / ``pi`` (slate, positions 1..K with K = min(k, the longest logged slate)): independent-item IPS
  and the pseudo-inverse estimator: expected clicks per request over the first K positions (not a rate).
  A logged slate shorter than K counts 0 clicks at the missing positions and is flagged unsupported.

**Support** (never silently dropped: ``n_unsupported`` / ``unsupported_share`` of each estimate). The
target's item t at position p is unsupported when the logging policy could not have shown it there, judged
from what the exposure records:

- t is the logged item at p: supported when its logged propensity is > 0;
- the logged slate has no position p, or the logging policy is deterministic (``greedy``, ``epsilon:0``, or
  a policy text ``models.exploration.ExplorationPolicy.parse`` does not read): unsupported;
- ε-greedy: unsupported when t was shown at another slot q as the logger's greedy item (logged propensity
  ≥ 1 − ε: ε-greedy never moves a greedy item to another slot), or when nothing was left to explore
  (pool size ≤ slate length); otherwise supported (ε / n_B for the pool below the top k, 1 − ε for the
  logger's greedy item of slot p). The logger's greedy items of other replaced slots are not recorded and
  are taken as supported: at most ⌈ε·k⌉ items of the pool per request;
  with a bounded pool (``epsilon:0.1,n=N``: draws from the logger's ranks k+1..N, which the log does not
  record) only an item the log shows as explored counts as supported, unless the pool is no larger than N;
- Plackett-Luce: supported when t was shown (a top-N candidate has mass at every position) or when the
  pool is no larger than N (every unmasked item is a candidate); otherwise not known to be supported,
  counted as unsupported (conservative).

**The rule** (``ope_gate``): the candidate's lower 95% bound of the chosen estimator (``ope_estimator``,
SNIPS by default) must not fall below the champion's estimate of the same estimator by more than
``ope_tolerance`` (absolute: CTR for snips/dr, clicks per request for iips/pi). It is skipped
(``passed=None``; the reason says why) when it is off, the log is unreadable or empty, fewer than
``ope_min_requests`` exploratory requests are logged, there is no champion, either model's estimate has an
ESS below ``ope_min_ess`` or an unsupported share above ``ope_max_unsupported_share``, or the estimate has no
value or interval. Only a rule that ran is ANDed into the gate (``apply_ope_gate``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from functools import lru_cache
from typing import Any

import numpy as np
import pandas as pd
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from models import ope as estimators
from models.exploration import ExplorationPolicy
from models.ranking import encode_history, mask_scores, score_histories, seen_mask, top_k
from models.vocab import PAD_IDX, ItemVocabulary
from recloop.gate import EPS, GateDecision
from recloop.policy import EventPolicy

#: Slate positions the target fills (the gate's K).
OPE_K = 10
#: The estimators and the name of their value (snips/dr: top-slot CTR; iips/pi: clicks per request over K).
VALUE_NAMES = {"snips": "snips_ctr", "dr": "dr_ctr", "iips": "iips_clicks", "pi": "pi_clicks"}
ESTIMATORS = tuple(VALUE_NAMES)
#: Ridge penalty of the DR reward model's logistic regression (on both coefficients).
CLICK_MODEL_RIDGE = 1e-3
_SCORE_BATCH = 512


@dataclass(frozen=True)
class LoggedRequest:
    """One logged request usable for off-policy estimates (see the module docstring).

    Attributes:
        request_id: the exposure's id.
        context: history item ids the logging model scored, oldest first (non-empty).
        slate: shown item ids, position 1 first.
        propensities: (ℓ,) logging marginal P(slate[p] at p); 1 for greedy logging.
        clicks: (ℓ,) 1.0 where a positive event is linked to that slot's item, else 0.0.
        pool_size: candidates left after masking when logged (None: unknown).
        policy: the logging policy's text.
        masked: the item ids serving masked before ranking (None: not recorded; the context is masked).
    """

    request_id: str
    context: tuple[str, ...]
    slate: tuple[str, ...]
    propensities: np.ndarray
    clicks: np.ndarray
    pool_size: int | None
    policy: str
    masked: tuple[str, ...] | None = None

    @property
    def exploratory(self) -> bool:
        return self.policy != "greedy"


@dataclass(frozen=True)
class LoggedData:
    """The logged requests usable for off-policy estimates, and the ones left out by reason."""

    requests: list[LoggedRequest]
    excluded: dict[str, int] = field(default_factory=dict)

    @property
    def n(self) -> int:
        return len(self.requests)

    @property
    def n_exploratory(self) -> int:
        return sum(r.exploratory for r in self.requests)

    def describe(self) -> dict[str, Any]:
        """Counts for the report: requests used, exploratory ones, clicks, policies, exclusions by reason."""
        policies: dict[str, int] = {}
        for r in self.requests:
            policies[r.policy] = policies.get(r.policy, 0) + 1
        return {"n_requests": self.n, "n_exploratory": self.n_exploratory,
                "n_clicks": int(sum(r.clicks.sum() for r in self.requests)),
                "policies": dict(sorted(policies.items())), "excluded": dict(sorted(self.excluded.items()))}


def logged_requests(exposures: pd.DataFrame, items: pd.DataFrame, events: pd.DataFrame | None,
                    policy: EventPolicy) -> LoggedData:
    """The requests of the exposure log usable for off-policy estimates, with their clicks. Pure.

    Args:
        exposures: ``ExposureLog.read()[0]``: ``request_id``, ``policy``, ``context`` (list of ids) and,
            when present, ``pool_size`` and ``masked`` (list of ids or None).
        items: ``ExposureLog.read()[1]``: ``request_id``, ``position`` (1-based), ``item_id``, ``propensity``.
        events: ``EventLog.linked()``: ``request_id``, ``item_id``, ``event_type`` and optional ``value``
            (None or empty: no clicks).
        policy: the event policy (a ``positive`` event is a click).
    Returns:
        ``LoggedData`` in the exposures' order; left out, by reason: ``empty_slate`` (no items),
        ``no_context`` (cold start), ``no_propensity`` (a non-greedy policy without a propensity on every
        slot, e.g. interleaving), ``bad_propensity`` (a logged value outside [0, 1]).
    """
    excluded: dict[str, int] = {}
    if exposures is None or exposures.empty:
        return LoggedData([], excluded)
    clicked: set[tuple[str, str]] = set()
    if events is not None and len(events):
        values = events["value"] if "value" in events else None
        positive = policy.roles(events["event_type"], values) == "positive"
        pos = events[positive]
        clicked = set(zip(pos["request_id"].astype(str), pos["item_id"].astype(str), strict=True))
    slates: dict[str, tuple[list[str], np.ndarray]] = {}
    if items is not None and len(items):
        ordered = items.sort_values(["request_id", "position"], kind="stable")
        for request_id, group in ordered.groupby("request_id", sort=False):
            slates[str(request_id)] = (group["item_id"].astype(str).tolist(),
                                       pd.to_numeric(group["propensity"], errors="coerce").to_numpy(np.float64))
    pools = exposures["pool_size"] if "pool_size" in exposures else pd.Series([None] * len(exposures))
    masks = exposures["masked"].tolist() if "masked" in exposures else [None] * len(exposures)
    out: list[LoggedRequest] = []

    def leave_out(reason: str) -> None:
        excluded[reason] = excluded.get(reason, 0) + 1

    for request_id, logging, context, pool, mask in zip(exposures["request_id"].astype(str), exposures["policy"],
                                                        exposures["context"], pools.tolist(), masks, strict=True):
        slate, props = slates.get(request_id, ([], np.zeros(0)))
        context = tuple(str(x) for x in (context or ()))
        logging = str(logging or "greedy").strip()
        if not slate:
            leave_out("empty_slate")
            continue
        if not context:
            leave_out("no_context")
            continue
        if logging == "greedy":
            props = np.where(np.isfinite(props), props, 1.0)
        elif not np.isfinite(props).all():
            leave_out("no_propensity")
            continue
        if ((props < 0) | (props > 1)).any():
            leave_out("bad_propensity")
            continue
        clicks = np.array([1.0 if (request_id, item) in clicked else 0.0 for item in slate])
        pool_size = None if pool is None or pd.isna(pool) else int(pool)
        masked = None if mask is None or (not isinstance(mask, list | tuple) and pd.isna(mask)) else tuple(
            str(x) for x in mask)
        out.append(LoggedRequest(request_id, context, tuple(slate), props, clicks, pool_size, logging, masked))
    return LoggedData(out, excluded)


@lru_cache(maxsize=64)
def _parse_policy(text: str) -> ExplorationPolicy | None:
    try:
        return ExplorationPolicy.parse(text)
    except ValueError:
        return None


def target_supported(target: str | None, position: int, request: LoggedRequest,
                     logging: ExplorationPolicy | None) -> bool:
    """Could the logging policy of ``request`` have shown ``target`` at 0-based ``position``? (module docstring)

    Args:
        target: the target's item id at that position (None: the target shows nothing there: supported).
        position: 0-based position.
        request: the logged request.
        logging: its parsed logging policy (None: not readable, treated as deterministic).
    """
    if target is None:
        return True
    slate = request.slate
    if position >= len(slate):
        return False
    if slate[position] == target:
        return bool(request.propensities[position] > 0)
    if logging is None or logging.name == "greedy" or (logging.name == "epsilon" and logging.epsilon == 0.0):
        return False
    shown_at = slate.index(target) if target in slate else None
    if logging.name == "epsilon":
        if request.pool_size is not None and request.pool_size <= len(slate):
            return False  # nothing below the top k: every slot keeps its greedy item
        explored = shown_at is not None and bool(request.propensities[shown_at] < 1.0 - logging.epsilon - 1e-9)
        if logging.top_n is not None and not (request.pool_size is not None and request.pool_size <= logging.top_n):
            return explored  # drawn from ranks k+1..N of the logger, which the log does not record
        return shown_at is None or explored
    if logging.name == "plackett_luce":
        return shown_at is not None or (request.pool_size is not None
                                        and request.pool_size <= (logging.n_candidates or request.pool_size))
    return False


def _sigmoid(x: np.ndarray | float) -> np.ndarray | float:
    return 1.0 / (1.0 + np.exp(-np.asarray(x, dtype=np.float64)))


def fit_click_model(ranks: Sequence[float] | np.ndarray, clicks: Sequence[float] | np.ndarray, *,
                    ridge: float = CLICK_MODEL_RIDGE, max_iter: int = 100) -> tuple[float, float]:
    """P(click) = σ(b0 + b1 · log rank) by ridge logistic regression (``fit_reward_model``), b1 held <= 0.

    When the fitted b1 is > 0 (clicks rising down the ranking) it is set to 0 and b0 refitted alone, so
    the map is non-increasing in rank.

    Args:
        ranks: (n,) ranks >= 1 of the logged items under the evaluated model (1 = its best item).
        clicks: (n,) 0/1 clicks.
        ridge: the L2 penalty (> 0 keeps the fit finite when every click is 0 or 1).
    Returns:
        (b0, b1).
    Raises:
        ValueError: empty input, shapes disagree, a rank < 1 or ridge <= 0.
    """
    r = np.asarray(ranks, dtype=np.float64)
    y = np.asarray(clicks, dtype=np.float64)
    if r.ndim != 1 or r.shape != y.shape or r.shape[0] == 0:
        raise ValueError(f"ranks {r.shape} and clicks {y.shape} must be the same non-empty (n,) shape")
    if not (np.isfinite(r).all() and (r >= 1).all()):
        raise ValueError("ranks must be finite and >= 1")
    b0, b1 = fit_reward_model(np.column_stack([np.ones_like(r), np.log(r)]), y, signs=(-1,), ridge=ridge,
                              max_iter=max_iter)
    return float(b0), float(b1)


#: Floor of a log probability in the reward model's features (an item the target masked has probability 0).
LOG_PROB_FLOOR = -30.0
#: The DR reward model's features after the intercept, and their sign constraints (``fit_reward_model``).
REWARD_FEATURES = ("log rank under the model", "log softmax probability under the model")
REWARD_SIGNS = (-1, 1)


def reward_features(ranks: np.ndarray, log_probs: np.ndarray) -> np.ndarray:
    """(n, 3) features of the DR reward model: [1, log rank, log P_model(item | context)].

    Args:
        ranks: (n,) rank >= 1 of the item under the evaluated model's masked scores.
        log_probs: (n,) log of its softmax probability over the masked catalogue (floored at ``LOG_PROB_FLOOR``).
    """
    r = np.asarray(ranks, dtype=np.float64)
    return np.column_stack([np.ones_like(r), np.log(r), np.asarray(log_probs, dtype=np.float64)])


def fit_reward_model(x: np.ndarray, clicks: np.ndarray, *, signs: Sequence[int] = (),
                     ridge: float = CLICK_MODEL_RIDGE, max_iter: int = 100) -> np.ndarray:
    """Ridge logistic regression P(click) = σ(x β) with sign constraints, by Newton steps. Pure numpy.

    Args:
        x: (n, d) features, column 0 the intercept (ones).
        clicks: (n,) 0/1.
        signs: for columns 1..d-1, -1 (the coefficient must be <= 0), +1 (>= 0) or 0 (free); a fitted
            coefficient of the wrong sign is held at 0 and the rest refitted (repeated until none is).
        ridge: L2 penalty (> 0) on every coefficient.
    Returns:
        (d,) β.
    Raises:
        ValueError: shapes disagree, n = 0, non-finite features or ridge <= 0.
    """
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(clicks, dtype=np.float64)
    if x.ndim != 2 or y.ndim != 1 or x.shape[0] != y.shape[0] or x.shape[0] == 0:
        raise ValueError(f"x {x.shape} and clicks {y.shape} must be (n, d) and (n,) with n > 0")
    if not np.isfinite(x).all():
        raise ValueError("features must be finite")
    if ridge <= 0:
        raise ValueError(f"ridge={ridge}; expected > 0")
    sign = np.zeros(x.shape[1])
    sign[1:1 + len(signs)] = np.asarray(signs, dtype=np.float64)[: x.shape[1] - 1]
    active = np.ones(x.shape[1], dtype=bool)
    mean = float(np.clip(y.mean(), 1e-3, 1 - 1e-3))
    while True:
        xa = x[:, active]
        beta_a = np.zeros(xa.shape[1])
        beta_a[0] = math.log(mean / (1 - mean))
        for _ in range(max_iter):
            p = _sigmoid(xa @ beta_a)
            grad = xa.T @ (y - p) - ridge * beta_a
            hess = (xa * (p * (1 - p))[:, None]).T @ xa + ridge * np.eye(xa.shape[1])
            step = np.linalg.solve(hess, grad)
            beta_a = beta_a + step
            if np.abs(step).max() < 1e-10:
                break
        beta = np.zeros(x.shape[1])
        beta[active] = beta_a
        wrong = active & (sign * beta < 0)
        if not wrong.any():
            return beta
        active &= ~wrong


def dr_refit_interval(x_logged: np.ndarray, x_target: np.ndarray, rewards: np.ndarray, mu: np.ndarray,
                      pi: np.ndarray, has_target: np.ndarray, *, signs: Sequence[int] = REWARD_SIGNS,
                      n_boot: int = estimators.DEFAULT_N_BOOT, seed: int = 0) -> tuple[float, float]:
    """Percentile 95% bootstrap interval of the top-slot DR estimate with the reward model refitted per resample.

    The DR estimate (1/n) Σ [r̂(x_i, π(x_i)) + w_i (r_i − r̂(x_i, a_i))] uses a reward model fitted on the same
    log (``fit_reward_model``). Resampling the terms with the model held fixed leaves out the model's own
    estimation error, which is most of the uncertainty when the target rarely agrees with the logged item
    (then r̂_π carries the estimate): such intervals were far too narrow (0 of 20 seeds covered in
    ``bench.ope_study``). Here each resample refits β on its own units (Efron & Tibshirani, "An Introduction to
    the Bootstrap", 1993, ch. 6: bootstrap the whole estimator).

    Args:
        x_logged: (n, d) reward-model features of the logged position-1 item (``reward_features``).
        x_target: (n, d) the same for the target's position-1 item.
        rewards: (n,) 0/1 clicks on position 1.
        mu, pi: (n,) logging / target probability of the logged position-1 item.
        has_target: (n,) bool, the target shows an item at position 1 (r̂_π = 0 where not).
        signs: the coefficients' sign constraints (``fit_reward_model``).
        n_boot: resamples (0: NaN bounds).
        seed: the resampling seed.
    Returns:
        (low, high); NaN, NaN when ``n_boot`` is 0 or n is 0.
    """
    n = rewards.shape[0]
    if n_boot <= 0 or n == 0:
        return math.nan, math.nan
    rng = np.random.default_rng(seed)
    with np.errstate(divide="ignore", invalid="ignore"):
        w = np.where(mu > 0, pi / mu, 0.0)
    values = np.empty(n_boot)
    for b in range(n_boot):
        idx = rng.integers(0, n, size=n)
        beta = fit_reward_model(x_logged[idx], rewards[idx], signs=signs, max_iter=25)
        hat_t = np.where(has_target[idx], _sigmoid(x_target[idx] @ beta), 0.0)
        values[b] = float(np.mean(hat_t + w[idx] * (rewards[idx] - _sigmoid(x_logged[idx] @ beta))))
    low, high = np.percentile(values, [2.5, 97.5])
    return float(low), float(high)


def target_scores(model: Any, vocab: ItemVocabulary,
                  requests: Sequence[LoggedRequest]) -> tuple[list[np.ndarray], np.ndarray]:
    """The target model's masked scores on logged requests, as serving would have ranked them.

    Args:
        model: a scorer in ``vocab``'s index space (``score(item_idx) -> (batch, n_items + 1)``).
        vocab: its vocabulary.
        requests: b logged requests.
    Returns:
        (histories, scores): the b encoded contexts (known ids, oldest first) and (b, n_items + 1) float64
        scores with what serving masked set to -inf (the exposure's ``masked``; the context when it was not
        recorded) and the padding column -inf.
    """
    hist = [encode_history(vocab, r.context) for r in requests]
    shown_mask = [h if r.masked is None else encode_history(vocab, r.masked)
                  for h, r in zip(hist, requests, strict=True)]
    return hist, mask_scores(score_histories(model, hist), seen_mask(shown_mask, len(vocab)))


def estimate_online_ctr(model: Any, vocab: ItemVocabulary, logged: LoggedData, *, k: int = OPE_K,
                        n_boot: int = estimators.DEFAULT_N_BOOT, seed: int = 0) -> dict[str, Any]:
    """Off-policy estimates of ``model``'s greedy top-k on the logged requests (see the module docstring).

    Args:
        model: a scorer in ``vocab``'s index space (``score(item_idx) -> (batch, n_items + 1)``).
        vocab: its vocabulary; context and slate ids it does not know are dropped / never the target.
        logged: ``logged_requests(...)``.
        k: slate length of the target (the slate estimators use K = min(k, longest logged slate)).
        n_boot: bootstrap resamples (0: no intervals).
        seed: bootstrap seed.
    Returns:
        ``{"k", "n_requests", "n_exploratory", "logged_ctr" (observed CTR of position 1), "target_agreement"
        (share of requests whose logged top item is the target's), "n_unknown_context" (contexts the
        vocabulary knows nothing of), "reward_model": {"b0", "b1", "feature", "n"}, "estimators": {name:
        Estimate.as_dict() + "key" (the value's name)}}``; ``estimators`` is empty when nothing is logged.
    Raises:
        ValueError: k < 1.
    """
    if k < 1:
        raise ValueError(f"k={k}; expected >= 1")
    n = logged.n
    out: dict[str, Any] = {"k": 0, "n_requests": n, "n_exploratory": logged.n_exploratory, "logged_ctr": None,
                           "target_agreement": None, "n_unknown_context": 0, "reward_model": None, "estimators": {}}
    if n == 0:
        return out
    kk = min(k, max(len(r.slate) for r in logged.requests))
    targets: list[list[str | None]] = []
    top_ranks = np.zeros(n)
    logp_logged = np.zeros(n)  # log P_target(logged position-1 item | context): softmax over the masked scores
    logp_top = np.zeros(n)  # the same for the target's own top item
    ids = np.asarray(vocab.ids, dtype=object)
    for start in range(0, n, _SCORE_BATCH):
        chunk = logged.requests[start : start + _SCORE_BATCH]
        hist, masked = target_scores(model, vocab, chunk)
        out["n_unknown_context"] += sum(len(h) == 0 for h in hist)
        top = top_k(masked, kk)  # (b, kk); masked fill-ins where fewer items are finite
        finite = np.isfinite(np.take_along_axis(masked, top, axis=1))
        for row in range(len(chunk)):
            targets.append([str(ids[j - 1]) if ok and j != PAD_IDX else None
                            for j, ok in zip(top[row].tolist(), finite[row].tolist(), strict=True)])
        first = vocab.encode([r.slate[0] for r in chunk], unknown="pad")  # (b,) 0 when unknown
        logged_scores = masked[np.arange(len(chunk)), first]  # -inf when unknown or masked
        top_ranks[start : start + len(chunk)] = 1 + (masked > logged_scores[:, None]).sum(axis=1)
        finite_scores = np.where(np.isfinite(masked), masked, -np.inf)
        peak = np.max(finite_scores, axis=1, initial=-np.inf)
        safe_peak = np.where(np.isfinite(peak), peak, 0.0)
        with np.errstate(divide="ignore", invalid="ignore"):
            lse = safe_peak + np.log(np.exp(finite_scores - safe_peak[:, None]).sum(axis=1))
            lp_logged = logged_scores - lse
            lp_top = masked[np.arange(len(chunk)), top[:, 0]] - lse
        logp_logged[start : start + len(chunk)] = np.nan_to_num(lp_logged, nan=LOG_PROB_FLOOR, neginf=LOG_PROB_FLOOR,
                                                                posinf=0.0).clip(LOG_PROB_FLOOR, 0.0)
        logp_top[start : start + len(chunk)] = np.nan_to_num(lp_top, nan=LOG_PROB_FLOOR, neginf=LOG_PROB_FLOOR,
                                                             posinf=0.0).clip(LOG_PROB_FLOOR, 0.0)

    rewards = np.array([r.clicks[0] for r in logged.requests])
    mu_top = np.array([r.propensities[0] for r in logged.requests])
    pi_top = np.array([float(t[0] is not None and t[0] == r.slate[0]) for t, r in zip(targets, logged.requests,
                                                                                       strict=True)])
    clicks = np.zeros((n, kk))
    mu = np.ones((n, kk))
    pi_iips = np.zeros((n, kk))
    pi_pi = np.ones((n, kk))  # a missing logged position: π = μ = 1 keeps PI's weight that of the shorter slate
    unsup_top = np.zeros(n)
    unsup_slate = np.zeros(n)
    for i, (req, target) in enumerate(zip(logged.requests, targets, strict=True)):
        logging = _parse_policy(req.policy)
        ell = min(kk, len(req.slate))
        clicks[i, :ell] = req.clicks[:ell]
        mu[i, :ell] = req.propensities[:ell]
        agree = np.array([float(target[p] is not None and target[p] == req.slate[p]) for p in range(ell)])
        pi_iips[i, :ell] = agree
        pi_pi[i, :ell] = agree
        unsupported = [not target_supported(target[p], p, req, logging) for p in range(kk)]
        unsup_top[i] = float(unsupported[0])
        unsup_slate[i] = float(sum(unsupported))

    has_target = np.array([t[0] is not None for t in targets])
    x_logged = reward_features(top_ranks, logp_logged)
    x_target = reward_features(np.ones(n), logp_top)  # the target's own item: rank 1
    beta = fit_reward_model(x_logged, rewards, signs=REWARD_SIGNS)
    hat_logged = _sigmoid(x_logged @ beta)
    hat_target = np.where(has_target, _sigmoid(x_target @ beta), 0.0)
    common = {"n_boot": n_boot, "seed": seed}
    dr = estimators.doubly_robust(rewards, mu_top, pi_top, hat_logged, hat_target, unsupported_mass=unsup_top,
                                  n_boot=0, seed=seed)
    low, high = dr_refit_interval(x_logged, x_target, rewards, mu_top, pi_top, has_target, n_boot=n_boot, seed=seed)
    results = {
        "snips": estimators.snips(rewards, mu_top, pi_top, unsupported_mass=unsup_top, **common),
        "dr": replace(dr, ci_low=low, ci_high=high),
        "iips": estimators.iips(clicks, mu, pi_iips, unsupported_mass=unsup_slate, **common),
        "pi": estimators.pseudo_inverse(clicks, mu, pi_pi, unsupported_mass=unsup_slate, **common),
    }
    out.update(
        k=kk, logged_ctr=float(rewards.mean()), target_agreement=float(pi_top.mean()),
        reward_model={"b0": float(beta[0]), "b1": float(beta[1]), "b2": float(beta[2]),
                      "features": list(REWARD_FEATURES), "signs": list(REWARD_SIGNS), "n": n},
        estimators={name: {**est.as_dict(), "key": VALUE_NAMES[name]} for name, est in results.items()},
    )
    return out


def _skip(reason: str, rule: str) -> dict[str, Any]:
    return {"passed": None, "reason": f"skipped: {reason}", "rule": rule}


def ope_gate(candidate_est: dict[str, Any] | None, champion_est: dict[str, Any] | None, *, tolerance: float,
             min_requests: int, min_ess: float, max_unsupported_share: float,
             estimator: str = "snips") -> dict[str, Any]:
    """The off-policy rule of the gate: the candidate's lower 95% bound must not fall below the champion's
    estimate by more than ``tolerance`` (same estimator, same logged requests). Pure.

    Args:
        candidate_est / champion_est: ``estimate_online_ctr`` results (None: not estimated / no champion).
        tolerance: allowed shortfall (absolute, in the estimator's unit), >= 0.
        min_requests: fewer logged exploratory requests: skipped.
        min_ess: a smaller effective sample size (candidate's or champion's): skipped.
        max_unsupported_share: a larger unsupported share (candidate's or champion's): skipped.
        estimator: ``snips`` | ``dr`` | ``iips`` | ``pi``.
    Returns:
        ``{"passed": True | False | None, "reason": str, "rule": str}``; ``passed`` is None when the rule was
        skipped (``reason`` starts with "skipped: " and says why).
    Raises:
        ValueError: an unknown estimator or a negative tolerance.
    """
    if estimator not in ESTIMATORS:
        raise ValueError(f"estimator={estimator!r}; expected one of {ESTIMATORS}")
    if not tolerance >= 0:
        raise ValueError(f"tolerance={tolerance}; expected >= 0")
    name = VALUE_NAMES[estimator]
    rule = f"candidate {name} lower 95% bound >= champion {name} - {tolerance:g}"
    if candidate_est is None or estimator not in candidate_est.get("estimators", {}):
        return _skip("no off-policy estimate of the candidate", rule)
    n_exp = int(candidate_est.get("n_exploratory", 0))
    if n_exp < min_requests:
        return _skip(f"{n_exp} logged exploratory requests < ope_min_requests {min_requests}", rule)
    if champion_est is None or estimator not in champion_est.get("estimators", {}):
        return _skip("no champion to compare with", rule)
    cand, champ = candidate_est["estimators"][estimator], champion_est["estimators"][estimator]
    for who, est in (("candidate", cand), ("champion", champ)):
        if not est["ess"] >= min_ess:
            return _skip(f"{who} {estimator} ESS {est['ess']:.1f} < ope_min_ess {min_ess:g}", rule)
        if est["unsupported_share"] > max_unsupported_share:
            return _skip(f"{who} unsupported share {est['unsupported_share']:.3f} > ope_max_unsupported_share "
                         f"{max_unsupported_share:g}", rule)
        if not math.isfinite(est["value"]):
            return _skip(f"{who} {name} has no value", rule)
    low = cand["ci_low"]
    if not math.isfinite(low):
        return _skip(f"candidate {name} has no bootstrap interval", rule)
    need = champ["value"] - tolerance
    passed = bool(low >= need - EPS)
    reason = (f"candidate {name} {cand['value']:.4f} (95% [{low:.4f}, {cand['ci_high']:.4f}], ESS "
              f"{cand['ess']:.0f}) lower bound {'>=' if passed else '<'} champion {champ['value']:.4f} - "
              f"{tolerance:g} = {need:.4f}")
    return {"passed": passed, "reason": reason, "rule": rule}


def apply_ope_gate(decision: GateDecision, gate: dict[str, Any]) -> GateDecision:
    """``decision`` with the off-policy rule ANDed in when it ran (``passed`` not None), and its reason line
    appended either way (``PASS ope ...`` / ``FAIL ope ...``; a skipped rule reads ``PASS ope rule skipped``)."""
    if gate["passed"] is None:
        line = f"PASS ope rule {gate['reason']}"
        return replace(decision, reasons=[*decision.reasons, line])
    line = f"{'PASS' if gate['passed'] else 'FAIL'} ope {gate['reason']}"
    return replace(decision, passed=bool(decision.passed and gate["passed"]), reasons=[*decision.reasons, line])


def ope_tag(gate: dict[str, Any]) -> str:
    """The ``gate.ope`` tag: ``pass``, ``fail`` or ``skipped: <reason>`` (at most 500 characters)."""
    if gate["passed"] is None:
        return gate["reason"][:500]
    return "pass" if gate["passed"] else "fail"


def ope_metrics(result: dict[str, Any]) -> dict[str, float]:
    """MLflow metrics of an ``ope_task`` result: ``ope.<value>`` / ``_low`` / ``_high`` per estimator,
    ``ope.champion.<value>``, and ``ope.ess``, ``ope.unsupported_share`` (the gate estimator's, candidate),
    ``ope.n_requests``, ``ope.n_exploratory``, ``ope.target_agreement``. Non-finite values are left out."""
    out: dict[str, float] = {}
    log = result.get("log") or {}
    for key in ("n_requests", "n_exploratory"):
        if key in log:
            out[f"ope.{key}"] = float(log[key])
    chosen = result.get("estimator", "snips")
    for who, prefix in (("candidate", "ope."), ("champion", "ope.champion.")):
        est = result.get(who)
        if not est:
            continue
        for name, e in est["estimators"].items():
            out[f"{prefix}{e['key']}"] = e["value"]
            out[f"{prefix}{e['key']}_low"] = e["ci_low"]
            out[f"{prefix}{e['key']}_high"] = e["ci_high"]
            if name == chosen:
                out[f"{prefix}ess"] = e["ess"]
                out[f"{prefix}unsupported_share"] = e["unsupported_share"]
        if est.get("target_agreement") is not None:
            out[f"{prefix}target_agreement"] = est["target_agreement"]
    return {k: float(v) for k, v in out.items() if v is not None and math.isfinite(float(v))}


def ope_markdown(result: dict[str, Any]) -> str:
    """The report's "Off-policy estimates" section (markdown)."""
    gate = result["gate"]
    verdict = "skipped" if gate["passed"] is None else ("PASS" if gate["passed"] else "FAIL")
    lines = ["", "### Off-policy estimates (exposure log)", "", f"**Rule: {verdict}** — {gate['reason']}",
             f"(rule: {gate['rule']}; estimator {result.get('estimator')})", ""]
    log = result.get("log")
    if log:
        lines.append(f"Logged requests used: {log['n_requests']} ({log['n_exploratory']} exploratory, "
                     f"{log['n_clicks']} clicks); left out: {log['excluded'] or 'none'}.")
        lines.append("")
    rows = [(who, result.get(who)) for who in ("candidate", "champion") if result.get(who)]
    if rows and rows[0][1]["estimators"]:
        lines += ["| model | estimator | value | 95% low | 95% high | ESS | unsupported |",
                  "|---|---|---:|---:|---:|---:|---:|"]
        for who, est in rows:
            for e in est["estimators"].values():
                lines.append(f"| {who} | {e['key']} | {e['value']:.4f} | {e['ci_low']:.4f} | {e['ci_high']:.4f} | "
                             f"{e['ess']:.0f} | {e['unsupported_share']:.3f} |")
    return "\n".join(lines) + "\n"


def read_logged(url: str, policy: EventPolicy) -> LoggedData:
    """Read the exposure log and the linked feedback at ``url`` (the event-log database) into ``LoggedData``.

    Raises:
        sqlalchemy.exc.SQLAlchemyError (or the driver's error): the database is unreachable or unreadable.
    """
    from recloop.eventlog import EventLog
    from recloop.exposures import ExposureLog

    xlog = ExposureLog(url)
    try:
        exposures, items = xlog.read()
    finally:
        xlog.close()
    events_log = EventLog(url)
    try:
        events = events_log.linked()
    finally:
        events_log.close()
    return logged_requests(exposures, items, events, policy)


@task(cache_policy=NO_CACHE)
def ope_task(settings: Any, model: Any, vocab: ItemVocabulary, champion: Any | None,
             k: int = OPE_K) -> dict[str, Any]:
    """Off-policy estimates of the candidate (``model``, ``vocab``) and the champion (a ``LoadedModel`` or
    None) on the exposure log of ``settings.event_log_uri``, and the rule's verdict. Never raises for an
    empty or unreadable log: the rule is then skipped and the result says why.

    Returns:
        ``{"enabled", "estimator", "thresholds", "log": LoggedData.describe() | None, "candidate",
        "champion": estimate_online_ctr results or None, "gate": ope_gate's dict}``.
    """
    logger = get_run_logger()
    estimator = settings.ope_estimator
    thresholds = {"tolerance": settings.ope_tolerance, "min_requests": settings.ope_min_requests,
                  "min_ess": settings.ope_min_ess, "max_unsupported_share": settings.ope_max_unsupported_share}
    out: dict[str, Any] = {"enabled": bool(settings.ope_gate), "estimator": estimator, "thresholds": thresholds,
                           "log": None, "candidate": None, "champion": None}
    rule = ope_gate(None, None, estimator=estimator, **thresholds)["rule"]
    if not settings.ope_gate:
        out["gate"] = _skip("off (ope_gate=false)", rule)
        return out
    try:
        logged = read_logged(settings.event_log_uri, settings.event_policy)
    except Exception as err:  # noqa: BLE001 - any failure to read the log skips the rule, never the evaluation
        out["gate"] = _skip(f"exposure log unreadable ({type(err).__name__}: {str(err)[:200]})", rule)
        logger.warning("off-policy estimates %s", out["gate"]["reason"])
        return out
    out["log"] = logged.describe()
    if logged.n_exploratory < settings.ope_min_requests:  # not estimated: the rule would skip anyway
        out["gate"] = _skip(f"{logged.n_exploratory} logged exploratory requests < ope_min_requests "
                            f"{settings.ope_min_requests}", rule)
        logger.info("off-policy estimates %s", out["gate"]["reason"])
        return out
    out["candidate"] = estimate_online_ctr(model, vocab, logged, k=k)
    if champion is not None:
        out["champion"] = estimate_online_ctr(champion.model, champion.vocab, logged, k=k)
    out["gate"] = ope_gate(out["candidate"], out["champion"], estimator=estimator, **thresholds)
    logger.info("off-policy rule: %s", out["gate"]["reason"])
    return out

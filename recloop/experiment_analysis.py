"""The statistics of online experiments: A/B tests and interleaving, from the exposure log. Pure.

Frames in, a JSON-able dict out (plain floats, ints, strings, lists, None; never NaN nor numpy types).
The inputs are the frames of ``recloop.exposures.ExposureLog.read()`` (``exposures`` and ``items``) and
``recloop.eventlog.EventLog.linked()`` (``events``), and an *experiment*: any object with attributes
``experiment_id``, ``mode`` (``"ab"`` | ``"interleave"``), ``weights`` (champion, challenger),
``champion_version`` and ``challenger_version``. Only exposures whose ``experiment_id`` equals the
experiment's count.

Definitions (also returned under ``protocol.definitions``):

- a **request** is one exposure row; an **impression** is one slot of it (an ``items`` row;
  ``ab_report(k=...)`` keeps positions <= k); a **click** is an event whose role under the event
  policy (``EventPolicy.roles``) is ``positive``, attributed to the slot of its request that showed
  its ``item_id``, counted once per (request_id, item_id). This is the attribution of
  ``recloop.online_metrics`` (which has no public helper, so ``_clicks`` repeats it): an item shown
  twice in one request is credited to the slot whose position the event reports, else to the first.
- **A/B** (``arm`` = ``"champion"`` | ``"challenger"``; the user is the unit of randomisation and of
  analysis): a user's **CTR** is their clicks / their impressions (users with >= 1 impression); the
  arm's ``ctr`` is pooled clicks / impressions with a Wilson score interval (it treats impressions as
  independent, so it is only descriptive: the tests use per-user CTRs); ``lift`` = mean per-user CTR
  of the challenger / that of the champion - 1, with a delta-method interval; the fixed-horizon test
  is Welch's t-test on the per-user CTRs; **SRM** is a chi-squared goodness-of-fit test of the users
  per arm against ``weights``; the **decision rule** is the always-valid p-value of the mixture SPRT
  (mSPRT) over the hourly looks, because people look at the dashboard every hour.
- **Interleaving** (``arm`` = ``"interleaved"``; ``items.team`` says which ranker contributed the
  slot): per request, the clicks are credited to the slot's team; a request is a **win** for the
  challenger when it got more challenger than champion clicks, a **loss** when fewer, a **tie** when
  as many and at least one; a request with no credited click is ``no_click`` and is excluded from
  wins, losses and ties. Delta = (wins + ties / 2) / (wins + losses + ties) - 0.5 (the issue's
  "/ impressions" reads as: impressions = requests with >= 1 credited click); the sign test is a
  two-sided binomial test of wins against losses (ties dropped); the interval of Delta is a seeded
  percentile bootstrap over users.

Sources:

- Wilson, E. B. (1927). Probable inference, the law of succession, and statistical inference.
  JASA 22(158), 209-212.
- Welch, B. L. (1947). The generalization of "Student's" problem when several different population
  variances are involved. Biometrika 34, 28-35 (``scipy.stats.ttest_ind(equal_var=False)``).
- Deng, A., Knoblich, U., Lu, J. (2018). Applying the Delta Method in Metric Analytics: A Practical
  Guide with Novel Ideas. KDD 2018 (the variance of a percent change).
- Kohavi, R., Tang, D., Xu, Y. (2020). Trustworthy Online Controlled Experiments, ch. 21 (sample
  ratio mismatch, flagged at p < 0.001); Fabijan, A. et al. (2019). Diagnosing Sample Ratio Mismatch
  in Online Controlled Experiments. KDD 2019.
- Johari, R., Koomen, P., Pekelis, L., Walsh, D. (2017). Peeking at A/B Tests: Why it matters, and
  what to do about it. KDD 2017; and Johari, R., Koomen, P., Pekelis, L., Walsh, D. (2022). Always
  Valid Inference: Continuous Monitoring of A/B Tests. Operations Research 70(3), 1806-1821
  (the normal-mixture mSPRT and its always-valid p-value); Robbins, H. (1970). Statistical methods
  related to the law of the iterated logarithm. Ann. Math. Statist. 41, 1397-1409 (the mixture).
- Radlinski, F., Kurup, M., Joachims, T. (2008). How does clickthrough data reflect retrieval
  quality? CIKM 2008 (team-draft interleaving); Chapelle, O., Joachims, T., Radlinski, F., Yue, Y.
  (2012). Large-scale validation and analysis of interleaved search evaluation. ACM TOIS 30(1)
  (wins/losses/ties, Delta_AB and the sign test).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats

from recloop.experiments import jsonable
from recloop.online_metrics import frame_with
from recloop.policy import EventPolicy

ARMS: tuple[str, str] = ("champion", "challenger")
INTERLEAVED_ARM = "interleaved"
MODES: tuple[str, str] = ("ab", "interleave")
SRM_THRESHOLD = 0.001
#: A look where either arm has fewer users (with >= 1 impression) than this adds no evidence (Lambda = 1).
MIN_USERS_PER_ARM = 20
#: The time between two reconstructed looks of the A/B dashboard.
DEFAULT_LOOK_EVERY = "1h"
MAX_LOOKS = 50_000
#: Bootstrap resamples are drawn in chunks of at most this many user indices (memory bound).
_BOOT_CHUNK_CELLS = 4_000_000

#: The prior scale of the mSPRT mixture: the typical relative lift of a challenger (``TAU2_RULE``).
DEFAULT_PRIOR_LIFT = 0.1
TAU2_RULE = ("prior effect size: tau = prior_lift * the pooled mean per-user CTR of both arms at that look (default "
             "prior_lift 0.1: the mixture is spread over effects of about 10% relative lift), as Johari et al. advise "
             "matching the mixture to the effects experiments usually have")

DEFINITIONS: dict[str, str] = {
    "request": "one exposure of the experiment (an exposures row whose experiment_id is the experiment's)",
    "impression": "one slot shown (an items row); with k, slots at position <= k",
    "click": "a positive event (event policy) whose request_id and item_id match a slot shown; distinct per "
             "(request_id, item_id); an item shown twice goes to the slot the event reports, else the first",
    "ctr": "clicks / impressions of the arm, with a Wilson score interval (descriptive: impressions of one "
           "user are not independent)",
    "user_ctr": "a user's clicks / impressions (users with >= 1 impression); mean_user_ctr is their mean",
    "lift": "mean_user_ctr(challenger) / mean_user_ctr(champion) - 1; interval by the delta method",
    "welch": "Welch's two-sided t-test of the per-user CTRs, challenger vs champion (fixed horizon: "
             "not valid under peeking, reported for reference)",
    "srm": "chi-squared goodness of fit of the users per arm against the experiment's weights; flagged at "
           "p < 0.001",
    "msprt": "mixture SPRT (Johari et al. 2017/2022), normal mixture N(0, tau^2) on the difference of mean "
             "per-user CTRs, evaluated at each look (requests before the look's end, clicks received before it); "
             "always-valid p = min(1, 1 / max over looks of Lambda)",
    "win/loss/tie": "interleaving, per request: challenger-team clicks >, < or = champion-team clicks "
                    "(tie: equal and > 0); requests without a credited click are no_click and excluded",
    "delta": "(wins + ties / 2) / (wins + losses + ties) - 0.5, i.e. over the requests with >= 1 credited "
             "click; > 0 favours the challenger",
    "sign_test": "two-sided exact binomial test of wins among wins + losses against 1/2 (ties dropped)",
    "delta_ci": "percentile bootstrap of delta over users (users resampled with replacement, seeded)",
}


# ---- the building blocks ---------------------------------------------------------------------------------------


def wilson_interval(successes: int, n: int, confidence: float = 0.95) -> tuple[float, float] | None:
    """The Wilson score interval of a binomial proportion (Wilson 1927).

    With p = successes / n and z = Phi^-1(1 - (1 - confidence) / 2)::

        centre = (p + z^2 / (2n)) / (1 + z^2 / n)
        half   = z / (1 + z^2 / n) * sqrt(p (1 - p) / n + z^2 / (4 n^2))

    Returns:
        (centre - half, centre + half), within [0, 1]; None when ``n == 0``.
    Raises:
        ValueError: ``successes`` outside [0, n], or ``confidence`` outside (0, 1).
    """
    if not 0 < confidence < 1:
        raise ValueError(f"confidence={confidence} must be in (0, 1)")
    if n < 0 or not 0 <= successes <= n:
        raise ValueError(f"successes={successes} must be in [0, n={n}]")
    if n == 0:
        return None
    z = float(stats.norm.ppf(1 - (1 - confidence) / 2))
    p = successes / n
    den = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / den
    half = z / den * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def srm_check(counts: Sequence[int], weights: Sequence[float], threshold: float = SRM_THRESHOLD) -> dict[str, Any]:
    """Sample ratio mismatch: a chi-squared goodness-of-fit test of ``counts`` against ``weights``.

    expected_i = sum(counts) * weights_i / sum(weights); chi2 = sum((counts_i - expected_i)^2 / expected_i)
    with len(counts) - 1 degrees of freedom (``scipy.stats.chisquare``). Flagged when p < ``threshold``
    (Kohavi, Tang & Xu 2020, ch. 21: 0.001). A category with weight 0 but a positive count is a mismatch
    by construction (chi2 = inf, p = 0, flagged); one with weight 0 and count 0 is left out.

    Returns:
        ``{"p_value", "chi2", "flagged", "expected", "counts", "threshold"}``; with no counts at all,
        p_value and chi2 are None and nothing is flagged.
    Raises:
        ValueError: lengths differ, fewer than 2 categories, a negative count, or weights not
            finite, non-negative and summing to > 0.
    """
    c = np.asarray(counts, dtype=float)
    w = np.asarray(weights, dtype=float)
    if c.ndim != 1 or c.shape != w.shape or len(c) < 2:
        raise ValueError(f"counts {list(counts)} and weights {list(weights)} must be two sequences of one length >= 2")
    if (c < 0).any() or not np.isfinite(c).all():
        raise ValueError(f"counts {list(counts)} must be >= 0")
    if not np.isfinite(w).all() or (w < 0).any() or w.sum() <= 0:
        raise ValueError(f"weights {list(weights)} must be finite, >= 0 and sum to > 0")
    total = c.sum()
    expected = total * w / w.sum()
    out: dict[str, Any] = {"counts": [int(x) for x in c], "expected": [float(x) for x in expected],
                           "threshold": float(threshold)}
    if total == 0:
        return {**out, "p_value": None, "chi2": None, "flagged": False}
    if ((expected == 0) & (c > 0)).any():
        return {**out, "p_value": 0.0, "chi2": None, "flagged": True}  # chi2 is infinite
    keep = expected > 0
    if keep.sum() < 2:
        return {**out, "p_value": 1.0, "chi2": 0.0, "flagged": False}
    res = stats.chisquare(c[keep], expected[keep])
    p = float(res.pvalue)
    return {**out, "p_value": p, "chi2": float(res.statistic), "flagged": bool(p < threshold)}


def msprt_log_lambda(diff_mean: Any, var: Any, n: Any, tau2: Any) -> np.ndarray:
    """log Lambda_n of the normal-mixture SPRT (Johari et al. 2017, 2022), elementwise (broadcast).

    For n observations with mean ``diff_mean`` (theta hat, testing H0: theta = 0), per-observation
    variance V = ``var`` and mixing distribution N(0, tau^2)::

        Lambda_n = sqrt(V / (V + n tau^2)) * exp(n^2 tau^2 theta^2 / (2 V (V + n tau^2)))

    (equivalently, with V_n = V / n the variance of theta hat: sqrt(V_n / (V_n + tau^2)) *
    exp(tau^2 theta^2 / (2 V_n (V_n + tau^2))), so Lambda depends on V and n only through V / n).
    A look without information (V <= 0, n <= 0, tau^2 = 0 or anything not finite) has Lambda = 1.

    Raises:
        ValueError: a negative ``tau2``.
    """
    theta, v, nn, t2 = np.broadcast_arrays(*(np.asarray(a, dtype=float) for a in (diff_mean, var, n, tau2)))
    if (t2 < 0).any():
        raise ValueError("tau2 must be >= 0")
    ok = np.isfinite(theta) & np.isfinite(v) & np.isfinite(nn) & np.isfinite(t2) & (v > 0) & (nn > 0) & (t2 > 0)
    v1 = np.where(ok, v, 1.0)
    n1 = np.where(ok, nn, 1.0)
    t1 = np.where(ok, t2, 1.0)
    th = np.where(ok, theta, 0.0)
    denom = v1 + n1 * t1
    out = 0.5 * (np.log(v1) - np.log(denom)) + n1 * n1 * t1 * th * th / (2 * v1 * denom)
    return np.where(ok, out, 0.0)


def msprt_lambda(diff_mean: Any, var: Any, n: Any, tau2: Any) -> np.ndarray:
    """Lambda_n of the normal-mixture SPRT (``exp(msprt_log_lambda(...))``; may overflow to inf)."""
    with np.errstate(over="ignore"):
        return np.exp(msprt_log_lambda(diff_mean, var, n, tau2))


def msprt(diff_mean: float, var: float, n: float, tau2: float) -> float:
    """The always-valid p-value of one look: min(1, 1 / Lambda_n) (see ``msprt_log_lambda``).

    Valid at any data-dependent stopping time (Ville's inequality: P(sup_n Lambda_n >= 1/alpha) <= alpha
    under H0); over a sequence of looks use ``msprt_sequence``, whose running minimum is the paper's p_n.
    """
    return float(min(1.0, math.exp(-float(msprt_log_lambda(diff_mean, var, n, tau2)))))


def msprt_sequence(diffs_mean: Any, var: Any, n: Any, tau2: Any) -> np.ndarray:
    """Always-valid p-values of a sequence of looks: p_n = min(1, 1 / max_{m <= n} Lambda_m).

    Args:
        diffs_mean, var, n, tau2: per look (broadcast together; the looks are the last axis, so a
            (runs, looks) array gives one sequence per run): the mean difference theta hat, the
            per-observation variance V of the difference, the number of observations (pairs), and the
            mixing variance tau^2.
    Returns:
        An array of the broadcast shape, non-increasing along the last axis, in (0, 1].
    """
    log_lam = msprt_log_lambda(diffs_mean, var, n, tau2)
    if log_lam.ndim == 0:
        log_lam = log_lam.reshape(1)
    running = np.maximum.accumulate(np.maximum(log_lam, 0.0), axis=-1)
    return np.exp(-running)


def msprt_two_sample(mean_c: Any, var_c: Any, n_c: Any, mean_t: Any, var_t: Any, n_t: Any, *,
                     tau2: Any = None, prior_lift: float = DEFAULT_PRIOR_LIFT, min_n: int = 2) -> dict[str, np.ndarray]:
    """The mSPRT of H0: mean_t = mean_c over looks (last axis), from each arm's running mean, sample
    variance (ddof 1) and size. Vectorised; used by ``ab_report`` and by the A/A study.

    Reduction to the one-sample form: the paper pairs the two streams (n pairs, each difference with
    variance V = sigma_c^2 + sigma_t^2). With unequal arms we keep the variance of the difference of
    means, V_n = var_c / n_c + var_t / n_t, and set n = (n_c + n_t) / 2 pairs and V = n * V_n; this is
    the paired form when n_c = n_t, and Lambda depends on (V, n) only through V / n = V_n.

    tau^2: None applies ``TAU2_RULE``: tau^2 = (prior_lift * pooled mean)^2 at each look, the pooled
    mean being (n_c mean_c + n_t mean_t) / (n_c + n_t) (which does not favour an arm); a number (or an
    array per look) is the prior variance of the difference of means, in squared units of the
    observations. The paper advises matching the mixture to the distribution of effects seen in past
    experiments; with no such history, a 10% relative lift is the scale. (In the A/A study of
    ``tests/unit/test_experiment_analysis.py``, per-user CTRs at 0.05, this rule rejected about 0.5% of
    2,000 A/A runs at alpha = 0.05 over 20 looks and found a 0.05 -> 0.06 lift with 4,000 users per arm
    in about 85% of runs, against about 60% for tau^2 = V.) A look where either arm has fewer than
    ``min_n`` observations, or V_n is 0, has Lambda = 1.

    Returns:
        ``{"diff", "var", "n", "tau2", "log_lambda", "p_value"}`` arrays of the broadcast shape
        (``p_value`` is the running always-valid p-value).
    """
    mc, vc, nc, mt, vt, nt = np.broadcast_arrays(
        *(np.asarray(a, dtype=float) for a in (mean_c, var_c, n_c, mean_t, var_t, n_t)))
    ok = (nc >= min_n) & (nt >= min_n)
    with np.errstate(divide="ignore", invalid="ignore"):
        vn = np.where(ok, vc / np.where(ok, nc, 1.0) + vt / np.where(ok, nt, 1.0), 0.0)
    n = (nc + nt) / 2
    v = np.where(ok, n * vn, 0.0)
    diff = mt - mc
    if tau2 is None:
        with np.errstate(divide="ignore", invalid="ignore"):
            pooled = np.where(nc + nt > 0, (nc * mc + nt * mt) / np.where(nc + nt > 0, nc + nt, 1.0), 0.0)
        t2 = (prior_lift * pooled) ** 2
    else:
        t2 = np.broadcast_to(np.asarray(tau2, dtype=float), v.shape)
    log_lam = msprt_log_lambda(np.where(ok, diff, 0.0), v, n, t2)
    return {"diff": diff, "var": v, "n": n, "tau2": np.asarray(t2, dtype=float), "log_lambda": log_lam,
            "p_value": msprt_sequence(np.where(ok, diff, 0.0), v, n, t2)}


def relative_lift(mean_c: float, var_c: float, n_c: int, mean_t: float, var_t: float, n_t: int,
                  alpha: float = 0.05) -> dict[str, Any]:
    """Relative lift mean_t / mean_c - 1 of two independent sample means, with a delta-method interval.

    Delta method (Deng, Knoblich & Lu 2018) for R = Ybar_t / Ybar_c with independent arms::

        Var(R) ~= var_t / (n_t mean_c^2) + mean_t^2 var_c / (n_c mean_c^4)

    and the interval lift +- z_{1 - alpha/2} sqrt(Var(R)). ``var_*`` are per-observation sample
    variances.

    Returns:
        ``{"relative", "ci", "se", "absolute", "method": "delta"}``; relative/ci/se None when
        mean_c is 0 or an arm has fewer than 2 observations (``absolute`` = mean_t - mean_c
        whenever both means exist).
    """
    out: dict[str, Any] = {"method": "delta", "absolute": _num(mean_t - mean_c), "relative": None, "ci": None,
                           "se": None}
    if n_c < 2 or n_t < 2 or not mean_c or not math.isfinite(mean_c):
        return out
    lift = mean_t / mean_c - 1
    se = math.sqrt(var_t / (n_t * mean_c ** 2) + mean_t ** 2 * var_c / (n_c * mean_c ** 4))
    z = float(stats.norm.ppf(1 - alpha / 2))
    return {**out, "relative": lift, "se": se, "ci": [lift - z * se, lift + z * se]}


def welch_test(champion: Any, challenger: Any) -> dict[str, Any]:
    """Welch's two-sided t-test of challenger vs champion (``scipy.stats.ttest_ind(equal_var=False)``).

    Returns:
        ``{"statistic", "df", "p_value"}`` (None where undefined: fewer than 2 values in an arm,
        or no variance in both).
    """
    a = np.asarray(challenger, dtype=float)
    b = np.asarray(champion, dtype=float)
    if len(a) < 2 or len(b) < 2 or (a.var() == 0 and b.var() == 0):
        return {"statistic": None, "df": None, "p_value": None}
    with warnings.catch_warnings(), np.errstate(divide="ignore", invalid="ignore"):
        warnings.simplefilter("ignore", RuntimeWarning)  # scipy's precision notice for near-constant samples
        res = stats.ttest_ind(a, b, equal_var=False)
    return {"statistic": _num(res.statistic), "df": _num(getattr(res, "df", None)), "p_value": _num(res.pvalue)}


# ---- A/B ------------------------------------------------------------------------------------------------------


def ab_report(experiment: Any, exposures: pd.DataFrame | None, items: pd.DataFrame | None,
              events: pd.DataFrame | None, policy: EventPolicy, *, alpha: float = 0.05, k: int | None = None,
              tau2: float | None = None, prior_lift: float = DEFAULT_PRIOR_LIFT,
              look_every: str | pd.Timedelta = DEFAULT_LOOK_EVERY,
              min_users: int = MIN_USERS_PER_ARM) -> dict[str, Any]:
    """The A/B report of one experiment (module docstring: definitions and sources). Pure.

    Args:
        experiment: ``experiment_id``, ``weights`` (champion, challenger), ``champion_version``,
            ``challenger_version`` (``mode`` is not checked here).
        exposures, items, events: the log's frames; exposures of other experiments are ignored, and so
            are this experiment's requests whose arm is neither ``champion`` nor ``challenger``
            (counted in ``data.requests_other_arm``).
        policy: the event policy (``positive`` = click).
        alpha: the level of the tests; intervals are at 1 - alpha.
        k: keep only positions <= k (None: every slot).
        tau2: the mSPRT mixing variance, in squared CTR units (None: ``TAU2_RULE`` with ``prior_lift``).
        prior_lift: the relative lift that sets tau when ``tau2`` is None.
        look_every: the spacing of the reconstructed looks (a pandas offset such as ``"1h"``). Looks
            end at multiples of it, from the first exposure's ``ts`` floored; at each look the
            per-user CTRs count the requests with ``ts`` before the look's end and their clicks received
            (``received_at``, or the request's ``ts`` when absent) before it. Without ``ts`` there is one
            look. Only looks where something changed are kept.
        min_users: a look where either arm has fewer users with an impression adds no evidence.
    Returns:
        ``{"mode": "ab", "experiment", "protocol", "arms": {arm: {"users", "requests", "impressions",
        "clicks", "ctr", "ctr_ci", "users_with_impressions", "mean_user_ctr", "var_user_ctr",
        "model_versions"}}, "lift", "welch", "srm", "sequential", "data"}``. ``sequential`` holds
        ``p_value`` (the always-valid p-value at the last look), ``n_looks``, ``tau2`` (last look),
        ``tau2_rule`` and ``looks`` (``until``, ``users_champion``, ``users_challenger``, ``diff``,
        ``log_lambda``, ``p_value`` each). ``users`` are the distinct users assigned to the arm (SRM
        counts them); per-user CTRs need an impression.
    Raises:
        ValueError: bad ``alpha``, ``k``, ``prior_lift``, ``look_every`` (or more than ``MAX_LOOKS`` looks),
            ``weights``, or a frame missing columns.
    """
    _check_alpha(alpha)
    if k is not None and (isinstance(k, bool) or int(k) < 1):
        raise ValueError(f"k={k!r} must be an integer >= 1 or None")
    step = pd.Timedelta(look_every)
    if step <= pd.Timedelta(0):
        raise ValueError(f"look_every={look_every!r} must be positive")
    if not (math.isfinite(prior_lift) and prior_lift > 0):
        raise ValueError(f"prior_lift={prior_lift} must be > 0")
    weights = _weights(experiment)

    ex_all = _experiment_exposures(exposures, experiment)
    ex = ex_all[ex_all["arm"].isin(ARMS)].reset_index(drop=True)
    slots = _slots(items, ex)
    clicks = _clicks(events, slots, policy)
    if k is not None:
        slots = slots[slots["position"] <= int(k)]
        clicks = clicks[clicks["position"] <= int(k)]

    per_user = _per_user(ex, slots, clicks)
    arms: dict[str, dict[str, Any]] = {}
    user_ctrs: dict[str, np.ndarray] = {}
    for arm in ARMS:
        ex_a = ex[ex["arm"] == arm]
        imp = int((slots["arm"] == arm).sum())
        clk = int((clicks["arm"] == arm).sum())
        ctrs = per_user.loc[(per_user["arm"] == arm) & (per_user["impressions"] > 0), "ctr"].to_numpy(float)
        user_ctrs[arm] = ctrs
        ci = wilson_interval(clk, imp, 1 - alpha)
        arms[arm] = {
            "users": int(ex_a["user_id"].nunique()),
            "requests": len(ex_a),
            "impressions": imp,
            "clicks": clk,
            "ctr": clk / imp if imp else None,
            "ctr_ci": None if ci is None else list(ci),
            "users_with_impressions": len(ctrs),
            "mean_user_ctr": float(ctrs.mean()) if len(ctrs) else None,
            "var_user_ctr": float(ctrs.var(ddof=1)) if len(ctrs) > 1 else None,
            "model_versions": sorted(ex_a["model_version"].unique()),
        }
    c, t = user_ctrs["champion"], user_ctrs["challenger"]
    if len(c) and len(t):
        lift = relative_lift(float(c.mean()), float(c.var(ddof=1)) if len(c) > 1 else 0.0, len(c),
                             float(t.mean()), float(t.var(ddof=1)) if len(t) > 1 else 0.0, len(t), alpha)
    else:
        lift = {"method": "delta", "absolute": None, "relative": None, "ci": None, "se": None}
    srm = srm_check([arms[a]["users"] for a in ARMS], weights)
    sequential = _sequential(ex, slots, clicks, step, tau2, prior_lift, min_users)
    both = ex.groupby("user_id")["arm"].nunique()
    report = {
        "mode": "ab",
        "experiment": _describe(experiment),
        "protocol": {**policy.describe(), "alpha": alpha, "k": None if k is None else int(k),
                     "confidence": 1 - alpha, "definitions": dict(DEFINITIONS),
                     "tau2_rule": TAU2_RULE if tau2 is None else "given",
                     "prior_lift": prior_lift if tau2 is None else None,
                     "lift_interval": "delta method", "look_every": str(step), "min_users": int(min_users)},
        "arms": arms,
        "lift": lift,
        "welch": welch_test(c, t),
        "srm": srm,
        "sequential": sequential,
        "data": {"requests_other_arm": int(len(ex_all) - len(ex)), "users_in_both_arms": int((both > 1).sum())},
    }
    return jsonable(report)


def _per_user(ex: pd.DataFrame, slots: pd.DataFrame, clicks: pd.DataFrame) -> pd.DataFrame:
    """arm, user_id, impressions, clicks, ctr (NaN without impressions) per (arm, user)."""
    users = ex[["arm", "user_id"]].drop_duplicates()
    imp = slots.groupby(["arm", "user_id"]).size().rename("impressions")
    clk = clicks.groupby(["arm", "user_id"]).size().rename("clicks")
    out = users.merge(imp, on=["arm", "user_id"], how="left").merge(clk, on=["arm", "user_id"], how="left")
    out[["impressions", "clicks"]] = out[["impressions", "clicks"]].fillna(0).astype(np.int64)
    with np.errstate(divide="ignore", invalid="ignore"):
        out["ctr"] = np.where(out["impressions"] > 0, out["clicks"] / out["impressions"].clip(lower=1), np.nan)
    return out


def _sequential(ex: pd.DataFrame, slots: pd.DataFrame, clicks: pd.DataFrame, step: pd.Timedelta,
                tau2: float | None, prior_lift: float, min_users: int) -> dict[str, Any]:
    """The mSPRT over the reconstructed looks (``ab_report``'s ``look_every``).

    Per look, only the users with new impressions or clicks change: their old CTR leaves the arm's
    running sums (count, sum, sum of squares) and their new one enters, so the cost is the activity
    plus the number of looks.
    """
    base = {"test": "mSPRT", "tau2_rule": TAU2_RULE if tau2 is None else "given", "p_value": None, "tau2": None,
            "n_looks": 0, "looks": []}
    if not len(slots):
        return base
    keys = pd.MultiIndex.from_frame(ex[["arm", "user_id"]].drop_duplicates())
    imp_u = keys.get_indexer(pd.MultiIndex.from_frame(slots[["arm", "user_id"]]))
    clk_u = keys.get_indexer(pd.MultiIndex.from_frame(clicks[["arm", "user_id"]]))
    arm_of = (keys.get_level_values(0) == "challenger").astype(np.int64)
    imp_t, clk_t = _times(slots["ts"]), _times(clicks["ts"])
    if "received_at" in clicks.columns:
        rec = _times(clicks["received_at"])
        clk_t = np.where(np.isnan(rec), clk_t, np.fmax(clk_t, rec))
    all_t = np.concatenate([imp_t, clk_t])
    if np.isnan(all_t).all():
        look_imp, look_clk, ends = np.zeros(len(imp_u), np.int64), np.zeros(len(clk_u), np.int64), [None]
    else:
        start = pd.Timestamp(int(np.nanmin(all_t)), tz="UTC").floor(step)
        span = (np.nanmax(all_t) - start.value) / step.value
        n_looks = int(math.floor(span)) + 1
        if n_looks > MAX_LOOKS:
            raise ValueError(f"look_every={step} gives {n_looks} looks (> {MAX_LOOKS}); choose a longer step")
        first = np.nanmin(all_t)

        def look_of(ts: np.ndarray) -> np.ndarray:  # the look whose end (start + (j + 1) step) is the first after ts
            ts = np.where(np.isnan(ts), first, ts)
            return np.floor((ts - start.value) / step.value).astype(np.int64)

        look_imp, look_clk = look_of(imp_t), look_of(clk_t)
        ends = [start + (j + 1) * step for j in range(n_looks)]
    act = pd.DataFrame({"look": np.concatenate([look_imp, look_clk]), "u": np.concatenate([imp_u, clk_u]),
                        "imp": np.concatenate([np.ones(len(imp_u)), np.zeros(len(clk_u))]),
                        "clk": np.concatenate([np.zeros(len(imp_u)), np.ones(len(clk_u))])})
    act = act.groupby(["look", "u"], sort=True)[["imp", "clk"]].sum().reset_index()
    imp = np.zeros(len(keys))
    clk = np.zeros(len(keys))
    cnt, s1, s2 = np.zeros(2), np.zeros(2), np.zeros(2)
    rows = []
    looks = act["look"].to_numpy()
    bounds = np.flatnonzero(np.diff(looks)) + 1
    for lo, hi in zip(np.r_[0, bounds], np.r_[bounds, len(act)], strict=True):
        u = act["u"].to_numpy()[lo:hi]
        a = arm_of[u]
        old = imp[u] > 0
        r_old = np.where(old, clk[u] / np.where(old, imp[u], 1.0), 0.0)
        cnt -= np.bincount(a, weights=old, minlength=2)
        s1 -= np.bincount(a, weights=r_old, minlength=2)
        s2 -= np.bincount(a, weights=r_old * r_old, minlength=2)
        imp[u] += act["imp"].to_numpy()[lo:hi]
        clk[u] += act["clk"].to_numpy()[lo:hi]
        new = imp[u] > 0
        r_new = np.where(new, clk[u] / np.where(new, imp[u], 1.0), 0.0)
        cnt += np.bincount(a, weights=new, minlength=2)
        s1 += np.bincount(a, weights=r_new, minlength=2)
        s2 += np.bincount(a, weights=r_new * r_new, minlength=2)
        n = np.round(cnt)
        mean = np.where(n > 0, s1 / np.maximum(n, 1), np.nan)
        var = np.where(n > 1, np.maximum(s2 - n * mean * mean, 0.0) / np.maximum(n - 1, 1), 0.0)
        rows.append((int(looks[lo]), n[0], mean[0], var[0], n[1], mean[1], var[1]))
    seq = np.array(rows, dtype=float)
    res = msprt_two_sample(seq[:, 2], seq[:, 3], seq[:, 1], seq[:, 5], seq[:, 6], seq[:, 4], tau2=tau2,
                           prior_lift=prior_lift, min_n=max(2, int(min_users)))
    out = []
    for i, row in enumerate(rows):
        end = ends[row[0]]
        out.append({"until": None if end is None else end.isoformat(), "users_champion": int(row[1]),
                    "users_challenger": int(row[4]), "diff": float(res["diff"][i]),
                    "log_lambda": float(res["log_lambda"][i]), "p_value": float(res["p_value"][i])})
    return {**base, "p_value": out[-1]["p_value"], "tau2": _num(res["tau2"][-1]), "n_looks": len(out),
            "looks": out}


def _times(s: pd.Series) -> np.ndarray:
    """Timestamps as float ns since the epoch (UTC; naive = UTC); NaN where missing or unparseable."""
    ts = pd.to_datetime(s, utc=True, errors="coerce")
    out = np.full(len(ts), np.nan)
    ok = ts.notna().to_numpy()
    if ok.any():
        out[ok] = ts[ok].dt.as_unit("ns").astype("int64").to_numpy().astype(float)
    return out


# ---- interleaving ---------------------------------------------------------------------------------------------


def interleaving_report(experiment: Any, exposures: pd.DataFrame | None, items: pd.DataFrame | None,
                        events: pd.DataFrame | None, policy: EventPolicy, *, alpha: float = 0.05,
                        n_boot: int = 2000, seed: int = 0) -> dict[str, Any]:
    """The interleaving report of one experiment (module docstring: definitions and sources). Pure.

    Every request of the experiment counts (``arm`` is normally ``"interleaved"``; others are counted
    in ``data.requests_other_arm`` but still analysed). A click on a slot whose ``team`` is neither
    champion nor challenger is credited to nobody (``clicks_by_team.none``).

    Returns:
        ``{"mode": "interleave", "experiment", "protocol", "requests", "users", "impressions", "clicks",
        "clicks_by_team": {"champion", "challenger", "none"}, "wins", "losses", "ties", "no_click",
        "decided" (= wins + losses + ties), "delta", "delta_ci", "sign_test": {"p_value", "wins",
        "n"}, "bootstrap": {"n_boot", "seed", "unit", "method"}, "data"}``. ``delta`` and
        ``delta_ci`` are None when no request has a credited click; ``sign_test.p_value`` is None
        when wins + losses = 0.
    Raises:
        ValueError: bad ``alpha`` or ``n_boot``, or a frame missing columns.
    """
    _check_alpha(alpha)
    if isinstance(n_boot, bool) or int(n_boot) < 1:
        raise ValueError(f"n_boot={n_boot!r} must be >= 1")
    ex = _experiment_exposures(exposures, experiment)
    slots = _slots(items, ex)
    clicks = _clicks(events, slots, policy)
    team = clicks["team"].where(clicks["team"].isin(ARMS), "none")
    per_req = pd.DataFrame({"request_id": ex["request_id"], "user_id": ex["user_id"]})
    for name in ARMS:
        n = clicks[team == name].groupby("request_id").size()
        per_req[name] = per_req["request_id"].map(n).fillna(0).astype(np.int64)
    ch, cp = per_req["challenger"].to_numpy(), per_req["champion"].to_numpy()
    per_req["win"] = (ch > cp).astype(np.int64)
    per_req["loss"] = (ch < cp).astype(np.int64)
    per_req["tie"] = ((ch == cp) & (ch > 0)).astype(np.int64)
    wins, losses, ties = (int(per_req[c].sum()) for c in ("win", "loss", "tie"))
    decided = wins + losses + ties
    delta = (wins + ties / 2) / decided - 0.5 if decided else None
    sign_p = float(stats.binomtest(wins, wins + losses, 0.5, alternative="two-sided").pvalue) if wins + losses else None
    per_user = per_req.groupby("user_id")[["win", "loss", "tie"]].sum()
    ci = _bootstrap_delta(per_user.to_numpy(dtype=float), alpha, int(n_boot), seed) if decided else None
    report = {
        "mode": "interleave",
        "experiment": _describe(experiment),
        "protocol": {**policy.describe(), "alpha": alpha, "confidence": 1 - alpha,
                     "definitions": dict(DEFINITIONS)},
        "requests": len(ex),
        "users": int(ex["user_id"].nunique()),
        "impressions": len(slots),
        "clicks": len(clicks),
        "clicks_by_team": {name: int((team == name).sum()) for name in (*ARMS, "none")},
        "wins": wins,
        "losses": losses,
        "ties": ties,
        "no_click": len(per_req) - decided,
        "decided": decided,
        "delta": delta,
        "delta_ci": ci,
        "sign_test": {"p_value": sign_p, "wins": wins, "n": wins + losses},
        "bootstrap": {"n_boot": int(n_boot), "seed": seed, "unit": "user", "method": "percentile"},
        "data": {"requests_other_arm": int((ex["arm"] != INTERLEAVED_ARM).sum())},
    }
    return jsonable(report)


def _bootstrap_delta(wlt: np.ndarray, alpha: float, n_boot: int, seed: int) -> list[float] | None:
    """Percentile interval of delta from (users, 3) win/loss/tie counts, users resampled with replacement."""
    n_users = len(wlt)
    rng = np.random.default_rng(seed)
    chunk = max(1, _BOOT_CHUNK_CELLS // max(n_users, 1))
    deltas = []
    for start in range(0, n_boot, chunk):
        idx = rng.integers(0, n_users, size=(min(chunk, n_boot - start), n_users))
        w, lo, t = (wlt[:, j][idx].sum(axis=1) for j in range(3))
        den = w + lo + t
        with np.errstate(divide="ignore", invalid="ignore"):
            deltas.append(np.where(den > 0, (w + t / 2) / np.where(den > 0, den, 1) - 0.5, np.nan))
    d = np.concatenate(deltas)
    if np.isnan(d).all():
        return None
    q = np.nanquantile(d, [alpha / 2, 1 - alpha / 2])
    return [float(q[0]), float(q[1])]


# ---- the decision ---------------------------------------------------------------------------------------------


def analyse_experiment(experiment: Any, exposures: pd.DataFrame | None, items: pd.DataFrame | None,
                       events: pd.DataFrame | None, policy: EventPolicy, *, alpha: float = 0.05) -> dict[str, Any]:
    """``ab_report`` or ``interleaving_report`` by ``experiment.mode``, plus the ``decision``.

    ``decision = {"winner": "champion" | "challenger" | None, "test", "p_value", "reason", "effect"}``:

    - A/B: the test is the mSPRT (always-valid p-value at the last look; people look every hour, so a
      fixed-horizon test would be peeked into false positives). A winner only when that p < alpha and
      the SRM check is not flagged (flagged: no winner, whatever the p-value). The direction is the
      sign of the difference of mean per-user CTRs; ``effect`` is the relative lift (None when the
      champion's mean is 0). Too few users with impressions in an arm (``MIN_USERS_PER_ARM``) or no
      impressions: no winner.
    - Interleaving: the test is the two-sided sign test; a winner when p < alpha, the direction by
      delta (``effect``). No request with a credited click, or no wins nor losses: no winner.

    Returns:
        The report (JSON-serialisable: ``json.dumps(report, allow_nan=False)`` works) with ``decision``.
    Raises:
        ValueError: an unknown mode (and whatever the report raises).
    """
    mode = str(getattr(experiment, "mode", "")).strip().lower()
    if mode == "ab":
        report = ab_report(experiment, exposures, items, events, policy, alpha=alpha)
        report["decision"] = _ab_decision(report, alpha)
    elif mode == "interleave":
        report = interleaving_report(experiment, exposures, items, events, policy, alpha=alpha)
        report["decision"] = _interleaving_decision(report, alpha)
    else:
        raise ValueError(f"experiment mode {getattr(experiment, 'mode', None)!r}; expected one of {list(MODES)}")
    return jsonable(report)


def _ab_decision(report: dict[str, Any], alpha: float) -> dict[str, Any]:
    seq, srm, arms = report["sequential"], report["srm"], report["arms"]
    p = seq["p_value"]
    effect = report["lift"]["relative"]
    decision = {"winner": None, "test": "mSPRT (always-valid p-value)", "p_value": p, "effect": effect}
    n_min = report["protocol"]["min_users"]
    have = [arms[a]["users_with_impressions"] for a in ARMS]
    if srm["flagged"]:
        return {**decision, "reason": f"sample ratio mismatch (SRM p = {srm['p_value']:.3g} < {srm['threshold']}): "
                                      "the assignment is broken, so no arm can win"}
    if min(have) < n_min or p is None:
        return {**decision, "reason": f"too little data: users with impressions per arm {have}, need >= {n_min} "
                                      "in each"}
    if p >= alpha:
        return {**decision, "reason": f"no significant difference yet: always-valid p = {p:.3g} >= alpha = {alpha}"}
    diff = report["lift"]["absolute"] or 0.0
    winner = "challenger" if diff > 0 else "champion"
    return {**decision, "winner": winner,
            "reason": f"always-valid p = {p:.3g} < alpha = {alpha}; the {winner} has the higher mean per-user CTR "
                      f"(difference {diff:+.4g})"}


def _interleaving_decision(report: dict[str, Any], alpha: float) -> dict[str, Any]:
    p, delta = report["sign_test"]["p_value"], report["delta"]
    decision = {"winner": None, "test": "sign test (two-sided binomial, wins vs losses)", "p_value": p,
                "effect": delta}
    if p is None or delta is None:
        return {**decision, "reason": "too little data: no request was won or lost (no credited clicks that differ)"}
    if p >= alpha or delta == 0:
        return {**decision, "reason": f"no significant preference: sign-test p = {p:.3g} >= alpha = {alpha}"
                if p >= alpha else "wins and ties balance: delta = 0"}
    winner = "challenger" if delta > 0 else "champion"
    return {**decision, "winner": winner,
            "reason": f"sign-test p = {p:.3g} < alpha = {alpha}; delta = {delta:+.4g} favours the {winner}"}


# ---- frames -----------------------------------------------------------------------------------------------------


def _check_alpha(alpha: float) -> None:
    if not 0 < alpha < 1:
        raise ValueError(f"alpha={alpha} must be in (0, 1)")


def _weights(experiment: Any) -> tuple[float, float]:
    w = tuple(float(x) for x in experiment.weights)
    if len(w) != 2 or not all(math.isfinite(x) and x >= 0 for x in w) or sum(w) <= 0:
        raise ValueError(f"experiment weights {experiment.weights!r} must be two finite numbers >= 0, sum > 0")
    return w  # type: ignore[return-value]


def _describe(experiment: Any) -> dict[str, Any]:
    return {"experiment_id": str(experiment.experiment_id), "mode": str(getattr(experiment, "mode", "")),
            "weights": [float(x) for x in experiment.weights],
            "champion_version": _opt_text(getattr(experiment, "champion_version", None)),
            "challenger_version": _opt_text(getattr(experiment, "challenger_version", None))}


def _opt_text(v: Any) -> str | None:
    return None if v is None else str(v)


def _text(s: pd.Series) -> pd.Series:
    """Ids as strings; missing (None/NaN) as ''."""
    s = s.astype(object).where(s.notna(), "")
    return s if pd.api.types.infer_dtype(s, skipna=False) in ("string", "empty") else s.map(str)


def _label(s: pd.Series) -> pd.Series:
    """``_text`` stripped and lower-cased (arms, teams), computed once per distinct value."""
    s = _text(s)
    uniq = pd.unique(s)
    return s.map(dict(zip(uniq, (str(u).strip().lower() for u in uniq), strict=True))).astype(object)


def _experiment_exposures(exposures: pd.DataFrame | None, experiment: Any) -> pd.DataFrame:
    """The experiment's requests: request_id, user_id, arm (lower case), model_version, ts (first row per id)."""
    ex = frame_with(exposures, ("request_id", "user_id", "experiment_id"), "exposures")
    n = len(ex)
    col = {c: (ex[c] if c in ex.columns else pd.Series([None] * n, index=ex.index, dtype=object))
           for c in ("arm", "model_version", "ts")}
    out = pd.DataFrame({"request_id": _text(ex["request_id"]), "user_id": _text(ex["user_id"]),
                        "experiment_id": _text(ex["experiment_id"]),
                        "arm": _label(col["arm"]),
                        "model_version": _text(col["model_version"]),
                        "ts": pd.to_datetime(col["ts"], utc=True, errors="coerce")})
    out = out.drop_duplicates("request_id")
    out = out[out["experiment_id"] == str(experiment.experiment_id)]
    return out.drop(columns="experiment_id").reset_index(drop=True)


def _slots(items: pd.DataFrame | None, ex: pd.DataFrame) -> pd.DataFrame:
    """The slots of ``ex``'s requests (a repeated (request_id, position) once) with team, user, arm and ts."""
    it = frame_with(items, ("request_id", "position", "item_id"), "items")
    pos = pd.to_numeric(it["position"], errors="coerce")
    if len(it) and (pos.isna().any() or (pos < 1).any() or (pos != pos.round()).any()):
        raise ValueError("items: position must be an integer >= 1 (1-based slots)")
    rid = _text(it["request_id"])
    known = rid.isin(ex["request_id"]).to_numpy()
    it, rid, pos = it[known], rid[known], pos[known]
    team = _label(it["team"]) if "team" in it.columns else pd.Series("", index=it.index, dtype=object)
    slots = pd.DataFrame({"request_id": rid, "position": pos.fillna(0).astype(np.int64),
                          "item_id": _text(it["item_id"]), "team": team})
    slots = slots.drop_duplicates(["request_id", "position"])
    slots = slots.merge(ex[["request_id", "user_id", "arm", "ts"]], on="request_id", how="inner")
    return slots.reset_index(drop=True)


def _clicks(events: pd.DataFrame | None, slots: pd.DataFrame, policy: EventPolicy) -> pd.DataFrame:
    """The clicks: one row per (request_id, item_id) of a positive event attributed to a slot of ``slots``,
    with the slot's columns and the event's ``received_at`` (NaT when absent).

    As in ``recloop.online_metrics``: an event is attributed to the slot of its request that showed its
    item, preferring the slot at the event's reported ``position``, else the lowest position; the first
    event row (log order) of a (request_id, item_id) is kept.
    """
    ev = frame_with(events, ("request_id", "item_id", "event_type"), "events")
    roles = policy.roles(ev["event_type"], ev["value"] if "value" in ev.columns else None)
    pos = (pd.to_numeric(ev["position"], errors="coerce") if "position" in ev.columns
           else pd.Series(np.nan, index=ev.index))
    rec = (pd.to_datetime(ev["received_at"], utc=True, errors="coerce") if "received_at" in ev.columns
           else pd.Series(pd.NaT, index=ev.index, dtype="datetime64[ns, UTC]"))
    e = pd.DataFrame({"request_id": _text(ev["request_id"]).to_numpy(), "item_id": _text(ev["item_id"]).to_numpy(),
                      "event_position": pos.astype("float64").to_numpy(),
                      "received_at": rec.dt.tz_localize(None).to_numpy(dtype="datetime64[ns]"),
                      "_row": np.arange(len(ev))})
    e = e[(roles == "positive") & (e["request_id"] != "").to_numpy()]
    joined = e.merge(slots, on=["request_id", "item_id"], how="inner")
    joined["_agrees"] = joined["event_position"] == joined["position"]
    joined = (joined.sort_values(["_row", "_agrees", "position"], ascending=[True, False, True], kind="stable")
              .drop_duplicates("_row").sort_values("_row", kind="stable")
              .drop_duplicates(["request_id", "item_id"]))
    return joined.drop(columns=["_row", "_agrees", "event_position"]).reset_index(drop=True)


# ---- JSON ------------------------------------------------------------------------------------------------------


def _num(x: Any) -> float | None:
    """A finite float, else None."""
    if x is None:
        return None
    try:
        f = float(x)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None



"""Off-policy estimates in the gate (flows/ope.py): logged requests, hand-computed estimates, the rule, the flow.

The hand-made log (7 items, context ["f"] masked, slates of 2, ε-greedy with ε = 0.5 over a pool of 6, so
n_B = 4: a kept greedy slot has propensity 0.5, a drawn one 0.5 / 4 = 0.125). The stub model scores
f > a > b > c > d > e > g whatever the history, so its greedy target is [a, b] (f is the context: masked).

    request  policy        slate   propensities  clicks  target top-1 agrees  unsupported (p1, p2)
    r1       epsilon:0.5   a, b    .5, .5        a       yes                  -, -
    r2       epsilon:0.5   c, b    .125, .5      b       no                   -, -   (a unshown: ε/n_B or 1 - ε)
    r3       epsilon:0.5   a, d    .5, .125      -       yes                  -, -   (b unshown)
    r4       greedy        a, b    (none → 1)    b       yes                  -, -
    r5       epsilon:0.5   b, a    .5, .5        a       no                   a kept at 2, b kept at 1
    r6       greedy        b, a    1, 1          -       no                   deterministic logger: both
    r7       interleaving  a, b    (none)        left out: no_propensity
    r8       greedy        a       (context [])  left out: no_context
    r9       epsilon:0.5   (none)                left out: empty_slate

Top slot: r = [1, 0, 0, 0, 0, 0], μ = [.5, .125, .5, 1, .5, 1], π = [1, 0, 1, 1, 0, 0], w = [2, 0, 2, 1, 0, 0]:
SNIPS = 2 / 5 = 0.4, ESS = 5² / 9, unsupported 2 of 6.
Slates (K = 2): IIPS per request = Σ_p c π / μ = [2, 2, 0, 1, 0, 0] → 5 / 6;
PI Γ = Σ_p π / μ − 1 = [3, 1, 1, 1, −1, −1], reward = clicks summed = [1, 1, 0, 1, 1, 0] → (3 + 1 + 1 − 1) / 6 = 2 / 3.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch

from flows.ope import (
    REWARD_SIGNS,
    LoggedData,
    apply_ope_gate,
    estimate_online_ctr,
    fit_click_model,
    fit_reward_model,
    logged_requests,
    ope_gate,
    ope_metrics,
    ope_tag,
)
from models.vocab import ItemVocabulary
from recloop.gate import decide
from recloop.policy import EventPolicy
from recloop.settings import get_settings

VOCAB = ItemVocabulary(["a", "b", "c", "d", "e", "f", "g"])
SCORES = {"f": 10.0, "a": 5.0, "b": 4.0, "c": 3.0, "d": 2.0, "e": 1.0, "g": 0.0}


class FixedScorer:
    """A scorer whose scores are fixed per item, whatever the history (no ``config``: whole histories)."""

    def __init__(self, scores: dict[str, float], vocab: ItemVocabulary) -> None:
        row = torch.zeros(len(vocab) + 1)
        for item, value in scores.items():
            row[int(vocab.encode([item])[0])] = value
        self.row = row

    def score(self, item_idx: torch.Tensor, candidate_idx: torch.Tensor | None = None) -> torch.Tensor:
        return self.row.expand(item_idx.shape[0], -1).clone()


def _frames() -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    eps, nan = "epsilon:0.5", math.nan
    rows = [  # request, policy, context, pool, [(item, propensity)]
        ("r1", eps, ["f"], 6, [("a", 0.5), ("b", 0.5)]),
        ("r2", eps, ["f"], 6, [("c", 0.125), ("b", 0.5)]),
        ("r3", eps, ["f"], 6, [("a", 0.5), ("d", 0.125)]),
        ("r4", "greedy", ["f"], None, [("a", nan), ("b", nan)]),
        ("r5", eps, ["f"], 6, [("b", 0.5), ("a", 0.5)]),
        ("r6", "greedy", ["f"], 6, [("b", 1.0), ("a", 1.0)]),
        ("r7", "interleaving", ["f"], 6, [("a", nan), ("b", nan)]),
        ("r8", "greedy", [], 6, [("a", 1.0)]),
        ("r9", eps, ["f"], 6, []),
    ]
    exposures = pd.DataFrame({"request_id": [r[0] for r in rows], "policy": [r[1] for r in rows],
                              "context": [r[2] for r in rows],
                              "pool_size": pd.array([r[3] for r in rows], dtype="Int64")})
    items = pd.DataFrame([{"request_id": r[0], "position": p + 1, "item_id": item, "propensity": prop}
                          for r in rows for p, (item, prop) in enumerate(r[4])][::-1])  # any order
    events = pd.DataFrame([
        ("r1", "a", "click", nan), ("r1", "a", "click", nan),  # reported twice: one click
        ("r2", "b", "purchase", nan), ("r3", "a", "skip", nan), ("r3", "z", "click", nan),  # skip; not shown
        ("r4", "b", "rating", 4.0), ("r5", "a", "like", nan), ("r7", "a", "click", nan),
    ], columns=["request_id", "item_id", "event_type", "value"])
    return exposures, items, events


def _logged() -> LoggedData:
    return logged_requests(*_frames(), EventPolicy())


def test_logged_requests_keeps_usable_requests_with_their_clicks_and_counts_the_rest() -> None:
    logged = _logged()
    assert [r.request_id for r in logged.requests] == ["r1", "r2", "r3", "r4", "r5", "r6"]
    assert logged.excluded == {"no_propensity": 1, "no_context": 1, "empty_slate": 1}
    assert (logged.n, logged.n_exploratory) == (6, 4)
    r1, r2, r3, r4 = logged.requests[:4]
    assert r1.slate == ("a", "b") and r1.context == ("f",) and r1.pool_size == 6 and r1.policy == "epsilon:0.5"
    assert r2.propensities.tolist() == [0.125, 0.5] and r4.propensities.tolist() == [1.0, 1.0]  # greedy: 1
    assert r4.pool_size is None
    assert [r.clicks.tolist() for r in logged.requests] == [[1, 0], [0, 1], [0, 0], [0, 1], [0, 1], [0, 0]]
    assert logged.describe()["n_clicks"] == 4 and logged.describe()["policies"] == {"epsilon:0.5": 4, "greedy": 2}
    assert logged_requests(_frames()[0].iloc[:0], _frames()[1], None, EventPolicy()).n == 0


def test_estimates_match_the_hand_computed_values() -> None:
    est = estimate_online_ctr(FixedScorer(SCORES, VOCAB), VOCAB, _logged(), k=2, n_boot=200, seed=1)
    assert (est["k"], est["n_requests"], est["n_exploratory"]) == (2, 6, 4)
    assert est["logged_ctr"] == pytest.approx(1 / 6) and est["target_agreement"] == pytest.approx(3 / 6)
    snips, iips, pi, dr = (est["estimators"][n] for n in ("snips", "iips", "pi", "dr"))
    assert snips["value"] == pytest.approx(0.4) and snips["key"] == "snips_ctr"
    assert snips["ess"] == pytest.approx(25 / 9) and snips["n"] == 6
    assert snips["n_unsupported"] == 2 and snips["unsupported_share"] == pytest.approx(1 / 3)
    assert snips["ci_low"] <= snips["value"] <= snips["ci_high"]
    assert iips["value"] == pytest.approx(5 / 6) and iips["key"] == "iips_clicks" and iips["n_unsupported"] == 2
    assert pi["value"] == pytest.approx(2 / 3) and pi["n_unsupported"] == 2
    # DR: r̂(x, a) = σ(b0 + b1 log rank(a) + b2 log P(a | x)); the logged top items a, c, a, a, b, b have ranks
    # 1, 3, 1, 1, 2, 2 and softmax probabilities over the masked scores (f is the context: masked).
    lse = math.log(sum(math.exp(v) for item, v in SCORES.items() if item != "f"))
    logp = {item: v - lse for item, v in SCORES.items()}
    w, r, ranks = [2, 0, 2, 1, 0, 0], [1, 0, 0, 0, 0, 0], [1, 3, 1, 1, 2, 2]
    x = np.column_stack([np.ones(6), np.log(ranks), [logp[i] for i in "acaabb"]])
    beta = fit_reward_model(x, np.array(r, dtype=float), signs=REWARD_SIGNS)
    model = est["reward_model"]
    assert [model["b0"], model["b1"], model["b2"]] == pytest.approx(beta.tolist())
    assert beta[1] <= 0 <= beta[2]

    def sig(v: float) -> float:
        return 1 / (1 + math.exp(-v))

    hat_target = sig(beta[0] + beta[2] * logp["a"])  # the target's top item a: rank 1 (log 1 = 0)
    expected = np.mean([hat_target + wi * (ri - sig(float(xi @ beta))) for wi, ri, xi in zip(w, r, x, strict=True)])
    assert dr["value"] == pytest.approx(expected)


def test_the_context_is_masked_and_unknown_ids_are_dropped() -> None:
    exposures, items, events = _frames()
    exposures = exposures.iloc[:1].assign(context=[["zz", "f", "a"]])  # f, a masked: the target is [b, c]
    est = estimate_online_ctr(FixedScorer(SCORES, VOCAB), VOCAB, logged_requests(exposures, items, events,
                                                                                   EventPolicy()), k=2, n_boot=0)
    assert est["target_agreement"] == 0.0 and est["n_unknown_context"] == 0
    assert math.isnan(est["estimators"]["snips"]["value"])  # no logged top item is the target's: no weight
    assert math.isnan(est["estimators"]["snips"]["ci_low"])  # n_boot=0: no interval
    # the target b at position 1 is shown at position 2, kept greedily by ε-greedy: never at 1 -> unsupported
    assert est["estimators"]["snips"]["n_unsupported"] == 1


def test_the_recorded_mask_is_what_the_target_masks() -> None:
    """Serving masks the user's whole consumption (``masked``, revision 0005), not only the window."""
    exposures, items, events = _frames()
    one = exposures.iloc[:1].assign(masked=[["f", "a"]])  # "a" consumed long ago, out of the window ["f"]
    logged = logged_requests(one, items, events, EventPolicy())
    assert logged.requests[0].masked == ("f", "a") and logged.requests[0].context == ("f",)
    est = estimate_online_ctr(FixedScorer(SCORES, VOCAB), VOCAB, logged, k=2, n_boot=0)
    assert est["target_agreement"] == 0.0  # the target is [b, c]: "a", logged at 1, was masked
    unknown = exposures.iloc[:1].assign(masked=[None])  # not recorded (before 0005): the context only
    est = estimate_online_ctr(FixedScorer(SCORES, VOCAB), VOCAB, logged_requests(unknown, items, events,
                                                                                 EventPolicy()), k=2, n_boot=0)
    assert est["target_agreement"] == 1.0


def test_support_under_a_bounded_epsilon_pool() -> None:
    """``epsilon:0.5,n=3``: the logger's ranks 3..3 are not in the log, so an unshown item is not known to be
    supported; one the log shows as explored is."""
    from flows.ope import LoggedRequest, target_supported
    from models.exploration import ExplorationPolicy

    req = LoggedRequest("r", ("f",), ("c", "b"), np.array([0.25, 0.5]), np.zeros(2), 6, "epsilon:0.5,n=3")
    bounded = ExplorationPolicy.parse(req.policy)
    assert target_supported("c", 0, req, bounded)  # the logged item itself
    assert target_supported("c", 1, req, bounded)  # explored at slot 1: it is in the pool B
    assert not target_supported("b", 0, req, bounded)  # the logger's greedy item of slot 2
    assert not target_supported("z", 0, req, bounded)  # unshown: maybe beyond rank N
    assert target_supported("z", 0, req, ExplorationPolicy.parse("epsilon:0.5"))  # unbounded: all of B
    small = LoggedRequest("r", ("f",), ("c", "b"), np.array([0.25, 0.5]), np.zeros(2), 3, "epsilon:0.5,n=3")
    assert target_supported("z", 0, small, bounded)  # the pool is no larger than N: every item is in B


def test_the_dr_interval_refits_the_reward_model() -> None:
    """When the target seldom agrees with the logged item, r̂_π carries DR: a fixed-model bootstrap is too
    narrow, refitting per resample widens it and still contains the estimate."""
    from flows.ope import dr_refit_interval, reward_features
    from models import ope as estimators

    rng = np.random.default_rng(0)
    n = 400
    ranks = rng.integers(1, 30, size=n).astype(float)
    log_probs = -np.log(ranks) - 2.0 + rng.normal(0, 0.3, size=n)
    clicks = (rng.random(n) < 0.3 / np.sqrt(ranks)).astype(float)
    mu = np.full(n, 0.9)
    pi = (ranks == 1).astype(float)
    has_target = np.ones(n, dtype=bool)
    x_logged = reward_features(ranks, log_probs)
    x_target = reward_features(np.ones(n), np.full(n, -2.0))
    beta = fit_reward_model(x_logged, clicks, signs=REWARD_SIGNS)
    hat_logged = 1 / (1 + np.exp(-(x_logged @ beta)))
    hat_target = 1 / (1 + np.exp(-(x_target @ beta)))
    fixed = estimators.doubly_robust(clicks, mu, pi, hat_logged, hat_target, n_boot=500, seed=3)
    low, high = dr_refit_interval(x_logged, x_target, clicks, mu, pi, has_target, n_boot=500, seed=3)
    assert low <= fixed.value <= high
    assert high - low > 2 * (fixed.ci_high - fixed.ci_low)
    assert all(math.isnan(v) for v in dr_refit_interval(x_logged, x_target, clicks, mu, pi, has_target, n_boot=0))


def test_the_reward_model_keeps_its_signs_and_uses_the_models_confidence() -> None:
    rng = np.random.default_rng(1)
    n = 4000
    log_probs = rng.uniform(-6, -1, size=n)
    ranks = rng.integers(1, 20, size=n).astype(float)
    clicks = (rng.random(n) < 1 / (1 + np.exp(-(0.5 + 0.6 * log_probs)))).astype(float)  # no rank effect
    beta = fit_reward_model(np.column_stack([np.ones(n), np.log(ranks), log_probs]), clicks, signs=REWARD_SIGNS)
    assert beta[2] == pytest.approx(0.6, abs=0.1) and beta[0] == pytest.approx(0.5, abs=0.25) and beta[1] <= 0
    flipped = fit_reward_model(np.column_stack([np.ones(n), np.log(ranks), -log_probs]), clicks, signs=REWARD_SIGNS)
    assert flipped[2] == 0.0  # the wrong sign is held at 0 and the rest refitted
    with pytest.raises(ValueError):
        fit_reward_model(np.ones((3, 2)), np.zeros(2))


def test_the_click_model_is_monotone_in_rank() -> None:
    ranks = np.repeat([1, 2, 4, 8], 50)
    clicks = np.concatenate([np.r_[np.ones(n), np.zeros(50 - n)] for n in (25, 15, 8, 3)])
    b0, b1 = fit_click_model(ranks, clicks)
    assert b1 < 0 and 1 / (1 + math.exp(-b0)) == pytest.approx(0.5, abs=0.05)
    b0, b1 = fit_click_model(ranks, clicks[::-1])  # clicks rising down the ranking: held constant
    assert b1 == 0.0 and 1 / (1 + math.exp(-b0)) == pytest.approx(clicks.mean(), abs=1e-3)
    assert np.isfinite(fit_click_model([1, 2, 3], [0, 0, 0])).all()
    with pytest.raises(ValueError):
        fit_click_model([0.5], [1])


def _est(value: float, low: float, ess: float = 500.0, share: float = 0.0, n_exploratory: int = 1000,
         name: str = "snips") -> dict[str, Any]:
    one = {"value": value, "ci_low": low, "ci_high": value + 0.01, "ess": ess, "n": n_exploratory,
           "n_unsupported": 0, "unsupported_share": share, "estimator": name, "key": f"{name}_ctr"}
    other = {**one, "value": 0.0, "ci_low": 0.0, "ess": 0.0, "unsupported_share": 1.0}  # never the one judged
    return {"n_exploratory": n_exploratory, "target_agreement": 0.5,
            "estimators": {n: (one if n == name else {**other, "key": f"{n}_x"}) for n in ("snips", "dr")}}


RULE = {"tolerance": 0.01, "min_requests": 500, "min_ess": 100.0, "max_unsupported_share": 0.2}


def test_the_rule_passes_fails_and_skips_as_documented() -> None:
    ok = ope_gate(_est(0.050, 0.046), _est(0.055, 0.050), **RULE)
    assert ok["passed"] is True and "0.0460" in ok["reason"] and "0.0450" in ok["reason"]
    assert ok["rule"] == "candidate snips_ctr lower 95% bound >= champion snips_ctr - 0.01"
    bad = ope_gate(_est(0.050, 0.040), _est(0.055, 0.050), **RULE)
    assert bad["passed"] is False and "<" in bad["reason"]
    skips = {
        "no off-policy estimate": ope_gate(None, _est(0.05, 0.04), **RULE),
        "no champion": ope_gate(_est(0.05, 0.04), None, **RULE),
        "499 logged exploratory requests < ope_min_requests 500": ope_gate(_est(0.05, 0.04, n_exploratory=499),
                                                                            _est(0.05, 0.04), **RULE),
        "candidate snips ESS 99.0 < ope_min_ess 100": ope_gate(_est(0.05, 0.04, ess=99), _est(0.05, 0.04), **RULE),
        "champion snips ESS 50.0": ope_gate(_est(0.05, 0.04), _est(0.05, 0.04, ess=50), **RULE),
        "candidate unsupported share 0.300 > ope_max_unsupported_share 0.2": ope_gate(
            _est(0.05, 0.04, share=0.3), _est(0.05, 0.04), **RULE),
        "candidate snips_ctr has no bootstrap interval": ope_gate(_est(0.05, math.nan), _est(0.05, 0.04), **RULE),
        "champion snips_ctr has no value": ope_gate(_est(0.05, 0.04), _est(math.nan, math.nan), **RULE),
    }
    for expected, out in skips.items():
        assert out["passed"] is None and out["reason"].startswith("skipped: ") and expected in out["reason"], out
    dr = ope_gate(_est(0.05, 0.03, name="dr"), _est(0.05, 0.04, name="dr"), estimator="dr", **RULE)
    assert dr["passed"] is False and "dr_ctr" in dr["rule"]
    with pytest.raises(ValueError, match="estimator"):
        ope_gate(None, None, estimator="ips", **RULE)


def test_the_rule_is_anded_into_the_gate_only_when_it_ran() -> None:
    passing = decide({"ndcg@10": 0.1, "coverage@10": 0.3}, None, {})
    failed = apply_ope_gate(passing, {"passed": False, "reason": "r", "rule": "x"})
    assert not failed.passed and failed.reasons[-1] == "FAIL ope r" and failed.as_tags()["gate.decision"] == "fail"
    kept = apply_ope_gate(passing, {"passed": None, "reason": "skipped: why", "rule": "x"})
    assert kept.passed and kept.reasons[-1] == "PASS ope rule skipped: why"
    assert apply_ope_gate(passing, {"passed": True, "reason": "r", "rule": "x"}).passed
    offline_fail = decide({"ndcg@10": 0.1, "coverage@10": 0.3}, {"ndcg@10": 0.2, "coverage@10": 0.3}, {})
    assert not apply_ope_gate(offline_fail, {"passed": True, "reason": "r", "rule": "x"}).passed
    assert ope_tag({"passed": None, "reason": "skipped: why"}) == "skipped: why"
    assert ope_tag({"passed": True, "reason": ""}) == "pass" and ope_tag({"passed": False, "reason": ""}) == "fail"


# ---- the evaluate flow (its dependencies stubbed; the exposure log is real, in SQLite) ----------------------
FLOW_VOCAB = ItemVocabulary([f"i{j}" for j in range(1, 9)])
T0 = pd.Timestamp("2024-05-01T12:00:00Z")


def _write_log(url: str, n: int = 300) -> None:
    """n requests logged ε-greedy (ε = 0.5, k = 2) by the champion (i1 > i2 > ...); the user clicks whatever
    of i1, i2 is shown at position 1. The candidate (i8 > i7 > ...) is never clicked."""
    from models.exploration import ExplorationPolicy, explore
    from recloop.eventlog import EventLog
    from recloop.exposures import ExposureLog

    champion = np.r_[-np.inf, np.arange(8, 0, -1, dtype=np.float64)]  # i1 best
    policy, rng = ExplorationPolicy.parse("epsilon:0.5"), np.random.default_rng(0)
    clicks = []
    with ExposureLog(url, flush_interval_s=0.02) as xlog:
        for k in range(n):
            scores = champion.copy()
            scores[5] = -np.inf  # the context i5 is masked
            slate = explore(scores, 2, policy, rng)
            shown = FLOW_VOCAB.decode(slate.items)
            xlog.record(f"req-{k}", f"u{k}", "1", [(i, 0.0) for i in shown], context=["i5"], policy="epsilon:0.5",
                        propensities=slate.propensities.tolist(), pool_size=slate.pool_size)
            if shown[0] in ("i1", "i2"):
                clicks.append({"user_id": f"u{k}", "item_id": shown[0], "event_type": "click", "timestamp": T0,
                               "request_id": f"req-{k}", "position": 1})
        assert xlog.flush(10)
    log = EventLog(url)
    try:
        log.append(clicks)
    finally:
        log.close()


class _Client:
    def __init__(self) -> None:
        self.metrics: dict[str, float] = {}
        self.tags: dict[str, str] = {}

    def get_run(self, run_id: str) -> Any:
        return SimpleNamespace(data=SimpleNamespace(tags={"data.source": "stub", "data.sha256": "sha",
                                                          "model.uri": "runs:/x/model"}))

    def log_metric(self, run_id: str, key: str, value: float) -> None:
        self.metrics[key] = value

    def set_tag(self, run_id: str, key: str, value: str) -> None:
        self.tags[key] = value

    def set_model_version_tag(self, name: str, version: str, key: str, value: str) -> None:
        pass


def _run_evaluate(monkeypatch: pytest.MonkeyPatch) -> tuple[dict[str, Any], _Client, dict[str, Any]]:
    import flows.evaluate as fev
    import flows.ope as fope

    get_settings.cache_clear()
    client, seen = _Client(), {}
    candidate = FixedScorer({f"i{j}": float(j) for j in range(1, 9)}, FLOW_VOCAB)  # i8 best
    champion = FixedScorer({f"i{j}": float(9 - j) for j in range(1, 9)}, FLOW_VOCAB)  # i1 best
    offline = {"candidate": {"ndcg@10": 0.2, "coverage@10": 0.5}, "champion": {"ndcg@10": 0.1, "coverage@10": 0.5},
               "MostPop": {"ndcg@10": 0.05, "coverage@10": 0.1}}
    events = pd.DataFrame({"user_id": ["u"], "item_id": ["i1"], "event_type": ["click"], "value": [math.nan],
                           "timestamp": [pd.Timestamp("2026-01-01", tz="UTC")]})
    test_logger = logging.getLogger("test")
    for module in (fev, fope):
        monkeypatch.setattr(module, "get_run_logger", lambda: test_logger)
    monkeypatch.setattr(fev, "ope_task", fope.ope_task.fn)  # the task's body, without a Prefect run
    monkeypatch.setattr(fev.tracking, "configure_tracking", lambda settings=None: client)
    monkeypatch.setattr(fev, "load_events", lambda source, path: (events, None, None))
    monkeypatch.setattr(fev, "data_fingerprint", lambda ev, source: {"data.sha256": "sha"})
    monkeypatch.setattr(fev, "_load_candidate", lambda c, run_id: (candidate, FLOW_VOCAB, {}))
    monkeypatch.setattr(fev, "build_sequences", lambda ev, vocab: {})
    monkeypatch.setattr(fev, "leave_one_out", lambda seqs: SimpleNamespace(protocol={}, valid=None, train=None))
    monkeypatch.setattr(fev.aliases, "get_alias_version", lambda c, name, alias: "1")
    monkeypatch.setattr(fev.store, "load_version", lambda name, version, client: SimpleNamespace(
        model=champion, vocab=FLOW_VOCAB, version="1"))
    monkeypatch.setattr(fev, "score_models_task", lambda *a: offline)
    monkeypatch.setattr(fev, "choose_short_history", lambda *a: {"strategy": "model", "population": "stub"})
    monkeypatch.setattr(fev, "_log_report", lambda *a: seen.update(report_args=a))
    monkeypatch.setattr(fev, "create_markdown_artifact", lambda **kw: seen.update(markdown=kw["markdown"]))
    monkeypatch.setattr(fev.aliases, "register_version", lambda *a: SimpleNamespace(version="2"))
    monkeypatch.setattr(fev.aliases, "set_challenger", lambda *a: None)
    try:
        out = fev.evaluate_flow.fn("run-1", auto_promote=False)
    finally:
        get_settings.cache_clear()
    return out, client, seen


def test_the_evaluate_flow_ands_the_ope_rule_into_the_gate(recloop_home: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RECLOOP_OPE_MIN_REQUESTS", "100")
    monkeypatch.setenv("RECLOOP_OPE_MIN_ESS", "5")
    monkeypatch.setenv("RECLOOP_OPE_MAX_UNSUPPORTED_SHARE", "0.5")
    monkeypatch.delenv("RECLOOP_EVENT_LOG_URL", raising=False)
    get_settings.cache_clear()
    _write_log(get_settings().event_log_uri)

    out, client, seen = _run_evaluate(monkeypatch)  # offline the candidate wins; online it is never clicked
    assert out["passed"] is False and out["decision"]["reasons"][-1].startswith("FAIL ope candidate snips_ctr")
    assert all(r.startswith("PASS") for r in out["decision"]["reasons"][:-1])  # the offline rules passed
    assert client.tags["gate.ope"] == "fail" and client.tags["gate.decision"] == "fail"
    assert client.tags["stage"] == "rejected"
    ope = out["ope"]
    assert ope["log"]["n_requests"] == ope["log"]["n_exploratory"] == 300
    assert ope["candidate"]["estimators"]["snips"]["value"] == 0.0
    assert ope["champion"]["estimators"]["snips"]["value"] == 1.0  # the champion's top item is always clicked
    assert client.metrics["ope.snips_ctr"] == 0.0 and client.metrics["ope.champion.snips_ctr"] == 1.0
    assert {"ope.snips_ctr_low", "ope.ess", "ope.n_requests", "ope.unsupported_share", "ope.iips_clicks"} <= set(
        client.metrics)
    assert client.metrics["ope.n_requests"] == 300.0 and client.metrics["ope.unsupported_share"] == 0.0
    assert "Off-policy estimates" in out["report_md"] and seen["markdown"] == out["report_md"]
    assert seen["report_args"][-2] is ope  # evaluation.json holds the estimates (and the short-history choice)

    monkeypatch.setenv("RECLOOP_OPE_MIN_REQUESTS", "1000")  # too few exploratory requests: skipped
    out, client, _ = _run_evaluate(monkeypatch)
    assert out["passed"] is True and client.tags["stage"] == "challenger"
    assert client.tags["gate.ope"] == "skipped: 300 logged exploratory requests < ope_min_requests 1000"
    assert out["decision"]["reasons"][-1] == "PASS ope rule " + client.tags["gate.ope"]
    assert "ope.snips_ctr" not in client.metrics and client.metrics["ope.n_requests"] == 300.0

    monkeypatch.setenv("RECLOOP_EVENT_LOG_URL", "postgresql+psycopg://nobody@127.0.0.1:1/none")  # unreadable
    out, client, _ = _run_evaluate(monkeypatch)
    assert out["passed"] is True and client.tags["gate.ope"].startswith("skipped: exposure log unreadable")
    assert ope_metrics(out["ope"]) == {}

"""recloop.experiment_analysis: hand-computed and scipy-equal statistics, the A/A study, the decisions.

The A/A study (``test_aa_study_msprt_keeps_alpha_and_naive_peeking_does_not``) runs 2,000 seeded A/A
experiments, each looked at 20 times, and checks that the mSPRT keeps its type I error under peeking
while a naive repeated Welch t-test does not. Run with ``-s`` to see the rates.
"""

from __future__ import annotations

import json
import math
from types import SimpleNamespace
from typing import Any

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from recloop import experiment_analysis as ea
from recloop.online_metrics import online_metrics
from recloop.policy import DEFAULT_POLICY, EventPolicy

T0 = pd.Timestamp("2024-05-01", tz="UTC")
Z95 = 1.959963984540054  # Phi^-1(0.975)


def experiment(mode: str = "ab", weights: tuple[float, float] = (0.5, 0.5), eid: str = "exp1") -> SimpleNamespace:
    return SimpleNamespace(experiment_id=eid, mode=mode, weights=weights, champion_version="3",
                           challenger_version="4")


def exposure(rid: str, user: str, arm: str, ts: pd.Timestamp, eid: str = "exp1") -> dict[str, Any]:
    version = {"champion": "3", "challenger": "4"}.get(arm, "3")
    return {"request_id": rid, "user_id": user, "ts": ts, "model_version": version, "variant": arm,
            "experiment_id": eid, "arm": arm, "policy": "greedy", "context": []}


def slot(rid: str, position: int, item: str, team: str | None = None) -> dict[str, Any]:
    return {"request_id": rid, "position": position, "item_id": item, "score": 1.0 / position, "team": team,
            "propensity": np.nan}


def event(rid: str, item: str, user: str, received: pd.Timestamp = T0, event_type: str = "click",
          position: int | None = None, value: float = np.nan) -> dict[str, Any]:
    return {"request_id": rid, "position": position, "user_id": user, "item_id": item, "event_type": event_type,
            "value": value, "timestamp": received, "received_at": received}


def frames(ex: list[dict], it: list[dict], ev: list[dict]) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    events = pd.DataFrame(ev, columns=["request_id", "position", "user_id", "item_id", "event_type", "value",
                                       "timestamp", "received_at"])
    return pd.DataFrame(ex), pd.DataFrame(it), events


def ab_frames(n_c: int, n_t: int, clicks_c: Any, clicks_t: Any, *, n_slots: int = 5, hours: int = 4,
              eid: str = "exp1") -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """One request of ``n_slots`` per user, users spread over ``hours``; user i of an arm clicks the first
    ``clicks_arm(i)`` slots, a minute after the request."""
    ex, it, ev = [], [], []
    for arm, n, clicks in (("champion", n_c, clicks_c), ("challenger", n_t, clicks_t)):
        for i in range(n):
            rid, user = f"{arm[:1]}{arm[-1]}{i}", f"{arm[:1]}{arm[-1]}-u{i}"  # cn0, cn-u0 / cr0, cr-u0
            ts = T0 + pd.Timedelta(hours=i % hours, minutes=5)
            ex.append(exposure(rid, user, arm, ts, eid))
            it += [slot(rid, p, f"i{p}") for p in range(1, n_slots + 1)]
            ev += [event(rid, f"i{p}", user, ts + pd.Timedelta(minutes=1), position=p)
                   for p in range(1, clicks(i) + 1)]
    return frames(ex, it, ev)


# ---- building blocks: hand-computed and scipy-equal -------------------------------------------------------------


def test_wilson_interval_by_hand_and_scipy() -> None:
    # 8 clicks of 20: p = 0.4, z^2 = 3.841458820694124, 1 + z^2/n = 1.1920729410347062,
    # centre = (0.4 + 3.8414588/40) / 1.1920729 = 0.4960365 / 1.1920729 = 0.4161125,
    # half = 1.9599640 / 1.1920729 * sqrt(0.4 * 0.6 / 20 + 3.8414588 / 1600) = 1.6441645 * 0.1200038 = 0.1973060
    lo, hi = ea.wilson_interval(8, 20)
    assert lo == pytest.approx(0.4161125 - 0.1973060, abs=1e-6)  # 0.2188065
    assert hi == pytest.approx(0.4161125 + 0.1973060, abs=1e-6)  # 0.6134185
    ref = stats.binomtest(8, 20).proportion_ci(0.95, method="wilson")
    assert (lo, hi) == pytest.approx((ref.low, ref.high), rel=1e-12)
    ref90 = stats.binomtest(3, 50).proportion_ci(0.90, method="wilson")
    assert ea.wilson_interval(3, 50, 0.90) == pytest.approx((ref90.low, ref90.high), rel=1e-12)
    assert ea.wilson_interval(0, 10)[0] == 0.0
    assert ea.wilson_interval(10, 10)[1] == pytest.approx(1.0)
    assert ea.wilson_interval(0, 0) is None
    with pytest.raises(ValueError):
        ea.wilson_interval(3, 2)


def test_welch_test_by_hand_and_scipy() -> None:
    champion, challenger = [0.0, 0.2, 0.4], [0.2, 0.4, 0.6, 0.8]
    # means 0.2 and 0.5; sample variances 0.04 and 0.2/3; se^2 = 0.04/3 + (0.2/3)/4 = 0.0133333 + 0.0166667 = 0.03
    # t = 0.3 / sqrt(0.03) = 1.7320508; df = 0.03^2 / (0.0133333^2 / 2 + 0.0166667^2 / 3) = 0.0009 / 0.000181481
    res = ea.welch_test(champion, challenger)
    assert res["statistic"] == pytest.approx(math.sqrt(3), rel=1e-9)
    assert res["df"] == pytest.approx(0.0009 / (0.04 ** 2 / 9 / 2 + (0.2 / 12) ** 2 / 3), rel=1e-9)
    ref = stats.ttest_ind(challenger, champion, equal_var=False)
    assert res["p_value"] == pytest.approx(float(ref.pvalue), rel=1e-12)
    assert ea.welch_test([0.1], challenger) == {"statistic": None, "df": None, "p_value": None}
    assert ea.welch_test([0.0, 0.0], [0.0, 0.0])["p_value"] is None  # no variance: undefined, not NaN
    assert ea.welch_test([0.0, 0.0], [1.0, 1.0])["p_value"] is None  # no variance in both: undefined, not 0


def test_srm_check_equals_scipy_chisquare() -> None:
    # 52,000 / 48,000 against 50/50: chi2 = 2 * 2000^2 / 50000 = 160, p ~ 1e-36
    res = ea.srm_check([52_000, 48_000], (0.5, 0.5))
    ref = stats.chisquare([52_000, 48_000], [50_000, 50_000])
    assert res["chi2"] == pytest.approx(160.0) == pytest.approx(float(ref.statistic))
    assert res["p_value"] == pytest.approx(float(ref.pvalue), rel=1e-9)
    assert res["flagged"] is True and res["expected"] == [50_000.0, 50_000.0]
    exact = ea.srm_check([50_000, 50_000], (0.5, 0.5))
    assert exact["chi2"] == 0.0 and exact["p_value"] == pytest.approx(1.0) and exact["flagged"] is False
    arms = np.random.default_rng(0).integers(0, 2, size=100_000)  # a hash-like 50/50 assignment
    counts = [int((arms == 0).sum()), int((arms == 1).sum())]
    hashed = ea.srm_check(counts, (1, 1))
    assert hashed["flagged"] is False
    assert hashed["p_value"] == pytest.approx(float(stats.chisquare(counts).pvalue), rel=1e-9)
    assert ea.srm_check([9_000, 1_000], (0.9, 0.1))["chi2"] == pytest.approx(0.0)  # weights need not sum to 1
    assert ea.srm_check([10, 1], (1.0, 0.0))["flagged"] is True  # a user where no one should be
    assert ea.srm_check([0, 0], (0.5, 0.5)) | {"expected": None} == {
        "counts": [0, 0], "expected": None, "threshold": 0.001, "p_value": None, "chi2": None, "flagged": False}
    with pytest.raises(ValueError):
        ea.srm_check([1, 2], (0.5, -0.5))


def test_relative_lift_delta_method_by_hand() -> None:
    # champion mean 0.2, var 0.04, n 3; challenger mean 0.5, var 0.2/3, n 4: lift = 0.5/0.2 - 1 = 1.5
    # Var = (0.2/3) / (4 * 0.2^2) + 0.5^2 * 0.04 / (3 * 0.2^4) = 0.4166667 + 2.0833333 = 2.5
    res = ea.relative_lift(0.2, 0.04, 3, 0.5, 0.2 / 3, 4)
    assert res["relative"] == pytest.approx(1.5)
    assert res["se"] == pytest.approx(math.sqrt(2.5))
    assert res["ci"] == pytest.approx([1.5 - Z95 * math.sqrt(2.5), 1.5 + Z95 * math.sqrt(2.5)])
    assert res["absolute"] == pytest.approx(0.3) and res["method"] == "delta"
    assert ea.relative_lift(0.0, 0.0, 10, 0.1, 0.01, 10)["relative"] is None  # no champion clicks: no ratio


def test_msprt_lambda_by_hand() -> None:
    # Lambda_n = sqrt(V / (V + n tau2)) * exp(n^2 tau2 theta^2 / (2 V (V + n tau2)))
    # theta 1, V 1, n 3, tau2 1: sqrt(1/4) * exp(9 / (2 * 4)) = 0.5 * e^1.125 = 0.5 * 3.0802168 = 1.5401084
    assert float(ea.msprt_lambda(1.0, 1.0, 3, 1.0)) == pytest.approx(1.5401084244590155, rel=1e-12)
    # theta 0.5, V 2, n 4, tau2 0.25: V + n tau2 = 3; sqrt(2/3) = 0.8164966; 16 * 0.25 * 0.25 / (2 * 2 * 3) = 1/12;
    # e^(1/12) = 1.0869040; Lambda = 0.8164966 * 1.0869040 = 0.8874534
    assert float(ea.msprt_lambda(0.5, 2.0, 4, 0.25)) == pytest.approx(0.8874534402305833, rel=1e-12)
    # theta 0.1, V 1, n 1000, tau2 1: sqrt(1/1001) = 0.0316070; 1e6 * 0.01 / (2 * 1001) = 4.9950050;
    # e^4.995005 = 147.67368; Lambda = 0.0316070 * 147.67368 = 4.6675187
    assert float(ea.msprt_lambda(0.1, 1.0, 1000, 1.0)) == pytest.approx(4.6675187116419385, rel=1e-12)
    # theta 0: Lambda = sqrt(V / (V + n tau2)) = sqrt(1 / 9) = 1/3 (no evidence ever grows without a difference)
    assert float(ea.msprt_lambda(0.0, 1.0, 8, 1.0)) == pytest.approx(1 / 3)
    # no information: Lambda = 1
    assert float(ea.msprt_lambda(0.3, 0.0, 10, 1.0)) == 1.0 and float(ea.msprt_lambda(0.3, 1.0, 0, 1.0)) == 1.0
    assert ea.msprt(0.1, 1.0, 1000, 1.0) == pytest.approx(1 / 4.6675187116419385, rel=1e-12)
    assert ea.msprt(1.0, 1.0, 3, 1.0) == pytest.approx(1 / 1.5401084244590155)
    assert ea.msprt(0.5, 2.0, 4, 0.25) == 1.0  # 1 / 0.887 > 1
    with pytest.raises(ValueError):
        ea.msprt(0.1, 1.0, 10, -1.0)


def test_msprt_sequence_is_the_running_minimum_of_one_over_lambda() -> None:
    # looks with Lambda 0.887, 4.668, 1.540 -> 1/Lambda = 1.127, 0.214, 0.649 -> p = 1, 0.214, 0.214
    p = ea.msprt_sequence([0.5, 0.1, 1.0], [2.0, 1.0, 1.0], [4, 1000, 3], [0.25, 1.0, 1.0])
    assert p == pytest.approx([1.0, 1 / 4.6675187116419385, 1 / 4.6675187116419385], rel=1e-12)
    two = ea.msprt_sequence(np.array([[0.5, 0.1, 1.0], [0.0, 0.0, 0.0]]), 1.0, np.array([4, 1000, 3]), 1.0)
    assert two.shape == (2, 3) and (two[1] == 1.0).all() and (np.diff(two[0]) <= 0).all()


def test_msprt_two_sample_reduces_to_the_paired_form() -> None:
    # equal arms of n: V = var_c + var_t, n pairs; any split: Lambda depends on V_n = var_c/n_c + var_t/n_t
    res = ea.msprt_two_sample(0.05, 0.01, 400, 0.06, 0.012, 400, tau2=1e-4)
    assert float(res["var"]) == pytest.approx(0.022) and float(res["n"]) == 400
    assert float(res["log_lambda"]) == pytest.approx(math.log(float(ea.msprt_lambda(0.01, 0.022, 400, 1e-4))))
    uneven = ea.msprt_two_sample(0.05, 0.01, 300, 0.06, 0.012, 600, tau2=1e-4)
    v_n = 0.01 / 300 + 0.012 / 600
    assert float(uneven["log_lambda"]) == pytest.approx(math.log(float(ea.msprt_lambda(0.01, v_n, 1, 1e-4))))
    # the default tau2: (prior_lift * pooled mean)^2 = (0.1 * (300 * 0.05 + 600 * 0.06) / 900)^2
    rule = ea.msprt_two_sample(0.05, 0.01, 300, 0.06, 0.012, 600)
    assert float(rule["tau2"]) == pytest.approx((0.1 * 51 / 900) ** 2)
    few = ea.msprt_two_sample(0.0, 0.01, 1, 0.9, 0.01, 500)
    assert float(few["p_value"][0]) == 1.0  # an arm below min_n: no evidence


# ---- the A/A study -------------------------------------------------------------------------------------------


def arm_looks(rng: np.random.Generator, n_exp: int, n_looks: int, batch: int, ctr: float, mean_imp: int = 5
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(mean, sample variance, n) of per-user CTRs at each look, shape (n_exp, n_looks): ``batch`` new users per
    look, each with 1 + Poisson(mean_imp - 1) impressions and Binomial(impressions, ctr) clicks."""
    m = 1 + rng.poisson(mean_imp - 1, size=(n_exp, n_looks, batch))
    y = rng.binomial(m, ctr) / m
    n = batch * np.arange(1, n_looks + 1, dtype=float)
    s1, s2 = np.cumsum(y.sum(-1), axis=1), np.cumsum((y * y).sum(-1), axis=1)
    mean = s1 / n
    return mean, (s2 - n * mean * mean) / (n - 1), np.broadcast_to(n, mean.shape)


def rejection_rates(seed: int, n_exp: int, n_looks: int, batch: int, ctr_c: float, ctr_t: float,
                    alpha: float = 0.05, chunk: int = 500) -> tuple[float, float]:
    """Share of experiments rejected at some look by the mSPRT (always-valid p < alpha) and by a naive Welch
    t-test repeated at every look (p < alpha)."""
    rng = np.random.default_rng(seed)
    msprt, naive = [], []
    for start in range(0, n_exp, chunk):
        size = min(chunk, n_exp - start)
        c = arm_looks(rng, size, n_looks, batch, ctr_c)
        t = arm_looks(rng, size, n_looks, batch, ctr_t)
        p_seq = ea.msprt_two_sample(*c, *t)["p_value"]
        p_welch = stats.ttest_ind_from_stats(t[0], np.sqrt(t[1]), t[2], c[0], np.sqrt(c[1]), c[2],
                                             equal_var=False).pvalue
        msprt.append((p_seq < alpha).any(axis=1))
        naive.append((p_welch < alpha).any(axis=1))
    return float(np.concatenate(msprt).mean()), float(np.concatenate(naive).mean())


def test_aa_study_msprt_keeps_alpha_and_naive_peeking_does_not() -> None:
    n_exp, n_looks, batch, alpha = 2_000, 20, 200, 0.05
    r, naive = rejection_rates(0, n_exp, n_looks, batch, 0.05, 0.05, alpha)
    upper = r + 2.576 * math.sqrt(r * (1 - r) / n_exp)
    print(f"\nA/A: {n_exp} experiments x {n_looks} looks ({batch} users/arm/look, CTR 0.05, 1 + Poisson(4) "
          f"impressions per user), alpha {alpha}: mSPRT rejects {r:.4f} (99% upper {upper:.4f}), "
          f"naive repeated Welch {naive:.4f}")
    assert upper <= alpha + 0.01
    assert naive > 0.1


def test_msprt_has_power_against_a_real_lift() -> None:
    power, _ = rejection_rates(1, 200, 20, 500, 0.05, 0.06)  # 10,000 users per arm at the last look
    print(f"\npower, CTR 0.05 vs 0.06, 10,000 users/arm, 20 looks: mSPRT rejects {power:.3f}")
    assert power > 0.9


# ---- A/B reports on frames -----------------------------------------------------------------------------------


def test_ab_report_counts_and_attribution_agree_with_online_metrics() -> None:
    ex = [exposure("r1", "u1", "champion", T0), exposure("r2", "u1", "champion", T0 + pd.Timedelta(hours=1)),
          exposure("r3", "u2", "challenger", T0), exposure("r4", "u3", "challenger", T0),
          exposure("x1", "u9", "champion", T0, eid="other")]  # another experiment: ignored
    it = ([slot("r1", p, i) for p, i in enumerate("abc", 1)] + [slot("r2", p, i) for p, i in enumerate("dae", 1)]
          + [slot("r3", p, i) for p, i in enumerate("abc", 1)] + [slot("r4", p, i) for p, i in enumerate("bcd", 1)]
          + [slot("x1", 1, "a")])
    ev = [event("r1", "a", "u1", position=1), event("r1", "a", "u1", position=1),  # duplicate: once
          event("r1", "c", "u1"), event("r2", "z", "u1"),  # z not shown: unattributed
          event("r2", "e", "u1", event_type="skip"),  # negative: not a click
          event("r3", "b", "u2", position=3),  # b shown at 2: still a click (position mismatch)
          event("r4", "d", "u3", event_type="rating", value=5.0), event("x1", "a", "u9")]
    exposures, items, events = frames(ex, it, ev)
    rep = ea.ab_report(experiment(), exposures, items, events, DEFAULT_POLICY, min_users=1)
    om = online_metrics(exposures[exposures["experiment_id"] == "exp1"], items, events, DEFAULT_POLICY)
    for arm in ea.ARMS:
        assert rep["arms"][arm]["clicks"] == om["groups"][arm]["clicks"]
        assert rep["arms"][arm]["impressions"] == om["groups"][arm]["impressions"]
    champion, challenger = rep["arms"]["champion"], rep["arms"]["challenger"]
    assert (champion["users"], champion["requests"], champion["impressions"], champion["clicks"]) == (1, 2, 6, 2)
    assert (challenger["users"], challenger["requests"], challenger["impressions"]) == (2, 2, 6)
    assert challenger["clicks"] == 2
    assert champion["ctr"] == pytest.approx(2 / 6) and champion["ctr_ci"] == pytest.approx(ea.wilson_interval(2, 6))
    assert challenger["mean_user_ctr"] == pytest.approx(1 / 3)  # u2 1/3, u3 1/3
    assert champion["model_versions"] == ["3"]
    top1 = ea.ab_report(experiment(), exposures, items, events, DEFAULT_POLICY, k=1, min_users=1)
    assert top1["arms"]["champion"]["impressions"] == 2 and top1["arms"]["champion"]["clicks"] == 1
    json.dumps(rep, allow_nan=False)


def test_ab_report_reconstructs_the_hourly_looks() -> None:
    ex, it, ev = [], [], []
    users = [("c1", "champion", 0), ("c2", "champion", 0), ("c3", "champion", 0), ("c4", "champion", 0),
             ("t1", "challenger", 0), ("t2", "challenger", 0), ("t3", "challenger", 0), ("t4", "challenger", 0),
             ("c5", "champion", 1), ("t5", "challenger", 1)]
    for user, arm, hour in users:
        ts = T0 + pd.Timedelta(hours=hour, minutes=10)
        ex.append(exposure(f"r-{user}", user, arm, ts))
        it += [slot(f"r-{user}", 1, "a"), slot(f"r-{user}", 2, "b")]
    clicks = {"c1": 20, "t1": 30, "t2": 30, "t3": 135, "t5": 80}  # minutes after T0 the click is received
    ev = [event(f"r-{u}", "a", u, T0 + pd.Timedelta(minutes=m)) for u, m in clicks.items()]
    rep = ea.ab_report(experiment(), *frames(ex, it, ev), DEFAULT_POLICY, min_users=2, tau2=0.01)
    looks = rep["sequential"]["looks"]
    assert [x["until"] for x in looks] == [(T0 + pd.Timedelta(hours=h)).isoformat() for h in (1, 2, 3)]
    assert [(x["users_champion"], x["users_challenger"]) for x in looks] == [(4, 4), (5, 5), (5, 5)]
    # per-user CTRs at each look (t3's click is received in the third hour)
    c = [[0.5, 0, 0, 0], [0.5, 0, 0, 0, 0], [0.5, 0, 0, 0, 0]]
    t = [[0.5, 0.5, 0, 0], [0.5, 0.5, 0, 0, 0.5], [0.5, 0.5, 0.5, 0, 0.5]]
    stat = [(np.mean(a), np.var(a, ddof=1), len(a)) for a in (*c, *t)]
    mc, vc, nc = (np.array([s[j] for s in stat[:3]]) for j in range(3))
    mt, vt, nt = (np.array([s[j] for s in stat[3:]]) for j in range(3))
    want = ea.msprt_two_sample(mc, vc, nc, mt, vt, nt, tau2=0.01)
    assert [x["diff"] for x in looks] == pytest.approx(list(mt - mc))
    assert [x["p_value"] for x in looks] == pytest.approx(list(want["p_value"]))
    assert rep["sequential"]["p_value"] == pytest.approx(float(want["p_value"][-1]))
    assert rep["arms"]["challenger"]["mean_user_ctr"] == pytest.approx(0.4)


def test_analyse_ab_declares_a_winner_only_with_the_sequential_test_and_no_srm() -> None:
    exp = experiment()
    win = ea.analyse_experiment(exp, *ab_frames(200, 200, lambda i: int(i % 5 == 0), lambda i: int(i % 5 < 3)),
                                DEFAULT_POLICY)
    json.dumps(win, allow_nan=False)
    d = win["decision"]
    assert d["winner"] == "challenger" and d["test"].startswith("mSPRT") and d["p_value"] < 0.05
    assert d["effect"] == pytest.approx(0.12 / 0.04 - 1)  # per-user CTR means 0.04 and 0.12
    assert win["welch"]["p_value"] < 0.05 and win["srm"]["flagged"] is False
    assert win["sequential"]["n_looks"] == 4

    lose = ea.analyse_experiment(exp, *ab_frames(200, 200, lambda i: int(i % 5 < 3), lambda i: int(i % 5 == 0)),
                                 DEFAULT_POLICY)
    assert lose["decision"]["winner"] == "champion"

    srm = ea.analyse_experiment(exp, *ab_frames(300, 100, lambda i: int(i % 5 == 0), lambda i: int(i % 5 < 3)),
                                DEFAULT_POLICY)
    json.dumps(srm, allow_nan=False)
    assert srm["srm"]["flagged"] is True and srm["srm"]["chi2"] == pytest.approx(100.0)  # 2 * 100^2 / 200
    assert srm["decision"]["winner"] is None and "sample ratio mismatch" in srm["decision"]["reason"]
    assert srm["decision"]["p_value"] < 0.05  # significant, yet no winner

    skewed = experiment(weights=(0.75, 0.25))  # the same 300/100 split is what these weights ask for
    ok = ea.analyse_experiment(skewed, *ab_frames(300, 100, lambda i: int(i % 5 == 0), lambda i: int(i % 5 < 3)),
                               DEFAULT_POLICY)
    assert ok["srm"]["flagged"] is False and ok["decision"]["winner"] == "challenger"

    same = ea.analyse_experiment(exp, *ab_frames(200, 200, lambda i: int(i % 5 == 0), lambda i: int(i % 5 == 0)),
                                 DEFAULT_POLICY)
    assert same["decision"]["winner"] is None and same["decision"]["p_value"] >= 0.05
    assert "no significant" in same["decision"]["reason"]

    tiny = ea.analyse_experiment(exp, *ab_frames(5, 5, lambda i: 0, lambda i: 5), DEFAULT_POLICY)
    json.dumps(tiny, allow_nan=False)
    assert tiny["decision"]["winner"] is None and "too little data" in tiny["decision"]["reason"]
    assert tiny["lift"]["relative"] is None  # no champion clicks: no ratio, None rather than inf


def test_analyse_on_empty_frames_is_json_and_has_no_winner() -> None:
    for mode in ea.MODES:
        rep = ea.analyse_experiment(experiment(mode), None, None, None, DEFAULT_POLICY)
        json.dumps(rep, allow_nan=False)
        assert rep["decision"]["winner"] is None and "too little data" in rep["decision"]["reason"]
    with pytest.raises(ValueError, match="mode"):
        ea.analyse_experiment(experiment("bandit"), None, None, None, DEFAULT_POLICY)


# ---- interleaving --------------------------------------------------------------------------------------------


CH, CP = "challenger", "champion"


def interleaved(requests: list[tuple[str, str, list[tuple[str, str | None]], list[dict]]], eid: str = "exp1"
                ) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    ex, it, ev = [], [], []
    for rid, user, shown, events in requests:
        ex.append(exposure(rid, user, ea.INTERLEAVED_ARM, T0, eid))
        it += [slot(rid, p, item, team) for p, (item, team) in enumerate(shown, 1)]
        ev += events
    return frames(ex, it, ev)


def test_interleaving_wins_losses_ties_by_hand() -> None:
    shown = [("a", CH), ("b", CP), ("c", CH), ("d", None)]
    script = [
        ("q1", "u1", shown, [event("q1", "a", "u1")]),  # challenger 1, champion 0: win
        ("q2", "u1", shown, [event("q2", "b", "u1"), event("q2", "c", "u1")]),  # 1 - 1: tie
        ("q3", "u2", shown, [event("q3", "b", "u2")]),  # 0 - 1: loss
        ("q4", "u2", shown, []),  # no click
        ("q5", "u3", shown, [event("q5", "a", "u3"), event("q5", "a", "u3"), event("q5", "c", "u3")]),  # 2 - 0: win
        ("q6", "u3", shown, [event("q6", "z", "u3")]),  # z not shown: no credited click
        ("q7", "u4", shown, [event("q7", "a", "u4", event_type="skip")]),  # a skip is no click
        ("q8", "u4", shown, [event("q8", "d", "u4")]),  # a click on a slot of no team: credited to nobody
    ]
    other = ("o1", "u9", shown, [event("o1", "a", "u9")])
    exposures, items, events = interleaved(script)
    ex2, it2, ev2 = interleaved([other], eid="other")  # another experiment: ignored
    rep = ea.interleaving_report(experiment("interleave"), pd.concat([exposures, ex2]), pd.concat([items, it2]),
                                 pd.concat([events, ev2]), DEFAULT_POLICY)
    json.dumps(rep, allow_nan=False)
    assert (rep["wins"], rep["losses"], rep["ties"], rep["no_click"], rep["decided"]) == (2, 1, 1, 4, 4)
    assert rep["requests"] == 8 and rep["users"] == 4 and rep["impressions"] == 32
    assert rep["clicks_by_team"] == {"champion": 2, "challenger": 4, "none": 1} and rep["clicks"] == 7
    assert rep["delta"] == pytest.approx((2 + 1 / 2) / 4 - 0.5)  # 0.125
    assert rep["sign_test"] == {"p_value": pytest.approx(float(stats.binomtest(2, 3).pvalue)), "wins": 2, "n": 3}
    lo, hi = rep["delta_ci"]
    assert lo <= rep["delta"] <= hi
    again = ea.interleaving_report(experiment("interleave"), exposures, items, events, DEFAULT_POLICY)
    assert again["delta_ci"] == rep["delta_ci"]  # seeded
    one_user = ea.interleaving_report(experiment("interleave"), *interleaved(script[:3]), DEFAULT_POLICY)
    # users u1 (win, tie) and u2 (loss): resamples are {u1,u1}: 0.25, {u1,u2}: 0, {u2,u2}: -0.5
    assert set(np.round(one_user["delta_ci"], 9)) <= {0.25, 0.0, -0.5}
    single = ea.interleaving_report(experiment("interleave"), *interleaved(script[:2]), DEFAULT_POLICY)
    assert single["delta_ci"] == pytest.approx([single["delta"], single["delta"]])  # one user: no spread


def test_analyse_interleaving_decides_by_the_sign_test() -> None:
    shown = [("a", CH), ("b", CP)]
    script = [(f"q{i}", f"u{i % 20}", shown, [event(f"q{i}", "a" if i < 45 else "b", f"u{i % 20}")])
              for i in range(60)] + [(f"n{i}", "u0", shown, []) for i in range(5)]
    rep = ea.analyse_experiment(experiment("interleave"), *interleaved(script), DEFAULT_POLICY)
    json.dumps(rep, allow_nan=False)
    d = rep["decision"]
    assert (rep["wins"], rep["losses"], rep["no_click"]) == (45, 15, 5)
    assert d["winner"] == "challenger" and d["test"].startswith("sign test")
    assert d["p_value"] == pytest.approx(float(stats.binomtest(45, 60).pvalue)) and d["effect"] == pytest.approx(0.25)
    flipped = [(r, u, [("a", CP), ("b", CH)], e) for r, u, _, e in script]
    assert ea.analyse_experiment(experiment("interleave"), *interleaved(flipped),
                                 DEFAULT_POLICY)["decision"]["winner"] == "champion"
    even = [(f"q{i}", f"u{i}", shown, [event(f"q{i}", "a" if i % 2 else "b", f"u{i}")]) for i in range(40)]
    d_even = ea.analyse_experiment(experiment("interleave"), *interleaved(even), DEFAULT_POLICY)["decision"]
    assert d_even["winner"] is None and d_even["p_value"] >= 0.05
    ties = [(f"q{i}", "u1", shown, [event(f"q{i}", "a", "u1"), event(f"q{i}", "b", "u1")]) for i in range(10)]
    d_ties = ea.analyse_experiment(experiment("interleave"), *interleaved(ties), DEFAULT_POLICY)["decision"]
    assert d_ties["winner"] is None and "too little data" in d_ties["reason"]


def test_rating_threshold_of_the_policy_decides_what_a_click_is() -> None:
    policy = EventPolicy(rating_negative_below=3.0)
    shown = [("a", CH), ("b", CP)]
    script = [("q1", "u1", shown, [event("q1", "a", "u1", event_type="rating", value=2.0)]),
              ("q2", "u1", shown, [event("q2", "b", "u1", event_type="rating", value=4.0)])]
    rep = ea.interleaving_report(experiment("interleave"), *interleaved(script), policy)
    assert (rep["wins"], rep["losses"], rep["no_click"]) == (0, 1, 1)


def test_ab_report_without_times_has_one_look_and_checks_its_arguments() -> None:
    exposures, items, events = ab_frames(30, 30, lambda i: int(i % 3 == 0), lambda i: int(i % 2 == 0))
    rep = ea.ab_report(experiment(), exposures.drop(columns="ts"), items, events.drop(columns="received_at"),
                       DEFAULT_POLICY)
    assert rep["sequential"]["n_looks"] == 1 and rep["sequential"]["looks"][0]["until"] is None
    assert rep["sequential"]["looks"][0]["users_champion"] == 30
    for bad in ({"alpha": 1.5}, {"look_every": "0h"}, {"k": 0}, {"prior_lift": 0.0}):
        with pytest.raises(ValueError):
            ea.ab_report(experiment(), exposures, items, events, DEFAULT_POLICY, **bad)
    with pytest.raises(ValueError, match="weights"):
        ea.ab_report(experiment(weights=(0.0, 0.0)), exposures, items, events, DEFAULT_POLICY)

"""The quick mode of both simulation studies (bench/simulation_study.py) on a small synthetic source:
the JSON structure, CTRs in [0, 1], and the reference policies in a robust order."""

from __future__ import annotations

import json

import pytest

from bench.simulation_study import POLICIES, ScoreStub, load_lake, run_studies, user_groups
from models.simulator import GroundTruth, SimConfig, UserSimulator, random_policy, truth_recommender
from models.vocab import ItemVocabulary

SOURCE_OPTIONS = {"n_users": 240, "n_items": 120, "n_events": 6000, "seed": 3}


@pytest.fixture(scope="module")
def report() -> dict:
    return run_studies("synthetic", None, quick=True, source_options=SOURCE_OPTIONS)


def _ctr_ok(value: float | None) -> bool:
    return value is not None and 0.0 <= value <= 1.0


def test_quick_report_is_one_json_document_with_both_studies(report):
    text = json.dumps(report, allow_nan=False)
    assert json.loads(text) == report
    assert report["quick"] is True and {"loop_study", "experiment_study"} <= set(report)


def test_loop_study_structure_and_ctrs(report):
    loop = report["loop_study"]
    protocol = loop["protocol"]
    assert protocol["seeds"] == [0]
    assert protocol["event_policy"]["negative"] == ["skip"]
    assert "validation NDCG@10" in protocol["retrain"]["gate"]
    cal = protocol["simulator"]["calibration"]["0"]
    assert abs(cal["achieved_top_ctr"] - cal["target_top_ctr"]) < 0.01
    run = loop["per_seed"]["0"]
    assert len(run["rounds"]) == 2 and len(run["retrains"]) == 1
    assert run["retrains"][0]["simulated_events"] > 0
    for row in run["rounds"]:
        assert set(row["policies"]) == set(POLICIES)
        for m in row["policies"].values():
            assert _ctr_ok(m["ctr"]) and _ctr_ok(m["skip_rate"]) and 0 < m["catalogue_share"] <= 1
            assert m["sessions"] == 15 and m["slates"] >= m["sessions"]
            assert m["clicks"] == sum(m["clicks_by_position"])
    agg = loop["aggregate"]["rounds"]
    assert agg[-1]["policies"]["loop"]["ctr"]["n"] == 1 and agg[-1]["policies"]["loop"]["ctr"]["ci"] is None
    assert loop["loop_vs_frozen"]["round"] == 1
    second = loop["second_truth"]
    assert second["truth"] == "itemknn" and set(second["last_round"]) == set(POLICIES)
    assert all(_ctr_ok(second["last_round"][p]["ctr"]) for p in POLICIES)
    assert [len(v) for v in second["ctr_by_round"].values()] == [2, 2]


def test_experiment_study_structure(report):
    exp = report["experiment_study"]
    assert exp["protocol"]["alpha"] == 0.05
    (run,) = exp["runs"]
    for mode in ("ab", "interleave"):
        r = run[mode]
        assert r["mode"] == mode and r["sessions_run"] <= 60
        assert r["trajectory"] and all(t["p_value"] is None or 0 <= t["p_value"] <= 1 for t in r["trajectory"])
        assert r["significant"] == (r["sessions_to_significance"] is not None)
    assert run["ab"]["last_report"]["champion"]["users"] + run["ab"]["last_report"]["challenger"]["users"] > 0
    assert run["interleave"]["last_report"]["requests"] > 0
    assert set(exp["summary"]) == {"ab", "interleave", "ratio_ab_over_interleave"}


def test_truth_beats_random_on_the_synthetic_source():
    lake = load_lake("synthetic", None, **SOURCE_OPTIONS)
    truth = GroundTruth.fit(lake.positives, "ease")
    users = user_groups(lake.users, 0, 60, names=("a", "b"))
    ctr = {}
    for name, group in users.items():
        sim = UserSimulator(truth, {u: lake.histories[u] for u in group}, SimConfig(seed=0))
        rec = truth_recommender(sim) if name == "a" else random_policy(truth.item_ids, 0, exclude=sim.consumed)
        res = [sim.run_session(u, rec, lambda *_: None, s) for s in range(3) for u in group]
        ctr[name] = sum(r.clicks for r in res) / sum(r.slots for r in res)
    assert ctr["a"] > ctr["b"] >= 0


def test_score_stubs_serve_like_models():
    vocab = ItemVocabulary([f"i{j}" for j in range(1, 11)])
    pop = ScoreStub("popularity", vocab, 5, counts={"i3": 9, "i7": 4})
    scores = pop.score([[0, 1, 2]]).numpy()
    assert scores.shape == (1, 11) and scores[0, 0] == float("-inf") and scores[0].argmax() == 3
    rnd = ScoreStub("random", vocab, 5, seed=1)
    a, b = rnd.score([[0, 1, 2], [0, 1, 2]]).numpy(), rnd.score([[0, 1, 2]]).numpy()
    assert (a[0] == a[1]).all() and (a[0] == b[0]).all()

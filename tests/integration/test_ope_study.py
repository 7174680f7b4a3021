"""The quick mode of the off-policy coverage study (bench/ope_study.py) on a small synthetic source: one JSON
document with the protocol, every seed's estimates inside their own intervals, CTRs in [0, 1], ESS > 0, and
the price-of-exploring rounds."""

from __future__ import annotations

import json

import pytest

from bench.ope_study import COMPARISONS, PRICE_EPSILONS, TOP_SLOT_ESTIMATORS, main, run_ope_study, seeded_request_ids
from serving import recommender

SOURCE_OPTIONS = {"n_users": 240, "n_items": 120, "n_events": 6000, "seed": 3}


@pytest.fixture(scope="module")
def report() -> dict:
    return run_ope_study("synthetic", None, quick=True, source_options=SOURCE_OPTIONS)


def _rate(value: float | None) -> bool:
    return value is not None and 0.0 <= value <= 1.0


def test_quick_report_is_one_json_document_with_its_protocol(report):
    assert json.loads(json.dumps(report, allow_nan=False)) == report
    assert report["bench"] == "ope_study" and report["quick"] is True
    protocol = report["protocol"]
    assert protocol["seeds"] == [0, 1]
    assert protocol["logging_policy"]["text"] == "epsilon:0.1" and protocol["logging_policy"]["epsilon"] == 0.1
    assert protocol["users"]["per_seed"] == 40 and protocol["users"]["sessions_per_user"] == 1
    models = protocol["models"]
    assert set(models["targets"]) == {"peer", "weak"}
    assert models["champion"]["epochs_run"] == 1
    assert {t["seed"] for t in models["targets"].values()} == {1, 2} and models["champion"]["seed"] == 0
    assert protocol["event_policy"]["negative"] == ["skip"]
    for cal in protocol["simulator"]["calibration"].values():
        assert abs(cal["achieved_top_ctr"] - cal["target_top_ctr"]) < 0.01
    assert "in-process" in protocol["serving"]


def test_every_seed_estimates_inside_their_intervals(report):
    assert [run["seed"] for run in report["per_seed"]] == [0, 1]
    for run in report["per_seed"]:
        assert run["exposure_log"]["dropped"] == 0 and run["exposure_log"]["invalid"] == 0
        assert run["linked_events"] > 0
        assert run["logged"]["first_slates"]["n_requests"] == run["used_users"] == 40
        assert run["logged"]["first_slates"]["n_exploratory"] == 40
        assert set(run["targets"]) == {"peer", "weak", "champion"}
        for row in run["targets"].values():
            first = row["first_slates"]
            assert first["online"]["slates"] == 40
            for name in COMPARISONS:
                block = row[name]
                assert set(block["estimators"]) == set(TOP_SLOT_ESTIMATORS)
                for est in block["estimators"].values():
                    assert est["ess"] > 0
                    assert est["ci_low"] <= est["value"] <= est["ci_high"]
                    assert 0.0 <= est["unsupported_share"] <= 1.0
                    assert set(est["covered"]) == {"realized", "expected"}
                assert _rate(block["online"]["realized"]) and _rate(block["online"]["expected"])
                assert _rate(block["logged_top_slot_ctr"]) and _rate(block["target_agreement"])
            assert row["all_slates"]["online"]["slates"] >= first["online"]["slates"]
            assert _rate(first["definition_agreement"]) and first["explored_hits"] >= 0
        # the control differs from the logger only in the explored slots: it agrees on most top slots
        assert run["targets"]["champion"]["first_slates"]["target_agreement"] >= 0.7
        # most synthetic histories fit the model's window; where the context is the whole history, the
        # estimator's target is the item the served target shows
        assert 0.5 * run["used_users"] <= run["whole_history_users"] <= run["used_users"]
        for row in run["targets"].values():
            assert row["first_slates_whole_history"]["definition_agreement"] == 1.0


def test_coverage_summary_counts_the_seeds(report):
    assert set(report["coverage"]) == {"peer", "weak", "champion"}
    for name, est in ((n, e) for n in COMPARISONS for e in TOP_SLOT_ESTIMATORS):
        for cov in report["coverage"].values():
            per = cov[name][est]
            assert per["seeds"] == 2 and per["mean_width"] > 0
            for kind in ("realized", "expected"):
                assert per[kind]["of"] == 2 and 0 <= per[kind]["covered"] <= 2
                assert per[kind]["goal"] == 0.9 and _rate(per[kind]["mean_online"])
                assert len(per[kind]["missed_seeds"]) == 2 - per[kind]["covered"]


def test_price_of_exploring_rounds(report):
    price = report["price_of_exploring"]
    rounds = price["rounds"]
    assert [r["epsilon"] for r in rounds.values()] == list(PRICE_EPSILONS)
    assert rounds["0"]["policy"] == "greedy" and rounds["0.1"]["policy"] == "epsilon:0.1"
    for r in rounds.values():
        assert r["sessions"] == 40 and r["slots"] >= r["slates"] >= 40
        assert _rate(r["ctr"]) and _rate(r["top_slot_ctr"]) and 0 < r["catalogue_share"] <= 1
        assert r["recommend_ms"]["n"] == r["slates"] and r["recommend_ms"]["p50"] > 0
    # exploration shows more of the catalogue than greedy ranking, on the same users and seed
    assert rounds["0.1"]["catalogue_share"] > rounds["0"]["catalogue_share"]
    # the epsilon:0.1 round replays the first seed's logging run (seeded request ids: the same coins and clicks)
    first = report["per_seed"][0]["targets"]
    assert rounds["0.1"]["first_slate_top_ctr"] == first["peer"]["first_slates"]["logged_top_slot_ctr"]
    # and the greedy round is the champion control's online run of that seed
    assert rounds["0"]["first_slate_top_ctr"] == first["champion"]["first_slates"]["online"]["realized"]


def test_seeded_request_ids_replay_and_restore():
    with seeded_request_ids(7):
        a = [recommender.uuid.uuid4().hex for _ in range(3)]
    with seeded_request_ids(7):
        b = [recommender.uuid.uuid4().hex for _ in range(3)]
    assert a == b and len(set(a)) == 3 and all(len(x) == 32 for x in a)
    assert recommender.uuid.uuid4().hex not in a  # the module's uuid is back


def test_cli_prints_one_json_document(capsys, monkeypatch):
    import bench.ope_study as study

    monkeypatch.setattr(study, "run_ope_study", lambda *a, **kw: {"bench": "ope_study", "args": list(a), **kw})
    assert main(["--quick", "--json", "--seeds", "3", "--users", "0", "--no-price"]) == 0
    out = json.loads(capsys.readouterr().out)  # stdout holds exactly one JSON document
    assert out == {"bench": "ope_study", "args": ["movielens-100k", None], "quick": True, "seeds": [0, 1, 2],
                   "users": None, "price_epsilons": None}

"""bench/rerank_study.py on tiny synthetic data: curves, the validation choice, test once, equal-NDCG comparison."""

from __future__ import annotations

import numpy as np

from bench.rerank_study import at_equal_ndcg, choose_default, quality_study
from recloop.sources import load_source


def test_the_study_runs_on_tiny_data_and_reports_every_section() -> None:
    frames = load_source("synthetic", None, n_users=60, n_items=40, n_events=900, seed=3)
    genres = {str(i): list(g) for i, g in zip(frames.items["item_id"], frames.items["genres"], strict=True)}
    report = quality_study(frames.events, genres, seconds=2.0, epochs=1, grid=(0.0, 0.5, 0.9),
                           model_config={"d_model": 16, "n_heads": 1, "n_layers": 1, "max_seq_len": 8})
    for method in ("mmr", "dpp"):
        curve = report["valid_curves"][method]
        assert [p["diversity"] for p in curve] == [0.0, 0.5, 0.9]
        assert all(0 <= p["ndcg@10"] <= 1 and 0 <= p["ild_genre@10"] <= 1 and 0 <= p["coverage@10"] <= 1
                   for p in curve)
        assert curve[0]["ndcg@10"] == report["valid_curves"]["dpp" if method == "mmr" else "mmr"][0]["ndcg@10"]
        assert report["default_diversity"][method] in (0.0, 0.5, 0.9)
        assert "diversity=0" in report["test_once"][method]
    assert set(report["equal_ndcg_comparison"]["more_diverse"]) == {"ild_genre@10", "ild_emb@10"}


def test_choice_and_interpolation_by_hand() -> None:
    curve = [{"diversity": 0.0, "ndcg@10": 0.10}, {"diversity": 0.5, "ndcg@10": 0.096},
             {"diversity": 0.9, "ndcg@10": 0.08}]
    assert choose_default(curve, 0.05) == 0.5
    a = [{"ndcg@10": 0.1, "ild": 0.2}, {"ndcg@10": 0.0, "ild": 0.6}]
    b = [{"ndcg@10": 0.1, "ild": 0.3}, {"ndcg@10": 0.0, "ild": 0.7}]
    out = at_equal_ndcg(a, b, "ild", n_levels=5)
    assert np.isclose(out["delta"], 0.1) and out["ndcg_range"] == [0.0, 0.1]

"""The evaluation gate (pure), champion vocabulary mapping and the report and run plots (no MLflow needed)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from flows.evaluate import markdown_table
from models.ranking import MappedScorer
from models.sasrec import SASRec, SASRecConfig
from models.vocab import ItemVocabulary
from recloop.gate import decide
from registry import plots

CAND = {"ndcg@10": 0.10, "coverage@10": 0.30}
BASE = {"MostPop": {"ndcg@10": 0.045}, "EASE": {"ndcg@10": 0.072}}


def test_first_candidate_passes_when_it_beats_every_baseline() -> None:
    d = decide(CAND, None, BASE)
    assert d.passed and d.best_baseline == "EASE" and d.required_ndcg == pytest.approx(0.072)
    assert d.champion_ndcg is None and d.as_tags()["gate.decision"] == "pass"


def test_candidate_below_best_baseline_fails_even_without_champion() -> None:
    d = decide({"ndcg@10": 0.07, "coverage@10": 0.5}, None, BASE)
    assert not d.passed and any(r.startswith("FAIL") and "EASE" in r for r in d.reasons)


def test_min_gain_over_champion_is_required() -> None:
    champ = {"ndcg@10": 0.095, "coverage@10": 0.30}
    assert decide(CAND, champ, BASE, min_gain=0.05).passed  # 0.10 >= 0.09975
    d = decide(CAND, champ, BASE, min_gain=0.06)  # needs 0.1007
    assert not d.passed and d.required_ndcg == pytest.approx(0.095 * 1.06)


def test_equal_to_champion_passes_with_zero_gain() -> None:
    assert decide(CAND, dict(CAND), {}, min_gain=0.0).passed


def test_coverage_drop_beyond_allowance_fails() -> None:
    champ = {"ndcg@10": 0.08, "coverage@10": 0.40}
    assert decide(CAND, champ, BASE, max_coverage_drop=0.25).passed  # 0.30 >= 0.30
    d = decide(CAND, champ, BASE, max_coverage_drop=0.2)  # needs 0.32
    assert not d.passed and d.required_coverage == pytest.approx(0.32)
    tags = d.as_tags()
    assert tags["gate.decision"] == "fail" and tags["gate.baseline.EASE.ndcg_at_10"] == "0.072000"
    assert all("@" not in k for k in tags)


def test_nan_candidate_never_passes() -> None:
    assert not decide({"ndcg@10": float("nan"), "coverage@10": 0.3}, None, {}).passed


def test_missing_metric_and_bad_thresholds_are_named() -> None:
    with pytest.raises(KeyError, match="coverage@10"):
        decide({"ndcg@10": 0.1}, None, {})
    with pytest.raises(ValueError, match="max_coverage_drop=1.5"):
        decide(CAND, None, {}, max_coverage_drop=1.5)


def test_champion_with_smaller_vocab_is_scored_by_item_id() -> None:
    torch.manual_seed(0)
    old = ItemVocabulary(["a", "b", "c", "d"])
    new = old.extend(["e", "f"])  # champion does not know e, f
    reordered = ItemVocabulary(["f", "d", "c", "b", "a", "e"])
    model = SASRec(SASRecConfig(n_items=4, max_seq_len=5, d_model=8, dropout=0.0)).eval()
    hist_old = torch.tensor([[0, 0, 1, 2, 3]])  # a b c
    direct = model.score(hist_old)[0]
    for vocab in (new, reordered):
        hist = torch.from_numpy(np.r_[0, vocab.encode(["a", "e", "b", "c"])].reshape(1, -1))  # e is dropped
        mapped = MappedScorer(model, old, vocab).score(hist)[0]
        assert mapped.shape == (len(vocab) + 1,)
        for item in "abcd":
            assert mapped[vocab.encode([item])[0]] == pytest.approx(float(direct[old.encode([item])[0]]))
        assert torch.isinf(mapped[vocab.encode(["e", "f"])]).all() and torch.isinf(mapped[0])


def test_plots_and_report_render(tmp_path: Path) -> None:
    history = [{"epoch": e, "loss": 7 - e, "val_ndcg@10": 0.01 * e, "val_hr@10": 0.02 * e} for e in (1, 2, 3)]
    results = {"candidate": {"ndcg@10": 0.1, "hr@10": 0.2, "coverage@10": 0.3}, "MostPop": {"ndcg@10": 0.04}}
    counts = np.r_[0, np.arange(50, 0, -1)]
    recs = np.tile(np.arange(1, 11), (5, 1))
    for path in (plots.learning_curve(history, tmp_path / "lc.png", best_epoch=3),
                 plots.model_comparison(results, tmp_path / "cmp.png"),
                 plots.popularity_distribution(counts, recs, tmp_path / "pop.png")):
        assert path.read_bytes()[:4] == b"\x89PNG"
    md = markdown_table(results, decide(results["candidate"], None, {"MostPop": results["MostPop"]}))
    assert "| candidate | 0.1000 | 0.2000 | 0.3000 |" in md and "**Gate: PASS**" in md
    with pytest.raises(ValueError, match="history is empty"):
        plots.learning_curve([], tmp_path / "x.png")


def test_freshness_is_counted_back_from_the_datas_newest_event() -> None:
    import pandas as pd

    from flows.evaluate import fresh_by_idx

    t = pd.Timestamp("2020-03-01", tz="UTC")
    events = pd.DataFrame({"item_id": ["a", "b", "c", "a"], "timestamp": [t - pd.Timedelta(days=100),
                                                                         t - pd.Timedelta(days=5), t,
                                                                         t - pd.Timedelta(days=1)]})
    items = pd.DataFrame({"item_id": ["a", "b", "c"], "created_at": [pd.NaT, t - pd.Timedelta(days=40), pd.NaT]})
    vocab = ItemVocabulary(["a", "b", "c"])
    assert fresh_by_idx(events, None, vocab, 30).tolist() == [False, False, True, True]
    assert fresh_by_idx(events, items, vocab, 30).tolist() == [False, False, False, True]  # b: created 40 d back
    assert "freshness@10" in markdown_table({"candidate": {"ndcg@10": 0.1, "freshness@10": 0.2}})

"""The re-rank, business-rule and explain stages of RecommenderCore.recommend (serving/recommender.py)."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from fakes import MemoryLog, MemoryOnline, Sink, tiny_served

from models.exploration import ExplorationPolicy
from serving.recommender import RecommenderCore, UnknownGenreError, build_served

HISTORY = ["i1", "i2", "i3", "i4"]
FAR = datetime(2100, 1, 1, tzinfo=UTC)


class Blocked:
    """The blocklist as serving reads it (``recloop.blocklist.CachedBlocklist.item_ids``)."""

    def __init__(self, ids: set[str]) -> None:
        self.ids = frozenset(ids)

    def item_ids(self) -> frozenset[str]:
        return self.ids


def _core(served: Any = None, **kw: Any) -> RecommenderCore:
    return RecommenderCore(served or tiny_served(), MemoryOnline({"u": HISTORY}), MemoryLog(), max_seq_len=8, **kw)


def _ids(out: dict) -> list[str]:
    return [x["item_id"] for x in out["items"]]


def test_defaults_keep_todays_answer_and_only_gain_fields() -> None:
    out = _core().recommend("u", k=10)
    assert out["reranker"] is None
    assert all("because" not in x and "reason" not in x for x in out["items"])
    assert _ids(_core().recommend("u", k=10, diversity=0.0)) == _ids(out)


@pytest.mark.parametrize("reranker", ["mmr", "dpp"])
def test_rerankers_respect_every_mask_and_never_repeat(reranker: str) -> None:
    sink = Sink()
    core = _core(suppressed={"u": {"i9": FAR}}, blocklist=Blocked({"i10", "i11"}), exposures=sink)
    plain = _ids(core.recommend("u", k=45))
    masked = set(HISTORY) | {"i9", "i10", "i11", "i12"}
    assert not masked - {"i12"} & set(plain)
    for diversity in (0.3, 1.0):
        out = core.recommend("u", k=10, diversity=diversity, reranker=reranker, exclude_items=["i12"])
        ids = _ids(out)
        assert len(ids) == len(set(ids)) == 10 and not masked & set(ids)
        assert out["reranker"].startswith(reranker)
        assert {"i10", "i11", "i12"} <= set(sink.rows[-1]["masked"])  # business rules are logged as masked
    all_left = _ids(core.recommend("u", k=200, diversity=0.5, reranker=reranker, exclude_items=["i12"]))
    assert sorted(all_left) == sorted({f"i{j}" for j in range(1, 51)} - masked)


def test_diversity_changes_the_order_and_reports_the_model_scores() -> None:
    core = _core()
    base = core.recommend("u", k=10)
    scores = {x["item_id"]: x["score"] for x in core.recommend("u", k=46)["items"]}
    for reranker in ("mmr", "dpp"):
        out = core.recommend("u", k=10, diversity=0.9, reranker=reranker)
        assert _ids(out) != _ids(base)
        assert all(x["score"] == pytest.approx(scores[x["item_id"]]) for x in out["items"])


def test_exploration_still_draws_after_reranking() -> None:
    sink = Sink()
    core = _core(exposures=sink, exploration=ExplorationPolicy.parse("epsilon:0.5"))
    greedy = _ids(_core().recommend("u", k=5, diversity=0.8, reranker="dpp"))
    differs = 0
    for _ in range(30):
        ids = _ids(core.recommend("u", k=5, diversity=0.8, reranker="dpp"))
        assert len(set(ids)) == 5 and not set(ids) & set(HISTORY)
        assert len(sink.rows[-1]["propensities"]) == 5
        differs += ids != greedy
    assert differs > 0
    assert sink.rows[-1]["policy"].startswith("epsilon")


def test_genre_filter_keeps_only_items_with_one_of_the_genres() -> None:
    genres = {f"i{j}": ["Comedy"] if j % 3 == 0 else ["Drama"] for j in range(1, 51)}
    plain = tiny_served()
    served = build_served(plain.model, plain.vocab, "1", genres=genres)
    core = _core(served)
    ids = _ids(core.recommend("u", k=10, genres=["comedy"], diversity=0.5))
    assert ids and all(int(i[1:]) % 3 == 0 for i in ids)
    with pytest.raises(UnknownGenreError, match="Horror"):
        core.recommend("u", k=10, genres=["Horror"])


def test_explanations_name_the_planted_nearest_history_item_first() -> None:
    served = tiny_served(titles={"i2": "Heat (1995)"})
    core = _core(served, event_types={"u": {"i2": "purchase", "i3": "rating"}})
    first = core.recommend("u", k=5)["items"][0]["item_id"]
    emb = served.unit_emb.clone()  # (n_items + 1, d_model)
    target = served.vocab.encode([first])[0]
    emb[served.vocab.encode(["i2"])[0]] = emb[target]  # plant i2 exactly on the recommended item
    core.swap(dataclasses.replace(served, unit_emb=emb))
    out = core.recommend("u", k=5, explain=True)
    item = out["items"][0]
    assert item["item_id"] == first
    assert item["because"][0] == {"item_id": "i2", "title": "Heat (1995)", "weight": pytest.approx(1.0)}
    assert item["reason"] == "Because you bought Heat (1995)"
    for x in out["items"]:
        assert 1 <= len(x["because"]) <= 3 and {b["item_id"] for b in x["because"]} <= set(HISTORY)
        weights = [b["weight"] for b in x["because"]]
        assert weights == sorted(weights, reverse=True)


def test_an_unknown_user_gets_no_because_and_scores_in_0_1() -> None:
    pop = {f"i{j}": float(100 * j) for j in range(1, 51)}
    core = RecommenderCore(tiny_served(popularity=pop), MemoryOnline(), MemoryLog(), max_seq_len=8)
    out = core.recommend("nobody", k=5, explain=True)
    assert out["strategy"] == "popularity" and out["cold_start"] is True
    assert all("because" not in x for x in out["items"])
    scores = [x["score"] for x in out["items"]]
    assert scores[0] == 1.0 and all(0.0 <= s <= 1.0 for s in scores)
    assert scores == pytest.approx([1.0, 0.98, 0.96, 0.94, 0.92])  # count / max count


def test_negative_feedback_in_the_log_is_masked_by_the_reranked_answer(tmp_path: Path) -> None:
    from recloop.eventlog import EventLog

    log = EventLog(f"sqlite:///{tmp_path / 'log.db'}")
    try:
        core = RecommenderCore(tiny_served(), MemoryOnline({"u": HISTORY}), log, max_seq_len=8)
        top = _ids(core.recommend("u", k=5, diversity=0.5, reranker="dpp"))[0]
        core.feedback("u", top, "skip")
        core.feedback("u", "i5", "rating", value=4.0)
        for reranker in ("mmr", "dpp"):
            out = core.recommend("u", k=10, diversity=0.5, reranker=reranker, explain=True)
            assert top not in _ids(out) and "i5" not in _ids(out)
        assert log.event_types("u", ["i5", top, "nope"]) == {"i5": "rating"}
        # the feedback rewrote the online history to the log's positives: i5, rated
        assert {x["reason"] for x in out["items"]} == {"Because you rated i5"}
    finally:
        log.close()


def test_bad_options_name_the_value() -> None:
    core = _core()
    with pytest.raises(ValueError, match="diversity=2"):
        core.recommend("u", diversity=2.0)
    with pytest.raises(ValueError, match="reranker='x'"):
        core.recommend("u", diversity=0.5, reranker="x")
    assert torch.is_tensor(core.served.unit_emb) and np.isfinite(core.served.popularity[1:]).all()


def test_the_demo_prints_the_explanation_beside_each_recommendation() -> None:
    from cli import platform

    core = _core(tiny_served(titles={"i2": "Heat"}), event_types={"u": {"i2": "click"}})
    body = core.recommend("u", k=3, explain=True)
    body.update(variant="champion")
    with platform.console.capture() as cap:
        platform.show_recommendations("demo", body)
    text = cap.get()
    assert "because" in text and "Because you" in text
    assert platform.because_text({"item_id": "x", "because": None}) == ""


def test_explain_reads_the_verb_with_the_mask_in_one_log_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                                              ) -> None:
    from recloop.eventlog import EventLog

    log = EventLog(f"sqlite:///{tmp_path / 'log.db'}")
    try:
        core = RecommenderCore(tiny_served(), MemoryOnline({"u": HISTORY}), log, max_seq_len=8,
                               event_types={"u": {"i5": "click"}})
        core.feedback("u", "i5", "purchase")  # newer than the snapshot's click: the log's verb wins
        core.feedback("u", "i5", "skip")  # a negative is never the verb
        consumed, suppressed = log.user_state("u")
        typed, suppressed_typed = log.user_state_typed("u")
        assert typed == {"i5": "purchase"} and set(typed) == consumed and suppressed_typed == suppressed
        reads: list[str] = []
        monkeypatch.setattr(EventLog, "event_types", lambda *a, **kw: reads.append("event_types") or {})
        real = EventLog.user_state_typed
        monkeypatch.setattr(EventLog, "user_state_typed",
                            lambda self, *a, **kw: reads.append("state") or real(self, *a, **kw))
        out = core.recommend("u", k=5, explain=True, exclude_seen=False)
        assert reads == ["state"]  # the mask's one read; explain adds none
        assert {x["reason"] for x in out["items"]} == {"Because you bought i5"}
    finally:
        log.close()


def test_bench_rerank_switch_times_the_same_call_with_and_without_options() -> None:
    from bench.exposure_cost import Bench, alternate
    from bench.rerank_study import OVERHEAD_CONFIGS, _WithOptions

    core = _core()
    calls: list[dict[str, Any]] = []
    real = core.recommend
    core.recommend = lambda u, k, **kw: calls.append(kw) or real(u, k, **kw)  # type: ignore[method-assign]
    switch = _WithOptions(core)
    bench = Bench(switch, ["u", "u"], None, None, "", {})
    lat, per_rep = alternate(bench, {"off": lambda: setattr(switch, "options", {}),
                                     "on": lambda: setattr(switch, "options", OVERHEAD_CONFIGS["dpp"])}, reps=2, k=5)
    assert len(lat["off"]) == len(lat["on"]) == 4 and len(per_rep) == 2
    assert [c.get("reranker") for c in calls] == [None, None, "dpp", "dpp", "dpp", "dpp", None, None]  # flipped

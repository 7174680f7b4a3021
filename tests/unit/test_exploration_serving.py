"""Serving explores inside the slate and logs every slot's marginal propensity, the pool and the policy."""

from __future__ import annotations

import numpy as np
import pytest
from fakes import MemoryLog, MemoryOnline, Sink, tiny_served

from models.exploration import ExplorationPolicy, marginal_propensities
from models.ranking import encode_history, mask_scores, seen_mask
from serving.recommender import ExperimentArms, RecommenderCore, policy_text, score_history

HISTORY = ["i1", "i2", "i3", "i4"]


def _core(policy: ExplorationPolicy | None, sink: Sink) -> RecommenderCore:
    return RecommenderCore(tiny_served(), MemoryOnline({"u": HISTORY}), MemoryLog(), max_seq_len=8,
                           exposures=sink, exploration=policy)


def test_greedy_logs_propensity_one_and_the_pool() -> None:
    sink = Sink()
    out = _core(None, sink).recommend("u", k=5)
    row = sink.rows[-1]
    assert row["policy"] == "greedy" and row["propensities"] == [1.0] * 5
    assert row["pool_size"] == 50 - len(HISTORY)  # 50 items, the 4 seen are masked
    assert row["items"] == [x["item_id"] for x in out["items"]]


@pytest.mark.parametrize("text", ["epsilon:0.3", "epsilon:0.3,n=12", "plackett_luce:tau=0.5,n=20"])
def test_explored_slates_log_the_marginal_of_each_shown_item(text: str) -> None:
    policy = ExplorationPolicy.parse(text)
    sink = Sink()
    core = _core(policy, sink)
    served = core.served
    scores = score_history(served.model, served.seq_len, encode_history(served.vocab, HISTORY))
    masked = mask_scores(scores[None, :], seen_mask([encode_history(served.vocab, HISTORY)], len(served.vocab)))[0]
    marginals = marginal_propensities(masked, 5, policy)
    greedy = [x["item_id"] for x in _core(None, Sink()).recommend("u", k=5)["items"]]
    differs = 0
    for _ in range(200):
        out = core.recommend("u", k=5)
        ids = [x["item_id"] for x in out["items"]]
        row = sink.rows[-1]
        assert len(set(ids)) == 5 and not set(ids) & set(HISTORY)  # the pool is formed after masking
        assert row["policy"] == policy_text(policy) and ExplorationPolicy.parse(row["policy"]) == policy
        idx = served.vocab.encode(ids)
        assert np.allclose(row["propensities"], marginals[idx, np.arange(5)])
        assert row["pool_size"] == 50 - len(HISTORY)
        differs += ids != greedy
    assert differs > 20  # it explores


def test_an_experiment_arm_can_explore_while_the_other_is_greedy() -> None:
    sink = Sink()
    core = _core(None, sink)
    core.experiment_arms = ExperimentArms("e", "ab", (50.0, 50.0), "s", core.served, tiny_served(seed=1, version="2"),
                                          (None, ExplorationPolicy.parse("epsilon:0.5")))
    policies = {}
    for j in range(60):
        core.online.rows[f"v{j}"] = HISTORY
        res = core.recommend(f"v{j}", k=4)
        policies.setdefault(res["arm"], set()).add(sink.rows[-1]["policy"])
    assert policies["champion"] == {"greedy"} and policies["challenger"] == {"epsilon:0.5"}

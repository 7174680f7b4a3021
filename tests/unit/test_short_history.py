"""models/short_history.py: the neighbours-plus-popularity blend and the validation choice, by hand."""

from __future__ import annotations

import numpy as np
import pytest

from models.sequences import EvalSet
from models.short_history import blend_scores, choose_short_history, neighbour_table, short_history_users

# Items 1 and 2 always co-occur; 3 is the most popular and never with 1 or 2; 4 is rare.
TRAIN = [np.array([1, 2, 3]), np.array([1, 2]), np.array([3, 4]), np.array([3])]


def test_neighbour_table_and_blend_by_hand() -> None:
    nb, sims, pop = neighbour_table(TRAIN, 4, k_neighbours=2)
    assert nb.shape == sims.shape == (5, 2)
    assert pop.tolist() == pytest.approx([0.0, 2 / 3, 2 / 3, 1.0, 1 / 3])
    # cos(1, 2) = 2 / sqrt(2 · 2) = 1: item 2 is item 1's nearest neighbour
    assert nb[1][np.argmax(sims[1])] == 2 and sims[1].max() == pytest.approx(1.0)
    hist = np.array([[0, 1]])  # (batch, seq_len) left-padded
    only_nb = blend_scores(hist, nb, sims, pop, 1.0)[0]
    assert np.argmax(only_nb) == 2 and only_nb[0] == -np.inf and only_nb[2] == pytest.approx(1.0)
    only_pop = blend_scores(hist, nb, sims, pop, 0.0)[0]
    assert np.argmax(only_pop) == 3
    half = blend_scores(hist, nb, sims, pop, 0.5)[0]  # 0.5 · 1 + 0.5 · 2/3 beats 0.5 · nb_3 + 0.5 · 1
    assert half[2] == pytest.approx(0.5 + 0.5 * 2 / 3)
    with pytest.raises(ValueError, match="weight=2"):
        blend_scores(hist, nb, sims, pop, 2.0)


class Popular:
    """A 'model' that always ranks by a fixed order (item 4 first: wrong for every short history here)."""

    def score(self, item_idx):  # noqa: ANN001, ANN201 - the Scorer contract
        import torch

        out = torch.tensor([[-np.inf, 1.0, 2.0, 3.0, 4.0]]).repeat(item_idx.shape[0], 1)
        return out


def test_the_blend_wins_where_neighbours_predict_the_next_item() -> None:
    train = [np.array([1, 2, 3])] * 30 + [np.array([3, 4])] * 5
    valid = EvalSet(np.asarray([f"u{i}" for i in range(60)], dtype=object), [np.array([1])] * 60,
                    np.full(60, 2, dtype=np.int64))
    out = choose_short_history(Popular(), valid, train, 4)
    assert out["strategy"] == "short_history_blend" and out["weight"] > 0
    assert out["ndcg@10"]["blend"][out["weight"]] > out["ndcg@10"]["model"]
    assert out["population"].startswith("validation users with <= 2 events (60)")


def test_long_histories_stand_in_with_their_first_events() -> None:
    valid = EvalSet(np.asarray(["a", "b"], dtype=object), [np.array([5, 6, 7]), np.array([8, 9])],
                    np.array([1, 2]))
    short, population = short_history_users(valid)
    assert [h.tolist() for h in short.histories] == [[5], [8, 9]] and short.targets.tolist() == [6, 2]
    assert population.startswith("first 1-2 events")


def test_serving_answers_one_or_two_items_with_the_blend_when_the_version_chose_it() -> None:
    from fakes import MemoryLog, MemoryOnline, tiny_served

    from serving.recommender import RecommenderCore, attach_short_history, short_history_weight
    from serving.schemas import RecommendResponse

    assert short_history_weight({}) is None and short_history_weight({"short_history.strategy": "model"}) is None
    tags = {"short_history.strategy": "short_history_blend", "short_history.weight": "0.75"}
    assert short_history_weight(tags) == 0.75
    assert short_history_weight({**tags, "short_history.weight": "x"}) is None
    plain = tiny_served()
    windows = [["i1", "i7", "i8"]] * 5 + [["i2", "i3"]]
    served = attach_short_history(plain, windows, 1.0)  # neighbours only
    assert attach_short_history(plain, windows, None) is plain
    online = MemoryOnline({"one": ["i1"], "two": ["i2", "i1"], "long": ["i1", "i2", "i3", "i4"]})
    core = RecommenderCore(served, online, MemoryLog(), max_seq_len=8)
    one = core.recommend("one", k=3)
    assert one["strategy"] == "short_history_blend" and [x["item_id"] for x in one["items"]][:2] in (
        ["i7", "i8"], ["i8", "i7"])
    RecommendResponse(**one)  # the new strategy value is in the schema's Literal
    assert core.recommend("two", k=3)["strategy"] == "short_history_blend"
    assert core.recommend("long", k=3)["strategy"] == "sequential"
    assert RecommenderCore(plain, online, MemoryLog(), max_seq_len=8).recommend("one", k=3)["strategy"] == "sequential"

"""Baselines share the scoring contract and score what their definitions say."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from models.baselines import EASE, ItemKNN, Markov1, MostPop

TRAIN = {"a": np.array([1, 2, 3]), "b": np.array([1, 2, 4]), "c": np.array([2, 3]), "d": np.array([5, 1])}
N_ITEMS = 6
HIST = torch.tensor([[0, 1, 2], [0, 0, 5], [0, 0, 0]])


@pytest.mark.parametrize("make", [MostPop, ItemKNN, EASE, Markov1])
def test_contract_shapes_and_padding(make) -> None:
    model = make().fit(TRAIN, N_ITEMS)
    scores = model.score(HIST)
    assert scores.shape == (3, N_ITEMS + 1) and scores.dtype == torch.float32
    assert torch.isneginf(scores[:, 0]).all()
    assert torch.isfinite(scores[:, 1:]).all()  # empty history still scores
    assert model.score(HIST, torch.tensor([3, 4])).shape == (3, 2)


def test_mostpop_counts() -> None:
    scores = MostPop().fit(TRAIN, N_ITEMS).score(HIST)
    assert scores[0, 1:].tolist() == [3, 3, 2, 1, 1, 0]


def test_markov1_follows_last_item_transitions() -> None:
    scores = Markov1().fit(TRAIN, N_ITEMS).score(HIST)
    assert int(scores[0].argmax()) == 3  # after 2: 3 twice, 4 once
    assert int(scores[1].argmax()) == 1  # after 5: 1


def test_itemknn_cosine_by_hand() -> None:
    knn = ItemKNN(k_neighbours=0).fit(TRAIN, N_ITEMS)
    # items 1 and 2 co-occur for users a, b; |1| = 3 users (a, b, d), |2| = 3 users (a, b, c)
    assert knn.sim[1, 2] == pytest.approx(2 / 3)
    assert knn.sim[1, 1] == 0.0


def test_ease_diagonal_zero_and_unfitted_error() -> None:
    ease = EASE(l2=1.0).fit(TRAIN, N_ITEMS)
    assert np.allclose(np.diag(ease.weights), 0.0)
    with pytest.raises(ValueError, match="not fitted"):
        EASE().score(HIST)


def test_fit_rejects_too_small_catalogue() -> None:
    with pytest.raises(ValueError, match="n_items=3"):
        MostPop().fit(TRAIN, 3)

"""The one ranking path: tie order, masking, padding, empty histories, whole-history "seen"."""

from __future__ import annotations

import numpy as np
import torch

from models.ranking import MappedScorer, mask_scores, recommend, score_histories, top_k, top_k_items
from models.vocab import ItemVocabulary


class LastItemScorer:
    """Scores item j by -(j - last item - 1)^2: the item after the last one wins; records what it saw."""

    def __init__(self, n_items: int, max_seq_len: int | None = None) -> None:
        self.n_items, self.seen_shapes = n_items, []
        if max_seq_len is not None:
            self.config = type("Cfg", (), {"max_seq_len": max_seq_len})()

    def score(self, item_idx: torch.Tensor, candidate_idx: torch.Tensor | None = None) -> torch.Tensor:
        self.seen_shapes.append(tuple(item_idx.shape))
        last = item_idx[:, -1:].float()  # (batch, 1)
        cols = torch.arange(self.n_items + 1).float()[None, :]  # (1, n_items + 1)
        out = -((cols - last - 1) ** 2)
        out[:, 0] = -torch.inf
        return out


def test_top_k_breaks_ties_by_lower_index_even_at_the_cut() -> None:
    # items 1..6; items 2, 3, 5 tie for 2nd place, only two of them fit: the lower indices win.
    scores = mask_scores(np.array([[0.0, 0.1, 0.5, 0.5, 0.9, 0.5, 0.2]]))
    for _ in range(20):  # argpartition's choice among tied items must not leak into the result
        assert top_k(scores, 3).tolist() == [[4, 2, 3]]
    constant = mask_scores(np.zeros((2, 8)))
    assert top_k(constant, 3).tolist() == [[1, 2, 3], [1, 2, 3]]


def test_top_k_items_never_returns_masked_or_padding() -> None:
    row = mask_scores(np.array([[5.0, 1.0, 2.0, 3.0]]), exclude=np.array([3]))[0]
    assert top_k_items(row, 10).tolist() == [2, 1]
    assert top_k_items(np.full(4, -np.inf), 3).tolist() == []


def test_score_histories_cuts_to_the_window_and_scores_empty_histories() -> None:
    scorer = LastItemScorer(n_items=9, max_seq_len=3)
    scores = score_histories(scorer, [np.array([1, 2, 3, 4, 5]), np.array([], dtype=np.int64)])
    assert scores.shape == (2, 10)
    assert scorer.seen_shapes == [(2, 3)]  # the longest history cut to max_seq_len, the empty one padded
    assert int(np.argmax(scores[0])) == 6


def test_recommend_masks_the_whole_history_not_only_the_model_window() -> None:
    vocab = ItemVocabulary([f"i{j}" for j in range(1, 10)])
    scorer = LastItemScorer(n_items=9, max_seq_len=2)
    # The model reads only [i5, i6]; i7 is its favourite but was consumed long before the window.
    (recs,) = recommend(scorer, vocab, [["i7", "i1", "i2", "i5", "i6"]], k=3)
    ids = [i for i, _ in recs]
    assert "i7" not in ids and not {"i1", "i2", "i5", "i6"} & set(ids)
    assert ids[0] == "i8"  # next best after the masked i7 (distance 1 on the other side)
    (unmasked,) = recommend(scorer, vocab, [["i7", "i1", "i2", "i5", "i6"]], k=1, exclude_seen=False)
    assert unmasked[0][0] == "i7"


def test_mapped_scorer_scores_in_the_other_vocabulary() -> None:
    model_vocab = ItemVocabulary(["a", "b", "c"])
    vocab = ItemVocabulary(["c", "new", "a", "b"])
    scorer = MappedScorer(LastItemScorer(n_items=3), model_vocab, vocab)
    out = scorer.score(torch.tensor([[0, 3, 2]]))  # history [a, new]: 'new' is unknown to the model
    assert out.shape == (1, 5)
    assert out[0, 2] == -torch.inf  # 'new' cannot be scored by the old model
    assert int(torch.argmax(out[0])) == 4  # model sees [a] -> favours b, which is index 4 here


def test_nan_scores_never_rank_first_nor_win_a_metric() -> None:
    from models.ranking import target_ranks

    scores = mask_scores(np.array([[0.0, np.nan, 0.5, 0.2]]))
    assert top_k(scores, 1).tolist() == [[2]]
    assert target_ranks(scores, np.array([1])).tolist() == [4]  # the NaN target ranks last (a miss), not 0

"""SASRec shapes, masking, causality and losses on a tiny config (d_model=16, seq_len=8, n_items=50)."""

from __future__ import annotations

import pytest
import torch

from models.losses import full_softmax_ce, sampled_softmax_ce
from models.sasrec import SASRec, SASRecConfig

CFG = SASRecConfig(n_items=50, max_seq_len=8, d_model=16, n_heads=2, n_layers=2, dropout=0.2)


@pytest.fixture()
def model() -> SASRec:
    torch.manual_seed(0)
    return SASRec(CFG).eval()


def _batch() -> torch.Tensor:
    return torch.tensor([[0, 0, 0, 3, 7, 9, 1, 4], [5, 6, 7, 8, 9, 10, 11, 12], [0] * 7 + [50]])


def test_forward_and_score_shapes(model: SASRec) -> None:
    hidden = model(_batch())
    assert hidden.shape == (3, 8, 16)
    assert model.score(_batch()).shape == (3, 51)
    assert model.score(_batch(), torch.tensor([1, 2, 3])).shape == (3, 3)
    assert model.score(_batch(), torch.tensor([[1, 2], [3, 4], [5, 6]])).shape == (3, 2)
    assert model.score(_batch()[:, -3:]).shape == (3, 51)  # shorter histories are fine


def test_padded_positions_are_zero(model: SASRec) -> None:
    hidden = model(_batch())
    assert torch.all(hidden[0, :3] == 0)
    assert torch.all(hidden[0, 3:].abs().sum(-1) > 0)


def test_all_padding_history_gives_finite_scores(model: SASRec) -> None:
    scores = model.score(torch.zeros(2, 8, dtype=torch.long))
    assert torch.isfinite(scores[:, 1:]).all()


def test_scores_never_include_padding_item(model: SASRec) -> None:
    scores = model.score(_batch())
    assert torch.isneginf(scores[:, 0]).all()
    assert (scores.argmax(dim=1) != 0).all()


def test_too_long_input_is_rejected_by_forward(model: SASRec) -> None:
    with pytest.raises(ValueError, match="exceeds max_seq_len=8"):
        model(torch.ones(1, 9, dtype=torch.long))
    assert model.score(torch.ones(1, 12, dtype=torch.long)).shape == (1, 51)  # score keeps the last 8


def test_causality_later_item_does_not_change_earlier_outputs(model: SASRec) -> None:
    x = _batch()
    changed = x.clone()
    changed[:, 6] = 42  # change position 6
    a, b = model(x), model(changed)
    torch.testing.assert_close(a[:, :6], b[:, :6])
    assert not torch.allclose(a[:, 6:], b[:, 6:])


def test_padding_content_does_not_leak(model: SASRec) -> None:
    # The same history with more left padding gives the same last hidden state.
    short = torch.tensor([[0, 0, 0, 0, 0, 3, 7, 9]])
    assert torch.allclose(model(short)[:, -1], model(short[:, -4:])[:, -1], atol=1e-5)


def test_losses_are_scalars_with_gradients() -> None:
    torch.manual_seed(0)
    model = SASRec(CFG).train()
    x = _batch()
    targets = torch.roll(x, -1, dims=1)
    targets[:, -1] = 1
    targets[x == 0] = 0
    for loss in (
        full_softmax_ce(model(x), targets, model.item_emb.weight),
        sampled_softmax_ce(model(x), targets, model.item_emb.weight, n_negatives=10),
    ):
        assert loss.shape == ()
        assert torch.isfinite(loss)
        model.zero_grad()
        loss.backward()
        assert model.item_emb.weight.grad is not None
        assert model.item_emb.weight.grad.abs().sum() > 0


def test_full_softmax_matches_cross_entropy_by_hand() -> None:
    hidden = torch.randn(1, 2, 4)
    weight = torch.randn(6, 4)
    targets = torch.tensor([[0, 3]])
    logits = hidden[0, 1] @ weight[1:].T  # padding column excluded
    expected = -torch.log_softmax(logits, -1)[2]
    torch.testing.assert_close(full_softmax_ce(hidden, targets, weight), expected)


def test_config_validation_names_the_value() -> None:
    with pytest.raises(ValueError, match="d_model=10 is not divisible by n_heads=3"):
        SASRecConfig(n_items=5, max_seq_len=8, d_model=10, n_heads=3)

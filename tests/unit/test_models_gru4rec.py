"""GRU4Rec shapes, padding, causality, loss, config checks, registry and learning a toy pattern (tiny, CPU)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from models.contract import Batch
from models.factory import MODELS, build_config, build_model
from models.gru4rec import GRU4REC_TRAIN, GRU4Rec, GRU4RecConfig
from models.sequences import leave_one_out
from models.trainer import TrainConfig, train_model
from models.vocab import ItemVocabulary

N_ITEMS = 50
CFG = GRU4RecConfig(n_items=N_ITEMS, max_seq_len=8, d_model=16, n_layers=2, dropout=0.2)


@pytest.fixture()
def model() -> GRU4Rec:
    torch.manual_seed(0)
    return GRU4Rec(CFG).eval()


def _assert_close(a: torch.Tensor, b: torch.Tensor, atol: float = 1e-6) -> None:
    """torch.allclose with the largest difference in the message (torch.testing's first call costs ~1.5 s)."""
    assert a.shape == b.shape, f"shapes {tuple(a.shape)} != {tuple(b.shape)}"
    assert torch.allclose(a, b, atol=atol, rtol=1e-5), f"max |a - b| = {(a - b).abs().max().item():.3g}"


def _batch() -> torch.Tensor:
    return torch.tensor([[0, 0, 0, 3, 7, 9, 1, 4], [5, 6, 7, 8, 9, 10, 11, 12], [0] * 7 + [50]])


def test_encode_and_score_shapes(model: GRU4Rec) -> None:
    assert model.encode(_batch()).shape == (3, 8, 16)
    assert model(_batch()).shape == (3, 8, 16)
    assert model.score(_batch()).shape == (3, N_ITEMS + 1)
    assert model.score(_batch(), torch.tensor([1, 2, 3])).shape == (3, 3)
    assert model.score(_batch(), torch.tensor([[1, 2], [3, 4], [5, 6]])).shape == (3, 2)
    assert model.score(_batch()[:, -3:]).shape == (3, N_ITEMS + 1)  # shorter histories are fine
    assert model.score(torch.ones(1, 12, dtype=torch.long)).shape == (1, N_ITEMS + 1)  # keeps the last 8


def test_padded_positions_are_zero(model: GRU4Rec) -> None:
    hidden = model(_batch())
    assert torch.all(hidden[0, :3] == 0) and torch.all(hidden[2, :7] == 0)
    assert torch.all(hidden[0, 3:].abs().sum(-1) > 0)


def test_loss_is_a_scalar_with_gradients() -> None:
    torch.manual_seed(0)
    model = GRU4Rec(CFG).train()
    x = _batch()
    targets = torch.roll(x, -1, dims=1)
    targets[:, -1] = 1
    targets[x == 0] = 0
    loss = model.loss(Batch(x, targets))
    assert loss.shape == () and torch.isfinite(loss)
    loss.backward()
    assert model.item_emb.weight.grad is not None and model.item_emb.weight.grad.abs().sum() > 0
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.gru.parameters())
    sampled = model.loss(Batch(x, targets, n_negatives=10, generator=torch.Generator().manual_seed(0)))
    assert sampled.shape == () and torch.isfinite(sampled)


def test_all_padding_history_gives_finite_scores(model: GRU4Rec) -> None:
    scores = model.score(torch.zeros(2, 8, dtype=torch.long))
    assert torch.isfinite(scores[:, 1:]).all()


def test_padding_column_is_never_recommended(model: GRU4Rec) -> None:
    scores = model.score(_batch())
    assert torch.isneginf(scores[:, 0]).all()
    assert (scores.argmax(dim=1) != 0).all()


def test_causality_later_items_do_not_change_earlier_states(model: GRU4Rec) -> None:
    x = _batch()
    changed = x.clone()
    changed[:, 6] = 42  # change position 6
    a, b = model(x), model(changed)
    _assert_close(a[:, :6], b[:, :6])
    assert not torch.allclose(a[:, 6:], b[:, 6:])


@pytest.mark.parametrize("seed", [0, 1])
def test_scores_do_not_depend_on_left_padding_length(seed: int) -> None:
    torch.manual_seed(seed)
    model = GRU4Rec(GRU4RecConfig(n_items=N_ITEMS, max_seq_len=16, d_model=16, n_layers=2)).eval()
    history = torch.tensor([[3, 7, 9, 1]])
    pad = lambda n: torch.cat([torch.zeros(1, n, dtype=torch.long), history], dim=1)  # noqa: E731
    short, long_ = model.score(pad(3)), model.score(pad(10))
    _assert_close(short[:, 1:], long_[:, 1:])
    _assert_close(model.score(history)[:, 1:], short[:, 1:])
    # Mixed padding in one batch: each row matches its own unbatched score.
    mixed = torch.cat([pad(10), torch.tensor([[0] * 12 + [5, 6]]), torch.zeros(1, 14, dtype=torch.long)])
    per_row = torch.cat([model.score(mixed[i : i + 1]) for i in range(3)])
    _assert_close(model.score(mixed), per_row)
    _assert_close(model.score(mixed)[:1, 1:], short[:, 1:])


def test_too_long_or_not_2d_input_is_rejected_by_encode(model: GRU4Rec) -> None:
    with pytest.raises(ValueError, match="exceeds max_seq_len=8"):
        model(torch.ones(1, 9, dtype=torch.long))
    with pytest.raises(ValueError, match=r"must be \(batch, seq_len\)"):
        model(torch.ones(9, dtype=torch.long))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"n_items": 0}, "n_items=0; expected >= 1"),
        ({"max_seq_len": 0}, "max_seq_len=0; expected >= 1"),
        ({"dropout": 1.0}, r"dropout=1.0; expected in \[0, 1\)"),
        ({"d_model": 0}, "d_model=0; expected >= 1"),
        ({"n_layers": 0}, "n_layers=0; expected >= 1"),
    ],
)
def test_config_validation_names_the_value(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        GRU4RecConfig(**{"n_items": 5, "max_seq_len": 8, **kwargs})


def test_config_requires_n_items_and_max_seq_len_and_is_frozen() -> None:
    with pytest.raises(TypeError):
        GRU4RecConfig(n_items=5)  # type: ignore[call-arg]
    with pytest.raises(AttributeError):
        CFG.d_model = 32  # type: ignore[misc]
    with pytest.raises(TypeError, match="GRU4Rec needs a GRU4RecConfig"):
        GRU4Rec(object())  # type: ignore[arg-type]


def test_registered_in_the_factory() -> None:
    assert MODELS["gru4rec"] is GRU4Rec
    assert isinstance(build_model(CFG), GRU4Rec)
    assert build_config("gru4rec", n_items=5, max_seq_len=8) == GRU4RecConfig(n_items=5, max_seq_len=8)
    assert GRU4REC_TRAIN["lr"] > 0 and GRU4Rec.train_defaults == GRU4REC_TRAIN  # the train flow applies them


def _toy(n_users: int = 40, seed: int = 0) -> dict[str, np.ndarray]:
    """Each user walks item i -> i + 1 (mod 50) from a random start: learnable next-item rule."""
    rng = np.random.default_rng(seed)
    return {f"u{u}": (rng.integers(0, N_ITEMS) + np.arange(rng.integers(6, 14))) % N_ITEMS + 1 for u in range(n_users)}


def test_learns_a_deterministic_successor_pattern() -> None:
    vocab = ItemVocabulary([f"i{k}" for k in range(1, N_ITEMS + 1)])
    mcfg = GRU4RecConfig(n_items=N_ITEMS, max_seq_len=8, d_model=16, n_layers=1, dropout=0.0)
    tcfg = TrainConfig(epochs=8, batch_size=32, lr=3e-2, seed=3, patience=20, device="cpu", num_threads=1)
    result = train_model(leave_one_out(_toy(n_users=200)), vocab, mcfg, tcfg, progress=False)
    assert isinstance(result.model, GRU4Rec)
    assert result.history[-1]["loss"] < result.history[0]["loss"]
    # After [i, i + 1] the top-1 is i + 2 (items are 1..50, wrapping around).
    items = torch.arange(1, N_ITEMS + 1)
    histories = torch.stack([items, items % N_ITEMS + 1], dim=1)  # (50, 2)
    top1 = result.model.score(histories).argmax(dim=1)  # (50,)
    expected = (items + 1) % N_ITEMS + 1
    assert (top1 == expected).float().mean() > 0.8  # chance is 0.02

"""Trainer determinism, learning on a toy pattern, checkpoints, warm start and the ranking path."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from models.checkpoint import checkpoint_dict, load_checkpoint, save_checkpoint
from models.metrics import evaluate
from models.ranking import recommend
from models.sasrec import SASRecConfig
from models.sequences import leave_one_out
from models.trainer import TrainConfig, train_model
from models.vocab import ItemVocabulary

N_ITEMS = 50


def _toy(n_users: int = 40, seed: int = 0) -> dict[str, np.ndarray]:
    """Each user walks item i -> i + 1 (mod 50) from a random start: learnable next-item rule."""
    rng = np.random.default_rng(seed)
    return {
        f"u{u}": (rng.integers(0, N_ITEMS) + np.arange(rng.integers(6, 14))) % N_ITEMS + 1
        for u in range(n_users)
    }


VOCAB = ItemVocabulary([f"i{k}" for k in range(1, N_ITEMS + 1)])
MCFG = SASRecConfig(n_items=N_ITEMS, max_seq_len=8, d_model=16, n_heads=1, n_layers=1, dropout=0.1)
TCFG = TrainConfig(epochs=6, batch_size=16, lr=5e-3, seed=3, patience=20, device="cpu", num_threads=1)


def test_same_seed_same_metrics_and_it_learns() -> None:
    split = leave_one_out(_toy())
    first = train_model(split, VOCAB, MCFG, TCFG, progress=False)
    second = train_model(split, VOCAB, MCFG, TCFG, progress=False)
    assert [h["loss"] for h in first.history] == [h["loss"] for h in second.history]
    m1 = evaluate(first.model, split.test, n_items=N_ITEMS)["metrics"]
    m2 = evaluate(second.model, split.test, n_items=N_ITEMS)["metrics"]
    assert m1 == m2
    assert first.history[-1]["loss"] < first.history[0]["loss"]
    assert m1["hr@10"] > 0.5  # random would be ~0.2
    assert {"epoch", "loss", "val_ndcg@10", "val_hr@10", "seqs_per_s", "seconds"} <= set(first.history[0])
    assert first.best_epoch >= 1 and first.seed == 3 and first.device == "cpu"


def test_checkpoint_round_trip_and_recommend(tmp_path) -> None:
    split = leave_one_out(_toy())
    result = train_model(split, VOCAB, MCFG, TCFG.model_copy(update={"epochs": 1}), progress=False)
    path = save_checkpoint(tmp_path / "m.pt", result.model, VOCAB, {"seed": 3})
    model, vocab, extra = load_checkpoint(path)
    assert vocab == VOCAB and extra == {"seed": 3} and model.config == MCFG
    hist = torch.tensor([[0, 0, 0, 0, 0, 1, 2, 3]])
    torch.testing.assert_close(model.score(hist), result.model.score(hist))
    recs = recommend(model, vocab, [["i1", "i2", "unknown"]], k=5, exclude={"i4"})[0]
    ids = [item for item, _ in recs]
    assert len(ids) == 5 and not {"i1", "i2", "i4"} & set(ids)
    scores = [s for _, s in recs]
    assert scores == sorted(scores, reverse=True)
    with pytest.raises(FileNotFoundError):
        load_checkpoint(tmp_path / "missing.pt")


def test_recommend_never_returns_padding_even_for_empty_history() -> None:
    split = leave_one_out(_toy())
    result = train_model(split, VOCAB, MCFG, TCFG.model_copy(update={"epochs": 1}), progress=False)
    recs = recommend(result.model, VOCAB, [[]], k=N_ITEMS + 10)[0]
    assert len(recs) == N_ITEMS and all(np.isfinite(s) for _, s in recs)


def test_warm_start_with_extended_vocab_keeps_old_rows() -> None:
    split = leave_one_out(_toy())
    old = train_model(split, VOCAB, MCFG, TCFG.model_copy(update={"epochs": 1}), progress=False)
    payload = checkpoint_dict(old.model, VOCAB)
    new_vocab = VOCAB.extend(["new1", "new2"])
    new_cfg = SASRecConfig(**{**MCFG.to_dict(), "n_items": len(new_vocab)})
    seqs = _toy()
    seqs["fresh"] = np.array([1, 2, N_ITEMS + 1, N_ITEMS + 2, 3])
    zero = TCFG.model_copy(update={"epochs": 1, "lr": 1e-12})  # ~no update: inspect the initialisation
    warm = train_model(leave_one_out(seqs), new_vocab, new_cfg, zero, init_state=payload, progress=False)
    old_w, new_w = old.model.item_emb.weight.detach(), warm.model.item_emb.weight.detach()
    torch.testing.assert_close(new_w[: N_ITEMS + 1], old_w, atol=1e-6, rtol=0)
    assert new_w.shape == (N_ITEMS + 3, 16) and new_w[N_ITEMS + 1 :].abs().sum() > 0
    with pytest.raises(ValueError, match="n_items=50 but len\\(vocab\\)=52"):
        train_model(split, new_vocab, MCFG, TCFG, progress=False)

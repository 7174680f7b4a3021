"""Training that scales: the logQ-corrected sampled softmax, the learning-rate schedule, weight-decay groups,
chunked evaluation, resumable training and the optimiser state a warm start continues."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from models.baselines import DENSE_BASELINE_MAX_ITEMS, baselines_for
from models.checkpoint import checkpoint_dict, remap_optimizer_state
from models.losses import (
    SAMPLED_SOFTMAX_MIN_ITEMS,
    candidate_log_q,
    choose_loss,
    full_softmax_ce,
    in_batch_sampled_ce,
    item_target_prob,
)
from models.metrics import evaluate
from models.sasrec import SASRec, SASRecConfig
from models.sequences import build_sequences, leave_one_out
from models.trainer import TrainConfig, lr_factor, param_groups, train_model
from models.vocab import ItemVocabulary

N_ITEMS = 50
VOCAB = ItemVocabulary([f"i{k}" for k in range(1, N_ITEMS + 1)])
MCFG = SASRecConfig(n_items=N_ITEMS, max_seq_len=8, d_model=16, n_heads=1, n_layers=1, dropout=0.1)
TCFG = TrainConfig(epochs=5, batch_size=16, lr=5e-3, seed=3, patience=20, device="cpu", num_threads=1)


def _toy(n_users: int = 40, seed: int = 0) -> dict[str, np.ndarray]:
    """Each user walks item i -> i + 1 (mod 50) from a random start: a learnable next-item rule."""
    rng = np.random.default_rng(seed)
    return {f"u{u}": (rng.integers(0, N_ITEMS) + np.arange(rng.integers(6, 14))) % N_ITEMS + 1 for u in range(n_users)}


def test_log_q_corrected_loss_matches_a_hand_computed_case() -> None:
    # Items e1 = (1, 0), e2 = (0, 1), e3 = (1, 1); targets 1 and 2 in one batch, no uniform negatives:
    # candidates {1, 2}; p = (0.5, 0.25, 0.25) so Q(1) = 1 - 0.5^2 = 0.75 and Q(2) = 1 - 0.75^2 = 0.4375.
    weight = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    hidden = torch.tensor([[[2.0, 0.0], [0.0, 1.0]]])  # (1, 2, 2)
    targets = torch.tensor([[1, 2]])
    prob = torch.tensor([0.0, 0.5, 0.25, 0.25])
    lq1, lq2 = math.log(0.75), math.log(0.4375)
    row1 = -(2 - lq1) + math.log(math.exp(2 - lq1) + math.exp(0 - lq2))  # label: item 1, logits s - log Q
    row2 = -(1 - lq2) + math.log(math.exp(0 - lq1) + math.exp(1 - lq2))  # label: item 2
    loss = in_batch_sampled_ce(hidden, targets, weight, 0, prob)
    assert loss.item() == pytest.approx((row1 + row2) / 2, rel=1e-6)
    log_q = candidate_log_q(torch.tensor([1, 2]), prob, n_targets=2, n_uniform=0, n_items=3)
    torch.testing.assert_close(log_q, torch.tensor([lq1, lq2]))


def test_log_q_loss_equals_full_softmax_when_the_candidates_are_the_catalogue_at_uniform_q() -> None:
    weight = torch.randn(4, 3)
    hidden = torch.randn(2, 3, 3)
    targets = torch.tensor([[1, 2, 3], [0, 3, 1]])  # every item is a target: the candidates are the catalogue
    uniform = torch.tensor([0.0, 1 / 3, 1 / 3, 1 / 3])  # equal Q(j): the correction cancels
    torch.testing.assert_close(in_batch_sampled_ce(hidden, targets, weight, 0, uniform),
                               full_softmax_ce(hidden, targets, weight))
    grad_w = weight.clone().requires_grad_()
    in_batch_sampled_ce(hidden, targets, grad_w, 5, uniform, torch.Generator().manual_seed(0)).backward()
    assert torch.isfinite(grad_w.grad).all()
    few = in_batch_sampled_ce(hidden, targets, weight, 0, uniform, torch.Generator().manual_seed(0), n_in_batch=1)
    assert torch.isfinite(few) and few < full_softmax_ce(hidden, targets, weight)  # fewer negatives: smaller loss


def test_item_target_prob_and_the_auto_loss_threshold() -> None:
    prob = item_target_prob(torch.tensor([[0, 1, 1], [2, 1, 0]]), n_items=3)
    assert prob[0] == 0 and prob.sum().item() == pytest.approx(1.0)
    assert prob[1] == pytest.approx(3 / 4.5) and prob[3] == pytest.approx(0.5 / 4.5)  # unseen: half a count
    assert choose_loss("auto", SAMPLED_SOFTMAX_MIN_ITEMS) == "full"
    assert choose_loss("auto", SAMPLED_SOFTMAX_MIN_ITEMS + 1) == "sampled"
    assert choose_loss("full", 10**6) == "full"
    with pytest.raises(ValueError, match="loss='bpr'"):
        choose_loss("bpr", 10)


def test_warmup_then_cosine_schedule_values() -> None:
    assert lr_factor(0, 10, 110) == pytest.approx(1 / 11)
    assert lr_factor(9, 10, 110) == pytest.approx(10 / 11)
    assert lr_factor(10, 10, 110) == pytest.approx(1.0)
    assert lr_factor(60, 10, 110) == pytest.approx(0.55)  # half-way: 0.1 + 0.9 * 0.5 * (1 + cos(pi / 2))
    assert lr_factor(110, 10, 110) == pytest.approx(0.1)
    assert lr_factor(500, 10, 110) == pytest.approx(0.1)
    assert lr_factor(60, 10, 110, schedule="constant") == 1.0
    assert lr_factor(0, 0, 100) == pytest.approx(1.0)


def test_weight_decay_groups_leave_embeddings_norms_and_biases_alone() -> None:
    model = SASRec(MCFG)
    decay, keep = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    assert decay["weight_decay"] == 0.1 and keep["weight_decay"] == 0.0
    assert decayed and all(n.endswith("weight") and "norm" not in n and "emb" not in n for n in decayed)
    assert "item_emb.weight" in {names[id(p)] for p in keep["params"]}


def test_chunked_evaluation_equals_unchunked_on_ml100k(ml100k_path: Path) -> None:
    from models.baselines import Markov1, MostPop
    from recloop.sources import load_source

    events = load_source("movielens-100k", ml100k_path).events
    vocab = ItemVocabulary.from_ids(events["item_id"].astype(str).unique())
    split = leave_one_out(build_sequences(events, vocab))
    for scorer in (Markov1().fit(split.train, len(vocab)), MostPop().fit(split.train, len(vocab))):  # MostPop: ties
        whole = evaluate(scorer, split.test, n_items=len(vocab), batch_size=len(split.test))
        chunked = evaluate(scorer, split.test, n_items=len(vocab), batch_size=97)
        assert whole["metrics"] == chunked["metrics"]
        np.testing.assert_array_equal(whole["per_user"]["rank"], chunked["per_user"]["rank"])


def test_dense_baselines_are_skipped_above_the_stated_size() -> None:
    names = ["MostPop", "ItemKNN", "EASE", "Markov1"]
    assert baselines_for(DENSE_BASELINE_MAX_ITEMS, names) == (names, {})
    kept, skipped = baselines_for(DENSE_BASELINE_MAX_ITEMS + 1, names)
    assert kept == ["MostPop", "Markov1"] and set(skipped) == {"ItemKNN", "EASE"}
    assert "dense" in skipped["EASE"]


class _Killed(RuntimeError):
    pass


def test_a_killed_training_resumes_from_its_last_epoch_and_ends_like_an_uninterrupted_one(tmp_path: Path) -> None:
    split = leave_one_out(_toy())
    whole = train_model(split, VOCAB, MCFG, TCFG, progress=False)

    def die_after_epoch_2(row: dict) -> None:
        if row["epoch"] == 2:
            raise _Killed("killed after epoch 2")

    with pytest.raises(_Killed):
        train_model(split, VOCAB, MCFG, TCFG, progress=False, on_epoch=die_after_epoch_2, checkpoint_dir=tmp_path)
    seen: list[int] = []
    resumed = train_model(split, VOCAB, MCFG, TCFG, progress=False, checkpoint_dir=tmp_path,
                          on_epoch=lambda row: seen.append(row["epoch"]))
    assert resumed.resumed_from_epoch == 2 and seen == [3, 4, 5]  # the epoch counter continues
    assert [h["epoch"] for h in resumed.history] == [1, 2, 3, 4, 5]
    np.testing.assert_allclose([h["loss"] for h in resumed.history], [h["loss"] for h in whole.history], rtol=1e-5)
    assert resumed.best_val_ndcg == pytest.approx(whole.best_val_ndcg, abs=1e-6)
    # Other settings: the checkpoint is not theirs, training starts afresh.
    other = train_model(split, VOCAB, MCFG, TCFG.model_copy(update={"epochs": 1}), progress=False,
                        checkpoint_dir=tmp_path)
    assert other.resumed_from_epoch == 0


def test_warm_start_continues_the_optimiser_with_item_rows_moved_by_id() -> None:
    split = leave_one_out(_toy())
    old = train_model(split, VOCAB, MCFG, TCFG.model_copy(update={"epochs": 1}), progress=False)
    named = old.train_state["optimizer"]
    assert set(named["item_emb.weight"]) >= {"step", "exp_avg", "exp_avg_sq"}
    new_vocab = ItemVocabulary(["new0", *VOCAB.ids])  # every old item moves one row down
    new_model = SASRec(SASRecConfig(**{**MCFG.to_dict(), "n_items": len(new_vocab)}))
    moved = remap_optimizer_state(named, VOCAB, new_model, new_vocab)["item_emb.weight"]
    old_avg, old_sq = named["item_emb.weight"]["exp_avg"], named["item_emb.weight"]["exp_avg_sq"]
    torch.testing.assert_close(moved["exp_avg"][2:], old_avg[1:])
    assert moved["exp_avg"][1].abs().sum() == 0  # the new item: no momentum
    torch.testing.assert_close(moved["exp_avg_sq"][1], old_sq[1:].mean(dim=0))  # ... the known rows' scale
    assert moved["step"] == named["item_emb.weight"]["step"]
    payload = {**checkpoint_dict(old.model, VOCAB), "train_state": old.train_state}
    seqs = {**_toy(), "fresh": np.array([1, 2, N_ITEMS + 1, 3])}
    warm = train_model(leave_one_out(seqs), VOCAB.extend(["n1"]),
                       SASRecConfig(**{**MCFG.to_dict(), "n_items": N_ITEMS + 1}),
                       TCFG.model_copy(update={"epochs": 1}), init_state=payload, progress=False)
    assert warm.train_state["optimizer"]["item_emb.weight"]["step"] > named["item_emb.weight"]["step"]

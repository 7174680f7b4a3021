"""Text-aware items through the model contract (models/contract.py, models/text_items.py): tiny models on CPU."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from models.checkpoint import checkpoint_dict, model_from_dict
from models.contract import Batch
from models.factory import MODELS, build_config, build_model
from models.text_items import (
    MIN_COLD_TARGETS,
    WINDOW_SHARES,
    ContentScorer,
    ItemTable,
    NewItemsOnly,
    PaddedScorer,
    blend_query,
    bootstrap_interval,
    cold_temporal_split,
    cold_vectors,
    subset,
    text_matrix,
)
from models.vocab import ItemVocabulary

N_ITEMS, D_TEXT, SEQ = 30, 12, 8


def _text(n: int = N_ITEMS, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = rng.normal(size=(n + 1, D_TEXT)).astype(np.float32)
    t /= np.linalg.norm(t, axis=1, keepdims=True)
    t[0] = 0
    return t


def _model(name: str, item_repr: str, **kw):
    cfg = build_config(name, n_items=N_ITEMS, max_seq_len=SEQ, d_model=16, item_repr=item_repr,
                       d_text=0 if item_repr == "id" else D_TEXT, **kw)
    torch.manual_seed(0)
    model = build_model(cfg)
    if model.uses_text:
        model.set_item_text(_text())
    return model


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("item_repr", ["id+text", "text"])
def test_text_aware_models_train_through_the_same_loss(name: str, item_repr: str) -> None:
    model = _model(name, item_repr, id_dropout=0.2 if item_repr == "id+text" else 0.0)
    inputs = torch.randint(1, N_ITEMS + 1, (4, SEQ))
    loss = model.loss(Batch(inputs, torch.roll(inputs, -1, 1)))
    assert loss.shape == ()
    loss.backward()
    assert model.text_proj.weight.grad is not None and model.text_proj.weight.grad.abs().sum() > 0
    emb = model.eval().item_embeddings()
    assert emb.shape == (N_ITEMS + 1, 16) and torch.all(emb[0] == 0)  # the padding row stays zero
    scores = model.score(inputs)
    assert scores.shape == (4, N_ITEMS + 1) and torch.isinf(scores[:, 0]).all()


def test_text_only_items_with_the_same_text_get_the_same_vector() -> None:
    model = _model("sasrec", "text").eval()
    text = _text()
    text[2] = text[1]
    model.set_item_text(text)
    emb = model.item_embeddings()
    assert torch.allclose(emb[1], emb[2])


def test_config_rejects_bad_text_options() -> None:
    with pytest.raises(ValueError, match="item_repr='words'"):
        build_config("sasrec", n_items=5, max_seq_len=4, item_repr="words", d_text=3)
    with pytest.raises(ValueError, match="needs d_text"):
        build_config("sasrec", n_items=5, max_seq_len=4, item_repr="text")
    with pytest.raises(ValueError, match="text_dropout"):
        build_config("gru4rec", n_items=5, max_seq_len=4, item_repr="text", d_text=3, text_dropout=1.0)
    model = _model("sasrec", "id")
    with pytest.raises(ValueError, match="takes no item text"):
        model.set_item_text(_text())
    with pytest.raises(ValueError, match="cannot embed new items"):
        cold_vectors(model, _text()[1:3])


def test_checkpoint_carries_the_text_buffer_and_projection() -> None:
    model = _model("sasrec", "id+text").eval()
    vocab = ItemVocabulary([f"i{k}" for k in range(N_ITEMS)])
    rebuilt, _ = model_from_dict(checkpoint_dict(model, vocab))
    hist = torch.tensor([[0, 0, 3, 4, 5]])
    assert torch.allclose(rebuilt.score(hist), model.score(hist))
    assert torch.equal(rebuilt.item_text, model.item_text)


def test_item_table_appends_new_items_scored_like_catalogue_items() -> None:
    model = _model("sasrec", "text").eval()
    text = _text()
    table = ItemTable(model, cold_vectors(model, text[[5, 7]]))  # two new items with item 5's and 7's text
    hist = torch.tensor([[0, 3, 4, N_ITEMS + 1]])  # a history may hold a new item
    scores = table.score(hist)
    assert scores.shape == (1, N_ITEMS + 3)
    # a text-only new item with item 5's text is item 5 as far as the model can tell
    assert torch.allclose(scores[0, N_ITEMS + 1], scores[0, 5]) and torch.allclose(scores[0, N_ITEMS + 2], scores[0, 7])
    # and the table is the model: same scores on catalogue items without new ones in the history
    plain = torch.tensor([[0, 3, 4, 5]])
    assert torch.allclose(table.score(plain)[:, : N_ITEMS + 1], model.score(plain))


def test_content_scorer_prefers_items_like_the_history() -> None:
    text = _text()
    text[9] = text[3] + 0.01
    scores = ContentScorer(text).score(torch.tensor([[0, 0, 3]])).clone()
    scores[0, 3] = -np.inf
    assert int(scores[0].argmax()) == 9


def test_blend_query_keeps_masked_items_out_and_spans_both_orders() -> None:
    scores = np.array([-np.inf, 3.0, 2.0, 1.0, -np.inf])
    sims = np.array([0.0, 0.1, 0.2, 0.9, 1.0])
    assert np.argmax(blend_query(scores, sims, 0.0)) == 1
    out = blend_query(scores, sims, 1.0)
    assert np.argmax(out) == 3 and np.isinf(out[[0, 4]]).all()
    with pytest.raises(ValueError, match="weight"):
        blend_query(scores, sims, 1.5)


def test_text_matrix_rows_follow_the_vocabulary() -> None:
    m = text_matrix(["a", "b", "c"], {"c": np.ones(3), "a": np.full(3, 2.0)}, 3)
    assert m.shape == (4, 3) and m[0].sum() == 0 and m[1][0] == 2 and m[2].sum() == 0 and m[3][0] == 1


def test_cold_temporal_split_on_movielens_holds_enough_cold_targets_and_never_looks_ahead(ml100k_path) -> None:
    from recloop.policy import DEFAULT_POLICY
    from recloop.sources import load_source

    frames = load_source("movielens-100k", ml100k_path)
    events = DEFAULT_POLICY.positives(frames.events)
    cs = cold_temporal_split(events, frames.items["item_id"].astype(str))
    p, n_vocab = cs.protocol, len(cs.vocab)
    # the share is the first whose windows both hold MIN_COLD_TARGETS cold targets (ml-100k: 0.1 does not)
    assert p["min_cold_met"] and p["n_test_cold"] >= MIN_COLD_TARGETS and p["n_valid_cold"] >= MIN_COLD_TARGETS
    assert p["share"] > WINDOW_SHARES[0] and p["shares_tried"][str(WINDOW_SHARES[0])][1] < MIN_COLD_TARGETS
    assert p["n_test_cold"] == int(cs.test_cold.sum()) and (cs.test.targets[cs.test_cold] > n_vocab).all()
    assert (cs.test.targets[~cs.test_cold] <= n_vocab).all() and n_vocab + len(cs.new_ids) == 1682
    # training is the past only: every training item is in the vocabulary, and no cold item was seen before the cut
    assert all((seq <= n_vocab).all() for seq in cs.split.train.values())
    ts = pd.to_datetime(events["timestamp"], utc=True)
    assert ts.quantile(1 - 2 * p["share"]) == pd.Timestamp(p["valid_cut"])
    assert pd.Timestamp(p["valid_cut"]) < pd.Timestamp(p["test_cut"])
    # each case's history is every earlier positive of its user: the next case of the same user extends it by one
    users, hist = cs.test.user_ids, cs.test.histories
    same = next(i for i in range(len(users) - 1) if users[i] == users[i + 1])
    assert np.array_equal(hist[same + 1], np.append(hist[same], cs.test.targets[same]))


def test_an_id_only_scorer_drops_new_items_from_histories_and_scores_them_minus_inf() -> None:
    model = _model("sasrec", "id").eval()
    padded = PaddedScorer(model, 2)
    with_new = torch.tensor([[0, 3, N_ITEMS + 1, 5, N_ITEMS + 2]])
    scores = padded.score(with_new)
    assert scores.shape == (1, N_ITEMS + 3) and torch.isinf(scores[0, N_ITEMS + 1:]).all()
    assert torch.allclose(scores[0, 1: N_ITEMS + 1], model.score(torch.tensor([[0, 0, 0, 3, 5]]))[0, 1:])


def test_cluster_bootstrap_resamples_whole_users() -> None:
    values = np.array([1.0] * 50 + [0.0] * 50)
    flat = bootstrap_interval(values, seed=0)
    clustered = bootstrap_interval(values, seed=0, groups=np.array(["a"] * 50 + ["b"] * 50))
    assert flat[1] - flat[0] < clustered[1] - clustered[0]  # two users: the interval is far wider
    assert np.isnan(bootstrap_interval(np.array([]))[0])


@pytest.mark.parametrize("name", sorted(MODELS))
def test_text_norm_starts_the_text_part_at_the_id_scale_keeps_padding_zero_and_trains(name) -> None:
    from models.contract import TEXT_NORM_INIT

    model = _model(name, "id+text", text_norm=True)
    emb = model.item_embeddings()
    assert torch.count_nonzero(emb[0]) == 0 and torch.allclose(model.text_norm.weight, torch.tensor(TEXT_NORM_INIT))
    text_part = model.project_text(model.item_text[1:])
    assert text_part.std().item() == pytest.approx(TEXT_NORM_INIT, rel=0.2)  # as large as the ID part, not 50x
    seqs = torch.randint(1, N_ITEMS + 1, (4, SEQ + 1))
    model.loss(Batch(inputs=seqs[:, :-1], targets=seqs[:, 1:])).backward()
    assert model.text_norm.weight.grad is not None and model.text_norm.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="text_norm"):
        build_config(name, n_items=N_ITEMS, max_seq_len=SEQ, text_norm=True)


def test_the_reported_text_aware_variant_is_chosen_on_validation_within_two_percent_of_id_only() -> None:
    from bench.text_quality import ID_ONLY, choose_text_aware

    def seg(overall: float, cold: float) -> dict:
        return {"overall": {"ndcg@10": overall}, "cold": {"ndcg@10": cold}}

    valid = {ID_ONLY: seg(0.100, 0.0), "SASRec+ (id+text)": seg(0.101, 0.001),
             "SASRec+ (id+text, id_dropout 0.5)": seg(0.0985, 0.004), "SASRec+ (id+text, text_norm)": seg(0.090, 0.009),
             "SASRec+ (text)": seg(0.05, 0.02)}
    assert choose_text_aware(valid, 10)[0] == "SASRec+ (id+text, id_dropout 0.5)"  # best cold within 2% overall
    valid["SASRec+ (id+text, id_dropout 0.5)"] = seg(0.097, 0.004)
    assert choose_text_aware(valid, 10)[0] == "SASRec+ (id+text)"
    tied = {ID_ONLY: seg(0.1, 0.0), "SASRec+ (id+text)": seg(0.099, 0.0), "SASRec+ (id+text, text_norm)": seg(0.1, 0.0)}
    assert choose_text_aware(tied, 10)[0] == "SASRec+ (id+text, text_norm)"  # a tie on cold: the better overall
    far = {ID_ONLY: seg(0.2, 0.0), "SASRec+ (id+text)": seg(0.1, 0.0), "SASRec+ (id+text, text_norm)": seg(0.15, 0.0)}
    name, rule = choose_text_aware(far, 10)
    assert name == "SASRec+ (id+text, text_norm)" and "none within" in rule


@pytest.mark.parametrize("name", sorted(MODELS))
def test_cold_id_stands_in_for_dropped_and_new_items_ids_and_learns_through_the_loss(name) -> None:
    model = _model(name, "id+text", id_dropout=0.5, cold_id=True)
    with torch.no_grad():
        model.cold_id_emb.fill_(0.5)
    torch.manual_seed(1)
    train_emb = model.train().item_embeddings()  # one ID-dropout draw
    text_part = model.project_text(model.item_text)
    dropped = torch.isclose(train_emb - text_part, torch.full_like(train_emb, 0.5)).all(dim=1)
    kept = torch.isclose(train_emb - text_part, model.item_emb.weight).all(dim=1)
    assert torch.count_nonzero(train_emb[0]) == 0  # padding never takes the cold vector
    assert bool((dropped | kept)[1:].all()) and 0 < int(dropped[1:].sum()) < N_ITEMS  # each item: own ID or cold_id
    # eval: every catalogue item has its own ID; a new item gets its projected text plus the cold vector
    emb = model.eval().item_embeddings()
    assert torch.allclose(emb[1:], model.item_emb.weight[1:] + text_part[1:])
    new = cold_vectors(model, _text()[[4]])
    assert torch.allclose(new[0], text_part[4] + 0.5)
    # the vector is trained by the same loss (only dropped items reach it)
    model.train()
    seqs = torch.randint(1, N_ITEMS + 1, (8, SEQ + 1))
    model.loss(Batch(inputs=seqs[:, :-1], targets=seqs[:, 1:])).backward()
    assert model.cold_id_emb.grad is not None and model.cold_id_emb.grad.abs().sum() > 0
    for bad in ({"id_dropout": 0.0}, {"item_repr": "text"}):
        kw = {"item_repr": "id+text", "d_text": D_TEXT, "id_dropout": 0.5, "cold_id": True, **bad}
        with pytest.raises(ValueError, match="cold_id"):
            build_config(name, n_items=N_ITEMS, max_seq_len=SEQ, **kw)


def test_a_warm_start_starts_new_items_id_rows_at_the_cold_vector_they_were_served_with() -> None:
    from models.checkpoint import warm_start_state

    old = _model("sasrec", "id+text", id_dropout=0.5, cold_id=True).eval()
    with torch.no_grad():
        old.cold_id_emb.normal_()
    vocab = ItemVocabulary([f"i{k}" for k in range(N_ITEMS)])
    bigger = ItemVocabulary([f"i{k}" for k in range(N_ITEMS)] + ["new-a", "new-b"])
    cfg = build_config("sasrec", n_items=N_ITEMS + 2, max_seq_len=SEQ, d_model=16, item_repr="id+text",
                       d_text=D_TEXT, id_dropout=0.5, cold_id=True)
    state = warm_start_state(checkpoint_dict(old, vocab), build_model(cfg), bigger)
    emb = state["item_emb.weight"]
    assert torch.equal(emb[1:N_ITEMS + 1], old.item_emb.weight[1:])  # known items keep their rows
    assert torch.equal(emb[N_ITEMS + 1], old.cold_id_emb) and torch.equal(emb[N_ITEMS + 2], old.cold_id_emb)
    # so a new item's vector after the warm start is the one it was served with before it (same text)
    new_model = build_model(cfg)
    new_model.load_state_dict(state)
    text = _text(N_ITEMS + 2)
    new_model.set_item_text(text)
    served_before = cold_vectors(old, text[[N_ITEMS + 1]])[0]
    assert torch.allclose(new_model.eval().item_embeddings()[N_ITEMS + 1], served_before, atol=1e-6)


def test_items_no_training_sequence_holds_end_training_on_the_cold_vector() -> None:
    from models.sequences import leave_one_out
    from models.trainer import TrainConfig, train_model

    rng = np.random.default_rng(0)
    seqs = {f"u{u}": rng.integers(1, N_ITEMS - 1, size=12) for u in range(20)}  # items 29 and 30 never occur
    split = leave_one_out(seqs)
    vocab = ItemVocabulary([f"i{k}" for k in range(N_ITEMS)])
    cfg = build_config("sasrec", n_items=N_ITEMS, max_seq_len=SEQ, d_model=16, item_repr="id+text", d_text=D_TEXT,
                       id_dropout=0.5, cold_id=True)
    result = train_model(split, vocab, cfg, TrainConfig(epochs=2, seed=0, device="cpu", num_threads=1),
                         progress=False, item_text=_text())
    model = result.model
    unseen = [k for k in range(1, N_ITEMS + 1) if not any(k in s for s in split.train.values())]
    assert unseen and all(torch.equal(model.item_emb.weight[k], model.cold_id_emb) for k in unseen)
    seen = [k for k in range(1, N_ITEMS + 1) if k not in unseen]
    assert not any(torch.equal(model.item_emb.weight[k], model.cold_id_emb) for k in seen)


class _FixedScorer:
    """Scores every history with the same row (a hand-written ranking)."""

    config = None

    def __init__(self, row: list[float]) -> None:
        self.row = torch.tensor(row, dtype=torch.float32)

    def score(self, item_idx, candidate_idx=None):
        return self.row.unsqueeze(0).expand(len(item_idx), -1).clone()


def test_new_items_only_ranks_a_cold_target_among_the_new_items_by_hand() -> None:
    from models.metrics import evaluate
    from models.sequences import EvalSet

    # 3 vocabulary items (1-3), 2 new ones (4, 5); item 5 is 5th of all, 2nd of the new, item 4 is 1st of the new
    scorer = _FixedScorer([0.0, 9.0, 8.0, 7.0, 2.0, 1.0])
    cases = EvalSet(np.array(["u", "v", "w"], dtype=object), [np.array([1]), np.array([2]), np.array([1])],
                    np.array([5, 4, 3]))
    cold = subset(cases, cases.targets > 3)
    assert list(cold.user_ids) == ["u", "v"] and list(cold.targets) == [5, 4]
    full = evaluate(scorer, cold, n_items=5, k=2)["per_user"]
    among = evaluate(NewItemsOnly(scorer, 3), cold, n_items=5, k=2)["per_user"]
    # full ranking, history masked: u ranks 5 fourth (2, 3, 4 above), v ranks 4 third (1, 3 above): no hit at 2
    assert full["hr@2"].tolist() == [0.0, 0.0]
    # among the new items: u's target second (1 / log2(3)), v's first (1)
    assert among["hr@2"].tolist() == [1.0, 1.0]
    assert among["ndcg@2"] == pytest.approx([1 / np.log2(3), 1.0])
    # an ID-only scorer gives new items -inf: among the new items it still ranks them nowhere (0 by construction)
    padded = PaddedScorer(_FixedScorer([0.0, 9.0, 8.0, 7.0]), 2)
    assert evaluate(NewItemsOnly(padded, 3), cold, n_items=5, k=2)["per_user"]["hr@2"].tolist() == [0.0, 0.0]


def test_hit_concentration_counts_distinct_items_and_the_top_share() -> None:
    from bench.text_quality import hit_concentration

    assert hit_concentration(np.array([1, 1, 0, 1, 1]), np.array([7, 7, 8, 9, 7])) == {
        "hits": 4, "distinct_items": 2, "top_item_share": 0.75}
    empty = hit_concentration(np.array([0, 0]), np.array([1, 2]))
    assert empty["hits"] == 0 and np.isnan(empty["top_item_share"])


@pytest.mark.parametrize("name", sorted(MODELS))
def test_id_expectation_scores_with_the_id_parts_expected_value_under_the_dropout(name) -> None:
    model = _model(name, "id+text", id_dropout=0.25, cold_id=True, id_expectation=True)
    with torch.no_grad():
        model.cold_id_emb.fill_(2.0)
        model.item_emb.weight[3].fill_(1.0)
    text_part = model.project_text(model.item_text)
    emb = model.eval().item_embeddings()
    # by hand: item 3's ID part is 0.75 * 1.0 + 0.25 * 2.0 = 1.25 in every coordinate
    assert torch.allclose(emb[3] - text_part[3], torch.full_like(emb[3], 1.25))
    assert torch.allclose(emb[1:], 0.75 * model.item_emb.weight[1:] + 0.25 * model.cold_id_emb + text_part[1:])
    assert torch.count_nonzero(emb[0]) == 0  # padding stays zero
    # a row that already is the cold vector (an item no training sequence held) keeps it; new items are unchanged
    model.adopt_cold_id(torch.tensor([5]))
    assert torch.allclose(model.item_embeddings()[5], model.cold_item_vectors(model.item_text[5:6])[0])
    # training draws are untouched: every item has its own ID or the cold vector, never the mixture
    torch.manual_seed(0)
    part = model.train().item_embeddings() - text_part
    own = torch.isclose(part, model.item_emb.weight).all(dim=1)
    cold = torch.isclose(part, torch.full_like(part, 2.0)).all(dim=1)
    assert bool((own | cold)[1:].all())
    # without cold_id the dropped part is zero, so the expectation is (1 - p) * ID
    plain = _model(name, "id+text", id_dropout=0.5, id_expectation=True).eval()
    assert torch.allclose(plain.item_embeddings()[1:] - plain.project_text(plain.item_text)[1:],
                          0.5 * plain.item_emb.weight[1:])
    for bad in ({"id_dropout": 0.0}, {"item_repr": "text"}):
        kw = {"item_repr": "id+text", "d_text": D_TEXT, "id_dropout": 0.5, "id_expectation": True, **bad}
        with pytest.raises(ValueError, match="id_expectation"):
            build_config(name, n_items=N_ITEMS, max_seq_len=SEQ, **kw)

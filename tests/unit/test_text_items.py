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
    ContentScorer,
    ItemTable,
    blend_query,
    cold_temporal_split,
    cold_vectors,
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


def test_cold_temporal_split_on_movielens_counts_cold_targets(ml100k_path) -> None:
    from recloop.sources import load_source

    frames = load_source("movielens-100k", ml100k_path)
    split, vocab, new_ids, cold = cold_temporal_split(frames.events, frames.items["item_id"].astype(str), 0.9)
    assert split.protocol["n_cold_targets"] == int(cold.sum()) > 0
    assert (split.test.targets[cold] > len(vocab)).all() and (split.test.targets[~cold] <= len(vocab)).all()
    assert len(vocab) + len(new_ids) == frames.items["item_id"].nunique()
    # every history is pre-cut only: its items are all in the past vocabulary
    assert all((h <= len(vocab)).all() for h in split.test.histories)
    ts = pd.to_datetime(frames.events["timestamp"], utc=True)
    assert ts.quantile(0.9) == pd.Timestamp(split.protocol["cut"])

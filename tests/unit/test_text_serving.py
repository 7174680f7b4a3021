"""New items served at once and text queries in the serving core (serving/catalog.py), with a fake encoder.

The encoder is a deterministic bag of words (hashed into 32 dimensions), so texts sharing words are close, as
with the real sentence encoder (tests/integration/test_new_items.py uses the real one on ml-100k).
"""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch
from fakes import MemoryLog, MemoryOnline, tiny_served
from pydantic import ValidationError

from featurestore.text import QueryEncoder
from models.sasrec import SASRec, SASRecConfig
from models.vocab import ItemVocabulary
from recloop.catalog import CachedCatalog, validate_item
from serving.catalog import ID_ONLY_REASON, TextCatalog, add_item
from serving.recommender import RecommenderCore, build_served
from serving.schemas import ItemRequest, RecommendRequest

D = 32
TITLES = {f"i{j}": f"{'robot space' if j <= 5 else 'romantic comedy'} film {j}" for j in range(1, 51)}


class BagOfWords:
    """Sentence-encoder stand-in: each word adds a fixed random vector; rows L2-normalised."""

    def __init__(self) -> None:
        self.calls = 0

    def encode(self, sentences: list[str], **_kw) -> np.ndarray:
        self.calls += 1
        out = np.zeros((len(sentences), D), dtype=np.float32)
        for i, s in enumerate(sentences):
            for w in s.lower().replace(".", " ").replace(",", " ").split():
                seed = int.from_bytes(hashlib.sha256(w.encode()).digest()[:4], "big")
                out[i] += np.random.default_rng(seed).normal(size=D)
        norm = np.linalg.norm(out, axis=1, keepdims=True)
        return out / np.where(norm > 0, norm, 1)


class MemoryCatalogStore:
    def __init__(self) -> None:
        self.rows: dict[str, dict] = {}

    def add(self, items) -> list[str]:
        new = []
        for item in items:
            row = validate_item(item)
            new += [] if row["item_id"] in self.rows else [row["item_id"]]
            self.rows[row["item_id"]] = {**row, "added_at": "2024-01-01T00:00:00+00:00"}
        return new

    def list(self) -> list[dict]:
        return [self.rows[k] for k in sorted(self.rows)]


def _text_served() -> tuple:
    """An untrained text-only SASRec over 50 items whose texts are TITLES (the bag-of-words encoder)."""
    torch.manual_seed(0)
    vocab = ItemVocabulary([f"i{j}" for j in range(1, 51)])
    model = SASRec(SASRecConfig(n_items=50, max_seq_len=8, d_model=16, n_layers=1, dropout=0.0,
                                item_repr="text", d_text=D))
    enc = BagOfWords()
    text = np.zeros((51, D), dtype=np.float32)
    text[1:] = enc.encode([TITLES[i] for i in vocab.ids])
    model.set_item_text(text)
    return build_served(model.eval(), vocab, "7", "run", {}, titles=TITLES), enc


def _core(served, enc) -> tuple[RecommenderCore, MemoryCatalogStore]:
    store = MemoryCatalogStore()
    core = RecommenderCore(served, MemoryOnline({"u1": ["i1", "i2", "i3"]}), MemoryLog(), max_seq_len=8)
    core.text = TextCatalog(CachedCatalog(store, ttl_s=60.0), lambda: enc, QueryEncoder(lambda: enc, 8), None)
    return core, store


def test_a_new_item_is_served_at_once_by_a_text_model_and_flagged_cold() -> None:
    served, enc = _text_served()
    core, _ = _core(served, enc)
    out = add_item(core, {"item_id": "new-1", "title": "robot space film sequel", "genres": ["Sci-Fi"]})
    assert out["inserted"] and out["served_now"] and not out["known_item"] and out["reason"] is None
    answer = core.recommend("u1", k=5)  # history: three "robot space" items; the new one reads like them
    ids = [x["item_id"] for x in answer["items"]]
    assert "new-1" in ids
    assert all(x.get("cold_item") is (True if x["item_id"] == "new-1" else None) for x in answer["items"])
    assert core.text.status(core.served)["new_items_served"] == 1
    # the genre filter, similar items and feedback know the new item too
    assert [x["item_id"] for x in core.recommend("u1", k=3, genres=["Sci-Fi"])["items"]] == ["new-1"]
    assert core.similar_items("new-1", k=3)["items"]
    assert core.feedback("u1", "new-1", "click")["known_item"] is True


def test_an_id_only_model_says_it_cannot_serve_new_items() -> None:
    _, enc = _text_served()
    core, _ = _core(tiny_served(), enc)
    out = add_item(core, {"item_id": "new-1", "title": "robot space film sequel"})
    assert out["served_now"] is False and out["reason"] == ID_ONLY_REASON
    assert "new-1" not in [x["item_id"] for x in core.recommend("u1", k=50)["items"]]
    status = core.text.status(core.served)
    assert status["serves_new_items"] is False and status["item_repr"] == "id"


def test_a_catalogue_change_reaches_a_second_worker_within_the_ttl() -> None:
    served, enc = _text_served()
    writer, store = _core(served, enc)
    now = [0.0]
    reader = RecommenderCore(served, MemoryOnline({"u1": ["i1", "i2", "i3"]}), MemoryLog(), max_seq_len=8)
    reader.text = TextCatalog(CachedCatalog(store, ttl_s=5.0, clock=lambda: now[0]), lambda: enc, None, None)
    assert len(reader.current_served().vocab) == 50
    add_item(writer, {"item_id": "new-1", "title": "robot space film sequel"})
    assert len(reader.current_served().vocab) == 50  # within the TTL
    now[0] = 5.0
    assert "new-1" in reader.current_served().vocab and reader.current_served() is reader.current_served()


def test_a_query_steers_the_answer_and_repeats_hit_the_cache() -> None:
    served, enc = _text_served()
    core, _ = _core(served, enc)
    plain = [x["item_id"] for x in core.recommend("u1", k=5)["items"]]
    out = core.recommend("u1", k=5, query="romantic comedy")
    steered = [x["item_id"] for x in out["items"]]
    assert out["query_weight"] == 0.5 and steered != plain
    assert all(int(i[1:]) > 5 for i in steered[:3])  # "romantic comedy" items lead
    calls = enc.calls
    core.recommend("u1", k=5, query="  romantic   comedy ")
    assert enc.calls == calls  # the cache answered (no encoder pass)
    current = core.current_served()
    assert core.text.query_sims(current, "romantic comedy") is core.text.query_sims(current, " romantic  comedy")
    core.query_weight = 0.0
    assert [x["item_id"] for x in core.recommend("u1", k=5, query="romantic comedy")["items"]] == plain


def test_a_query_works_against_an_id_only_model_with_lake_texts() -> None:
    import pandas as pd

    _, enc = _text_served()
    core, _ = _core(tiny_served(), enc)
    ids = [f"i{j}" for j in range(1, 51)]
    core.text.lake_items = pd.DataFrame({"item_id": ids, "title": [TITLES[i] for i in ids],
                                         "genres": [[] for _ in ids], "text": ["" for _ in ids]})
    core.query_weight = 1.0
    top = [x["item_id"] for x in core.recommend("u9", k=3, query="robot space")["items"]]
    assert all(int(i[1:]) <= 5 for i in top)


@pytest.mark.parametrize("bad", [{"query": "a\x00b"}, {"query": ""}, {"query": "x" * 2001}, {"query": 5}])
def test_bad_queries_are_refused_by_the_schema(bad: dict) -> None:
    with pytest.raises(ValidationError, match="query"):
        RecommendRequest(user_id="1", **bad)


@pytest.mark.parametrize("bad,field", [
    ({"item_id": "", "title": "x"}, "item_id"), ({"item_id": "a", "title": ""}, "title"),
    ({"item_id": "a", "title": "x\x07"}, "title"), ({"item_id": "a", "title": "x", "genres": ["a|b"]}, "genres"),
    ({"item_id": "a\u202e", "title": "x"}, "item_id"), ({"item_id": "a", "title": "x", "text": "t" * 4001}, "text"),
])
def test_bad_items_are_refused_naming_the_field(bad: dict, field: str) -> None:
    with pytest.raises((ValidationError, ValueError), match=field):
        validate_item(ItemRequest(**bad).model_dump())


@pytest.mark.parametrize("mode", ["ab", "interleave"])
def test_experiment_arms_serve_new_items_and_each_arm_keeps_its_own_extension(mode) -> None:
    from dataclasses import replace

    from serving.recommender import ExperimentArms

    served, enc = _text_served()
    challenger = replace(_text_served()[0], version="8")
    core, _ = _core(served, enc)
    core.experiment_arms = ExperimentArms("exp-1", mode, (50.0, 50.0), "salt-1", served, challenger)
    add_item(core, {"item_id": "new-1", "title": "robot space film sequel", "genres": ["Sci-Fi"]})
    answers = [core.recommend(f"u{j}", k=5, history=["i1", "i2", "i3"]) for j in range(8)]
    for answer in answers:
        flagged = {x["item_id"] for x in answer["items"] if x.get("cold_item")}
        assert "new-1" in [x["item_id"] for x in answer["items"]] and flagged == {"new-1"}
    if mode == "ab":
        assert {a["arm"] for a in answers} == {"champion", "challenger"}
    # both arms' extensions stay cached side by side (no rebuild per request)
    assert core.text.current(served) is core.text.current(served)
    assert core.text.current(challenger) is core.text.current(challenger)
    assert core.text.current(served) is not core.text.current(challenger)

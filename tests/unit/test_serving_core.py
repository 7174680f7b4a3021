"""In-process tests of serving/recommender.py (no HTTP): recommend, cold start, similar items, swap."""

from __future__ import annotations

from datetime import datetime

import numpy as np
import pytest
import torch
from fakes import MemoryLog, MemoryOnline
from fakes import tiny_served as _tiny

from models.sasrec import SASRec, SASRecConfig
from models.vocab import ItemVocabulary
from serving.recommender import RecommenderCore, UnknownItemError, build_served


def tiny_served(seed: int = 0, version: str = "1", popularity: dict[str, float] | None = None):
    return _tiny(seed, version, popularity, titles={"i1": "Toy Story"})




@pytest.fixture()
def core() -> RecommenderCore:
    online = MemoryOnline({"u1": ["i1", "i2", "i3", "unknown-item"]})
    return RecommenderCore(tiny_served(), online, MemoryLog(), max_seq_len=8)


def test_recommend_returns_k_distinct_unseen_items_with_version(core: RecommenderCore) -> None:
    out = core.recommend("u1", k=10)
    ids = [x["item_id"] for x in out["items"]]
    assert len(ids) == 10 and len(set(ids)) == 10
    assert not {"i1", "i2", "i3"} & set(ids)
    assert out["model_version"] == "1" and out["strategy"] == "sequential" and out["cold_start"] is False
    scores = [x["score"] for x in out["items"]]
    assert scores == sorted(scores, reverse=True) and np.isfinite(scores).all()


def test_exclude_seen_false_may_return_seen_items(core: RecommenderCore) -> None:
    out = core.recommend("u1", k=50, exclude_seen=False)
    assert len(out["items"]) == 50 and {"i1", "i2", "i3"} <= {x["item_id"] for x in out["items"]}


def test_k_larger_than_catalogue_returns_whole_catalogue_once(core: RecommenderCore) -> None:
    out = core.recommend("u1", k=200)
    assert len(out["items"]) == 47  # 50 items minus 3 seen; padding never returned


def test_unknown_user_gets_popularity_cold_start() -> None:
    pop = {f"i{j}": float(j) for j in range(1, 51)}
    core = RecommenderCore(tiny_served(popularity=pop), MemoryOnline(), MemoryLog(), max_seq_len=8)
    out = core.recommend("nobody", k=3)
    assert out["cold_start"] is True and out["strategy"] == "popularity"
    assert [x["item_id"] for x in out["items"]] == ["i50", "i49", "i48"]


def test_unknown_user_with_history_uses_the_model_on_that_history() -> None:
    core = RecommenderCore(tiny_served(), MemoryOnline(), MemoryLog(), max_seq_len=8)
    out = core.recommend("nobody", k=5, history=["i7", "i8", "not-in-vocab"])
    assert out["cold_start"] is True and out["strategy"] == "history"
    assert not {"i7", "i8"} & {x["item_id"] for x in out["items"]}


def test_titles_fall_back_to_item_id(core: RecommenderCore) -> None:
    out = core.recommend("nobody", k=50, exclude_seen=False)
    by_id = {x["item_id"]: x["title"] for x in out["items"]}
    assert by_id["i1"] == "Toy Story" and by_id["i2"] == "i2"


def test_feedback_changes_next_recommendation(core: RecommenderCore) -> None:
    before = core.recommend("u1", k=10)
    top = before["items"][0]["item_id"]
    ack = core.feedback("u1", top, "click")
    assert ack["inserted"] is True and ack["known_item"] is True
    after = core.recommend("u1", k=10)
    assert top not in [x["item_id"] for x in after["items"]]
    assert [x["score"] for x in after["items"]] != [x["score"] for x in before["items"]]


def test_feedback_is_idempotent_on_event_id_and_keeps_unknown_items(core: RecommenderCore) -> None:
    first = core.feedback("u2", "brand-new-item", "view", event_id="e1")
    again = core.feedback("u2", "brand-new-item", "view", event_id="e1")
    assert first["inserted"] is True and again["inserted"] is False
    assert first["known_item"] is False
    assert core.online.recent_items("u2") == ["brand-new-item"]
    assert len(core.events.rows) == 1


def test_similar_items_by_cosine_excludes_the_item_itself(core: RecommenderCore) -> None:
    out = core.similar_items("i5", k=5)
    ids = [x["item_id"] for x in out["items"]]
    assert len(ids) == 5 and "i5" not in ids
    emb = torch.nn.functional.normalize(core.served.model.item_emb.weight.detach(), dim=1)
    sims = (emb[1:] @ emb[5]).numpy()
    sims[4] = -np.inf
    assert ids[0] == f"i{int(np.argmax(sims)) + 1}"
    with pytest.raises(UnknownItemError, match="nope"):
        core.similar_items("nope")


def test_swap_replaces_the_served_version_atomically(core: RecommenderCore) -> None:
    core.swap(tiny_served(seed=1, version="2"))
    assert core.recommend("u1", k=3)["model_version"] == "2"


def test_build_served_rejects_a_model_whose_width_does_not_match_the_vocab() -> None:
    torch.manual_seed(0)
    model = SASRec(SASRecConfig(n_items=40, max_seq_len=8, d_model=16, dropout=0.0))
    with pytest.raises(ValueError, match="smoke score failed"):
        build_served(model, ItemVocabulary([f"i{j}" for j in range(1, 51)]), "9")


def test_request_guard_checks_api_key_and_body_size(monkeypatch: pytest.MonkeyPatch) -> None:
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse
    from starlette.routing import Route
    from starlette.testclient import TestClient

    from recloop.settings import get_settings
    from serving.service import RequestGuard

    async def echo(request):
        return JSONResponse({"n": len(await request.body())})

    monkeypatch.setenv("RECLOOP_API_KEY", "s3cret")
    get_settings.cache_clear()
    app = Starlette(routes=[Route("/recommend", echo, methods=["POST"]), Route("/readyz", echo)])
    client = TestClient(RequestGuard(app, max_body_bytes=100), base_url="http://127.0.0.1")
    try:
        assert client.post("/recommend", content=b"{}").status_code == 401
        assert client.post("/recommend", content=b"{}", headers={"X-API-Key": "wrong"}).status_code == 401
        ok = client.post("/recommend", content=b"{}", headers={"X-API-Key": "s3cret"})
        assert ok.status_code == 200 and ok.json() == {"n": 2}
        big = client.post("/recommend", content=b"x" * 101, headers={"X-API-Key": "s3cret"})
        assert big.status_code == 413 and "exceeds" in big.json()["error"]
        assert client.get("/readyz").status_code == 200  # probes stay open
    finally:
        get_settings.cache_clear()


def test_bento_build_recipe_drops_torch_and_pins_the_version() -> None:
    import yaml

    from serving.bento_build import BENTOFILE, PROJECT_ROOT, pin_bentofile, requirements_without_torch

    reqs = requirements_without_torch("a==1\n    # via x\ntorch==2.13.0+cpu\ntorchvision==0.1\nb==2\n")
    assert reqs.split() == ["a==1", "torchvision==0.1", "b==2"]
    text = (PROJECT_ROOT / BENTOFILE).read_text()
    assert "/work" not in text and "lock_packages: false" in text
    pinned = yaml.safe_load(pin_bentofile(text, "7"))
    assert pinned["labels"]["model_version"] == "7"
    assert {"name": "RECLOOP_SERVE_MODEL_VERSION", "value": "7"} in pinned["envs"]


def test_feedback_appends_to_the_lake_history_instead_of_replacing_it() -> None:
    from datetime import UTC, timedelta

    lake_ts = datetime(2024, 1, 1, tzinfo=UTC)
    online = MemoryOnline({"u1": ["i1", "i2", "i3"]})
    log = MemoryLog()
    base = {"u1": (["i1", "i2", "i3"], lake_ts)}
    core = RecommenderCore(tiny_served(), online, log, max_seq_len=4, base_history=base)
    # An event the lake already holds (ingested by the loop) must not be counted twice.
    log.append_and_recent({"event_id": "old", "user_id": "u1", "item_id": "i3", "timestamp": lake_ts}, 4)
    core.feedback("u1", "i9", "click", timestamp=lake_ts + timedelta(days=1))
    assert online.rows["u1"] == ["i1", "i2", "i3", "i9"]
    core.feedback("u1", "i10", "click", timestamp=lake_ts + timedelta(days=2))
    assert online.rows["u1"] == ["i2", "i3", "i9", "i10"]  # the last max_seq_len items, oldest first
    assert "i10" not in {x["item_id"] for x in core.recommend("u1", k=10)["items"]}


def test_feedback_retry_with_same_event_id_and_no_timestamp_is_idempotent(tmp_path) -> None:
    from recloop.eventlog import EventLog

    log = EventLog(f"sqlite:///{tmp_path / 'log.db'}")
    core = RecommenderCore(tiny_served(), MemoryOnline(), log, max_seq_len=8)
    first = core.feedback("u9", "i5", "click", event_id="retry-1")
    again = core.feedback("u9", "i5", "click", event_id="retry-1")  # e.g. the client timed out and retried
    assert first["inserted"] is True and again["inserted"] is False
    assert log.count() == 1 and log.get("retry-1")["item_id"] == "i5"
    with pytest.raises(ValueError, match="different content"):
        core.feedback("u9", "i6", "click", event_id="retry-1")  # a real conflict is still refused

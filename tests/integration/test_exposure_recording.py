"""The serving core records every answer as an exposure (SQLite and PostgreSQL), off the request path."""

from __future__ import annotations

import threading
import uuid
from pathlib import Path

import pytest
from fakes import MemoryOnline, tiny_served

from recloop.eventlog import EventLog
from recloop.exposures import ExposureLog
from recloop.settings import Settings
from serving.recommender import RecommenderCore


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def stores(request: pytest.FixtureRequest, tmp_path: Path):
    url = f"sqlite:///{tmp_path / 'log.db'}" if request.param == "sqlite" else Settings().postgres_url
    table = f"events_exp_{uuid.uuid4().hex[:8]}"
    try:
        log = EventLog(url, table_name=table)
    except Exception as err:  # noqa: BLE001
        pytest.skip(f"database not reachable: {err}")
    exposures = ExposureLog(url, events_table=table, flush_interval_s=0.05)
    yield log, exposures
    exposures.close()
    log.drop()
    log.close()


def test_1000_recommends_give_1000_exposures_with_their_items(stores) -> None:
    log, exposures = stores
    core = RecommenderCore(tiny_served(), MemoryOnline({"u0": ["i1", "i2", "i3"]}), log, max_seq_len=8,
                           exposures=exposures, variant="champion")
    answers: list[dict] = []
    lock = threading.Lock()

    def client(c: int) -> None:  # 8 concurrent callers, 125 answers each
        for j in range(125):
            out = core.recommend(f"u{(c * 125 + j) % 50}", k=4)
            with lock:
                answers.append(out)

    threads = [threading.Thread(target=client, args=(c,)) for c in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert exposures.flush(timeout_s=30)
    shown, items = exposures.read()
    assert len(answers) == 1000 and len(shown) == 1000
    assert set(shown["request_id"]) == {a["request_id"] for a in answers}  # distinct, one row each
    assert len(items) == 4000
    by_request = {rid: g.sort_values("position") for rid, g in items.groupby("request_id")}
    for a in answers[::37]:
        rows = by_request[a["request_id"]]
        assert rows["position"].tolist() == [1, 2, 3, 4]
        assert rows["item_id"].tolist() == [x["item_id"] for x in a["items"]]
        assert rows["score"].round(5).tolist() == [round(x["score"], 5) for x in a["items"]]
    row = shown.set_index("request_id").loc[next(a["request_id"] for a in answers if a["strategy"] == "sequential")]
    assert row["context"] == ["i1", "i2", "i3"] and row["variant"] == "champion" and row["model_version"] == "1"
    assert row["policy"] == "greedy" and (row["experiment_id"] is None or row["experiment_id"] != row["experiment_id"])
    assert exposures.stats()["dropped"] == 0


def test_feedback_with_a_request_id_joins_its_exposure(stores) -> None:
    log, exposures = stores
    core = RecommenderCore(tiny_served(), MemoryOnline(), log, max_seq_len=8, exposures=exposures)
    answer = core.recommend("u1", k=5)
    second = answer["items"][1]["item_id"]
    core.feedback("u1", second, "click", request_id=answer["request_id"], position=2)
    core.feedback("u1", "i49", "view")  # no link
    assert exposures.flush(timeout_s=10)
    _, items = exposures.read()
    linked = log.linked()
    assert linked[["request_id", "position", "item_id", "event_type"]].values.tolist() == [
        [answer["request_id"], 2, second, "click"]]
    joined = linked.merge(items, on=["request_id", "item_id"], suffixes=("_event", "_shown"))
    assert joined["position_shown"].tolist() == [2]
    # the next answer records what serving masked (revision 0005): the click, the view and a skipped item,
    # which is suppressed but never in the history the model scored (the exposure's context)
    skipped = answer["items"][0]["item_id"]
    core.feedback("u1", skipped, "skip", request_id=answer["request_id"], position=1)
    after = core.recommend("u1", k=5)
    assert exposures.flush(timeout_s=10)
    shown, _ = exposures.read()
    row = shown.set_index("request_id").loc[after["request_id"]]
    assert row["masked"] == sorted({second, "i49", skipped}) and skipped not in row["context"]
    assert shown.set_index("request_id").loc[answer["request_id"], "masked"] == []  # nothing consumed yet


def test_without_an_exposure_log_nothing_is_recorded_and_the_answer_still_has_an_id(tmp_path: Path) -> None:
    core = RecommenderCore(tiny_served(), MemoryOnline(), EventLog(f"sqlite:///{tmp_path / 'l.db'}"), max_seq_len=8)
    out = core.recommend("u1", k=3)
    assert len(out["request_id"]) == 32 and core.exposures is None

"""Serving with an online experiment: A/B routing by the stored hash, team-draft interleaving, pick-up
of start/stop by the watcher, and champion-only serving when none runs (no experiment fields)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import pytest
from fakes import MemoryLog, MemoryOnline, tiny_served

from recloop.experiments import assign_arm
from recloop.settings import Settings
from serving import runtime as runtime_mod
from serving.recommender import ExperimentArms, RecommenderCore
from serving.runtime import ChampionWatcher, Runtime


class Sink:
    def __init__(self) -> None:
        self.rows: list[dict[str, Any]] = []

    def record(self, request_id: str, user_id: str, model_version: str, items: list, **kw: Any) -> bool:
        self.rows.append({"request_id": request_id, "user_id": user_id, "model_version": model_version,
                          "items": [i for i, _ in items], **kw})
        return True


def _core(sink: Sink | None = None) -> RecommenderCore:
    histories = {f"u{j}": [f"i{1 + (j * 7 + t) % 50}" for t in range(5)] for j in range(200)}
    return RecommenderCore(tiny_served(seed=0, version="1"), MemoryOnline(histories), MemoryLog(), max_seq_len=8,
                           exposures=sink, variant="champion")


def _arms(mode: str, weights=(50.0, 50.0)) -> ExperimentArms:
    return ExperimentArms("exp-1", mode, weights, "salt-1", tiny_served(seed=0, version="1"),
                          tiny_served(seed=1, version="2"))


def test_ab_routes_each_user_to_its_hashed_arm_and_records_it() -> None:
    sink = Sink()
    core = _core(sink)
    core.experiment_arms = _arms("ab")
    arms_seen = {}
    for _rep in range(2):
        for j in range(200):
            out = core.recommend(f"u{j}", k=5)
            arm = assign_arm("salt-1", f"u{j}", (50.0, 50.0))
            assert out["arm"] == arm and out["experiment_id"] == "exp-1"
            assert out["model_version"] == ("1" if arm == "champion" else "2")
            assert arms_seen.setdefault(f"u{j}", arm) == arm  # a user stays in one arm
    assert 60 < sum(a == "champion" for a in arms_seen.values()) < 140
    assert all(r["experiment_id"] == "exp-1" and r["arm"] in ("champion", "challenger") for r in sink.rows)
    assert all(r["teams"] is None for r in sink.rows)


def test_interleaving_merges_both_lists_and_tags_every_slot() -> None:
    sink = Sink()
    core = _core(sink)
    arms = _arms("interleave")
    core.experiment_arms = None
    single_a = RecommenderCore(arms.champion, core.online, MemoryLog(), max_seq_len=8)
    single_b = RecommenderCore(arms.challenger, core.online, MemoryLog(), max_seq_len=8)
    core.experiment_arms = arms
    for j in range(50):
        user = f"u{j}"
        out = core.recommend(user, k=6)
        ids = [x["item_id"] for x in out["items"]]
        teams = [x["team"] for x in out["items"]]
        assert out["arm"] == "interleaved" and len(ids) == len(set(ids)) == 6
        own_a = [x["item_id"] for x in single_a.recommend(user, k=6)["items"]]
        own_b = [x["item_id"] for x in single_b.recommend(user, k=6)["items"]]
        for team, own in (("champion", own_a), ("challenger", own_b)):
            mine = [i for i, t in zip(ids, teams, strict=True) if t == team]
            assert mine == [i for i in own if i in mine]  # each team keeps its own order
            assert set(mine) <= set(own)
        assert abs(teams.count("champion") - teams.count("challenger")) <= 1
        assert sink.rows[-1]["teams"] == teams and sink.rows[-1]["arm"] == "interleaved"
    core.experiment_arms = None  # stop: the champion alone, no experiment fields
    out = core.recommend("u1", k=5)
    assert "experiment_id" not in out and "arm" not in out and out["model_version"] == "1"
    assert sink.rows[-1]["experiment_id"] is None


@dataclass
class Exp:
    experiment_id: str
    mode: str
    champion_version: str
    challenger_version: str
    weights: tuple = (50.0, 50.0)
    salt: str = "s"
    status: str = "running"
    started_at: datetime = field(default_factory=lambda: datetime.now(UTC))


class Store:
    def __init__(self) -> None:
        self.current: Exp | None = None
        self.fail = False

    def active(self) -> Exp | None:
        if self.fail:
            raise ConnectionError("store down")
        return self.current


def test_the_watcher_picks_up_start_and_stop_and_never_routes_to_an_arm_that_does_not_load(monkeypatch) -> None:
    core = _core()
    store = Store()
    rt = Runtime(Settings(), None, core, {}, {}, "1", None, store)
    watcher = ChampionWatcher(rt)
    loads: list[str] = []

    def load(settings, client, version, titles, popularity, *_):
        loads.append(version)
        if version == "9":
            raise RuntimeError("broken artifact")
        return tiny_served(seed=int(version), version=version)

    monkeypatch.setattr(runtime_mod, "served_from_registry", load)
    assert watcher.poll_experiment() is False and core.experiment_arms is None
    store.current = Exp("exp-a", "ab", "1", "2")
    assert watcher.poll_experiment() is True
    assert core.experiment_arms.champion is core.served and core.experiment_arms.challenger.version == "2"
    assert loads == ["2"]  # the served champion is reused
    assert watcher.info().experiment["experiment_id"] == "exp-a"
    assert watcher.poll_experiment() is False and loads == ["2"]  # unchanged: nothing reloaded
    store.fail = True  # a store outage keeps the routing
    assert watcher.poll_experiment() is False and core.experiment_arms.experiment_id == "exp-a"
    store.fail = False
    store.current = None
    assert watcher.poll_experiment() is True and core.experiment_arms is None
    store.current = Exp("exp-b", "interleave", "1", "9")
    assert watcher.poll_experiment() is False and core.experiment_arms is None
    assert watcher.status()[0] == "degraded" and "exp-b" in watcher.status()[1]
    store.current = None
    watcher.poll_experiment()
    assert watcher.experiment_error is None


@pytest.mark.parametrize("mode", ["ab", "interleave"])
def test_exclude_seen_holds_in_every_mode(mode: str) -> None:
    core = _core()
    core.experiment_arms = _arms(mode)
    for j in range(30):
        out = core.recommend(f"u{j}", k=10)
        assert not {x["item_id"] for x in out["items"]} & set(core.online.rows[f"u{j}"])


def test_each_arm_reranks_with_its_own_setting_and_a_request_value_wins() -> None:
    core = _core()
    champion, challenger = tiny_served(seed=0, version="1"), tiny_served(seed=1, version="2")
    core.experiment_arms = ExperimentArms("exp-1", "ab", (50.0, 50.0), "salt-1", champion, challenger,
                                          rerank=(None, ("dpp", 0.9)))
    users = {arm: next(f"u{j}" for j in range(200) if assign_arm("salt-1", f"u{j}", (50.0, 50.0)) == arm)
             for arm in ("champion", "challenger")}
    plain = _core()
    plain.experiment_arms = ExperimentArms("exp-1", "ab", (50.0, 50.0), "salt-1", champion, challenger)

    def ids(out: dict) -> list[str]:
        return [x["item_id"] for x in out["items"]]

    out = core.recommend(users["challenger"], k=10)
    assert out["arm"] == "challenger" and out["reranker"] == "dpp:theta=0.1"
    baseline = plain.recommend(users["challenger"], k=10)
    assert baseline["reranker"] is None and ids(out) != ids(baseline)
    assert len(set(ids(out))) == 10
    # The champion's arm has no setting: today's answer.
    assert core.recommend(users["champion"], k=10)["reranker"] is None
    assert ids(core.recommend(users["champion"], k=10)) == ids(plain.recommend(users["champion"], k=10))
    # A request's own diversity wins over its arm's (0 = off), and its reranker keeps the arm's diversity.
    assert core.recommend(users["challenger"], k=10, diversity=0.0)["reranker"] is None
    assert core.recommend(users["challenger"], k=10, reranker="mmr")["reranker"] == "mmr:lambda=0.9"
    # Interleaving re-ranks each arm's list with its own setting before the merge.
    core.experiment_arms = dataclasses.replace(core.experiment_arms, mode="interleave")
    merged = core.recommend(users["champion"], k=10)
    assert merged["arm"] == "interleaved" and len(set(ids(merged))) == 10
    assert core.experiment_arms.describe()["rerank"] == [None, "dpp:0.9"]

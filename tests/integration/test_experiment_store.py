"""The online experiments table (``recloop.experiments.ExperimentStore``) on SQLite and PostgreSQL.

Lifecycle (start → active → stop → conclude), one running experiment at a time (also under concurrent
starts from threads, each with its own store as separate processes would have), and the result JSON.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest
from conftest import LogDb

from recloop.experiments import (
    ExperimentConflict,
    ExperimentStore,
    NoRunningExperiment,
    UnknownExperiment,
    parse_rerank,
)

T0 = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)


Db = LogDb


@pytest.fixture
def db(log_db: LogDb) -> LogDb:
    """The shared event-log database fixture (tests/conftest.py)."""
    return log_db


@pytest.fixture()
def store(db: Db) -> Iterator[ExperimentStore]:
    s = ExperimentStore(db.url, events_table=db.events_table)
    yield s
    s.close()


def test_lifecycle_start_active_stop_conclude(store: ExperimentStore) -> None:
    assert store.active() is None and store.latest() is None and store.list() == []
    with pytest.raises(NoRunningExperiment):
        store.stop()
    exp = store.start(mode="ab", champion_version="3", challenger_version="4", weights=(90, 10), now=T0)
    assert exp.experiment_id.startswith("exp-") and len(exp.experiment_id) == 16
    assert (exp.status, exp.weights, exp.started_at) == ("running", (90.0, 10.0), T0)
    assert len(exp.salt) == 32 and exp.stopped_at is None and exp.result is None
    assert store.active() == exp == store.get(exp.experiment_id) == store.latest()
    assert store.active().started_at.tzinfo is not None

    stopped = store.stop(now=T0 + timedelta(hours=1))
    assert stopped.status == "stopped" and stopped.stopped_at == T0 + timedelta(hours=1)
    assert store.active() is None and store.latest() == stopped
    with pytest.raises(NoRunningExperiment):
        store.stop()
    with pytest.raises(ExperimentConflict, match="stopped"):
        store.stop(exp.experiment_id)

    result = {"decision": {"winner": "challenger", "test": "z", "p_value": 0.01, "reason": "better", "effect": 0.02},
              "arms": {"champion": {"ctr": 0.1, "n": 1000}, "challenger": {"ctr": 0.12, "n": 998}},
              "nan": float("nan"), "pair": (1, 2), "unicode": "Δ ctr"}
    done = store.conclude(exp.experiment_id, result, now=T0 + timedelta(hours=2))
    assert done.status == "concluded" and done.concluded_at == T0 + timedelta(hours=2)
    assert done.stopped_at == T0 + timedelta(hours=1)  # kept from the stop
    expected = {**result, "nan": None, "pair": [1, 2]}
    assert done.result == expected and store.get(exp.experiment_id).result == expected
    assert store.get(exp.experiment_id).as_dict()["result"] == expected
    with pytest.raises(ExperimentConflict, match="concluded already"):
        store.conclude(exp.experiment_id, {})
    with pytest.raises(UnknownExperiment):
        store.conclude("exp-nope", {})
    with pytest.raises(UnknownExperiment):
        store.stop("exp-nope")


def test_a_running_experiment_can_be_concluded_directly_and_a_new_one_started(store: ExperimentStore) -> None:
    first = store.start(mode="interleave", champion_version="1", challenger_version="2", salt="fixed", now=T0)
    assert first.salt == "fixed" and first.mode == "interleave"
    done = store.conclude(first.experiment_id, {"decision": {"winner": None}}, now=T0 + timedelta(minutes=5))
    assert done.status == "concluded" and done.stopped_at == done.concluded_at == T0 + timedelta(minutes=5)
    assert store.active() is None
    second = store.start(mode="ab", champion_version="2", challenger_version="5", now=T0 + timedelta(hours=1))
    assert store.active() == second and [e.experiment_id for e in store.list()] == [second.experiment_id,
                                                                                    first.experiment_id]
    assert store.list(limit=1) == [second] and store.latest() == second


def test_a_second_start_is_refused_while_one_runs(store: ExperimentStore) -> None:
    running = store.start(mode="ab", champion_version="1", challenger_version="2")
    with pytest.raises(ExperimentConflict, match=running.experiment_id):
        store.start(mode="interleave", champion_version="1", challenger_version="3")
    assert store.list() == [running]


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"mode": "bandit"}, "mode"),
    ({"weights": (0, 100)}, "weights"),
    ({"weights": (float("inf"), 1)}, "weights"),
    ({"weights": (1, 2, 3)}, "weights"),
    ({"challenger_version": "1"}, "same version"),
    ({"champion_version": " "}, "champion_version"),
])
def test_bad_definitions_are_refused(store: ExperimentStore, kwargs: dict, match: str) -> None:
    args = {"mode": "ab", "champion_version": "1", "challenger_version": "2", **kwargs}
    with pytest.raises(ValueError, match=match):
        store.start(**args)
    assert store.active() is None


def test_exploration_per_arm_is_validated_stored_and_round_trips(store: ExperimentStore) -> None:
    from models.exploration import ExplorationPolicy

    parse = ExplorationPolicy.parse
    plain = store.start(mode="ab", champion_version="1", challenger_version="2", now=T0)
    assert plain.exploration == (None, None) and store.active().exploration == (None, None)
    assert plain.as_dict()["exploration"] == [None, None]
    store.conclude(plain.experiment_id, {})
    exp = store.start(mode="ab", champion_version="1", challenger_version="2", now=T0,
                      exploration=(" epsilon:0.1 ", "plackett_luce:tau=0.5,n=50"), parse_exploration=parse)
    assert exp.exploration == ("epsilon:0.1", "plackett_luce:tau=0.5,n=50")
    assert store.active() == exp and store.active().exploration == exp.exploration
    assert store.get(exp.experiment_id).exploration == exp.exploration
    assert exp.as_dict()["exploration"] == ["epsilon:0.1", "plackett_luce:tau=0.5,n=50"]
    assert type(exp).from_dict(exp.as_dict()) == exp
    assert type(exp).from_dict({k: v for k, v in exp.as_dict().items() if k != "exploration"}).exploration == (
        None, None)  # a dict written before per-arm exploration existed
    stopped = store.stop()
    assert stopped.exploration == exp.exploration
    store.conclude(exp.experiment_id, {})
    one = store.start(mode="ab", champion_version="1", challenger_version="2", exploration=("", "greedy"),
                      parse_exploration=parse)
    assert one.exploration == (None, "greedy")  # "" is the service's policy, as None


@pytest.mark.parametrize(("exploration", "match"), [
    (("epsilon:1.5", None), "champion.*epsilon"),
    ((None, "softmax:1"), "challenger"),
    ((None, "plackett_luce:tau=0"), "challenger.*temperature"),
    (("epsilon:" + "1" * 70, None), "64 printable"),
    (("epsilon:0.1",), "champion, challenger"),
])
def test_a_bad_exploration_is_refused(store: ExperimentStore, exploration: tuple, match: str) -> None:
    from models.exploration import ExplorationPolicy

    with pytest.raises(ValueError, match=match):
        store.start(mode="ab", champion_version="1", challenger_version="2", exploration=exploration,
                    parse_exploration=ExplorationPolicy.parse)
    assert store.active() is None
    if exploration == (None, "softmax:1"):  # without a parser, the kernel still checks the policy's name
        with pytest.raises(ValueError, match="challenger"):
            store.start(mode="ab", champion_version="1", challenger_version="2", exploration=exploration)


def test_rerank_per_arm_is_validated_normalised_stored_and_round_trips(store: ExperimentStore) -> None:
    plain = store.start(mode="ab", champion_version="1", challenger_version="2", now=T0)
    assert plain.rerank == (None, None) and plain.as_dict()["rerank"] == [None, None]
    store.conclude(plain.experiment_id, {})
    exp = store.start(mode="interleave", champion_version="1", challenger_version="2", now=T0,
                      rerank=(None, " MMR:0.30 "))
    assert exp.rerank == (None, "mmr:0.3")
    assert store.active() == exp and store.get(exp.experiment_id).rerank == (None, "mmr:0.3")
    assert type(exp).from_dict(exp.as_dict()) == exp
    assert type(exp).from_dict({k: v for k, v in exp.as_dict().items() if k != "rerank"}).rerank == (None, None)
    store.conclude(exp.experiment_id, {})
    assert parse_rerank("dpp:1") == ("dpp", 1.0) and parse_rerank(" mmr:0 ") == ("mmr", 0.0)


@pytest.mark.parametrize(("rerank", "match"), [
    (("mmr:1.5", None), "champion.*\\[0, 1\\]"),
    ((None, "mmr"), "challenger.*METHOD:DIVERSITY"),
    ((None, "random:0.2"), "challenger.*METHOD"),
    (("dpp:nan", None), "champion.*\\[0, 1\\]"),
    (("dpp:lots", None), "not a number"),
    (("mmr:0." + "1" * 70, None), "64 printable"),
    (("mmr:0.1",), "champion, challenger"),
])
def test_a_bad_rerank_is_refused(store: ExperimentStore, rerank: tuple, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        store.start(mode="ab", champion_version="1", challenger_version="2", rerank=rerank)
    assert store.active() is None


def test_two_concurrent_starts_exactly_one_succeeds(db: Db, store: ExperimentStore) -> None:
    n = 4
    barrier = threading.Barrier(n)
    started: list[str] = []
    refused: list[BaseException] = []
    errors: list[BaseException] = []

    def run(k: int) -> None:
        own = ExperimentStore(db.url, events_table=db.events_table)  # as another process would
        try:
            barrier.wait()
            started.append(own.start(mode="ab", champion_version="1", challenger_version=str(k + 2)).experiment_id)
        except ExperimentConflict as err:
            refused.append(err)
        except BaseException as err:  # noqa: BLE001 - reported below
            errors.append(err)
        finally:
            own.close()

    threads = [threading.Thread(target=run, args=(k,)) for k in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors, errors
    assert len(started) == 1 and len(refused) == n - 1
    assert [e.experiment_id for e in store.list()] == started
    assert store.active().experiment_id == started[0]


def test_the_cli_refuses_a_bad_exploration_before_touching_anything() -> None:
    from typer.testing import CliRunner

    from cli.main import app

    out = CliRunner().invoke(app, ["experiment", "start", "--challenger", "2", "--explore-challenger", "epsilon:2"])
    assert out.exit_code == 2 and "--explore-challenger" in out.output and "epsilon" in out.output

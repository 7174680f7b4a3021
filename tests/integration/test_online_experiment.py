"""Online experiments end to end: `recloop experiment ...`, the conclusion and promotion, the paused auto-promotion.

One temporary home (SQLite event log, SQLite MLflow registry) with a tiny trained SASRec registered three
times: version 1 (the champion), 2 (a challenger), 3 (a challenger tagged ``gate.decision=fail``). The
CLI scenario runs the real analysis (``recloop.experiment_analysis``) on exposures and clicks written to
the logs, and the winning challenger's promotion runs the real fresh-process load check (~8 s). The other
tests stub the analysis or the load check. The tests share the registry and run in file order.
"""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import mlflow
import pytest
from fakes import tiny_checkpoint
from typer.testing import CliRunner

from recloop.settings import get_settings

N_ITEMS = 30


def _tiny_checkpoint(path: Path) -> Path:
    return tiny_checkpoint(path, N_ITEMS)


@pytest.fixture(scope="module")
def reg(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """Versions 1, 2 and 3 (gate failed) of one tiny model; the champion alias on 1."""
    from registry import aliases
    from registry.store import log_model
    from registry.tracking import configure_tracking, ensure_experiment

    home = tmp_path_factory.mktemp("experiment") / "home"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RECLOOP_HOME", str(home))
        for var in ("RECLOOP_MLFLOW_TRACKING_URI", "RECLOOP_MODEL_ALIAS", "RECLOOP_EVENT_LOG_URL",
                    "RECLOOP_PROFILE"):
            mp.delenv(var, raising=False)
        get_settings.cache_clear()
        settings = get_settings()
        client = configure_tracking(settings)
        ckpt = _tiny_checkpoint(home / "tiny.pt")
        with mlflow.start_run(experiment_id=ensure_experiment(client, settings=settings)) as run:
            for _ in range(3):
                log_model(ckpt, registered_model_name=settings.model_name)
        name = settings.model_name
        client.set_model_version_tag(name, "3", "gate.decision", "fail")
        client.set_model_version_tag(name, "3", "gate.reasons", "candidate ndcg@10 below the champion's")
        aliases.promote(client, name, "1", alias=settings.model_alias, reason="test")
        yield {"settings": settings, "client": client, "name": name, "home": home, "run_id": run.info.run_id}
        get_settings.cache_clear()


def _cli(*args: str) -> Any:
    from cli.main import app

    return CliRunner().invoke(app, ["experiment", *args])


def _alias(reg: dict[str, Any]) -> str | None:
    from registry.aliases import get_alias_version

    return get_alias_version(reg["client"], reg["name"], "champion")


def _tags(reg: dict[str, Any], version: str) -> dict[str, str]:
    return reg["client"].get_model_version(reg["name"], version).tags


def _serve(experiment: dict[str, Any], n_users: int = 240) -> None:
    """What serving would log during an A/B test: 3 answers per user from their arm's version, and clicks
    (the challenger's lists are clicked 50% of the time, the champion's 20%)."""
    from recloop.eventlog import EventLog
    from recloop.experiments import OnlineExperiment
    from recloop.exposures import ExposureLog

    exp = OnlineExperiment.from_dict(experiment)
    uri = get_settings().event_log_uri
    rng = random.Random(7)
    clicks = []
    with ExposureLog(uri) as log:
        for k in range(n_users):
            user = f"user{k}"
            arm = exp.arm_of(user)
            for r in range(3):
                request_id = f"req-{k}-{r}"
                ts = exp.started_at + timedelta(seconds=k + r / 10)
                log.record(request_id, user, exp.version_of(arm), [("i1", 0.9), ("i2", 0.5), ("i3", 0.1)],
                           variant=arm, experiment_id=exp.experiment_id, arm=arm, ts=ts)
                if rng.random() < (0.5 if arm == "challenger" else 0.2):
                    clicks.append({"user_id": user, "item_id": "i2", "event_type": "click",
                                   "timestamp": ts + timedelta(seconds=1), "request_id": request_id, "position": 2})
        assert log.flush()
    events = EventLog(uri)
    try:
        events.append(clicks)
    finally:
        events.close()


def test_cli_lifecycle_start_status_stop_conclude_promotes_the_winner(reg: dict[str, Any]) -> None:
    from flows.evaluate import auto_promotion_blocked, promote_unless_blocked

    # Nothing to show, stop or conclude yet: exit 1, a message on stderr, nothing on stdout.
    for args in (("status", "--json"), ("stop", "--json"), ("conclude", "--json")):
        out = _cli(*args)
        assert out.exit_code == 1 and out.stdout == "" and "no online experiment" in out.stderr, (args, out.output)
    # Bad starts.
    unknown = _cli("start", "--challenger", "9", "--json")
    assert unknown.exit_code == 1 and "unknown version" in unknown.stderr and unknown.stdout == ""
    assert _cli("start", "--challenger", "@nope").exit_code == 1
    same = _cli("start", "--challenger", "@champion")
    assert same.exit_code == 2 and "is the champion" in same.stderr
    assert _cli("start", "--challenger", "2", "--weights", "0,1").exit_code == 2
    assert _cli("start", "--challenger", "2", "--mode", "bandit").exit_code == 2

    started = _cli("start", "--challenger", "2", "--mode", "ab", "--weights", "60,40", "--explore-challenger",
                   "epsilon:0.1", "--json")
    assert started.exit_code == 0, started.output
    experiment = json.loads(started.stdout)
    assert (experiment["champion_version"], experiment["challenger_version"]) == ("1", "2")
    assert experiment["exploration"] == [None, "epsilon:0.1"]
    assert experiment["weights"] == [60.0, 40.0] and experiment["status"] == "running"
    again = _cli("start", "--challenger", "3")
    assert again.exit_code == 1 and experiment["experiment_id"] in again.stderr

    # The loop's automatic promotion pauses: the alias stays and the skip is tagged.
    reason = auto_promotion_blocked(reg["settings"])
    assert reason == f"online experiment {experiment['experiment_id']} running"
    log = logging.getLogger("test")
    assert promote_unless_blocked(reg["client"], reg["settings"], reg["run_id"], "3", log) is False
    assert _alias(reg) == "1" and _tags(reg, "3")["promotion.skipped"] == reason
    assert reg["client"].get_run(reg["run_id"]).data.tags["promotion.skipped"] == reason

    _serve(experiment)
    status = _cli("status", "--json")
    assert status.exit_code == 0, status.output
    shown = json.loads(status.stdout)
    assert shown["experiment"]["experiment_id"] == experiment["experiment_id"]
    report = shown["report"]
    assert report["mode"] == "ab" and report["decision"]["winner"] == "challenger", report["decision"]
    assert report["arms"]["champion"]["model_versions"] == ["1"]
    assert report["arms"]["challenger"]["users"] + report["arms"]["champion"]["users"] == 240

    stopped = _cli("stop", "--json")
    assert stopped.exit_code == 0 and json.loads(stopped.stdout)["status"] == "stopped"
    assert auto_promotion_blocked(reg["settings"]) is None

    concluded = _cli("conclude", "--json")  # the real fresh-process load check of version 2
    assert concluded.exit_code == 0, concluded.output
    out = json.loads(concluded.stdout)
    assert out["promoted"] is True and out["alias_version"] == "2" and _alias(reg) == "2"
    assert out["experiment"]["status"] == "concluded"
    assert out["experiment"]["result"]["decision"] == out["report"]["decision"]
    assert out["experiment"]["result"]["conclusion"]["promoted"] is True
    for version, arm in (("1", "champion"), ("2", "challenger")):
        tags = _tags(reg, version)
        assert tags["experiment.id"] == experiment["experiment_id"] and tags["experiment.arm"] == arm
        assert tags["experiment.mode"] == "ab" and tags["experiment.winner"] == "challenger"
        assert tags["experiment.test"].startswith("mSPRT") and float(tags["experiment.p_value"]) < 0.05
        assert float(tags["experiment.effect"]) > 0 and tags["experiment.forced"] == "false"
        assert datetime.fromisoformat(tags["experiment.decided_at"]).tzinfo is not None
    tags = _tags(reg, "2")
    assert tags["load_check"] == "pass" and tags["forced"] == "false"
    assert tags["promoted_by"] == f"online experiment {experiment['experiment_id']}"

    after = _cli("status", "--json")
    assert after.exit_code == 0 and json.loads(after.stdout)["experiment"]["status"] == "concluded"
    assert json.loads(after.stdout)["report"]["conclusion"]["alias_version"] == "2"
    nothing = _cli("conclude")
    assert nothing.exit_code == 1 and "concluded" in nothing.stderr


def _decide(monkeypatch: pytest.MonkeyPatch, winner: str | None) -> None:
    import flows.experiment as fe

    def analyse(experiment: Any, exposures: Any, items: Any, events: Any, policy: Any) -> dict[str, Any]:
        return {"mode": experiment.mode, "decision": {"winner": winner, "test": "sign test", "p_value": 0.001,
                                                      "reason": "stub", "effect": 0.2}}

    monkeypatch.setattr(fe, "analyse_experiment", analyse)


def _passing_load_check(tracking_uri: str, name: str, version: str, **_: Any) -> Any:
    from registry.aliases import LoadCheck

    return LoadCheck(str(version), True)


def test_a_gate_failed_challenger_needs_force_and_the_force_is_tagged(reg: dict[str, Any],
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    from flows.experiment import conclude_experiment
    from recloop.experiments import ExperimentStore
    from registry.aliases import PromotionRefused

    settings = reg["settings"]
    assert _alias(reg) == "2"
    started = _cli("start", "--challenger", "3", "--mode", "interleave", "--json")
    assert started.exit_code == 0, started.output
    exp_id = json.loads(started.stdout)["experiment_id"]
    _decide(monkeypatch, "challenger")
    with pytest.raises(PromotionRefused, match="failed the evaluation gate"):
        conclude_experiment(settings, load_check=_passing_load_check)
    with ExperimentStore(settings.event_log_uri) as store:
        assert store.get(exp_id).status == "stopped"  # not concluded: it can be concluded again with force
    assert _alias(reg) == "2" and "experiment.id" not in _tags(reg, "3")
    refused = _cli("conclude")  # the CLI says so too (refused before any load check)
    assert refused.exit_code == 1 and "--force" in refused.stderr and "failed the evaluation gate" in refused.stderr

    out = conclude_experiment(settings, force=True, load_check=_passing_load_check)
    assert out["promoted"] is True and out["alias_version"] == "3" and _alias(reg) == "3"
    tags = _tags(reg, "3")
    assert tags["forced"] == "true" and tags["experiment.forced"] == "true" and tags["experiment.arm"] == "challenger"
    assert tags["promoted_by"] == f"online experiment {exp_id} --force"
    assert _tags(reg, "2")["experiment.arm"] == "champion" and _tags(reg, "2")["experiment.id"] == exp_id
    assert out["experiment"]["result"]["conclusion"]["forced"] is True


@pytest.mark.parametrize("winner", ["champion", None])
def test_a_winning_champion_or_no_winner_leaves_the_alias(reg: dict[str, Any], monkeypatch: pytest.MonkeyPatch,
                                                          winner: str | None) -> None:
    from flows.experiment import conclude_experiment, report_markdown
    from recloop.experiments import ExperimentStore, OnlineExperiment

    settings = reg["settings"]
    champion = _alias(reg)
    with ExperimentStore(settings.event_log_uri) as store:
        exp = store.start(mode="ab", champion_version=champion, challenger_version="1")
    _decide(monkeypatch, winner)

    def no_load_check(*_: Any, **__: Any) -> Any:
        raise AssertionError("nothing is promoted, nothing is load-checked")

    out = conclude_experiment(settings, load_check=no_load_check)
    assert out["promoted"] is False and out["alias_version"] == champion == _alias(reg)
    assert _tags(reg, "1")["experiment.id"] == exp.experiment_id
    assert _tags(reg, "1")["experiment.winner"] == (winner or "none")
    assert _tags(reg, champion)["experiment.arm"] == "champion"
    concluded = OnlineExperiment.from_dict(out["experiment"])
    assert concluded.status == "concluded" and concluded.result["conclusion"]["alias_version"] == champion
    text = report_markdown(concluded, concluded.result)
    assert exp.experiment_id in text and ("no winner" in text if winner is None else "champion wins" in text)
    assert f"champion stays on version {champion}" in text


def test_the_report_flow_writes_the_markdown_artifact(reg: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    import flows.experiment as fe
    from recloop.experiments import ExperimentStore

    artifacts: list[dict[str, Any]] = []
    monkeypatch.setattr(fe, "create_markdown_artifact", lambda **kw: artifacts.append(kw))
    _decide(monkeypatch, None)
    settings = reg["settings"]

    latest = fe.experiment_report_flow.fn()  # no running experiment: the latest (concluded) one's result
    assert latest["experiment"]["status"] == "concluded" and latest["report"]["conclusion"]
    with ExperimentStore(settings.event_log_uri) as store:
        running = store.start(mode="interleave", champion_version=_alias(reg), challenger_version="1")
    out = fe.experiment_report_flow.fn()
    assert out["experiment"]["experiment_id"] == running.experiment_id and out["report"]["decision"]["winner"] is None
    assert [a["key"] for a in artifacts] == ["online-experiment", "online-experiment"]
    assert artifacts[-1]["markdown"] == out["report_md"] and running.experiment_id in out["report_md"]

    concluded = fe.conclude_experiment_flow.fn(force=False)
    assert concluded["experiment"]["status"] == "concluded" and concluded["promoted"] is False
    assert artifacts[-1]["key"] == "online-experiment" and "concluded" in artifacts[-1]["markdown"]


def test_auto_promotion_goes_ahead_when_no_experiment_runs(recloop_home: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    import flows.evaluate as fev
    from recloop.experiments import ExperimentStore

    class Client:
        def __init__(self) -> None:
            self.tags: list[tuple[str, ...]] = []

        def set_tag(self, run_id: str, key: str, value: str) -> None:
            self.tags.append(("run", run_id, key, value))

        def set_model_version_tag(self, name: str, version: str, key: str, value: str) -> None:
            self.tags.append(("version", version, key, value))

    promoted: list[str] = []
    monkeypatch.setattr(fev.aliases, "promote", lambda client, name, version, **kw: promoted.append(version))
    settings = get_settings()
    client = Client()
    assert fev.auto_promotion_blocked(settings) is None
    assert fev.promote_unless_blocked(client, settings, "run-1", "7", logging.getLogger("test")) is True
    assert promoted == ["7"] and client.tags == []

    with ExperimentStore(settings.event_log_uri) as store:
        exp = store.start(mode="ab", champion_version="7", challenger_version="8")
    assert fev.promote_unless_blocked(client, settings, "run-2", "9", logging.getLogger("test")) is False
    reason = f"online experiment {exp.experiment_id} running"
    assert promoted == ["7"] and client.tags == [("run", "run-2", "promotion.skipped", reason),
                                                 ("version", "9", "promotion.skipped", reason)]

    unreachable = settings.model_copy(update={"event_log_url": "postgresql+psycopg://nobody@127.0.0.1:1/none"})
    assert fev.auto_promotion_blocked(unreachable).startswith("online experiments unreadable")  # fails closed


def test_a_winner_is_not_promoted_over_an_alias_moved_during_the_experiment(reg: dict[str, Any],
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    from flows.experiment import conclude_experiment
    from recloop.experiments import ExperimentStore
    from registry import aliases
    from registry.aliases import PromotionRefused

    settings = reg["settings"]
    champion = _alias(reg)
    challenger, third = [v for v in ("1", "2", "3") if v != champion][:2]
    with ExperimentStore(settings.event_log_uri) as store:
        exp = store.start(mode="ab", champion_version=champion, challenger_version=challenger)
    aliases.promote(reg["client"], reg["name"], third, alias="champion", reason="by hand, mid-experiment")
    _decide(monkeypatch, "challenger")
    with pytest.raises(PromotionRefused, match=f"moved to version {third}"):
        conclude_experiment(settings, load_check=_passing_load_check)
    assert _alias(reg) == third
    out = conclude_experiment(settings, force=True, load_check=_passing_load_check)
    assert out["promoted"] is True and _alias(reg) == challenger
    assert out["experiment"]["experiment_id"] == exp.experiment_id
    assert f"moved to version {third}" in out["experiment"]["result"]["conclusion"]["warnings"][0]

"""Promotion cannot cause an outage (issue 12): checked promotion, last good version, degraded start-up.

One temporary SQLite registry with a tiny trained SASRec, registered three times:
version 1 (good), version 2 (good, but tagged ``gate.decision=fail``), version 3 (its checkpoint
artifact truncated: it never loads). ``recloop model promote`` runs for real (a fresh-process load
check per checked version, ~6-10 s each); the service side is ``serving.runtime`` in process
(``build_runtime`` with in-memory stores, ``ChampionWatcher``), which is the code ``bentoml serve`` runs.
The tests share the registry and run in file order.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import mlflow
import pytest
from fakes import tiny_checkpoint
from typer.testing import CliRunner

from recloop.settings import get_settings

pytestmark = pytest.mark.slow  # four fresh-process load checks (~1 min on 2 cores)

N_ITEMS = 30


class MemoryLog:
    """The event log interface ``RecommenderCore`` needs (no writes happen in these tests)."""

    def append_and_recent(self, event: dict, n: int, after_ts: Any = None) -> tuple[bool, list[str]]:
        return True, [event["item_id"]]

    def recent_items(self, user_id: str, n: int, after_ts: Any = None) -> list[str]:
        return []

    def get(self, event_id: str) -> dict | None:
        return None


class MemoryOnline:
    """A reachable, non-empty online store (every user has a row, none has items)."""

    def recent_items(self, user_id: str) -> list[str] | None:
        return None

    def has_row(self, user_id: str) -> bool:
        return True

    def push_recent_items(self, user_id: str, items: list[str], event_ts: datetime) -> None:
        pass


def _tiny_checkpoint(path: Path) -> Path:
    return tiny_checkpoint(path, N_ITEMS)


@pytest.fixture(scope="module")
def reg(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """Versions 1 (good), 2 (gate failed), 3 (truncated checkpoint); the alias on 1 via a checked promote."""
    from registry.store import log_model
    from registry.tracking import configure_tracking, ensure_experiment

    home = tmp_path_factory.mktemp("promotion") / "home"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RECLOOP_HOME", str(home))
        mp.setenv("RECLOOP_SERVE_POLL_INTERVAL_S", "0.2")
        mp.delenv("RECLOOP_MLFLOW_TRACKING_URI", raising=False)
        mp.delenv("RECLOOP_SERVE_MODEL_VERSION", raising=False)
        mp.delenv("RECLOOP_MODEL_ALIAS", raising=False)
        get_settings.cache_clear()
        settings = get_settings()
        client = configure_tracking(settings)
        good = _tiny_checkpoint(home / "good.pt")
        broken = home / "broken.pt"
        broken.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
        with mlflow.start_run(experiment_id=ensure_experiment(client, settings=settings)):
            for ckpt in (good, good, broken):
                log_model(ckpt, registered_model_name=settings.model_name)
        name = settings.model_name
        client.set_model_version_tag(name, "2", "gate.decision", "fail")
        client.set_model_version_tag(name, "2", "gate.reasons", "candidate ndcg@10 below the champion's")
        first = CliRunner().invoke(_app(), ["model", "promote", "1"])
        assert first.exit_code == 0, first.output
        yield {"settings": settings, "client": client, "name": name, "home": home}
        get_settings.cache_clear()


def _app() -> Any:
    from cli.main import app

    return app


def _cli(*args: str) -> Any:
    return CliRunner().invoke(_app(), ["model", *args])


def _alias(reg: dict[str, Any]) -> str | None:
    from registry.aliases import get_alias_version

    return get_alias_version(reg["client"], reg["name"], "champion")


def _tags(reg: dict[str, Any], version: str) -> dict[str, str]:
    return reg["client"].get_model_version(reg["name"], version).tags


def _last_good(reg: dict[str, Any]) -> str | None:
    from registry.aliases import get_last_good

    return get_last_good(reg["client"], reg["name"], "champion")


def test_a_checked_promotion_records_its_load_check_and_the_last_good_version(reg) -> None:
    assert _alias(reg) == "1"
    tags = _tags(reg, "1")
    assert tags["load_check"] == "pass" and tags["forced"] == "false" and tags["promoted_by"] == "cli"
    assert _last_good(reg) == "1"
    registered = reg["client"].get_registered_model(reg["name"]).tags
    assert registered["last_good_version.champion"] == "1"


def test_unloadable_version_is_refused_without_force(reg) -> None:
    refused = _cli("promote", "3")
    assert refused.exit_code == 1
    assert "does not load in a fresh process" in refused.output and "--force" in refused.output
    error = _tags(reg, "3")["load_check"]
    assert error.startswith("fail: ") and "Error" in error  # the child's last error line, e.g. RuntimeError: ...
    assert error.removeprefix("fail: ")[:60] in " ".join(refused.output.split())
    assert _alias(reg) == "1" and "forced" not in _tags(reg, "3") and _last_good(reg) == "1"


def test_gate_failed_version_is_refused_unless_forced_and_the_force_is_recorded(reg) -> None:
    refused = _cli("promote", "2")
    assert refused.exit_code == 1 and "failed the evaluation gate" in refused.output
    assert "below the champion" in refused.output
    assert _alias(reg) == "1" and "load_check" not in _tags(reg, "2")  # refused before the load check
    forced = _cli("promote", "2", "--force")
    assert forced.exit_code == 0, forced.output
    assert forced.output.strip().splitlines()[-1] == "champion: 1 -> 2" and _alias(reg) == "2"
    tags = _tags(reg, "2")
    assert tags["forced"] == "true" and tags["promoted_by"] == "cli --force"
    assert "failed the evaluation gate" in tags["forced_over"] and tags["load_check"] == "pass"
    assert _last_good(reg) == "2"  # it loaded in a fresh process
    back = _cli("rollback")
    assert back.exit_code == 0 and _alias(reg) == "1"


def test_forced_unloadable_champion_restart_serves_last_good_and_ready_says_degraded(reg, monkeypatch,
                                                                                    request) -> None:
    import serving.runtime as runtime
    from registry.aliases import get_last_good
    from serving.runtime import ChampionWatcher, build_runtime
    from serving.schemas import ReadyResponse

    settings = reg["settings"]

    def start() -> tuple[Any, ChampionWatcher]:
        rt = build_runtime(settings, online=MemoryOnline(), events=MemoryLog())
        if hasattr(rt.core, "stop_online_sync"):
            request.addfinalizer(rt.core.stop_online_sync)  # its push/re-sync daemon thread
        return rt, ChampionWatcher(rt)

    # A healthy start on version 1: served, ok, and recorded as the last good version by the service.
    rt, watcher = start()
    assert rt.core.served.version == "1" and rt.alias_error is None
    assert watcher.status() == ("ok", None) and get_last_good(reg["client"], reg["name"], "champion") == "1"

    forced = _cli("promote", "3", "--force")
    assert forced.exit_code == 0, forced.output
    assert _alias(reg) == "3"
    tags = _tags(reg, "3")
    assert tags["forced"] == "true" and tags["promoted_by"] == "cli --force"
    assert "does not load in a fresh process" in tags["forced_over"]
    assert _last_good(reg) == "1"  # a version that does not load never becomes the last good one

    # The running service keeps version 1 and now says why it is degraded.
    assert watcher.poll_once() is False and rt.core.served.version == "1"
    status, reason = watcher.status()
    assert status == "degraded" and "version 3 failed to load" in reason and "last good version 1" in reason

    # A restart does not crash-loop: it serves the last good version, degraded, with the reason.
    rt2, watcher2 = start()
    assert rt2.core.served.version == "1" and rt2.alias_version == "3" and "version 3" in rt2.alias_error
    status, reason = watcher2.status(event_log=True, online_store=True)
    assert status == "degraded" and "'champion' -> 3" in reason and "serving last good version 1" in reason
    assert watcher2.info().last_error and watcher2.info().version == "1"
    ready = ReadyResponse(ready=True, model_loaded=True, event_log=True, online_store=True, status=status,
                          reason=reason, detail=watcher2.info())
    assert ready.status == "degraded" and ready.detail.version == "1"
    assert watcher2.status(online_store=False)[1].endswith("online store unreachable")
    online = {"reachable": True, "empty": True, "pending_pushes": 2}  # RecommenderCore.online_status()
    assert watcher2.status(online=online)[1].endswith("online store empty; 2 online pushes pending")

    # The broken version is retried with a back-off, not reloaded on every poll.
    loads: list[str | None] = []
    real = runtime.served_from_registry
    monkeypatch.setattr(runtime, "served_from_registry", lambda s, c, v, *a: loads.append(v) or real(s, c, v, *a))
    assert watcher2.poll_once() is False and loads == []

    # Rolling the alias back to the served version clears the degraded state.
    back = _cli("rollback")
    assert back.exit_code == 0 and _alias(reg) == "1"
    assert watcher2.poll_once() is False and watcher2.status() == ("ok", None) and loads == []


def test_start_up_fails_loudly_when_nothing_loads(reg) -> None:
    from registry.aliases import fallback_candidates, last_good_tag, set_alias
    from serving.runtime import load_champion

    client, name, settings = reg["client"], reg["name"], reg["settings"]
    assert fallback_candidates(client, name, "champion", exclude=["3"])[0] == "1"
    other = settings.model_copy(update={"model_alias": "canary"})  # an alias with no last good, no history
    set_alias(client, name, "canary", "3")
    try:
        with pytest.raises(RuntimeError, match="version 3 failed to load"):
            load_champion(other, client, {}, {})
        client.set_registered_model_tag(name, last_good_tag("canary"), "2")
        served, alias_version, error = load_champion(other, client, {}, {})
        assert (served.version, alias_version) == ("2", "3") and "failed to load" in error
    finally:
        client.delete_registered_model_alias(name, "canary")
        client.delete_registered_model_tag(name, last_good_tag("canary"))

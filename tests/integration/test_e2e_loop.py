"""End to end on ml-100k: pipeline → served champion → feedback through the service → loop run 2.

The served alias is set to ``prod`` (``RECLOOP_MODEL_ALIAS``): promotion must move that alias, and the
service must follow it; nothing may fall back to a hard-coded ``champion``.

Marked slow (several minutes: two trainings and a real `bentoml serve`); CI runs it all the same.
"""

from __future__ import annotations

import socket
import time
from pathlib import Path

import httpx
import pytest

pytestmark = pytest.mark.slow
ALIAS = "prod"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def platform_env(tmp_path_factory: pytest.TempPathFactory, ml100k_path: Path):
    """Isolated home, free serving port, fast alias polling; stops the service afterwards."""
    from prefect.testing.utilities import prefect_test_harness

    from recloop.settings import get_settings

    home = tmp_path_factory.mktemp("e2e") / "home"
    mp = pytest.MonkeyPatch()
    mp.setenv("RECLOOP_HOME", str(home))
    mp.setenv("RECLOOP_SERVE_PORT", str(_free_port()))
    mp.setenv("RECLOOP_SERVE_POLL_INTERVAL_S", "1")
    mp.setenv("RECLOOP_AUTO_PROMOTE", "true")
    mp.setenv("RECLOOP_MODEL_ALIAS", ALIAS)
    get_settings.cache_clear()
    settings = get_settings()
    with prefect_test_harness(server_startup_timeout=120):
        yield settings
    from supervisor import services

    services.stop(settings, "serving")
    mp.undo()
    get_settings.cache_clear()


def test_pipeline_then_feedback_then_loop(platform_env, ml100k_path: Path) -> None:
    from prefect import get_client
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName

    from flows.deploy import served_version, service_url
    from flows.loop import loop_flow, read_watermark
    from flows.pipeline import pipeline_flow
    from registry.aliases import get_alias_version
    from registry.tracking import configure_tracking

    settings = platform_env
    train = {"epochs": 12, "patience": 3}

    # Run 1: the whole pipeline → version 1 is champion and served.
    t0 = time.monotonic()
    run1 = pipeline_flow(source="movielens-100k", path=str(ml100k_path), train_params=train)
    assert run1["ingest"]["new_events"] == 100_000
    assert run1["evaluate"]["passed"] and run1["evaluate"]["promoted"]
    client = configure_tracking(settings)
    assert settings.model_alias == ALIAS
    assert get_alias_version(client, settings.model_name, ALIAS) == run1["evaluate"]["version"] == "1"
    assert get_alias_version(client, settings.model_name, "champion") is None  # no hard-coded alias moved
    url = service_url(settings)
    assert served_version(url) == "1"
    first = httpx.post(f"{url}/recommend", json={"user_id": "1", "k": 5}, timeout=10).json()
    assert first["model_version"] == "1" and first["variant"] == ALIAS

    # Feedback through the running service: 3 users × 5 clicks on items they have not seen.
    sent = 0
    for user in ("1", "2", "3"):
        for _ in range(5):
            rec = httpx.post(f"{url}/recommend", json={"user_id": user, "k": 5}, timeout=10).json()
            item = rec["items"][0]["item_id"]
            click = {"user_id": user, "item_id": item, "event_type": "click"}
            ack = httpx.post(f"{url}/feedback", json=click, timeout=10)
            assert ack.status_code == 200, ack.text
            nxt = httpx.post(f"{url}/recommend", json={"user_id": user, "k": 5}, timeout=10).json()
            # the click shows in the very next answer
            assert item not in {it["item_id"] for it in nxt["items"]}
            sent += 1

    # Run 2: the loop consumes exactly those events, warm-starts, gates, and the service follows the alias.
    t1 = time.monotonic()
    run2 = loop_flow(train_params={"epochs": 4, "patience": 2})
    print(f"wall_s pipeline={t1 - t0:.1f} loop={time.monotonic() - t1:.1f}")
    assert run2["status"] == "done"
    assert run2["new_events"] == sent
    assert run2["ingest"]["new_events"] == sent
    assert read_watermark(settings.home) == run2["watermark_to"] > run2["watermark_from"] == 0
    train_run = client.get_run(run2["train"]["run_id"])
    assert train_run.data.tags["warm_start_from"].endswith("/1")
    # the turn is incremental (issue 20): features from the new batch only, a sampled training set, a lake fingerprint
    assert run2["mode"] == "incremental" and run2["features"]["mode"] == "incremental"
    assert run2["training_set"]["touched_users"] == 3
    assert train_run.data.tags["data.source"] == "parquet" and len(train_run.data.tags["data.lake_sha256"]) == 64
    champion = get_alias_version(client, settings.model_name, ALIAS)
    assert champion == ("2" if run2["evaluate"]["promoted"] else "1")
    assert get_alias_version(client, settings.model_name, "champion") is None
    assert served_version(url) == champion

    # A second loop turn with no new feedback consumes nothing.
    assert loop_flow()["status"] == "skipped"

    # MLflow lists both versions with their gate tags.
    versions = {str(mv.version): mv for mv in client.search_model_versions(f"name='{settings.model_name}'")}
    assert set(versions) == {"1", "2"}
    for mv in versions.values():
        assert mv.tags.get("gate.decision") in ("pass", "fail")
        assert "gate.reasons" in mv.tags

    # The Prefect API lists both flow runs and the scheduled loop deployment.
    from flows.loop import loop_flow as lf

    deployment_id = lf.to_deployment(name="recloop-loop", cron=settings.loop_cron).apply()
    import asyncio

    async def _query():
        async with get_client() as pc:
            runs = {
                name: await pc.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=[name])))
                for name in ("pipeline", "loop")
            }
            dep = await pc.read_deployment(deployment_id)
            return runs, dep

    runs, dep = asyncio.run(_query())
    assert len(runs["pipeline"]) == 1 and len(runs["loop"]) == 2
    assert all(r.state.is_completed() for r in runs["pipeline"] + runs["loop"])
    assert dep.schedules and dep.schedules[0].schedule.cron == settings.loop_cron

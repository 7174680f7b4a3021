"""Event-driven retraining: the monitor's drift event starts a loop run through the loop deployment's trigger.

The lake is real ml-100k; new events are appended to the event log past the loop's cursor: first 1,000
events drawn from the lake itself (no drift), then 1,000 whose items come from the popularity tail (a
shifted popularity). The loop deployment is applied with its triggers (``flows.loop.loop_deployment``, the
one ``recloop up`` serves) to a Prefect test server, whose trigger and action services create the run.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

pytestmark = pytest.mark.slow
N_NEW = 1000


@pytest.fixture(scope="module")
def platform(tmp_path_factory: pytest.TempPathFactory, ml100k_path: Path) -> Iterator[pd.DataFrame]:
    """Home with the ml-100k lake, a Prefect test server; yields the lake's events."""
    from prefect.testing.utilities import prefect_test_harness

    from recloop.lake import Lake
    from recloop.settings import get_settings
    from recloop.sources import load_source

    mp = pytest.MonkeyPatch()
    mp.setenv("RECLOOP_HOME", str(tmp_path_factory.mktemp("monitor") / "home"))
    mp.setenv("RECLOOP_MONITOR_BOOTSTRAP_WINDOWS", "100")
    get_settings.cache_clear()
    lake = Lake(get_settings().lake_path)
    lake.ingest(load_source("movielens-100k", ml100k_path))
    with prefect_test_harness(server_startup_timeout=90):
        yield lake.events()
    mp.undo()
    get_settings.cache_clear()


def _append(events: pd.DataFrame, tag: str) -> int:
    from recloop.eventlog import EventLog
    from recloop.settings import get_settings

    now = pd.Timestamp.now(tz="UTC")
    rows = events.assign(event_id=[f"{tag}-{i}" for i in range(len(events))], source="feedback",
                         timestamp=[now - pd.Timedelta(seconds=len(events) - i) for i in range(len(events))])
    log = EventLog(get_settings().event_log_uri)
    try:
        log.append(rows[["event_id", "user_id", "item_id", "event_type", "value", "timestamp", "source"]])
        return int(log.max_seq())
    finally:
        log.close()


def _triggered_runs(deployment_id) -> list:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId

    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id])))
    return [r for r in runs if r.parameters.get("trigger") in ("drift", "freshness")]


def test_shifted_popularity_triggers_a_loop_run_and_no_drift_none(platform: pd.DataFrame) -> None:
    from prefect.client.orchestration import get_client

    from flows.loop import loop_deployment, write_cursor
    from flows.watch import EVENTS, monitor_flow
    from recloop.cursor import LogCursor
    from recloop.settings import get_settings
    from registry.tracking import configure_tracking

    settings = get_settings()
    lake_events = platform
    deployment_id = loop_deployment(settings).apply()
    rng = np.random.default_rng(0)

    # No drift: events drawn from the training data itself.
    same = lake_events.iloc[rng.choice(len(lake_events), N_NEW, replace=False)].reset_index(drop=True)
    consumed = _append(same, "same")
    calm = monitor_flow(checks=["drift"])
    drift = calm["checks"]["drift"]
    assert drift["status"] == "ok" and calm["emitted"] == [], drift
    assert drift["protocol"]["window_events"] == N_NEW

    # The loop consumed them; then the popularity shifts to the catalogue's tail.
    write_cursor(settings.home, LogCursor(consumed))
    popularity = lake_events["item_id"].value_counts()
    tail = popularity.index[300:360].to_numpy()
    shifted = lake_events.iloc[rng.choice(len(lake_events), N_NEW, replace=False)].reset_index(drop=True)
    shifted["item_id"] = rng.choice(tail, N_NEW)
    _append(shifted, "shifted")
    started = datetime.now(UTC)
    alarm = monitor_flow(checks=["drift"])
    drift = alarm["checks"]["drift"]
    assert drift["status"] == "drift" and "popularity_js" in drift["exceeded"], drift
    assert drift["stats"]["popularity_js"] > drift["thresholds"]["popularity_js"]
    assert alarm["emitted"] == [EVENTS["drift"]]

    deadline = time.monotonic() + 60
    runs = _triggered_runs(deployment_id)
    while not runs and time.monotonic() < deadline:
        time.sleep(1)
        runs = _triggered_runs(deployment_id)
    assert len(runs) == 1, [r.parameters for r in runs]
    assert runs[0].parameters["trigger"] == "drift" and runs[0].created >= started  # started by the drift event
    with get_client(sync_client=True) as prefect_client:  # at most one loop run at a time
        deployment = prefect_client.read_deployment(deployment_id)
    assert deployment.global_concurrency_limit.limit == 1
    assert deployment.concurrency_options.collision_strategy.value == "CANCEL_NEW"

    # The results are on a monitoring run and the artifact.
    client = configure_tracking(settings)
    run = client.get_run(alarm["run_id"])
    assert run.data.tags["monitor.drift"] == "drift" and run.data.tags["monitor.alerts"] == EVENTS["drift"]
    assert run.data.metrics["drift.popularity_js"] == pytest.approx(drift["stats"]["popularity_js"])


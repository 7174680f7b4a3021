"""The online-metrics flow and `recloop online-metrics` against a temp home (SQLite event log, MLflow).

A few exposures are recorded through ``ExposureLog.record`` (one of them 200 days old, past the
retention) and clicks/skips are appended to the event log with their ``request_id`` and ``position``.
The flow runs in-process under a Prefect test harness (its markdown artifact needs an API).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from typer.testing import CliRunner

from recloop.eventlog import EventLog
from recloop.exposures import ExposureLog
from recloop.settings import get_settings

NOW = datetime.now(UTC)


def _seed(home: Path) -> None:
    """r1 (champion v3) [a b c], r2 (challenger v4) [b d e], r-old (v2, 200 days ago) [a b c]; then
    click a@1 on r1, the same click twice, skip b@1 on r2, click e@3 on r2, click x on an unknown request."""
    uri = get_settings().event_log_uri
    log = ExposureLog(uri)
    try:
        log.record("r1", "u1", "3", [("a", 0.9), ("b", 0.5), ("c", 0.1)], variant="champion",
                   ts=NOW - timedelta(minutes=5))
        log.record("r2", "u2", "4", [("b", 0.8), ("d", 0.4), ("e", 0.2)], variant="challenger",
                   ts=NOW - timedelta(minutes=4))
        log.record("r-old", "u1", "2", [("a", 0.9), ("b", 0.5), ("c", 0.1)], variant="champion",
                   ts=NOW - timedelta(days=200))
        assert log.flush()
    finally:
        log.close()
    events = EventLog(uri)
    try:
        t = NOW - timedelta(minutes=3)
        events.append([
            {"user_id": "u1", "item_id": "a", "event_type": "click", "timestamp": t, "request_id": "r1", "position": 1},
            {"user_id": "u1", "item_id": "a", "event_type": "click", "timestamp": t + timedelta(seconds=1),
             "request_id": "r1", "position": 1},
            {"user_id": "u2", "item_id": "b", "event_type": "skip", "timestamp": t, "request_id": "r2", "position": 1},
            {"user_id": "u2", "item_id": "e", "event_type": "click", "timestamp": t, "request_id": "r2", "position": 3},
            {"user_id": "u2", "item_id": "x", "event_type": "click", "timestamp": t, "request_id": "r9", "position": 1},
            {"user_id": "u2", "item_id": "d", "event_type": "click", "timestamp": t},  # not linked: not read
        ])
    finally:
        events.close()


@pytest.fixture(scope="module")
def harness() -> Iterator[None]:
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=60):
        yield


def test_flow_logs_monitoring_runs_and_prunes(recloop_home: Path, harness: None) -> None:
    from flows.monitor import MONITORING_EXPERIMENT, online_metrics_flow
    from registry.tracking import configure_tracking

    _seed(recloop_home)
    out = online_metrics_flow(by="variant", k=2)

    overall = out["metrics"]["overall"]
    # 3 requests x 3 slots; clicks r1a (once), r2e; skip r2b; r9 is unattributed
    assert (overall["requests"], overall["impressions"], overall["clicks"], overall["skips"]) == (3, 9, 2, 1)
    assert overall["unattributed_by_reason"]["unknown_request"] == 1
    assert out["pruned"]["exposures"] == 1 and out["pruned"]["items"] == 3  # r-old and its 3 slots
    with ExposureLog(get_settings().event_log_uri) as log:
        assert log.read()[0]["request_id"].tolist() == ["r1", "r2"]

    client = configure_tracking(get_settings())
    experiment = client.get_experiment_by_name(MONITORING_EXPERIMENT)
    runs = {r.data.tags["monitor.group"]: r for r in client.search_runs([experiment.experiment_id])}
    assert set(runs) == {"overall", "variant=champion", "variant=challenger"}
    champion = runs["variant=champion"]
    # champion before pruning: r1 (v3) and r-old (v2): 6 slots, 4 at @2, one click at 1
    assert champion.data.tags["model_version"] == "2,3" and champion.data.tags["variant"] == "champion"
    assert champion.data.metrics["clicks"] == 1 and champion.data.metrics["ctr_at_2"] == 1 / 4
    assert champion.data.metrics["ctr.pos1"] == 1 / 2
    assert champion.data.metrics["freshness_at_2"] == 1.0  # slots @2 are a and b: both have recent events
    challenger = runs["variant=challenger"]
    assert challenger.data.tags["model_version"] == "4"
    assert challenger.data.metrics["ctr"] == 1 / 3 and challenger.data.metrics["skip_rate"] == 1 / 3
    assert runs["overall"].data.metrics["unattributed"] == 1
    assert "online metrics by variant" in out["report_md"].lower()

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with get_client(sync_client=True) as prefect_client:
        artifacts = prefect_client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["online-metrics"])))
    assert [a.data for a in artifacts] == [out["report_md"]]


def test_cli_prints_one_json_document(recloop_home: Path) -> None:
    from cli.main import app

    _seed(recloop_home)
    result = CliRunner().invoke(app, ["online-metrics", "--by", "version", "--k", "3", "--json",
                                      "--since", (NOW - timedelta(days=1)).isoformat()])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)  # the whole of stdout is one document
    assert list(report["groups"]) == ["3", "4"]  # the 200-day-old v2 exposure is before --since
    assert report["groups"]["3"]["ctr@3"] == 1 / 3 and report["overall"]["catalogue_share"] is None
    assert report["protocol"]["since"] is not None
    # No lake: freshness counts back from the log's newest event; c never had an event, so it is not fresh.
    assert report["groups"]["3"]["freshness@3"] == 2 / 3 and report["groups"]["4"]["freshness@3"] == 1.0
    assert report["protocol"]["freshness_days"] == get_settings().freshness_days
    bad = CliRunner().invoke(app, ["online-metrics", "--since", "yesterday-ish", "--json"])
    assert bad.exit_code == 1 and bad.stdout == ""

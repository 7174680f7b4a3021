"""Drift statistics on real ml-100k (``recloop.drift``) and the other monitors' pure checks (``recloop.monitors``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from recloop.drift import (
    STATISTICS,
    activity_bin,
    drift_statistics,
    drift_verdict,
    no_drift_distribution,
    no_drift_thresholds,
    reference_profile,
)
from recloop.monitors import ctr_check, histogram_quantile, parse_serving_metrics, serving_health
from recloop.policy import EventPolicy

N = 1000


@pytest.fixture(scope="module")
def ml100k(ml100k_path: Path) -> pd.DataFrame:
    from recloop.sources import load_source

    return load_source("movielens-100k", ml100k_path).events.sort_values("timestamp", kind="stable")


def test_shifted_popularity_and_new_items_exceed_the_no_drift_quantile(ml100k: pd.DataFrame) -> None:
    ref = ml100k.iloc[:-N]
    profile = reference_profile(ref)
    thresholds = no_drift_thresholds(profile, N, n_windows=100, seed=0)
    assert thresholds == no_drift_thresholds(profile, N, n_windows=100, seed=0)  # seeded
    rng = np.random.default_rng(0)
    same = ref.iloc[rng.choice(len(ref), N, replace=False)]
    calm = drift_statistics(profile, same)
    assert not drift_verdict(calm, thresholds)["drifted"], (calm, thresholds)

    tail = ref["item_id"].value_counts().index[300:360].to_numpy()
    shifted = same.assign(item_id=rng.choice(tail, N))
    verdict = drift_verdict(drift_statistics(profile, shifted), thresholds)
    assert verdict["exceeded"] == ["popularity_js"]

    fresh = same.assign(item_id=[f"new{i % 40}" if i % 4 == 0 else x for i, x in enumerate(same["item_id"])])
    stats = drift_statistics(profile, fresh)
    assert stats["new_item_share"] == pytest.approx(0.25) and "new_item_share" in drift_verdict(stats, thresholds)[
        "exceeded"]
    clicks = same.assign(event_type="click")  # ml-100k holds ratings only
    assert drift_statistics(profile, clicks)["event_mix_js"] == pytest.approx(1.0)
    newcomers = same.assign(user_id=[f"nu{i}" for i in range(N)])
    assert "activity_js" in drift_verdict(drift_statistics(profile, newcomers), thresholds)["exceeded"]


def test_no_drift_windows_compare_with_the_rest_of_the_reference(ml100k: pd.DataFrame) -> None:
    profile = reference_profile(ml100k.iloc[:20_000])
    dist = no_drift_distribution(profile, 500, 20, seed=1)
    assert list(dist.columns) == list(STATISTICS) and len(dist) == 20
    assert ((dist >= 0) & (dist <= 1)).all().all()
    # A window is a real sample: a larger window is closer to the rest (less sampling noise).
    big = no_drift_distribution(profile, 5000, 20, seed=1)
    assert big["popularity_js"].median() < dist["popularity_js"].median()
    assert drift_verdict({s: 0.5 for s in STATISTICS}, {s: 0.9 for s in STATISTICS},
                         {"popularity_js": 0.1})["exceeded"] == ["popularity_js"]  # a fixed override wins
    assert activity_bin(np.array([0, 1, 2, 3, 4, 10**9])).tolist() == [0, 1, 2, 2, 3, 11]
    with pytest.raises(ValueError, match="window_size"):
        no_drift_distribution(profile, 20_000, 5, seed=0)
    with pytest.raises(ValueError, match="lacks"):
        drift_statistics(profile, pd.DataFrame({"user_id": ["1"]}))


_LABELS = 'service_name="r",service_version="",runner_name="r"'
METRICS = "\n".join(
    ["# TYPE bentoml_service_request_total counter"]
    + [f'bentoml_service_request_total{{endpoint="{e}",http_response_code="{c}",{_LABELS}}} {n}'
       for e, c, n in (("/recommend", 200, 90.0), ("/recommend", 500, 2.0), ("/feedback", 422, 8.0),
                       ("/metrics", 200, 50.0))]
    + ["# TYPE bentoml_service_request_duration_seconds histogram"]
    + [f'bentoml_service_request_duration_seconds_bucket{{endpoint="/recommend",http_response_code="200",le="{le}",'
       f'{_LABELS}}} {n}' for le, n in (("0.01", 50.0), ("0.1", 90.0), ("1.0", 100.0), ("+Inf", 100.0))]
) + "\n"


def test_serving_health_reads_bentoml_counters_and_takes_deltas() -> None:
    reading = parse_serving_metrics(METRICS)
    assert reading["requests"] == {"200": 90.0, "500": 2.0, "422": 8.0}  # /metrics is not an API route
    # p99 of 100 observations: rank 99 lies in (0.1, 1.0], 9 of its 10 -> 0.1 + 0.9 * 9/10
    assert histogram_quantile(0.99, reading["buckets"]) == pytest.approx(0.91)
    health = serving_health(reading, None, max_error_rate=0.01, max_p99_ms=500)
    assert (health["requests"], health["errors"], health["client_errors"]) == (100, 2, 8)
    assert health["exceeded"] == ["error_rate", "p99_ms"] and health["unhealthy"]
    same = serving_health(reading, reading, max_error_rate=0.01, max_p99_ms=500)
    assert same["requests"] == 0 and same["error_rate"] is None and not same["unhealthy"]
    restarted = serving_health({"requests": {"200": 5.0}, "buckets": {0.01: 5.0, float("inf"): 5.0}}, reading,
                               max_error_rate=0.01, max_p99_ms=500)
    assert restarted["requests"] == 5 and restarted["p99_ms"] == pytest.approx(10 * 0.99)
    with pytest.raises(ValueError, match="Prometheus"):
        parse_serving_metrics("a b c d e")


def test_ctr_check_flags_a_window_whose_interval_lies_below_the_baseline() -> None:
    ts = pd.Timestamp("2024-01-01", tz="UTC")
    n = 400
    exposures = pd.DataFrame({"request_id": [f"r{i}" for i in range(2 * n)], "user_id": "u", "model_version": "3",
                              "variant": "champion", "ts": [ts + pd.Timedelta(minutes=i) for i in range(2 * n)]})
    items = pd.DataFrame({"request_id": exposures["request_id"], "position": 1, "item_id": "a"})
    # 30 % clicks in the first n requests, 5 % after them
    clicked = [f"r{i}" for i in range(n) if i % 10 < 3] + [f"r{i}" for i in range(n, 2 * n) if i % 20 == 0]
    events = pd.DataFrame({"request_id": clicked, "item_id": "a", "event_type": "click"})
    out = ctr_check(exposures, items, events, EventPolicy(), version="3", since=None, baseline_exposures=n, k=10)
    assert out["baseline"]["ctr"] == pytest.approx(0.3) and out["window"]["ctr"] == pytest.approx(0.05)
    assert out["status"] == "dropped" and out["window"]["ci"][1] < out["baseline"]["ci"][0]
    calm = ctr_check(exposures, items, events, EventPolicy(), version="3", since=None, baseline_exposures=2 * n)
    assert calm["status"] == "insufficient" and not calm["dropped"]  # no window after the baseline
    other = ctr_check(exposures, items, events, EventPolicy(), version="4", since=None)
    assert other["status"] == "insufficient"


def test_prefect_yaml_declares_the_triggers_recloop_up_serves() -> None:
    import yaml

    from flows.watch import loop_triggers
    from recloop.settings import Settings

    root = Path(__file__).resolve().parents[2]
    served = {t.name: t for t in loop_triggers(Settings())}
    for name in ("prefect.yaml", "prefect-k8s.yaml"):
        doc = yaml.safe_load((root / "infra" / name).read_text())
        loop = next(d for d in doc["deployments"] if d["name"] == "recloop-loop")
        assert loop["concurrency_limit"] == {"limit": 1, "collision_strategy": "CANCEL_NEW"}
        declared = {t["name"]: t for t in loop["triggers"]}
        assert set(declared) == set(served), name
        for key, trigger in served.items():
            assert set(declared[key]["expect"]) == trigger.expect and declared[key]["parameters"] == trigger.parameters
            assert declared[key]["within"] == trigger.within.total_seconds() and declared[key]["posture"] == "Reactive"
            assert declared[key]["match"] == trigger.match.model_dump()

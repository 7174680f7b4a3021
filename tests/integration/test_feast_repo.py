"""The Feast repo itself: config files, declarations, concurrent applies, the watermark."""

from __future__ import annotations

import math
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pandas as pd
import pytest
from feast.repo_config import load_repo_config

from featurestore.materialize import (
    apply_repo,
    feature_repo_dir,
    load_declarations,
    materialize_incremental,
    read_watermark,
    refresh_features,
)
from featurestore.online import OnlineFeatures, feature_store_config, open_feature_store
from recloop.contract import coerce_events
from recloop.settings import Settings

T0 = datetime(2024, 1, 1, tzinfo=UTC)


def _events(n_users: int, start: datetime, n_per_user: int = 6) -> pd.DataFrame:
    rows = [
        {
            "user_id": f"u{u}",
            "item_id": f"i{(u + k) % 7}",
            "event_type": "rating",
            "value": 1 + (u + k) % 5,
            "timestamp": start + timedelta(hours=u, minutes=10 * k),
        }
        for u in range(n_users)
        for k in range(n_per_user)
    ]
    return coerce_events(pd.DataFrame(rows), default_source="synthetic")


def _settings(tmp_path: Path, **kw) -> Settings:
    return Settings(home=tmp_path / "home", max_seq_len=4, **kw)


@pytest.mark.parametrize("backend", ["sqlite", "redis"])
def test_yaml_files_describe_the_store_recloop_builds(tmp_path, monkeypatch, backend):
    settings = _settings(tmp_path, online_store=backend)
    monkeypatch.setenv("RECLOOP_HOME", str(settings.home))
    monkeypatch.setenv("RECLOOP_REDIS_URL", settings.redis_url)
    repo = feature_repo_dir(settings)
    name = "feature_store.yaml" if backend == "sqlite" else "feature_store.redis.yaml"
    from_yaml = load_repo_config(repo, repo / name)
    built = feature_store_config(settings)
    assert from_yaml.project == built.project == "recloop"
    assert from_yaml.registry.registry_type == built.registry.registry_type == "sql"
    assert from_yaml.registry.path == built.registry.path
    assert from_yaml.online_store.type == built.online_store.type == backend
    assert from_yaml.online_store.model_dump() == built.online_store.model_dump()
    assert from_yaml.offline_store.type == built.offline_store.type == "file"


def test_prod_profile_selects_redis(tmp_path):
    assert feature_store_config(_settings(tmp_path, profile="prod")).online_store.type == "redis"
    assert feature_store_config(_settings(tmp_path)).online_store.type == "sqlite"


def test_declarations_have_ttl_typed_described_schema_tags_and_the_settings_service(tmp_path):
    from feast import FeatureService, FeatureView

    objects = load_declarations(feature_repo_dir(_settings(tmp_path)))
    views = {o.name: o for o in objects if isinstance(o, FeatureView)}
    assert set(views) == {"user_recent_items", "user_stats", "item_stats", "item_content"}
    for view in views.values():
        assert view.ttl is not None and view.tags.get("owner") == "recloop"
        assert view.features and all(f.description for f in view.features)
    assert views["user_recent_items"].stream_source.name == "user_recent_items_push"
    services = [o.name for o in objects if isinstance(o, FeatureService)]
    assert services == [Settings().feature_service]


def test_two_concurrent_applies_leave_a_readable_registry(tmp_path):
    settings = _settings(tmp_path)
    repo = feature_repo_dir(settings)
    errors: list[BaseException] = []

    def apply_once() -> None:
        try:
            apply_repo(open_feature_store(settings), repo)
        except Exception as err:  # noqa: BLE001 - collected and asserted below
            errors.append(err)

    threads = [threading.Thread(target=apply_once) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    fresh = open_feature_store(settings)
    names = sorted(v.name for v in fresh.list_feature_views())
    assert names == ["item_content", "item_stats", "user_recent_items", "user_stats"]
    assert fresh.get_feature_service("sasrec_v1").name == "sasrec_v1"
    assert errors == []
    OnlineFeatures(fresh, settings=settings)  # the serving read path resolves the service


def test_failed_materialisation_keeps_the_watermark_and_a_rerun_completes(tmp_path, monkeypatch):
    settings = _settings(tmp_path, feast_project="wm")
    store = open_feature_store(settings)
    features_dir = settings.home / "features"
    events = _events(3, T0)
    real_write = store.write_to_online_store

    def failing_write(view, df, **kw):
        if view == "user_stats":
            raise ConnectionError("online store went away")
        return real_write(view, df, **kw)

    monkeypatch.setattr(store, "write_to_online_store", failing_write)
    with pytest.raises(ConnectionError):
        refresh_features(store, settings, events, None, None, datetime.now(UTC))
    assert read_watermark(features_dir) is None  # user_recent_items got written: a partial run
    monkeypatch.setattr(store, "write_to_online_store", real_write)
    summary = refresh_features(store, settings, events, None, None, datetime.now(UTC))
    assert read_watermark(features_dir) == events["timestamp"].max().to_pydatetime()
    assert summary["views"] == ["user_recent_items", "user_stats", "item_stats"]

    # incremental: only newer events are in the next window; state reflects them
    later = pd.concat([events, _events(1, T0 + timedelta(days=2), n_per_user=2)], ignore_index=True)
    summary = refresh_features(store, settings, later, None, None, datetime.now(UTC), overlap_s=0)
    assert summary["start"] == events["timestamp"].max().isoformat()
    online = OnlineFeatures(store, settings=settings, freshness_s=math.inf)
    assert online.recent_items("u0") == ["i4", "i5", "i0", "i1"]  # u0: i0..i5, then i0, i1; last 4
    assert online.user_stats("u0")["n_events"] == 8


def test_future_stamped_events_do_not_advance_the_watermark_past_real_data(tmp_path):
    settings = _settings(tmp_path, feast_project="future")
    store = open_feature_store(settings)
    now = datetime.now(UTC)
    events = _events(2, T0)
    future = _events(1, now + timedelta(days=365))
    refresh_features(store, settings, pd.concat([events, future], ignore_index=True), None, None, now)
    assert read_watermark(settings.home / "features") == events["timestamp"].max().to_pydatetime()
    online = OnlineFeatures(store, settings=settings, freshness_s=math.inf)
    assert online.recent_items("u0") is not None
    # u0 of the future frame is the same id: its online row must be the past one, not the future one
    assert online.user_stats("u0")["n_events"] == 6


def test_feast_materialize_and_direct_writes_give_the_same_online_rows(tmp_path):
    events = _events(4, T0)
    now = datetime.now(UTC)
    reads = {}
    for engine in ("feast", "direct"):
        settings = _settings(tmp_path / engine, feast_project=engine)
        store = open_feature_store(settings)
        refresh_features(store, settings, events, None, None, now, engine=engine)
        online = OnlineFeatures(store, settings=settings, freshness_s=math.inf)
        reads[engine] = {
            u: (online.recent_items(u), online.user_stats(u)) for u in events["user_id"].unique()
        }
        reads[engine]["items"] = online.item_features(["i0", "i3"]).to_dict("list")
    assert reads["feast"] == reads["direct"]
    with pytest.raises(ValueError, match="engine="):
        materialize_incremental(store, tmp_path, None, now, engine="spark")
